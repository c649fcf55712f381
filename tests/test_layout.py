"""The shape of the code: no import cycles among atcache's modules (module-level and function-level imports alike),
and the inspection path stays free of torch and ultralytics."""

import ast
import json
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "atcache"


def import_graph() -> dict[str, set[str]]:
    """atcache module -> the atcache modules it imports anywhere in its source (`import`/`from`, any depth)."""
    modules = {p.stem for p in PACKAGE.glob("*.py")}
    graph = {}
    for path in PACKAGE.glob("*.py"):
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            for name in names:
                parts = name.split(".")
                if parts[0] == "atcache" and len(parts) > 1 and parts[1] in modules:
                    edges.add(parts[1])
                elif name == "atcache":  # the package itself: its __init__
                    edges.add("__init__")
        graph[path.stem] = edges - {path.stem}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle as [a, b, ..., a], or [] when the graph has none."""
    state: dict[str, int] = {}  # 1 on the stack, 2 finished
    stack: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return []

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return []


def test_the_import_graph_has_no_cycles():
    graph = import_graph()
    assert {"build", "runners", "compute", "store", "train"} <= graph.keys()
    assert find_cycle(graph) == [], " -> ".join(find_cycle(graph))


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) == []
    assert find_cycle({"a": {"a"}}) == ["a", "a"]


INSPECT = """
import json, sys
from typer.testing import CliRunner
from atcache.cli import app
result = CliRunner().invoke(app, ["inspect", sys.argv[1], "--verify", "--scheduler", "local:2", "--json", sys.argv[2]])
print(json.dumps({"exit_code": result.exit_code, "output": result.output,
                  "torch": "torch" in sys.modules, "ultralytics": "ultralytics" in sys.modules}))
"""


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
    import atcache

    for name in atcache.__all__:
        assert getattr(atcache, name) is not None, name
    assert atcache.open_cache.__module__ == "atcache.cache.inspect"
