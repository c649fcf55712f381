"""`atcache fidelity`: cached targets against the live teacher on the same augmented images."""

import json

import numpy as np
from typer.testing import CliRunner

from atcache.cli import app
from atcache.train.views import Blend, Canvas, Placed, Source, flip_matrix, translation, warp
from helpers import TEST_LAYERS

runner = CliRunner()
NO_AUG = ["hsv_h=0", "hsv_s=0", "hsv_v=0", "mosaic=0", "mixup=0", "fliplr=0", "scale=0", "translate=0",
          "degrees=0", "shear=0", "perspective=0"]


def fidelity(built_cache, teacher, voc_yaml, *extra):
    return runner.invoke(app, [str(a) for a in (
        "fidelity", "--cache", built_cache, "--teacher", teacher, "--data", voc_yaml, "--batches", 2, "--batch", 4,
        "--device", "cpu", *extra)])


def test_static_targets_without_augmentation_are_the_teachers_maps(built_cache, teacher_pt, voc_yaml, tmp_path):
    out = tmp_path / "f.json"
    result = fidelity(built_cache, teacher_pt, voc_yaml, "--targets", "static", "--json", out, *NO_AUG)
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["samples"] == 8 and report["combinations"] == {"none": 8}
    for layer in TEST_LAYERS:
        s = report["layers"][str(layer)]["none"]
        assert s["cosine_p5"] > 0.999, (layer, s)  # float16 storage
        assert s["at_distance_mean"] < 0.03


def test_warp_targets_without_augmentation_are_close(built_cache, teacher_pt, voc_yaml, tmp_path, monkeypatch):
    """Warp mode keeps ultralytics' RandomPerspective, which re-centres the image (half-pixel offsets resample it);
    the padding borrows the cached response around the image: close to the teacher, not bit-equal. The targets
    measured are the ones training feeds: each batch rendered by the trainer's renderer (render.BatchRenderer),
    none per sample."""
    from atcache.train.render import BatchRenderer
    from atcache.train.targets import TargetRendering

    rendered, render = [], BatchRenderer.render
    monkeypatch.setattr(BatchRenderer, "render", lambda self, p: rendered.append(len(p["rows"])) or render(self, p))

    def per_sample(*args, **kwargs):
        raise AssertionError("a warp target was rendered per sample, not as training renders it")

    monkeypatch.setattr(TargetRendering, "targets", per_sample)
    out = tmp_path / "f.json"
    result = fidelity(built_cache, teacher_pt, voc_yaml, "--json", out, *NO_AUG)
    assert result.exit_code == 0, (result.output, result.exception)
    assert rendered == [4, 4]  # --batches 2 --batch 4
    report = json.loads(out.read_text())
    assert report["combinations"] == {"none": 8}
    assert all(report["layers"][str(i)]["none"]["cosine_mean"] > 0.99 for i in TEST_LAYERS), report["layers"]


def test_default_augmentations_are_reported_by_kind(built_cache, teacher_pt, voc_yaml, tmp_path):
    out = tmp_path / "f.json"
    result = fidelity(built_cache, teacher_pt, voc_yaml, "--json", out, "mixup=0.5")
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    per = report["layers"]["16"]
    assert per["all"]["n"] == 8 and per["mosaic"]["n"] == 8 and "mixup" in per
    assert all(-1 <= s["cosine_mean"] <= 1 for s in per.values())
    assert sum(report["combinations"].values()) == 8 and "cosine p5" in result.output


def test_refuses_another_teacher(built_cache, voc_yaml, tmp_path):
    from atcache.yolo import save_random_teacher

    other = save_random_teacher("yolo11n.yaml", tmp_path / "other.pt", seed=1, imgsz=64)
    result = fidelity(built_cache, other, voc_yaml)
    assert result.exit_code == 2 and "is not the one cache" in result.output and "Traceback" not in result.output


def test_view_kinds():
    from atcache.tools.fidelity import view_kinds

    src = Source(0, (32, 32))
    assert view_kinds(warp(src, np.eye(3), (32, 32), "letterbox")) == {"none"}
    assert view_kinds(warp(src, np.eye(3), (32, 32), "affine")) == {"none"}
    assert view_kinds(warp(Source(0, (24, 32)), translation(0, 4), (32, 32), "affine")) == {"none"}  # centring only
    assert view_kinds(warp(Source(0, (24, 32)), translation(0, 7), (32, 32), "affine")) == {"affine"}
    flipped = warp(warp(src, translation(2, 0), (32, 32), "affine"), flip_matrix((32, 32), "horizontal"), (32, 32), "flip")
    assert view_kinds(flipped) == {"affine", "flip"}
    mosaic = Canvas((64, 64), (Placed(src, translation(0, 0)), Placed(Source(1, (32, 32)), translation(32, 0))), "mosaic")
    assert view_kinds(Blend((64, 64), ((mosaic, 0.5), (src, 0.5)))) == {"mosaic", "mixup"}
