"""Streaming the cache from disk vs loading it into RAM: loader throughput, training need, and block shuffling's effect
on accuracy, on the demo's synthetic data (run `atcache demo` first: it leaves runs/demo with data, teacher, cache).

    python pipelines/bench_streaming.py loader            # demo data, imgsz 128: samples/s, 0 and 2 workers
    python pipelines/bench_streaming.py accuracy          # demo student 15 epochs: full shuffle vs block shuffle
    python pipelines/bench_streaming.py big --images 600  # a bigger synthetic cache at imgsz 320: loader only
    python pipelines/bench_streaming.py scale --rows 50000  # VOC-640 geometry store, no images: target reads only,
                                                          # block-shuffled vs uniformly random order vs all in RAM

Each step merges its figures into pipelines/results/streaming_cpu.json (--json to change).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from atcache.yolo import prepare

os.environ.setdefault("YOLO_OFFLINE", "1")
DEMO = Path("runs/demo")
RESULTS = Path("pipelines/results/streaming_cpu.json")


def training_dataset(data_yaml: Path, imgsz: int, cache, batch: int):
    """The warp-mode training dataset ultralytics builds with the demo's hyperparameters, targets from `cache`: as the
    trainer builds it, each sample ships its flattened view (and a streamed cache its rows' maps) for the batch to be
    rendered on the training device (`pieces`)."""
    from atcache.tools.demo import DEMO_HYP
    from atcache.train.datasets import build_dataset
    from atcache.yolo import check_det_dataset, get_cfg

    args = get_cfg(overrides={"imgsz": imgsz, "data": str(data_yaml), **DEMO_HYP})
    data = check_det_dataset(str(data_yaml))
    return build_dataset(args, data["train"], data, batch=batch, targets=cache, target_mode=None if cache is None else "warp",
                         pieces=True)


def loader_rate(dataset, workers: int, batch: int, samples: int, streaming: bool, window: int) -> dict:
    """Samples/s through ultralytics' training DataLoader (after one warm-up batch, which starts the workers)."""
    from ultralytics.data.build import build_dataloader

    from atcache.train.streaming import BlockShuffleSampler, with_sampler

    loader = build_dataloader(dataset, batch=batch, workers=workers, shuffle=True, rank=-1)
    if streaming:
        loader = with_sampler(loader, BlockShuffleSampler(dataset.at_rows // dataset.at_cache.spec.chunk_rows, window, seed=0))

    def batches():
        while True:
            yield from loader

    it = batches()
    next(it)
    n, t0 = 0, time.perf_counter()
    while n < samples:
        n += len(next(it)["img"])
    seconds = time.perf_counter() - t0
    loader.close()
    return {"workers": loader.num_workers, "samples": n, "seconds": round(seconds, 3), "samples_per_s": n / seconds}


def loader_figures(data_yaml: Path, cache_path: Path, imgsz: int, samples: int, batch: int, window: int) -> dict:
    """In RAM vs streaming (and no targets at all), 0 and 2 workers; chunk decodes per epoch for 0 workers."""
    from atcache.train.streaming import StreamingCacheTargets
    from atcache.cache.store import CacheStore
    from atcache.train.targets import CacheTargets

    spec = CacheStore.open(cache_path).spec
    layers = spec.layer_indices
    out = {"cache": str(cache_path), "imgsz": imgsz, "chunk_rows": spec.chunk_rows, "rows": spec.n_rows,
           "layers": list(layers), "batch": batch, "window": window, "runs": {}}
    t0 = time.perf_counter()
    ram = CacheTargets.load(cache_path, layers)
    out["ram_load_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    stream = StreamingCacheTargets.open(cache_path, layers)
    out["stream_open_s"] = time.perf_counter() - t0
    for workers in (0, 2):
        for name, cache in (("plain", None), ("ram", ram), ("stream", stream)):
            ds = training_dataset(data_yaml, imgsz, cache, batch)
            if name == "stream":
                cache.capacity = 2 * window + 2
                cache.decoded.clear()
            r = loader_rate(ds, workers, batch, samples, name == "stream", window)
            if name == "stream" and workers == 0:  # warm-up batch included; an LRU that holds every chunk decodes each once
                r["epochs_read"] = (r["samples"] + batch) / len(ds)
                r["chunk_decodes"] = sum(cache.decoded.values())
                r["chunks"] = len(set((ds.at_rows // spec.chunk_rows).tolist()))
                r["lru_chunks"] = cache.capacity
            out["runs"][f"{name}_w{workers}"] = r
            print(name, workers, r, flush=True)
    return out


def training_need(data_yaml: Path, cache_path: Path, imgsz: int, batch: int, window: int, steps: int) -> dict:
    """The trainer's img/s (median step) with the cache in RAM and streamed, ultralytics' real loop, same settings."""
    from atcache.tools.demo import DEMO_HYP
    from atcache.tools.measure import measure_training
    from atcache.cache.store import CacheStore
    from atcache.train.trainer import DistillSettings

    layers = tuple((i, i) for i in CacheStore.open(cache_path).spec.layer_indices)
    overrides = {"model": "yolo11n.yaml", "data": str(data_yaml), "epochs": 3, "imgsz": imgsz, "batch": batch,
                 "device": "cpu", "plots": False, "seed": 0, "deterministic": True, "project": "runs/bench_streaming",
                 "exist_ok": True, **DEMO_HYP}
    out = {}
    for name, stream in (("ram", False), ("stream", True)):
        s = DistillSettings(mode="cache", cache=str(cache_path), layers=layers, stream=stream, shuffle_window=window)
        r = measure_training(s, {**overrides, "name": f"need_{name}"}, steps=steps, warmup=3)
        out[name] = {k: r[k] for k in ("img_per_s", "median_step_s", "steps", "peak_mem_gb", "device")}
        print("training", name, out[name], flush=True)
    return out


def accuracy(data_yaml: Path, cache_path: Path, imgsz: int, epochs: int, windows: list[int], seeds: list[int]) -> dict:
    """The demo student trained from the cache: ultralytics' full shuffle (in RAM) vs the block-shuffled streaming
    sampler, same seed, same everything else."""
    from atcache.tools.demo import DEMO_HYP
    from atcache.tools.measure import measure_training
    from atcache.cache.store import CacheStore
    from atcache.train.trainer import DistillSettings

    spec = CacheStore.open(cache_path).spec
    layers = tuple((i, i) for i in spec.layer_indices)
    overrides = {"model": "yolo11n.yaml", "data": str(data_yaml), "epochs": epochs, "imgsz": imgsz, "batch": 16,
                 "device": "cpu", "workers": 2, "plots": False, "deterministic": True, "exist_ok": True,
                 "project": str(Path("runs/bench_streaming").resolve()), **DEMO_HYP}
    plans = [("shuffle", None)] + [(f"block_w{w}", w) for w in windows]
    out = {"cache": str(cache_path), "chunk_rows": spec.chunk_rows, "rows": spec.n_rows, "epochs": epochs, "runs": {}}
    for seed in seeds:
        for name, window in plans:
            s = DistillSettings(mode="cache", cache=str(cache_path), layers=layers, stream=window is not None,
                                shuffle_window=window or 1)
            r = measure_training(s, {**overrides, "seed": seed, "name": f"acc_{name}_s{seed}"})
            m = r.get("metrics", {})
            out["runs"][f"{name}_seed{seed}"] = {
                "window_chunks": window, "seed": seed, "mAP50": m.get("metrics/mAP50(B)"),
                "mAP50-95": m.get("metrics/mAP50-95(B)"), "img_per_s": r["img_per_s"], "mean_epoch_s": r["mean_epoch_s"],
            }
            print(name, seed, out["runs"][f"{name}_seed{seed}"], flush=True)
    return out


def build(data_yaml: Path, teacher: str, out: Path, imgsz: int, chunk_rows: int) -> Path:
    from atcache.teacher.pipeline import BuildConfig, build_cache

    if not (out / "zarr.json").is_file():
        build_cache(BuildConfig(teacher=teacher, data=str(data_yaml), out=str(out), split="train", imgsz=imgsz,
                                batch=16, device="cpu", workers=2, chunk_rows=chunk_rows, progress=False))
    return out


def synthetic_store(path: Path, rows: int, chunk_rows: int) -> Path:
    """A finished store with the reference setup's six layers at imgsz 640 (40x40, 20x20, 40x40, 80x80, 40x40, 20x20 maps) and
    smooth random maps (they compress like real ones), written chunk by chunk through CacheStore."""
    from atcache.cache.synthetic import fake_spec, fake_store, seed_layers

    if not (path / "zarr.json").is_file():
        fake_store(path, fake_spec(seed_layers(640), rows, chunk_rows))
    return path


def scale_figures(path: Path, window: int, random_rows: int) -> dict:
    """Rows/s of static targets (every layer of a row) read through StreamingCacheTargets in one block-shuffled epoch
    and in a uniformly random order (first `random_rows` rows), each with the LRU train-from-cache would give it;
    and the time and RAM to load every map instead."""
    import numpy as np

    from atcache.train.streaming import StreamingCacheTargets, epoch_order, lru_chunks
    from atcache.cache.store import CacheStore
    from atcache.train.targets import CacheTargets
    from atcache.train.trainer import ram_need_gb

    store = CacheStore.open(path)
    layers = store.spec.layer_indices
    chunk_of = np.arange(store.n_rows) // store.spec.chunk_rows
    capacity = lru_chunks(window, store.spec.chunk_rows, 16 * 8)  # batch 16: ultralytics' buffer of 8 batches
    out = {"rows": store.n_rows, "chunk_rows": store.spec.chunk_rows, "chunks": store.n_chunks, "window": window,
           "lru_chunks": capacity, "store_mb": round(store.nbytes_stored() / 1e6, 1),
           "ram_need_gb": round(ram_need_gb(store.spec, layers), 3)}
    orders = {"block_shuffled": epoch_order(chunk_of, window, seed=0, epoch=0),
              "uniform_random": np.random.default_rng(0).permutation(store.n_rows)[:random_rows]}
    for name, order in orders.items():
        reader = StreamingCacheTargets.open(path, layers, capacity=capacity)
        t0 = time.perf_counter()
        for row in order.tolist():
            reader.static(row)
        seconds = time.perf_counter() - t0
        out[name] = {"rows_read": len(order), "seconds": round(seconds, 2), "rows_per_s": round(len(order) / seconds, 1),
                     "chunk_decodes": int(sum(reader.decoded.values())),
                     "decodes_per_chunk_touched": round(sum(reader.decoded.values()) / max(len(reader.decoded), 1), 2)}
    t0 = time.perf_counter()
    CacheTargets.load(path, layers)
    out["in_ram_load_s"] = round(time.perf_counter() - t0, 2)
    return out


def merge(path: Path, key: str, value: dict) -> None:
    from atcache.tools.measure import device_name

    report = json.loads(path.read_text()) if path.is_file() else {}
    report["device"] = device_name("cpu")
    report["torch_threads"] = __import__("torch").get_num_threads()
    value = {**value, "load_average_at_end": os.getloadavg()}  # other jobs shared these 2 cores: timings are noisy
    if "runs" in report.get(key, {}) and "runs" in value:  # e.g. another seed: keep the runs measured before
        value = {**value, "runs": {**report[key]["runs"], **value["runs"]}}
    report[key] = value
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("step", choices=["loader", "accuracy", "big", "scale"])
    p.add_argument("--demo", type=Path, default=DEMO)
    p.add_argument("--json", type=Path, default=RESULTS)
    p.add_argument("--samples", type=int, default=320)
    p.add_argument("--window", type=int, default=4)
    p.add_argument("--chunk-rows", type=int, default=16, help="accuracy: rows per chunk of the cache built for it")
    p.add_argument("--windows", default="1,4", help="accuracy: shuffle windows (chunks) to compare")
    p.add_argument("--seeds", default="0")
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--images", type=int, default=600, help="big: synthetic images")
    p.add_argument("--rows", type=int, default=50000, help="scale: rows of the synthetic store")
    p.add_argument("--random-rows", type=int, default=1500, help="scale: rows read in uniformly random order")
    a = p.parse_args(argv)
    prepare(a.demo / "ultralytics")
    demo = a.demo.resolve()
    data_yaml = demo / "data" / "VOC" / "VOC.yaml"
    teacher = str(demo / "teacher" / "weights" / "best.pt")
    if a.step == "scale":
        store = synthetic_store(Path("runs/bench_streaming") / f"scale_{a.rows}.zarr", a.rows, 256)
        merge(a.json, f"scale_voc640_{a.rows}", scale_figures(store, a.window, a.random_rows))
        return
    if a.step == "loader":
        cache = demo / "teacher_cache.zarr"
        figures = loader_figures(data_yaml, cache, 128, a.samples, 16, a.window)
        figures["training"] = training_need(data_yaml, cache, 128, 16, a.window, steps=12)
        merge(a.json, "loader_demo_128", figures)
    elif a.step == "accuracy":
        cache = build(data_yaml, teacher, Path("runs/bench_streaming") / f"demo_r{a.chunk_rows}.zarr", 128, a.chunk_rows)
        merge(a.json, "accuracy_demo_128", accuracy(data_yaml, cache.resolve(), 128, a.epochs,
                                                    [int(w) for w in a.windows.split(",")],
                                                    [int(s) for s in a.seeds.split(",")]))
    else:
        from atcache.data.synthetic import make_demo_data
        from atcache.yolo import save_random_teacher
        from atcache.data.voc import prepare_voc

        root = Path("runs/bench_streaming/big").resolve()
        data_yaml = root / "VOC" / "VOC.yaml"
        if not data_yaml.is_file():
            devkit = make_demo_data(root / "data", images=a.images, size=400, seed=1)
            data_yaml = prepare_voc(devkit, root / "VOC")
        teacher = str(save_random_teacher("yolo11s.yaml", root / "teacher_s.pt", nc=20, imgsz=320))
        cache = build(data_yaml, teacher, root / "cache_320.zarr", 320, 64)
        figures = loader_figures(data_yaml, cache, 320, a.samples, 16, a.window)
        figures["training"] = training_need(data_yaml, cache, 320, 16, a.window, steps=8)
        merge(a.json, "loader_big_320", figures)


if __name__ == "__main__":
    main(sys.argv[1:])
