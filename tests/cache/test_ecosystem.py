"""The store is a plain citizen of the zarr ecosystem: xarray opens it whole (open_datatree) and per group (open_zarr)
with the values atcache reads, zarr lists it without a warning (the builders' ownership records are out of the
hierarchy, also while a build holds them), and a store of another format version is refused in one line."""

import dataclasses
import warnings

import numpy as np
import pytest
import xarray as xr
import zarr

from atcache.cache import arrays
from atcache.cache.claims import LOCK_PREFIX, ChunkClaim, claim_creation
from atcache.cache.format import FORMAT_VERSION, ReplaySpec, decode_maps
from atcache.cache.inspect import open_cache, verify_cache
from atcache.cache.location import Location
from atcache.cache.store import CacheStore
from atcache.errors import AtcacheError
from helpers import fake_spec, fake_store, seed_layers

N_ROWS, CHUNK_ROWS = 12, 4
LAYERS = seed_layers(64)[:3]  # layers 6, 8, 13: grids 4x4, 2x2, 4x4
FILES = [f"images/{i:03d}.jpg" for i in range(N_ROWS)]


def make_store(path, dtype: str, replay: bool, version: int = FORMAT_VERSION, gradient: bool = False) -> CacheStore:
    """A filled store of `dtype` maps in format `version`; with `replay`, 2 epochs x 10 samples of replay arrays, all
    written (with `gradient`, input gradients at stride 16 too)."""
    spec = dataclasses.replace(fake_spec(LAYERS, N_ROWS, CHUNK_ROWS, imgsz=64), map_dtype=dtype, format_version=version,
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


@pytest.mark.parametrize("old", [1, None])
def test_older_format_is_refused_in_one_line(tmp_path, old):
    path = tmp_path / "c.zarr"
    store = make_store(path, "float16", replay=False)
    spec = store.spec.to_dict()
    if old is None:
        del spec["format_version"]
    else:
        spec["format_version"] = old
    store.group.attrs["atcache"] = spec
    for opening in (lambda: CacheStore.open(path), lambda: open_cache(path),
                    lambda: CacheStore.open_or_create(path, store.spec, FILES, resume=True, overwrite=False, join=False)):
        with pytest.raises(AtcacheError) as error:
            opening()
        message = str(error.value)
        assert "\n" not in message
        assert f"has format version {old if old is not None else 'unknown'}, this atcache reads versions 2 and 3" in message
        assert str(path) in message and "build-cache" in message and "--overwrite" in message
    # --overwrite rebuilds it
    CacheStore.open_or_create(path, store.spec, FILES, resume=False, overwrite=True, join=False)
    assert CacheStore.open(path).spec.format_version == FORMAT_VERSION


@pytest.mark.parametrize("dtype", ["float16", "uint8"])
def test_a_format_2_replay_store_is_read_verified_and_resumed_in_its_own_layout(tmp_path, dtype):
    """Format 2 kept one replay array per layer and kind; such a store reads as the same values as a format 3 store
    written alike, verifies clean, and a resumed build keeps (and writes) its layout."""
    old = make_store(tmp_path / "v2.zarr", dtype, replay=True, version=2, gradient=True)
    new = make_store(tmp_path / "v3.zarr", dtype, replay=True, gradient=True)
    names = set(list_quietly(tmp_path / "v2.zarr"))
    assert {"replay/maps/6", "replay/norms/13", "replay/grad/norm"} <= names and "replay/stats" not in names
    assert old.replay_array_names() != new.replay_array_names()
    assert len(new.replay_array_names()) == 6  # maps, stats, grad/direction, sample, record, done: per replay unit
    for layer in LAYERS:
        np.testing.assert_array_equal(arrays.replay_maps(old, layer.index).compute(),
                                      arrays.replay_maps(new, layer.index).compute())
    np.testing.assert_array_equal(arrays.replay_grad(old).compute(), arrays.replay_grad(new).compute())
    for u in range(old.n_chunks, old.n_units):
        e, a, b = old.replay_unit(u)
        (maps_2, records_2, grad_2), (maps_3, records_3, grad_3) = (
            s.read_replay(old.spec.layer_indices, e, a, b, grad=True) for s in (old, new))
        for i in old.spec.layer_indices:
            np.testing.assert_array_equal(maps_2[i], maps_3[i])
        np.testing.assert_array_equal(records_2, records_3)
        np.testing.assert_array_equal(grad_2[1], replay_norms(e, np.arange(a, b), 99))
        np.testing.assert_array_equal(grad_2[0], grad_3[0])
        np.testing.assert_array_equal(grad_2[1], grad_3[1])
    assert verify_cache(tmp_path / "v2.zarr") == []
    resumed = CacheStore.open_or_create(tmp_path / "v2.zarr", new.spec, FILES, resume=True, overwrite=False, join=False)
    assert resumed.spec.format_version == 2 and resumed.complete_units().all()
