"""The store is a plain citizen of the zarr ecosystem: xarray opens it whole (open_datatree) and per group (open_zarr)
with the values atcache reads, zarr lists it without a warning (the builders' ownership records are out of the
hierarchy, also while a build holds them), and a store of another format version (the retired format 2, a newer one)
is refused in one line."""

import dataclasses
import warnings

import numpy as np
import pytest
import xarray as xr
import zarr

from atcache.cache import arrays
from atcache.cache.layout import replay_array_names
from atcache.cache.claims import LOCK_PREFIX, ChunkClaim, claim_creation
from atcache.cache.format import FORMAT_VERSION, ReplaySpec, decode_maps
from atcache.cache.inspect import open_cache, verify_cache
from atcache.cache.location import Location
from atcache.cache.store import CacheStore
from atcache.errors import AtcacheError
from helpers import assert_one_line_error, fake_spec, fake_store, invoke, seed_layers

N_ROWS, CHUNK_ROWS = 12, 4
LAYERS = seed_layers(64)[:3]  # layers 6, 8, 13: grids 4x4, 2x2, 4x4
FILES = [f"images/{i:03d}.jpg" for i in range(N_ROWS)]


def make_store(path, dtype: str, replay: bool, gradient: bool = False) -> CacheStore:
    """A filled store of `dtype` maps; with `replay`, 2 epochs x 10 samples of replay arrays, all written (with
    `gradient`, input gradients at stride 16 too)."""
    spec = dataclasses.replace(fake_spec(LAYERS, N_ROWS, CHUNK_ROWS, imgsz=64), map_dtype=dtype,
                               gradient_stride=16 if gradient else 0)
    if replay:
        spec = dataclasses.replace(spec, replay=ReplaySpec(epochs=2, aug_seed=0, samples=10, chunk_rows=4,
                                                           files_sha256="synthetic", augment={}))
    store = fake_store(path, spec, files=FILES)
    rng = np.random.default_rng(1)
    for u in range(store.n_chunks, store.n_units):
        e, a, b = store.replay_unit(u)
        maps = {layer.index: rng.random((b - a, layer.height, layer.width)).astype(np.float32) for layer in LAYERS}
        norms = {layer.index: replay_norms(e, np.arange(a, b), layer.index) for layer in LAYERS}
        grad = (rng.random((b - a, 3, 4, 4)).astype(np.float16), replay_norms(e, np.arange(a, b), 99)) if gradient else None
        store.write_replay(u, maps, norms, np.arange(a, b), np.arange(a, b).astype(np.uint64), grad)
    return store


def replay_norms(epoch, positions, layer: int) -> np.ndarray:
    """The norms make_store writes for the replayed views: distinct per epoch, position and layer."""
    return (100 * epoch + positions + layer / 100).astype(np.float32)


def list_quietly(path) -> list[str]:
    """Every member of the hierarchy, listed by zarr with every warning an error."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        group = zarr.open_group(str(path), mode="r")
        return sorted(name for name, _ in group.members(max_depth=None))


@pytest.mark.parametrize("replay", [False, True], ids=["static", "replay"])
@pytest.mark.parametrize("dtype", ["float16", "uint8"])
def test_xarray_reads_what_atcache_reads(tmp_path, dtype, replay):
    path = tmp_path / "c.zarr"
    store = make_store(path, dtype, replay)
    view = open_cache(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tree = xr.open_datatree(str(path), engine="zarr", consolidated=False)
    uint8 = dtype == "uint8"
    np.testing.assert_array_equal(tree["files"].values.astype(object), view.files)
    np.testing.assert_array_equal(tree["done"].values, view.done)
    np.testing.assert_array_equal(tree["letterbox"].values, view.letterbox.values)
    assert tree["letterbox"].dims == ("row", "field")
    assert tree.attrs["atcache"]["format_version"] == FORMAT_VERSION == view.spec.format_version
    for layer in LAYERS:
        i = layer.index
        maps = tree[f"maps/{i}"]
        assert maps.dims == ("row", f"y_{i}", f"x_{i}") and maps.dtype == np.dtype(dtype)
        stored, norms, scales = store.read_stored_layer(i)
        np.testing.assert_array_equal(maps.values, stored)  # as stored
        np.testing.assert_array_equal(tree[f"norms/{i}"].values, view.norms[i].compute())
        scale = tree[f"scales/{i}"].values if uint8 else None
        if uint8:
            np.testing.assert_array_equal(scale, scales)
        np.testing.assert_array_equal(decode_maps(maps.values, scale), view.maps[i].compute())  # decoded
        if replay:  # one flat array of every layer's maps per view, and one of per-view statistics (attrs say where)
            o, h, w = next((o, h, w) for j, o, h, w in tree["replay/maps"].attrs["layers"] if j == i)
            rmaps = tree["replay/maps"].isel(pixel=slice(o, o + h * w))
            assert tree["replay/maps"].dims == ("epoch", "position", "pixel") and rmaps.dtype == np.dtype(dtype)
            columns = list(tree["replay/stats"].attrs["columns"])
            stats = tree["replay/stats"].values
            rscale = stats[..., columns.index(f"scale_{i}")] if uint8 else None
            stored = rmaps.values.reshape(-1, h, w)
            decoded = stored if rscale is None else decode_maps(stored, rscale.reshape(-1))
            np.testing.assert_array_equal(decoded.reshape(2, 10, h, w), arrays.replay_maps(store, i).compute())
            np.testing.assert_array_equal(decoded[:4], store.read_replay([i], 0, 0, 4)[0][i])
            np.testing.assert_array_equal(stats[..., columns.index(f"norm_{i}")],
                                          [replay_norms(e, np.arange(10), i) for e in range(2)])
    maps = xr.open_zarr(str(path), group="maps", consolidated=False)
    assert set(maps.data_vars) == {str(layer.index) for layer in LAYERS}
    for layer in LAYERS:
        assert maps[str(layer.index)].shape == (N_ROWS, layer.height, layer.width)
        np.testing.assert_array_equal(maps[str(layer.index)].values, store.read(f"maps/{layer.index}"))
    if replay:
        group = xr.open_zarr(str(path), group="replay", consolidated=False)
        assert set(group.data_vars) == {"maps", "stats", "sample", "record", "done"}


def test_every_group_has_one_size_per_dimension(tmp_path):
    """The property xarray needs: within a group, a dimension name has one size on every array."""
    make_store(tmp_path / "c.zarr", "uint8", replay=True)
    group = zarr.open_group(str(tmp_path / "c.zarr"), mode="r")
    sizes: dict[tuple[str, str], set] = {}
    for name, node in group.members(max_depth=None):
        if isinstance(node, zarr.Array):
            parent = name.rpartition("/")[0]
            assert node.metadata.dimension_names is not None, name
            for dim, size in zip(node.metadata.dimension_names, node.shape):
                sizes.setdefault((parent, dim), set()).add(size)
    assert all(len(s) == 1 for s in sizes.values()), {k: s for k, s in sizes.items() if len(s) > 1}


def test_zarr_lists_no_foreign_key_while_built(tmp_path):
    """Creation claimed, creation done, chunks claimed: zarr (and so xarray, dask) never meets an ownership record."""
    loc = Location.of(tmp_path / "c.zarr")
    assert claim_creation(loc) and not claim_creation(loc)  # the creation record is in place
    assert list_quietly(loc.url) == []  # an empty group while it is being created

    spec = fake_spec(LAYERS, N_ROWS, CHUNK_ROWS, imgsz=64)
    store = CacheStore.create(loc, spec, FILES)  # what the creator does next (CacheStore.open_or_create)
    members = list_quietly(loc.url)
    assert "maps/6" in members and "done" in members
    assert set(zarr.open_group(loc.url, mode="r").attrs) == {"atcache"}  # the spec replaced the creator's record

    other = tmp_path / "d.zarr"  # created by a builder from scratch
    CacheStore.open_or_create(other, spec, FILES, resume=False, overwrite=False, join=False)
    assert "maps/6" in list_quietly(other)

    with ChunkClaim(store, [0, 1]) as claim:
        assert claim.held == [0, 1] and loc.list(LOCK_PREFIX)  # records present
        assert list_quietly(loc.url) == members
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            xr.open_datatree(loc.url, engine="zarr", consolidated=False)
            xr.open_zarr(loc.url, group="maps", consolidated=False)
            import dask.array as da
            assert da.from_zarr(loc.url, component="maps/6").shape == (N_ROWS, 4, 4)
        with pytest.raises(AtcacheError, match="row-chunk 1 .* is being built"):
            ChunkClaim(store, [1, 2]).acquire()  # an overlapping shard is still refused
    assert not loc.list(LOCK_PREFIX)


def refusal(path, found) -> str:
    """The one line that refuses a store written in format `found` (None: no format_version at all)."""
    written = f"store format {found}" if found is not None else "an unknown store format (no format_version)"
    return (f"cache {path} was written in {written}; this atcache reads format {FORMAT_VERSION}: rebuild it with "
            f"`atcache build-cache ... --out {path} --overwrite` (same settings)")


def with_format_version(path, found, replay: bool = False) -> CacheStore:
    """A fresh filled store whose spec attribute then says format `found` (the spec as every store writes it,
    CacheSpec.to_dict, put with plain zarr); None: without format_version."""
    store = make_store(path, "float16", replay=replay, gradient=replay)
    spec = dataclasses.replace(store.spec, format_version=found).to_dict()
    if found is None:
        del spec["format_version"]
    zarr.open_group(str(path), mode="r+").attrs.put({"atcache": spec})
    return store


@pytest.mark.parametrize("found", [2, 4, 1, None], ids=["retired-2", "newer-4", "older-1", "missing"])
def test_another_format_is_refused_in_one_line(tmp_path, found):
    """Only format 3 is read: an older store (the retired format 2, ...), a newer one or one without a version is
    refused in one line naming the store, its version, the one read and the rebuild command, by every way in: the
    python API, resume, and the CLI (exit 2, one `atcache: error:` line); --overwrite rebuilds it."""
    path = tmp_path / "c.zarr"
    store = with_format_version(path, found)
    expected = refusal(Location.of(path), found)
    for opening in (lambda: CacheStore.open(path), lambda: open_cache(path), lambda: verify_cache(path),
                    lambda: CacheStore.open_or_create(path, store.spec, FILES, resume=True, overwrite=False, join=False)):
        with pytest.raises(AtcacheError) as error:
            opening()
        assert str(error.value) == expected
    assert_one_line_error(invoke("inspect", path), expected)
    assert_one_line_error(invoke("inspect", path, "--verify"), expected)
    CacheStore.open_or_create(path, store.spec, FILES, resume=False, overwrite=True, join=False)
    assert CacheStore.open(path).spec.format_version == FORMAT_VERSION


def test_a_format_2_replay_store_is_refused_in_one_line(tmp_path):
    """A replay store (with gradients) whose spec says format 2 is refused before any replay array is read, by the
    python API, inspect, verify and resume alike; replay arrays exist in format 3's layout alone (five per unit, six
    with gradients; none per layer)."""
    path = tmp_path / "v2.zarr"
    store = with_format_version(path, 2, replay=True)
    assert replay_array_names(store.spec) == ["replay/maps", "replay/stats", "replay/grad/direction", "replay/sample",
                                              "replay/record", "replay/done"]
    assert not any(name.startswith(("replay/norms", "replay/scales", "replay/maps/", "replay/grad/norm"))
                   for name in list_quietly(path))
    expected = refusal(Location.of(path), 2)
    assert "was written in store format 2; this atcache reads format 3: rebuild it with `atcache build-cache" in expected
    for opening in (lambda: open_cache(path), lambda: verify_cache(path),
                    lambda: CacheStore.open_or_create(path, store.spec, FILES, resume=True, overwrite=False, join=False)):
        with pytest.raises(AtcacheError) as error:
            opening()
        assert str(error.value) == expected
    assert_one_line_error(invoke("inspect", path), expected)
