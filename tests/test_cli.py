"""The command line through typer's CliRunner: help everywhere, and one clear line (no traceback) for bad input."""

import dataclasses
import inspect
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import typer
import zarr

from atcache.cli import app
from atcache.config import AUTO_DEVICE, BuildConfig, DistillSettings, RunSettings
from helpers import assert_one_line_error, build_args
from helpers import invoke as run
from atcache.version import __version__

COMMANDS = ["make-demo-data", "prepare-voc", "build-cache", "train", "train-from-cache", "train-online", "demo", "study",
            "bench", "inspect", "visualize", "fidelity"]


@pytest.mark.parametrize("command", COMMANDS)
def test_help(command):
    result = run(command, "--help")
    assert result.exit_code == 0 and "Usage" in result.output


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


@pytest.mark.slow
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


# ---------------------------------------------------------------------- one way to say a thing, every default once
def defaults_of(source) -> dict:
    """Field defaults of a config dataclass, or keyword defaults of a function."""
    if dataclasses.is_dataclass(source):
        return {f.name: f.default for f in dataclasses.fields(source) if f.default is not dataclasses.MISSING}
    return {k: p.default for k, p in inspect.signature(source).parameters.items() if p.default is not p.empty}


def as_option_text(name, value):
    """A config default as the command line spells it: tuples comma-separated, the shard i/n."""
    if isinstance(value, tuple):
        return "/".join(map(str, value)) if name == "shard" else ",".join(map(str, value))
    return value


def option_sources() -> dict:
    """Command -> the configs (or functions) its options fill, in order of precedence."""
    from atcache.data.synthetic import make_demo_data
    from atcache.tools.bench import BenchConfig
    from atcache.tools.fidelity import FidelityConfig
    from atcache.settings import DemoConfig, DemoDataConfig, InspectConfig, StudyOutput, VisualizeConfig, VocConfig
    from atcache.tools.study import StudyConfig
    from atcache.tools.visualize import visualize_cache

    for function, config in [(make_demo_data, DemoDataConfig), (visualize_cache, VisualizeConfig)]:
        given, wanted = defaults_of(function), defaults_of(config)  # the library functions' defaults are the config's
        assert {k: given[k] for k in wanted if k in given} == {k: wanted[k] for k in wanted if k in given}
    train = [RunSettings, DistillSettings]
    return {"make-demo-data": [DemoDataConfig], "prepare-voc": [VocConfig], "build-cache": [BuildConfig],
            "train": train, "train-from-cache": train, "train-online": train, "demo": [DemoConfig],
            "study": [StudyOutput, StudyConfig], "bench": [BenchConfig], "inspect": [InspectConfig],
            "visualize": [VisualizeConfig], "fidelity": [FidelityConfig]}


CLI_ONLY = {  # (command, option) -> why its default is not its config field's
    ("train-online", "layers"): "DistillSettings has no default layers; online AT takes the reference setup's six",
}


def test_every_option_default_is_its_config_default():
    """A typer default equals the default of the config field of the same name (None: 'not given', derived at run
    time; False: a flag that is off); the few without a field are listed with the reason. Every option says what it
    is (a non-empty --help)."""
    sources = option_sources()
    commands = typer.main.get_command(app).commands
    assert list(commands) == COMMANDS and set(sources) == set(COMMANDS)
    checked = 0
    for name, command in commands.items():
        fields = {}
        for source in reversed(sources[name]):
            fields.update(defaults_of(source))
        for param in command.params:
            if param.param_type_name == "option":
                assert (param.help or "").strip(), f"{name} --{param.name} has no help"
            if param.param_type_name != "option" or param.required or param.default is None or param.default is False:
                continue
            if param.name == "help" or (name, param.name) in CLI_ONLY:
                continue
            assert param.name in fields, f"{name} --{param.name}: default {param.default!r} has no config field"
            got = str(param.default) if isinstance(param.default, Path) else param.default
            assert got == as_option_text(param.name, fields[param.name]), f"{name} --{param.name}"
            checked += 1
    assert checked > 60
    online = {p.name: p.default for p in commands["train-online"].params}
    assert online["layers"] == ",".join(map(str, BuildConfig.layers))  # the CLI_ONLY one: the reference layers


def test_device_default_is_the_same_everywhere():
    """Every --device defaults to '' (CUDA device 0 if there is one, else the CPU) and says so."""
    seen = 0
    for name, command in typer.main.get_command(app).commands.items():
        for param in command.params:
            if param.name == "device":
                assert param.default == AUTO_DEVICE and "CUDA device 0 if there is one" in param.help, name
                seen += 1
    assert seen == 8


def test_the_cache_is_spelled_cache_everywhere(built_cache):
    """--cache in every command that takes a cache; inspect and visualize also take it positionally."""
    for name, command in typer.main.get_command(app).commands.items():
        opts = {o for p in command.params if p.param_type_name == "option" for o in p.opts}
        assert ("--cache" in opts) == (name in ("train-from-cache", "inspect", "visualize", "fidelity")), name
    by_option, positional = run("inspect", "--cache", built_cache), run("inspect", built_cache)
    assert by_option.exit_code == positional.exit_code == 0 and by_option.output == positional.output
    assert run("inspect", built_cache, "--cache", built_cache).exit_code == 0
    assert_one_line_error(run("inspect"), "no cache given", "--cache")
    assert_one_line_error(run("inspect", built_cache, "--cache", "other.zarr"), "two caches given")


def test_version_is_written_once():
    result = run("--version")
    assert result.exit_code == 0 and result.output.strip() == f"atcache {__version__}"
    pyproject = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    assert 'dynamic = ["version"]' in pyproject and 'attr = "atcache.version.__version__"' in pyproject
    assert "\nversion = " not in pyproject.split("[tool.setuptools.dynamic]")[0]
    done = subprocess.run([sys.executable, "-m", "atcache", "--version"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == f"atcache {__version__}"


def test_help_speaks_of_the_product():
    for command in [None, *COMMANDS]:
        out = run(*([command] if command else []), "--help").output
        assert "seed's" not in out and "session" not in out.lower() and "issue" not in out.lower(), command


def test_the_cli_modules_are_short():
    import atcache.cli

    sizes = {p.name: len(p.read_text().splitlines()) for p in Path(atcache.cli.__file__).parent.glob("*.py")}
    assert {"__init__.py", "options.py", "cache.py", "train.py", "tools.py"} <= set(sizes)
    # the options are the config dataclasses' fields, not written here; what the CLI itself holds: parsing errors and
    # signals as one line, key=value words checked by ultralytics, devices checked before any work
    assert sum(sizes.values()) < 450, sizes
