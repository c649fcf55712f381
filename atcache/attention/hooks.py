"""Forward hooks on `model.model[i]` that capture the feature maps of chosen layers (teacher and student alike)."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from atcache.errors import AtcacheError


class _StopForward(Exception):
    """Raised by the last hook to skip the layers (and the Detect head) that no cached layer needs."""


def _layer_modules(model: nn.Module) -> nn.ModuleList | nn.Sequential:
    """The indexable layer list of an ultralytics model (`model.model`), unwrapping DDP/EMA-style wrappers."""
    inner = getattr(model, "module", model)
    layers = getattr(inner, "model", None)
    if not isinstance(layers, (nn.Sequential, nn.ModuleList)):
        raise AtcacheError(f"{type(inner).__name__} has no ultralytics layer list `model.model`; pass a YOLO detection model")
    return layers


def _check_layer_indices(model: nn.Module, layers: Sequence[int]) -> None:
    n = len(_layer_modules(model))
    bad = [i for i in layers if not 0 <= i < n]
    if bad:
        raise AtcacheError(f"layer {bad[0]} does not exist: this model has layers 0..{n - 1}; choose --layers among them")
    if len(set(layers)) != len(layers):
        raise AtcacheError(f"--layers lists a layer twice: {list(layers)}")


class FeatureHooks:
    """While attached, `self.features[i]` holds the latest output (N, C, H, W) of layer i: `attach()` / `detach()`,
    or `with FeatureHooks(...) as hooks:`. With `stop_after_last=True` the forward pass is cut after the deepest hooked
    layer (use `run(model, x)`)."""

    def __init__(self, model: nn.Module, layers: Sequence[int], stop_after_last: bool = False):
        _check_layer_indices(model, layers)
        self.model, self.layers, self.stop = model, tuple(layers), stop_after_last
        self.features: dict[int, torch.Tensor] = {}
        self._handles: list = []

    def attach(self) -> "FeatureHooks":
        modules = _layer_modules(self.model)
        last = max(self.layers)
        for i in self.layers:
            self._handles.append(modules[i].register_forward_hook(self._make_hook(i, i == last and self.stop)))
        return self

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def __enter__(self) -> "FeatureHooks":
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.detach()

    def _make_hook(self, index: int, stop: bool):
        def hook(_module, _inputs, output):
            if not (isinstance(output, torch.Tensor) and output.ndim == 4):
                raise AtcacheError(
                    f"layer {index} outputs {type(output).__name__}"
                    f"{' of shape ' + str(tuple(output.shape)) if isinstance(output, torch.Tensor) else ''}, "
                    "not a feature map (N, C, H, W); choose a backbone/neck layer before the Detect head"
                )
            self.features[index] = output
            if stop:
                raise _StopForward

        return hook

    def run(self, model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
        """Forward `x` and return the feature maps in `layers` order; the pass stops early when `stop_after_last` is set."""
        self.features = {}
        try:
            model(x)
        except _StopForward:
            pass
        return [self.features[i] for i in self.layers]


def probe_layers(model: nn.Module, layers: Sequence[int], imgsz: int, device: torch.device) -> list[tuple[int, int, int]]:
    """(channels, H, W) of each layer for a (1, 3, imgsz, imgsz) input: validates the layer choice before a build."""
    x = torch.zeros(1, 3, imgsz, imgsz, device=device)
    with torch.no_grad(), FeatureHooks(model, layers, stop_after_last=True) as hooks:
        feats = hooks.run(model, x)
    return [tuple(f.shape[1:]) for f in feats]
