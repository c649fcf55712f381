import numpy as np
import pytest
import zarr

from atcache.errors import AtcacheError
from atcache.cache.format import CacheSpec, LayerSpec
from atcache.cache.claims import chunks_for_shard
from atcache.cache.store import CacheStore
from helpers import fake_spec, random_chunk


def make_spec(n_rows=10, chunk_rows=4, imgsz=64, teacher="abc"):
    layers = (LayerSpec(6, 16, 8, 4, 4), LayerSpec(8, 32, 16, 2, 2))
    return fake_spec(layers, n_rows, chunk_rows, imgsz=imgsz, teacher=teacher)


def chunk(store, k, seed=0):
    return random_chunk(store.spec, *store.chunk_range(k), np.random.default_rng(seed + k))


FILES = [f"images/train2012/{i:03d}.jpg" for i in range(10)]


def test_roundtrip_with_plain_zarr(tmp_path):
    store = CacheStore.create(tmp_path / "c.zarr", make_spec(), FILES)
    assert store.n_chunks == 3 and store.chunk_range(2) == (8, 10)
    written = {k: chunk(store, k) for k in (0, 2)}
    for k, d in written.items():
        store.write_chunk(k, d)
    g = zarr.open_group(str(tmp_path / "c.zarr"), mode="r")
    assert g.metadata.zarr_format == 3
    assert list(g["files"][:]) == FILES
    assert g["maps/6"].dtype == np.float16 and g["maps/6"].chunks == (4, 4, 4)
    np.testing.assert_array_equal(g["maps/8"][8:10], written[2].maps[8])
    np.testing.assert_array_equal(g["norms/6"][0:4], written[0].norms[6])
    np.testing.assert_array_equal(g["done"][:], [True] * 4 + [False] * 4 + [True] * 2)
    assert np.isnan(g["maps/6"][4:8]).all() and np.isnan(g["norms/8"][4:8]).all()  # unwritten rows read as NaN
    spec = CacheSpec.from_dict(g.attrs["atcache"])
    assert spec == store.spec
    assert CacheStore.open(tmp_path / "c.zarr").complete_chunks().tolist() == [True, False, True]


def test_checksums_detect_flipped_bytes(tmp_path):
    store = CacheStore.create(tmp_path / "c.zarr", make_spec(), FILES)
    store.write_chunk(0, chunk(store, 0))
    f = tmp_path / "c.zarr" / "maps" / "6" / "c" / "0" / "0" / "0"
    raw = bytearray(f.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    f.write_bytes(bytes(raw))
    with pytest.raises(Exception, match="checksum"):
        zarr.open_group(str(tmp_path / "c.zarr"), mode="r")["maps/6"][0:4]


def test_corrupt_done_chunk_counts_as_not_done(tmp_path):
    store = CacheStore.create(tmp_path / "c.zarr", make_spec(), FILES)
    for k in range(3):
        store.write_chunk(k, chunk(store, k))
    (tmp_path / "c.zarr" / "done" / "c" / "1").write_bytes(b"garbage")
    assert store.complete_chunks().tolist() == [True, False, True]


def test_existing_store_is_never_clobbered(tmp_path):
    path = tmp_path / "c.zarr"
    store = CacheStore.open_or_create(path, make_spec(), FILES, resume=False, overwrite=False, join=False)
    store.write_chunk(0, chunk(store, 0))
    with pytest.raises(AtcacheError, match="already exists.*--resume.*--overwrite"):
        CacheStore.open_or_create(path, make_spec(), FILES, resume=False, overwrite=False, join=False)
    again = CacheStore.open_or_create(path, make_spec(), FILES, resume=True, overwrite=False, join=False)
    assert again.done_mask()[:4].all()
    fresh = CacheStore.open_or_create(path, make_spec(), FILES, resume=False, overwrite=True, join=False)
    assert not fresh.done_mask().any()


@pytest.mark.parametrize("change,field", [({"imgsz": 128}, "imgsz"), ({"teacher": "other"}, "teacher_sha256")])
def test_resume_refuses_other_settings(tmp_path, change, field):
    path = tmp_path / "c.zarr"
    CacheStore.open_or_create(path, make_spec(), FILES, resume=False, overwrite=False, join=False)
    with pytest.raises(AtcacheError, match=f"different settings \\({field}"):
        CacheStore.open_or_create(path, make_spec(**change), FILES, resume=True, overwrite=False, join=False)
    with pytest.raises(AtcacheError, match="other images"):
        CacheStore.open_or_create(path, make_spec(), FILES[::-1], resume=True, overwrite=False, join=False)


def test_open_errors(tmp_path):
    with pytest.raises(AtcacheError, match="does not exist"):
        CacheStore.open(tmp_path / "missing.zarr")
    zarr.open_group(str(tmp_path / "plain.zarr"), mode="w")
    with pytest.raises(AtcacheError, match="no atcache spec"):
        CacheStore.open(tmp_path / "plain.zarr")
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "thesis.tex").write_text("x")
    with pytest.raises(AtcacheError, match="not an atcache store"):
        CacheStore.open_or_create(tmp_path / "precious", make_spec(), FILES, resume=True, overwrite=False, join=False)
    with pytest.raises(AtcacheError, match="refusing to delete"):
        CacheStore.open_or_create(tmp_path / "precious", make_spec(), FILES, resume=False, overwrite=True, join=False)
    assert (tmp_path / "precious" / "thesis.tex").exists()


def test_format_version_is_checked(tmp_path):
    store = CacheStore.create(tmp_path / "c.zarr", make_spec(), FILES)
    d = store.spec.to_dict()
    d["format_version"] = 99
    store.group.attrs["atcache"] = d
    with pytest.raises(AtcacheError, match="written in store format 99; this atcache reads format 3: rebuild"):
        CacheStore.open(tmp_path / "c.zarr")


@pytest.mark.parametrize("n_chunks,n", [(10, 3), (3, 3), (7, 1), (2, 4)])
def test_shards_are_disjoint_and_cover(n_chunks, n):
    seen = [k for i in range(n) for k in chunks_for_shard(n_chunks, i, n)]
    assert sorted(seen) == list(range(n_chunks)) and len(seen) == len(set(seen))
    with pytest.raises(AtcacheError):
        chunks_for_shard(n_chunks, n, n)


def test_replay_done_is_the_units_written_whole(tmp_path):
    """replay_done lists the done chunks: exactly the units written (whole), equal to decoding replay/done."""
    import dataclasses

    from atcache.cache.format import ReplaySpec

    replay = ReplaySpec(epochs=2, aug_seed=0, samples=10, chunk_rows=4, files_sha256="x", augment={})
    store = CacheStore.create(tmp_path / "r.zarr", dataclasses.replace(make_spec(), replay=replay), FILES)
    rng = np.random.default_rng(0)

    def write(u):
        e, a, b = store.replay_unit(u)
        layers = store.spec.layers
        store.write_replay(u, {s.index: rng.random((b - a, s.height, s.width)).astype(np.float16) for s in layers},
                           {s.index: np.ones(b - a, np.float32) for s in layers}, np.arange(a, b), np.arange(a, b))

    assert store.n_units == 3 + 6 and not store.replay_done().any()
    for u in (3, 5, 7):  # epoch 0 positions 0-3 and 8-9, epoch 1 positions 4-7
        write(u)
    (tmp_path / "r.zarr" / "replay" / "done" / "c" / "1" / "2.1234.partial").write_bytes(b"in flight")
    expected = np.zeros((2, 10), bool)
    expected[0, 0:4] = expected[0, 8:10] = expected[1, 4:8] = True
    np.testing.assert_array_equal(store.replay_done(), expected)
    np.testing.assert_array_equal(zarr.open_group(str(tmp_path / "r.zarr"))["replay/done"][:], expected)
    assert store.complete_units().tolist() == [False] * 3 + [True, False, True, False, True, False]
