"""Stage 2: the student trains with ultralytics' DetectionTrainer, plus attention transfer from the cache.

One trainer serves three modes so that they are compared like for like:
    plain   the student alone (ultralytics as is)                                   `atcache train`
    cache   AT targets streamed from the cache, aligned with the augmentation       `atcache train-from-cache`
    online  AT targets from a teacher forward on every augmented batch (the seed)   `atcache train-online`
Settings travel in an environment variable because ultralytics' DDP workers rebuild the trainer from its args alone.
Imports ultralytics: import this module after `env.prepare_ultralytics()`.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from ultralytics.models.yolo.detect import DetectionTrainer
from ultralytics.utils import DEFAULT_CFG, LOGGER
from ultralytics.utils.torch_utils import unwrap_model

from atcache.attention import EPS, at_loss, attention_map
from atcache.data import split_files
from atcache.errors import AtcacheError
from atcache.hooks import FeatureHooks, probe_layers
from atcache.targets import TARGET_MODES, TARGETS_KEY, CacheTargets, attach_targets, check_cache

SETTINGS_ENV = "ATCACHE_TRAIN_SETTINGS"
MODES = ("plain", "cache", "online")
DEFAULT_LAYERS = (6, 8, 13, 16, 19, 22)
DEFAULT_AT_WEIGHT = 1.0
AT_LOSS = "at_loss"


@dataclass(frozen=True)
class DistillSettings:
    """What atcache adds to an ultralytics run; `layers` pairs (student layer, cache/teacher layer)."""

    mode: str = "plain"
    cache: str = ""
    teacher: str = ""
    targets: str = "warp"
    at_weight: float = DEFAULT_AT_WEIGHT
    layers: tuple[tuple[int, int], ...] = ()
    p: float = 2.0  # online mode; a cache brings its own p, kind and eps
    kind: str = "sum_p"
    ram_budget_gb: float | None = None

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "DistillSettings":
        d = json.loads(text)
        d["layers"] = tuple(tuple(pair) for pair in d.get("layers", ()))
        return cls(**d)

    @classmethod
    def from_env(cls) -> "DistillSettings":
        text = os.environ.get(SETTINGS_ENV)
        return cls.from_json(text) if text else cls()

    @property
    def student_layers(self) -> tuple[int, ...]:
        return tuple(s for s, _ in self.layers)

    @property
    def source_layers(self) -> tuple[int, ...]:
        return tuple(t for _, t in self.layers)


def parse_layer_map(text: str) -> tuple[tuple[int, int], ...]:
    """'6,8,13' -> same index on both sides; '4:6,6:8' -> student layer 4 learns cache layer 6, ..."""
    pairs = []
    for item in (x for x in text.replace(" ", "").split(",") if x):
        try:
            s, _, t = item.partition(":")
            pairs.append((int(s), int(t or s)))
        except ValueError:
            raise AtcacheError(f"--layers {text!r} is not a list like 6,8,13 or student:cache pairs like 4:6,6:8") from None
    if not pairs:
        raise AtcacheError("--layers is empty; give at least one layer index")
    return tuple(pairs)


def check_settings(s: DistillSettings, imgsz: int, data: str, rect: bool = False) -> tuple[float, str, float]:
    """Refuse settings that cannot work before anything is built; returns the AT map's (p, kind, eps)."""
    if s.mode not in MODES:
        raise AtcacheError(f"unknown training mode {s.mode!r}; choose one of {', '.join(MODES)}")
    if s.mode == "plain":
        return s.p, s.kind, EPS
    if not s.layers:
        raise AtcacheError("attention transfer needs at least one layer (--layers)")
    if s.mode == "online":
        if Path(s.teacher).suffix.lower() not in (".yaml", ".yml") and not Path(s.teacher).is_file():
            raise AtcacheError(f"teacher {s.teacher} does not exist; pass the path of your trained checkpoint (.pt)")
        return s.p, s.kind, EPS
    if s.targets not in TARGET_MODES:
        raise AtcacheError(f"--targets {s.targets!r} is unknown; choose warp or static")
    if rect:
        raise AtcacheError("rect=True training is not supported with cached targets; drop rect")
    spec = check_cache(s.cache, s.source_layers, imgsz, split_files(data, "train"), s.ram_budget_gb)
    return spec.p, spec.kind, spec.eps


class AttentionTransferLoss:
    """ultralytics' detection criterion + at_weight x the seed's AT loss, as its own `at_loss` item.

    Scaled like ultralytics scales its items (the returned loss is item x batch size). A copy or pickle of it is the
    plain ultralytics criterion, so EMA copies and checkpoints never carry atcache objects."""

    def __init__(self, base, trainer: "AtcacheTrainer"):
        self.base, self.trainer = base, trainer

    def __call__(self, preds, batch):
        loss, items = self.base(preds, batch)
        student = self.trainer.student_features()
        if student is None:  # not a training step of ours (e.g. a loss call on a copy)
            return loss, items
        teacher = self.trainer.teacher_maps(batch)
        with torch.autocast(device_type=batch["img"].device.type, enabled=False):  # AT math in float32
            maps = [attention_map(f, self.trainer.p, self.trainer.kind, self.trainer.eps) for f in student]
            value = self.trainer.settings.at_weight * at_loss(maps, teacher)
        items = {**items, AT_LOSS: value.detach()}
        return torch.cat([loss, (value * batch["img"].shape[0]).reshape(1).to(loss.dtype)]), items

    def __getattr__(self, name):  # the trainer and validator read attributes of the criterion (e.g. hyp, stride)
        if name in ("base", "trainer"):
            raise AttributeError(name)
        return getattr(self.base, name)

    def __deepcopy__(self, memo):
        return copy.deepcopy(self.base, memo)

    def __reduce_ex__(self, protocol):
        return self.base.__reduce_ex__(protocol)


class AtcacheTrainer(DetectionTrainer):
    """DetectionTrainer + attention transfer (mode cache or online) or nothing (plain); everything else is ultralytics'."""

    def __init__(self, cfg=DEFAULT_CFG, overrides: dict | None = None, _callbacks=None, settings: DistillSettings | None = None):
        self.settings = settings or DistillSettings.from_env()
        os.environ[SETTINGS_ENV] = self.settings.to_json()  # for the DDP workers ultralytics launches
        s = self.settings
        super().__init__(cfg, overrides, _callbacks)
        self.p, self.kind, self.eps = check_settings(s, self.args.imgsz, self.args.data, self.args.rect)
        self.cache_targets: CacheTargets | None = None
        self.teacher = None
        self._taps: FeatureHooks | None = None

    # ------------------------------------------------------------------ data
    def build_dataset(self, img_path: str, mode: str = "train", batch: int | None = None):
        dataset = super().build_dataset(img_path, mode, batch)
        if mode == "train" and self.settings.mode == "cache":
            if self.cache_targets is None:
                self.cache_targets = CacheTargets.load(self.settings.cache, self.settings.source_layers)
            dataset = attach_targets(dataset, self.cache_targets, self.settings.targets, self.data["path"], self.args)
        return dataset

    def preprocess_batch(self, batch: dict) -> dict:
        batch = super().preprocess_batch(batch)
        if self.settings.mode == "plain":
            return batch
        if TARGETS_KEY in batch:
            batch[TARGETS_KEY] = self._fit_targets(batch[TARGETS_KEY], batch["img"].shape[-2:])
        self._arm_taps()
        return batch

    def _fit_targets(self, targets: Sequence[torch.Tensor], img_hw) -> list[torch.Tensor]:
        """Targets on the device, resampled and renormalised if multi_scale resized the batch."""
        out = []
        for t, layer in zip(targets, self.settings.source_layers):
            t = t.to(self.device, non_blocking=True).float()
            s = self.cache_targets.spec.layer(layer).stride
            size = (img_hw[0] // s, img_hw[1] // s)
            if tuple(t.shape[-2:]) != size:
                t = F.interpolate(t[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
                t = t / (torch.linalg.vector_norm(t, dim=(1, 2), keepdim=True) + self.eps)
            out.append(t)
        return out

    # ------------------------------------------------------------------ model and loss
    def _setup_train(self):
        super()._setup_train()
        if self.settings.mode == "plain":
            return
        model = unwrap_model(self.model)
        student_strides = self._strides(model, self.settings.student_layers)
        if self.settings.mode == "online":
            from atcache.teacher import load_teacher

            self.teacher = load_teacher(self.settings.teacher, nc=self.data["nc"], device=self.device).model
            source_strides = self._strides(self.teacher, self.settings.source_layers)
            source = "teacher"
        else:
            source_strides = [self.cache_targets.spec.layer(i).stride for i in self.settings.source_layers]
            source = "cache"
        for (s_layer, t_layer), ss, ts in zip(self.settings.layers, student_strides, source_strides):
            if ss != ts:
                raise AtcacheError(
                    f"student layer {s_layer} has stride {ss} but {source} layer {t_layer} has stride {ts}; "
                    "pair layers of equal stride with --layers student:cache (e.g. 4:6)"
                )
        model.criterion = AttentionTransferLoss(model.init_criterion(), self)

    def _strides(self, model, layers: Sequence[int]) -> list[int]:
        was_training = model.training
        model.eval()
        try:
            shapes = probe_layers(model, layers, self.args.imgsz, self.device)
        finally:
            model.train(was_training)
        return [self.args.imgsz // h for _, h, _ in shapes]

    def _arm_taps(self) -> None:
        """Hook the student layers for exactly one forward; `student_features` removes the hooks again."""
        if self._taps is not None:
            self._taps.__exit__(None, None, None)
        self._taps = FeatureHooks(unwrap_model(self.model), self.settings.student_layers).__enter__()

    def student_features(self) -> list[torch.Tensor] | None:
        taps, self._taps = self._taps, None
        if taps is None:
            return None
        taps.__exit__(None, None, None)
        return [taps.features[i] for i in self.settings.student_layers]

    def teacher_maps(self, batch: dict) -> list[torch.Tensor]:
        if self.settings.mode == "cache":
            return batch[TARGETS_KEY]
        with torch.no_grad():
            hooks = FeatureHooks(self.teacher, self.settings.source_layers, stop_after_last=True)
            with hooks:
                feats = hooks.run(self.teacher, batch["img"])
            with torch.autocast(device_type=batch["img"].device.type, enabled=False):
                return [attention_map(f, self.p, self.kind, self.eps) for f in feats]

    # ------------------------------------------------------------------ logging
    def label_loss_items(self, loss_items=None, prefix="train"):
        """Validation has no targets: its columns leave `at_loss` out; training logs it like any other loss."""
        if prefix == "val":
            if loss_items is None:
                return [f"{prefix}/{x}" for x in self.loss_names if x != AT_LOSS]
            loss_items = {k: v for k, v in loss_items.items() if k != AT_LOSS}
        return super().label_loss_items(loss_items, prefix)


def train_student(settings: DistillSettings, overrides: dict) -> AtcacheTrainer:
    """Run one ultralytics training with atcache's settings; returns the finished trainer (save_dir, best, metrics)."""
    check_settings(settings, overrides.get("imgsz", DEFAULT_CFG.imgsz), overrides["data"], overrides.get("rect", False))
    trainer = AtcacheTrainer(overrides=overrides, settings=settings)
    LOGGER.info(f"atcache: mode={settings.mode} layers={list(settings.layers)} at_weight={settings.at_weight}")
    trainer.train()
    return trainer
