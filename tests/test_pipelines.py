"""The shipped pipelines run as a user would run them (CPU, synthetic VOCdevkit, two shards)."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import zarr

REPO = Path(__file__).resolve().parents[1]


def test_voc_build_cache_pipeline_two_shards(voc_devkit, teacher_pt, built_cache, tmp_path):
    env = dict(os.environ, VOCDEVKIT=str(voc_devkit), TEACHER=str(teacher_pt), DATASET=str(tmp_path / "VOC"),
               CACHE=str(tmp_path / "caches" / "voc.zarr"), IMGSZ="64", BATCH="4", NGPU="2",
               PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    result = subprocess.run(["bash", str(REPO / "pipelines" / "voc_build_cache.sh")], env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    ours, reference = (zarr.open_group(str(p), mode="r") for p in (tmp_path / "caches" / "voc.zarr", built_cache))
    assert ours["done"][:].all()
    assert list(ours["files"][:]) == list(reference["files"][:])
    # built with chunk_rows 256 (one chunk) instead of 8, batches differ: equal within float noise
    np.testing.assert_allclose(ours["maps/16"][:].astype(np.float32), reference["maps/16"][:].astype(np.float32), atol=2e-3)


def test_voc_seed_experiment_dry_run(voc_devkit, teacher_pt, tmp_path):
    """The seed experiment script as shipped, at toy scale: prepare, cache, three trainers, bench."""
    env = dict(os.environ, VOCDEVKIT=str(voc_devkit), TEACHER=str(teacher_pt), DATASET=str(tmp_path / "VOC"),
               CACHE=str(tmp_path / "caches" / "voc.zarr"), PROJECT=str(tmp_path / "runs"), IMGSZ="64", BATCH="4",
               EPOCHS="1", STUDENT="yolo11n.yaml", DEVICE="cpu", NGPU="1",
               BENCH_ARGS="--steps 2 --warmup 1 --images 16 --repeats 1 --rounds 1",
               PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    result = subprocess.run(["bash", str(REPO / "pipelines" / "voc_seed_experiment.sh")], env=env, capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    for name in ("from_cache", "plain", "online"):
        header = (tmp_path / "runs" / name / "results.csv").read_text().splitlines()[0]
        assert ("train/at_loss" in header) == (name != "plain")
    assert "cache_over_plain" in (tmp_path / "runs" / "bench.json").read_text()
