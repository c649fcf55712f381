"""Shared fixtures: an offline ultralytics, a small synthetic VOC dataset, a teacher, one cache built from both, and
assert_same_store. Constants and pure helpers (TEST_IMGSZ, TEST_LAYERS, COMMON, build_config, build_args, invoke,
assert_one_line_error, target_dataset, ...) live in tests/helpers.py; tests import them from there, never from here."""

from __future__ import annotations

import os
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

from helpers import TEST_IMGSZ, TEST_LAYERS, build_config, save_teacher_checkpoint  # noqa: E402
from atcache.yolo import prepare  # noqa: E402

prepare()


@pytest.fixture(scope="session")
def voc_devkit(tmp_path_factory) -> Path:
    from atcache.data.synthetic import make_demo_data

    return make_demo_data(tmp_path_factory.mktemp("synthetic"), images=40, size=96, seed=0, progress=False)


@pytest.fixture(scope="session")
def voc_yaml(voc_devkit, tmp_path_factory) -> Path:
    from atcache.data.voc import prepare_voc

    return prepare_voc(voc_devkit, tmp_path_factory.mktemp("voc") / "VOC", progress=False)


@pytest.fixture(scope="session")
def teacher_pt(tmp_path_factory) -> Path:
    return save_teacher_checkpoint(tmp_path_factory.mktemp("teacher") / "teacher_n.pt")


@pytest.fixture(scope="session")
def built_cache(voc_yaml, teacher_pt, tmp_path_factory) -> Path:
    from atcache.teacher.pipeline import build_cache

    out = tmp_path_factory.mktemp("cache") / "teacher.zarr"
    build_cache(build_config(voc_yaml, out, teacher=str(teacher_pt), workers=2))
    return out


def _store_arrays(path) -> dict:
    """Every array of a store at the test layers, read with plain zarr (not through atcache)."""
    g = zarr.open_group(str(path), mode="r")
    out = {"files": list(g["files"][:]), "done": g["done"][:], "letterbox": g["letterbox"][:]}
    for layer in TEST_LAYERS:
        out[f"maps/{layer}"] = g[f"maps/{layer}"][:]
        out[f"norms/{layer}"] = g[f"norms/{layer}"][:]
    return out


def _assert_same_store(a, b) -> None:
    x, y = _store_arrays(a), _store_arrays(b)
    assert x.keys() == y.keys()
    for key in x:
        if key == "files":
            assert x[key] == y[key]
        else:
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)


@pytest.fixture(scope="session")
def assert_same_store():
    """assert_same_store(a, b): two stores (paths or URLs) hold the same files, done flags, letterbox rows, maps and
    norms, read with plain zarr (a fixture: only atcache.cache may import zarr)."""
    return _assert_same_store


@pytest.fixture(scope="session")
def trained_teacher_pt(voc_yaml, tmp_path_factory) -> Path:
    """A YOLO11n teacher trained briefly (3 epochs) with plain ultralytics on the synthetic VOC data: real, trained
    maps (not a random init's) for precision tests."""
    from atcache.tools.demo import train_teacher

    best, _ = train_teacher("yolo11n.yaml", voc_yaml, tmp_path_factory.mktemp("trained"), epochs=3, imgsz=TEST_IMGSZ,
                            device="cpu", batch=8)
    return best
