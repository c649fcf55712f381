"""The command line through typer's CliRunner: help everywhere, and one clear line (no traceback) for bad input."""

import json
import shutil

import pytest
import zarr
from typer.testing import CliRunner

from atcache.cli import app
from conftest import TEST_IMGSZ, assert_one_line_error

runner = CliRunner()
COMMANDS = ["make-demo-data", "prepare-voc", "build-cache", "train", "train-from-cache", "train-online", "demo", "study",
            "bench"]


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.mark.parametrize("command", COMMANDS)
def test_help(command):
    result = run(command, "--help")
    assert result.exit_code == 0 and "Usage" in result.output


def build_args(voc_yaml, teacher, out, *extra):
    return ["build-cache", "--teacher", teacher, "--data", voc_yaml, "--out", out, "--imgsz", TEST_IMGSZ,
            "--batch", 4, "--device", "cpu", "--workers", 0, "--chunk-rows", 8, "--no-progress", *extra]


def test_build_cache_summary(voc_yaml, teacher_pt, tmp_path):
    out = tmp_path / "c.zarr"
    result = run(*build_args(voc_yaml, teacher_pt, out, "--layers", "16,22"))
    assert result.exit_code == 0, result.output
    assert "img/s" in result.output and "KB/image" in result.output
    assert sorted(zarr.open_group(str(out), mode="r")["maps"].keys()) == ["16", "22"]
    again = run(*build_args(voc_yaml, teacher_pt, out, "--layers", "16,22"))
    assert_one_line_error(again, "already exists", "--resume", "--overwrite")
    resumed = run(*build_args(voc_yaml, teacher_pt, out, "--layers", "16,22", "--resume"))
    assert resumed.exit_code == 0 and resumed.output.startswith("0 images")


@pytest.mark.parametrize(
    "change,needles",
    [
        ({"teacher": "missing.pt"}, ["teacher", "missing.pt does not exist"]),
        ({"extra": ["--layers", "6,99"]}, ["layer 99 does not exist"]),
        ({"extra": ["--layers", "6,x"]}, ["--layers"]),
        ({"extra": ["--imgsz", "100"]}, ["--imgsz 100", "multiple"]),
        ({"extra": ["--split", "holdout"]}, ["split 'holdout'"]),
        ({"extra": ["--shard", "2/2"]}, ["--shard 2/2"]),
        ({"extra": ["--kind", "mean"]}, ["--kind 'mean'"]),
        ({"data": "nowhere.yaml"}, ["nowhere.yaml does not exist"]),
    ],
)
def test_build_cache_bad_input(voc_yaml, teacher_pt, tmp_path, change, needles):
    teacher = tmp_path / change["teacher"] if "teacher" in change else teacher_pt
    data = tmp_path / change["data"] if "data" in change else voc_yaml
    result = run(*build_args(data, teacher, tmp_path / "c.zarr", *change.get("extra", [])))
    assert_one_line_error(result, *needles)
    assert not (tmp_path / "c.zarr").exists()


def test_build_cache_corrupt_image(voc_yaml, teacher_pt, tmp_path):
    root = tmp_path / "VOC"
    shutil.copytree(voc_yaml.parent, root, ignore=shutil.ignore_patterns("*.cache"))
    data = root / "VOC.yaml"
    data.write_text(voc_yaml.read_text().replace(str(voc_yaml.parent), str(root)))
    victim = sorted((root / "images" / "train2007").glob("*.jpg"))[0]
    victim.write_bytes(b"garbage")
    result = run(*build_args(data, teacher_pt, tmp_path / "c.zarr"))
    assert_one_line_error(result, victim.name, "cannot be decoded", "--skip-bad")
    skipped = run(*build_args(data, teacher_pt, tmp_path / "c.zarr", "--resume", "--skip-bad"))
    assert skipped.exit_code == 0 and f"skipped train2007/{victim.name}" in skipped.output.replace("images/", "")


def test_make_demo_data_and_prepare_voc(tmp_path):
    result = run("make-demo-data", "--out", tmp_path, "--images", 10, "--size", 48)
    assert result.exit_code == 0 and "VOCdevkit" in result.output
    result = run("prepare-voc", "--devkit", tmp_path / "VOCdevkit", "--out", tmp_path / "VOC")
    assert result.exit_code == 0 and (tmp_path / "VOC" / "VOC.yaml").is_file()
    bad = run("prepare-voc", "--devkit", tmp_path / "nothing", "--out", tmp_path / "VOC2")
    assert_one_line_error(bad, "no VOC2007")


def test_demo_quick(tmp_path):
    result = run("demo", "--out", tmp_path / "demo", "--quick", "--teacher", "yolo11n.yaml")
    assert result.exit_code == 0, result.output
    assert "build-cache:" in result.output and "teacher: yolo11n.yaml 1 epoch(s)" in result.output
    demo = tmp_path / "demo"
    assert (demo / "teacher" / "weights" / "best.pt").is_file() and (demo / "teacher" / "results.csv").is_file()
    assert zarr.open_group(str(demo / "teacher_cache.zarr"), mode="r")["done"][:].all()
    assert zarr.open_group(str(demo / "teacher_replay.zarr"), mode="r")["replay/done"][:].all()
    for name in ("plain", "cache", "replay", "online"):
        header = (demo / "students" / name / "results.csv").read_text().splitlines()[0]
        assert ("train/at_loss" in header) == (name != "plain")
        assert (demo / "students" / name / "weights" / "best.pt").is_file()
    results = json.loads((demo / "demo_results.json").read_text())
    for name in ("plain", "cache", "replay", "online"):
        run_ = results["runs"][name]
        assert run_["finished"] and run_["img_per_s"] > 0 and run_["peak_mem_gb"] > 0 and len(run_["epoch_s"]) == 1
        assert set(run_["metrics"]) >= {"metrics/mAP50(B)", "metrics/mAP50-95(B)"}
    assert results["cache"]["bytes_per_image"] > 0
    table = (demo / "demo_results.md").read_text()
    assert table.count("| `train") == 4 and "KB/image" in table and "KB/view" in table and "mAP50-95" in table
    assert table.splitlines()[0] in result.output
    assert "cannot: which student is more accurate" in table and results["data"]["val_images"] > 0


@pytest.mark.parametrize("args, needle", [(["--modes", "plain,bogus"], "--modes 'bogus' is unknown"),
                                          (["--seeds", "0,x"], "--seeds and --at-weights take comma-separated numbers")])
def test_study_refusals_are_one_line(tmp_path, args, needle):
    assert_one_line_error(run("study", "--out", tmp_path, *args), needle)
