"""Stage 2 end to end on CPU: the three trainers, the loss against an online teacher, plain checkpoints, refusals."""

import csv
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from atcache.cli import app
from helpers import (COMMON, TEST_IMGSZ, TEST_LAYERS, assert_one_line_error, build_config, results, spec_targets,
                     target_dataset)

pytestmark = pytest.mark.release_range  # also run on the oldest ultralytics of the range (CI)

runner = CliRunner()


@pytest.fixture(scope="module")
def orphan_cache(voc_yaml, tmp_path_factory):
    """A cache whose teacher file has been deleted after the build."""
    from atcache.teacher.pipeline import build_cache
    from helpers import save_teacher_checkpoint

    tmp = tmp_path_factory.mktemp("orphan")
    teacher = save_teacher_checkpoint(tmp / "teacher.pt", seed=1)
    out = tmp / "cache.zarr"
    build_cache(build_config(voc_yaml, out, teacher=str(teacher)))
    teacher.unlink()
    return out


@pytest.fixture(scope="module")
def runs(voc_yaml, orphan_cache, teacher_pt, tmp_path_factory):
    """One-epoch runs of every trainer, side by side: plain, cache (warp and static) and online."""
    project = tmp_path_factory.mktemp("runs")
    base = ["--data", str(voc_yaml), "--project", str(project), *COMMON]
    commands = {
        "plain": ["train", "--name", "plain", *base],
        "warp": ["train-from-cache", "--cache", str(orphan_cache), "--name", "warp", *base],
        "static": ["train-from-cache", "--cache", str(orphan_cache), "--targets", "static", "--name", "static", *base],
        "online": ["train-online", "--teacher", str(teacher_pt), "--name", "online", *base],
    }
    out = {}
    for name, args in commands.items():
        result = runner.invoke(app, args)
        assert result.exit_code == 0, (name, result.output, result.exception)
        out[name] = project / name
    return out


@pytest.mark.slow
def test_every_trainer_writes_ultralytics_results(runs):
    for name, run in runs.items():
        row = results(run)
        assert math.isfinite(row["train/box_loss"]) and (run / "weights" / "best.pt").is_file()
        assert not any(k.startswith("val/at") for k in row)  # validation has no targets
        if name == "plain":
            assert "train/at_loss" not in row
        else:
            assert math.isfinite(row["train/at_loss"]) and row["train/at_loss"] > 0, name


@pytest.mark.slow
def test_best_pt_validates_in_a_process_without_atcache(runs, voc_yaml, tmp_path):
    script = (
        "import sys\n"
        "from ultralytics import YOLO\n"
        f"for p in {[str(r / 'weights' / 'best.pt') for r in runs.values()]!r}:\n"
        f"    m = YOLO(p).val(data={str(voc_yaml)!r}, imgsz={TEST_IMGSZ}, batch=4, plots=False, device='cpu')\n"
        "    assert m.nt_per_class.sum() > 0 and 0 <= m.box.map50 <= 1\n"  # validated on labelled images
        "assert not [k for k in sys.modules if k == 'atcache' or k.startswith('atcache.')], 'atcache was imported'\n"
        "print('ok')\n"
    )
    env = {**os.environ, "YOLO_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-2000:]


def test_static_cache_loss_equals_online_teacher_loss(voc_yaml, built_cache, teacher_pt):
    """Same batch, same student: AT loss with cached targets == AT loss with the teacher run on the batch."""
    from atcache.attention.functional import at_loss, attention_map
    from atcache.attention.hooks import FeatureHooks
    from atcache.train.datasets import AtcacheDataset
    from atcache.yolo import load_model
    from ultralytics.nn.tasks import DetectionModel

    ds = target_dataset(voc_yaml, built_cache, mode="static", hsv_h=0, hsv_s=0, hsv_v=0)
    batch = AtcacheDataset.collate_fn([ds[i] for i in range(6)])
    img = batch["img"].float() / 255
    teacher = load_model(str(teacher_pt), device="cpu").model
    with torch.no_grad(), FeatureHooks(teacher, TEST_LAYERS, stop_after_last=True) as hooks:
        online = [attention_map(f) for f in hooks.run(teacher, img)]
    for cached, live in zip(batch["at_targets"], online):
        assert torch.allclose(cached, live, atol=2e-3), (cached - live).abs().max()
    torch.manual_seed(0)
    student = DetectionModel("yolo11n.yaml", nc=20, verbose=False)
    with torch.no_grad(), FeatureHooks(student, TEST_LAYERS) as hooks:
        maps = [attention_map(f) for f in hooks.run(student, img)]
    assert torch.allclose(at_loss(maps, batch["at_targets"]), at_loss(maps, online), rtol=1e-3)


def test_training_refuses_a_cache_for_another_imgsz(voc_yaml, built_cache, tmp_path):
    args = ["train-from-cache", "--cache", str(built_cache), "--data", str(voc_yaml), "--project", str(tmp_path), *COMMON]
    args[args.index("--imgsz") + 1] = "96"
    assert_one_line_error(runner.invoke(app, args), "built at imgsz 64 but this run trains at imgsz 96")


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--layers", "2:6"], "student layer 2 has stride 4 but cache layer 6 has stride 16"),
        (["--layers", "5"], "layer 5 is not in cache"),
        (["cutmix=0.5"], "cutmix=0.5 cannot be aligned"),
        (["bogus=1"], "'bogus' is not an ultralytics train argument"),
    ],
)
def test_training_refusals_are_one_line(voc_yaml, built_cache, tmp_path, extra, message):
    args = ["train-from-cache", "--cache", str(built_cache), "--data", str(voc_yaml), "--project", str(tmp_path),
            *COMMON, *extra]
    assert_one_line_error(runner.invoke(app, args), message)


def test_online_refuses_a_missing_teacher(voc_yaml, tmp_path):
    args = ["train-online", "--teacher", str(tmp_path / "nope.pt"), "--data", str(voc_yaml), "--project", str(tmp_path), *COMMON]
    assert_one_line_error(runner.invoke(app, args), "nope.pt does not exist")


def test_a_trainer_without_settings_is_plain_after_a_cache_trainer(voc_yaml, built_cache, tmp_path):
    """Settings never leak from one trainer to the next one made in the same process (a notebook, pytest): only
    ultralytics' DDP workers read them from the environment."""
    from atcache.train.trainer import SETTINGS_ENV, AtcacheTrainer, DistillSettings

    overrides = {"model": "yolo11n.yaml", "data": str(voc_yaml), "epochs": 1, "imgsz": TEST_IMGSZ, "batch": 4,
                 "device": "cpu", "plots": False, "workers": 0, "project": str(tmp_path)}
    cached = DistillSettings(mode="cache", cache=str(built_cache), layers=tuple((i, i) for i in TEST_LAYERS))
    first = AtcacheTrainer(overrides={**overrides, "name": "first"}, settings=cached)
    second = AtcacheTrainer(overrides={**overrides, "name": "second"})
    assert first.settings.mode == "cache" and first.plan.store is not None
    assert second.settings == DistillSettings() and second.settings.mode == "plain" and second.plan.store is None
    assert SETTINGS_ENV not in os.environ


class FirstBatch(Exception):
    pass


def test_settings_are_checked_once_before_the_first_batch(voc_yaml, built_cache, tmp_path, monkeypatch):
    """A cache run opens the store once and lists each split once (atcache's own listings; ultralytics lists its own)
    from the trainer's construction to its first training batch."""
    import atcache.train.checks
    import atcache.train.trainer
    from atcache.cache.store import CacheStore
    from atcache.train.trainer import DistillSettings, train_student

    calls = {"open": 0, "split": []}
    open_store, list_split = CacheStore.open.__func__, atcache.train.checks.split_files

    def counting_open(cls, *args, **kwargs):
        calls["open"] += 1
        return open_store(cls, *args, **kwargs)

    def counting_split(data, split):
        calls["split"].append(split)
        return list_split(data, split)

    monkeypatch.setattr(CacheStore, "open", classmethod(counting_open))
    monkeypatch.setattr(atcache.train.checks, "split_files", counting_split)
    monkeypatch.setattr(atcache.train.trainer.AtcacheTrainer, "on_train_setup",
                        _stop_after(atcache.train.trainer.AtcacheTrainer.on_train_setup))
    settings = DistillSettings(mode="cache", cache=str(built_cache), layers=tuple((i, i) for i in TEST_LAYERS))
    overrides = {"model": "yolo11n.yaml", "data": str(voc_yaml), "epochs": 1, "imgsz": TEST_IMGSZ, "batch": 4,
                 "device": "cpu", "plots": False, "workers": 0, "project": str(tmp_path), "name": "once"}
    with pytest.raises(FirstBatch):
        train_student(settings, overrides)
    assert calls == {"open": 1, "split": ["train", "val"]}


def _stop_after(setup):
    """on_train_setup (after ultralytics' _setup_train), then stop: the loaders, the cached targets and the criterion
    are all made by then."""
    def wrapped(self):
        setup(self)
        assert self.cache_targets is not None
        raise FirstBatch

    return wrapped


@pytest.mark.slow
def test_ddp_worker_rebuilds_the_trainer_from_the_environment(voc_yaml, built_cache, tmp_path):
    """ultralytics' DDP launch pickles the trainer class and its args only; the worker script it writes must still
    train from the cache. Run here as a single CPU worker (no GPUs, so no torch.distributed)."""
    from ultralytics.utils.dist import generate_ddp_file

    from atcache.train.trainer import SETTINGS_ENV, AtcacheTrainer, DistillSettings

    settings = DistillSettings(mode="cache", cache=str(built_cache), layers=tuple((i, i) for i in TEST_LAYERS))
    overrides = {"model": "yolo11n.yaml", "data": str(voc_yaml), "epochs": 1, "imgsz": TEST_IMGSZ, "batch": 4,
                 "device": "cpu", "plots": False, "workers": 0, "project": str(tmp_path), "name": "ddp"}
    trainer = AtcacheTrainer(overrides=overrides, settings=settings)
    file = generate_ddp_file(trainer)
    try:
        env = {**os.environ, SETTINGS_ENV: settings.to_json()}  # what AtcacheTrainer.train() launches workers with
        done = subprocess.run([sys.executable, file], env=env, capture_output=True, text=True, timeout=300)
    finally:
        os.remove(file)
        Path(file).with_suffix(".pt").unlink(missing_ok=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert math.isfinite(results(trainer.save_dir)["train/at_loss"])


@pytest.mark.slow
def test_interrupted_run_resumes_with_ultralytics_resume(runs, built_cache, voc_yaml, tmp_path):
    """An interrupted cached run (last.pt after epoch 1 of 2) continues with resume=last.pt and keeps logging at_loss."""
    project = tmp_path / "runs"
    base = ["train-from-cache", "--cache", str(built_cache), "--data", str(voc_yaml), "--project", str(project),
            "--name", "r", *COMMON]
    base[base.index("--epochs") + 1] = "2"
    first = runner.invoke(app, base)
    assert first.exit_code == 0, first.output
    last = project / "r" / "weights" / "last.pt"
    ckpt = torch.load(last, weights_only=False)
    ckpt["epoch"] = 0  # as if stopped after the first of two epochs; an unstripped last.pt keeps its save_dir
    ckpt["train_args"]["save_dir"] = str(project / "r")
    torch.save(ckpt, last)
    with open(project / "r" / "results.csv") as f:
        lines = f.read().splitlines()
    (project / "r" / "results.csv").write_text("\n".join(lines[:2]) + "\n")
    again = runner.invoke(app, [*base, f"resume={last}"])
    assert again.exit_code == 0, again.output
    with open(project / "r" / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(float(r["epoch"])) for r in rows] == [1, 2]
    assert all(math.isfinite(float(r["train/at_loss"])) for r in rows)


def test_warp_training_ships_views_and_renders_whole_batches(voc_yaml, built_cache, tmp_path):
    """A cache in RAM: loader samples carry flattened views, and the batch renders to the targets the rules give for
    each sample's recorded view (`helpers.spec_targets`, stated cell by cell)."""
    import numpy as np

    from atcache.config import DistillSettings
    from atcache.train.render import PIECES_KEY
    from atcache.train.trainer import AtcacheTrainer

    settings = DistillSettings(mode="cache", cache=str(built_cache), layers=tuple((i, i) for i in TEST_LAYERS))
    trainer = AtcacheTrainer(overrides={"model": "yolo11n.yaml", "data": str(voc_yaml), "imgsz": TEST_IMGSZ, "batch": 4,
                                        "device": "cpu", "project": str(tmp_path), "workers": 0}, settings=settings)
    trainer.model = trainer.get_model(cfg="yolo11n.yaml", verbose=False)
    ds = trainer.build_dataset(trainer.data["train"], "train", 4)
    samples = [ds.sample_with_view(i) for i in range(4)]
    batch = ds.collate_fn([s for s, _ in samples])
    assert PIECES_KEY in batch and "at_targets" not in batch
    rendered = trainer.cache_targets.batch_renderer("cpu").render(batch[PIECES_KEY])
    specs = [spec_targets(ds.at_cache, ds.at_cache.pieces(view)) for _, view in samples]
    for k in range(len(TEST_LAYERS)):
        want = np.stack([spec[k] for spec in specs])
        np.testing.assert_allclose(rendered[k].numpy(), want, atol=1e-4)
