"""Benchmark Zarr v3 layout choices for atcache's cache store at VOC scale (CPU, local disk).

Compares, on synthetic but realistic attention maps (smooth positive blobs + small noise, unit L2 norm per row,
stored as float16):
    * chunk_rows R = 64 / 256 (current default) / 1024, written through atcache.cache.store.CacheStore.write_chunk
    * one sharded variant written with plain zarr (shards=(1024, H, W), inner chunks=(64, H, W), same codecs)
    * map-codec variants at R = 256 (maps only; norms/letterbox/done keep the store's codecs), written through
      CacheStore with atcache.cache.format.map_compressors patched: lz4+bitshuffle (current), zstd-3+bitshuffle,
      lz4+byte shuffle, no compression (crc32c only)

For each: write throughput, bytes on disk, file count, full load of every maps array (after evicting the store's
files from the page cache with posix_fadvise, and again warm), random single-row reads over all layers, and a
dask mean/max per layer. Also the float16 error against float32 (once).

    python pipelines/bench_store_layout.py --rows 16551 --out-json pipelines/results/store_layout_cpu.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import numpy as np
import zarr
from zarr.codecs import BloscCodec, BloscShuffle, Crc32cCodec

import atcache.cache.format as format_mod
from atcache.cache.format import LETTERBOX_COLUMNS, CacheSpec
from atcache.cache.format import small_compressors
from atcache.cache.store import CacheStore, ChunkData
from atcache.cache.synthetic import fake_spec, fill_store, seed_layers

LAYERS = seed_layers(640)  # VOC at imgsz 640: the cached teacher layers
LETTERBOX_WIDTH = len(LETTERBOX_COLUMNS)
IMGSZ = 640
SEED = 0


# ---------------------------------------------------------------------------------------------- synthetic data
def synth_layer(rng: np.random.Generator, n: int, h: int, w: int, block: int = 4096) -> np.ndarray:
    """(n, h, w) float32 maps: background + 1..6 anisotropic Gaussian blobs + small noise, positive, unit L2 per row.

    Built separably (blob = gy (x) gx) in blocks of rows to bound memory."""
    out = np.empty((n, h, w), dtype=np.float32)
    ys = np.arange(h, dtype=np.float32)[None, None, :]
    xs = np.arange(w, dtype=np.float32)[None, None, :]
    kmax = 6
    for a in range(0, n, block):
        b = min(n, a + block)
        m = b - a
        k = rng.integers(1, kmax + 1, size=m)
        active = (np.arange(kmax)[None, :] < k[:, None]).astype(np.float32)  # (m, kmax)
        amp = rng.uniform(0.3, 1.0, size=(m, kmax)).astype(np.float32) * active
        cy = rng.uniform(0, h, size=(m, kmax, 1)).astype(np.float32)
        cx = rng.uniform(0, w, size=(m, kmax, 1)).astype(np.float32)
        sy = (rng.uniform(0.04, 0.25, size=(m, kmax, 1)) * h).astype(np.float32)
        sx = (rng.uniform(0.04, 0.25, size=(m, kmax, 1)) * w).astype(np.float32)
        gy = np.exp(-0.5 * ((ys - cy) / sy) ** 2) * amp[:, :, None]  # (m, kmax, h)
        gx = np.exp(-0.5 * ((xs - cx) / sx) ** 2)  # (m, kmax, w)
        x = np.einsum("nkh,nkw->nhw", gy, gx, optimize=True)
        x += rng.uniform(0.02, 0.15, size=(m, 1, 1)).astype(np.float32)  # per-image background level
        noise = rng.standard_normal((m, h, w), dtype=np.float32)
        x *= 1.0 + 0.05 * noise  # 5% multiplicative texture
        x += 0.01 * np.abs(rng.standard_normal((m, h, w), dtype=np.float32))  # small additive floor noise
        np.maximum(x, 0.0, out=x)
        x /= np.sqrt((x.astype(np.float64) ** 2).sum(axis=(1, 2), keepdims=True)).astype(np.float32) + 1e-12
        out[a:b] = x
    return out


def make_data(n: int) -> tuple[dict[int, np.ndarray], dict[int, np.ndarray], np.ndarray, dict]:
    """float16 maps, float32 norms, letterbox rows, and the float16-vs-float32 error report."""
    rng = np.random.default_rng(SEED)
    maps16, norms, err = {}, {}, {}
    max_abs, cos_sum, cos_min = 0.0, 0.0, 1.0
    for layer in LAYERS:
        x = synth_layer(rng, n, layer.height, layer.width)
        y = x.astype(np.float16)
        d = np.abs(y.astype(np.float32) - x)
        yf = y.astype(np.float64).reshape(n, -1)
        xf = x.astype(np.float64).reshape(n, -1)
        cos = (yf * xf).sum(1) / (np.linalg.norm(yf, axis=1) * np.linalg.norm(xf, axis=1) + 1e-30)
        err[str(layer.index)] = {
            "max_abs_err": float(d.max()), "mean_abs_err": float(d.mean()),
            "max_rel_err_of_row_max": float((d.reshape(n, -1).max(1) / x.reshape(n, -1).max(1)).max()),
            "mean_cosine": float(cos.mean()), "min_cosine": float(cos.min()),
        }
        max_abs = max(max_abs, float(d.max()))
        cos_sum += float(cos.sum())
        cos_min = min(cos_min, float(cos.min()))
        maps16[layer.index] = y
        norms[layer.index] = rng.uniform(1.0, 50.0, size=n).astype(np.float32)
        del x, d, yf, xf
    lb = np.tile(np.array([375, 500, 480, 640, 80, 0, 1.28], np.float32), (n, 1))
    err_all = {"max_abs_err": max_abs, "mean_cosine": cos_sum / (n * len(LAYERS)), "min_cosine": cos_min,
               "per_layer": err}
    return maps16, norms, lb, err_all


# ---------------------------------------------------------------------------------------------- codecs
def codec(name: str) -> list:
    if name == "lz4_bitshuffle":
        return [BloscCodec(cname="lz4", clevel=5, shuffle=BloscShuffle.bitshuffle, typesize=2), Crc32cCodec()]
    if name == "zstd3_bitshuffle":
        return [BloscCodec(cname="zstd", clevel=3, shuffle=BloscShuffle.bitshuffle, typesize=2), Crc32cCodec()]
    if name == "lz4_shuffle":
        return [BloscCodec(cname="lz4", clevel=5, shuffle=BloscShuffle.shuffle, typesize=2), Crc32cCodec()]
    if name == "none":
        return [Crc32cCodec()]
    raise ValueError(name)


# ---------------------------------------------------------------------------------------------- writing
def make_spec(n: int, r: int) -> CacheSpec:
    return fake_spec(LAYERS, n, r, imgsz=IMGSZ, teacher="bench")


def write_store(path: Path, n: int, r: int, codec_name: str, data) -> tuple[float, float]:
    """Create + write all rows through CacheStore; returns (create_s, write_s)."""
    maps16, norms, lb, _ = data
    files = [f"images/{i:06d}.jpg" for i in range(n)]
    patch = mock.patch.object(format_mod, "map_compressors", lambda *dtype: codec(codec_name))
    with patch:
        t0 = time.perf_counter()
        st = CacheStore.create(path, make_spec(n, r), files)
        t1 = time.perf_counter()
        fill_store(st, lambda spec, a, b: ChunkData(
            maps={i: m[a:b] for i, m in maps16.items()}, norms={i: v[a:b] for i, v in norms.items()},
            letterbox=lb[a:b], ok=np.ones(b - a, bool)))
        t2 = time.perf_counter()
    return t1 - t0, t2 - t1


def write_sharded(path: Path, n: int, shard: int, inner: int, codec_name: str, data) -> tuple[float, float]:
    """The same group layout with plain zarr, every array sharded by `shard` rows (inner chunks of `inner` rows);
    written shard by shard so no shard is read-modify-written."""
    maps16, norms, lb, _ = data
    files = np.asarray([f"images/{i:06d}.jpg" for i in range(n)], dtype=object)
    t0 = time.perf_counter()
    g = zarr.open_group(str(path), mode="w", zarr_format=3)
    arrs = {}
    for layer in LAYERS:
        hw = (layer.height, layer.width)
        arrs[f"maps/{layer.index}"] = g.create_array(
            f"maps/{layer.index}", shape=(n, *hw), shards=(shard, *hw), chunks=(inner, *hw), dtype="float16",
            fill_value=np.nan, compressors=codec(codec_name), dimension_names=("row", "y", "x"))
        arrs[f"norms/{layer.index}"] = g.create_array(
            f"norms/{layer.index}", shape=(n,), shards=(shard,), chunks=(inner,), dtype="float32",
            fill_value=np.nan, compressors=small_compressors(4))
    arrs["letterbox"] = g.create_array("letterbox", shape=(n, LETTERBOX_WIDTH), shards=(shard, LETTERBOX_WIDTH),
                                       chunks=(inner, LETTERBOX_WIDTH), dtype="float32", fill_value=np.nan,
                                       compressors=small_compressors(4))
    arrs["done"] = g.create_array("done", shape=(n,), shards=(shard,), chunks=(inner,), dtype="bool",
                                  fill_value=False, compressors=small_compressors(1))
    fa = g.create_array("files", shape=(n,), shards=(shard,), chunks=(inner,), dtype=str, fill_value="")
    fa[:] = files
    g.attrs["atcache"] = make_spec(n, shard).to_dict()
    t1 = time.perf_counter()
    for a in range(0, n, shard):
        b = min(n, a + shard)
        for layer in LAYERS:
            arrs[f"maps/{layer.index}"][a:b] = maps16[layer.index][a:b]
            arrs[f"norms/{layer.index}"][a:b] = norms[layer.index][a:b]
        arrs["letterbox"][a:b] = lb[a:b]
        arrs["done"][a:b] = True
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1


# ---------------------------------------------------------------------------------------------- measuring
def disk_stats(path: Path) -> dict:
    files = [f for f in path.rglob("*") if f.is_file()]
    maps = [f for f in files if "maps" in f.relative_to(path).parts[:1]]
    return {"bytes_total": sum(f.stat().st_size for f in files), "bytes_maps": sum(f.stat().st_size for f in maps),
            "n_files": len(files), "n_files_maps": len(maps)}


def evict(path: Path) -> bool:
    """Drop the store's files from the page cache (per file; needs posix_fadvise). Returns whether it was tried."""
    if not hasattr(os, "posix_fadvise"):
        return False
    os.sync()
    for f in path.rglob("*"):
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
    return True


def full_load(path: Path) -> tuple[float, int, dict[int, np.ndarray]]:
    g = zarr.open_group(str(path), mode="r")
    t0 = time.perf_counter()
    out = {layer.index: g[f"maps/{layer.index}"][:] for layer in LAYERS}
    dt = time.perf_counter() - t0
    return dt, sum(v.nbytes for v in out.values()), out


def random_reads(path: Path, rows: np.ndarray, budget_s: float) -> dict:
    """Read rows one at a time (each row: all 6 layers' maps), stop after budget_s."""
    g = zarr.open_group(str(path), mode="r")
    arrs = [g[f"maps/{layer.index}"] for layer in LAYERS]
    for a in arrs:  # warm metadata
        a[int(rows[0])]
    t0 = time.perf_counter()
    done = 0
    for i in rows:
        for a in arrs:
            a[int(i)]
        done += 1
        if time.perf_counter() - t0 > budget_s:
            break
    dt = time.perf_counter() - t0
    return {"rows_read": done, "rows_requested": int(len(rows)), "seconds": dt, "rows_per_s": done / dt,
            "ms_per_row": 1000 * dt / done}


def dask_stats(path: Path, rows_per_chunk: int) -> dict:
    import dask
    import dask.array as da

    g = zarr.open_group(str(path), mode="r")
    t0 = time.perf_counter()
    res = {}
    for layer in LAYERS:
        x = da.from_zarr(g[f"maps/{layer.index}"], chunks=(rows_per_chunk, layer.height, layer.width))
        mean, mx = dask.compute(x.mean(axis=0, dtype=np.float32), x.max(axis=0))
        res[layer.index] = (float(mean.mean()), float(mx.max()))
    dt = time.perf_counter() - t0
    return {"seconds": dt, "per_layer_mean_of_mean": {str(k): v[0] for k, v in res.items()}}


def measure(name: str, path: Path, n: int, write: tuple[float, float], dask_rows: int, rand_rows: np.ndarray,
            rand_budget: float, ref: dict[int, np.ndarray], extra: dict) -> dict:
    create_s, write_s = write
    ds = disk_stats(path)
    raw_maps = sum(ref[l.index].nbytes for l in LAYERS)
    tried = evict(path)
    cold_s, nbytes, loaded = full_load(path)
    for l in LAYERS:  # exactness of the round trip
        if not np.array_equal(loaded[l.index], ref[l.index]):
            raise RuntimeError(f"{name}: maps/{l.index} does not round-trip")
    del loaded
    warm_s, _, loaded = full_load(path)
    del loaded
    rr = random_reads(path, rand_rows, rand_budget)
    dk = dask_stats(path, dask_rows)
    rec = {
        "variant": name, **extra, "rows": n,
        "write": {"create_s": create_s, "write_s": write_s, "img_per_s": n / write_s},
        "disk": {**ds, "MB_total": ds["bytes_total"] / 1e6, "MB_maps": ds["bytes_maps"] / 1e6,
                 "bytes_per_image": ds["bytes_total"] / n, "maps_bytes_per_image": ds["bytes_maps"] / n,
                 "maps_compression_ratio": raw_maps / ds["bytes_maps"]},
        "full_load_maps": {"bytes_decoded": nbytes, "cold_s": cold_s, "cold_MB_per_s": nbytes / 1e6 / cold_s,
                           "warm_s": warm_s, "warm_MB_per_s": nbytes / 1e6 / warm_s, "evicted_page_cache": tried},
        "random_row_reads": rr,
        "dask_mean_max": {**dk, "dask_chunk_rows": dask_rows},
    }
    print(f"[{name}] write {n / write_s:8.0f} img/s | {ds['bytes_total'] / 1e6:7.1f} MB, {ds['n_files']} files | "
          f"load cold {cold_s:.2f}s warm {warm_s:.2f}s | rand {rr['rows_per_s']:.0f} rows/s "
          f"({rr['rows_read']}) | dask {dk['seconds']:.2f}s", flush=True)
    return rec


# ---------------------------------------------------------------------------------------------- main
def machine() -> dict:
    import dask
    import numcodecs
    import torch

    cpu_model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    mem = ""
    with contextlib.suppress(OSError):
        mem = Path("/proc/meminfo").read_text().splitlines()[0]
    return {
        "cpu_count": os.cpu_count(), "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
        else None, "cpu_model": cpu_model, "mem": mem, "platform": platform.platform(),
        "python": sys.version.split()[0], "numpy": np.__version__, "zarr": zarr.__version__,
        "numcodecs": numcodecs.__version__, "dask": dask.__version__, "torch": torch.__version__,
        "zarr_config": {"async": zarr.config.get("async"), "threading": zarr.config.get("threading"),
                        "codec_pipeline": zarr.config.get("codec_pipeline")},
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=16551, help="rows (images); VOC train+val = 16551")
    ap.add_argument("--out-json", type=Path, default=Path("pipelines/results/store_layout_cpu.json"))
    ap.add_argument("--tmp", type=Path, default=None, help="parent dir for the temporary stores (default: system tmp)")
    ap.add_argument("--random-rows", type=int, default=2000, help="random single rows to read per variant")
    ap.add_argument("--random-budget-s", type=float, default=12.0,
                    help="stop the random reads of a variant after this many seconds (rows/s stays exact)")
    args = ap.parse_args(argv)
    n = args.rows
    t_start = time.perf_counter()

    print(f"generating {n} rows of synthetic maps ...", flush=True)
    t0 = time.perf_counter()
    data = make_data(n)
    gen_s = time.perf_counter() - t0
    maps16 = data[0]
    raw_bytes = sum(m.nbytes for m in maps16.values())
    print(f"  {gen_s:.1f}s, {raw_bytes / 1e6:.1f} MB of float16 maps ({raw_bytes / n:.0f} B/image); "
          f"fp16 max abs err {data[3]['max_abs_err']:.2e}, mean cos {data[3]['mean_cosine']:.8f}", flush=True)
    rand_rows = np.random.default_rng(SEED + 1).choice(n, size=min(args.random_rows, n), replace=False)

    variants = [  # (name, kind, R or shard, inner, codec, dask chunk rows)
        ("R64_lz4_bitshuffle", "store", 64, None, "lz4_bitshuffle"),
        ("R256_lz4_bitshuffle", "store", 256, None, "lz4_bitshuffle"),
        ("R1024_lz4_bitshuffle", "store", 1024, None, "lz4_bitshuffle"),
        ("shard1024_inner64_lz4_bitshuffle", "sharded", 1024, 64, "lz4_bitshuffle"),
        ("R256_zstd3_bitshuffle", "store", 256, None, "zstd3_bitshuffle"),
        ("R256_lz4_shuffle", "store", 256, None, "lz4_shuffle"),
        ("R256_none_crc32c", "store", 256, None, "none"),
    ]
    parent = args.tmp or Path(tempfile.gettempdir())
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="atcache_bench_", dir=parent))
    results = []
    try:
        for name, kind, r, inner, cname in variants:
            path = tmp / f"{name}.zarr"
            if kind == "store":
                w = write_store(path, n, r, cname, data)
                extra = {"writer": "atcache.cache.store.CacheStore.write_chunk", "chunk_rows": r, "shard_rows": None,
                         "maps_codec": cname}
            else:
                w = write_sharded(path, n, r, inner, cname, data)
                extra = {"writer": "plain zarr.create_array(shards=...), written shard by shard", "chunk_rows": inner,
                         "shard_rows": r, "maps_codec": cname}
            results.append(measure(name, path, n, w, r, rand_rows, args.random_budget_s, maps16, extra))
            shutil.rmtree(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    total_s = time.perf_counter() - t_start
    out = {
        "benchmark": "atcache Zarr v3 store layout (pipelines/bench_store_layout.py)",
        "machine": machine(),
        "setup": {
            "rows": n, "imgsz": IMGSZ, "layers": [{"index": l.index, "H": l.height, "W": l.width} for l in LAYERS],
            "raw_float16_maps_bytes": raw_bytes, "raw_float16_maps_bytes_per_image": raw_bytes / n,
            "data": "synthetic: per row and layer, background U(0.02,0.15) + 1..6 anisotropic Gaussian blobs "
                    "(amplitude U(0.3,1), sigma U(0.04,0.25)*size) x (1 + 0.05 N(0,1)) + 0.01|N(0,1)|, "
                    "clipped >= 0, unit L2 norm per row, cast to float16; norms U(1,50) float32; seed 0",
            "data_generation_s": gen_s,
            "temp_dir_parent": str(parent), "temp_stores_deleted": True,
            "notes": [
                "all variants measured on all rows (no scaling)",
                "write = CacheStore.write_chunk for every row-chunk (maps+norms+letterbox+done), data already in "
                "RAM as float16; store creation (incl. writing `files`) is reported separately as create_s",
                "codec variants patch atcache.cache.format.map_compressors; norms/letterbox/done keep the store's codecs",
                "sharded variant: every array sharded by 1024 rows with 64-row inner chunks, written one shard at "
                "a time; dask uses shard-sized chunks (1024 rows)",
                "full_load cold: store files evicted from the OS page cache with posix_fadvise(DONTNEED) after "
                "os.sync(); the VM host may still cache. warm: immediately repeated",
                "random reads: one row of each of the 6 maps arrays per row (6 zarr reads), warm page cache, "
                "stops after --random-budget-s; rows_read says how many were timed",
                "dask: da.from_zarr with chunks = zarr chunk (or shard) rows; mean(axis=0, float32) and "
                "max(axis=0) per layer, default threaded scheduler; time for all 6 layers",
                "every variant's full load is checked bit-exact against the written float16 data",
            ],
        },
        "fp16_vs_fp32": data[3],
        "variants": results,
        "total_runtime_s": total_s,
    }
    args.out_json.parent.mkdir(parents=True, exist_ok=True)
    args.out_json.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out_json} ({total_s:.0f}s total)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
