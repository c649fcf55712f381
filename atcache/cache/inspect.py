"""Looking inside a cache with dask: `open_cache` for notebooks, and `atcache inspect`'s statistics, integrity check
(`--verify`) and comparison of two caches (`--compare`). Everything is computed chunk by chunk over the Zarr arrays
(dask arrays with the store's own chunks), never by loading a whole store into RAM."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

import dask
import dask.array as da
import numpy as np

from atcache.attention.agreement import map_agreement
from atcache.errors import AtcacheError, first_line
from atcache.scheduler import dask_scheduler
from atcache.cache.format import CacheSpec, LetterboxTable
from atcache.cache import arrays
from atcache.cache.integrity import unit_problems
from atcache.cache.store import CacheStore

NORM_TOLERANCE = 5e-3  # |(||A||_2) - 1| allowed for a float16 map of unit norm
VALUE_BINS = 50
NORM_BINS = 40


@dataclass(frozen=True)
class CacheView:
    """A cache opened read-only: its spec, the image list, and per layer dask arrays of the maps (N, H, W) and norms
    (N,), chunked as stored. `done` rows hold data; the others are NaN."""

    path: str  # local folder or fsspec URL
    spec: CacheSpec
    files: np.ndarray
    done: np.ndarray
    letterbox: LetterboxTable
    maps: dict[int, da.Array]
    norms: dict[int, da.Array]
    grad: da.Array | None = None  # --gradient: J_T (N, 3, G, G) float32 = direction * norm; None without gradients
    replay_maps: dict[int, da.Array] | None = None  # --replay-epochs: per layer (E, M, H, W), positions in training order
    replay_grad: da.Array | None = None  # --replay-epochs with --gradient: J_T of every view (E, M, 3, G, G) float32

    @property
    def layers(self) -> tuple[int, ...]:
        return self.spec.layer_indices

    def row_of(self, file: str) -> int:
        """The row of an image given by its path relative to the dataset root."""
        hits = np.flatnonzero(self.files == file)
        if not len(hits):
            raise AtcacheError(f"{file} is not in cache {self.path}; paths are relative to the dataset root")
        return int(hits[0])


def open_cache(path: str | Path) -> CacheView:
    """Open a finished or partial cache for reading (the spec is checked as on every open)."""
    store = CacheStore.open(path)
    layers = {i: arrays.layer(store, i) for i in store.spec.layer_indices}
    return CacheView(
        path=store.path, spec=store.spec, files=store.files(), done=store.done_mask(), letterbox=store.letterbox(),
        maps={i: m for i, (m, _) in layers.items()}, norms={i: n for i, (_, n) in layers.items()},
        grad=arrays.grad(store),
        replay_maps={i: arrays.replay_maps(store, i) for i in store.spec.layer_indices} if store.spec.replay else None,
        replay_grad=arrays.replay_grad(store),
    )


# ---------------------------------------------------------------------------------------------------- statistics
def _row_figures(block: np.ndarray) -> np.ndarray:
    """Per row of a (r, H, W) map chunk: L2 norm, normalised entropy of A^2, argmax cell, non-finite count."""
    x = block.reshape(len(block), -1).astype(np.float32)
    finite = np.isfinite(x)
    bad = (~finite).sum(1)
    x = np.where(finite, x, 0.0)
    sq = x * x
    norm = np.sqrt(sq.sum(1))
    p = sq / np.maximum(sq.sum(1, keepdims=True), 1e-30)
    with np.errstate(divide="ignore", invalid="ignore"):
        entropy = -np.where(p > 0, p * np.log(p), 0.0).sum(1) / np.log(max(x.shape[1], 2))
    return np.stack([norm, entropy, x.argmax(1).astype(np.float32), bad.astype(np.float32)], axis=1)


def _layer_statistics(view: CacheView, layer: int) -> dict:
    """The dask graph of one layer's figures (computed together with the other layers' by `inspect_cache`)."""
    maps, norms = view.maps[layer], view.norms[layer]
    rows = maps.map_blocks(_row_figures, dtype=np.float32, drop_axis=(1, 2), new_axis=1,
                           chunks=(maps.chunks[0], (4,)))
    values = da.histogram(maps.astype(np.float32), bins=VALUE_BINS, range=(0.0, 1.0))[0]
    return {"rows": rows, "norms": norms, "values": values}


def _summarise(x: np.ndarray) -> dict:
    """mean, std, min, 5/50/95th percentile and max of a vector (empty -> nulls)."""
    x = np.asarray(x, dtype=np.float64)
    x = x[np.isfinite(x)]
    if not len(x):
        return dict.fromkeys(("mean", "std", "min", "p5", "p50", "p95", "max"))
    p5, p50, p95 = np.percentile(x, [5, 50, 95])
    return {"mean": float(x.mean()), "std": float(x.std()), "min": float(x.min()), "p5": float(p5),
            "p50": float(p50), "p95": float(p95), "max": float(x.max())}


def inspect_cache(path: str | Path, workers: int | None = None, scheduler: str | None = None) -> dict:
    """Per layer: rows done/missing, NaN/Inf, norm check, value and norm distributions, peak heatmap, entropy; plus
    the spec and the store's size."""
    view = open_cache(path)
    done = view.done
    graphs = {i: _layer_statistics(view, i) for i in view.layers}
    with dask_scheduler(workers, scheduler):
        try:
            (computed,) = dask.compute(graphs)
        except Exception as e:  # zarr raises on a chunk whose checksum or codec fails
            raise AtcacheError(f"cache {path} has an unreadable chunk ({first_line(e)}); "
                               "run `atcache inspect --verify` to list the corrupted chunks") from e
    layers = {}
    for layer_spec in view.spec.layers:
        i = layer_spec.index
        rows, norms, values = computed[i]["rows"], np.asarray(computed[i]["norms"]), computed[i]["values"]
        norm, entropy, peak, bad = rows[done, 0], rows[done, 1], rows[done, 2].astype(np.int64), rows[done, 3]
        heat = np.bincount(peak, minlength=layer_spec.height * layer_spec.width).reshape(layer_spec.height, layer_spec.width)
        off = np.abs(norm - 1.0) > NORM_TOLERANCE
        stored = norms[done]
        positive = stored[np.isfinite(stored) & (stored > 0)]
        edges = np.linspace(np.log10(positive.min()), np.log10(positive.max()) + 1e-9, NORM_BINS + 1) if len(positive) else None
        layers[str(i)] = {
            "stride": layer_spec.stride, "shape": [layer_spec.height, layer_spec.width],
            "rows_done": int(done.sum()), "rows_missing": int((~done).sum()),
            "non_finite_values": int(bad.sum()), "rows_with_non_finite": int((bad > 0).sum()),
            "map_norm": _summarise(norm), "rows_norm_off_1": int(off.sum()),
            "value_histogram": {"edges": np.linspace(0, 1, VALUE_BINS + 1).tolist(), "counts": values.tolist()},
            "stored_norm": _summarise(stored),
            "stored_norm_log10_histogram": None if edges is None else {
                "edges": edges.tolist(), "counts": np.histogram(np.log10(positive), bins=edges)[0].tolist()},
            "entropy": _summarise(entropy),
            "peak_heatmap": heat.tolist(),
        }
    store_bytes = CacheStore.open(path).nbytes_stored()
    return {
        "path": view.path,
        "spec": view.spec.to_dict(),
        "rows": int(len(done)), "rows_done": int(done.sum()),
        "store_bytes": store_bytes, "bytes_per_image": store_bytes / max(len(done), 1),
        "layers": layers,
        **({"replay": _replay_summary(path)} if view.spec.replay else {}),
        **({"gradient": _gradient_summary(path, done)} if view.spec.gradient_stride else {}),
    }


def _gradient_summary(path, done: np.ndarray) -> dict:
    """Stride, loss gains, size and the distribution of ||J_T|| over the done rows of the stored input gradients."""
    store = CacheStore.open(path)
    spec = store.spec
    return {"stride": spec.gradient_stride, "gains": spec.gradient_gains, "shape": [3, spec.gradient_size, spec.gradient_size],
            "norm": _summarise(store.read("grad/norm")[done])}


def _replay_summary(path) -> dict:
    """Epochs, samples and positions done of the replay arrays."""
    store = CacheStore.open(path)
    done = store.replay_done()
    return {"epochs": store.spec.replay.epochs, "samples": store.spec.replay.samples, "aug_seed": store.spec.replay.aug_seed,
            "positions_done": int(done.sum()), "epochs_done": int(done.all(axis=1).sum())}


# ----------------------------------------------------------------------------------------------------- integrity
def verify_cache(path: str | Path, workers: int | None = None, scheduler: str | None = None) -> list[dict]:
    """Decode every chunk of every array (crc32c checked by zarr); one entry per chunk that fails, or a done row
    whose map is not finite, with its array, layer and row range. Each task gets a range of units and the store's
    path alone, and opens the store itself."""
    store = CacheStore.open(path)
    n = store.n_units
    per_task = max(1, min(VERIFY_UNITS_PER_TASK, -(-n // (8 * max(1, workers or os.cpu_count() or 1)))))
    tasks = [dask.delayed(_verify_units, pure=False)(store.path, a, min(a + per_task, n)) for a in range(0, n, per_task)]
    with dask_scheduler(workers, scheduler):
        results = dask.compute(*tasks)
    return [r for block in results for r in block]


VERIFY_UNITS_PER_TASK = 256  # units (row-chunks or replay chunks) one verify task reads, array by array


def _verify_units(path: str, start: int, stop: int) -> list[dict]:
    """The problems of units [start, stop) of the store at `path` (a dask task: small arguments, its own handle)."""
    store = CacheStore.open(path)
    out = []
    for name, k, problem in unit_problems(store, start, stop):
        replay = store.replay_unit(k) if name.startswith("replay/") else None
        e, a, b = replay if replay else (None, *store.chunk_range(k))
        out.append({"array": name, "chunk": k, "rows": [a, b], "error": problem, **({"epoch": e} if replay else {})})
    return out


# ----------------------------------------------------------------------------------------------------- comparing
def _pair_figures(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.stack(map_agreement(a, b), axis=1)


def compare_caches(path: str | Path, other: str | Path, workers: int | None = None, scheduler: str | None = None) -> dict:
    """Per common layer: distribution of per-image cosine similarity and AT distance ||A1 - A2||_2 over the images
    both caches hold (joined by relative path, done in both)."""
    one, two = open_cache(path), open_cache(other)
    row_of = {f: r for r, f in enumerate(two.files)}
    pairs = [(r, row_of[f]) for r, f in enumerate(one.files) if f in row_of and one.done[r] and two.done[row_of[f]]]
    if not pairs:
        raise AtcacheError(f"{path} and {other} have no finished images in common; compare caches of the same dataset")
    rows_one, rows_two = (np.array(x) for x in zip(*pairs))
    common = [i for i in one.layers if i in two.layers]
    skipped = {}
    graphs = {}
    for i in common:
        if one.maps[i].shape[1:] != two.maps[i].shape[1:]:
            skipped[str(i)] = f"shapes differ: {one.maps[i].shape[1:]} vs {two.maps[i].shape[1:]}"
            continue
        graphs[i] = da.map_blocks(_pair_figures, one.maps[i][rows_one], two.maps[i][rows_two].rechunk(one.maps[i][rows_one].chunks),
                                  dtype=np.float32, drop_axis=(1, 2), new_axis=1)
    with dask_scheduler(workers, scheduler):
        (computed,) = dask.compute(graphs)
    layers = {str(i): {"cosine": _summarise(v[:, 0]), "at_distance": _summarise(v[:, 1])} for i, v in computed.items()}
    for i in one.layers:
        if i not in two.layers:
            skipped[str(i)] = f"not in {other}"
    report = {"path": str(path), "other": str(other), "common_images": len(pairs), "layers": layers, "skipped": skipped}
    replay = _compare_replay(path, other, [i for i in common if str(i) not in skipped], workers, scheduler)
    return {**report, **({"replay": replay} if replay else {})}


def _compare_replay(path, other, layers, workers, scheduler) -> dict | None:
    """Per layer, cosine and AT distance over the replayed views both caches hold, when both replayed the same views
    (epochs, samples, image list, seed and augmentation); None otherwise."""
    one, two = CacheStore.open(path), CacheStore.open(other)
    a, b = one.spec.replay, two.spec.replay
    if a is None or b is None or dataclasses.replace(a, chunk_rows=0) != dataclasses.replace(b, chunk_rows=0):
        return None
    done = (one.replay_done() & two.replay_done()).reshape(-1)
    graphs = {}
    for i in layers:
        x, y = (arrays.replay_maps(s, i) for s in (one, two))
        x, y = (m.reshape((-1, *m.shape[2:]))[np.flatnonzero(done)] for m in (x, y))
        graphs[i] = da.map_blocks(_pair_figures, x, y.rechunk(x.chunks), dtype=np.float32, drop_axis=(1, 2), new_axis=1)
    with dask_scheduler(workers, scheduler):
        (computed,) = dask.compute(graphs)
    return {"common_views": int(done.sum()),
            "layers": {str(i): {"cosine": _summarise(v[:, 0]), "at_distance": _summarise(v[:, 1])} for i, v in computed.items()}}


# ------------------------------------------------------------------------------------------------------- printing
def format_inspection(report: dict) -> str:
    """The inspection as a compact text table (the JSON has the histograms and heatmaps)."""
    spec = report["spec"]
    lines = [
        f"cache {report['path']}",
        f"teacher {spec['teacher_name']} ({spec['teacher_weights_sha256'][:12]}), imgsz {spec['imgsz']}, p {spec['p']}, "
        f"kind {spec['kind']}, split {spec['split']}, {report['rows_done']}/{report['rows']} rows done, "
        f"{report['store_bytes'] / 1e6:.2f} MB ({report['bytes_per_image'] / 1e3:.1f} KB/image)",
        *([f"replay: {r['epochs']} epochs x {r['samples']} samples (aug-seed {r['aug_seed']}), "
           f"{r['positions_done']}/{r['epochs'] * r['samples']} views done"] if (r := report.get("replay")) else []),
        *([f"input gradients: stride {gr['stride']} ({'x'.join(map(str, gr['shape']))} per image), gains {gr['gains']}, "
           f"||J|| p50 {gr['norm']['p50']:.3g}"] if (gr := report.get("gradient")) and gr["norm"]["p50"] is not None
          else []),
        "",
        f"{'layer':>5} {'stride':>6} {'grid':>7} {'done':>7} {'missing':>7} {'non-finite':>10} {'norm!=1':>7} "
        f"{'||a|| p50':>10} {'A max':>9} {'entropy p50':>11} {'peak cell':>9}",
    ]
    for i, s in report["layers"].items():
        heat = np.asarray(s["peak_heatmap"])
        peak = np.unravel_index(int(heat.argmax()), heat.shape) if heat.sum() else ("-", "-")
        values = s["value_histogram"]
        counts, edges = np.asarray(values["counts"]), np.asarray(values["edges"])
        top = edges[np.flatnonzero(counts)[-1] + 1] if counts.sum() else float("nan")
        norm_p50 = s["stored_norm"]["p50"]
        entropy = s["entropy"]["p50"]
        lines.append(
            f"{i:>5} {s['stride']:>6} {'x'.join(map(str, s['shape'])):>7} {s['rows_done']:>7} {s['rows_missing']:>7} "
            f"{s['non_finite_values']:>10} {s['rows_norm_off_1']:>7} "
            f"{'-' if norm_p50 is None else f'{norm_p50:.3g}':>10} {top:>9.2f} "
            f"{'-' if entropy is None else f'{entropy:.3f}':>11} {f'{peak[0]},{peak[1]}':>9}")
    return "\n".join(lines)


def format_corrupted(corrupted: list[dict]) -> str:
    """`--verify`'s findings, one line per corrupted chunk."""
    return "\n".join(f"corrupted: {c['array']} chunk {c['chunk']} (rows {c['rows'][0]}-{c['rows'][1] - 1}): {c['error']}"
                     for c in corrupted)


def format_comparison(compare: dict, other: str) -> str:
    """`--compare`'s per-layer agreement with the cache `other` (and of the replayed views both hold)."""
    lines = [f"\ncompared with {other} over {compare['common_images']} common images:"]
    for i, c in compare["layers"].items():
        lines.append(f"  layer {i:>3}: cosine mean {c['cosine']['mean']:.6f} p5 {c['cosine']['p5']:.6f} min "
                     f"{c['cosine']['min']:.6f}; AT distance mean {c['at_distance']['mean']:.4g} p95 "
                     f"{c['at_distance']['p95']:.4g}")
    lines += [f"  layer {i:>3}: skipped ({why})" for i, why in compare["skipped"].items()]
    if "replay" in compare:
        lines.append(f"replayed views in common: {compare['replay']['common_views']}")
        lines += [f"  layer {i:>3}: cosine mean {c['cosine']['mean']:.6f} p5 {c['cosine']['p5']:.6f}; "
                  f"AT distance mean {c['at_distance']['mean']:.4g}" for i, c in compare["replay"]["layers"].items()]
    return "\n".join(lines)
