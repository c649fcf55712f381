"""`atcache inspect` and `open_cache`: dask statistics equal a direct numpy computation, a flipped byte is found with
its location, a cache compared with itself gives cosine 1."""

import json
import shutil

import numpy as np
import pytest
import zarr
from typer.testing import CliRunner

from atcache.cli import app
from atcache.cache.inspect import compare_caches, inspect_cache, open_cache, verify_cache
from helpers import TEST_LAYERS

runner = CliRunner()


@pytest.fixture
def partial_cache(built_cache, tmp_path):
    """The shared cache with rows 3 and 17 not done (NaN maps), as an interrupted or --skip-bad build leaves them."""
    path = tmp_path / "partial.zarr"
    shutil.copytree(built_cache, path)
    g = zarr.open_group(str(path), mode="r+")
    done = g["done"][:]
    done[[3, 17]] = False
    g["done"][:] = done
    for i in TEST_LAYERS:
        m = g[f"maps/{i}"][:]
        m[[3, 17]] = np.nan
        g[f"maps/{i}"][:] = m
    return path


def numpy_figures(path, layer):
    g = zarr.open_group(str(path), mode="r")
    done = g["done"][:]
    maps = g[f"maps/{layer}"][:][done].astype(np.float32)
    flat = maps.reshape(len(maps), -1)
    sq = flat ** 2
    p = sq / sq.sum(1, keepdims=True)
    entropy = -np.where(p > 0, p * np.log(np.where(p > 0, p, 1)), 0).sum(1) / np.log(flat.shape[1])
    return done, maps, flat, entropy, g[f"norms/{layer}"][:][done]


@pytest.mark.parametrize("layer", [6, 16, 22])
def test_statistics_equal_numpy(partial_cache, layer):
    report = inspect_cache(partial_cache, workers=2)
    s = report["layers"][str(layer)]
    done, maps, flat, entropy, norms = numpy_figures(partial_cache, layer)
    assert s["rows_done"] == done.sum() == report["rows_done"] and s["rows_missing"] == 2
    assert s["non_finite_values"] == 0 and s["rows_norm_off_1"] == 0
    assert s["map_norm"]["mean"] == pytest.approx(np.linalg.norm(flat, axis=1).mean(), abs=1e-6)
    assert s["entropy"]["p50"] == pytest.approx(np.median(entropy), abs=1e-5)
    assert s["stored_norm"]["p50"] == pytest.approx(float(np.median(norms)), rel=1e-6)
    assert s["stored_norm"]["max"] == pytest.approx(float(norms.max()), rel=1e-6)
    heat = np.bincount(flat.argmax(1), minlength=flat.shape[1]).reshape(maps.shape[1:])
    np.testing.assert_array_equal(np.array(s["peak_heatmap"]), heat)
    counts = np.histogram(flat, bins=50, range=(0, 1))[0]
    np.testing.assert_array_equal(s["value_histogram"]["counts"], counts)
    assert report["spec"]["imgsz"] == 64 and report["bytes_per_image"] > 0


def test_non_finite_done_rows_are_counted(partial_cache):
    g = zarr.open_group(str(partial_cache), mode="r+")
    m = g["maps/8"][:]
    m[5, 0, 0] = np.inf
    g["maps/8"][:] = m
    s = inspect_cache(partial_cache)["layers"]["8"]
    assert s["non_finite_values"] == 1 and s["rows_with_non_finite"] == 1
    assert [c["array"] for c in verify_cache(partial_cache)] == ["maps/8"]


def test_open_cache_gives_dask_arrays_chunked_as_stored(built_cache):
    view = open_cache(built_cache)
    g = zarr.open_group(str(built_cache), mode="r")
    for i in TEST_LAYERS:
        assert view.maps[i].chunksize == g[f"maps/{i}"].chunks
        np.testing.assert_array_equal(view.maps[i][:5].compute(), g[f"maps/{i}"][:5])
    assert view.layers == TEST_LAYERS and view.done.all() and view.row_of(view.files[7]) == 7


def test_verify_names_a_flipped_byte(built_cache, tmp_path):
    path = tmp_path / "flipped.zarr"
    shutil.copytree(built_cache, path)
    chunk = path / "maps" / "16" / "c" / "1" / "0" / "0"  # rows 8-15 of layer 16
    raw = bytearray(chunk.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    chunk.write_bytes(bytes(raw))
    found = verify_cache(path)
    assert [(c["array"], c["chunk"], c["rows"]) for c in found] == [("maps/16", 1, [8, 16])]
    assert verify_cache(built_cache) == []
    result = runner.invoke(app, ["inspect", str(path), "--verify"])
    assert result.exit_code == 1
    assert "corrupted: maps/16 chunk 1 (rows 8-15)" in result.output and "1 corrupted chunk(s)" in result.output
    plain = runner.invoke(app, ["inspect", str(path)])
    assert plain.exit_code == 2 and "--verify" in plain.output and "Traceback" not in plain.output


def test_compare_with_itself_is_cosine_one(built_cache, partial_cache):
    same = compare_caches(built_cache, built_cache)
    assert same["common_images"] == zarr.open_group(str(built_cache), mode="r")["done"][:].sum()
    for s in same["layers"].values():
        assert s["cosine"]["min"] == pytest.approx(1.0, abs=1e-6) and s["at_distance"]["max"] == 0
    partial = compare_caches(built_cache, partial_cache)
    assert partial["common_images"] == same["common_images"] - 2


def test_cli_inspect_json(built_cache, tmp_path):
    out = tmp_path / "inspect.json"
    result = runner.invoke(app, ["inspect", str(built_cache), "--json", str(out), "--verify", "--compare",
                                 str(built_cache), "--workers", "1"])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert set(report["layers"]) == {str(i) for i in TEST_LAYERS} and report["verify"]["corrupted"] == []
    assert "cosine mean 1.000000" in result.output and "entropy" in result.output


def test_cli_inspect_missing_cache(tmp_path):
    result = runner.invoke(app, ["inspect", str(tmp_path / "none.zarr")])
    assert result.exit_code == 2 and "does not exist" in result.output and "Traceback" not in result.output


def test_a_local_dask_cluster_computes_the_same_report(partial_cache):
    pytest.importorskip("distributed")
    threaded = inspect_cache(partial_cache, workers=2)
    clustered = inspect_cache(partial_cache, scheduler="local:1")
    assert json.dumps(clustered, sort_keys=True) == json.dumps(threaded, sort_keys=True)
    assert verify_cache(partial_cache, scheduler="local:1") == []
