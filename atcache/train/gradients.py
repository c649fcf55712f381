"""The teacher's input gradients J_T for gradient-based AT (`--gradient-weight B`), wherever they come from:
    online                   the teacher (unfused, eval mode) on the training batch itself, every step
    cache --targets static   each batch image's cache row: grad/direction * grad/norm (the letterboxed image as cached)
    cache --targets replay   each sample's replayed view: replay/grad/*, delivered with the sample (datasets.GRAD_KEY)
J_S and J_T are both pooled by one stride before gradient_at_loss: the cache's gradient_stride, online
--gradient-stride. No ultralytics import.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from atcache.attention.gradient import input_gradient, join, loss_labels, pool_gradient
from atcache.cache.store import CacheStore
from atcache.config import DEFAULT_GRADIENT_STRIDE, DistillSettings
from atcache.errors import AtcacheError
from atcache.train.targets import GRAD_KEY


def check_gradient_mode(s: DistillSettings) -> None:
    """Refuse, in one line, --gradient-weight where no J_T exists: plain training, or cached warp targets."""
    if s.gradient_stride is not None and s.gradient_stride < 1:
        raise AtcacheError(f"--gradient-stride {s.gradient_stride} must be a positive integer (1: full resolution)")
    if not s.gradient_weight or s.mode == "online":
        return
    if s.mode != "cache":
        raise AtcacheError("--gradient-weight needs the teacher's input gradients: use train-online, or "
                           "train-from-cache --targets static or replay on a cache built with build-cache --gradient")
    if s.targets == "warp":
        raise AtcacheError("--gradient-weight cannot use --targets warp: a mosaic's loss is not a warp of per-image "
                           "losses, so its input gradient is not one of the cached ones; use --targets static or "
                           "replay")


def check_gradient_cache(s: DistillSettings, store: CacheStore, streaming: bool) -> None:
    """Refuse, in one line, a cache run with --gradient-weight on a cache without gradients, at another stride, or
    streamed from disk."""
    if not s.gradient_weight or s.mode != "cache":
        return
    if not store.spec.gradient_stride:
        raise AtcacheError(f"cache {s.cache} holds no input gradients for --gradient-weight; build it with "
                           "build-cache --gradient")
    if s.gradient_stride is not None and s.gradient_stride != store.spec.gradient_stride:
        raise AtcacheError(f"--gradient-stride {s.gradient_stride} differs from the stride cache {s.cache} pooled its "
                           f"gradients with ({store.spec.gradient_stride}); drop --gradient-stride or rebuild with "
                           f"build-cache --gradient --gradient-stride {s.gradient_stride}")
    if streaming and s.targets == "static":
        raise AtcacheError(f"--gradient-weight loads cache {s.cache}'s input gradients into RAM and does not stream "
                           "them; raise --ram-budget or pass --no-stream")


class TeacherGradients:
    """J_T of a training batch (`teacher`) and the pooling of J_S to match it (`pool`), at one stride; `imgsz`, when
    set, is the only batch size the J_T exist for (a cache's)."""

    def __init__(self, stride: int, imgsz: int | None = None):
        self.stride, self.imgsz = stride, imgsz

    def teacher(self, batch: dict) -> torch.Tensor:
        """J_T (N, 3, H/s, W/s) float32 of the batch's images, on the batch's device; a constant."""
        raise NotImplementedError

    def pool(self, J: torch.Tensor) -> torch.Tensor:
        """J (N, 3, H, W) pooled by the stride; a batch at another size than the cached one is refused."""
        if self.imgsz is not None and tuple(J.shape[-2:]) != (self.imgsz, self.imgsz):
            raise AtcacheError(f"--gradient-weight compares with gradients cached at imgsz {self.imgsz}, but this batch "
                               f"is {tuple(J.shape[-2:])}; drop multi_scale")
        if J.shape[-1] % self.stride or J.shape[-2] % self.stride:
            raise AtcacheError(f"--gradient-stride {self.stride} does not divide the batch's size "
                               f"{tuple(J.shape[-2:])}; choose a stride that divides imgsz")
        return pool_gradient(J, self.stride)


class OnlineGradients(TeacherGradients):
    """J_T from the teacher (unfused, eval mode) on the batch, per image, pooled (train-online)."""

    def __init__(self, teacher: torch.nn.Module, stride: int | None = None):
        super().__init__(DEFAULT_GRADIENT_STRIDE if stride is None else stride)
        self.model = teacher

    def teacher(self, batch: dict) -> torch.Tensor:
        return self.pool(input_gradient(self.model, batch["img"].detach().float(), loss_labels(batch)))


class CachedGradients(TeacherGradients):
    """The cache's static gradients in RAM (direction float16, norm float32) and each training image's row."""

    def __init__(self, direction: np.ndarray, norm: np.ndarray, stride: int, imgsz: int, row_of: dict[str, int]):
        super().__init__(stride, imgsz)
        self.direction, self.norm, self.row_of = torch.from_numpy(direction), torch.from_numpy(norm), row_of

    @classmethod
    def load(cls, store: CacheStore, im_files: Sequence[str], rows: np.ndarray) -> "CachedGradients":
        """`store`'s gradients; `im_files`/`rows`: the training dataset's images and their cache rows (`at_rows`)."""
        direction = np.ascontiguousarray(store.read("grad/direction"))
        norm = np.ascontiguousarray(store.read("grad/norm")).astype(np.float32, copy=False)
        row_of = {str(Path(f)): int(r) for f, r in zip(im_files, rows)}
        return cls(direction, norm, store.spec.gradient_stride, store.spec.imgsz, row_of)

    def rows(self, batch: dict) -> torch.Tensor:
        """(N,) cache rows of the batch's images (by their im_file)."""
        return torch.tensor([self.row_of[str(Path(f))] for f in batch["im_file"]], dtype=torch.long)

    def teacher(self, batch: dict) -> torch.Tensor:
        rows = self.rows(batch)
        return join(self.direction[rows], self.norm[rows]).to(batch["img"].device)


class ReplayGradients(TeacherGradients):
    """The replayed views' J_T, which the dataset delivers with each sample (GRAD_KEY: direction, norm)."""

    def teacher(self, batch: dict) -> torch.Tensor:
        direction, norm = batch[GRAD_KEY]
        return join(direction, norm).to(batch["img"].device)
