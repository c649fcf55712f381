"""Stage 2's data side: the cache loaded into RAM (or streamed, see `streaming.py`), joined to training images by
path, and each sample's targets aligned with the augmentation it received.

`--targets warp`: ultralytics' own Mosaic / RandomPerspective / MixUp / RandomFlip / LetterBox instances are kept
(defaults, close_mosaic and all) and taught to record, next to the image, the view tree of `geometry.py` (which source
rows, which matrices, which blend ratio). Each layer's target is that view rendered from the cached energy
(map x norm) at the layer's stride, then renormalised.
`--targets static`: only letterbox + photometric augmentation, so the cached maps are exact targets.
Imports ultralytics: import this module after `env.prepare()`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from atcache.yolo import (
    Albumentations, Compose, CopyPaste, CutMix, Format, LetterBox, MixUp, Mosaic, RandomFlip, RandomHSV,
    RandomPerspective,
)
from atcache.yolo import YOLODataset

from atcache.config import TARGET_MODES
from atcache.errors import AtcacheError
from atcache.train.views import (
    Blend, Canvas, Placed, Source, View, bilinear, flip_matrix, render_grids, resize_matrix, translation, warp,
)
from atcache.data.splits import relative_to_root
from atcache.train.render import PIECES_KEY, BatchRenderer, collate_pieces, flatten
from atcache.cache.format import CacheSpec, LetterboxTable
from atcache.cache.format import decode_maps
from atcache.cache.store import CacheStore

VIEW_KEY = "atcache_view"
TARGETS_KEY = "at_targets"


class TargetRendering:
    """Targets from cached rows: needs `spec`, `layers`, `letterbox`, `files`, `done`, `grey` and the row readers
    `map_row(layer, row)` (H, W) float16 and `norm(layer, row)`; shared by the in-RAM and the streaming cache."""

    spec: CacheSpec
    layers: tuple[int, ...]
    letterbox: LetterboxTable
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
        pad_top, pad_left = self.letterbox["pad_top"], self.letterbox["pad_left"]
        centre = (s - 1) / 2.0

        def sample(source: Source, xy: np.ndarray) -> np.ndarray:
            top, left = pad_top[source.row], pad_left[source.row]
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
    """A finished cache in RAM: maps[layer] (N, H, W) as stored (float16, or uint8 with scales[layer] (N,): see
    store.decode_maps), norms[layer] (N,), letterbox, row of each file.

    Loaded once in the trainer process (padding energies included); forked loader workers share the arrays
    copy-on-write, and `batch_renderer` holds them as tensors for rendering whole batches on the training device."""

    spec: CacheSpec
    layers: tuple[int, ...]  # cache layer indices, in the order targets are returned
    maps: dict[int, np.ndarray]
    norms: dict[int, np.ndarray]
    letterbox: LetterboxTable
    files: np.ndarray
    done: np.ndarray
    grey: dict[int, float] = field(default_factory=dict)  # per layer: see padding_energy
    scales: dict[int, np.ndarray] | None = None  # uint8 maps only

    @classmethod
    def load(cls, cache: "str | Path | CacheStore", layers: Sequence[int]) -> "CacheTargets":
        """Read the maps of `layers` into RAM as stored, every chunk checked (`train.check_cache` makes the other
        refusals)."""
        store = cache if isinstance(cache, CacheStore) else CacheStore.open(cache)
        done = store.done_mask()
        maps, norms, scales = {}, {}, {}
        for i in layers:
            maps[i], norms[i], scales[i] = store.read_stored_layer(i, done=done)
            maps[i] = np.ascontiguousarray(maps[i])
        letterbox = store.letterbox()
        targets = cls(spec=store.spec, layers=tuple(layers), maps=maps, norms=norms, letterbox=letterbox,
                      files=store.files(), done=done, scales=scales if store.spec.map_dtype == "uint8" else None)
        targets.grey = {i: padding_energy(targets.energy_of(i), letterbox, done, store.spec.layer(i).stride)
                        for i in layers}
        return targets

    def map_row(self, layer: int, row: int) -> np.ndarray:
        if self.scales is None:
            return self.maps[layer][row]
        return decode_maps(self.maps[layer][row:row + 1], self.scales[layer][row:row + 1])[0]

    def norm(self, layer: int, row: int) -> float:
        return self.norms[layer][row]

    def energy_of(self, layer: int):
        """row -> (H, W) float32 energy of `layer`."""
        return lambda row: self.energy(layer, row)

    def pad_of(self, row: int) -> tuple[float, float]:
        """(top, left) letterbox pad of a row."""
        return float(self.letterbox["pad_top"][row]), float(self.letterbox["pad_left"][row])

    def batch_renderer(self, device) -> BatchRenderer:
        """The maps as tensors on `device` (shared, not copied, on a CPU) for rendering whole batches there."""
        return BatchRenderer({i: self.maps[i] for i in self.layers}, self.norms, self.scales,
                             {i: self.stride(i) for i in self.layers}, self.grey, self.spec.eps, device)

    def ram_bytes(self) -> int:
        """Bytes of the maps, norms and scales held."""
        held = list(self.maps.values()) + list(self.norms.values()) + list((self.scales or {}).values())
        return sum(a.nbytes for a in held)


def padding_energy(energy, letterbox: LetterboxTable, done: np.ndarray, stride: int, sample: int = 2000) -> float:
    """The teacher's typical energy on the grey fill: the median energy of cached cells that lie wholly in letterbox
    padding (over up to `sample` done rows; `energy(row)` -> (H, W) float32). Warped targets use it where no image is
    near a cell."""
    rows = np.flatnonzero(done)
    if not len(rows):
        return 0.0
    values = []
    box = {c: letterbox[c].astype(int) for c in ("h", "w", "pad_top", "pad_left")}
    for row in rows[np.linspace(0, len(rows) - 1, min(len(rows), sample)).astype(int)]:
        e = energy(row)
        gh, gw = e.shape
        ys, xs = np.arange(gh) * stride, np.arange(gw) * stride
        h, w, top, left = (box[c][row] for c in ("h", "w", "pad_top", "pad_left"))
        mask = ((ys + stride <= top) | (ys >= top + h))[:, None] | ((xs + stride <= left) | (xs >= left + w))[None, :]
        if mask.any():
            values.append(e[mask])
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


# ---------------------------------------------------------------------- recording views through ultralytics' transforms
# Subclasses of ultralytics' geometric transforms with the same state and randomness and one extra step: they update
# labels[VIEW_KEY]. `_track_transforms` swaps them in, so the images stay exactly what plain ultralytics produces.
class TrackedMosaic(Mosaic):
    def apply_image(self, labels, params=None):
        labels = super().apply_image(labels, params)
        if self.n == 4:
            placed = [(item["labels_patch"], item["padw"], item["padh"]) for item in params["layout"]]
        else:  # 9 tiles on a 3s canvas, then the centre 2s crop
            placed = [(item["labels_patch"], item["padw"] + self.border[0], item["padh"] + self.border[1])
                      for item in params["layout"]]
        tiles = tuple(Placed(patch[VIEW_KEY], translation(dx, dy)) for patch, dx, dy in placed)
        labels[VIEW_KEY] = Canvas(tuple(labels["img"].shape[:2]), tiles, "mosaic")
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


def _track_transforms(transforms) -> None:
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


def _static_transforms(imgsz: int, hyp) -> list:
    """Letterbox (as the cache) + photometric augmentation only: the cached maps are the exact targets."""
    return [LetterBox(new_shape=(imgsz, imgsz), scaleup=False, center=True),
            RandomHSV(hgain=hyp.hsv_h, sgain=hyp.hsv_s, vgain=hyp.hsv_v)]


class TargetDataset(YOLODataset):
    """ultralytics' YOLODataset whose samples also carry `at_targets`: one (H/s, W/s) map per cached layer.

    Made from the dataset ultralytics built (see `attach_targets`), so every other behaviour stays its own."""

    at_cache: TargetRendering  # CacheTargets (in RAM), streaming.StreamingCacheTargets, or replay.ReplayTargets
    at_rows: np.ndarray
    at_mode: str
    at_pieces: bool = False  # warp: ship flattened views (PIECES_KEY), rendered per batch by render.BatchRenderer

    def build_transforms(self, hyp):
        transforms = super().build_transforms(hyp)
        if self.at_mode == "static":
            transforms.transforms[:-1] = _static_transforms(self.imgsz, hyp)  # keep Format
        else:
            _track_transforms(transforms)
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
        if self.at_mode == "warp" and self.at_pieces:  # rendered with the whole batch on the training device
            labels[PIECES_KEY] = flatten(view, self.at_cache.pad_of)
            return labels, view
        if self.at_mode == "replay":  # the teacher's maps on this very image (seeding.py sets at_epoch)
            maps = self.at_cache.maps(self.at_epoch, index, labels["img"])
        elif self.at_mode == "static":
            maps = self.at_cache.static(view.row)
        else:
            maps = self.at_cache.warped(view)
        labels[TARGETS_KEY] = [torch.from_numpy(m) for m in maps]
        return labels, view

    @staticmethod
    def collate_fn(batch):
        if PIECES_KEY in batch[0]:
            pieces = collate_pieces([b.pop(PIECES_KEY) for b in batch])
            out = YOLODataset.collate_fn(batch)
            out[PIECES_KEY] = pieces
            return out
        targets = [b.pop(TARGETS_KEY) for b in batch]
        out = YOLODataset.collate_fn(batch)
        out[TARGETS_KEY] = [torch.stack(layer) for layer in zip(*targets)]
        return out


def attach_targets(dataset: YOLODataset, cache: TargetRendering, mode: str, root: str | Path, hyp,
                   pieces: bool = False) -> TargetDataset:
    """Turn the YOLODataset ultralytics built for training into a TargetDataset over `cache` (rows joined by path).
    pieces=True (warp targets from a cache in RAM): samples carry their flattened view (`at_pieces`) instead of
    rendered targets, for `render.BatchRenderer` to render the whole batch on the training device."""
    if type(dataset) is not YOLODataset:
        raise AtcacheError(f"cached targets need a plain detection dataset, got {type(dataset).__name__}; use task=detect")
    if mode not in TARGET_MODES:
        raise AtcacheError(f"--targets {mode!r} is unknown; choose warp, static or replay")
    if dataset.rect:
        raise AtcacheError("rect=True training is not supported with cached targets; drop rect")
    rows = np.arange(len(dataset)) if mode == "replay" else cache.rows_for(dataset.im_files, root)
    dataset.__class__ = TargetDataset
    dataset.at_cache, dataset.at_rows, dataset.at_mode = cache, rows, mode
    dataset.at_pieces = pieces and mode == "warp" and isinstance(cache, CacheTargets)
    dataset.transforms = dataset.build_transforms(hyp)
    return dataset
