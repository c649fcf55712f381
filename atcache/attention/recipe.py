"""The one recipe for "attention maps of a model's layers on a batch of images": build-cache, online AT, fidelity,
bench and visualize all call `layer_maps`, so they compute the same thing by construction."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from atcache.attention.functional import EPS, attention_with_norm
from atcache.attention.hooks import FeatureHooks


def layer_maps(model: nn.Module, images: torch.Tensor, layers: Sequence[int], p: float = 2.0, kind: str = "sum_p",
               eps: float = EPS, amp: bool | None = None) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(maps [A (N, H, W) float32 per layer], norms [||a||_2 (N,) per layer]) for images (N, 3, H, W), uint8 0-255 or
    float 0-1, on the model's device. The forward stops after the deepest layer, runs under float16 autocast when `amp`
    (default: on CUDA), and the AT math is float32 (|F|^2 summed over channels overflows float16)."""
    device = next(model.parameters()).device
    x = images.to(device, non_blocking=True)
    if x.dtype == torch.uint8:
        x = x.float().div_(255.0)
    amp = device.type == "cuda" if amp is None else amp
    maps, norms = [], []
    with torch.no_grad(), FeatureHooks(model, layers, stop_after_last=True) as hooks:
        with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=amp):
            feats = hooks.run(model, x)
        with torch.autocast(device_type=device.type, enabled=False):
            for fm in feats:
                a, n = attention_with_norm(fm, p, kind, eps)
                maps.append(a)
                norms.append(n)
    return maps, norms
