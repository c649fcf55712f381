"""Cached teacher input gradients for gradient-based AT from a cache (`train-from-cache --targets static
--gradient-weight B`): J_T of each batch image is its cache row's grad/direction * grad/norm (the letterboxed image as
cached, i.e. what static targets train on), and the student's J_S is pooled by the cache's gradient_stride before
gradient_at_loss, the same term train-online computes with a live teacher. No ultralytics import.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from atcache.attention.gradient import join, pool_gradient
from atcache.config import DistillSettings
from atcache.errors import AtcacheError
from atcache.cache.store import CacheStore


def check_gradient_mode(s: DistillSettings) -> None:
    """Refuse, in one line, --gradient-weight where no J_T exists: plain training, or cached warp/replay targets."""
    if not s.gradient_weight or s.mode == "online":
        return
    if s.mode != "cache":
        raise AtcacheError("--gradient-weight needs the teacher's input gradients: use train-online, or "
                           "train-from-cache --targets static on a cache built with build-cache --gradient")
    if s.targets == "warp":
        raise AtcacheError("--gradient-weight cannot use --targets warp: a mosaic's loss is not a warp of per-image "
                           "losses, so its input gradient is not one of the cached ones; use --targets static")
    if s.targets == "replay":
        raise AtcacheError("--gradient-weight cannot use --targets replay: replay arrays hold no input gradients yet; "
                           "use --targets static")


def check_gradient_cache(s: DistillSettings, store: CacheStore, streaming: bool) -> None:
    """Refuse, in one line, a cache run with --gradient-weight on a cache without gradients or streamed from disk."""
    if not s.gradient_weight or s.mode != "cache":
        return
    if not store.spec.gradient_stride:
        raise AtcacheError(f"cache {s.cache} holds no input gradients for --gradient-weight; build it with "
                           "build-cache --gradient")
    if streaming:
        raise AtcacheError(f"--gradient-weight loads cache {s.cache}'s input gradients into RAM and does not stream "
                           "them; raise --ram-budget or pass --no-stream")


class CachedGradients:
    """The cache's input gradients in RAM (direction float16, norm float32) and each training image's row."""

    def __init__(self, direction: np.ndarray, norm: np.ndarray, stride: int, imgsz: int, row_of: dict[str, int]):
        self.direction, self.norm = torch.from_numpy(direction), torch.from_numpy(norm)
        self.stride, self.imgsz, self.row_of = stride, imgsz, row_of

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
        """J_T (N, 3, G, G) float32 = direction * norm of the batch's rows, on the batch's device."""
        rows = self.rows(batch)
        return join(self.direction[rows], self.norm[rows]).to(batch["img"].device)

    def pool(self, J_S: torch.Tensor) -> torch.Tensor:
        """J_S pooled by the cache's gradient_stride; a batch at another size than the cache's is refused."""
        if tuple(J_S.shape[-2:]) != (self.imgsz, self.imgsz):
            raise AtcacheError(f"--gradient-weight compares with gradients cached at imgsz {self.imgsz}, but this batch "
                               f"is {tuple(J_S.shape[-2:])}; drop multi_scale")
        return pool_gradient(J_S, self.stride)
