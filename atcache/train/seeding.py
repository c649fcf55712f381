"""Seeded augmentation (`--aug-seed S`): every training sample's augmentation is a function of (S, epoch, dataset
index) alone, whatever the loader workers, prefetching, batch size or DDP world size.

The sampler yields `epoch * N + index` (persistent loader workers run ahead of the trainer, so the epoch travels with
the index); the dataset decodes it, picks the epoch's pipeline (close_mosaic included) and runs ultralytics' own
transforms with python's `random` and numpy's global generator seeded from SeedSequence([S, epoch, index]), restoring
their states afterwards. Mosaic partners are drawn from the whole dataset, not from a worker's buffer of recent loads.
Imports ultralytics through `targets`: import this module after `env.prepare()`.
"""

from __future__ import annotations

import contextlib
import copy
import math
import random
from typing import Iterator

import numpy as np
import torch
from atcache.yolo import Compose, Mosaic
from atcache.yolo import YOLODataset

from atcache.train.targets import TargetDataset


@contextlib.contextmanager
def seeded_rng(seed: int, epoch: int, index: int):
    """python `random` and numpy's global generator seeded from (seed, epoch, index); their states restored after."""
    saved = random.getstate(), np.random.get_state()
    state = np.random.SeedSequence([int(seed), int(epoch), int(index)]).generate_state(4)
    random.seed(int.from_bytes(state.tobytes(), "little"))
    np.random.seed(state)
    try:
        yield
    finally:
        random.setstate(saved[0])
        np.random.set_state(saved[1])


def rank_share(order: np.ndarray, rank: int, world_size: int) -> np.ndarray:
    """DDP rank `rank`'s contiguous slice of an epoch order (disjoint, covering; wrapped to equal lengths as torch's
    DistributedSampler pads)."""
    per = math.ceil(len(order) / world_size)
    return np.resize(order, per * world_size)[rank * per:(rank + 1) * per]


class EpochSampler(torch.utils.data.Sampler):
    """A new order of the n dataset indices at every pass, a function of (seed, epoch): `order(epoch)`; DDP ranks take
    contiguous slices. With `encode_epoch` it yields `epoch * n + index` for a SeededAugmentation dataset.

    ultralytics calls `set_epoch` only under DDP, and its persistent loader may start the next pass before that call,
    so each `__iter__` takes the next epoch and `set_epoch` only moves the counter forward, unless `exact` (the trainer
    says which epoch its restarted loader begins with: resume, close_mosaic)."""

    def __init__(self, n: int, seed: int = 0, rank: int = 0, world_size: int = 1, encode_epoch: bool = False):
        self.n, self.seed, self.rank, self.world_size = int(n), int(seed), rank, max(1, world_size)
        self.encode_epoch, self.epoch = encode_epoch, 0

    def order(self, epoch: int) -> np.ndarray:
        """This epoch's order of all n indices: a uniform permutation."""
        return np.random.default_rng([self.seed, epoch]).permutation(self.n)

    def __len__(self) -> int:
        return math.ceil(self.n / self.world_size)

    def set_epoch(self, epoch: int, exact: bool = False) -> None:
        self.epoch = int(epoch) if exact else max(self.epoch, int(epoch))

    def __iter__(self) -> Iterator[int]:
        epoch, self.epoch = self.epoch, self.epoch + 1
        share = rank_share(self.order(epoch), self.rank, self.world_size)
        return iter((share + epoch * self.n if self.encode_epoch else share).tolist())


def _unbuffered(transforms) -> None:
    """Mosaic partners from the whole dataset (seeded), not from the worker's buffer of recently loaded images."""
    for t in transforms.transforms if isinstance(transforms, Compose) else [transforms]:
        if isinstance(t, Mosaic):
            t.buffer_enabled = False
        if isinstance(t, Compose):
            _unbuffered(t)


def _seeded_class(base: type) -> type:
    """`base` whose `dataset[epoch * N + index]` is sample `index` augmented as epoch `epoch` does it, from (aug_seed,
    epoch, index) alone. Methods only: `seed_augmentation` swaps the class of the dataset ultralytics built in place.
    A TargetDataset's `sample_with_view` takes the same keys (fidelity, replay targets)."""

    def decode(self, key: int) -> tuple[int, int]:
        """(epoch, dataset index) of a sampled key."""
        return divmod(int(key), len(self))

    @contextlib.contextmanager
    def seeded(self, key: int):
        """Within: the epoch's pipeline and seeded generators; yields the dataset index."""
        epoch, index = self.decode(key)
        self.transforms = self.aug_pipelines[epoch >= self.aug_close_from]
        self.at_epoch = epoch  # replay targets are looked up by (epoch, index)
        with seeded_rng(self.aug_seed, epoch, index):
            yield index

    def close_mosaic(self, hyp) -> None:
        """The trainer's close_mosaic: nothing to do, each sample's epoch chooses its pipeline."""

    methods = {"decode": decode, "seeded": seeded, "close_mosaic": close_mosaic}
    if issubclass(base, TargetDataset):
        def sample_with_view(self, key):
            with self.seeded(key) as index:
                return base.sample_with_view(self, index)

        methods |= {"sample_with_view": sample_with_view, "__getitem__": lambda self, key: self.sample_with_view(key)[0]}
    else:
        def __getitem__(self, key):
            with self.seeded(key) as index:
                return base.__getitem__(self, index)

        methods["__getitem__"] = __getitem__
    name = f"Seeded{base.__name__}"
    return type(name, (base,), {"__module__": __name__, "__qualname__": name, "__doc__": _seeded_class.__doc__,
                                **methods})


SeededYOLODataset = _seeded_class(YOLODataset)
SeededTargetDataset = _seeded_class(TargetDataset)
SEEDED = {YOLODataset: SeededYOLODataset, TargetDataset: SeededTargetDataset}


def seed_augmentation(dataset: YOLODataset, seed: int, hyp, epochs: int) -> YOLODataset:
    """Make the training dataset ultralytics built (or its TargetDataset) seeded: both pipelines built now, close_mosaic
    from epoch `epochs - hyp.close_mosaic` (as ultralytics' trainer switches)."""
    if type(dataset) not in SEEDED:
        raise TypeError(f"seeded augmentation needs a detection dataset, got {type(dataset).__name__}")
    closed_hyp = copy.copy(hyp)
    closed_hyp.mosaic = closed_hyp.copy_paste = closed_hyp.mixup = closed_hyp.cutmix = 0.0
    pipelines = (dataset.transforms, dataset.build_transforms(closed_hyp))
    for p in pipelines:
        _unbuffered(p)
    dataset.__class__ = SEEDED[type(dataset)]
    dataset.aug_seed, dataset.aug_pipelines = int(seed), pipelines
    dataset.aug_close_from = epochs - hyp.close_mosaic if hyp.close_mosaic else math.inf
    return dataset
