"""The shape of the code: the import contracts in pyproject hold (layers, no cycles, zarr only in atcache.cache,
ultralytics only through atcache.yolo); the inspection path stays free of torch and ultralytics; every command that
touches ultralytics writes nothing outside its folders and downloads nothing; no module or tracked file grows too big."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import TEST_IMGSZ

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "atcache"


# ------------------------------------------------------------------------------------------ the import contracts
def test_the_import_contracts_hold():
    """pyproject's import-linter contracts (CI runs them too): the layers from the command line down to settings and
    errors, no cycles among a package's modules, zarr only in atcache.cache, ultralytics only in atcache.yolo."""
    lint = Path(sys.executable).with_name("lint-imports")
    done = subprocess.run([str(lint) if lint.exists() else "lint-imports", "--no-cache"], cwd=REPO, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "4 kept, 0 broken" in done.stdout, done.stdout[-2000:]


# ------------------------------------------------------------------------------------------ imports at run time
INSPECT = """
import json, sys
from typer.testing import CliRunner
from atcache.cli import app
result = CliRunner().invoke(app, ["inspect", sys.argv[1], "--verify", "--scheduler", "local:2", "--json", sys.argv[2]])
print(json.dumps({"exit_code": result.exit_code, "output": result.output,
                  "torch": "torch" in sys.modules, "ultralytics": "ultralytics" in sys.modules}))
"""


@pytest.mark.slow
def test_inspect_on_a_local_cluster_imports_neither_torch_nor_ultralytics(built_cache, tmp_path):
    """`atcache inspect --verify --scheduler local:2` in a fresh process: the report is made, torch never loaded."""
    report = tmp_path / "inspect.json"
    done = subprocess.run([sys.executable, "-c", INSPECT, str(built_cache), str(report)], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["exit_code"] == 0, got["output"]
    assert "every chunk decodes" in got["output"] and json.loads(report.read_text())["rows_done"] == 31
    assert got["torch"] is False and got["ultralytics"] is False


def test_the_public_api_is_what_the_package_exports():
    import importlib

    import atcache

    assert atcache.__all__ == ["__version__", "VOC_NAMES", *atcache._EXPORTS]
    for name, module in atcache._EXPORTS.items():
        obj = getattr(atcache, name)  # resolves (imports its module) or raises
        assert callable(obj), name  # every export is a class or a function
        assert obj is getattr(importlib.import_module(f"atcache.{module}"), name), name
    assert atcache.open_cache.__module__ == "atcache.cache.inspect"


# ------------------------------------------------------------- what the commands touching ultralytics leave behind
OFFLINE = {"http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9",
           "HTTPS_PROXY": "http://127.0.0.1:9", "ALL_PROXY": "http://127.0.0.1:9", "no_proxy": "", "NO_PROXY": "",
           "HF_HUB_OFFLINE": "1"}
NETWORK_SIGNS = ("Downloading", "https://", "127.0.0.1:9", "Connection refused", "ProxyError", "Max retries",
                 "urlopen error")


def network_lines(output: str) -> list[str]:
    """Lines that show a download or a connection tried (links to ultralytics' docs in its messages are neither)."""
    return [line for line in output.splitlines() if any(s in line for s in NETWORK_SIGNS)
            and "https://docs.ultralytics.com" not in line]


def _tree(path: Path) -> dict[str, float]:
    """relative path -> mtime for everything under `path` ({} when it does not exist)."""
    return {str(p.relative_to(path)): p.stat().st_mtime for p in path.rglob("*")} if path.exists() else {}


def _new_untracked() -> set[str]:
    """Untracked, not ignored paths in the repo (source files people are writing left out: only tool droppings)."""
    out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=REPO, capture_output=True,
                         text=True, check=True).stdout
    return {line[3:] for line in out.splitlines()
            if line.startswith("??") and not line.endswith((".py", ".md", ".toml", ".sh", ".txt"))}


@pytest.mark.slow
def test_commands_touching_ultralytics_write_only_their_outputs_and_download_nothing(tmp_path):
    """Each command that loads ultralytics, in a fresh process with an empty HOME and YOLO_CONFIG_DIR, the cwd in a
    temporary folder, YOLO_OFFLINE unset (atcache sets it) and every proxy a closed port: nothing is downloaded,
    nothing is written in the repository or the real ~/.config/Ultralytics."""
    home, config, cwd, out = (tmp_path / d for d in ("home", "yolo-config", "cwd", "out"))
    for d in (home, config, cwd, out):
        d.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("YOLO_", "HF_")) and k.lower() not in OFFLINE}
    env.update(OFFLINE, HOME=str(home), YOLO_CONFIG_DIR=str(config), MPLCONFIGDIR=str(home / ".mpl"))
    real_settings = Path(os.path.expanduser("~")) / ".config" / "Ultralytics"
    settings_before, untracked_before = _tree(real_settings), _new_untracked()

    atcache = [sys.executable, "-m", "atcache"]
    data, cache, student = out / "VOC" / "VOC.yaml", out / "teacher.zarr", out / "runs" / "s" / "weights" / "last.pt"
    train = ["--epochs", "1", "--imgsz", str(TEST_IMGSZ), "--batch", "4", "--device", "cpu", "plots=False",
             "workers=0", "nbs=4"]
    commands = {
        "make-demo-data": atcache + ["make-demo-data", "--out", str(out / "demo"), "--images", "8", "--size", "64"],
        "prepare-voc": atcache + ["prepare-voc", "--devkit", str(out / "demo" / "VOCdevkit"), "--out",
                                  str(out / "VOC")],
        "build-cache": atcache + ["build-cache", "--teacher", "yolo11n.yaml", "--data", str(data), "--out", str(cache),
                                  "--imgsz", str(TEST_IMGSZ), "--batch", "4", "--device", "cpu", "--workers", "0",
                                  "--chunk-rows", "4", "--layers", "16,22", "--no-progress"],
        "train-from-cache": atcache + ["train-from-cache", "--cache", str(cache), "--data", str(data), "--student",
                                       "yolo11n.yaml", "--layers", "16,22", "--project", str(out / "runs"), "--name",
                                       "s", *train, "val=False"],
        "train": atcache + ["train", "--data", str(data), "--student", "yolo11n.yaml", "--project", str(out / "runs"),
                            "--name", "plain", *train],
        "fidelity": atcache + ["fidelity", "--cache", str(cache), "--teacher", "yolo11n.yaml", "--data", str(data),
                               "--batches", "1", "--batch", "4", "--device", "cpu"],
        "visualize": atcache + ["visualize", str(cache), "--data", str(data), "--out", str(out / "vis"), "--images",
                                "2", "--student", str(student)],
        "python api": [sys.executable, "-c",
                       "import atcache; atcache.AtcacheTrainer; import atcache.yolo as y; y.YOLO"],
    }
    for name, cmd in commands.items():
        done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
        output = done.stdout + done.stderr
        assert done.returncode == 0, f"{name}: {output[-3000:]}"
        assert not network_lines(output), f"{name} tried the network: {network_lines(output)}"
    assert student.is_file()
    assert _tree(real_settings) == settings_before, "the real ~/.config/Ultralytics was written"
    assert _new_untracked() - untracked_before == set(), "files written in the repository"


def test_no_module_is_over_450_lines():
    sizes = {str(p.relative_to(PACKAGE.parent)): len(p.read_text().splitlines()) for p in PACKAGE.rglob("*.py")}
    assert {p: n for p, n in sizes.items() if n > 450} == {}


LARGE_FILES_ALLOWED = {"pipelines/results/visualize_demo.png"}  # the README's picture


def test_no_tracked_file_is_over_1_mb_and_none_is_a_wheel_or_checkpoint():
    """The repository holds code, docs and measurements: no wheels, checkpoints or other large binaries."""
    root = PACKAGE.parent
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=root, capture_output=True)
    if listed.returncode != 0:
        pytest.skip("not a git checkout")
    files = [f for f in listed.stdout.decode().split("\0") if f and (root / f).is_file()]
    large = [f"{f} ({(root / f).stat().st_size / 1e6:.1f} MB)" for f in files
             if (root / f).stat().st_size > 1_000_000 and f not in LARGE_FILES_ALLOWED]
    binaries = [f for f in files if f.endswith((".whl", ".pt", ".pth", ".onnx", ".tar.gz", ".zip"))]
    assert not large and not binaries, large + binaries
