"""Bytes per view of the replay arrays of a uint8 cache, codec by codec, on a trained teacher's maps: what every
stored view costs (replay/maps/<i>, replay/scales/<i>, replay/norms/<i>, replay/sample, replay/record, replay/done),
written by zarr into memory with each codec chain and chunk shape and summed chunk by chunk, and the precision of the
store's uint8 encoding (cosine of each decoded map to the teacher's float32 map, worst and mean).

Views: seeded augmented training views as `build-cache --replay-epochs` makes them (the training dataset of
atcache.train.replay with ultralytics' default augmentation, positions 0.. of a mosaic epoch and of a close_mosaic
epoch in EpochSampler order), and letterboxed training images (the rows of the main arrays) for comparison.
Only codecs of the Zarr v3 specification (bytes, transpose, blosc, zstd, gzip, crc32c), which every Zarr v3 reader
decodes. The layers of a view kept together (one array of the six maps concatenated) are measured in the codec table;
`--store-layout` measures only the store's own replay arrays, written by atcache.cache.layout as a build writes them
(store format 3, the only one: maps of all layers in one array, per-view statistics in one), array by array.

    python pipelines/bench_view_codecs.py --teacher runs/accuracy/teacher/weights/best.pt \
        --data runs/accuracy/data/VOC/VOC.yaml --imgsz 640 --json pipelines/results/view_codecs_cpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numcodecs
import numpy as np
import torch
import zarr
from zarr.codecs import BloscCodec, BloscShuffle, Crc32cCodec, GzipCodec, TransposeCodec, ZstdCodec

from atcache.cache.format import FORMAT_VERSION, decode_maps, encode_maps, map_compressors, small_compressors

SMALL = ("scales", "norms", "sample", "record", "done")  # the per-view arrays besides the maps
CNAMES = ("blosclz", "lz4", "lz4hc", "zlib", "zstd")
SHUFFLES = {"noshuffle": BloscShuffle.noshuffle, "shuffle": BloscShuffle.shuffle, "bitshuffle": BloscShuffle.bitshuffle}


# ---------------------------------------------------------------------------------------------- views and maps
def replay_views(teacher, data: str, imgsz: int, layers, epochs: int, seed: int, counts: dict[int, int], batch: int):
    """{epoch: dict(maps {layer: (n, H, W) float32}, norms {layer: (n,)}, sample (n,) int32, record (n,) uint64)}
    of positions 0..n-1 of each epoch, as the replay build computes them."""
    from atcache.attention.recipe import layer_maps
    from atcache.train.replay import augment_settings, fingerprint, training_dataset
    from atcache.train.samplers import EpochSampler

    hyp = augment_settings({}, epochs, imgsz)
    dataset, _ = training_dataset(data, hyp, seed)
    m = len(dataset)
    out = {}
    for epoch, n in counts.items():
        order = EpochSampler(m, seed).order(epoch)[:n]
        keys = order + epoch * m
        maps, norms, records = {i: [] for i in layers}, {i: [] for i in layers}, []
        for s in range(0, n, batch):
            b = dataset.collate_fn([dataset[int(k)] for k in keys[s:s + batch]])
            a, nr = layer_maps(teacher, b["img"], layers, 2.0, "sum_p", 1e-8, amp=False)
            records += [fingerprint(im) for im in b["img"]]
            for i, x, y in zip(layers, a, nr):
                maps[i].append(x.numpy())
                norms[i].append(y.numpy())
        out[epoch] = {"maps": {i: np.concatenate(v) for i, v in maps.items()},
                      "norms": {i: np.concatenate(v) for i, v in norms.items()},
                      "sample": order.astype(np.int32), "record": np.array(records, dtype=np.uint64)}
    return out, m, hyp


def letterboxed_views(teacher, data: str, imgsz: int, layers, n: int, batch: int):
    """The same record for letterboxed training images 0..n-1 (sample = row, record = row)."""
    from atcache.attention.recipe import layer_maps
    from atcache.data.splits import LetterboxedImages, split_files

    split = split_files(data, "train")
    n = min(n, len(split.files))
    loader = torch.utils.data.DataLoader(LetterboxedImages(split, range(n), imgsz), batch_size=batch)
    maps, norms = {i: [] for i in layers}, {i: [] for i in layers}
    for _, images, _, _ in loader:
        a, nr = layer_maps(teacher, images, layers, 2.0, "sum_p", 1e-8, amp=False)
        for i, x, y in zip(layers, a, nr):
            maps[i].append(x.numpy())
            norms[i].append(y.numpy())
    return {"maps": {i: np.concatenate(v) for i, v in maps.items()},
            "norms": {i: np.concatenate(v) for i, v in norms.items()},
            "sample": np.arange(n, dtype=np.int32), "record": np.arange(n, dtype=np.uint64)}


def encode(views: dict) -> dict:
    """The stored arrays of a set of views: uint8 maps and scales from float16 maps (as the replay build hands them to
    the store), float32 norms, sample, record, done; and the cosine of each decoded map to its float32 map."""
    stored = {"maps": {}, "scales": {}, "norms": {}, "cosine": {}, "cosine_float16": {}}
    for i, x in views["maps"].items():
        half = x.astype(np.float16)
        q, s = encode_maps(half, "uint8")
        stored["maps"][i], stored["scales"][i] = q, s
        stored["norms"][i] = views["norms"][i].astype(np.float32)
        stored["cosine"][i] = cosine(decode_maps(q, s), x)
        stored["cosine_float16"][i] = cosine(half, x)
    stored["sample"], stored["record"] = views["sample"], views["record"]
    stored["done"] = np.ones(len(views["sample"]), dtype=bool)
    return stored


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a.astype(np.float64).reshape(len(a), -1)
    b = b.astype(np.float64).reshape(len(b), -1)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


# ---------------------------------------------------------------------------------------------- bytes in zarr
def written_bytes(arrays: list[tuple], chunk_rows: int) -> dict[str, int]:
    """{name: bytes of its chunk files} for arrays [(name, data (n, ...), fill, compressors, filters)], each written
    by zarr as a replay array: shape (1, n, ...), chunks (1, chunk_rows, ...)."""
    store = zarr.storage.MemoryStore()
    group = zarr.open_group(store, mode="w")
    for name, data, fill, compressors, filters in arrays:
        a = group.create_array(name, shape=(1, *data.shape), chunks=(1, chunk_rows, *data.shape[1:]), dtype=data.dtype,
                               fill_value=fill, compressors=compressors, filters=filters or None)
        a[0] = data
    sizes = {name: 0 for name, *_ in arrays}
    for key, buf in store._store_dict.items():
        if not key.endswith("zarr.json"):
            sizes[key.rsplit("/c/", 1)[0]] += len(buf)
    return sizes


def map_chain(kind: str, **kw) -> tuple[list, list]:
    """(compressors, filters) of a uint8 map codec chain, crc32c last as the store writes it."""
    filters = [TransposeCodec(order=kw.pop("order"))] if "order" in kw else []
    if kind == "blosc":
        comp = BloscCodec(**{"typesize": 1, **kw})
    elif kind == "zstd":
        comp = ZstdCodec(**kw)
    elif kind == "gzip":
        comp = GzipCodec(**kw)
    else:
        comp = None
    return ([comp] if comp else []) + [Crc32cCodec()], filters


def chain_name(compressors: list, filters: list) -> str:
    parts = [f"transpose{tuple(f.order)}" for f in filters]
    for c in compressors:
        if isinstance(c, BloscCodec):
            parts.append(f"blosc-{c.cname.value}-{c.clevel}-{c.shuffle.value}" + (f"-block{c.blocksize}" if c.blocksize else "")
                         + (f"-typesize{c.typesize}" if c.typesize != 1 else ""))
        elif isinstance(c, ZstdCodec):
            parts.append(f"zstd-{c.level}")
        elif isinstance(c, GzipCodec):
            parts.append(f"gzip-{c.level}")
        elif isinstance(c, Crc32cCodec):
            parts.append("crc32c")
    return " + ".join(parts)


def view_bytes(sets: list[dict], layers, chunk_rows: int, maps: tuple[list, list], small: dict[str, tuple],
               together: bool = False) -> dict:
    """Bytes per view over all view sets (each written as its own epoch's arrays): maps with chain `maps`, the small
    arrays with `small[name]` = (compressors(typesize), filters); `together`: the six maps of a view as one array."""
    total = {"maps": 0, **{k: 0 for k in SMALL}}
    views, by_set = 0, []
    for s in sets:
        n = len(s["sample"])
        views += n
        arrays = []
        if together:
            flat = np.concatenate([s["maps"][i].reshape(n, -1) for i in layers], axis=1)
            comp, filt = maps
            arrays.append(("maps/all", flat, 0, comp, [f for f in filt if len(f.order) == 3]))
        else:
            for i in layers:
                arrays.append((f"maps/{i}", s["maps"][i], 0, *maps))
        for i in layers:
            arrays.append((f"scales/{i}", s["scales"][i], np.nan, *small["scales"]))
            arrays.append((f"norms/{i}", s["norms"][i], np.nan, *small["norms"]))
        arrays += [("sample", s["sample"], -1, *small["sample"]), ("record", s["record"], 0, *small["record"]),
                   ("done", s["done"], False, *small["done"])]
        sizes = written_bytes(arrays, chunk_rows)
        for name, size in sizes.items():
            total[name.split("/")[0]] += size
        by_set.append(sum(sizes.values()) / n)
    per_view = {k: v / views for k, v in total.items()}
    return {"bytes_per_view": sum(per_view.values()), "maps": per_view["maps"],
            "small": sum(per_view[k] for k in SMALL), "by_array": per_view, "by_set": by_set}


def small_chain(compressor) -> dict[str, tuple]:
    """The small arrays' (compressors, filters), one compressor factory (typesize -> codec) for all."""
    return {"scales": ([*compressor(4)], []), "norms": ([*compressor(4)], []), "sample": ([*compressor(4)], []),
            "record": ([*compressor(8)], []), "done": ([*compressor(1)], [])}


def store_layout_bytes(views: list[dict], layers, imgsz: int, chunk_rows: int) -> dict:
    """Bytes per view of the store's replay arrays, created and packed by atcache.cache.layout as a build writes them
    (units of `chunk_rows` views; views: the float32 maps, norms, sample and record of each set), by array."""
    import dataclasses

    from atcache.cache.format import LayerSpec, ReplaySpec
    from atcache.cache.layout import create_replay_arrays, pack_replay
    from atcache.cache.synthetic import fake_spec

    total, n_views = {}, 0
    for v in views:
        n = len(v["sample"])
        specs = tuple(LayerSpec(i, imgsz // v["maps"][i].shape[-1], 0, *v["maps"][i].shape[1:]) for i in layers)
        spec = dataclasses.replace(fake_spec(specs, n, chunk_rows, imgsz), map_dtype="uint8",
                                   replay=ReplaySpec(1, 0, n, chunk_rows, "bench", {}))
        store = zarr.storage.MemoryStore()
        group = zarr.open_group(store, mode="w")
        create_replay_arrays(group, spec)
        for a in range(0, n, chunk_rows):
            b = min(n, a + chunk_rows)
            values = pack_replay(spec, {i: v["maps"][i][a:b].astype(np.float16) for i in layers},
                                 {i: v["norms"][i][a:b] for i in layers}, None)
            values.update({"replay/sample": v["sample"][a:b], "replay/record": v["record"][a:b],
                           "replay/done": np.ones(b - a, dtype=bool)})
            for name, x in values.items():
                group[name][0, a:b] = x
        for key, buf in store._store_dict.items():
            if not key.endswith("zarr.json"):
                name = key.rsplit("/c/", 1)[0]
                total[name] = total.get(name, 0) + len(buf)
        n_views += n
    by_array = {k: t / n_views for k, t in total.items()}
    return {"bytes_per_view": sum(by_array.values()), "by_array": by_array, "views": n_views,
            "chunk_rows": chunk_rows, "arrays_per_unit": len(by_array)}


# ---------------------------------------------------------------------------------------------- the table
def map_variants() -> list[tuple[str, tuple[list, list]]]:
    """(group, chain) of every map codec chain compared at the store's chunk rows."""
    out = [("store", (map_compressors("uint8"), []))]
    levels = (1, 5, 9)
    for cname in CNAMES:
        for shuffle in SHUFFLES:
            for clevel in levels:
                out.append(("blosc", map_chain("blosc", cname=cname, clevel=clevel, shuffle=shuffle)))
    for level in (3, 9, 15, 19, 22):
        out.append(("zstd", map_chain("zstd", level=level)))
    for level in (1, 6, 9):
        out.append(("gzip", map_chain("gzip", level=level)))
    out.append(("none", map_chain("none")))
    for blocksize in (1 << 16, 1 << 18, 1 << 20, 1 << 22):  # blosc's block: each is compressed on its own
        for shuffle in ("noshuffle", "bitshuffle"):
            out.append(("blosc block", map_chain("blosc", cname="zstd", clevel=9, shuffle=shuffle, blocksize=blocksize)))
    for typesize in (2, 4, 8):  # shuffle's typesize over uint8: interleaved columns apart
        for shuffle in ("shuffle", "bitshuffle"):
            out.append(("blosc typesize", map_chain("blosc", cname="zstd", clevel=9, shuffle=shuffle, typesize=typesize)))
    for order in ((0, 1, 3, 2), (0, 2, 3, 1)):  # x-major maps; each pixel's values across the chunk's views together
        for chain in (dict(kind="blosc", cname="zstd", clevel=9, shuffle="noshuffle"),
                      dict(kind="blosc", cname="zstd", clevel=9, shuffle="bitshuffle"), dict(kind="zstd", level=19)):
            chain = dict(chain)
            out.append(("transpose", map_chain(chain.pop("kind"), order=order, **chain)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--imgsz", type=int, default=640)
    ap.add_argument("--layers", default="6,8,13,16,19,22")
    ap.add_argument("--epochs", type=int, default=30, help="training epochs the replay views are drawn from "
                    "(close_mosaic: the last 10 have no mosaic)")
    ap.add_argument("--aug-seed", type=int, default=0)
    ap.add_argument("--mosaic-views", type=int, default=512, help="views of epoch 0 (mosaic)")
    ap.add_argument("--plain-views", type=int, default=256, help="views of the last epoch (close_mosaic)")
    ap.add_argument("--letterboxed", type=int, default=256, help="letterboxed training images")
    ap.add_argument("--chunk-rows", default="64,256,1024", help="replay chunk rows R' compared (the store's: 256)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--maps", help="an .npz of the views' float32 maps: read if it exists, else written after computing")
    ap.add_argument("--store-layout", action="store_true",
                    help="only the store's own replay arrays (atcache.cache.layout), at --chunk-rows' first value")
    ap.add_argument("--json", required=True)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    numcodecs.blosc.use_threads = False
    zarr.config.set({"threading.max_workers": 1})
    layers = tuple(int(x) for x in args.layers.split(","))
    rows = [int(x) for x in args.chunk_rows.split(",")]
    t0 = time.perf_counter()

    counts = {0: args.mosaic_views, args.epochs - 1: args.plain_views}
    if args.maps and Path(args.maps).exists():
        saved = np.load(args.maps, allow_pickle=True)
        raw, samples = saved["views"].item(), int(saved["samples"])
    else:
        from atcache.yolo import load_model, prepare

        prepare()
        teacher = load_model(args.teacher, device="cpu").model.float().eval()
        replay, samples, _ = replay_views(teacher, args.data, args.imgsz, layers, args.epochs, args.aug_seed,
                                          counts, args.batch)
        raw = {f"epoch {e}": v for e, v in replay.items()}
        raw["letterboxed"] = letterboxed_views(teacher, args.data, args.imgsz, layers, args.letterboxed, args.batch)
        if args.maps:
            np.savez(args.maps, views=np.array(raw, dtype=object), samples=samples)
    compute_s = time.perf_counter() - t0
    if args.store_layout:
        report = {"teacher": args.teacher, "data": args.data, "imgsz": args.imgsz, "layers": list(layers),
                  "settings": {"epochs": args.epochs, "aug_seed": args.aug_seed, "dataset_samples": samples,
                               "views": {k: len(v["sample"]) for k, v in raw.items()}},
                  "device": _device(), "versions": {"zarr": zarr.__version__, "numcodecs": numcodecs.__version__,
                                                    "torch": torch.__version__, "ultralytics": _ultralytics()},
                  "compute_s": compute_s,
                  "formats": {str(FORMAT_VERSION): {
                      "replay": store_layout_bytes([v for k, v in raw.items() if k != "letterboxed"], layers,
                                                   args.imgsz, rows[0]),
                      "letterboxed": store_layout_bytes([raw["letterboxed"]], layers, args.imgsz, rows[0])}}}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        for version, kinds in report["formats"].items():
            for kind, r in kinds.items():
                print(f"format {version} {kind}: {r['bytes_per_view']:.1f} B/view in {r['arrays_per_unit']} arrays (" +
                      ", ".join(f"{k} {b:.1f}" for k, b in r["by_array"].items()) + ")")
        return
    stored = {name: encode(v) for name, v in raw.items()}
    replay_sets = [stored[k] for k in stored if k != "letterboxed"]
    letterboxed = [stored["letterboxed"]]

    def precision(sets):
        per_layer = {}
        for i in layers:
            c = np.concatenate([s["cosine"][i] for s in sets])
            h = np.concatenate([s["cosine_float16"][i] for s in sets])
            per_layer[str(i)] = {"min": float(c.min()), "mean": float(c.mean()), "float16_min": float(h.min())}
        allc = np.concatenate([s["cosine"][i] for s in sets for i in layers])
        return {"min": float(allc.min()), "mean": float(allc.mean()), "layers": per_layer}

    store_small = small_chain(small_compressors)
    table = []

    def measure(group, name, sets_name, sets, r, maps, small=store_small, together=False, small_name="store"):
        t = time.perf_counter()
        res = view_bytes(sets, layers, r, maps, small, together)
        row = {"views": sets_name, "group": group, "maps_codec": name, "small_codec": small_name, "chunk_rows": r,
               "layers_together": together, **res, "seconds": time.perf_counter() - t}
        table.append(row)
        print(f"{sets_name:11s} R'={r:5d} {'together ' if together else ''}{name:60s} small {small_name:22s} "
              f"{row['bytes_per_view']:8.1f} B/view (maps {row['maps']:.1f}, small {row['small']:.1f})", flush=True)
        return row

    for sets_name, sets in (("replay", replay_sets), ("letterboxed", letterboxed)):
        for group, maps in map_variants():
            measure(group, chain_name(*maps), sets_name, sets, 256, maps)
    # the best map chains at every chunk rows, and with the layers of a view kept together
    best = sorted((r for r in table if r["views"] == "replay"), key=lambda r: r["maps"])
    seen, top = set(), []
    for r in best:
        if r["maps_codec"] not in seen:
            seen.add(r["maps_codec"])
            top.append(r["maps_codec"])
    chains = {chain_name(*m): m for _, m in map_variants()}
    for name in dict.fromkeys(top[:4] + [chain_name(map_compressors("uint8"), [])]):
        for sets_name, sets in (("replay", replay_sets), ("letterboxed", letterboxed)):
            for r in rows:
                if r != 256:
                    measure("chunk rows", name, sets_name, sets, r, chains[name])
            if not chains[name][1]:
                measure("layers together", name, sets_name, sets, 256, chains[name], together=True)
    # the small arrays' codecs, maps as the best chain
    small_variants = {
        "blosc-zstd-9-shuffle": lambda t: [BloscCodec(cname="zstd", clevel=9, shuffle=BloscShuffle.shuffle, typesize=t), Crc32cCodec()],
        "blosc-zstd-9-bitshuffle": lambda t: [BloscCodec(cname="zstd", clevel=9, shuffle=BloscShuffle.bitshuffle, typesize=t), Crc32cCodec()],
        "blosc-lz4-5-bitshuffle": lambda t: [BloscCodec(cname="lz4", clevel=5, shuffle=BloscShuffle.bitshuffle, typesize=t), Crc32cCodec()],
        "zstd-19": lambda t: [ZstdCodec(level=19), Crc32cCodec()],
        "none": lambda t: [Crc32cCodec()],
    }
    for sname, make in small_variants.items():
        measure("small arrays", top[0], "replay", replay_sets, 256, chains[top[0]], small_chain(make), small_name=sname)

    # context, not a codec: fewer levels change the stored values (and what a reader must know to decode them)
    quantisation = []
    for power, levels in ((0.5, 255), (0.5, 191), (0.5, 159), (0.5, 127), (0.5, 111), (0.5, 95), (1.0, 255)):
        sets, worst, mean = [], 1.0, []
        for name in stored:
            if name == "letterboxed":
                continue
            s = dict(stored[name], maps={})
            for i, x in raw[name]["maps"].items():
                half = x.astype(np.float32).astype(np.float16).astype(np.float32)
                scale = half.reshape(len(x), -1).max(1)[:, None, None]
                q = np.round(levels * np.clip(half / scale, 0, 1) ** power).astype(np.uint8)
                c = cosine(scale * (q / levels) ** (1 / power), x)
                worst, s["maps"][i] = min(worst, float(c.min())), q
                mean.append(c)
            sets.append(s)
        row = {"power": power, "levels": levels, "min_cosine": worst, "mean_cosine": float(np.concatenate(mean).mean())}
        for name in (chain_name(map_compressors("uint8"), []), top[0]):
            row[name] = view_bytes(sets, layers, 256, chains[name], store_small)["bytes_per_view"]
        quantisation.append(row)
        print(f"(A/max)^{power} x {levels}: min cosine {worst:.6f}  " +
              "  ".join(f"{k} {v:.0f} B/view" for k, v in row.items() if "+" in k), flush=True)

    report = {
        "teacher": args.teacher, "data": args.data, "imgsz": args.imgsz, "layers": list(layers),
        "map_sizes": {str(i): list(stored["letterboxed"]["maps"][i].shape[1:]) for i in layers},
        "settings": {"epochs": args.epochs, "aug_seed": args.aug_seed, "views": {k: len(v["sample"]) for k, v in stored.items()},
                     "dataset_samples": samples, "chunk_rows": rows, "augment": "ultralytics defaults",
                     "quantisation": "q = round(255 sqrt(A / max A)) of the float16 maps, float32 scale per map",
                     "bytes": "chunk files as zarr writes them (zarr.json metadata not counted), per stored view"},
        "device": _device(), "versions": {"zarr": zarr.__version__, "numcodecs": numcodecs.__version__,
                                          "torch": torch.__version__, "numpy": np.__version__,
                                          "python": platform.python_version(), "ultralytics": _ultralytics()},
        "raw_uint8_bytes_per_view": int(sum(np.prod(stored["letterboxed"]["maps"][i].shape[1:]) for i in layers)),
        "precision": {"replay": precision(replay_sets), "letterboxed": precision(letterboxed)},
        "compute_s": compute_s, "table": table, "quantisation_context": quantisation,
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    print(f"precision (replay): min cosine {report['precision']['replay']['min']:.6f} "
          f"mean {report['precision']['replay']['mean']:.7f}")


def _device() -> str:
    from atcache.tools.measure import device_name

    return device_name("cpu")


def _ultralytics() -> str:
    import ultralytics

    return ultralytics.__version__


if __name__ == "__main__":
    main()
