"""Stage 2's data side: the cache loaded into RAM (or streamed, see `streaming.py`), joined to training images by
path, and each sample's targets aligned with the augmentation it received.

`--targets warp`: ultralytics' own Mosaic / RandomPerspective / MixUp / RandomFlip / LetterBox instances are kept
(defaults, close_mosaic and all) and taught to record, next to the image, the view tree of `geometry.py` (which source
rows, which matrices, which blend ratio). Each layer's target is that view rendered from the cached energy
(map x norm) at the layer's stride, then renormalised.
`--targets static`: only letterbox + photometric augmentation, so the cached maps are exact targets.
Imports ultralytics: import this module after `env.prepare_ultralytics()`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ultralytics.data.augment import (
    Albumentations, Compose, CopyPaste, CutMix, Format, LetterBox, MixUp, Mosaic, RandomFlip, RandomHSV,
    RandomPerspective,
)
from ultralytics.data.dataset import YOLODataset

from atcache.errors import AtcacheError, first_line
from atcache.geometry import (
    Blend, Canvas, Placed, Source, View, bilinear, flip_matrix, render_grids, resize_matrix, translation, warp,
)
from atcache.data import SplitFiles, relative_to_root
from atcache.spec import CacheSpec
from atcache.store import CacheStore

VIEW_KEY = "atcache_view"
TARGETS_KEY = "at_targets"
TARGET_MODES = ("warp", "static")


def default_ram_budget_gb() -> float:
    """Half of this machine's physical memory."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30 / 2
    except (ValueError, OSError, AttributeError):
        return 8.0


class TargetRendering:
    """Targets from cached rows: needs `spec`, `layers`, `letterbox`, `files`, `done`, `grey` and the row readers
    `map_row(layer, row)` (H, W) float16 and `norm(layer, row)`; shared by the in-RAM and the streaming cache."""

    spec: CacheSpec
    layers: tuple[int, ...]
    letterbox: np.ndarray
    files: np.ndarray
    done: np.ndarray
    grey: dict[int, float]

    def rows_for(self, im_files: Sequence[str], root: str | Path) -> np.ndarray:
        """Cache row of each training image, joined by its path relative to the dataset root."""
        root = Path(root).resolve()
        return join_rows(self.files, self.done, [relative_to_root(f, root) for f in im_files])

    def stride(self, layer: int) -> int:
        return self.spec.layer(layer).stride

    def energy(self, layer: int, row: int) -> np.ndarray:
        """The un-normalised map a = A * ||a|| of one row, (H, W) float32."""
        return self.map_row(layer, row).astype(np.float32) * self.norm(layer, row)

    def leaf(self, layer: int):
        """Sampler of the cached energy at points given in a source's resized-image pixel coordinates."""
        s = self.stride(layer)
        centre = (s - 1) / 2.0

        def sample(source: Source, xy: np.ndarray) -> np.ndarray:
            top, left = self.letterbox[source.row, 4], self.letterbox[source.row, 5]
            u = (xy[:, 0] + left - centre) / s
            v = (xy[:, 1] + top - centre) / s
            energy = self.energy(layer, source.row)
            out = bilinear(energy, u, v)
            gh, gw = energy.shape  # beyond the letterboxed square the cache knows nothing: NaN (see render_grids)
            out[(u < -0.5) | (u > gw - 0.5) | (v < -0.5) | (v > gh - 0.5)] = np.nan
            return out

        return sample

    def warped(self, view: View) -> list[np.ndarray]:
        """Per layer: the view rendered from cached energy at the layer's stride, renormalised, float32."""
        leaves = [self.leaf(layer) for layer in self.layers]

        def sample(source: Source, xy: np.ndarray, grid: np.ndarray) -> np.ndarray:
            out = np.empty(len(xy), dtype=np.float64)
            for k in np.unique(grid):
                mask = grid == k
                out[mask] = leaves[k](source, xy[mask])
            return out

        energies = render_grids(view, [self.stride(layer) for layer in self.layers], sample,
                                fill=[self.grey.get(layer, 0.0) for layer in self.layers])
        return [(e / (np.linalg.norm(e) + self.spec.eps)).astype(np.float32) for e in energies]

    def static(self, row: int) -> list[np.ndarray]:
        """Per layer: the stored map A of `row` (the exact target for the un-augmented letterboxed image)."""
        return [self.map_row(layer, row).astype(np.float32) for layer in self.layers]


@dataclass
class CacheTargets(TargetRendering):
    """A finished cache in RAM: maps[layer] (N, H, W) float16, norms[layer] (N,), letterbox (N, 7), row of each file.

    Loaded once in the trainer process (padding energies included); forked loader workers share the arrays
    copy-on-write."""

    spec: CacheSpec
    layers: tuple[int, ...]  # cache layer indices, in the order targets are returned
    maps: dict[int, np.ndarray]
    norms: dict[int, np.ndarray]
    letterbox: np.ndarray
    files: np.ndarray
    done: np.ndarray
    grey: dict[int, float] = field(default_factory=dict)  # per layer: see padding_energy

    @classmethod
    def load(cls, path: str | Path, layers: Sequence[int]) -> "CacheTargets":
        """Read the maps of `layers` into RAM, every chunk checked (call `check_cache` first for the other refusals)."""
        store = CacheStore.open(path)
        done = store.done_mask()
        maps = {i: np.ascontiguousarray(read_array(store, f"maps/{i}", store.maps_array(i))) for i in layers}
        norms = {i: np.asarray(read_array(store, f"norms/{i}", store.norms_array(i)), dtype=np.float32) for i in layers}
        for i in layers:
            check_finite(store, f"maps/{i}", maps[i], done, 0)
            check_finite(store, f"norms/{i}", norms[i], done, 0)
        letterbox = read_letterbox(store)
        grey = {i: padding_energy(maps[i], norms[i], letterbox, done, store.spec.layer(i).stride) for i in layers}
        return cls(spec=store.spec, layers=tuple(layers), maps=maps, norms=norms, letterbox=letterbox,
                   files=store.files(), done=done, grey=grey)

    def map_row(self, layer: int, row: int) -> np.ndarray:
        return self.maps[layer][row]

    def norm(self, layer: int, row: int) -> float:
        return self.norms[layer][row]


# ---------------------------------------------------------------------- reading chunks without training on garbage
REPAIR_HINT = 'run "atcache inspect --verify {path}", then "atcache build-cache ... --resume --repair"'


def chunk_error(store: CacheStore, name: str, a: int, b: int, what: str) -> AtcacheError:
    """One line naming the array and rows that cannot be used, and how to find and fix the rest."""
    return AtcacheError(f"cache {store.path}: {name} rows {a}-{b - 1} {what}; {REPAIR_HINT.format(path=store.path)}")


def decode_failure(e: Exception) -> str:
    text = first_line(e)
    if "checksum" in text.lower() or "crc" in text.lower():
        return "cannot be decoded (checksum mismatch: corrupted chunk)"
    return f"cannot be decoded ({type(e).__name__}: {text})"


def read_rows(store: CacheStore, name: str, array, a: int, b: int) -> np.ndarray:
    """Rows a:b of a store array; a chunk that fails to decode (crc32c mismatch, truncated file) is one AtcacheError."""
    try:
        return np.asarray(array[a:b])
    except Exception as e:
        raise chunk_error(store, name, a, b, decode_failure(e)) from None


def read_array(store: CacheStore, name: str, array) -> np.ndarray:
    """A whole store array in one read; when that fails, the first chunk that does not decode is named."""
    try:
        return np.asarray(array[:])
    except Exception:
        for k in range(store.n_chunks):
            read_rows(store, name, array, *store.chunk_range(k))
        raise


def read_letterbox(store: CacheStore) -> np.ndarray:
    try:
        return store.letterbox()
    except Exception as e:
        raise chunk_error(store, "letterbox", 0, store.n_rows, decode_failure(e)) from None


def check_finite(store: CacheStore, name: str, values: np.ndarray, done: np.ndarray, start: int) -> None:
    """Refuse done rows (of a block starting at row `start`) that hold NaN or Inf, naming the chunk they are in."""
    finite = np.isfinite(values.reshape(len(values), -1)).all(1)
    bad = np.flatnonzero(done[start:start + len(values)] & ~finite)
    if len(bad):
        first = start + int(bad[0])
        a, b = store.chunk_range(first // store.spec.chunk_rows)
        raise chunk_error(store, name, a, b, f"hold non-finite values in {len(bad)} finished rows (first row {first})")


def padding_energy(maps: np.ndarray, norms: np.ndarray, letterbox: np.ndarray, done: np.ndarray, stride: int,
                   sample: int = 2000) -> float:
    """The teacher's typical energy on the grey fill: the median energy of cached cells that lie wholly in letterbox
    padding (over up to `sample` done rows). Warped targets use it where no image is near a cell."""
    rows = np.flatnonzero(done)
    if not len(rows):
        return 0.0
    gh, gw = maps.shape[1:]
    ys, xs = np.arange(gh) * stride, np.arange(gw) * stride
    values = []
    for row in rows[np.linspace(0, len(rows) - 1, min(len(rows), sample)).astype(int)]:
        h, w, top, left = (int(x) for x in letterbox[row, 2:6])
        mask = ((ys + stride <= top) | (ys >= top + h))[:, None] | ((xs + stride <= left) | (xs >= left + w))[None, :]
        if mask.any():
            values.append(maps[row][mask].astype(np.float32) * norms[row])
    return float(np.median(np.concatenate(values))) if values else 0.0


def join_rows(cached_files: np.ndarray, done: np.ndarray, rel_files: Sequence[str]) -> np.ndarray:
    """Rows of `rel_files` in a cache (by relative path, never by position); every one must be present and done."""
    row_of = {f: i for i, f in enumerate(cached_files)}
    rows = np.array([row_of.get(f, -1) for f in rel_files], dtype=np.int64)
    if (rows < 0).any():
        absent = [f for f, r in zip(rel_files, rows) if r < 0]
        raise AtcacheError(
            f"{len(absent)} training images are not in the cache (e.g. {absent[0]}); it was built for another "
            "dataset or split: rebuild it with `atcache build-cache --data <this data YAML> --split train`"
        )
    missing = ~done[rows]
    if missing.any():
        raise AtcacheError(
            f"the cache is incomplete: {int(missing.sum())} training images have no targets yet "
            f"(e.g. {cached_files[rows[missing][0]]}); finish it with `atcache build-cache ... --resume` "
            "(images skipped as unreadable: fix or delete them, then rebuild with --overwrite)"
        )
    return rows


def ram_need_gb(spec: CacheSpec, layers: Sequence[int]) -> float:
    """GiB the float16 maps of `layers` take in RAM when the whole cache is loaded."""
    return sum(spec.n_rows * spec.layer(i).height * spec.layer(i).width * 2 for i in layers) / 2**30


def streams(need_gb: float, ram_budget_gb: float | None, stream: bool | None) -> bool:
    """Whether training streams the cache from disk: forced by --stream/--no-stream, else when it exceeds the budget."""
    budget = default_ram_budget_gb() if ram_budget_gb is None else ram_budget_gb
    return need_gb > budget if stream is None else stream


def check_cache(path: str | Path, layers: Sequence[int], imgsz: int, split: SplitFiles,
                ram_budget_gb: float | None = None, stream: bool | None = None, ranks: int = 1) -> CacheSpec:
    """Refuse, in one line each, a cache that does not fit this run: format, layers, imgsz, dataset, completeness, RAM
    (an in-RAM cache is held once per training process on this machine: `ranks` copies under DDP)."""
    store = CacheStore.open(path)  # checks the format version
    spec = store.spec
    missing = [i for i in layers if i not in spec.layer_indices]
    if missing:
        raise AtcacheError(
            f"layer {missing[0]} is not in cache {path} (it holds layers {list(spec.layer_indices)}); "
            "choose --layers among them or rebuild the cache with the layers you need"
        )
    if spec.imgsz != imgsz:
        raise AtcacheError(
            f"cache {path} was built at imgsz {spec.imgsz} but this run trains at imgsz {imgsz}; "
            f"train with --imgsz {spec.imgsz} or rebuild the cache with build-cache --imgsz {imgsz}"
        )
    cached = store.files()
    if spec.dataset_fingerprint != split.fingerprint():
        added, removed = len(set(split.files) - set(cached)), len(set(cached) - set(split.files))
        what = f"{added} images added, {removed} removed" if added or removed else "image files were edited or replaced"
        raise AtcacheError(
            f"the training split of {split.data_yaml} differs from the one cached in {path} ({what}); "
            "rebuild the cache on this data with `atcache build-cache --overwrite`"
        )
    join_rows(cached, store.done_mask(), split.files)
    need = ram_need_gb(spec, layers) * max(1, ranks)
    budget = default_ram_budget_gb() if ram_budget_gb is None else ram_budget_gb
    if need > budget and not streams(need, budget, stream):
        copies = f" ({ranks} DDP processes on this machine, a copy each)" if ranks > 1 else ""
        raise AtcacheError(
            f"cache {path} needs {need:.2f} GiB of RAM for layers {list(layers)}{copies}, more than --ram-budget "
            f"{budget:.2f} GiB, and --no-stream keeps it in RAM; raise --ram-budget or drop --no-stream to stream it "
            "from disk chunk by chunk"
        )
    return spec


# ---------------------------------------------------------------------- recording views through ultralytics' transforms
# Subclasses of ultralytics' geometric transforms with the same state and randomness and one extra step: they update
# labels[VIEW_KEY]. `track_transforms` swaps them in, so the images stay exactly what plain ultralytics produces.
class TrackedMosaic(Mosaic):
    def apply_image(self, labels, params=None):
        labels = super().apply_image(labels, params)
        if self.n == 4:
            placed = [(item["labels_patch"], item["padw"], item["padh"]) for item in params["layout"]]
        else:  # 9 tiles on a 3s canvas, then the centre 2s crop
            placed = [(item["labels_patch"], item["padw"] + self.border[0], item["padh"] + self.border[1])
                      for item in params["layout"]]
        layers = tuple(Placed(patch[VIEW_KEY], translation(dx, dy)) for patch, dx, dy in placed)
        labels[VIEW_KEY] = Canvas(tuple(labels["img"].shape[:2]), layers, "mosaic")
        return labels


class TrackedRandomPerspective(RandomPerspective):
    def apply_image(self, labels, params=None):
        view = labels[VIEW_KEY]
        labels = super().apply_image(labels, params)
        labels[VIEW_KEY] = warp(view, params["M"], labels["img"].shape[:2], "affine")
        return labels


class TrackedMixUp(MixUp):
    def apply_image(self, labels, params=None):
        view, other = labels[VIEW_KEY], labels["mix_labels"][0][VIEW_KEY]
        labels = super().apply_image(labels, params)
        r = float(params["r"])
        labels[VIEW_KEY] = Blend(tuple(labels["img"].shape[:2]), ((view, r), (other, 1.0 - r)))
        return labels


class TrackedRandomFlip(RandomFlip):
    def apply_image(self, labels, params):
        view = labels[VIEW_KEY]
        labels = super().apply_image(labels, params)
        if params["flip"]:
            shape = tuple(labels["img"].shape[:2])
            labels[VIEW_KEY] = warp(view, flip_matrix(shape, params["direction"]), shape, "flip")
        return labels


class TrackedLetterBox(LetterBox):
    def apply_image(self, labels, params):
        view, src = labels[VIEW_KEY], tuple(labels["img"].shape[:2])
        labels = super().apply_image(labels, params)
        w, h = params["new_unpad"]
        m = translation(params["left"], params["top"]) @ resize_matrix(src, (h, w))
        labels[VIEW_KEY] = warp(view, m, labels["img"].shape[:2], "letterbox")
        return labels


TRACKED = {Mosaic: TrackedMosaic, RandomPerspective: TrackedRandomPerspective, MixUp: TrackedMixUp,
           RandomFlip: TrackedRandomFlip, LetterBox: TrackedLetterBox}
PHOTOMETRIC = (RandomHSV, Format)


def track_transforms(transforms) -> None:
    """Make every geometric transform of an ultralytics pipeline record the view; refuse what cannot be tracked."""
    seen: set[int] = set()

    def visit(t) -> None:
        if t is None or id(t) in seen:
            return
        seen.add(id(t))
        if isinstance(t, Compose):
            for child in t.transforms:
                visit(child)
            return
        if type(t) in TRACKED:
            t.__class__ = TRACKED[type(t)]
        elif isinstance(t, (CutMix, CopyPaste)):
            if t.p > 0:
                name = "cutmix" if isinstance(t, CutMix) else "copy_paste"
                raise AtcacheError(
                    f"{name}={t.p} cannot be aligned with cached attention maps; train with {name}=0 (or --targets static)"
                )
        elif isinstance(t, Albumentations):
            if t.transform is not None and getattr(t, "contains_spatial", False):
                raise AtcacheError(
                    "custom Albumentations with spatial transforms cannot be aligned with cached attention maps; "
                    "use pixel-level augmentations only"
                )
        elif not isinstance(t, PHOTOMETRIC + tuple(TRACKED.values())):
            raise AtcacheError(
                f"the training pipeline contains {type(t).__name__}, which atcache cannot align cached maps with; "
                "use ultralytics' default detection augmentations or --targets static"
            )
        visit(getattr(t, "pre_transform", None))

    visit(transforms)


def static_transforms(imgsz: int, hyp) -> list:
    """Letterbox (as the cache) + photometric augmentation only: the cached maps are the exact targets."""
    return [LetterBox(new_shape=(imgsz, imgsz), scaleup=False, center=True),
            RandomHSV(hgain=hyp.hsv_h, sgain=hyp.hsv_s, vgain=hyp.hsv_v)]


class TargetDataset(YOLODataset):
    """ultralytics' YOLODataset whose samples also carry `at_targets`: one (H/s, W/s) map per cached layer.

    Made from the dataset ultralytics built (see `attach_targets`), so every other behaviour stays its own."""

    at_cache: TargetRendering  # CacheTargets (in RAM) or streaming.StreamingCacheTargets
    at_rows: np.ndarray
    at_mode: str

    def build_transforms(self, hyp):
        transforms = super().build_transforms(hyp)
        if self.at_mode == "static":
            transforms.transforms[:-1] = static_transforms(self.imgsz, hyp)  # keep Format
        else:
            track_transforms(transforms)
        return transforms

    def get_image_and_label(self, index):
        label = super().get_image_and_label(index)
        label[VIEW_KEY] = Source(int(self.at_rows[index]), tuple(int(x) for x in label["resized_shape"]))
        return label

    def __getitem__(self, index):
        return self.sample_with_view(index)[0]

    def sample_with_view(self, index):
        """A training sample with its targets, and the view tree they were rendered from."""
        labels = self.transforms(self.get_image_and_label(index))
        view = labels.pop(VIEW_KEY)
        maps = self.at_cache.static(view.row) if self.at_mode == "static" else self.at_cache.warped(view)
        labels[TARGETS_KEY] = [torch.from_numpy(m) for m in maps]
        return labels, view

    @staticmethod
    def collate_fn(batch):
        targets = [b.pop(TARGETS_KEY) for b in batch]
        out = YOLODataset.collate_fn(batch)
        out[TARGETS_KEY] = [torch.stack(layer) for layer in zip(*targets)]
        return out


def attach_targets(dataset: YOLODataset, cache: TargetRendering, mode: str, root: str | Path, hyp) -> TargetDataset:
    """Turn the YOLODataset ultralytics built for training into a TargetDataset over `cache` (rows joined by path)."""
    if type(dataset) is not YOLODataset:
        raise AtcacheError(f"cached targets need a plain detection dataset, got {type(dataset).__name__}; use task=detect")
    if mode not in TARGET_MODES:
        raise AtcacheError(f"--targets {mode!r} is unknown; choose warp or static")
    if dataset.rect:
        raise AtcacheError("rect=True training is not supported with cached targets; drop rect")
    rows = cache.rows_for(dataset.im_files, root)
    dataset.__class__ = TargetDataset
    dataset.at_cache, dataset.at_rows, dataset.at_mode = cache, rows, mode
    dataset.transforms = dataset.build_transforms(hyp)
    return dataset
