"""Stage 2's loss: ultralytics' detection criterion plus the terms the settings turn on, each its own logged item:
    at_loss    at_weight x at_loss(student maps, batch[TARGETS_KEY])                       cache and online modes
    grad_loss  gradient_weight/2 x gradient_at_loss(pool(J_S), batch[TEACHER_GRAD_KEY])     J_T: train.gradients
    flip_loss  flip_weight/2 x flip_loss(student, x)                                        any mode
J = d(per-image detection loss)/d(input) (atcache.attention.gradient). Scaled like ultralytics scales its items (the
returned loss is item x batch size).

Three objects, none of which knows the trainer:
- `TeacherTargets.fill(batch)`: the teacher's side of a training batch, put into the batch on the training device
  (the trainer's preprocess_batch calls it on training batches only): the AT targets (cache: rendered or as loaded;
  online: the teacher's forward on the augmented batch) and J_T.
- `StudentTaps`: the trained student's next forward in train mode, watched for one training step (its AT layers
  hooked). Armed by `AttentionTransferLoss.arm(batch)` on a training batch, taken (and disarmed) by the loss.
- `AttentionTransferLoss`: the student's criterion. It adds its terms only when its taps saw a train-mode forward of
  the student since arming: a validation batch (the EMA model, whose forward the taps never see), a second loss call,
  or a copy of the model (EMA, checkpoints: ultralytics copies it between steps, when the taps are unarmed and no
  hook is attached) get the plain criterion's loss. It holds the student, small settings, the pooling stride and the
  AMP scaler: nothing heavy (no teacher, no cache) to copy or pickle.
No ultralytics import (atcache.yolo's load_model loads the online teacher).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from atcache.attention.functional import at_loss, attention_map
from atcache.attention.gradient import flip_loss, gradient_at_loss, input_gradient, loss_labels
from atcache.attention.hooks import FeatureHooks, probe_layers
from atcache.attention.recipe import layer_maps
from atcache.config import DistillSettings
from atcache.errors import AtcacheError
from atcache.train.checks import RunPlan
from atcache.train.gradients import CachedGradients, OnlineGradients, ReplayGradients, TeacherGradients
from atcache.train.render import PIECES_KEY
from atcache.train.targets import TARGETS_KEY, TargetSource

AT_LOSS, GRAD_LOSS, FLIP_LOSS = "at_loss", "grad_loss", "flip_loss"
TERM_LOSSES = (AT_LOSS, GRAD_LOSS, FLIP_LOSS)  # training-only items: validation has no targets
TEACHER_GRAD_KEY = "at_teacher_grad"  # J_T of the batch, pooled, float32 on the training device


class TeacherTargets:
    """The teacher's side of a training step, into the batch (`fill`), on the training device:
        TARGETS_KEY       per layer the AT target (N, H/s, W/s): cache mode, rendered from the batch's PIECES_KEY (warp,
                          cache in RAM) or as the loader delivered it (static, replay, streamed), resampled and
                          renormalised if multi_scale resized the batch; online mode, the teacher's maps of the batch
        TEACHER_GRAD_KEY  J_T pooled (--gradient-weight): `gradients.teacher(batch)` (live, a cache row's, a replay's)
    """

    def __init__(self, settings: DistillSettings, plan: RunPlan, device, *, cache: TargetSource | None = None,
                 teacher: nn.Module | None = None, gradients: TeacherGradients | None = None, pieces: bool = False):
        self.settings, self.plan, self.device = settings, plan, device
        self.cache, self.teacher, self.gradients = cache, teacher, gradients
        # render.BatchRenderer of warp targets: made now when the loader ships pieces (`pieces`), else when one comes
        self.renderer = cache.batch_renderer(device) if pieces else None

    def fill(self, batch: dict) -> dict:
        if PIECES_KEY in batch:  # warp targets of the whole batch, rendered here on the training device
            if self.renderer is None:
                self.renderer = self.cache.batch_renderer(self.device)
            batch[TARGETS_KEY] = self.renderer.render(batch.pop(PIECES_KEY))
        if TARGETS_KEY in batch:
            batch[TARGETS_KEY] = self._fit(batch[TARGETS_KEY], batch["img"].shape[-2:])
        elif self.teacher is not None:
            batch[TARGETS_KEY] = layer_maps(self.teacher, batch["img"].detach(), self.settings.source_layers,
                                            self.plan.p, self.plan.kind, self.plan.eps)[0]
        if self.gradients is not None:
            with torch.autocast(device_type=batch["img"].device.type, enabled=False):  # J_T in float32
                batch[TEACHER_GRAD_KEY] = self.gradients.teacher(batch)
        return batch

    def _fit(self, targets: Sequence[torch.Tensor], img_hw) -> list[torch.Tensor]:
        """Targets on the device, resampled and renormalised if multi_scale resized the batch."""
        out = []
        for t, layer in zip(targets, self.settings.source_layers):
            t = t.to(self.device, non_blocking=True).float()
            s = self.cache.spec.layer(layer).stride
            size = (img_hw[0] // s, img_hw[1] // s)
            if tuple(t.shape[-2:]) != size:
                t = F.interpolate(t[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
                t = t / (torch.linalg.vector_norm(t, dim=(1, 2), keepdim=True) + self.plan.eps)
            out.append(t)
        return out


class StudentTaps:
    """One training forward of the student, watched: `arm()` hooks its `layers` (FeatureHooks) and the student itself;
    `take()` returns the layers' features of the train-mode forward since (in `layers` order; [] without layers), or
    None when none ran, and removes every hook. Unarmed, nothing is hooked, so copies of the model carry no hook."""

    def __init__(self, model: nn.Module, layers: Sequence[int] = ()):
        self.model, self.layers = model, tuple(layers)
        self._hooks: FeatureHooks | None = None
        self._handle = None
        self._seen = False

    def arm(self) -> None:
        self.disarm()
        self._hooks = FeatureHooks(self.model, self.layers).attach() if self.layers else None
        self._handle = self.model.register_forward_pre_hook(self._forward_starts)

    def _forward_starts(self, module: nn.Module, _args) -> None:
        self._seen = module.training

    def take(self) -> list[torch.Tensor] | None:
        hooks, seen = self._hooks, self._seen
        self.disarm()
        if not seen:
            return None
        return [hooks.features[i] for i in self.layers] if hooks is not None else []

    def disarm(self) -> None:
        if self._hooks is not None:
            self._hooks.detach()
        if self._handle is not None:
            self._handle.remove()
        self._hooks, self._handle, self._seen = None, None, False


class AttentionTransferLoss:
    """ultralytics' criterion `base` of `student` plus the terms `settings` turn on (module docstring); the AT maps use
    the plan's (p, kind, eps), J_S is pooled by `pool` (the J_T source's stride) and scaled by the AMP `scaler`'s scale
    against underflow. Attributes it does not have are the plain criterion's (ultralytics reads e.g. `update`)."""

    def __init__(self, base, student: nn.Module, settings: DistillSettings, plan: RunPlan, *,
                 pool: TeacherGradients | None = None, scaler=None):
        self.base, self.model, self.settings = base, student, settings
        self.p, self.kind, self.eps = plan.p, plan.kind, plan.eps
        self.at_on = settings.mode != "plain" and settings.at_weight != 0  # at_weight 0: no AT term, no at_loss item
        self.grad_on, self.flip_on = settings.gradient_weight > 0, settings.flip_weight > 0
        if self.grad_on and pool is None:
            raise ValueError("--gradient-weight needs the J_T source's pooling")
        self.pool, self.scaler = pool, scaler
        self.taps = StudentTaps(student, settings.student_layers if self.at_on else ())

    def arm(self, batch: dict) -> None:
        """`batch` is a training step's: watch the student's next forward, whose input must require grad for J_S."""
        if self.grad_on:
            batch["img"].requires_grad_(True)
        self.taps.arm()

    def __call__(self, preds, batch: dict):
        loss, items = self.base(preds, batch)
        features = self.taps.take()
        if features is None:  # not the student's training forward (validation, a second call, a copy)
            return loss, items
        s, terms = self.settings, {}
        with torch.autocast(device_type=batch["img"].device.type, enabled=False):  # the terms' math in float32
            if self.at_on:
                maps = [attention_map(f, self.p, self.kind, self.eps) for f in features]
                terms[AT_LOSS] = s.at_weight * at_loss(maps, batch[TARGETS_KEY], s.at_norm)
            if self.grad_on:
                terms[GRAD_LOSS] = s.gradient_weight / 2 * gradient_at_loss(self.student_gradient(preds, batch),
                                                                            batch[TEACHER_GRAD_KEY])
            if self.flip_on:
                terms[FLIP_LOSS] = s.flip_weight / 2 * self.flip_term(batch)
        n = batch["img"].shape[0]
        items = {**items, **{k: v.detach() for k, v in terms.items()}}
        return torch.cat([loss, *[(v * n).reshape(1).to(loss.dtype) for v in terms.values()]]), items

    def __getattr__(self, name):  # only for names not set in __init__
        base = self.__dict__.get("base")
        if base is None or name.startswith("__"):
            raise AttributeError(name)
        return getattr(base, name)

    def student_gradient(self, preds, batch: dict) -> torch.Tensor:
        """J_S (train mode, BN-coupled), differentiable w.r.t. the weights, from the training forward's `preds`, pooled.
        Under AMP the backward runs through that half-precision forward, scaled by the GradScaler's scale."""
        scale = self.scaler.get_scale() if self.scaler is not None and self.scaler.is_enabled() else 1.0
        J = input_gradient(self.model, batch["img"], loss_labels(batch), create_graph=True, preds=preds,
                           loss_scale=scale)
        return self.pool.pool(J)

    def flip_term(self, batch: dict) -> torch.Tensor:
        """flip_loss of the student (train mode, float32) on the batch; its two extra forwards leave BN's running
        statistics as they were (momentum 0), so those follow the training forwards alone, as in a plain run."""
        bns = [m for m in self.model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        momenta = [m.momentum for m in bns]
        try:
            for m in bns:
                m.momentum = 0.0
            return flip_loss(self.model, batch["img"].detach().float(), loss_labels(batch))
        finally:
            for m, momentum in zip(bns, momenta):
                m.momentum = momentum


def distillation(settings: DistillSettings, plan: RunPlan, student: nn.Module, criterion: Callable[[], object], *,
                 device, nc: int, imgsz: int, cache: TargetSource | None = None, train_dataset=None,
                 scaler=None) -> tuple[TeacherTargets | None, AttentionTransferLoss | None]:
    """A training run's (TeacherTargets, AttentionTransferLoss), either None when there is nothing to do: the online
    teacher loaded, J_T's source chosen, the layer strides checked. `criterion()`: a new plain criterion of `student`;
    `cache`: cache mode's target source; `train_dataset`: the training dataset (its im_files and at_rows)."""
    s = settings
    at_on = s.mode != "plain" and s.at_weight != 0
    grad_on, flip_on = s.gradient_weight > 0, s.flip_weight > 0
    pieces = bool(getattr(train_dataset, "at_pieces", False))  # the loader ships warp views to render per batch
    if not (at_on or grad_on or flip_on):  # cache targets are still rendered, as the loader delivers them
        return (TeacherTargets(s, plan, device, cache=cache, pieces=pieces) if s.mode == "cache" else None), None
    teacher, gradients = None, None
    if s.mode == "online":
        from atcache.yolo import load_model

        # unfused for input gradients: the teacher's J_T through the same layers (conv + BN) as the student's J_S
        teacher = load_model(s.teacher, nc=nc, device=device, fuse=not grad_on).model
        if grad_on:
            gradients = OnlineGradients(teacher, s.gradient_stride)
    elif grad_on and s.targets == "replay":
        gradients = ReplayGradients(plan.store.spec.gradient_stride, plan.store.spec.imgsz)
    elif grad_on:
        gradients = CachedGradients.load(plan.store, train_dataset.im_files, train_dataset.at_rows)
    if at_on:
        check_strides(student, s, imgsz, device, teacher=teacher, cache=cache)
    targets = None
    if s.mode != "plain":
        targets = TeacherTargets(s, plan, device, cache=cache, teacher=teacher if at_on else None, gradients=gradients,
                                 pieces=pieces)
    pool = TeacherGradients(gradients.stride, gradients.imgsz) if gradients is not None else None
    return targets, AttentionTransferLoss(criterion(), student, s, plan, pool=pool, scaler=scaler)


def check_strides(student: nn.Module, settings: DistillSettings, imgsz: int, device, *,
                  teacher: nn.Module | None = None, cache: TargetSource | None = None) -> None:
    """Refuse, in one line, a layer pair of unequal strides (student vs the teacher's or the cache's layer)."""
    student_strides = _strides(student, settings.student_layers, imgsz, device)
    if teacher is not None:
        source_strides, source = _strides(teacher, settings.source_layers, imgsz, device), "teacher"
    else:
        source_strides, source = [cache.spec.layer(i).stride for i in settings.source_layers], "cache"
    for (s_layer, t_layer), ss, ts in zip(settings.layers, student_strides, source_strides):
        if ss != ts:
            raise AtcacheError(
                f"student layer {s_layer} has stride {ss} but {source} layer {t_layer} has stride {ts}; "
                "pair layers of equal stride with --layers student:cache (e.g. 4:6)"
            )


def _strides(model: nn.Module, layers: Sequence[int], imgsz: int, device) -> list[int]:
    was_training = model.training
    model.eval()
    try:
        shapes = probe_layers(model, layers, imgsz, device)
    finally:
        model.train(was_training)
    return [imgsz // h for _, h, _ in shapes]
