"""Gradient-based attention transfer (Zagoruyko & Komodakis, ICLR 2017, sec. 3.2): pure torch functions, no state.

    J = dL(W, x)/dx                 (N, 3, H, W): x float RGB in [0, 1], L = ultralytics' detection loss
    L_AT  = L(W_S, x) + beta/2 * ||J_S - J_T||_2 / N
    L_sym = L(W, x)   + beta/2 * ||J(x) - flip(J(flip x))||_2 / N

Definitions (the ones a cache of teacher gradients and the trainer must share):
- L of a batch = sum over images of the PER-IMAGE loss: ultralytics' criterion on image i's predictions and labels
  alone, i.e. a batch of one (box/cls/dfl each divided by that image's own target_scores_sum, times batch size 1).
  ultralytics' own batch loss divides by the batch's summed target_scores_sum and multiplies by N, which couples the
  images; the per-image sum equals it only when every image has the same target_scores_sum.
- dL/dx is the gradient autograd takes through ultralytics' loss, as its training backward does: the assigner runs on
  detached predictions and CIoU's aspect weight alpha is computed under no_grad, so target scores, boxes, the
  foreground mask, target_scores_sum and alpha count as constants (the loss VALUE also moves through them).
- Teacher (eval mode): BN uses running stats, so J_i depends on image i and its labels only.
  Student (train mode): J_S = d(sum_i L_i)/dx of ONE forward of the whole batch; BN's batch statistics couple the
  images, so J_S_i also depends on the other images, as in the training step.
- The AT term follows atcache.attention.functional.at_loss: one L2 (Frobenius) norm over the whole (N, 3, H, W)
  difference, divided by N; beta/2 is the caller's weight. No normalisation of J (the paper's raw gradients).
- Gradients are compared average-pooled by a stride s (s=1: full resolution).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from atcache.attention.functional import attention_map
from atcache.yolo.loss import detection_loss, model_criterion, raw_predictions

EPS = 1e-8
LOSS_KEYS = ("batch_idx", "cls", "bboxes")


# ------------------------------------------------------------------------------------------------- the loss
def criterion(model: torch.nn.Module):
    """The model's ultralytics criterion (atcache.yolo.loss.model_criterion: kept on the model as model.loss does);
    a wrapper with `.base` (the trainer's AttentionTransferLoss) gives its plain criterion."""
    crit = model_criterion(model)
    return getattr(crit, "base", crit)


def _take(obj: Any, i: int) -> Any:
    """Image i of a nest of tensors (dicts, lists, tuples), as a batch of one."""
    if isinstance(obj, torch.Tensor):
        return obj[i : i + 1]
    if isinstance(obj, dict):
        return {k: _take(v, i) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_take(v, i) for v in obj)
    return obj


def _batch_size(obj: Any) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.shape[0]
    for v in obj.values() if isinstance(obj, dict) else obj:
        return _batch_size(v)
    raise ValueError("predictions hold no tensor")


def loss_labels(batch: dict) -> dict:
    """The labels the per-image loss reads (batch_idx, cls, bboxes) of an ultralytics batch."""
    return {k: batch[k] for k in LOSS_KEYS}


def image_labels(batch: dict, i: int) -> dict:
    """Image i's labels as the batch of one the criterion reads: batch_idx all 0, its cls (k, 1), bboxes (k, 4)."""
    idx = batch["batch_idx"].view(-1)
    m = idx == i
    return {"batch_idx": torch.zeros_like(idx[m]), "cls": batch["cls"][m], "bboxes": batch["bboxes"][m]}


def per_image_loss(model: torch.nn.Module, preds: Any, batch: dict) -> torch.Tensor:
    """(N,) L_i = criterion(image i's predictions, image i's labels) summed over box/cls/dfl: a batch of one.

    preds: the model's forward on the batch (eval tuple or train dict); batch: ultralytics' labels (batch_idx, cls,
    normalised xywh bboxes). float64 L needs torch.set_default_dtype(torch.float64) (see detection_loss)."""
    crit, raw = criterion(model), raw_predictions(preds)
    return torch.stack([detection_loss(crit, _take(raw, i), image_labels(batch, i)).sum()
                        for i in range(_batch_size(raw))])


# --------------------------------------------------------------------------------------------- the gradient
def input_gradient(model: torch.nn.Module, images: torch.Tensor, batch: dict, create_graph: bool = False,
                   preds: Any = None, loss_scale: float = 1.0) -> torch.Tensor:
    """J (N, 3, H, W) = d(sum_i L_i)/d images, in the model's current mode (eval: per image; train: BN-coupled).

    create_graph=True keeps J differentiable w.r.t. the weights (double backprop). preds: the forward already run on
    `images` (which must then require grad), so the training step's one forward serves both its loss and J_S.
    loss_scale multiplies L before the backward and divides J after (keeps fp16/autocast gradients from underflowing)."""
    if torch.is_inference_mode_enabled():
        raise RuntimeError("input_gradient needs autograd; it cannot run under torch.inference_mode()")
    with torch.enable_grad():
        if preds is None:
            x = images.detach().requires_grad_(True)
            preds = model(x)
        else:
            if not images.requires_grad:
                raise ValueError("images must require grad and be the input preds were computed from")
            x = images
        total = per_image_loss(model, preds, batch).sum()
        (J,) = torch.autograd.grad(total * loss_scale, x, create_graph=create_graph)
    J = J / loss_scale if loss_scale != 1.0 else J
    return J if create_graph else J.detach()


def pool_gradient(J: torch.Tensor, stride: int) -> torch.Tensor:
    """(N, C, H/s, W/s) block means (avg_pool2d, kernel = stride = s); s=1 returns J. Linear: pool(J) =
    dL/dz / s^2 for x = nearest-upsampled z, so the loss on pooled J is the loss at resolution H/s."""
    if stride < 1 or J.shape[-1] % stride or J.shape[-2] % stride:
        raise ValueError(f"stride {stride} does not divide the gradient's size {tuple(J.shape[-2:])}")
    return J if stride == 1 else F.avg_pool2d(J, stride, stride)


def split(J: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(direction like J with unit L2 norm per image, norm (N,) float32): J = norm * direction; an all-zero J gives
    a zero direction and norm 0. The norm is taken in float64 (|J|^2 of ~1e-20 gradients underflows float32)."""
    norm = torch.linalg.vector_norm(J.double().flatten(1), dim=1)
    direction = J.double() / torch.where(norm > 0, norm, 1.0).view(-1, *[1] * (J.ndim - 1))
    return direction.to(J.dtype), norm.float()


def join(direction: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """J (float32) = norm[:, None, None, None] * direction (any float dtype, e.g. a cached float16 direction)."""
    return direction.float() * norm.float().view(-1, *[1] * (direction.ndim - 1))


def _difference_norm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    if a.shape != b.shape:
        raise ValueError(f"gradients differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    return torch.linalg.vector_norm(a - b.to(a)) / a.shape[0]


def gradient_at_loss(J_S: torch.Tensor, J_T: torch.Tensor) -> torch.Tensor:
    """||J_S - J_T||_2 / N: one L2 norm over the whole (N, 3, H', W') difference (at_loss's convention), the
    teacher's J_T constant (detached); the trainer adds beta/2 times it. Pass pooled J's for a stride."""
    return _difference_norm(J_S, J_T.detach())


def flip_batch(batch: dict) -> dict:
    """The labels (and "img", if present) of the horizontally flipped images: normalised x_center -> 1 - x_center."""
    out = dict(batch)
    bboxes = batch["bboxes"].clone()
    bboxes[:, 0] = 1.0 - bboxes[:, 0]
    out["bboxes"] = bboxes
    if "img" in batch:
        out["img"] = batch["img"].flip(-1)
    return out


def flip_loss(model: torch.nn.Module, images: torch.Tensor, batch: dict, stride: int = 1,
              create_graph: bool = True) -> torch.Tensor:
    """||J(x) - flip(J(flip x))||_2 / N (pooled by `stride`), both sides differentiable w.r.t. the weights.

    Two forwards, x and flip(x) with mirrored labels, each its own batch (in train mode, BN sees each batch as the
    training step would); the trainer adds beta/2 times it to L(W, x)."""
    J = input_gradient(model, images, batch, create_graph=create_graph)
    J_flip = input_gradient(model, images.flip(-1), flip_batch(batch), create_graph=create_graph)
    return _difference_norm(pool_gradient(J, stride), pool_gradient(J_flip.flip(-1), stride))


def gradient_attention(J: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """The paper's picture (N, H, W): sum over channels of |J|^2, divided by its L2 norm per image. Taken from the
    direction (scale-free), since raw |J|^2 (~1e-16) would drown in attention_map's eps."""
    return attention_map(split(J)[0], p=2.0, kind="sum_p", eps=eps)
