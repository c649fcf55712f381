"""The scale drill (pipelines/scale_drill.py) at its tiny size: every step runs, on a local folder and on a loopback S3
server, and the report holds finite, positive figures and every budget."""

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow  # each starts a dozen step processes (about 45 s on 2 cores)
STEPS = ("build_half", "resume", "four_shards", "open_static", "open_streamed", "open_replay", "supply", "inspect")


def drill(tmp_path, *extra) -> dict:
    out = tmp_path / "drill.json"
    run = subprocess.run([sys.executable, "pipelines/scale_drill.py", "--tiny", "--work", str(tmp_path / "work"),
                          "--out", str(out), *extra], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "| budget |" in run.stdout
    return json.loads(out.read_text())


def check_backend(report: dict, backend: str) -> None:
    size = report["backends"][backend]["sizes"]["tiny"]
    for name in STEPS:
        assert size[name]["peak_rss_mb"] > 0, name
    assert size["resume"]["units_written"] + size["build_half"]["units_written"] == size["units"]
    assert size["four_shards"]["units_written"] == size["units"]
    assert 5e3 < size["bytes_per_view"] < 2e4  # realistic entropy: ~10 KB a view
    table = report["analysis"][backend]["table"]["tiny"]
    for metric, value in table.items():
        assert math.isfinite(value) and value > 0, (metric, value)
    budgets = report["analysis"][backend]["budgets"]
    for key in ("open_first_batch_s", "replay_supply_fraction", "verify_vs_plain_decompress", "training_rss_flat"):
        assert {"value", "budget", "met", "note"} <= set(budgets[key]), key
    if backend == "s3":
        assert "unit_noncompute_s3_s" in budgets
    over = report["backends"][backend]["unit_overhead"]  # 24 images, 2 replay epochs (--tiny)
    assert {k: (b["units"], b["replay_units"]) for k, b in over["builds"].items()} == {
        "24": (3, 2), "1": (72, 48), "24/1": (49, 48)}
    assert math.isfinite(over["s_per_unit"]) and math.isfinite(over["s_per_replay_unit"])


def test_tiny_drill_local_and_analyse_only(tmp_path):
    report = drill(tmp_path)
    assert report["environment"]["versions"]["zarr"] and report["environment"]["date"]
    assert report["augment"]["s_per_sample"] > 0
    check_backend(report, "local")
    again = subprocess.run([sys.executable, "pipelines/scale_drill.py", "--analyse-only", "--out",
                            str(tmp_path / "drill.json")], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "**local**" in again.stdout, again.stderr[-2000:]


@pytest.mark.skipif(not (importlib.util.find_spec("moto") and importlib.util.find_spec("s3fs")), reason="needs moto, s3fs")
def test_tiny_drill_on_loopback_s3(tmp_path):
    check_backend(drill(tmp_path, "--s3", "--no-local"), "s3")
