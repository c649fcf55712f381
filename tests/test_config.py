"""The one serialized form of the configs: every field survives the trip to a child process."""

import dataclasses
import json
import re
from types import SimpleNamespace

import pytest

from atcache.config import (BuildConfig, DistillSettings, check_replay, check_shard, check_targets, parse_layers,
                            parse_shard)
from atcache.errors import AtcacheError


def _all_changed(cls, **required):
    """An instance where every field differs from its default (so a field that falls back to it shows)."""
    values = dict(required)
    for f in dataclasses.fields(cls):
        if f.name in values:
            continue
        default = f.default
        if isinstance(default, bool):
            values[f.name] = not default
        elif isinstance(default, (int, float)) and not isinstance(default, bool):
            values[f.name] = default + 3
        elif f.metadata.get("choices"):  # another valid choice (a changed string would be refused)
            values[f.name] = next(c for c in f.metadata["choices"] if c != default)
        elif isinstance(default, str):
            values[f.name] = default + "x"
        elif f.name == "layers":
            values[f.name] = ((4, 6), (8, 8)) if cls is DistillSettings else (2, 4)
        elif f.name == "shard":
            values[f.name] = (1, 3)
        elif f.name == "ram_budget_gb":
            values[f.name] = 1.5
        elif f.name == "stream":
            values[f.name] = False
        elif f.name == "aug_seed":
            values[f.name] = 7
        elif f.name == "gradient_stride" and default is None:
            values[f.name] = 4
        elif f.name == "augment":
            values[f.name] = (("mosaic", 0.5), ("fliplr", 0.0))
        elif f.name == "gradient_gains":
            values[f.name] = (7.5, 0.5, 1.5)
        else:
            raise AssertionError(f"no test value for {cls.__name__}.{f.name}")
    return cls(**values)


@pytest.mark.parametrize("cls,required", [(BuildConfig, {"teacher": "t.pt", "data": "d.yaml", "out": "c.zarr"}),
                                          (DistillSettings, {})])
def test_every_field_survives_json(cls, required):
    cfg = _all_changed(cls, **required)
    assert all(getattr(cfg, f.name) != f.default for f in dataclasses.fields(cls) if f.name not in required)
    again = cls.from_json(cfg.to_json())
    assert again == cfg and type(again.layers) is tuple
    if cls is DistillSettings:
        assert again.at_norm == "per-image" and DistillSettings().at_norm == "batch"


def test_layer_and_shard_parsing():
    assert parse_layers("6, 8,13") == (6, 8, 13)
    assert parse_layers("4:6,8", pairs=True) == ((4, 6), (8, 8))
    assert parse_shard("1/4") == (1, 4)
    with pytest.raises(AtcacheError, match="comma-separated list of layer indices, e.g. 6,8,13,16,19,22"):
        parse_layers("6,x")
    with pytest.raises(AtcacheError, match="student:cache pairs"):
        parse_layers("4:x", pairs=True)
    with pytest.raises(AtcacheError, match="empty"):
        parse_layers(",")
    with pytest.raises(AtcacheError, match="out of range"):
        parse_shard("4/4")


def test_each_check_is_one_function():
    """The shard range, the target mode (and rect) and the replay settings: one function each, one message."""
    assert check_shard(3, 4) == (3, 4)
    for i, n in [(4, 4), (-1, 2), (0, 0)]:
        with pytest.raises(AtcacheError, match=f"--shard {i}/{n} is out of range"):
            check_shard(i, n)
    check_targets("replay")
    with pytest.raises(AtcacheError, match="--targets 'wrap' is unknown; choose warp, static or replay"):
        check_targets("wrap")
    with pytest.raises(AtcacheError, match="rect=True training is not supported with cached targets"):
        check_targets("warp", rect=True)
    replay = SimpleNamespace(augment={"mosaic": 1.0, "epochs": 2}, epochs=2)
    assert check_replay("c.zarr", replay, {"lr0": 0.1, "epochs": 2}) == {"mosaic": 1.0, "epochs": 2, "lr0": 0.1}
    with pytest.raises(AtcacheError, match=r"mosaic=0.5 differs from the replay arrays of cache c.zarr, built with "
                                           r"mosaic=1.0; .*--replay-epochs 2 mosaic=0.5"):
        check_replay("c.zarr", replay, {"mosaic": 0.5})
    with pytest.raises(AtcacheError, match=r"cache c.zarr has no replay arrays; .*--replay-epochs E.*drop --epoch"):
        check_replay("c.zarr", None, {}, instead="drop --epoch")


@pytest.mark.parametrize("field, value, needle", [
    ("kind", "bogus", "--kind 'bogus' is unknown; choose one of sum_p, sum, max_p"),
    ("targets", "warped", "--targets 'warped' is unknown"),
    ("mode", "teacher", "--mode 'teacher' is unknown"),
    ("at_norm", "x", "--at-norm 'x' is unknown; choose one of batch, per-image"),
    ("at_weight", -1.0, "--at-weight -1.0 must be at least 0"),
    ("at_weight", float("nan"), "--at-weight nan is not a finite number"),
    ("gradient_weight", float("inf"), "--gradient-weight inf is not a finite number"),
    ("flip_weight", -0.1, "--flip-weight"),
    ("p", 0.0, "--p 0.0 is not above 0"),
    ("ram_budget_gb", -1.0, "--ram-budget"),
])
def test_settings_refuse_values_outside_what_their_options_take(field, value, needle):
    """A config checks its fields when it is made: the CLI, a child process (from_json) and a library call alike."""
    with pytest.raises(AtcacheError, match=re.escape(needle)):
        DistillSettings(**{field: value})
    good = DistillSettings(at_weight=0.0, flip_weight=2.5, p=1.0)
    with pytest.raises(AtcacheError, match=re.escape(needle)):
        DistillSettings.from_json(good.to_json().replace(f'"{field}": {json.dumps(getattr(good, field))}',
                                                         f'"{field}": {json.dumps(value)}'))
