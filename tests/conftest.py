"""Shared fixtures and helpers: an offline ultralytics, a small synthetic VOC dataset, one cache built from it, and
the assertions several test modules make (one-line errors, equal stores, clean stores)."""

from __future__ import annotations

import csv
import os
import sys
import tempfile
from pathlib import Path

# Before anything imports ultralytics: no network, settings and fonts in a throwaway folder.
_CONFIG = Path(tempfile.mkdtemp(prefix="atcache-test-yolo-"))
os.environ["YOLO_CONFIG_DIR"] = str(_CONFIG)
os.environ["YOLO_OFFLINE"] = "1"
os.environ.setdefault("YOLO_VERBOSE", "False")

import numpy as np  # noqa: E402
import zarr  # noqa: E402
import pytest  # noqa: E402

from atcache.yolo import prepare  # noqa: E402

prepare()

TEST_IMGSZ = 64
TEST_LAYERS = (6, 8, 13, 16, 19, 22)


@pytest.fixture(scope="session")
def voc_devkit(tmp_path_factory) -> Path:
    from atcache.data.synthetic import make_demo_data

    return make_demo_data(tmp_path_factory.mktemp("synthetic"), images=40, size=96, seed=0, progress=False)


@pytest.fixture(scope="session")
def voc_yaml(voc_devkit, tmp_path_factory) -> Path:
    from atcache.data.voc import prepare_voc

    return prepare_voc(voc_devkit, tmp_path_factory.mktemp("voc") / "VOC", progress=False)


def build_config(data_yaml, out, **overrides):
    from atcache.build.pipeline import BuildConfig

    kw = dict(teacher="yolo11n.yaml", data=str(data_yaml), out=str(out), imgsz=TEST_IMGSZ, batch=4, device="cpu",
              workers=0, chunk_rows=8, layers=TEST_LAYERS, progress=False)
    kw.update(overrides)
    return BuildConfig(**kw)


def save_teacher_checkpoint(path: Path, cfg: str = "yolo11n.yaml", seed: int = 0) -> Path:
    """A random teacher checkpoint whose maps are not ~eps (He-normal convs; see atcache.yolo.save_random_teacher)."""
    from atcache.yolo import save_random_teacher

    return save_random_teacher(cfg, path, nc=20, seed=seed, imgsz=TEST_IMGSZ)


@pytest.fixture(scope="session")
def teacher_pt(tmp_path_factory) -> Path:
    return save_teacher_checkpoint(tmp_path_factory.mktemp("teacher") / "teacher_n.pt")


@pytest.fixture(scope="session")
def built_cache(voc_yaml, teacher_pt, tmp_path_factory) -> Path:
    from atcache.build.pipeline import build_cache

    out = tmp_path_factory.mktemp("cache") / "teacher.zarr"
    build_cache(build_config(voc_yaml, out, teacher=str(teacher_pt), workers=2))
    return out


# ---------------------------------------------------------------------- helpers shared by several test modules
def store_arrays(path):
    g = zarr.open_group(str(path), mode="r")
    out = {"files": list(g["files"][:]), "done": g["done"][:], "letterbox": g["letterbox"][:]}
    for layer in TEST_LAYERS:
        out[f"maps/{layer}"] = g[f"maps/{layer}"][:]
        out[f"norms/{layer}"] = g[f"norms/{layer}"][:]
    return out


def assert_one_line_error(result, *needles):
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [l for l in result.output.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("atcache: error:"), result.output
    for n in needles:
        assert n in lines[0], lines[0]


def assert_same_store(a, b):
    x, y = store_arrays(a), store_arrays(b)
    assert x.keys() == y.keys()
    for key in x:
        if key == "files":
            assert x[key] == y[key]
        else:
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def cli_command(voc_yaml, teacher_pt, out):
    """`python -m atcache build-cache` with the settings of the session's `built_cache`."""
    return [sys.executable, "-m", "atcache", "build-cache", "--teacher", str(teacher_pt), "--data", str(voc_yaml),
            "--out", str(out), "--imgsz", str(TEST_IMGSZ), "--batch", "4", "--device", "cpu", "--workers", "0",
            "--chunk-rows", "8", "--no-progress"]


def assert_clean(out: Path) -> None:
    assert not list(out.rglob("*.partial")), "leftovers of interrupted writes"
    from atcache.cache.claims import LOCK_PREFIX

    assert not (out / LOCK_PREFIX).exists(), "ownership records left behind"


def target_dataset(voc_yaml, cache, mode="warp", layers=TEST_LAYERS, **hyp):
    """The training dataset ultralytics builds for these settings, with cached targets attached."""
    from ultralytics.cfg import get_cfg
    from ultralytics.data.build import build_yolo_dataset
    from ultralytics.data.utils import check_det_dataset

    from atcache.train.targets import CacheTargets, attach_targets

    args = get_cfg(overrides={"imgsz": TEST_IMGSZ, "data": str(voc_yaml), **hyp})
    data = check_det_dataset(str(voc_yaml))
    ds = build_yolo_dataset(args, data["train"], batch=4, data=data, mode="train")
    return attach_targets(ds, CacheTargets.load(cache, layers), mode, data["path"], args)


def traced_views(ds, n):
    """(augmented image, recorded view) for n samples, with the view taken before __getitem__ drops it."""
    from atcache.train.targets import VIEW_KEY

    out = []
    for i in range(n):
        labels = ds.transforms(ds.get_image_and_label(i % len(ds)))
        out.append((labels["img"].numpy().transpose(1, 2, 0)[..., ::-1].astype(np.float64), labels[VIEW_KEY]))
    return out


COMMON = ["--student", "yolo11n.yaml", "--epochs", "1", "--imgsz", str(TEST_IMGSZ), "--batch", "4", "--device", "cpu",
          "plots=False", "workers=0", "nbs=4"]  # nbs=batch: an optimizer step on every batch


def results(run: Path) -> dict[str, float]:
    with open(run / "results.csv") as f:
        rows = list(csv.DictReader(f))
    return {k.strip(): float(v) for k, v in rows[-1].items()}



@pytest.fixture(scope="session")
def trained_teacher_pt(voc_yaml, tmp_path_factory) -> Path:
    """A YOLO11n teacher trained briefly (3 epochs) with plain ultralytics on the synthetic VOC data: real, trained
    maps (not a random init's) for precision tests."""
    from atcache.tools.demo import train_teacher

    best, _ = train_teacher("yolo11n.yaml", voc_yaml, tmp_path_factory.mktemp("trained"), epochs=3, imgsz=TEST_IMGSZ,
                            device="cpu", batch=8)
    return best
