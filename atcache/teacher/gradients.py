"""build-cache --gradient: the teacher's input gradient J_T = dL/dx of every static row (atcache.attention.gradient
has the math), beside the maps. x is the row's letterboxed image exactly as the maps' teacher sees it (RGB in [0, 1]);
L is ultralytics' detection loss of that image alone on its YOLO labels, read and letterboxed by ultralytics' own
code with the image (`data.splits.LetterboxedImages` with labels: its label check, LetterBox and Format). The maps' teacher
is fused (Conv+BN folded, and an end-to-end head's training branch removed, which its loss needs), so the gradients
come from a second, unfused copy of the same weights, in eval mode and with autograd on."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from atcache.attention.gradient import criterion, input_gradient, pool_gradient, split as split_gradient
from atcache.cache.format import CacheSpec
from atcache.errors import AtcacheError
from atcache.yolo.loss import set_loss_gains

GAIN_KEYS = ("box", "cls", "dfl")


def loss_gains(given: Sequence[float] = ()) -> dict[str, float]:
    """{"box", "cls", "dfl"}: the gains given (--gradient-gains), else ultralytics' defaults."""
    if given:
        return dict(zip(GAIN_KEYS, map(float, given)))
    from atcache.yolo import DEFAULT_CFG_DICT

    return {k: float(DEFAULT_CFG_DICT[k]) for k in GAIN_KEYS}


def gradient_teacher(teacher: str, nc: int, spec: CacheSpec, device: torch.device) -> torch.nn.Module:
    """The teacher for gradients: unfused, eval mode, on `device`, its criterion's gains those of `spec`; refused if its
    weights are not the ones the cache was made with."""
    from atcache.yolo import load_model

    loaded = load_model(teacher, nc=nc, device=device, fuse=False)
    if loaded.weights_sha256 != spec.teacher_weights_sha256:
        raise AtcacheError(f"teacher {teacher} holds other weights than the cache was built with ({spec.teacher_name}); "
                           "pass the teacher the cache was built with")
    model = loaded.model
    set_loss_gains(criterion(model), spec.gradient_gains)
    return model


def teacher_gradients(model: torch.nn.Module, images: torch.Tensor, labels: dict, stride: int,
                      ok: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(direction (n, 3, H/s, W/s) float16, norm (n,) float32) of J_T pooled by `stride` for images (n, 3, H, W) uint8
    RGB; rows not `ok` are NaN."""
    device = next(model.parameters()).device
    x = images.to(device).float().div_(255.0)
    labels = {k: v.to(device) for k, v in labels.items()}
    direction, norm = split_gradient(pool_gradient(input_gradient(model, x, labels), stride))
    direction, norm = direction.cpu().numpy().astype(np.float16), norm.cpu().numpy()
    direction[~ok] = np.nan
    norm[~ok] = np.nan
    return direction, norm
