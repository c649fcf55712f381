"""Builders' claims: one record per builder whatever the number of units it owns, overlapping claims never both
proceed (also when they race, also on S3), dead builders' claims are taken over."""

import json

import pytest

from atcache.cache.claims import LOCK_PREFIX, ChunkClaim, unit_ranges
from atcache.cache.store import CacheStore
from atcache.errors import AtcacheError
from helpers import fake_spec, race_claims, race_creation, seed_layers


@pytest.fixture
def store(tmp_path):
    spec = fake_spec(seed_layers(64)[:2], n_rows=4000, chunk_rows=1, imgsz=64)  # 4,000 row-chunks
    return CacheStore.create(tmp_path / "c.zarr", spec, [f"images/{i:05d}.jpg" for i in range(4000)])


def test_unit_ranges():
    assert unit_ranges([5, 1, 2, 3, 9, 10, 2]) == [[1, 4], [5, 6], [9, 11]]
    assert unit_ranges([]) == []


def test_one_record_for_thousands_of_units(store):
    with ChunkClaim(store, [k for k in range(4000) if k % 1000]) as claim:
        names = store.location.list(LOCK_PREFIX)
        assert names == [claim.key] and len(claim.held) == 3996
        assert json.loads(store.location.read(claim.key))["ranges"] == [[1, 1000], [1001, 2000], [2001, 3000],
                                                                         [3001, 4000]]
        with ChunkClaim(store, [1000, 2000, 3000]):  # the gaps: disjoint, fine
            assert len(store.location.list(LOCK_PREFIX)) == 2
        with pytest.raises(AtcacheError, match="row-chunk 3999 .* is being built by pid"):
            ChunkClaim(store, [3999]).acquire()
    assert not store.location.list(LOCK_PREFIX)


def test_shards_started_together_on_a_new_store_all_join_it(tmp_path):
    """Four shards creating the same new store at once: one creates it, the others wait for its spec and join
    (none mistakes the store being created for foreign content)."""
    spec = fake_spec(seed_layers(64)[:2], n_rows=40, chunk_rows=4, imgsz=64)
    files = [f"images/{i:05d}.jpg" for i in range(40)]
    for trial in range(30):
        stores, errors = race_creation(tmp_path / f"new{trial}.zarr", spec, files)
        assert not errors and len(stores) == 4, (trial, errors)
        assert all(s.spec == spec for s in stores)
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("not a store")
    stores, errors = race_creation(tmp_path / "foreign", spec, files, builders=2)
    assert not stores and all("is not an atcache store" in str(e) for e in errors) and len(errors) == 2


def test_racing_overlapping_claims_never_both_proceed(store):
    for trial in range(20):
        got = race_claims(store, (0, 50, 90))
        assert len(got) == 1, (trial, [c.chunks[0] for c in got])  # every two of the three overlap
        for c in got:
            c.release()
        assert not store.location.list(LOCK_PREFIX)


def test_a_dead_builders_claim_is_taken_over_and_swept(store, tmp_path):
    import subprocess
    import sys

    dead_pid = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                                  text=True).stdout)
    dead = ChunkClaim(store, range(0, 10))
    dead.record = {**dead.record, "pid": dead_pid}
    dead.acquire()
    dead._released.set()
    other = ChunkClaim(store, range(500, 510))
    other.record = {**other.record, "pid": dead_pid}
    other.acquire()
    other._released.set()
    with ChunkClaim(store, range(5, 20)) as mine:  # overlaps the first: taken over; the second is swept
        assert store.location.list(LOCK_PREFIX) == [mine.key]
