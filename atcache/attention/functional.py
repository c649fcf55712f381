"""Attention-transfer math (Zagoruyko & Komodakis, ICLR 2017): pure torch functions, no state.

A feature map F (N, C, H, W) becomes a spatial map A (N, H, W):
    a = reduce_c |F_c|^p            (kind: "sum_p" = sum over c, "sum" = sum of |F|, "max_p" = max over c)
    A = a / (||a||_2 + eps)         (L2 norm over (H, W), per sample)
AT loss per layer: ||A_S - A_T||_2 / N over the whole batch (norm="batch", the reference) or the mean of per-image
norms (norm="per-image"); see layer_at_loss for how each scales with N.
(`agreement.map_agreement` compares stored or rendered maps, in numpy, the same way everywhere.)
"""

from __future__ import annotations

from typing import Sequence

import torch

from atcache.config import AT_NORMS, ATTENTION_KINDS

EPS = 1e-8
KINDS = ATTENTION_KINDS


def raw_attention(fm: torch.Tensor, p: float = 2.0, kind: str = "sum_p") -> torch.Tensor:
    """Un-normalised map a (N, H, W) in float32; fp16/bf16 inputs are upcast first (|F|^2 summed over
    hundreds of channels overflows fp16)."""
    if fm.ndim != 4:
        raise ValueError(f"expected a feature map (N, C, H, W), got shape {tuple(fm.shape)}")
    if kind not in KINDS:
        raise ValueError(f"unknown attention kind {kind!r}; choose one of {', '.join(KINDS)}")
    x = fm.float().abs()
    if kind == "sum":
        return x.sum(dim=1)
    x = x.pow(p)
    return x.sum(dim=1) if kind == "sum_p" else x.amax(dim=1)


def normalise(a: torch.Tensor, eps: float = EPS) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, ||a||_2): the map divided by its per-sample L2 norm over (H, W), and that norm (N,)."""
    norm = torch.linalg.vector_norm(a, ord=2, dim=(1, 2))  # (N,)
    return a / (norm[:, None, None] + eps), norm


def attention_map(fm: torch.Tensor, p: float = 2.0, kind: str = "sum_p", eps: float = EPS) -> torch.Tensor:
    """Normalised spatial attention map A (N, H, W), float32; the reference setup's formula for kind="sum_p"."""
    return normalise(raw_attention(fm, p, kind), eps)[0]


def attention_with_norm(
    fm: torch.Tensor, p: float = 2.0, kind: str = "sum_p", eps: float = EPS
) -> tuple[torch.Tensor, torch.Tensor]:
    """(A (N, H, W), ||a||_2 (N,)): the map and the norm it was divided by, as the cache stores them."""
    return normalise(raw_attention(fm, p, kind), eps)


def layer_at_loss(student_map: torch.Tensor, teacher_map: torch.Tensor, norm: str = "batch") -> torch.Tensor:
    """One layer's AT loss between maps (N, H, W) (any (N, ...) shape); a 0-d float32 tensor.
        norm="batch" (the reference setup's): ||A_S - A_T||_2 / N, one L2 (Frobenius) norm over the whole batch's
            difference; for i.i.d. per-image differences of norm d it is ~ sqrt(N) d / N = d / sqrt(N): falls as
            1/sqrt(N) beside ultralytics' per-image detection loss.
        norm="per-image": mean over i of ||A_S,i - A_T,i||_2: ~ d whatever N (equal to "batch" at N = 1)."""
    if student_map.shape != teacher_map.shape:
        raise ValueError(
            f"attention maps differ in shape: student {tuple(student_map.shape)} vs teacher {tuple(teacher_map.shape)}"
        )
    if norm not in AT_NORMS:
        raise ValueError(f"unknown AT norm {norm!r}; choose one of {', '.join(AT_NORMS)}")
    diff = student_map.float() - teacher_map.to(device=student_map.device, dtype=torch.float32)
    if norm == "per-image":
        return torch.linalg.vector_norm(diff.flatten(1), ord=2, dim=1).mean()
    return torch.linalg.vector_norm(diff) / student_map.shape[0]


def at_loss(student_maps: Sequence[torch.Tensor], teacher_maps: Sequence[torch.Tensor],
            norm: str = "batch") -> torch.Tensor:
    """Sum over layers of layer_at_loss(A_S, A_T, norm), maps (N, H_l, W_l) per layer; norm="batch" is the reference
    setup's ||A_S - A_T||_2 / N (weight ~ 1/sqrt(N) per image), "per-image" the mean of per-image norms (independent
    of N). Gradients flow to the student maps only."""
    if len(student_maps) != len(teacher_maps):
        raise ValueError(f"layer count mismatch: {len(student_maps)} student vs {len(teacher_maps)} teacher maps")
    if not student_maps:
        raise ValueError("at_loss needs at least one layer")
    return sum(layer_at_loss(s, t.detach(), norm) for s, t in zip(student_maps, teacher_maps))
