"""Training orders: the epoch sampler (a permutation per epoch, DDP slices, the epoch carried in each key for seeded
augmentation), the chunk-grouped block-shuffle sampler of streamed caches, and the seeded generators of `--aug-seed`.
No ultralytics import."""

from __future__ import annotations

import contextlib
import functools
import math
import os
import random
import threading
from typing import Iterator, Sequence

import numpy as np
import torch

from atcache.config import DEFAULT_WINDOW


# module-level draws of python's `random` and numpy's global generator (what ultralytics' transforms call)
PY_DRAWS = ("random", "uniform", "randint", "randrange", "choice", "choices", "shuffle", "sample", "getrandbits",
            "randbytes", "gauss", "normalvariate", "lognormvariate", "expovariate", "vonmisesvariate", "gammavariate",
            "betavariate", "paretovariate", "weibullvariate", "triangular", "binomialvariate")
NP_DRAWS = ("rand", "randn", "randint", "random", "random_sample", "ranf", "sample", "uniform", "normal", "beta",
            "choice", "shuffle", "permutation", "binomial", "poisson", "exponential", "gamma", "standard_normal",
            "random_integers", "bytes")
_THREAD = threading.local()  # .generators: (random.Random, np.random.RandomState) of this thread's seeded sample
_ROUTED: set[int] = set()  # pids whose module functions are routed


def _route_module_draws() -> None:
    """Route `random.<draw>` and `np.random.<draw>` through this thread's seeded generators while it makes a seeded
    sample, to the process-global ones otherwise: another thread drawing meanwhile (dask's IO loop, a bucket client's
    retry jitter) then cannot change a view, and the view cannot change that thread's draws. Once per process."""
    if os.getpid() in _ROUTED:
        return
    _ROUTED.add(os.getpid())
    for module, names, which in ((random, PY_DRAWS, 0), (np.random, NP_DRAWS, 1)):
        for name in names:
            original = getattr(module, name, None)
            if original is None or getattr(original, "atcache_routed", False):
                continue

            def draw(*args, _original=original, _name=name, _which=which, **kwargs):
                generators = getattr(_THREAD, "generators", None)
                if generators is None:
                    return _original(*args, **kwargs)
                return getattr(generators[_which], _name)(*args, **kwargs)

            draw.atcache_routed = True
            functools.update_wrapper(draw, original)
            setattr(module, name, draw)


@contextlib.contextmanager
def seeded_rng(seed: int, epoch: int, index: int):
    """Within: python `random`'s and numpy's module-level draws, in this thread, come from generators seeded from
    (seed, epoch, index) (the same streams as `random.seed` / `np.random.seed` with that state would give), whatever
    other threads draw meanwhile; the process-global generators are left untouched."""
    _route_module_draws()
    state = np.random.SeedSequence([int(seed), int(epoch), int(index)]).generate_state(4)
    saved = getattr(_THREAD, "generators", None)
    _THREAD.generators = (random.Random(int.from_bytes(state.tobytes(), "little")), np.random.RandomState(state))
    try:
        yield
    finally:
        _THREAD.generators = saved


def rank_share(order: np.ndarray, rank: int, world_size: int) -> np.ndarray:
    """DDP rank `rank`'s contiguous slice of an epoch order (disjoint, covering; wrapped to equal lengths as torch's
    DistributedSampler pads)."""
    per = math.ceil(len(order) / world_size)
    return np.resize(order, per * world_size)[rank * per:(rank + 1) * per]


class EpochSampler(torch.utils.data.Sampler):
    """A new order of the n dataset indices at every pass, a function of (seed, epoch): `order(epoch)`; DDP ranks take
    contiguous slices. With `encode_epoch` it yields `epoch * n + index` for a seeded dataset (`datasets.py`).

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


def epoch_order(chunk_of: np.ndarray, window: int, seed: int, epoch: int) -> np.ndarray:
    """One epoch of dataset indices: the chunks (`chunk_of[i]` = chunk of sample i's row) in a random order, samples
    shuffled within each window of `window` consecutive chunks of that order; a function of (seed, epoch) only."""
    chunk_of = np.asarray(chunk_of)
    rng = np.random.default_rng([seed, epoch])
    by_chunk = np.argsort(chunk_of, kind="stable")
    _, counts = np.unique(chunk_of, return_counts=True)
    members = np.split(by_chunk, np.cumsum(counts)[:-1])
    order = rng.permutation(len(members))
    window = max(1, int(window))
    blocks = [rng.permutation(np.concatenate([members[j] for j in order[w:w + window]]))
              for w in range(0, len(order), window)]
    return np.concatenate(blocks) if blocks else np.zeros(0, dtype=np.int64)


class BlockShuffleSampler(EpochSampler):
    """Chunk-grouped, window-shuffled sample order (see `epoch_order`), a new one at every pass; epochs counted and
    DDP ranks sliced as EpochSampler does, so each rank still reads whole chunks."""

    def __init__(self, chunk_of: Sequence[int], window: int = DEFAULT_WINDOW, seed: int = 0, rank: int = 0,
                 world_size: int = 1, encode_epoch: bool = False):
        super().__init__(len(chunk_of), seed, rank, world_size, encode_epoch)
        self.chunk_of, self.window = np.asarray(chunk_of), max(1, int(window))

    def order(self, epoch: int) -> np.ndarray:
        return epoch_order(self.chunk_of, self.window, self.seed, epoch)


def lru_chunks(window: int, rows_per_chunk: float, buffer_rows: int) -> int:
    """Decoded chunks a loader process keeps: the window being read, plus every window a Mosaic partner can come from
    (the last `buffer_rows` samples of the stream; with n workers a worker's buffer spans n times its own length)."""
    return 2 * window + math.ceil(buffer_rows / max(rows_per_chunk, 1.0)) + 1
