"""`atcache bench` end to end on a CPU for a few steps: every field of the JSON, ratios that follow from the raw
figures, the user's dataset left untouched, and one-line refusals."""

import json
import math

import pytest
from typer.testing import CliRunner

from atcache.cli import app
from conftest import TEST_IMGSZ

runner = CliRunner()
STEPS, WARMUP, BATCH, IMAGES, ROUNDS = 3, 1, 4, 24, 2


def snapshot(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.fixture(scope="module")
def bench(voc_yaml, teacher_pt, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    before = snapshot(voc_yaml.parent)
    result = runner.invoke(app, [str(a) for a in (
        "bench", "--data", voc_yaml, "--teacher", teacher_pt, "--student", "yolo11n.yaml", "--layers", "6,16,22",
        "--imgsz", TEST_IMGSZ, "--batch", BATCH, "--steps", STEPS, "--warmup", WARMUP, "--images", IMAGES,
        "--repeats", 1, "--rounds", ROUNDS, "--device", "cpu", "--out", out, "--json", out / "copy.json")])
    assert result.exit_code == 0, result.output
    return json.loads((out / "bench.json").read_text()), result, out, before, voc_yaml


def test_report_has_every_field(bench):
    report, result, out, _, _ = bench
    assert json.loads((out / "copy.json").read_text()) == report
    for key in ("cache_over_plain", "cache_over_online", "mem_cache_over_plain", "build_over_inference"):
        assert report["ratios"][key] > 0
    assert report["device"].startswith("CPU") and report["versions"]["ultralytics"]
    for name in ("plain", "cache", "online", "replay"):
        run = report["train"][name]
        assert run["steps"] == STEPS and run["batch"] == BATCH and run["rounds"] == ROUNDS
        assert [len(s) for s in run["step_s_rounds"]] == [STEPS] * ROUNDS
        assert run["img_per_s"] == pytest.approx(sum(run["img_per_s_rounds"]) / ROUNDS)  # the median of two
        assert run["img_per_s_spread"] >= 0 and run["peak_mem_gb"] > 0.1 and run["mem_kind"] == "peak_rss"
    # interleaved: every round in an order rotated by one
    assert report["train"]["plain"]["position_in_round"] == [0, 3] and report["train"]["cache"]["position_in_round"] == [1, 0]
    for name, spread in report["ratio_spread_over_rounds"].items():  # the ratio of two-round medians lies between
        assert spread["min"] - 1e-9 <= report["ratios"][name] <= spread["max"] + 1e-9
    assert any("noisy" in w for w in report["warnings"]) and "warning:" in result.output
    assert report["build"]["build_img_per_s"] > 0 and report["build"]["inference_img_per_s"] > 0
    rb = report["replay_build"]
    assert rb["views"] == rb["epochs"] * IMAGES and rb["replay_build_img_per_s"] > 0 and rb["floor_img_per_s"] > 0
    assert rb["bytes_per_view"] > 0 and "replay build" in result.output
    loader = report["loader"]
    assert loader["targets_per_s_per_worker"] > 0 and loader["plain_samples_per_s_per_worker"] > 0
    assert loader["rendered_targets_per_s"] > 0 and loader["cache_samples_over_plain"] > 0  # views shipped, batch rendered
    assert report["train"]["cache"]["loader"]["ships_views"] == "at_pieces"
    assert report["storage"]["bytes_per_image"] > 0 and report["storage"]["map_dtype"] == "float16"
    assert set(report["storage"]["cosine_vs_float32"]) == {"6", "16", "22"}
    assert report["goals"]["reference_setup"] is False and "met" in report["goals"]["cache_over_plain"]
    assert "cache_over_online" in result.output and "peak mem GB" in result.output


def test_ratios_follow_from_the_raw_figures(bench):
    report = bench[0]
    t, r = report["train"], report["ratios"]
    assert r["cache_over_plain"] == pytest.approx(t["cache"]["img_per_s"] / t["plain"]["img_per_s"])
    assert r["cache_over_online"] == pytest.approx(t["cache"]["img_per_s"] / t["online"]["img_per_s"])
    assert r["mem_cache_over_plain"] == pytest.approx(t["cache"]["peak_mem_gb"] / t["plain"]["peak_mem_gb"])
    b = report["build"]
    assert r["build_over_inference"] == pytest.approx(b["build_img_per_s"] / b["inference_img_per_s"])
    assert r["replay_over_plain"] == pytest.approx(t["replay"]["img_per_s"] / t["plain"]["img_per_s"])
    rb = report["replay_build"]
    assert r["replay_build_over_floor"] == pytest.approx(rb["replay_build_img_per_s"] / rb["floor_img_per_s"])
    assert report["loader"]["training_need_img_per_s"] == t["cache"]["img_per_s"]


def test_float16_storage_is_close_to_float32(bench):
    storage = bench[0]["storage"]
    for layer, cos in storage["cosine_vs_float32"].items():
        assert cos["min"] > 0.999, (layer, cos)
        assert storage["max_abs_vs_float32"][layer] < 2e-3
    assert storage["bytes_per_image"] == pytest.approx(bench[0]["build"]["bytes_per_image"])
    assert storage["raw_float16_bytes_per_image"] == 2 * (8 * 8 + 4 * 4 + 2 * 2)  # layers 6, 16, 22 at 64 px


def test_uses_a_linked_subset_and_leaves_the_dataset_alone(bench):
    report, _, out, before, voc_yaml = bench
    assert snapshot(voc_yaml.parent) == before  # no label cache or anything else written into the user's dataset
    train = list((out / "data" / "images" / "train").iterdir())
    assert len(train) == IMAGES and len(list((out / "data" / "labels" / "train").iterdir())) == IMAGES
    assert report["build"]["images"] == IMAGES and report["train"]["plain"]["train_images"] == IMAGES


@pytest.mark.parametrize("args, needle", [
    (["--device", "0,1"], "one device"),
    (["--teacher", "nowhere/teacher.pt"], "nowhere/teacher.pt does not exist"),
    (["--steps", "0"], "--steps"),
    (["--images", "8", "--batch", "4", "--steps", "3", "--warmup", "1"], "step intervals per epoch"),
    (["--data", "nowhere.yaml"], "nowhere.yaml does not exist"),
])
def test_refusals_are_one_line(args, needle, tmp_path):
    result = runner.invoke(app, ["bench", "--device", "cpu", "--out", str(tmp_path), *args])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert needle in result.output.strip().splitlines()[-1]


def test_step_figures_use_intervals_inside_epochs():
    from atcache.tools.measure import step_figures

    ends = [(0, 0.0), (0, 1.0), (0, 3.0), (1, 10.0), (1, 11.0), (1, 12.5)]
    figures = step_figures(ends, batch=8, warmup=1)
    assert figures["step_s"] == [2.0, 1.0, 1.5]  # the 3.0 -> 10.0 gap spans an epoch end and is not a step
    assert figures["median_step_s"] == 1.5 and math.isclose(figures["img_per_s"], 8 / 1.5)
