"""atcache builds its datasets and transforms as what they are: no class is swapped on a live object and none is made
at run time; the tracked pipeline is a copy of ultralytics' with its sharing kept."""

import ast
from pathlib import Path

import atcache

SOURCES = Path(atcache.__file__).parent


def _offences(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        targets = []
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
            targets = [node.target]
        for t in targets:
            for sub in ast.walk(t):
                if isinstance(sub, ast.Attribute) and sub.attr == "__class__":
                    found.append(f"{path}:{node.lineno}: assignment to .__class__")
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "type" \
                and len(node.args) == 3:
            found.append(f"{path}:{node.lineno}: type(name, bases, dict)")
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "setattr" \
                and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant) and node.args[1].value == "__class__":
            found.append(f"{path}:{node.lineno}: setattr(..., '__class__', ...)")
    return found


def test_no_class_is_swapped_or_made_at_run_time():
    offences = [o for path in sorted(SOURCES.rglob("*.py")) for o in _offences(path)]
    assert not offences, "\n".join(offences)


def test_the_check_finds_both_forms(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("x.__class__ = int\nC = type('C', (object,), {})\nsetattr(x, '__class__', int)\n")
    assert len(_offences(bad)) == 3


def test_the_tracked_pipeline_is_a_copy_that_keeps_ultralytics_sharing(voc_yaml):
    from helpers import train_dataset
    from atcache.train.transforms import TRACKED, tracked_pipeline
    from atcache.yolo import Compose, MixUp

    ds = train_dataset(voc_yaml, mixup=0.5)[0]
    original = ds.transforms
    tracked = tracked_pipeline(original)

    def walk(t, out):
        if t is None or any(t is x for x in out):
            return out
        out.append(t)
        for child in (t.transforms if isinstance(t, Compose) else []):
            walk(child, out)
        walk(getattr(t, "pre_transform", None), out)
        return out

    before, after = walk(original, []), walk(tracked, [])
    assert len(before) == len(after)  # shared transforms stay shared, none is duplicated
    assert not {id(t) for t in before} & {id(t) for t in after}  # all new objects
    assert not any(type(t) in TRACKED for t in after)  # every geometric transform is tracked
    assert all(type(t) in TRACKED for t in before if isinstance(t, tuple(TRACKED)))  # the original is untouched
    mixup = next(t for t in after if isinstance(t, MixUp))
    assert mixup.pre_transform is tracked.transforms[0]  # MixUp draws its partner through the same tracked Compose
