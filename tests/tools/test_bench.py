"""`atcache bench` end to end on a CPU for a few steps: every field of the JSON, ratios that follow from the raw
figures, the user's dataset left untouched, and one-line refusals."""

import dataclasses
import json
import shutil
import math

import pytest
from typer.testing import CliRunner

from atcache.cli import app
from atcache.config import DEFAULT_LAYERS
from helpers import TEST_IMGSZ
from atcache.settings import DemoConfig

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


@pytest.mark.slow
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
        ips = run["img_per_s_rounds"]
        assert run["img_per_s_spread"] == pytest.approx((max(ips) - min(ips)) / run["img_per_s"])
        assert run["peak_mem_gb"] > 0.1 and run["mem_kind"] == "peak_rss"
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_float16_storage_is_close_to_float32(bench):
    storage = bench[0]["storage"]
    for layer, cos in storage["cosine_vs_float32"].items():
        assert cos["min"] > 0.999, (layer, cos)
        assert storage["max_abs_vs_float32"][layer] < 2e-3
    assert storage["bytes_per_image"] == pytest.approx(bench[0]["build"]["bytes_per_image"])
    assert storage["raw_float16_bytes_per_image"] == 2 * (8 * 8 + 4 * 4 + 2 * 2)  # layers 6, 16, 22 at 64 px


@pytest.mark.slow
def test_uses_a_linked_subset_and_leaves_the_dataset_alone(bench):
    report, _, out, before, voc_yaml = bench
    assert snapshot(voc_yaml.parent) == before  # no label cache or anything else written into the user's dataset
    train = list((out / "data" / "images" / "train").iterdir())
    assert len(train) == IMAGES and len(list((out / "data" / "labels" / "train").iterdir())) == IMAGES
    assert report["build"]["images"] == IMAGES and report["train"]["plain"]["train_images"] == IMAGES


@pytest.mark.parametrize("args, needle", [
    (["--device", "cpu,cpu"], "one device"),
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


# ------------------------------------------------------------------------------ one plan for demo, bench and study
class FakeBuild:
    """What build_cache reports, without a teacher forward."""

    warnings, store_bytes, bytes_per_image, img_per_s, replayed, seconds = (), 2000, 10.0, 50.0, 40, 0.5

    def summary(self):
        return "fake build"


def fake_measure(calls):
    def measure(settings, overrides, steps=None, warmup=0, loader_samples=0, threads=None):
        calls.append((overrides["name"], settings))
        return {"metrics": {"metrics/mAP50(B)": 0.5, "metrics/mAP50-95(B)": 0.3}, "mean_epoch_s": 1.0,
                "img_per_s": 10.0, "median_step_s": 0.1, "peak_mem_gb": 1.0, "mem_kind": "peak_rss",
                "save_dir": str(overrides["project"]), "train_images": 30, "step_s": [0.1], "workers": 0}
    return measure


@pytest.fixture
def plan_spy(monkeypatch):
    """Every call of the one plan (the tools must call it, not a copy of it) and every student a tool trains."""
    from atcache.tools import measure, plans

    planned, trained, real = [], [], plans.plan

    def spy(mode, sources, *args, **kw):
        planned.append(mode)
        return real(mode, sources, *args, **kw)
    monkeypatch.setattr(plans, "plan", spy)
    monkeypatch.setattr(measure, "measure_training", fake_measure(trained))
    return planned, trained, real


def test_demo_trains_the_planned_students_and_says_how_long(plan_spy, monkeypatch, teacher_pt, tmp_path):
    from atcache.tools import demo, plans

    planned, trained, real = plan_spy
    monkeypatch.setattr(demo, "build_cache", lambda cfg: FakeBuild())
    lines = list(demo.run_demo(DemoConfig(out=str(tmp_path), images=40, imgsz=64, teacher=str(teacher_pt),
                                          teacher_epochs=0, device="cpu", quick=True, student_epochs=1, jobs=2)))
    assert lines[0].startswith("estimate: about ") and "2 jobs at a time" in lines[0]
    assert lines[-1].startswith("took ") and "(estimated " in lines[-1]
    assert set(planned) >= set(demo.DEMO_MODES) and sorted(n for n, _ in trained) == sorted(demo.STUDENT_RUNS)
    sources = plans.Sources(layers=tuple((i, i) for i in DEFAULT_LAYERS), teacher=str(teacher_pt),
                            cache=str(tmp_path / "teacher_cache.zarr"), replay_cache=str(tmp_path / "teacher_replay.zarr"))
    for name, settings in trained:
        assert settings == real(plans.mode_of(name), sources).settings, name
    table = (tmp_path / "demo_results.md").read_text()
    assert "2 jobs at a time" in table and "alongside" in table  # how the speed columns were measured
    assert json.loads((tmp_path / "demo_results.json").read_text())["schedule"]["jobs_at_a_time"] == 2


def test_bench_trains_the_planned_trainers(plan_spy, tmp_path):
    from atcache.tools import bench, plans

    planned, trained, real = plan_spy
    cfg = bench.BenchConfig(out=str(tmp_path), teacher="t.pt", layers=(6, 16), rounds=1, loader_samples=0)
    split = type("Split", (), {"files": (), "absolute": lambda self, i: None})()
    train = bench._measure_trainers(cfg, tmp_path / "d.yaml", split, tmp_path / "c.zarr", tmp_path / "r.zarr",
                                    lambda line: None)
    assert set(train) == set(bench.TRAINERS) == {"plain", "cache", "online", "replay"}
    assert sorted(planned) == sorted(bench.TRAINER_MODES)
    sources = plans.Sources(layers=((6, 6), (16, 16)), teacher="t.pt", cache=str(tmp_path / "c.zarr"),
                            replay_cache=str(tmp_path / "r.zarr"))
    for name, settings in trained:
        assert settings == real(plans.mode_of(name), sources).settings, name


def test_study_trains_the_planned_students(plan_spy, monkeypatch, tmp_path):
    from atcache.teacher import pipeline
    from atcache.config import STUDENT_MODES
    from atcache.tools import demo, plans, study

    planned, trained, real = plan_spy
    monkeypatch.setattr(pipeline, "build_cache", lambda cfg: FakeBuild())
    (tmp_path / "best.pt").write_bytes(b"weights")
    monkeypatch.setattr(demo, "train_teacher", lambda *a, **k: (tmp_path / "best.pt", {}))
    config = study.StudyConfig(images=40, imgsz=64, student_images=8, student_epochs=1, seeds=(0, 1),
                               at_weights=(0.5,), layers=(6, 16))
    list(study.run_study(config, tmp_path))
    assert set(study.STUDY_MODES) == set(STUDENT_MODES) - {"grad_online"} and planned == list(study.STUDY_MODES) * 2
    for name, settings in trained:
        mode, seed = name.split("_seed")[0], int(name.split("_seed")[1][0])
        sources = plans.Sources(layers=((6, 6), (16, 16)), teacher=str(tmp_path / "best.pt"),
                                cache=str(tmp_path / "cache_L6-16_n8.zarr"),
                                replay_cache=str(tmp_path / f"replay_seed{seed}_L6-16_n8_e1_grad.zarr"))
        assert settings == real(mode, sources, at_weight=0.5, aug_seed=seed).settings, name


def test_plan_covers_every_student_mode():
    from atcache.config import STUDENT_MODE_FIELDS, STUDENT_MODES, TARGET_MODES, TRAIN_MODES
    from atcache.tools import plans

    sources = plans.Sources(layers=((6, 6),), teacher="t.pt", cache="c.zarr", replay_cache="r.zarr")
    assert set(STUDENT_MODE_FIELDS) == set(STUDENT_MODES)
    for mode in STUDENT_MODES:
        p = plans.plan(mode, sources, aug_seed=3)
        assert (p.settings.mode, p.settings.targets) == STUDENT_MODE_FIELDS[mode]
        assert p.settings.mode in TRAIN_MODES and p.settings.targets in TARGET_MODES
    assert plans.plan("replay", sources).replay_build and plans.plan("replay", sources, aug_seed=3).settings.aug_seed is None
    assert plans.plan("static", sources).settings.cache == "c.zarr" and plans.plan("online", sources).needs == "teacher"
    with pytest.raises(Exception, match="unknown"):
        plans.plan("cache", sources)


def test_study_pairs_each_mode_with_plain_by_seed_and_reuses_finished_students(plan_spy, monkeypatch, tmp_path):
    from atcache.teacher import pipeline
    from atcache.tools import demo, study

    planned, trained, _ = plan_spy
    builds, teachers = [], []

    def train_teacher(*args, **kwargs):  # a teacher file whose bytes say which training made it
        teachers.append(tmp_path / f"teacher{len(teachers)}.pt")
        teachers[-1].write_bytes(b"weights %d" % (len(teachers) // 3))
        return teachers[-1], {"metrics/mAP50(B)": 0.8}

    monkeypatch.setattr(pipeline, "build_cache", lambda cfg: builds.append(cfg.replay_epochs) or FakeBuild())
    monkeypatch.setattr(demo, "train_teacher", train_teacher)
    config = study.StudyConfig(images=40, imgsz=64, student_images=8, student_epochs=1, seeds=(0, 1, 2),
                               modes=("plain", "grad", "flip", "online"), mode_seeds=(("online", 1),))
    ledger = tmp_path / "kept" / "runs.json"
    list(study.run_study(config, tmp_path, ledger=ledger))
    assert builds == [0, 1, 1, 1]  # the static cache, then one replay cache per seed
    assert planned == ["plain", "grad", "flip", "online"] + ["plain", "grad", "flip"] * 2
    report = json.loads((tmp_path / "accuracy.json").read_text())
    assert report["modes"]["online"]["seeds"] == [0] and report["modes"]["grad"]["seeds"] == [0, 1, 2]
    vs = report["modes"]["grad"]["vs_plain"]["mAP50"]
    assert vs["n"] == 3 and vs["differences"] == [0.0, 0.0, 0.0] and vs["ci95"] == [0.0, 0.0]
    assert "mAP50 − plain (95 % CI)" in (tmp_path / "accuracy.md").read_text()
    settings = {n: s for n, s in trained}
    assert settings["grad_seed0_n8_e1"].gradient_weight == 1.0 and settings["grad_seed0_n8_e1"].at_weight == 0.0
    assert settings["flip_seed1_n8_e1"].flip_weight == 1.0 and settings["flip_seed1_n8_e1"].mode == "plain"
    trained.clear()
    builds.clear()
    list(study.run_study(config, tmp_path))  # a rerun trains nothing again
    assert trained == [] and builds == [0]
    shutil.rmtree(tmp_path / "students")  # OUT lost its students: the ledger still knows them
    list(study.run_study(config, tmp_path, ledger=ledger))
    assert trained == [] and json.loads((tmp_path / "accuracy.json").read_text())["modes"] == report["modes"]
    fresh = tmp_path / "fresh"  # a fresh checkout: OUT is gone, the ledger's teacher and students are reused
    list(study.run_study(config, fresh, ledger=ledger))
    shutil.rmtree(fresh)
    trained.clear()
    list(study.run_study(config, fresh, ledger=ledger))
    assert trained == [] and len(teachers) == 1 and (fresh / "teacher" / "weights" / "best.pt").read_bytes() == b"weights 0"
    other = dataclasses.replace(config, student_epochs=2)  # other settings: nothing reused
    list(study.run_study(dataclasses.replace(other, seeds=(0,), modes=("plain",)), tmp_path, ledger=ledger))
    assert [name for name, _ in trained] == ["plain_seed0_n8_e2"] and len(json.loads(ledger.read_text())["students"]) == 11
    trained.clear()
    (tmp_path / "kept" / "runs_teacher.pt").unlink()  # the teacher is gone: retrained, and it differs
    teachers.extend([None, None])
    list(study.run_study(dataclasses.replace(config, seeds=(0,), modes=("plain",)), tmp_path / "other", ledger=ledger))
    assert [name for name, _ in trained] == ["plain_seed0_n8_e1"]  # students of another teacher are not reused


def test_paired_difference_has_the_t_interval():
    from atcache.tools.study import paired_difference

    d = paired_difference([0.5, 0.7, 0.6, 0.9], [0.4, 0.5, 0.5, 0.6])  # differences 0.1, 0.2, 0.1, 0.3
    assert d["n"] == 4 and d["mean"] == pytest.approx(0.175)
    half = 3.182446305284263 * d["std"] / 2  # t(0.975, 3) * s / sqrt(4)
    assert d["ci95"] == pytest.approx([0.175 - half, 0.175 + half])


@pytest.mark.parametrize("df, expected", [(1, 12.706205), (2, 4.302653), (3, 3.182446), (4, 2.776445), (9, 2.262157),
                                          (10, 2.228139), (29, 2.045230), (120, 1.979930)])
def test_t_quantile_matches_the_tables(df, expected):  # reference values: scipy.stats.t.ppf(0.975, df)
    from atcache.tools.study import t_quantile

    assert t_quantile(0.975, df) == pytest.approx(expected, abs=2e-6)
    assert t_quantile(0.025, df) == pytest.approx(-expected, abs=2e-6)


def test_bench_gradient_adds_the_gradient_trainers():
    from atcache.tools import bench

    cfg = bench.BenchConfig(layers=(6, 16), teacher="t.pt", gradient=True)
    plan = bench.trainer_settings(cfg, "c.zarr", "r.zarr")
    assert list(plan) == ["plain", "cache", "online", "replay", "grad", "grad_online", "flip"]
    assert (plan["grad"].mode, plan["grad"].targets, plan["grad"].cache) == ("cache", "replay", "r.zarr")
    assert plan["grad"].gradient_weight == 1.0 and plan["grad"].at_weight == 0.0
    assert (plan["grad_online"].mode, plan["grad_online"].teacher, plan["grad_online"].at_weight) == ("online", "t.pt", 0.0)
    assert plan["flip"].mode == "plain" and plan["flip"].flip_weight == 1.0
    assert list(bench.trainer_settings(bench.BenchConfig(layers=(6,), teacher="t.pt"), "c", "r")) == list(bench.TRAINERS)
