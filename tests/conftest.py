"""Shared fixtures: an offline ultralytics, a small synthetic VOC dataset, and one cache built from it."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

# Before anything imports ultralytics: no network, settings and fonts in a throwaway folder.
_CONFIG = Path(tempfile.mkdtemp(prefix="atcache-test-yolo-"))
os.environ["YOLO_CONFIG_DIR"] = str(_CONFIG)
os.environ["YOLO_OFFLINE"] = "1"
os.environ.setdefault("YOLO_VERBOSE", "False")

import pytest  # noqa: E402

from atcache.env import prepare_ultralytics  # noqa: E402

prepare_ultralytics()

TEST_IMGSZ = 64
TEST_LAYERS = (6, 8, 13, 16, 19, 22)


@pytest.fixture(scope="session")
def voc_devkit(tmp_path_factory) -> Path:
    from atcache.synthetic import make_demo_data

    return make_demo_data(tmp_path_factory.mktemp("synthetic"), images=40, size=96, seed=0, progress=False)


@pytest.fixture(scope="session")
def voc_yaml(voc_devkit, tmp_path_factory) -> Path:
    from atcache.voc import prepare_voc

    return prepare_voc(voc_devkit, tmp_path_factory.mktemp("voc") / "VOC", progress=False)


def build_config(data_yaml, out, **overrides):
    from atcache.build import BuildConfig

    kw = dict(teacher="yolo11n.yaml", data=str(data_yaml), out=str(out), imgsz=TEST_IMGSZ, batch=4, device="cpu",
              workers=0, chunk_rows=8, layers=TEST_LAYERS, progress=False)
    kw.update(overrides)
    return BuildConfig(**kw)


def save_teacher_checkpoint(path: Path, cfg: str = "yolo11n.yaml", seed: int = 0) -> Path:
    """A random teacher checkpoint whose maps are not ~eps (He-normal convs; see atcache.teacher.save_random_teacher)."""
    from atcache.teacher import save_random_teacher

    return save_random_teacher(cfg, path, nc=20, seed=seed, imgsz=TEST_IMGSZ)


@pytest.fixture(scope="session")
def teacher_pt(tmp_path_factory) -> Path:
    return save_teacher_checkpoint(tmp_path_factory.mktemp("teacher") / "teacher_n.pt")


@pytest.fixture(scope="session")
def built_cache(voc_yaml, teacher_pt, tmp_path_factory) -> Path:
    from atcache.build import build_cache

    out = tmp_path_factory.mktemp("cache") / "teacher.zarr"
    build_cache(build_config(voc_yaml, out, teacher=str(teacher_pt), workers=2))
    return out
