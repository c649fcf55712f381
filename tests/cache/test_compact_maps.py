"""`build-cache --dtype uint8`: maps stored in the square-root domain with a scale per map, read back decoded by every
reader (training in RAM and streamed, replay, inspect/compare, open_cache), close to the float16 store."""

import numpy as np
import pytest
import zarr
from typer.testing import CliRunner

from atcache.teacher.pipeline import build_cache
from atcache.cli import app
from atcache.cache.format import decode_maps, encode_maps
from helpers import COMMON, TEST_LAYERS, build_config, results

runner = CliRunner()


@pytest.fixture(scope="module")
def uint8_cache(voc_yaml, teacher_pt, tmp_path_factory):
    out = tmp_path_factory.mktemp("uint8") / "uint8.zarr"
    build_cache(build_config(voc_yaml, out, teacher=str(teacher_pt), dtype="uint8", workers=2))
    return out


def test_encoding_round_trip_and_unfinished_rows():
    rng = np.random.default_rng(0)
    maps = rng.random((5, 8, 8)).astype(np.float32) ** 3
    maps[2] = np.nan  # a row whose image could not be read
    q, scales = encode_maps(maps, "uint8")
    assert q.dtype == np.uint8 and q.max() == 255 and np.isnan(scales[2]) and (q[2] == 0).all()
    back = decode_maps(q, scales).astype(np.float32)
    assert np.isnan(back[2]).all()
    ok = [0, 1, 3, 4]
    x, y = maps[ok].reshape(4, -1), back[ok].reshape(4, -1)
    cosine = (x * y).sum(1) / np.linalg.norm(x, axis=1) / np.linalg.norm(y, axis=1)
    assert cosine.min() > 0.9999
    assert encode_maps(maps, "float16")[1] is None


def test_uint8_store_is_smaller_and_close_to_float16(uint8_cache, built_cache):
    from atcache import open_cache
    from atcache.cache.inspect import compare_caches, verify_cache
    from atcache.cache.store import CacheStore

    store = CacheStore.open(uint8_cache)
    assert store.spec.map_dtype == "uint8" and zarr.open_group(str(uint8_cache))["maps/16"].dtype == np.uint8
    assert "scales/16" in store.array_names() and verify_cache(uint8_cache) == []
    def map_bytes(path):  # the maps' chunk files (at 64 px the scales' metadata outweighs what they save overall)
        return sum(f.stat().st_size for f in (path / "maps").rglob("*") if f.is_file() and f.name != "zarr.json")

    assert map_bytes(uint8_cache) < 0.8 * map_bytes(built_cache)
    compared = compare_caches(uint8_cache, built_cache)
    for layer in map(str, TEST_LAYERS):
        assert compared["layers"][layer]["cosine"]["min"] >= 0.9999, layer
    view = open_cache(uint8_cache)  # decoded maps whatever the dtype
    maps = view.maps[16][:4].compute()
    assert maps.dtype == np.float16
    np.testing.assert_allclose(np.linalg.norm(maps.astype(np.float32).reshape(4, -1), axis=1), 1.0, atol=5e-3)


def test_uint8_maps_of_a_trained_teacher_match_its_float32_maps(voc_yaml, trained_teacher_pt, tmp_path):
    """cosine >= 0.9999 per layer between the stored uint8 maps and the same teacher's float32 maps."""
    import torch

    from atcache.attention.agreement import map_agreement
    from atcache.data.splits import LetterboxedImages, split_files
    from atcache.attention.recipe import layer_maps
    from atcache.cache.store import CacheStore
    from atcache.yolo import load_model

    out = tmp_path / "u8.zarr"
    build_cache(build_config(voc_yaml, out, teacher=str(trained_teacher_pt), dtype="uint8"))
    store = CacheStore.open(out)
    teacher = load_model(str(trained_teacher_pt), device="cpu").model.float()
    split = split_files(voc_yaml, "train")
    rows, images, _, _ = next(iter(torch.utils.data.DataLoader(LetterboxedImages(split, range(16), store.spec.imgsz),
                                                               batch_size=16)))
    exact, _ = layer_maps(teacher, images, TEST_LAYERS, 2.0, "sum_p", store.spec.eps, amp=False)
    for layer, m in zip(TEST_LAYERS, exact):
        stored = store.read_layer(layer, 0, 16)[0].astype(np.float32).reshape(16, -1)
        cosine = map_agreement(stored, m.flatten(1).numpy())[0]
        assert cosine.min() >= 0.9999, (layer, cosine.min())


def test_a_uint8_cache_stays_uint8_in_ram(uint8_cache, built_cache):
    from atcache.train.targets import CacheTargets

    from atcache.train.trainer import ram_need_gb

    u8, f16 = CacheTargets.load(uint8_cache, TEST_LAYERS), CacheTargets.load(built_cache, TEST_LAYERS)
    assert all(u8.maps[i].dtype == np.uint8 for i in TEST_LAYERS) and u8.ram_bytes() < f16.ram_bytes()
    for t in (u8, f16):  # the RAM check counts the maps as they are held
        held = sum(t.maps[i].nbytes + (t.scales[i].nbytes if t.scales else 0) for i in TEST_LAYERS)
        assert ram_need_gb(t.spec, TEST_LAYERS) * 2**30 == pytest.approx(held)
    np.testing.assert_allclose(u8.map_row(16, 3).astype(np.float32), f16.map_row(16, 3).astype(np.float32), atol=2e-2)


@pytest.mark.parametrize("stream", ["--no-stream", "--stream"])
def test_training_from_a_uint8_cache(uint8_cache, voc_yaml, tmp_path, stream):
    result = runner.invoke(app, ["train-from-cache", "--cache", str(uint8_cache), "--data", str(voc_yaml),
                                 "--project", str(tmp_path), "--name", "u8", stream, *COMMON])
    assert result.exit_code == 0, result.output
    row = results(tmp_path / "u8")
    assert np.isfinite(row["train/at_loss"]) and row["train/at_loss"] > 0


def test_replay_arrays_in_uint8(voc_yaml, teacher_pt, tmp_path):
    from atcache.tools.fidelity import FidelityConfig, measure_fidelity

    out = tmp_path / "replay8.zarr"
    build_cache(build_config(voc_yaml, out, teacher=str(teacher_pt), dtype="uint8", replay_epochs=1))
    assert zarr.open_group(str(out))["replay/maps"].dtype == np.uint8
    report = measure_fidelity(FidelityConfig(cache=str(out), teacher=str(teacher_pt), data=str(voc_yaml), batches=2,
                                             batch=8, targets="replay", device="cpu"))
    for layer in map(str, TEST_LAYERS):
        assert report["layers"][layer]["all"]["cosine_mean"] >= 0.999, layer


def test_an_unknown_dtype_is_one_line(voc_yaml, teacher_pt, tmp_path):
    from atcache.errors import AtcacheError

    with pytest.raises(AtcacheError, match="--dtype 'int4' is unknown; choose one of float16, uint8"):
        build_cache(build_config(voc_yaml, tmp_path / "x.zarr", teacher=str(teacher_pt), dtype="int4"))


def test_compare_decodes_uint8_replay_arrays(voc_yaml, teacher_pt, tmp_path):
    from atcache.cache.inspect import compare_caches

    a, b = tmp_path / "f16.zarr", tmp_path / "u8.zarr"
    build_cache(build_config(voc_yaml, a, teacher=str(teacher_pt), replay_epochs=1))
    build_cache(build_config(voc_yaml, b, teacher=str(teacher_pt), replay_epochs=1, dtype="uint8"))
    replay = compare_caches(b, a)["replay"]
    assert replay["common_views"] == 31
    assert all(c["cosine"]["min"] >= 0.9999 for c in replay["layers"].values())


# the codecs of the Zarr v3 specification, which every Zarr v3 reader decodes
SPEC_CODECS = {"bytes", "transpose", "blosc", "zstd", "gzip", "crc32c"}


def test_a_uint8_store_reads_back_equal_with_plain_zarr(tmp_path):
    """A uint8 store with replay arrays, written through atcache, read back by plain zarr equal to what was written,
    every map and per-view array stored with the chosen chain: blosc zstd-9 without shuffle, then crc32c."""
    import dataclasses
    import json

    from atcache.cache.format import LayerSpec, ReplaySpec, map_compressors
    from atcache.cache.store import CacheStore
    from helpers import fake_spec, random_chunk

    layers = (LayerSpec(6, 16, 8, 5, 5), LayerSpec(8, 32, 16, 3, 3))
    replay = ReplaySpec(epochs=2, aug_seed=0, samples=7, chunk_rows=4, files_sha256="synthetic", augment={})
    spec = dataclasses.replace(fake_spec(layers, n_rows=6, chunk_rows=4, imgsz=80), map_dtype="uint8", replay=replay)
    files = [f"images/{i:03d}.jpg" for i in range(6)]
    path = tmp_path / "u8.zarr"
    store = CacheStore.create(path, spec, files)
    rng = np.random.default_rng(0)
    chunks = {k: random_chunk(spec, *store.chunk_range(k), rng, smooth=True) for k in range(store.n_chunks)}
    for k, data in chunks.items():
        store.write_chunk(k, data)
    views = {}
    for u in range(store.n_chunks, store.n_units):
        e, a, b = store.replay_unit(u)
        data = random_chunk(spec, a, b, rng, smooth=True)
        samples = rng.permutation(7)[: b - a].astype(np.int32)
        records = rng.integers(0, 2**63, b - a, dtype=np.uint64)
        store.write_replay(u, maps=data.maps, norms=data.norms, samples=samples, records=records)
        views[u] = (e, a, b, data, samples, records)

    g = zarr.open_group(str(path), mode="r")  # plain zarr, nothing of atcache
    for k, data in chunks.items():
        a, b = store.chunk_range(k)
        for layer in layers:
            q, scales = encode_maps(data.maps[layer.index], "uint8")
            np.testing.assert_array_equal(g[f"maps/{layer.index}"][a:b], q)
            np.testing.assert_array_equal(g[f"scales/{layer.index}"][a:b], scales)
            np.testing.assert_array_equal(g[f"norms/{layer.index}"][a:b], data.norms[layer.index])
        np.testing.assert_array_equal(g["letterbox"][a:b], data.letterbox)
    assert g["done"][:].all() and list(g["files"][:]) == files
    offsets = {i: (o, h, w) for i, o, h, w in g["replay/maps"].attrs["layers"]}  # the schema, as plain zarr reads it
    columns = list(g["replay/stats"].attrs["columns"])
    for e, a, b, data, samples, records in views.values():
        flat, stats = g["replay/maps"][e, a:b], g["replay/stats"][e, a:b]
        for layer in layers:
            q, scales = encode_maps(data.maps[layer.index], "uint8")
            o, h, w = offsets[layer.index]
            stored = flat[:, o:o + h * w].reshape(-1, h, w)
            np.testing.assert_array_equal(stored, q)
            np.testing.assert_array_equal(stats[:, columns.index(f"scale_{layer.index}")], scales)
            np.testing.assert_array_equal(stats[:, columns.index(f"norm_{layer.index}")], data.norms[layer.index])
            np.testing.assert_array_equal(decode_maps(stored, stats[:, columns.index(f"scale_{layer.index}")]),
                                          store.read_replay([layer.index], e, a, b)[0][layer.index])
        np.testing.assert_array_equal(g["replay/sample"][e, a:b], samples)
        np.testing.assert_array_equal(g["replay/record"][e, a:b], records)
        assert g["replay/done"][e, a:b].all()

    def codecs(name):  # the codec chain as the array's metadata gives it to any reader
        return json.loads((path / name / "zarr.json").read_text())["codecs"]

    chosen = [{"name": "blosc", "configuration": {"typesize": 1, "cname": "zstd", "clevel": 9, "shuffle": "noshuffle",
                                                  "blocksize": 0}}, {"name": "crc32c"}]
    assert g["replay/maps"].compressors == tuple(map_compressors("uint8"))
    for name in ("maps/6", "maps/8", "replay/maps"):
        assert codecs(name)[1:] == chosen, name
        assert codecs(name)[0]["name"] == "bytes"
    arrays = [name for name, a in g.arrays()] + [f"{p}/{name}" for p in ("maps", "scales", "norms")
                                                 for name, _ in g[p].arrays()]
    arrays += [f"replay/{n}" for n in ("maps", "stats", "sample", "record", "done")]
    for name in arrays:
        if name != "files":  # strings: the vlen-utf8 codec of the main image list, not a per-view array
            assert {c["name"] for c in codecs(name)} <= SPEC_CODECS, (name, codecs(name))
