"""Integrity: every chunk decodes and no done row holds NaN/Inf, found per unit from block reads; verify's tasks carry
a unit range and a path, not the store or its masks."""

import pickle

import numpy as np

from atcache.cache import inspect, integrity
from atcache.cache.integrity import damaged_chunks, unit_problems
from helpers import fake_spec, fake_store, seed_layers


def damaged(tmp_path):
    store = fake_store(tmp_path / "c.zarr", fake_spec(seed_layers(64)[:2], n_rows=40, chunk_rows=4, imgsz=64))
    f = tmp_path / "c.zarr" / "maps" / "6" / "c" / "5" / "0" / "0"  # rows 20-23
    raw = bytearray(f.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    f.write_bytes(bytes(raw))
    norms = store.array("norms/8")
    norms[13] = np.nan  # a done row of chunk 3
    return store


def test_block_reads_find_each_problem_in_its_unit(tmp_path):
    store = damaged(tmp_path)
    problems = unit_problems(store, 0, 10)
    assert [(name, k) for name, k, _ in problems] == [("maps/6", 5), ("norms/8", 3)]
    assert "checksum mismatch" in problems[0][2] and problems[1][2] == "1 done rows are not finite (first row 13)"
    assert sorted(unit_problems(store, 0, 4) + unit_problems(store, 4, 10)) == sorted(problems)  # any split
    assert unit_problems(store, 6, 10) == []
    assert damaged_chunks(store, range(10)) == {3: ["norms/8"], 5: ["maps/6"]}


def test_runs_hold_at_most_run_units_and_find_the_same(tmp_path, monkeypatch):
    """A task's memory is one run of units, not an epoch's rows: runs are capped, and the findings do not change."""
    store = damaged(tmp_path)
    whole = unit_problems(store, 0, 10)
    monkeypatch.setattr(integrity, "RUN_UNITS", 3)
    assert [units for _, units in integrity._unit_runs(store, 0, 10)] == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]
    assert unit_problems(store, 0, 10) == whole


def test_verify_tasks_carry_a_path_and_a_unit_range(tmp_path, monkeypatch):
    store = damaged(tmp_path)
    calls = []
    real = inspect._verify_units
    monkeypatch.setattr(inspect, "_verify_units", lambda *args: calls.append(args) or real(*args))
    monkeypatch.setattr(inspect, "VERIFY_UNITS_PER_TASK", 3)
    found = inspect.verify_cache(store.path, workers=1)
    assert [(c["array"], c["chunk"], c["rows"]) for c in found] == [("norms/8", 3, [12, 16]), ("maps/6", 5, [20, 24])]
    ranges = sorted(c[1:] for c in calls)
    assert ranges[0][0] == 0 and ranges[-1][1] == 10 and all(r[1] == n[0] for r, n in zip(ranges, ranges[1:]))
    assert len(ranges) > 1 and all(b - a <= 3 for a, b in ranges)
    assert all(len(pickle.dumps(c)) < 300 for c in calls)
