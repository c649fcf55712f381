import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from atcache.teacher.pipeline import build_cache
from atcache.errors import AtcacheError
from helpers import TEST_IMGSZ, TEST_LAYERS, build_config, cli_command, yolo_dataset


def test_rows_equal_an_independent_recomputation(built_cache, voc_yaml, teacher_pt):
    """Reopen with plain zarr; recompute with ultralytics' own loader, LetterBox and model, and the reference AT code's formula."""
    from ultralytics.data.augment import LetterBox

    g = zarr.open_group(str(built_cache), mode="r")
    spec = g.attrs["atcache"]
    assert spec["imgsz"] == TEST_IMGSZ and [l["index"] for l in spec["layers"]] == list(TEST_LAYERS)
    assert [l["stride"] for l in spec["layers"]] == [16, 32, 16, 8, 16, 32]
    assert g["done"][:].all()
    ds = yolo_dataset(voc_yaml)
    root = Path(ds.data["path"])
    assert [str(root / f) for f in g["files"][:]] == ds.im_files

    model = torch.load(teacher_pt, weights_only=False)["model"].float().eval()
    feats = {}
    for i in TEST_LAYERS:
        model.model[i].register_forward_hook(lambda m, inp, out, i=i: feats.__setitem__(i, out))
    rows = [0, 5, 11, len(ds.im_files) - 1]
    images = []
    for r in rows:
        im, _, _ = ds.load_image(r)
        im = LetterBox(new_shape=(TEST_IMGSZ, TEST_IMGSZ), scaleup=False)(image=im)
        images.append(torch.from_numpy(np.ascontiguousarray(im.transpose(2, 0, 1)[::-1])))
    with torch.no_grad():
        model(torch.stack(images).float() / 255)
    for i in TEST_LAYERS:
        am = feats[i].pow(2).sum(1)
        norm = torch.norm(am, p=2, dim=(1, 2), keepdim=True)
        expected = (am / (norm + 1e-8)).numpy()
        np.testing.assert_allclose(g[f"maps/{i}"][rows].astype(np.float32), expected, atol=2e-3, rtol=2e-2)
        np.testing.assert_allclose(g[f"norms/{i}"][rows], norm.flatten().numpy(), rtol=1e-3)
        assert (expected.max(axis=(1, 2)) > 0.05).all()  # real maps, not eps-dominated zeros
    assert g.attrs["atcache"]["teacher_path"] == str(teacher_pt.resolve())


def test_letterbox_rows_map_pixels_to_cells(built_cache):
    g = zarr.open_group(str(built_cache), mode="r")
    lb = g["letterbox"][:]
    h0, w0, h, w, top, left, ratio = lb.T
    assert (np.maximum(h, w) == TEST_IMGSZ).all()
    np.testing.assert_allclose(ratio, h / h0, rtol=1e-6)
    assert ((top == np.round((TEST_IMGSZ - h) / 2 - 0.1)) & (left == np.round((TEST_IMGSZ - w) / 2 - 0.1))).all()


def test_two_shards_equal_one_process(built_cache, voc_yaml, tmp_path, teacher_pt, assert_same_store):
    out = tmp_path / "sharded.zarr"
    build_cache(build_config(voc_yaml, out, teacher=str(teacher_pt), shard=(1, 2)))
    partial = zarr.open_group(str(out), mode="r")["done"][:]
    assert 0 < partial.sum() < len(partial)
    build_cache(build_config(voc_yaml, out, teacher=str(teacher_pt), shard=(0, 2)))
    assert_same_store(out, built_cache)


def test_concurrent_shard_processes_equal_one_process(built_cache, voc_yaml, tmp_path, teacher_pt, assert_same_store):
    out = tmp_path / "concurrent.zarr"
    cmd = cli_command(voc_yaml, teacher_pt, out)
    procs = [subprocess.Popen(cmd + ["--shard", f"{i}/2"], stderr=subprocess.PIPE, text=True) for i in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    assert_same_store(out, built_cache)


def test_resume_after_kill_is_identical(built_cache, voc_yaml, tmp_path, teacher_pt, assert_same_store):
    out = tmp_path / "killed.zarr"
    cmd = cli_command(voc_yaml, teacher_pt, out)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if (out / "done" / "c" / "0").exists():  # first chunk finished: kill in the middle of the build
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = zarr.open_group(str(out), mode="r")["done"][:]
    assert not done_before.all(), "the build finished before it could be killed; the test did not test resume"
    refused = subprocess.run(cmd, capture_output=True, text=True)
    assert refused.returncode != 0 and "already exists" in refused.stderr
    resumed = subprocess.run(cmd + ["--resume"], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    computed = int(resumed.stdout.split(" images")[0])
    incomplete_rows = sum(len(done_before[a:a + 8]) for a in range(0, len(done_before), 8) if not done_before[a:a + 8].all())
    assert computed == incomplete_rows < len(done_before)  # only unfinished chunks were recomputed
    assert_same_store(out, built_cache)


def test_missing_image_fails_with_its_name_and_keeps_finished_chunks(voc_yaml, tmp_path):
    root = tmp_path / "VOC"
    shutil.copytree(voc_yaml.parent, root, ignore=shutil.ignore_patterns("*.cache"))
    data = root / "VOC.yaml"
    data.write_text(voc_yaml.read_text().replace(str(voc_yaml.parent), str(root)))
    from atcache.data.splits import split_files

    files = split_files(data, "train").files
    victim = root / files[20]
    victim.write_bytes(b"\xff\xd8 truncated nonsense")
    out = tmp_path / "c.zarr"
    with pytest.raises(AtcacheError, match=f"{victim.name} cannot be decoded.*--skip-bad"):
        build_cache(build_config(data, out))
    done = zarr.open_group(str(out), mode="r")["done"][:]
    assert done[:16].all() and not done[16:24].any()  # chunks before the bad one are kept

    report = build_cache(build_config(data, out, resume=True, skip_bad=True))
    assert [f for f, _ in report.skipped] == [files[20]]
    g = zarr.open_group(str(out), mode="r")
    assert g["done"][:].sum() == len(files) - 1 and not g["done"][20]
    assert np.isnan(g["maps/16"][20]).all() and np.isfinite(g["maps/16"][21]).all()


def test_bad_settings_are_refused(voc_yaml, tmp_path):
    with pytest.raises(AtcacheError, match="multiple of the teacher's max stride 32"):
        build_cache(build_config(voc_yaml, tmp_path / "a.zarr", imgsz=100))
    with pytest.raises(AtcacheError, match="layer 99 does not exist"):
        build_cache(build_config(voc_yaml, tmp_path / "b.zarr", layers=(6, 99)))
    with pytest.raises(AtcacheError, match="split 'holdout'"):
        build_cache(build_config(voc_yaml, tmp_path / "c.zarr", split="holdout"))
    with pytest.raises(AtcacheError, match="does not exist"):
        build_cache(build_config(voc_yaml, tmp_path / "d.zarr", teacher=str(tmp_path / "m.pt")))
    with pytest.raises(AtcacheError, match="cannot be combined with --shard"):
        build_cache(build_config(voc_yaml, tmp_path / "e.zarr", overwrite=True, shard=(0, 2)))
    assert not any((tmp_path / n).exists() for n in ("a.zarr", "b.zarr", "c.zarr", "d.zarr"))


def test_resume_with_other_layers_is_refused(built_cache, voc_yaml, tmp_path, teacher_pt):
    out = tmp_path / "c.zarr"
    shutil.copytree(built_cache, out)
    with pytest.raises(AtcacheError, match="different settings \\(layers"):
        build_cache(build_config(voc_yaml, out, teacher=str(teacher_pt), layers=(6, 8), resume=True))
    report = build_cache(build_config(voc_yaml, out, teacher=str(teacher_pt), resume=True))
    assert report.computed == 0 and report.already_done == report.total_rows


def test_vanishing_activations_are_flagged(voc_yaml, tmp_path, built_cache):
    """The stock random init of yolo11n shrinks activations to ~1e-16 by layer 22: the build must say so."""
    report = build_cache(build_config(voc_yaml, tmp_path / "random.zarr", teacher="yolo11n.yaml", layers=(16, 22)))
    assert any(w.startswith("layer 22: median ||a||") for w in report.warnings)
    from atcache.teacher.pipeline import vanishing_layers
    from atcache.cache.store import CacheStore

    assert vanishing_layers(CacheStore.open(built_cache)) == []


def test_several_devices_run_one_shard_process_each(built_cache, voc_yaml, tmp_path, teacher_pt, assert_same_store):
    out = tmp_path / "multi.zarr"
    cfg = build_config(voc_yaml, out, teacher=str(teacher_pt), workers=0, device="cpu,cpu")
    lines = build_cache(cfg).device_lines()
    assert len(lines) == 2 and all("img/s" in line for line in lines)
    assert_same_store(out, built_cache)
    with pytest.raises(AtcacheError, match="already exists"):
        build_cache(cfg)
    with pytest.raises(AtcacheError, match="CUDA device 7 is not available"):
        build_cache(build_config(voc_yaml, tmp_path / "x.zarr", device="cpu,7"))


def test_yaml_teacher_rows_equal_a_seeded_ultralytics_model(voc_yaml, tmp_path):
    """`--teacher yolo11n.yaml` is ultralytics' stock init under seed 0 (nc from the data): recompute it independently.
    Layers 6 and 16 are used because deeper stock-init layers are eps-dominated (see the vanishing test)."""
    from ultralytics.data.augment import LetterBox
    from ultralytics.nn.tasks import DetectionModel, yaml_model_load

    out = tmp_path / "yaml.zarr"
    build_cache(build_config(voc_yaml, out, teacher="yolo11n.yaml", layers=(6, 16)))
    torch.manual_seed(0)
    cfg = yaml_model_load("yolo11n.yaml")
    cfg["nc"] = 20
    model = DetectionModel(cfg, verbose=False).eval()
    ds = yolo_dataset(voc_yaml)  # rows 0 and 7 are its images 0 and 7 (test_rows_equal_an_independent_recomputation)
    letterbox = LetterBox(new_shape=(TEST_IMGSZ, TEST_IMGSZ), scaleup=False, center=True)
    images = [letterbox(image=ds.load_image(r)[0]) for r in (0, 7)]
    x = torch.stack([torch.from_numpy(np.ascontiguousarray(im.transpose(2, 0, 1)[::-1])) for im in images]).float() / 255
    feats = {}
    for i in (6, 16):
        model.model[i].register_forward_hook(lambda m, inp, o, i=i: feats.__setitem__(i, o))
    with torch.no_grad():
        model(x)
    g = zarr.open_group(str(out), mode="r")
    for i in (6, 16):
        am = feats[i].pow(2).sum(1)
        expected = (am / (torch.norm(am, p=2, dim=(1, 2), keepdim=True) + 1e-8)).numpy()
        np.testing.assert_allclose(g[f"maps/{i}"][[0, 7]].astype(np.float32), expected, atol=2e-3, rtol=2e-2)
        assert expected.max() > 0.05
