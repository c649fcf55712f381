"""The shipped pipelines run as a user would run them (CPU, synthetic VOCdevkit, two shards)."""

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow  # each runs a shipped pipeline end to end (4.6 min together on 2 cores)


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


def test_gpu_check_cpu_path(tmp_path):
    """pipelines/gpu.sh as shipped, on its CPU path at toy sizes: bench --gradient in 2 rounds, then fidelity of warp
    and replay targets and of the replayed gradients."""
    results = tmp_path / "results"
    env = dict(os.environ, DEVICE="cpu", QUICK="1", TAG="cpu_quick", RUN=str(tmp_path / "run"), RESULTS=str(results),
               PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    result = subprocess.run(["bash", str(REPO / "pipelines" / "gpu.sh")], env=env, capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    bench = json.loads((results / "bench_cpu_quick.json").read_text())
    assert bench["device"].startswith("CPU") and bench["train"]["cache"]["rounds"] == 2
    assert bench["loader"]["rendered_targets_per_s"] > 0 and bench["replay_build"]["replay_build_img_per_s"] > 0
    for targets in ("warp", "replay"):
        fidelity = json.loads((results / f"fidelity_{targets}_cpu_quick.json").read_text())
        assert fidelity["config"]["targets"] == targets
    replay = json.loads((results / "fidelity_replay_cpu_quick.json").read_text())
    assert min(v["all"]["cosine_mean"] for v in replay["layers"].values()) > 0.999  # replay targets: the teacher's own
    gradient = json.loads((results / "fidelity_gradient_cpu_quick.json").read_text())["layers"]["gradient"]["all"]
    assert gradient["cosine_mean"] > 0.999 and bench["train"]["grad"]["img_per_s"] > 0
    assert bench["gradient"]["gradient_bytes_per_view"] > 0


def test_accuracy_study_pipeline_at_toy_scale(tmp_path):
    """pipelines/accuracy.sh as shipped, tiny: every mode over two seeds, per-seed values, means and stds in the JSON."""
    env = dict(os.environ, OUT=str(tmp_path / "study"), TAG="toy", SWEEP_WEIGHTS="3",
               PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    args = ["--images", "40", "--imgsz", "64", "--teacher", "yolo11n.yaml", "--teacher-epochs", "1",
            "--student-images", "8", "--student-epochs", "1", "--seeds", "0,1", "--batch", "4"]
    result = subprocess.run(["bash", str(REPO / "pipelines" / "accuracy.sh"), *args], env=env, cwd=tmp_path,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "pipelines" / "results" / "accuracy_toy.json").read_text())
    assert set(report["modes"]) == {"plain", "online", "static", "warp", "replay", "grad", "flip"}
    assert all(m["vs_plain"]["mAP50"]["n"] == 2 for name, m in report["modes"].items() if name != "plain")
    for mode in report["modes"].values():
        assert mode["seeds"] == [0, 1] and len(mode["mAP50"]) == 2 and len(mode["mAP50-95"]) == 2
        assert mode["mAP50_mean"] == pytest.approx(sum(mode["mAP50"]) / 2)
        assert mode["mAP50_std"] == pytest.approx(statistics.stdev(mode["mAP50"]))
        assert all(x > 0 for x in mode["img_per_s"])
    assert report["data"]["val_images"] >= 5 and report["teacher"]["checkpoint"].endswith("best.pt")
    sweep = json.loads((tmp_path / "pipelines" / "results" / "accuracy_sweep_toy.json").read_text())
    assert set(sweep["modes"]) == {"plain", "replay"} and sweep["config"]["at_weights"] == [3.0]
    assert sweep["modes"]["plain"]["mAP50"] == report["modes"]["plain"]["mAP50"]  # the study's plain students, reused
    assert sweep["modes"]["replay"]["vs_plain"]["mAP50"]["n"] == 2
    assert "| plain |" in (tmp_path / "pipelines" / "results" / "accuracy_toy.md").read_text()
