"""The shape of the code: the import contracts in pyproject hold (layers, no cycles, zarr only in atcache.cache,
ultralytics only through atcache.yolo) and only atcache.yolo touches ultralytics' internals; the inspection path stays
free of torch and ultralytics; every command that touches ultralytics writes nothing outside its folders and downloads
nothing; no module or tracked file grows too big."""

import ast
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


# ------------------------------------------------------------------ ultralytics internals only in the adapter
# what ultralytics' transforms hand apply_image (params keys, mix partners), the transform fields atcache once read
# and the dataset's label keys it reads (atcache.yolo.transforms, atcache.yolo.datasets)
TRANSFORM_FIELDS = frozenset({"M", "r", "flip", "direction", "new_unpad", "left", "top", "layout", "labels_patch",
                              "padw", "padh", "border", "mix_labels", "pre_transform", "buffer_enabled",
                              "resized_shape"})
ADAPTER = "atcache.yolo"


def _dotted(node) -> str:
    """'a.b.c' of a Name/Attribute chain, '' for anything else."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    return ".".join([node.id, *reversed(parts)]) if isinstance(node, ast.Name) else ""


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


class _Internals:
    """One module's walk for `internals_offences` (see the guard's docstring for the rules)."""

    def __init__(self, tree: ast.Module, derived: frozenset):
        self.found: list[tuple[int, str]] = []
        self.called = {id(n.func) for n in ast.walk(tree) if isinstance(n, ast.Call)}  # x.f of each x.f(...)
        self.adapter_modules: set[str] = set()  # local names bound to atcache.yolo (or a submodule)
        self.names: set[str] = set()  # local names holding ultralytics objects (or atcache classes derived from them)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                for a in node.names:
                    if node.module == ADAPTER or node.module.startswith(ADAPTER + "."):
                        self.names.add(a.asname or a.name)
                        if _private(a.name):
                            self._report(node, f"imports {node.module}.{a.name}, a private name of the adapter")
                    elif f"{node.module}.{a.name}" in derived:
                        self.names.add(a.asname or a.name)
                    elif node.module == "atcache" and a.name == "yolo":
                        self.adapter_modules.add(a.asname or a.name)
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.asname and (a.name == ADAPTER or a.name.startswith(ADAPTER + ".")):
                        self.adapter_modules.add(a.asname)
        self.classes: dict[str, tuple[bool, set]] = {}  # class -> (derived?, the names it assigns or defines)
        for _ in range(8):  # names assigned from ultralytics objects, derived classes: to a fixed point
            before = (len(self.names), sum(d for d, _ in self.classes.values()))
            self._visit(tree, None, report=False)
            if (len(self.names), sum(d for d, _ in self.classes.values())) == before:
                break
        self._visit(tree, None, report=True)

    def _report(self, node, message: str) -> None:
        self.found.append((node.lineno, message))

    # ---- what holds an ultralytics object
    def _ultra(self, node, cls) -> bool:
        derived = cls is not None and self.classes[cls][0]
        if isinstance(node, ast.Name):
            return node.id in self.names or (derived and node.id in ("self", "cls"))
        if isinstance(node, ast.Attribute):
            dotted = _dotted(node)
            if dotted.startswith(ADAPTER + ".") or dotted.split(".")[0] in self.adapter_modules:
                return True
            if isinstance(node.value, ast.Name) and node.value.id == "self" and cls is not None:
                return derived and node.attr not in self.classes[cls][1]  # a field of ultralytics', not atcache's
            return self._ultra(node.value, cls)
        if isinstance(node, ast.Subscript):
            return self._ultra(node.value, cls)
        if isinstance(node, ast.Call):
            if isinstance(node.func, ast.Name) and node.func.id == "super":
                return derived
            return self._ultra(node.func, cls)
        return False

    def _bind(self, target, value, cls) -> None:
        if value is not None and self._ultra(value, cls):
            self.names.update(n.id for n in ast.walk(target) if isinstance(n, ast.Name))

    # ---- the walk
    def _visit(self, node, cls, report: bool) -> None:
        if isinstance(node, ast.ClassDef):
            derived = any(self._ultra(b, cls) for b in node.bases)
            own = set()
            for sub in ast.walk(node):
                if isinstance(sub, (ast.Assign, ast.AugAssign, ast.AnnAssign)):
                    for t in sub.targets if isinstance(sub, ast.Assign) else [sub.target]:
                        for n in ast.walk(t):
                            if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id == "self":
                                own.add(n.attr)
                            elif isinstance(n, ast.Name) and sub in node.body:
                                own.add(n.id)
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    own.add(item.name)
                    if report and derived and _private(item.name):
                        self._report(item, f"{node.name}.{item.name}: a private method in a class with bases from "
                                           f"{ADAPTER} (overrides, or may collide with, ultralytics' private API)")
            self.classes[node.name] = (derived, own)
            if derived:
                self.names.add(node.name)
            for child in node.body:
                self._visit(child, node.name, report)
            return
        if isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            for t in node.targets if isinstance(node, ast.Assign) else [node.target]:
                self._bind(t, node.value, cls)
        elif isinstance(node, (ast.For, ast.AsyncFor, ast.comprehension)):
            self._bind(node.target, node.iter, cls)
        elif isinstance(node, ast.withitem) and node.optional_vars is not None:
            self._bind(node.optional_vars, node.context_expr, cls)
        elif isinstance(node, ast.NamedExpr):
            self._bind(node.target, node.value, cls)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "isinstance" \
                and len(node.args) == 2 and isinstance(node.args[0], ast.Name):
            kinds = node.args[1].elts if isinstance(node.args[1], ast.Tuple) else [node.args[1]]
            if any(self._ultra(k, cls) for k in kinds):
                self.names.add(node.args[0].id)  # narrowed to an ultralytics class
        if report:
            self._check(node, cls)
        for child in ast.iter_child_nodes(node):
            self._visit(child, cls, report)

    def _check(self, node, cls) -> None:
        if isinstance(node, ast.Call):
            name = node.func.id if isinstance(node.func, ast.Name) else ""
            attr = node.func.attr if isinstance(node.func, ast.Attribute) else ""
            key = node.args[1] if name in ("getattr", "setattr", "hasattr", "delattr") and len(node.args) > 1 else \
                node.args[0] if attr in ("get", "pop", "setdefault") and node.args else None
            if isinstance(key, ast.Constant) and isinstance(key.value, str):
                if key.value in TRANSFORM_FIELDS:
                    self._report(node, f"{name or attr}(..., {key.value!r}): ultralytics internal '{key.value}'")
                elif name and _private(key.value) and self._ultra(node.args[0], cls):
                    self._report(node, f"{name}(..., {key.value!r}): private attribute of an ultralytics object")
            if name == "ultralytics_attr" or attr == "ultralytics_attr":
                self._report(node, "ultralytics_attr(...): the adapter's own door into ultralytics' modules")
        elif isinstance(node, ast.Subscript):
            key = node.slice
            if isinstance(key, ast.Constant) and isinstance(key.value, str) and key.value in TRANSFORM_FIELDS:
                self._report(node, f"[{key.value!r}]: ultralytics internal '{key.value}'")
        elif isinstance(node, ast.Attribute):
            own = isinstance(node.value, ast.Name) and node.value.id == "self" and cls is not None \
                and node.attr in self.classes[cls][1]
            if node.attr in TRANSFORM_FIELDS:
                if node.attr == "flip" and id(node) in self.called:
                    return  # torch's or numpy's flip(), not RandomFlip's field
                if _dotted(node.value).split(".")[0] == "atcache":
                    return  # a module path: atcache.cache.layout
                if own and not self.classes[cls][0]:
                    return  # atcache's own class's field
                self._report(node, f".{node.attr}: ultralytics internal '{node.attr}'")
            elif _private(node.attr):
                if own and isinstance(node.value, ast.Name):
                    return  # atcache's own private field or method (a private method def is reported as such)
                if self._ultra(node.value, cls):
                    self._report(node, f".{node.attr}: private attribute of an ultralytics object")


def internals_offences(source: str, path: str, derived: frozenset = frozenset()) -> list[str]:
    """'path:line: what' for each use of an ultralytics internal in one module's source (rules: the guard's
    docstring); `derived`: qualified names of classes elsewhere whose bases come from atcache.yolo."""
    walk = _Internals(ast.parse(source, path), derived)
    return [f"{path}:{line}: {what}" for line, what in sorted(set(walk.found))]


def _package_offences() -> list[str]:
    modules = {p: ".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
               for p in sorted(PACKAGE.rglob("*.py")) if p.relative_to(PACKAGE).parts[0] not in ("yolo", "yolo.py")}
    trees = {p: ast.parse(p.read_text(), str(p)) for p in modules}
    derived: set[str] = set()
    for _ in range(5):  # classes derived from ultralytics ones, across the package's modules
        more = {f"{modules[p]}.{name}" for p, tree in trees.items()
                for name, (d, _) in _Internals(tree, frozenset(derived)).classes.items() if d}
        if more <= derived:
            break
        derived |= more
    return [o for p in modules for o in internals_offences(p.read_text(), str(p.relative_to(PACKAGE.parent)),
                                                           frozenset(derived))]


def test_only_the_adapter_touches_ultralytics_internals():
    """Only atcache.yolo (the adapter: atcache/yolo/**) uses ultralytics beyond its documented public API; every other
    module of atcache goes through the adapter's named functions. An ast walk of each such module flags:

    (a) ultralytics' transform internals: an attribute named like one of TRANSFORM_FIELDS (`x.M`, `t.buffer_enabled =
        ...`), a subscript, get/pop/setdefault or get/set/has/delattr with such a string key (`params["M"]`,
        `labels["mix_labels"]`). Not flagged: `.flip(...)` calls (torch's and numpy's flip), dotted atcache module
        paths (`atcache.cache.layout`), and `self.<field>` in a class without ultralytics bases that assigns it (an
        atcache class's own field; rename one that collides elsewhere);
    (b) a method named `_...` (not a dunder) defined in a class whose bases come from atcache.yolo, directly or through
        atcache classes derived from them (anywhere in the package): a private override;
    (c) a private attribute (`._name`, or get/set/has/delattr of "_name") of an object known to be ultralytics': a name
        imported from atcache.yolo (its re-exports, its submodules' names), a name assigned from one (`m = YOLO(...)`,
        `x = m.model`; tracked per module, not per scope), a name narrowed by isinstance to one, `super()` in a derived
        class, and `self` / `self.<field>` in a derived class unless the class itself assigns that name (atcache's own
        private field; its own private methods are reported by (b)). Also: importing a private name of the adapter, and
        calling its `ultralytics_attr` (the adapter's own door into ultralytics' modules).
    Each finding is 'file:line: what', naming the attribute."""
    offences = _package_offences()
    assert not offences, "ultralytics internals outside atcache.yolo (move each into a named adapter function):\n" + \
        "\n".join(offences)


CHECKER_EXAMPLE = """
from atcache.yolo import DetectionTrainer, Mosaic, YOLODataset
import atcache.cache.layout


class Trainer(DetectionTrainer):
    def _setup_train(self):
        super()._setup_train()
        self._armed = True
        return self._armed, self._do_train(), self.model._private


class Own:
    def __init__(self, direction):
        self.direction = direction

    def rows(self):
        return self.direction, atcache.cache.layout, images.flip(-1)


def apply(params, labels, t):
    x = params["M"], labels["mix_labels"][0], getattr(t, "pre_transform", None)
    if isinstance(t, Mosaic):
        t.buffer_enabled = False
        t._hidden = 1
    ds = YOLODataset(img_path="x")
    return ds._data, YOLODataset._internal, x.top
"""


def test_the_internals_guard_finds_each_kind_and_names_it():
    """The guard's checker on made-up source: one finding per violation, with its line and attribute; atcache's own
    fields, torch's flip() and module paths pass."""
    found = internals_offences(CHECKER_EXAMPLE, "example.py")
    expected = [(7, "Trainer._setup_train: a private method"), (8, "._setup_train"), (10, "._do_train"),
                (10, "._private"), (22, "['M']"), (22, "['mix_labels']"), (22, "getattr(..., 'pre_transform')"),
                (24, ".buffer_enabled"), (25, "._hidden"), (27, "._data"), (27, "._internal"), (27, ".top")]
    assert len(found) == len(expected), "\n".join(found)
    for line, what in expected:
        assert any(f.startswith(f"example.py:{line}: {what}") for f in found), (line, what, found)
    assert not any(":18:" in f or ":15:" in f for f in found), found  # Own.direction, flip(), atcache.cache.layout


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
