"""atcache's training dataset: ultralytics' YOLODataset, built with the arguments ultralytics' `build_yolo_dataset`
computes (atcache.yolo.datasets.dataset_arguments), whose samples may carry cached targets (`targets`: a
`targets.TargetSource`) and whose augmentation may be seeded (`aug_seed`).

Seeded augmentation (`--aug-seed S`): every training sample's augmentation is a function of (S, epoch, dataset index)
alone, whatever the loader workers, prefetching, batch size or DDP world size. The sampler (`samplers.EpochSampler`
with encode_epoch) yields `epoch * N + index` (persistent loader workers run ahead of the trainer, so the epoch travels
with the index); the dataset decodes it, picks the epoch's pipeline (close_mosaic included) and runs ultralytics' own
transforms with python's `random` and numpy's module-level draws answered, in that thread, by generators seeded from
SeedSequence([S, epoch, index]) (`samplers.seeded_rng`: other threads' draws cannot change a view). Mosaic partners
are drawn from the whole dataset, not from a worker's buffer of recent loads.

Every dataset with targets or a seed is made by `build_dataset` (the trainer's, the replay build's, the tools'), so
they all see the same images, targets and orders. ultralytics names come through atcache.yolo.
"""

from __future__ import annotations

import contextlib
import copy
import math
from pathlib import Path

import numpy as np
import torch
from atcache.yolo import YOLODataset
from atcache.yolo.datasets import OTHER_DATASET_TASKS, dataset_arguments, loaded_shape

from atcache.config import check_targets
from atcache.errors import AtcacheError
from atcache.train.render import PIECES_KEY, collate_pieces
from atcache.train.samplers import seeded_rng
from atcache.train.targets import GRAD_KEY, TARGETS_KEY, VIEW_KEY, TargetSource
from atcache.train.transforms import static_pipeline, tracked_pipeline, unbuffered
from atcache.train.views import Source


class AtcacheDataset(YOLODataset):
    """ultralytics' YOLODataset; with `targets`, samples also carry `at_targets` (one (H/s, W/s) map per cached layer)
    or, with `pieces` (warp targets from a source that `renders_batches`), their flattened view for rendering per batch
    on the training device; with `aug_seed`, `dataset[epoch * N + index]` is sample `index` augmented as epoch `epoch`
    does it, from (aug_seed, epoch, index) alone. Everything else is ultralytics' own."""

    def __init__(self, *args, targets: TargetSource | None = None, target_mode: str | None = None,
                 root: str | Path | None = None, pieces: bool = False, aug_seed: int | None = None,
                 epochs: int | None = None, **kwargs):
        # set before ultralytics' __init__, which calls build_transforms
        self.at_cache = targets
        self.at_mode = target_mode if targets is not None else None
        self.at_pieces = bool(pieces and self.at_mode == "warp" and targets.renders_batches)
        self.at_rows: np.ndarray | None = None
        self.at_epoch: int | None = None  # the epoch of the sample being made (seeded): replay targets look it up
        self.aug_seed = None if aug_seed is None else int(aug_seed)
        super().__init__(*args, **kwargs)
        if targets is not None:
            targets.check(self.im_files, root)
            self.at_rows = targets.rows_for(self.im_files, root)
        if self.aug_seed is not None:
            hyp = kwargs["hyp"]
            closed_hyp = copy.copy(hyp)
            closed_hyp.mosaic = closed_hyp.copy_paste = closed_hyp.mixup = closed_hyp.cutmix = 0.0
            self.aug_pipelines = (self.transforms, self.build_transforms(closed_hyp))
            for p in self.aug_pipelines:
                unbuffered(p)
            epochs = hyp.epochs if epochs is None else epochs
            self.aug_close_from = epochs - hyp.close_mosaic if hyp.close_mosaic else math.inf

    # ------------------------------------------------------------------ pipelines
    def build_transforms(self, hyp):
        transforms = super().build_transforms(hyp)
        if self.at_cache is None:
            return transforms
        if self.at_mode == "static":
            return static_pipeline(transforms, self.imgsz, hyp)  # keeps Format
        return tracked_pipeline(transforms)

    def close_mosaic(self, hyp) -> None:
        """The trainer's close_mosaic: ultralytics' own, or nothing when seeded (each sample's epoch chooses its
        pipeline)."""
        if self.aug_seed is None:
            super().close_mosaic(hyp)

    # ------------------------------------------------------------------ seeding
    def decode(self, key: int) -> tuple[int, int]:
        """(epoch, dataset index) of a sampled key."""
        return divmod(int(key), len(self))

    @contextlib.contextmanager
    def seeded(self, key: int):
        """Within: the epoch's pipeline and seeded generators; yields the dataset index. Unseeded: the key is the
        index."""
        if self.aug_seed is None:
            yield key
            return
        epoch, index = self.decode(key)
        self.transforms = self.aug_pipelines[epoch >= self.aug_close_from]
        self.at_epoch = epoch
        with seeded_rng(self.aug_seed, epoch, index):
            yield index

    # ------------------------------------------------------------------ samples
    def get_image_and_label(self, index):
        label = super().get_image_and_label(index)
        if self.at_cache is not None:
            label[VIEW_KEY] = Source(int(self.at_rows[index]), loaded_shape(label))
        return label

    def __getitem__(self, key):
        if self.at_cache is not None:
            return self.sample_with_view(key)[0]
        with self.seeded(key) as index:
            return super().__getitem__(index)

    def sample_with_view(self, key):
        """A training sample with its targets, and the view tree they were rendered from (`key` as `__getitem__`)."""
        with self.seeded(key) as index:
            labels = self.transforms(self.get_image_and_label(index))
            view = labels.pop(VIEW_KEY)
            if self.at_pieces:  # rendered with the whole batch on the training device
                labels[PIECES_KEY] = self.at_cache.pieces(view)
                return labels, view
            maps = self.at_cache.targets(self.at_mode, view, self.at_epoch, index, labels["img"])
            labels[TARGETS_KEY] = [torch.from_numpy(m) for m in maps]
            if self.at_cache.gradients:  # replay targets with --gradient-weight
                direction, norm = self.at_cache.gradient(self.at_epoch, index)
                labels[GRAD_KEY] = (torch.from_numpy(direction), torch.tensor(norm, dtype=torch.float32))
            return labels, view

    @staticmethod
    def collate_fn(batch):
        if PIECES_KEY in batch[0]:
            pieces = collate_pieces([b.pop(PIECES_KEY) for b in batch])
            out = YOLODataset.collate_fn(batch)
            out[PIECES_KEY] = pieces
            return out
        if TARGETS_KEY not in batch[0]:
            return YOLODataset.collate_fn(batch)
        targets = [b.pop(TARGETS_KEY) for b in batch]
        grads = [b.pop(GRAD_KEY) for b in batch] if GRAD_KEY in batch[0] else None
        out = YOLODataset.collate_fn(batch)
        out[TARGETS_KEY] = [torch.stack(layer) for layer in zip(*targets)]
        if grads is not None:  # (direction (N, 3, G, G) float16, norm (N,) float32)
            out[GRAD_KEY] = tuple(torch.stack(part) for part in zip(*grads))
        return out


def build_dataset(cfg, img_path, data: dict, mode: str = "train", batch: int | None = 16, stride: int = 32,
                  rect: bool = False, *, targets: TargetSource | None = None, target_mode: str | None = None,
                  root: str | Path | None = None, pieces: bool = False, aug_seed: int | None = None,
                  epochs: int | None = None) -> AtcacheDataset:
    """The dataset ultralytics' `build_yolo_dataset(cfg, img_path, batch, data, mode, rect, stride)` makes, as an
    AtcacheDataset: with `targets` in `target_mode` (rows joined by path relative to `root`, default data["path"];
    `pieces`: see AtcacheDataset) and/or seeded by `aug_seed` (close_mosaic from epoch `epochs - cfg.close_mosaic`,
    `epochs` default cfg.epochs, as ultralytics' trainer switches)."""
    if cfg.task in OTHER_DATASET_TASKS:
        if targets is not None:
            raise AtcacheError(f"cached targets need a plain detection dataset, not task={cfg.task}; use task=detect")
        raise TypeError(f"atcache's dataset is a detection dataset; task={cfg.task} builds another")
    kwargs = dataset_arguments(cfg, img_path, batch, data, mode, rect, stride)
    if targets is not None:
        check_targets(target_mode, kwargs["rect"])
        if target_mode not in targets.modes:
            raise AtcacheError(f"--targets {target_mode} cannot be read from {type(targets).__name__} (it serves "
                               f"{', '.join(targets.modes)})")
    return AtcacheDataset(
        **kwargs, targets=targets, target_mode=target_mode, root=data.get("path") if root is None else root,
        pieces=pieces, aug_seed=aug_seed, epochs=epochs,
    )
