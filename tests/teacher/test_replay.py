"""Replay targets: the teacher's maps on every augmented view of E seeded epochs, built once (resumable, shardable),
read back in training order; exact against the live teacher; training and online AT see the same batches."""

import csv
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr
from typer.testing import CliRunner

from atcache.teacher.pipeline import build_cache
from atcache.cli import app
from helpers import TEST_IMGSZ, TEST_LAYERS, assert_clean, assert_one_line_error, build_config, cli_command

# with --gradient, so every guarantee below (resume, shards, devices, dask, verify) covers replay/grad/* as well
REPLAY = dict(replay_epochs=2, aug_seed=11, augment=(("close_mosaic", 1), ("mixup", 0.5)), gradient=True,
              gradient_stride=8)
REPLAY_ARGS = ["--replay-epochs", "2", "--aug-seed", "11", "close_mosaic=1", "mixup=0.5", "--gradient",
               "--gradient-stride", "8"]
DRILL = Path(__file__).with_name("drill_build.py")
runner = CliRunner()


@pytest.fixture(scope="module")
def replay_cache(voc_yaml, teacher_pt, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("replay") / "replay.zarr"
    report = build_cache(build_config(voc_yaml, out, teacher=str(teacher_pt), **REPLAY))
    assert report.computed == 31 and report.replayed == 2 * 31
    return out


def replay_arrays(path) -> dict:
    g = zarr.open_group(str(path), mode="r")
    return {name: g[f"replay/{name}"][:] for name in ("maps", "stats", "sample", "record", "done", "grad/direction")}


def assert_same_replay(a, b):
    x, y = replay_arrays(a), replay_arrays(b)
    for key in x:
        np.testing.assert_array_equal(x[key], y[key], err_msg=key)


@pytest.mark.release_range
def test_replay_arrays_hold_every_epoch_in_training_order(replay_cache):
    from atcache.train.samplers import EpochSampler
    from atcache.cache import arrays as store_arrays
    from atcache.cache.store import CacheStore

    store = CacheStore.open(replay_cache)
    replay = store.spec.replay
    assert (replay.epochs, replay.samples, replay.aug_seed) == (2, 31, 11)
    assert replay.augment["close_mosaic"] == 1 and replay.augment["mixup"] == 0.5 and replay.augment["epochs"] == 2
    arrays = replay_arrays(replay_cache)
    pixels = sum((TEST_IMGSZ // layer.stride) ** 2 for layer in store.spec.layers)
    assert arrays["done"].all() and arrays["maps"].shape == (2, 31, pixels)  # every layer of a view in one row
    assert store_arrays.replay_maps(store, 16).shape == (2, 31, TEST_IMGSZ // 8, TEST_IMGSZ // 8)
    for e in range(2):  # position p of epoch e holds the sample epoch e's sampler visits p-th
        np.testing.assert_array_equal(arrays["sample"][e], EpochSampler(31, 11).order(e))
    assert len(np.unique(arrays["record"])) == 62  # every augmented view is another image
    norms = np.linalg.norm(store_arrays.replay_maps(store, 6).compute().astype(np.float32).reshape(62, -1), axis=1)
    np.testing.assert_allclose(norms, 1.0, atol=5e-3)


@pytest.mark.release_range
def test_replay_targets_are_the_live_teachers_maps(replay_cache, voc_yaml, teacher_pt):
    """Live teacher on the replayed images vs the stored maps, default augmentation + mixup, both epochs (the second
    is a close_mosaic epoch)."""
    from atcache.tools.fidelity import FidelityConfig, measure_fidelity

    report = measure_fidelity(FidelityConfig(cache=str(replay_cache), teacher=str(teacher_pt), data=str(voc_yaml),
                                             batches=6, batch=8, targets="replay", device="cpu", seed=1))
    assert {"mosaic", "mixup", "flip"} <= {k for combo in report["combinations"] for k in combo.split("+")}
    assert any("mosaic" not in combo for combo in report["combinations"])  # close_mosaic samples too
    for layer in map(str, TEST_LAYERS):
        assert report["layers"][layer]["all"]["cosine_mean"] >= 0.999, layer
        assert report["layers"][layer]["all"]["cosine_p5"] >= 0.99, layer


def test_fidelity_gradient_compares_each_replayed_views_gradient(replay_cache, built_cache, voc_yaml, teacher_pt):
    """fidelity --targets replay --gradient: stored vs live J_T per view (cosine mean >= 0.999, p5 >= 0.99, norms
    equal); refused on a warp run and on a cache without gradients."""
    import dataclasses

    from atcache.tools.fidelity import FidelityConfig, format_fidelity, measure_fidelity

    cfg = FidelityConfig(cache=str(replay_cache), teacher=str(teacher_pt), data=str(voc_yaml), batches=3, batch=8,
                         targets="replay", device="cpu", seed=2, gradient=True)
    report = measure_fidelity(cfg)
    grad = report["layers"]["gradient"]["all"]
    assert grad["n"] == 24 and grad["cosine_mean"] >= 0.999 and grad["cosine_p5"] >= 0.99, grad
    assert abs(grad["norm_ratio_mean"] - 1) < 1e-3
    assert "norm ratio stored / live" in format_fidelity(report)
    static = measure_fidelity(dataclasses.replace(cfg, targets="static", batches=1,
                                                  hyp={"hsv_h": 0.0, "hsv_s": 0.0, "hsv_v": 0.0}))
    grad = static["layers"]["gradient"]["all"]  # without colour augmentation a static row's J_T is exact
    assert grad["n"] == 8 and grad["cosine_p5"] >= 0.99 and abs(grad["norm_ratio_mean"] - 1) < 1e-3, grad
    base = ["fidelity", "--teacher", str(teacher_pt), "--data", str(voc_yaml), "--batches", "1", "--device", "cpu",
            "--gradient"]
    assert_one_line_error(runner.invoke(app, base + ["--cache", str(replay_cache), "--targets", "warp"]),
                          "use --targets replay")
    assert_one_line_error(runner.invoke(app, base + ["--cache", str(built_cache), "--targets", "static"]),
                          "holds no input gradients")


def test_two_shards_equal_one_process(replay_cache, voc_yaml, teacher_pt, tmp_path):
    from atcache.cache.inspect import compare_caches

    out = tmp_path / "shards.zarr"
    for i in range(2):
        build_cache(build_config(voc_yaml, out, teacher=str(teacher_pt), shard=(i, 2), **REPLAY))
    assert_same_replay(replay_cache, out)
    assert_clean(out)
    replay = compare_caches(replay_cache, out)["replay"]  # inspect --compare joins the replayed views too
    assert replay["common_views"] == 62
    assert all(c["cosine"]["min"] > 0.99999 and c["at_distance"]["max"] == 0 for c in replay["layers"].values())


def test_kill_during_the_replay_then_resume_is_identical(replay_cache, voc_yaml, teacher_pt, tmp_path):
    args = cli_command(voc_yaml, teacher_pt, tmp_path / "count.zarr") + REPLAY_ARGS
    count = subprocess.run([sys.executable, str(DRILL), "count", "0", "--"] + args[3:], capture_output=True, text=True,
                           timeout=300)
    assert count.returncode == 0, count.stderr
    writes = int(count.stderr.rsplit("writes=", 1)[1].split()[0])
    per_unit = 6  # maps (every layer), stats, grad direction, sample, record, done
    for n in (writes - 3 * per_unit - 2, writes - 3):  # both in the replay (the static arrays come first)
        out = tmp_path / f"killed-{n}.zarr"
        args = cli_command(voc_yaml, teacher_pt, out) + REPLAY_ARGS
        run = subprocess.run([sys.executable, str(DRILL), "kill", str(n), "--"] + args[3:], capture_output=True,
                             text=True, timeout=300)
        assert run.returncode == -9, run.stderr[-2000:]
        done = zarr.open_group(str(out), mode="r")["replay/done"][:]
        assert 0 < done.sum() < done.size
        ref = replay_arrays(replay_cache)
        got = replay_arrays(out)
        for key in ("maps", "stats", "grad/direction", "record", "sample"):  # never done without its data
            np.testing.assert_array_equal(got[key][done], ref[key][done])
        build_cache(build_config(voc_yaml, out, teacher=str(teacher_pt), resume=True, **REPLAY))
        assert_same_replay(replay_cache, out)
        assert_clean(out)


def replay_run_losses(settings, voc_yaml, tmp_path, name, item="at_loss") -> tuple[list, list, list]:
    from atcache.train.trainer import AtcacheTrainer

    class Recording(AtcacheTrainer):
        def preprocess_batch(self, batch):
            self.seen.append(tuple(batch["im_file"]))
            return super().preprocess_batch(batch)

    # lr 0: both students stay the same network, so at_loss differs only by the targets (live vs replayed)
    overrides = {"model": "yolo11n.yaml", "data": str(voc_yaml), "imgsz": TEST_IMGSZ, "batch": 4, "device": "cpu",
                 "plots": False, "workers": 0, "project": str(tmp_path), "name": name, "val": False, "nbs": 4,
                 "optimizer": "SGD", "lr0": 0.0, "warmup_bias_lr": 0.0, "warmup_epochs": 0}
    if settings.mode == "online":
        overrides |= {"epochs": 2, "close_mosaic": 1, "mixup": 0.5}
    trainer = Recording(overrides=overrides, settings=settings)
    trainer.seen, losses = [], []
    trainer.add_callback("on_train_batch_end", lambda t: losses.append(float(t.loss_items[item])))
    trainer.train()
    with open(trainer.csv) as f:
        losses_csv = [float(row[f"train/{item}"]) for row in csv.DictReader(f, skipinitialspace=True)]
    return trainer.seen, losses, losses_csv


@pytest.mark.slow
@pytest.mark.release_range
def test_replay_training_sees_the_online_runs_batches_and_losses(replay_cache, voc_yaml, teacher_pt, tmp_path):
    """train-online --aug-seed 11 and train-from-cache --targets replay on the cache built with 11: identical batches,
    and per-step at_loss equal within float16 tolerance over both epochs."""
    from atcache.config import DistillSettings

    layers = tuple((i, i) for i in TEST_LAYERS)
    online = DistillSettings(mode="online", teacher=str(teacher_pt), layers=layers, aug_seed=11)
    replay = DistillSettings(mode="cache", cache=str(replay_cache), targets="replay", layers=layers)
    seen_online, loss_online, csv_online = replay_run_losses(online, voc_yaml, tmp_path, "online")
    seen_replay, loss_replay, csv_replay = replay_run_losses(replay, voc_yaml, tmp_path, "replay")
    assert seen_replay == seen_online and len(seen_replay) == 2 * 8
    assert all(math.isfinite(x) and x > 0 for x in loss_replay)
    np.testing.assert_allclose(loss_replay, loss_online, rtol=1e-3)  # float16 storage of unit-norm maps
    assert len(csv_replay) == 2
    np.testing.assert_allclose(csv_replay, csv_online, rtol=1e-3)  # results.csv: the epochs' mean at_loss


@pytest.mark.slow
def test_replay_gradient_training_sees_the_online_teachers_gradients(replay_cache, voc_yaml, teacher_pt, tmp_path):
    """train-online --gradient-weight and train-from-cache --targets replay --gradient-weight, same --aug-seed, student
    frozen: the same J_T, so per-step grad_loss equal within float16 storage tolerance over both epochs."""
    from atcache.config import DistillSettings

    layers = tuple((i, i) for i in TEST_LAYERS)
    grad = dict(at_weight=0.0, gradient_weight=1.0)
    online = DistillSettings(mode="online", teacher=str(teacher_pt), layers=layers, aug_seed=11, **grad)
    replay = DistillSettings(mode="cache", cache=str(replay_cache), targets="replay", layers=layers, **grad)
    seen_online, loss_online, csv_online = replay_run_losses(online, voc_yaml, tmp_path, "online", "grad_loss")
    seen_replay, loss_replay, csv_replay = replay_run_losses(replay, voc_yaml, tmp_path, "replay", "grad_loss")
    assert seen_replay == seen_online and len(seen_replay) == 2 * 8
    assert all(math.isfinite(x) and x > 0 for x in loss_replay)
    np.testing.assert_allclose(loss_replay, loss_online, rtol=1e-3)
    np.testing.assert_allclose(csv_replay, csv_online, rtol=1e-3)


def test_replay_gradients_are_the_teachers_on_each_view(replay_cache, voc_yaml, teacher_pt):
    """replay/grad/* of a position = the unfused teacher's pooled input gradient on that view and its labels, as the
    seeded training dataset makes them; open_cache(...).replay_grad and training's samples carry the same J_T."""
    import torch

    from atcache.attention.gradient import input_gradient, pool_gradient
    from atcache.cache.inspect import open_cache
    from atcache.cache.store import CacheStore
    from atcache.train.replay import ReplayTargets, augment_settings, training_dataset
    from atcache.train.samplers import EpochSampler
    from atcache.yolo import load_model

    store = CacheStore.open(replay_cache)
    spec, g = store.spec, TEST_IMGSZ // 8
    stored = open_cache(replay_cache).replay_grad
    assert stored.shape == (2, 31, 3, g, g) and stored.dtype == np.float32
    hyp = augment_settings(dict(spec.replay.augment), 2, TEST_IMGSZ)
    dataset, _ = training_dataset(str(voc_yaml), hyp, 11)
    teacher = load_model(str(teacher_pt), nc=20, fuse=False).model
    picks = [(0, 0), (0, 17), (1, 5), (1, 30)]  # (epoch, position)
    samples = [dataset[e * 31 + int(EpochSampler(31, 11).order(e)[p])] for e, p in picks]
    batch = dataset.collate_fn(samples)
    labels = {k: batch[k] for k in ("batch_idx", "cls", "bboxes")}
    expected = pool_gradient(input_gradient(teacher, batch["img"].float() / 255, labels), 8)
    got = torch.from_numpy(np.stack([stored[e, p].compute() for e, p in picks]))
    assert expected.abs().sum() > 0
    cosine = torch.nn.functional.cosine_similarity(got.flatten(1), expected.flatten(1).float())
    assert cosine.min() > 0.9999, cosine
    torch.testing.assert_close(got.flatten(1).norm(dim=1), expected.flatten(1).norm(dim=1).float(), rtol=1e-3, atol=0)
    reader = ReplayTargets(str(replay_cache), spec, TEST_LAYERS, gradients=True)
    for (e, p), sample in zip(picks, samples):
        index = int(EpochSampler(31, 11).order(e)[p])
        reader.maps(e, index, sample["img"])  # the fingerprint check
        direction, norm = reader.gradient(e, index)
        np.testing.assert_allclose(direction.astype(np.float32) * norm, stored[e, p].compute(), rtol=1e-6)


def test_train_from_cache_replay_gradient_weight_logs_grad_loss(replay_cache, voc_yaml, tmp_path):
    result = runner.invoke(app, common(voc_yaml, replay_cache, tmp_path, "--name", "g", "--gradient-weight", "1",
                                       "--at-weight", "0", "plots=False", "workers=0", "nbs=4"))
    assert result.exit_code == 0, (result.output, result.exception)
    with open(tmp_path / "g" / "results.csv") as f:
        rows = list(csv.DictReader(f, skipinitialspace=True))
    assert len(rows) == 2 and all(math.isfinite(float(r["train/grad_loss"])) and float(r["train/grad_loss"]) > 0
                                  for r in rows)
    assert "train/at_loss" not in rows[0]
    assert_one_line_error(runner.invoke(app, common(voc_yaml, replay_cache, tmp_path, "--gradient-weight", "1",
                                                    "--gradient-stride", "2")), "--gradient-stride 2 differs")


def common(voc_yaml, cache, tmp_path, *extra):
    return ["train-from-cache", "--cache", str(cache), "--data", str(voc_yaml), "--student", "yolo11n.yaml", "--imgsz",
            str(TEST_IMGSZ), "--batch", "4", "--device", "cpu", "--targets", "replay", "--project", str(tmp_path),
            *extra]


@pytest.mark.parametrize("extra,needles", [
    (["mosaic=0.5"], ["mosaic=0.5 differs from the replay arrays", "built with mosaic=1.0", "--replay-epochs 2 mosaic=0.5"]),
    (["--epochs", "3"], ["epochs=3 differs", "built with epochs=2"]),
    (["--aug-seed", "4"], ["--aug-seed 4 differs", "built with --aug-seed 11"]),
])
def test_training_refuses_other_settings_than_the_replay(replay_cache, voc_yaml, tmp_path, extra, needles):
    assert_one_line_error(runner.invoke(app, common(voc_yaml, replay_cache, tmp_path, *extra)), *needles)


def test_replay_refusals(replay_cache, built_cache, voc_yaml, teacher_pt, tmp_path):
    assert_one_line_error(runner.invoke(app, common(voc_yaml, built_cache, tmp_path)), "has no replay arrays",
                          "--replay-epochs E")
    short = tmp_path / "short.zarr"  # one epoch cached of a 2-epoch schedule
    build_cache(build_config(voc_yaml, short, teacher=str(teacher_pt), replay_epochs=1, augment=(("epochs", 2),)))
    assert_one_line_error(runner.invoke(app, common(voc_yaml, short, tmp_path)), "replay arrays for 1 of 2 epochs")
    base = cli_command(voc_yaml, teacher_pt, tmp_path / "x.zarr")[4:]
    assert_one_line_error(runner.invoke(app, ["build-cache", *base, "--aug-seed", "3"]), "add --replay-epochs E")
    assert_one_line_error(runner.invoke(app, ["build-cache", *base, "--replay-epochs", "1", "lr0=0.1"]),
                          "lr0= does not shape augmentation")


def test_a_fingerprint_mismatch_stops_training_in_one_line(replay_cache, voc_yaml, tmp_path):
    tampered = tmp_path / "tampered.zarr"
    shutil.copytree(replay_cache, tampered)
    record = zarr.open_group(str(tampered), mode="r+")["replay/record"]
    record[:] = record[:] + np.uint64(1)
    result = runner.invoke(app, common(voc_yaml, tampered, tmp_path, "--name", "t", "plots=False", "workers=0"))
    assert_one_line_error(result, "differs from the one cache", "fingerprint mismatch", "in epoch 0",
                          "another ultralytics or OpenCV version")


def test_fingerprint_sees_one_pixel():
    import google_crc32c
    import torch

    from atcache.cache.format import FINGERPRINT
    from atcache.train.replay import fingerprint

    assert FINGERPRINT == "crc32c-halves"
    image = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (3, 64, 48), dtype=np.uint8))
    data = image.numpy().tobytes()
    half = len(data) // 2
    assert fingerprint(image) == google_crc32c.value(data[:half]) | google_crc32c.value(data[half:]) << 32
    for at in ((0, 2, 3), (1, 30, 20), (2, 63, 47)):  # a byte changed in either half changes it
        changed = image.clone()
        changed[at] += 1
        assert fingerprint(changed) != fingerprint(image)
    assert fingerprint(image) < 2 ** 64


@pytest.mark.parametrize("kind", [None, "crc32c+crc32", "md4"], ids=["blake2b", "crc32c+crc32", "unknown"])
def test_a_store_with_other_records_is_refused_in_one_line(replay_cache, voc_yaml, tmp_path, kind):
    """Replay records fingerprinted otherwise than the build does now (blake2b: no `fingerprint` in the spec;
    crc32c+crc32; anything else) are refused on open, in one line naming the kind and the rebuild command: by training,
    inspect and the python API alike."""
    import json

    from atcache.cache.inspect import open_cache
    from atcache.errors import AtcacheError

    group = zarr.open_group(str(replay_cache), mode="r")
    spec = dict(group.attrs["atcache"])
    assert json.loads(json.dumps(spec["replay"]))["fingerprint"] == "crc32c-halves"  # what a build writes now
    old = tmp_path / "old.zarr"
    shutil.copytree(replay_cache, old)
    replay = {k: v for k, v in spec["replay"].items() if k != "fingerprint"}
    zarr.open_group(str(old), mode="r+").attrs["atcache"] = {
        **spec, "replay": replay if kind is None else {**replay, "fingerprint": kind}}
    needles = [f"cache {old} holds replay records fingerprinted with '{kind or 'blake2b'}'",
               "this atcache computes 'crc32c-halves'", f"--out {old} --overwrite"]
    assert_one_line_error(runner.invoke(app, common(voc_yaml, old, tmp_path, "--name", "x", "workers=0")), *needles)
    assert_one_line_error(runner.invoke(app, ["inspect", str(old)]), *needles)
    with pytest.raises(AtcacheError) as error:
        open_cache(old)
    assert "\n" not in str(error.value) and all(n in str(error.value) for n in needles)


def test_inspect_and_verify_understand_replay_arrays(replay_cache, tmp_path):
    from atcache.cache.inspect import inspect_cache, verify_cache

    report = inspect_cache(replay_cache)
    assert report["replay"] == {"epochs": 2, "samples": 31, "aug_seed": 11, "positions_done": 62, "epochs_done": 2}
    assert verify_cache(replay_cache) == []
    damaged = tmp_path / "damaged.zarr"
    shutil.copytree(replay_cache, damaged)
    chunk = damaged / "replay" / "maps" / "c" / "1" / "2" / "0"  # epoch 1, positions 16-23
    raw = bytearray(chunk.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    chunk.write_bytes(bytes(raw))
    [bad] = verify_cache(damaged)
    assert (bad["array"], bad["epoch"], bad["rows"]) == ("replay/maps", 1, [16, 24])
    result = runner.invoke(app, ["inspect", str(damaged), "--verify"])
    assert result.exit_code == 1 and "corrupted: replay/maps" in result.output
    chunk = damaged / "replay" / "grad" / "direction" / "c" / "0" / "1" / "0" / "0" / "0"  # epoch 0, positions 8-15
    raw = bytearray(chunk.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    chunk.write_bytes(bytes(raw))
    assert {(b["array"], b["epoch"], tuple(b["rows"])) for b in verify_cache(damaged)} == {
        ("replay/maps", 1, (16, 24)), ("replay/grad/direction", 0, (8, 16))}


@pytest.mark.slow
@pytest.mark.parametrize("runner_kw", [{"device": "cpu,cpu"}, {"scheduler": "local:2"}], ids=["devices", "dask"])
def test_device_processes_and_dask_build_the_same_replay(replay_cache, voc_yaml, teacher_pt, tmp_path, runner_kw):
    out = tmp_path / "other.zarr"
    report = build_cache(build_config(voc_yaml, out, teacher=str(teacher_pt), workers=0, **runner_kw, **REPLAY))
    assert report.replayed == 62 and "KB per image or replayed view" in report.summary()
    assert_same_replay(replay_cache, out)


def test_visualize_shows_a_replay_epoch(replay_cache, built_cache, voc_yaml, tmp_path):
    from PIL import Image

    from atcache.tools.visualize import visualize_cache

    paths = visualize_cache(replay_cache, voc_yaml, tmp_path / "png", images=3, epoch=1)
    assert len(paths) == 3 and all(p.name.startswith("e001_") for p in paths)
    assert Image.open(paths[0]).size[0] > 400
    assert_one_line_error(runner.invoke(app, ["visualize", str(built_cache), "--data", str(voc_yaml), "--out",
                                              str(tmp_path / "x"), "--epoch", "0"]), "has no replay arrays")
    assert_one_line_error(runner.invoke(app, ["visualize", str(replay_cache), "--data", str(voc_yaml), "--out",
                                              str(tmp_path / "x"), "--epoch", "2"]), "not among the cached epochs 0..1")
