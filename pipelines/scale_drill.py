"""Scale drill: the non-compute costs of a cache (build bookkeeping, opening for training, target supply, inspect) on
synthetic stores shaped like the real jobs, at several sizes, on a local folder and on a loopback S3 server (moto).

    python pipelines/scale_drill.py                       # local: 0.1 %, 1 %, 10 % of a 100-epoch VOC replay
    python pipelines/scale_drill.py --s3 --sizes 0.1,1    # the same on a moto S3 server on 127.0.0.1
    python pipelines/scale_drill.py --tiny                # seconds (what tests/tools/test_scale_drill.py runs)
    python pipelines/scale_drill.py --analyse-only        # the Markdown table again from the JSON
    python pipelines/scale_drill.py --merge local.json s3.json   # one report from separate runs

A size is a fraction of a 100-epoch VOC replay at 640 (16,551 rows x 100 epochs = 1.66 M views, 6 layers 6,8,13,16,19,22
of strides 16,32,16,8,16,32, uint8 maps): 1 % is the static rows plus 1 epoch of replay arrays, 0.1 % is 1,655 rows and
one epoch of them. Maps are smooth blobs plus noise (about 10 KB per view compressed, like a trained teacher's), written
through CacheStore's own write API. What is timed, each step in its own process (peak RSS: that process and its
children, sampled every 50 ms):
  build    `build_cache` itself, the teacher replaced by a synthetic compute (pipeline.load_model, _make_spec and
           run_here patched; run_here writes each unit with CacheStore.write_chunk / write_replay from one pre-made
           chunk of maps): create + claim, writes per unit, the completion check, the sweep; half the units as shard
           0/2, then --resume of the rest, and a fresh store by four shards at once. `claim100`: create, claim and
           resume of an empty 100 % store (nothing written: bookkeeping alone at full size).
  open     check_settings -> the target source (CacheTargets.load / StreamingCacheTargets.open / ReplayTargets) ->
           the targets of a first batch of 16 (ultralytics' label scan of the images is not included).
  supply   per view in one process, as a loader worker does: static rows in RAM, streamed in block-shuffled order,
           replay in training order (read, decode, fingerprint of a 640x640 image); against ultralytics' own
           augmentation (YOLODataset[i], mosaic, 640) on VOC-sized synthetic JPEGs.
  inspect  inspect and inspect --verify with --scheduler local:2, against one process decompressing every chunk.
  unit overhead  what a unit costs beyond its data: 24 images at 128 px with a 10-epoch replay, built whole into a fresh
           store as 11 units (24 rows a chunk), as 264 (1 row a chunk) and as 241 (24 rows a row-chunk, 1 view a
           replay unit) from the same maps (the same bytes to compress); (seconds_b - seconds_a) / (units_b - units_a),
           fastest of two builds each, for all units and for replay units alone (99 % of a 100-epoch build's units:
           what the 0.036 s budget is held against); the 640 sizes' "non-compute per unit" includes zstd at 640.
Sizes not built are extrapolated linearly from the two largest measured ones (labelled "extrapolated"), as is COCO
(118,287 images x 300 epochs)."""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the atcache beside this script, not an installed one
os.environ.setdefault("YOLO_OFFLINE", "1")
RESULTS = Path("pipelines/results/scale_drill_cpu.json")
VOC_ROWS, VOC_EPOCHS, COCO_ROWS, COCO_EPOCHS = 16551, 100, 118287, 300
LAYERS = (6, 8, 13, 16, 19, 22)
IMGSZ, CHUNK_ROWS, BATCH = 640, 256, 16
TINY = {"rows": 96, "epochs": 2, "chunk_rows": 16, "label": "tiny"}
# bookkeeping per unit apart from compression: one tiny dataset built whole as few units and as many (same maps)
# builds as (rows a row-chunk, positions a replay unit): few units, many units, many replay units only
UNIT_OVERHEAD = {"rows": 24, "epochs": 10, "imgsz": 128, "chunk_rows": ((24, 24), (1, 1), (24, 1)), "repeats": 2}
BUDGETS = {  # what the numbers are held against
    "claim_resume_100pct_s3_s": 10.0,  # claiming and resuming a 100-epoch VOC replay build on S3, per builder
    "unit_noncompute_s3_s": 0.036,  # a unit's claims, chunk writes and done marks on S3
    "open_first_batch_s": 5.0,  # opening a cache to the first batch, every size
    "replay_supply_fraction": 0.10,  # replay targets' loader cost per sample / ultralytics' augmentation per sample
}


# ------------------------------------------------------------------------------------------------ sizes and data
def size_shape(fraction: float) -> dict:
    """Rows and replay epochs of a store holding `fraction` of a 100-epoch VOC replay's views."""
    views = round(fraction * VOC_ROWS * VOC_EPOCHS)
    if views >= VOC_ROWS:
        return {"rows": VOC_ROWS, "epochs": max(1, round(views / VOC_ROWS)), "chunk_rows": CHUNK_ROWS,
                "label": f"{fraction * 100:g}%"}
    return {"rows": views, "epochs": 1, "chunk_rows": CHUNK_ROWS, "label": f"{fraction * 100:g}%"}


def make_split(root: Path, rows: int) -> Path:
    """A data YAML whose train split is `rows` hard links to one VOC-sized JPEG (what the settings check lists and
    fingerprints), val two images."""
    import cv2

    if (root / "data.yaml").exists():
        return root / "data.yaml"
    rng = np.random.default_rng(0)
    image = cv2.GaussianBlur(rng.integers(0, 255, (375, 500, 3), dtype=np.uint8), (7, 7), 0)
    for split, n in (("train", rows), ("val", 2)):
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        first = root / "images" / split / "0000000.jpg"
        cv2.imwrite(str(first), image)
        for i in range(1, n):
            os.link(first, root / "images" / split / f"{i:07d}.jpg")
    (root / "data.yaml").write_text(f"path: {root}\ntrain: images/train\nval: images/val\nnames:\n  0: thing\n")
    return root / "data.yaml"


def replay_image():
    """The 640x640 augmented image every replayed view claims to be (its fingerprint is stored as each record)."""
    import torch

    return torch.from_numpy(np.random.default_rng(1).integers(0, 255, (3, IMGSZ, IMGSZ), dtype=np.uint8))


def synthetic_spec(split, rows: int, epochs: int, chunk_rows: int, imgsz: int = IMGSZ, replay_chunk_rows: int = 0):
    """The spec a VOC uint8 build at `imgsz` with `epochs` replay epochs would write, for the synthetic split (replay
    units of `replay_chunk_rows` positions; default chunk_rows, as a build makes them)."""
    import dataclasses

    from atcache.cache.format import AUGMENT_KEYS, ReplaySpec
    from atcache.cache.synthetic import fake_spec, seed_layers
    from atcache.train.replay import files_sha256

    spec = fake_spec(seed_layers(imgsz), rows, chunk_rows, imgsz=imgsz)
    replay = ReplaySpec(epochs=epochs, aug_seed=0, samples=rows, chunk_rows=replay_chunk_rows or chunk_rows,
                        files_sha256=files_sha256([split.absolute(i) for i in range(rows)], split.root),
                        augment={k: (VOC_EPOCHS if k == "epochs" else 0) for k in AUGMENT_KEYS})
    return dataclasses.replace(spec, map_dtype="uint8", dataset_fingerprint=split.fingerprint(), replay=replay)


def synthetic_maps(r: int, seed: int = 0, noise: float = 0.015, imgsz: int = IMGSZ) -> dict[int, np.ndarray]:
    """Per layer r maps (r, H, W) float32: bicubic-upsampled 6x6 blobs plus uniform noise (~10 KB a view as uint8)."""
    import cv2

    from atcache.cache.synthetic import seed_layers

    rng, out = np.random.default_rng(seed), {}
    for layer in seed_layers(imgsz):
        low = rng.random((6, 6, r), dtype=np.float32) ** 3
        up = np.concatenate([cv2.resize(low[..., s:s + 128], (layer.width, layer.height), interpolation=cv2.INTER_CUBIC)
                             .reshape(layer.height, layer.width, -1) for s in range(0, r, 128)], axis=2)
        m = np.clip(up, 0, None) + noise * rng.random(up.shape, dtype=np.float32)
        out[layer.index] = np.ascontiguousarray(m.transpose(2, 0, 1))
    return out


# ------------------------------------------------------------------------------------------------ steps (children)
class Timers(dict):
    """Seconds and calls per name, accumulated by wrapped functions (nested calls are counted in both)."""

    def wrap(self, owner, name: str, key: str | None = None):
        original = getattr(owner, name)
        key = key or name

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                s, n = self.get(key, (0.0, 0))
                self[key] = (s + time.perf_counter() - t0, n + 1)

        setattr(owner, name, timed)


def step_build(a: dict) -> dict:
    """build_cache over a synthetic split with the compute replaced by writes of pre-made maps (see the docstring)."""
    import dataclasses

    from atcache.teacher import pipeline
    from atcache.teacher.compute import UnitWriter
    from atcache.teacher.runners import RunResult
    from atcache.cache.claims import ChunkClaim
    from atcache.cache.store import CacheStore, ChunkData
    from atcache.config import BuildConfig
    from atcache.data.splits import split_files
    from atcache.train.replay import fingerprint

    split = split_files(a["data"], "train")
    imgsz = a.get("imgsz", IMGSZ)
    spec = synthetic_spec(split, a["rows"], a["epochs"], a["chunk_rows"], imgsz, a.get("replay_chunk_rows", 0))
    most = max(a["chunk_rows"], a.get("replay_chunk_rows", 0))
    pool = synthetic_maps(most, imgsz=imgsz)
    record = fingerprint(replay_image())
    norms = {i: np.ones(most, np.float32) for i in LAYERS}
    letterbox = np.tile(np.array([375, 500, 480, 640, 80, 0, 1.28], np.float32), (most, 1))
    writes: dict[str, list[float]] = {"static": [], "replay": []}

    def write(u, *args):
        t0 = time.perf_counter()
        static = store_of[0].replay_unit(u) is None
        (store_of[0].write_chunk if static else store_of[0].write_replay)(u, *args)
        writes["static" if static else "replay"].append(time.perf_counter() - t0)

    store_of = []

    def runner(cfg, store, todo, teacher, split, device):
        # as the build does: each unit handed to a UnitWriter (compressed and written on its thread, one unit at a time);
        # no compute here, so nothing overlaps it and the time is the writes' and the bookkeeping's alone
        store_of[:] = [store]
        writer = UnitWriter(store, write)
        try:
            for u in todo if a.get("write", True) else []:
                span = store.replay_unit(u)
                if span is None:
                    lo, hi = store.chunk_range(u)
                    n = hi - lo
                    writer.put(u, ChunkData({i: m[:n] for i, m in pool.items()}, {i: x[:n] for i, x in norms.items()},
                                            letterbox[:n], np.ones(n, bool)))
                else:
                    e, lo, hi = span
                    n = hi - lo
                    writer.put(u, {i: m[:n] for i, m in pool.items()}, {i: x[:n] for i, x in norms.items()},
                               np.arange(lo, hi, dtype=np.int32), np.full(n, record, np.uint64))
        finally:
            writer.close()
        return RunResult()

    timers = Timers()
    pipeline.load_model = lambda *args, **kw: None
    pipeline._make_spec = lambda cfg, teacher, split, device: spec
    pipeline.run_here = runner
    timers.wrap(CacheStore, "open_or_create")
    timers.wrap(CacheStore, "complete_units")
    timers.wrap(CacheStore, "done_mask")
    timers.wrap(CacheStore, "replay_done")
    timers.wrap(CacheStore, "sweep_partial_writes", "sweep")
    timers.wrap(CacheStore, "nbytes_stored")
    timers.wrap(ChunkClaim, "acquire", "claim")
    timers.wrap(ChunkClaim, "release")
    timers.wrap(pipeline, "vanishing_layers")
    timers.wrap(pipeline, "run_here", "runner")
    cfg = BuildConfig(teacher="synthetic", data=a["data"], out=a["url"], imgsz=imgsz, batch=BATCH, device="cpu",
                      workers=0, chunk_rows=a["chunk_rows"], layers=LAYERS, progress=False, dtype="uint8",
                      replay_epochs=a["epochs"], shard=tuple(a.get("shard", (0, 1))), resume=a.get("resume", False))
    if a.get("start_at"):  # four shards started together
        time.sleep(max(0.0, a["start_at"] - time.time()))
    t0 = time.perf_counter()
    report = pipeline.build_cache(dataclasses.replace(cfg))
    total = time.perf_counter() - t0
    units = len(writes["static"]) + len(writes["replay"])
    write_s = sum(writes["static"]) + sum(writes["replay"])
    out = {"seconds": total, "units_written": units, "write_s": write_s,
           "write_s_per_static_unit": float(np.mean(writes["static"])) if writes["static"] else None,
           "write_s_per_replay_unit": float(np.mean(writes["replay"])) if writes["replay"] else None,
           "bookkeeping_s": total - write_s, "store_bytes": report.store_bytes,
           "timers": {k: {"s": s, "calls": n} for k, (s, n) in timers.items()}}
    out["noncompute_s_per_unit"] = total / units if units else None
    return out


def step_open(a: dict) -> dict:
    """check_settings -> target source -> targets of a first batch of BATCH samples, for one target mode."""
    from atcache.config import DistillSettings
    from atcache.train.checks import check_settings
    from atcache.train.replay import ReplayTargets
    from atcache.train.samplers import EpochSampler
    from atcache.train.streaming import StreamingCacheTargets
    from atcache.train.targets import CacheTargets

    mode, layers = a["mode"], LAYERS
    image = replay_image() if mode == "replay" else None
    s = DistillSettings(mode="cache", cache=a["url"], targets="replay" if mode == "replay" else "static",
                        layers=tuple((i, i) for i in layers), stream=mode == "streamed")
    t0 = time.perf_counter()
    plan = check_settings(s, IMGSZ, a["data"])
    t1 = time.perf_counter()
    if mode == "replay":
        source = ReplayTargets(plan.store.path, plan.store.spec, layers)
    else:
        source = (StreamingCacheTargets.open if plan.streaming else CacheTargets.load)(plan.store, layers)
    t2 = time.perf_counter()
    if mode == "replay":
        order = EpochSampler(source.replay.samples, source.replay.aug_seed).order(0)
        targets = [source.maps(0, int(i), image) for i in order[:BATCH]]
    else:
        targets = [source.static(r) for r in range(BATCH)]
    t3 = time.perf_counter()
    assert len(targets) == BATCH
    return {"check_s": t1 - t0, "source_s": t2 - t1, "first_batch_s": t3 - t2, "seconds": t3 - t0,
            "streaming": plan.streaming}


def step_supply(a: dict) -> dict:
    """Views/s of each target source in one process (static in RAM, streamed, replay), per view."""
    from atcache.cache.store import CacheStore
    from atcache.train.replay import ReplayTargets, fingerprint
    from atcache.train.samplers import BlockShuffleSampler, EpochSampler
    from atcache.train.streaming import StreamingCacheTargets
    from atcache.train.targets import CacheTargets

    store, n = CacheStore.open(a["url"]), a["views"]
    rows = store.n_rows
    out = {}
    ram = CacheTargets.load(store, LAYERS)
    order = np.random.default_rng(0).permutation(rows)
    picks = [int(order[i % rows]) for i in range(n)]
    t0 = time.perf_counter()
    for r in picks:
        ram.static(r)
    out["static_ram"] = (time.perf_counter() - t0) / n
    del ram
    stream = StreamingCacheTargets.open(store, LAYERS)
    order = BlockShuffleSampler(np.arange(rows) // store.spec.chunk_rows, 4, seed=0).order(0)
    picks = [int(order[i % rows]) for i in range(n)]
    t0 = time.perf_counter()
    for r in picks:
        stream.static(r)
    out["streamed"] = (time.perf_counter() - t0) / n
    replay = ReplayTargets(store.path, store.spec, LAYERS)
    image = replay_image()
    m = store.spec.replay.samples
    sampler = EpochSampler(m, store.spec.replay.aug_seed)
    keys = [(i // m, int(sampler.order(i // m)[i % m])) for i in range(min(n, m * store.spec.replay.epochs))]
    t0 = time.perf_counter()
    for e, index in keys:
        replay.maps(e, index, image)
    out["replay"] = (time.perf_counter() - t0) / len(keys)
    t0 = time.perf_counter()
    for _ in range(200):
        fingerprint(image)
    out["replay_fingerprint"] = (time.perf_counter() - t0) / 200
    return {"s_per_view": out, "views_per_s": {k: 1 / v for k, v in out.items()}}


def step_augment(a: dict) -> dict:
    """ultralytics' per-sample augmentation at 640 (YOLODataset[i], default hyperparameters: mosaic, affine, HSV,
    flip) on VOC-sized synthetic JPEGs."""
    from atcache.data.synthetic import make_demo_data
    from atcache.data.voc import prepare_voc
    from atcache.yolo import YOLODataset, check_det_dataset, get_cfg

    root = Path(a["dir"])
    yaml = root / "VOC" / "VOC.yaml"
    if not yaml.exists():
        devkit = make_demo_data(root / "demo", images=64, size=500, seed=0, progress=False)
        yaml = prepare_voc(devkit, root / "VOC", progress=False)
    data = check_det_dataset(str(yaml))  # the dataset ultralytics' trainer builds: augment=True, default hyp
    ds = YOLODataset(img_path=data["train"], imgsz=IMGSZ, augment=True, hyp=get_cfg(), data=data, prefix="")
    for i in range(4):
        ds[i]
    n = a["samples"]
    t0 = time.perf_counter()
    for i in range(n):
        ds[i % len(ds)]
    return {"s_per_sample": (time.perf_counter() - t0) / n, "samples": n}


def step_inspect(a: dict) -> dict:
    """inspect and inspect --verify (--scheduler local:2), and one process decompressing every chunk of every array."""
    from atcache.cache.inspect import inspect_cache, verify_cache
    from atcache.cache.store import CacheStore

    store = CacheStore.open(a["url"])
    nbytes = store.nbytes_stored()
    t0 = time.perf_counter()
    report = inspect_cache(a["url"], scheduler="local:2")
    t1 = time.perf_counter()
    bad = verify_cache(a["url"], scheduler="local:2")
    t2 = time.perf_counter()
    chunks = 0
    for name in store.array_names():
        arr = store.group[name]
        for k in range(store.n_chunks):
            np.asarray(arr[slice(*store.chunk_range(k))])
            chunks += 1
    for name in store.replay_array_names():
        arr = store.group[name]
        for u in range(store.n_chunks, store.n_units):
            e, lo, hi = store.replay_unit(u)
            np.asarray(arr[e, lo:hi])
            chunks += 1
    t3 = time.perf_counter()
    assert not bad and report["rows_done"] == store.n_rows
    return {"store_bytes": nbytes, "chunks": chunks, "inspect_s": t1 - t0, "verify_s": t2 - t1, "plain_loop_s": t3 - t2,
            "verify_mb_per_s": nbytes / 1e6 / (t2 - t1), "plain_loop_mb_per_s": nbytes / 1e6 / (t3 - t2),
            "verify_chunks_per_s": chunks / (t2 - t1), "plain_chunks_per_s": chunks / (t3 - t2)}


STEPS = {"build": step_build, "open": step_open, "supply": step_supply, "augment": step_augment, "inspect": step_inspect}


# ------------------------------------------------------------------------------------------------ parent
def tree_rss(proc) -> int:
    """RSS of a process and all its descendants, bytes (shared pages counted in each)."""
    import psutil

    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def run_step(name: str, args: dict, env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, __file__, "--step", name, "--step-args", json.dumps(args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def finish(procs: list[subprocess.Popen]) -> list[dict]:
    """Wait for step processes (sampling their peak tree RSS); their JSON results with `peak_rss_mb` added."""
    import psutil

    handles = [psutil.Process(p.pid) for p in procs]
    peaks = [0] * len(procs)
    while any(p.poll() is None for p in procs):
        for k, (p, h) in enumerate(zip(procs, handles)):
            if p.poll() is None:
                try:
                    peaks[k] = max(peaks[k], tree_rss(h))
                except psutil.Error:
                    pass
        time.sleep(0.05)
    results = []
    for p, peak in zip(procs, peaks):
        out, err = p.communicate()
        if p.returncode != 0:
            raise RuntimeError(f"step failed ({p.args[3]} {p.args[5]}):\n{err[-3000:]}")
        results.append({**json.loads(out.strip().splitlines()[-1]), "peak_rss_mb": peak / 2**20})
    return results


def step(name: str, args: dict, env: dict) -> dict:
    return finish([run_step(name, args, env)])[0]


class MotoS3:
    """A moto S3 server on 127.0.0.1 with one bucket (as tests/cache/test_remote.py starts it); `env` points boto and
    s3fs at it."""

    def __enter__(self):
        import logging

        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.server.start()
        host, port = self.server.get_host_and_port()
        self.env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "testing",
                    "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
        os.environ.update(self.env)
        import boto3

        boto3.client("s3").create_bucket(Bucket="atcache-drill")
        return self

    def __exit__(self, *exc):
        self.server.stop()


def drill_size(shape: dict, backend: str, work: Path, env: dict, supply_views: int, progress) -> dict:
    """Every step at one size on one backend."""
    rows, epochs, label = shape["rows"], shape["epochs"], shape["label"]
    data = str(make_split(work / f"split-{rows}", rows))
    base = f"s3://atcache-drill/{label}" if backend == "s3" else str(work / backend / label)
    common = {"data": data, "rows": rows, "epochs": epochs, "chunk_rows": shape["chunk_rows"]}
    out = {"rows": rows, "epochs": epochs, "chunk_rows": shape["chunk_rows"], "views": rows * epochs,
           "units": -(-rows // shape["chunk_rows"]) * (1 + epochs)}
    url = f"{base}/one.zarr"
    progress(f"{backend} {label}: build half (shard 0/2)")
    out["build_half"] = step("build", {**common, "url": url, "shard": [0, 2]}, env)
    progress(f"{backend} {label}: resume the rest")
    out["resume"] = step("build", {**common, "url": url, "resume": True}, env)
    progress(f"{backend} {label}: four shards at once")
    t0, start = time.perf_counter(), time.time() + 8
    shards = finish([run_step("build", {**common, "url": f"{base}/four.zarr", "shard": [i, 4], "start_at": start}, env)
                     for i in range(4)])
    out["four_shards"] = {"seconds": max(s["seconds"] for s in shards), "wall_s": time.perf_counter() - t0 - 8,
                          "units_written": sum(s["units_written"] for s in shards),
                          "peak_rss_mb": sum(s["peak_rss_mb"] for s in shards), "shards": shards}
    out["four_shards"]["s_per_unit"] = out["four_shards"]["seconds"] / max(1, out["four_shards"]["units_written"])
    out["store_bytes"] = out["resume"]["store_bytes"]
    out["bytes_per_view"] = out["store_bytes"] / (rows * (1 + epochs))
    for mode in ("static", "streamed", "replay"):
        progress(f"{backend} {label}: open for training ({mode})")
        out[f"open_{mode}"] = step("open", {**common, "url": url, "mode": mode}, env)
    progress(f"{backend} {label}: target supply")
    out["supply"] = step("supply", {"url": url, "views": supply_views}, env)
    progress(f"{backend} {label}: inspect, inspect --verify")
    out["inspect"] = step("inspect", {"url": url}, env)
    if backend == "s3" or label != "tiny":
        for path in (url, f"{base}/four.zarr"):
            if backend == "s3":
                subprocess.run([sys.executable, "-c", f"import s3fs; s3fs.S3FileSystem().rm({path[5:]!r}, recursive=True)"],
                               env=env, check=False)
            else:
                shutil.rmtree(path, ignore_errors=True)
    return out


def claim_full(backend: str, work: Path, env: dict, shape: dict, progress) -> dict:
    """Create, claim and resume-claim an empty store of `shape` (nothing written): bookkeeping alone at that size."""
    data = str(make_split(work / f"split-{shape['rows']}", shape["rows"]))
    url = f"s3://atcache-drill/claim-{shape['label']}.zarr" if backend == "s3" else str(work / backend / f"claim-{shape['label']}.zarr")
    common = {"data": data, "rows": shape["rows"], "epochs": shape["epochs"], "chunk_rows": shape["chunk_rows"],
              "url": url, "write": False}
    if backend != "s3":  # a store left by an earlier run in the same --work
        shutil.rmtree(url, ignore_errors=True)
    progress(f"{backend} {shape['label']}: create + claim an empty store, then resume it")
    return {"create_claim": step("build", common, env), "resume_claim": step("build", {**common, "resume": True}, env),
            "units": -(-shape["rows"] // shape["chunk_rows"]) * (1 + shape["epochs"])}


def unit_overhead(backend: str, work: Path, env: dict, progress, epochs: int | None = None) -> dict:
    """The same tiny build (UNIT_OVERHEAD: 24 images at 128 px, 10 replay epochs; the same maps, so the same data
    volume) as few units (a: 24 rows a chunk) and as many (b: 1 row a chunk), each a fresh store built whole, fastest
    of `repeats`: (time_b - time_a) / (units_b - units_a) is what one more unit costs beyond its data (claims, chunk
    objects, done marks, completion check), compression of the same bytes cancelling out."""
    o = {**UNIT_OVERHEAD, **({"epochs": epochs} if epochs else {})}
    data = str(make_split(work / f"split-{o['rows']}", o["rows"]))
    out = {"rows": o["rows"], "epochs": o["epochs"], "imgsz": o["imgsz"], "builds": {}}
    for chunk_rows, replay_rows in o["chunk_rows"]:
        runs = []
        for k in range(o["repeats"]):
            name = f"overhead-{chunk_rows}-{replay_rows}-{k}.zarr"
            url = f"s3://atcache-drill/{name}" if backend == "s3" else str(work / backend / name)
            if backend != "s3":
                shutil.rmtree(url, ignore_errors=True)
            progress(f"{backend} per-unit overhead: {chunk_rows} row(s) a chunk, {replay_rows} a replay unit, "
                     f"build {k + 1}/{o['repeats']}")
            runs.append(step("build", {"data": data, "rows": o["rows"], "epochs": o["epochs"], "chunk_rows": chunk_rows,
                                       "replay_chunk_rows": replay_rows, "imgsz": o["imgsz"], "url": url}, env))
        best = min(runs, key=lambda r: r["seconds"])
        out["builds"][_build_key(chunk_rows, replay_rows)] = {
            "units": -(-o["rows"] // chunk_rows) + o["epochs"] * -(-o["rows"] // replay_rows),
            "replay_units": o["epochs"] * -(-o["rows"] // replay_rows),
            "seconds": best["seconds"], "all_seconds": [r["seconds"] for r in runs], "write_s": best["write_s"],
            "store_bytes": best["store_bytes"], "timers": best["timers"]}
    a, b, c = (out["builds"][_build_key(*x)] for x in o["chunk_rows"])
    out["s_per_unit"] = (b["seconds"] - a["seconds"]) / (b["units"] - a["units"])
    out["s_per_replay_unit"] = (c["seconds"] - a["seconds"]) / (c["replay_units"] - a["replay_units"])
    return out


def _build_key(chunk_rows: int, replay_rows: int) -> str:
    """The unit-overhead build's name in the report: '24', '1' (both alike) or '24/1' (row-chunk / replay unit)."""
    return str(chunk_rows) if chunk_rows == replay_rows else f"{chunk_rows}/{replay_rows}"


def environment() -> dict:
    import importlib.metadata as md

    cpu = platform.processor()
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    versions = {}
    for pkg in ("atcache", "zarr", "numcodecs", "numpy", "dask", "distributed", "s3fs", "moto", "ultralytics", "torch"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return {"device": cpu, "cpus": os.cpu_count(), "python": platform.python_version(), "versions": versions,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


# ------------------------------------------------------------------------------------------------ analysis
def _fit(points: list[tuple[float, float]]) -> tuple[float, float, bool]:
    """(constant, slope, flat) of the least-squares line through the measured points; flat when the slope moves the
    value by under 25 % over the measured range (then the mean is the extrapolation)."""
    x, y = np.array(points, dtype=float).T
    if len(x) < 2 or np.ptp(x) == 0:
        return float(y.mean()), 0.0, True
    slope, constant = np.polyfit(x, y, 1)
    flat = abs(slope) * np.ptp(x) < 0.25 * max(abs(y.mean()), 1e-12)
    return (float(y.mean()), 0.0, True) if flat else (float(constant), float(slope), False)


# name -> (how to read it from a measured size, unit, what it grows with: "rows" of the static arrays or "units"
# (extrapolated on the least-squares line; peak RSS: the mean when flat), "per" a per-unit or per-view cost (the mean),
# "rate" a throughput (not extrapolated))
METRICS = {
    "build_half_s": (lambda r: r["build_half"]["seconds"], "s", "units"),
    "build_half_bookkeeping_s": (lambda r: r["build_half"]["bookkeeping_s"], "s", "units"),
    "resume_s": (lambda r: r["resume"]["seconds"], "s", "units"),
    "resume_bookkeeping_s": (lambda r: r["resume"]["bookkeeping_s"], "s", "units"),
    "noncompute_s_per_unit": (lambda r: (r["build_half"]["seconds"] + r["resume"]["seconds"])
                              / max(1, r["build_half"]["units_written"] + r["resume"]["units_written"]), "s", "per"),
    "write_s_per_replay_unit": (lambda r: r["resume"]["write_s_per_replay_unit"], "s", "per"),
    "completion_check_s": (lambda r: r["resume"]["timers"].get("done_mask", {}).get("s", 0)
                           + r["resume"]["timers"].get("replay_done", {}).get("s", 0), "s", "units"),
    "sweep_s": (lambda r: r["resume"]["timers"].get("sweep", {}).get("s", 0), "s", "units"),
    "four_shards_s": (lambda r: r["four_shards"]["seconds"], "s", "units"),
    "four_shards_s_per_unit": (lambda r: r["four_shards"]["s_per_unit"], "s", "per"),
    "open_static_s": (lambda r: r["open_static"]["seconds"], "s", "rows"),
    "open_streamed_s": (lambda r: r["open_streamed"]["seconds"], "s", "rows"),
    "open_replay_s": (lambda r: r["open_replay"]["seconds"], "s", "rows"),
    "supply_static_ram_ms": (lambda r: 1e3 * r["supply"]["s_per_view"]["static_ram"], "ms", "per"),
    "supply_streamed_ms": (lambda r: 1e3 * r["supply"]["s_per_view"]["streamed"], "ms", "per"),
    "supply_replay_ms": (lambda r: 1e3 * r["supply"]["s_per_view"]["replay"], "ms", "per"),
    "inspect_s": (lambda r: r["inspect"]["inspect_s"], "s", "rows"),
    "verify_s": (lambda r: r["inspect"]["verify_s"], "s", "units"),
    "verify_mb_per_s": (lambda r: r["inspect"]["verify_mb_per_s"], "MB/s", "rate"),
    "plain_loop_mb_per_s": (lambda r: r["inspect"]["plain_loop_mb_per_s"], "MB/s", "rate"),
    "peak_rss_build_mb": (lambda r: max(r["build_half"]["peak_rss_mb"], r["resume"]["peak_rss_mb"]), "MB", "units"),
    "peak_rss_open_static_mb": (lambda r: r["open_static"]["peak_rss_mb"], "MB", "rows"),
    "peak_rss_open_streamed_mb": (lambda r: r["open_streamed"]["peak_rss_mb"], "MB", "rows"),
    "peak_rss_open_replay_mb": (lambda r: r["open_replay"]["peak_rss_mb"], "MB", "units"),
    "peak_rss_supply_mb": (lambda r: r["supply"]["peak_rss_mb"], "MB", "rows"),
    "peak_rss_inspect_mb": (lambda r: r["inspect"]["peak_rss_mb"], "MB", "units"),
}
TARGETS = {"100% VOC": (VOC_ROWS, VOC_EPOCHS), "COCO": (COCO_ROWS, COCO_EPOCHS)}


def analyse(report: dict) -> dict:
    """Per backend: the metrics of each measured size, their growth (least squares over the measured sizes, per 1,000
    units or rows and per GB), the 100 % VOC and COCO values extrapolated from it, and the budgets met or not."""
    out = {}
    for backend, b in report["backends"].items():
        sizes = b["sizes"]
        table = {label: {m: f(r) for m, (f, _, _) in METRICS.items()} for label, r in sizes.items()}
        growth, extrapolated = {}, {}
        if len(sizes) >= 2:
            for m, (_, unit, by) in METRICS.items():
                if by == "rate":
                    continue
                x = "units" if by == "per" else by
                c, slope, flat = _fit([(r[x], table[lbl][m]) for lbl, r in sizes.items()])
                if by == "per" or (flat and m.startswith("peak_rss")):
                    c, slope, flat = float(np.mean([table[lbl][m] for lbl in sizes])), 0.0, True
                elif not m.startswith("peak_rss"):
                    slope, constant = np.polyfit([r[x] for r in sizes.values()], [table[lbl][m] for lbl in sizes], 1)
                    c, slope, flat = float(constant), float(slope), False
                by = x
                per_gb = float(np.polyfit([r["store_bytes"] / 1e9 for r in sizes.values()], [table[lbl][m] for lbl in sizes], 1)[0])
                growth[m] = {"unit": unit, "grows_with": by, "flat": flat, "constant": c,
                             f"per_1000_{by}": slope * 1000, "per_gb": 0.0 if flat else per_gb}
            bpv = max(r["store_bytes"] / (r["rows"] * (1 + r["epochs"])) for r in sizes.values())
            for name, (rows, epochs) in TARGETS.items():
                x = {"rows": rows, "units": -(-rows // CHUNK_ROWS) * (1 + epochs)}
                extrapolated[name] = {"rows": rows, "epochs": epochs, "units": x["units"], "extrapolated": True,
                                      "store_gb": rows * (1 + epochs) * bpv / 1e9,
                                      **{m: max(0.0, g["constant"] + g[f"per_1000_{g['grows_with']}"] * x[g["grows_with"]] / 1000)
                                         for m, g in growth.items()}}
        out[backend] = {"table": table, "growth": growth, "extrapolated": extrapolated,
                        "budgets": budgets(backend, b, table, extrapolated, report)}
    return out


def budgets(backend: str, b: dict, table: dict, extrapolated: dict, report: dict) -> dict:
    """Each budget: the number it is held against, measured (or extrapolated, said so), met or not."""
    out = {}
    aug = report.get("augment", {}).get("s_per_sample")
    opens = [v for row in table.values() for k, v in row.items() if k.startswith("open_") and k.endswith("_s")]
    voc = [v for k, v in extrapolated.get("100% VOC", {}).items() if k.startswith("open_") and k.endswith("_s")]
    coco = [v for k, v in extrapolated.get("COCO", {}).items() if k.startswith("open_") and k.endswith("_s")]
    if table:  # sizes measured (not only the empty 100 % store or the per-unit overhead)
        worst = max(opens + voc)
        out["open_first_batch_s"] = {"value": worst, "budget": BUDGETS["open_first_batch_s"],
                                     "met": worst < BUDGETS["open_first_batch_s"],
                                     "note": "slowest mode, measured sizes" + (" and 100 % VOC (extrapolated)" if voc else "")
                                             + (f"; COCO (extrapolated): {max(coco):.3g} s" if coco else "")}
        if aug:
            worst = max(row["supply_replay_ms"] / 1e3 for row in table.values())
            out["replay_supply_fraction"] = {"value": worst / aug, "budget": BUDGETS["replay_supply_fraction"],
                                             "met": worst / aug <= BUDGETS["replay_supply_fraction"],
                                             "note": f"replay read+decode+fingerprint {worst * 1e3:.2f} ms vs augmentation "
                                                     f"{aug * 1e3:.1f} ms per sample"}
        by_units = sorted(b["sizes"], key=lambda k: b["sizes"][k]["units"])
        largest = by_units[-1]
        ratio = table[largest]["verify_mb_per_s"] / table[largest]["plain_loop_mb_per_s"]
        note = (f"inspect --verify MB/s (local:2) / one-process decompress-all MB/s at {largest}: {ratio:.2f}; "
                ">= 1: limited by disk/decompression")
        if len(by_units) > 1:  # the cost of more data apart from the cluster's start: verify's MB/s between sizes
            lo, hi = (b["sizes"][k]["inspect"] for k in (by_units[0], largest))
            marginal = (hi["store_bytes"] - lo["store_bytes"]) / 1e6 / max(1e-9, hi["verify_s"] - lo["verify_s"])
            note = (f"verify's MB/s between {by_units[0]} and {largest} ({marginal:.0f} MB/s, the local:2 cluster's "
                    f"start apart) / decompress-all MB/s at {largest}; whole runs: {ratio:.2f} at {largest}")
            ratio = marginal / table[largest]["plain_loop_mb_per_s"]
        out["verify_vs_plain_decompress"] = {"value": ratio, "budget": 1.0, "met": ratio >= 1.0, "note": note}
        rss = {m: [row[m] for row in table.values()] for m in ("peak_rss_open_streamed_mb", "peak_rss_open_replay_mb")}
        units = [r["units"] for r in b["sizes"].values()]
        growth = {m: (v[-1] - v[0]) / np.mean(v) for m, v in rss.items()}
        out["training_rss_flat"] = {"value": growth, "budget": "independent of epochs and rows",
                                    "met": all(g < 0.15 for g in growth.values()),
                                    "note": f"peak RSS (opening + first batch) change, largest vs smallest size, relative to its mean, "
                                            f"{min(units)}..{max(units)} units; met if < 15 %"}
    over = b.get("unit_overhead")
    if over:
        a_, b_, *c_ = over["builds"].values()
        note = (f"per-unit overhead: ({b_['seconds']:.2f} - {a_['seconds']:.2f} s) / ({b_['units']} - {a_['units']} units), "
                f"{over['rows']} images at {over['imgsz']} px, {over['epochs']} replay epochs")
        value = over["s_per_unit"]
        if c_:  # replay units alone: 99 % of the units of a 100-epoch build
            value = over["s_per_replay_unit"]
            note = (f"per replay unit: ({c_[0]['seconds']:.2f} - {a_['seconds']:.2f} s) / ({c_[0]['replay_units']} - "
                    f"{a_['replay_units']} replay units); static and replay units alike: {over['s_per_unit']:.3f} s "
                    f"({note.split(': ', 1)[1]})")
        key = "unit_noncompute_s3_s" if backend == "s3" else "unit_noncompute_local_s"
        out[key] = {"value": value, "budget": BUDGETS["unit_noncompute_s3_s"],
                    "met": value <= BUDGETS["unit_noncompute_s3_s"], "note": note}
    elif backend == "s3" and table:  # reports from before the per-unit overhead was measured
        per_unit = max(row["noncompute_s_per_unit"] for row in table.values())
        out["unit_noncompute_s3_s"] = {"value": per_unit, "budget": BUDGETS["unit_noncompute_s3_s"],
                                       "met": per_unit <= BUDGETS["unit_noncompute_s3_s"],
                                       "note": "(build + resume seconds) / units written, worst size"}
    claim = b.get("claim_100pct")
    if claim:
        per_builder = max(claim["create_claim"]["seconds"], claim["resume_claim"]["seconds"])
        key = "claim_resume_100pct_s3_s"
        out[key if backend == "s3" else "claim_resume_100pct_local_s"] = {
            "value": per_builder, "budget": BUDGETS[key], "met": per_builder < BUDGETS[key],
            "note": f"empty 100-epoch store ({claim['units']} units): max(create+claim, resume+claim) per builder"}
    return out


SHOWN_AS = {"noncompute_s_per_unit": "noncompute_s_per_unit (incl. zstd of 256 views at 640)"}


def markdown(report: dict) -> str:
    """The drill's table: per backend and size the main costs, growth, extrapolations and budgets."""
    a = report["analysis"]
    show = ["build_half_s", "resume_s", "noncompute_s_per_unit", "completion_check_s", "four_shards_s_per_unit",
            "open_static_s", "open_streamed_s", "open_replay_s", "supply_static_ram_ms", "supply_streamed_ms",
            "supply_replay_ms", "inspect_s", "verify_s", "verify_mb_per_s", "plain_loop_mb_per_s",
            "peak_rss_build_mb", "peak_rss_open_static_mb", "peak_rss_open_replay_mb", "peak_rss_supply_mb",
            "peak_rss_inspect_mb"]
    lines = []
    aug = report.get("augment", {}).get("s_per_sample")
    if aug:
        lines.append(f"ultralytics augmentation at 640: {aug * 1e3:.1f} ms per sample\n")
    for backend, res in a.items():
        sizes = report["backends"][backend]["sizes"]
        cols = list(res["table"]) + [f"{k} (extrapolated)" for k in res["extrapolated"]]
        shapes = ", ".join(f"{k}: {v['units']} units, {v['store_bytes'] / 1e9:.2f} GB" for k, v in sizes.items())
        lines.append(f"**{backend}** ({shapes})\n")
        lines.append("| metric | " + " | ".join(cols) + " | growth | per GB |")
        lines.append("|---" * (len(cols) + 3) + "|")
        for m in show:
            vals = [res["table"][k][m] for k in res["table"]] + [res["extrapolated"][k].get(m) for k in res["extrapolated"]]
            g = res["growth"].get(m)
            grow = ("flat" if g["flat"] else f"{_num(g['per_1000_' + g['grows_with']])} per 1000 {g['grows_with']}") if g else "-"
            lines.append(f"| {SHOWN_AS.get(m, m)} | " + " | ".join(_num(v) for v in vals)
                         + (f" | {grow} | {_num(g['per_gb'])} |" if g else " | - | - |"))
        over = report["backends"][backend].get("unit_overhead")
        if over:
            a_, b_, *c_ = over["builds"].values()
            lines.append(f"\nper-unit overhead ({over['rows']} images at {over['imgsz']} px, {over['epochs']} replay epochs, "
                         f"same maps): {a_['units']} units {a_['seconds']:.2f} s, {b_['units']} units {b_['seconds']:.2f} s "
                         f"-> {over['s_per_unit'] * 1e3:.1f} ms per unit" + (
                             f"; {c_[0]['units']} units ({c_[0]['replay_units']} replay units of 1 view) "
                             f"{c_[0]['seconds']:.2f} s -> {over['s_per_replay_unit'] * 1e3:.1f} ms per replay unit"
                             if c_ else ""))
        claim = report["backends"][backend].get("claim_100pct")
        if claim:
            lines.append(f"\nempty 100 % store ({claim['units']} units): create+claim {claim['create_claim']['seconds']:.2f} s, "
                         f"resume+claim {claim['resume_claim']['seconds']:.2f} s")
        lines.append("\n| budget | value | budget | met | note |\n|---|---|---|---|---|")
        for k, v in res["budgets"].items():
            value = v["value"] if not isinstance(v["value"], dict) else ", ".join(f"{m}: {_num(x)}" for m, x in v["value"].items())
            lines.append(f"| {k} | {_num(value) if not isinstance(value, str) else value} | {v['budget']} | "
                         f"{'met' if v['met'] else 'NOT met'} | {v['note']} |")
        lines.append("")
    return "\n".join(lines)


def _num(v) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"


# ------------------------------------------------------------------------------------------------ main
def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="0.1,1,10", help="percent of a 100-epoch VOC replay, comma-separated")
    ap.add_argument("--tiny", action="store_true", help="one tiny store (96 rows, 2 epochs): seconds")
    ap.add_argument("--s3", action="store_true", help="also on a moto S3 server on 127.0.0.1")
    ap.add_argument("--s3-sizes", default="0.1,1", help="sizes on S3 (moto keeps objects in RAM and is slow)")
    ap.add_argument("--no-local", action="store_true", help="S3 only")
    ap.add_argument("--claim-full", action="store_true", help="also create/claim/resume an empty 100 %% store")
    ap.add_argument("--no-unit-overhead", action="store_true",
                    help="skip the per-unit overhead builds (24 images at 128 px as 11 and as 264 units)")
    ap.add_argument("--supply-views", type=int, default=3000)
    ap.add_argument("--work", default="", help="scratch folder (default: a temporary one)")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--analyse-only", action="store_true", help="rebuild the analysis and table from --out")
    ap.add_argument("--merge", nargs="+", default=[],
                    help="reports merged into --out, each one's measured entries replacing the earlier ones' (then analysed)")
    ap.add_argument("--step", help=argparse.SUPPRESS)
    ap.add_argument("--step-args", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.step:
        from atcache.yolo import prepare

        prepare()
        print(json.dumps(STEPS[args.step](json.loads(args.step_args))))
        return {}
    out = Path(args.out)
    if args.merge:
        parts = [json.loads(Path(p).read_text()) for p in args.merge]
        report = {"backends": {}}
        for part in parts:  # a later report's non-empty entries replace the earlier one's, backend by backend
            report.update({k: v for k, v in part.items() if k not in ("backends", "analysis")})
            for backend, entries in part["backends"].items():
                report["backends"][backend] = {**report["backends"].get(backend, {}), **{k: v for k, v in entries.items() if v}}
    elif args.analyse_only:
        report = json.loads(out.read_text())
    else:
        report = run(args)
    report["analysis"] = analyse(report)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(markdown(report))
    return report


def run(args) -> dict:
    from tqdm import tqdm

    work = Path(args.work or tempfile.mkdtemp(prefix="scale-drill-"))
    work.mkdir(parents=True, exist_ok=True)
    report = {"environment": environment(), "budgets": BUDGETS, "backends": {},
              "method": __doc__.split("\n\n", 2)[2] if __doc__.count("\n\n") >= 2 else __doc__,
              "layers": list(LAYERS), "imgsz": IMGSZ, "chunk_rows": CHUNK_ROWS}
    plan = []
    if not args.no_local:
        plan.append(("local", [TINY] if args.tiny else [size_shape(float(s) / 100) for s in args.sizes.split(",") if s]))
    if args.s3:
        plan.append(("s3", [TINY] if args.tiny else [size_shape(float(s) / 100) for s in args.s3_sizes.split(",") if s]))
    bar = tqdm(total=sum(len(p[1]) for p in plan) + 1, desc="scale drill", unit="size", dynamic_ncols=True)
    note = tqdm.write
    env = dict(os.environ)
    note("ultralytics augmentation at 640")
    report["augment"] = step("augment", {"dir": str(work / "augment"), "samples": 8 if args.tiny else 60}, env)
    bar.update()
    supply = 200 if args.tiny else args.supply_views
    try:
        for backend, shapes in plan:
            s3 = MotoS3().__enter__() if backend == "s3" else None
            try:
                benv = {**env, **(s3.env if s3 else {})}
                b = report["backends"][backend] = {"sizes": {}}
                for shape in shapes:
                    b["sizes"][shape["label"]] = drill_size(shape, backend, work, benv, supply, note)
                    bar.update()
                if not args.no_unit_overhead:
                    b["unit_overhead"] = unit_overhead(backend, work, benv, note, epochs=2 if args.tiny else None)
                if args.claim_full:
                    b["claim_100pct"] = claim_full(backend, work, benv, size_shape(1.0), note)
            finally:
                if s3:
                    s3.__exit__()
    finally:
        bar.close()
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    return report


if __name__ == "__main__":
    main()
