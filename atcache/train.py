"""Stage 2: the student trains with ultralytics' DetectionTrainer, plus attention transfer from the cache.

One trainer serves three modes so that they are compared like for like:
    plain   the student alone (ultralytics as is)                                   `atcache train`
    cache   AT targets streamed from the cache, aligned with the augmentation       `atcache train-from-cache`
            (in RAM, or read from disk chunk by chunk with a block-shuffled sampler when larger than --ram-budget)
    online  AT targets from a teacher forward on every augmented batch (the seed)   `atcache train-online`
Settings travel in an environment variable because ultralytics' DDP workers rebuild the trainer from its args alone.
Imports ultralytics: import this module after `env.prepare_ultralytics()`.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from ultralytics.models.yolo.detect import DetectionTrainer
from ultralytics.utils import DEFAULT_CFG, LOGGER
from ultralytics.utils.torch_utils import unwrap_model

from atcache.attention import EPS, at_loss, attention_map
from atcache.data import split_files
from atcache.errors import AtcacheError
from atcache.hooks import FeatureHooks, probe_layers
from atcache.store import CacheStore
from atcache.streaming import DEFAULT_WINDOW, BlockShuffleSampler, StreamingCacheTargets, lru_chunks, use_sampler
from atcache.targets import (
    TARGET_MODES, TARGETS_KEY, CacheTargets, TargetRendering, attach_targets, check_cache, ram_need_gb, streams,
)

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
    stream: bool | None = None  # None: stream the cache from disk when it needs more than ram_budget_gb
    shuffle_window: int = DEFAULT_WINDOW  # streaming: chunks whose samples are shuffled together

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


def ranks_on_this_node(device: str | None = None) -> int:
    """Training processes on this machine, each holding its own copy of an in-RAM cache: torchrun's LOCAL_WORLD_SIZE
    inside a DDP rank, else the CUDA devices listed in --device (ultralytics starts one process per device)."""
    if os.environ.get("LOCAL_WORLD_SIZE", "").isdigit():
        return max(1, int(os.environ["LOCAL_WORLD_SIZE"]))
    devices = [d.strip() for d in str(device or "").split(",") if d.strip()]
    return len(devices) if len(devices) > 1 and all(d.isdigit() for d in devices) else 1


def check_settings(s: DistillSettings, imgsz: int, data: str, rect: bool = False,
                   device: str | None = None) -> tuple[float, str, float]:
    """Refuse settings that cannot work before anything is built; returns the AT map's (p, kind, eps)."""
    if s.mode not in MODES:
        raise AtcacheError(f"unknown training mode {s.mode!r}; choose one of {', '.join(MODES)}")
    for split in ("train", "val"):  # an empty or missing split is one line here, not ultralytics' traceback
        split_files(data, split)
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
    if s.shuffle_window < 1:
        raise AtcacheError(f"--shuffle-window {s.shuffle_window} must be at least 1 (chunks shuffled together)")
    spec = check_cache(s.cache, s.source_layers, imgsz, split_files(data, "train"), s.ram_budget_gb, s.stream,
                       ranks=ranks_on_this_node(device))
    return spec.p, spec.kind, spec.eps


def cache_streams(s: DistillSettings, device: str | None = None) -> bool:
    """Whether a cache run reads its targets from disk chunk by chunk instead of loading them into RAM (every DDP
    process on this machine would hold its own copy)."""
    if s.mode != "cache":
        return False
    need = ram_need_gb(CacheStore.open(s.cache).spec, s.source_layers) * ranks_on_this_node(device)
    return streams(need, s.ram_budget_gb, s.stream)


def unwrap_worker_error(message: str) -> str:
    """The original one-line message of an AtcacheError that torch re-raised from a loader worker, traceback and all."""
    if not message.startswith("Caught AtcacheError"):
        return message
    lines = [line for line in message.splitlines() if "AtcacheError: " in line]
    return lines[-1].split("AtcacheError: ", 1)[1].strip() if lines else message


def torchrun_world() -> tuple[int, int, int] | None:
    """(WORLD_SIZE, RANK, LOCAL_WORLD_SIZE) when torchrun (one node or several; ultralytics' own launcher runs it too)
    started this process as one rank of several, None otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or "LOCAL_RANK" not in os.environ:
        return None
    return world, int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))


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
        launch = torchrun_world()
        # torchrun runs this on every rank, without the save_dir ultralytics' own launcher hands its workers
        self._share_run_folder = bool(launch) and not (overrides or {}).get("save_dir")
        if self._share_run_folder and launch[1] > 0:
            # ultralytics lets ranks > 0 take `name` as is (no increment), i.e. an earlier run of that name whose
            # results.csv BaseTrainer.__init__ deletes; they start in a scratch folder and take rank 0's in _setup_ddp
            scratch = Path(tempfile.gettempdir()) / f"atcache-rank{launch[1]}-{os.getpid()}"
            overrides = {**(overrides or {}), "save_dir": str(scratch)}
        super().__init__(cfg, overrides, _callbacks)
        if launch:
            self._join_world(*launch)
        self.p, self.kind, self.eps = check_settings(s, self.args.imgsz, self.args.data, self.args.rect,
                                                     self.args.device)
        self.streaming = cache_streams(s, self.args.device)
        self.cache_targets: TargetRendering | None = None
        self.teacher = None
        self._taps: FeatureHooks | None = None

    def _join_world(self, world: int, rank: int, local_world: int) -> None:
        """torchrun started this process as global `rank` of `world`. ultralytics sizes the DDP world by the devices in
        `device` (BaseTrainer.__init__) and passes that with the global RANK to init_process_group (_setup_ddp); the
        per-rank batch and the loss scaling use it too. Across nodes that is this node's share only, so take torchrun's
        world. Under ultralytics' own single-node launcher the two agree and nothing changes."""
        devices = self.args.device.split(":", 1)[-1].split(",")
        if self.device.type in ("cpu", "mps") or not all(d.isdigit() for d in devices):
            raise AtcacheError(
                f"torchrun started {world} processes but --device is {self.args.device or 'auto'}: ultralytics trains "
                f"DDP on CUDA devices only; pass one index per process on this node, e.g. --device "
                f"{','.join(map(str, range(local_world)))}"
            )
        if len(devices) != local_world:
            raise AtcacheError(
                f"torchrun started {local_world} processes on this node but --device {self.args.device} names "
                f"{len(devices)} devices; pass one index per process, e.g. --device {','.join(map(str, range(local_world)))}"
            )
        self.world_size = world

    def _setup_ddp(self):
        """ultralytics' process group; under torchrun every rank then takes rank 0's run folder, which must be visible
        on every node: ultralytics' final validation of best.pt gathers over all ranks, and a rank that does not see
        the file skips it, leaving the others waiting until the process-group timeout."""
        super()._setup_ddp()
        if not self._share_run_folder:
            return
        folder = [str(self.save_dir)]
        dist.broadcast_object_list(folder, src=0)
        self.save_dir = Path(folder[0])
        self.wdir = self.save_dir / "weights"
        self.last, self.best, self.csv = self.wdir / "last.pt", self.wdir / "best.pt", self.save_dir / "results.csv"
        visible = [None] * dist.get_world_size()
        dist.all_gather_object(visible, self.wdir.is_dir())  # rank 0 made it in BaseTrainer.__init__
        if not all(visible):
            missing = [r for r, ok in enumerate(visible) if not ok]
            raise AtcacheError(
                f"run folder {self.save_dir} is not visible to ranks {missing}; put --project on a filesystem that "
                "every node mounts at the same path (ultralytics validates best.pt from it on every rank at the end)"
            )

    # ------------------------------------------------------------------ data
    def build_dataset(self, img_path: str, mode: str = "train", batch: int | None = None):
        dataset = super().build_dataset(img_path, mode, batch)
        if mode == "train" and self.settings.mode == "cache":
            if self.cache_targets is None:
                load = StreamingCacheTargets.open if self.streaming else CacheTargets.load
                self.cache_targets = load(self.settings.cache, self.settings.source_layers)
            dataset = attach_targets(dataset, self.cache_targets, self.settings.targets, self.data["path"], self.args)
        return dataset

    def get_dataloader(self, dataset_path: str, batch_size: int = 16, rank: int = 0, mode: str = "train"):
        """ultralytics' loader; when streaming, its training indices come chunk by chunk (BlockShuffleSampler)."""
        loader = super().get_dataloader(dataset_path, batch_size, rank, mode)
        if mode != "train" or not self.streaming:
            return loader
        dataset, window = loader.dataset, self.settings.shuffle_window
        chunk_of = dataset.at_rows // self.cache_targets.spec.chunk_rows
        ddp = rank != -1 and dist.is_available() and dist.is_initialized()
        use_sampler(loader, BlockShuffleSampler(chunk_of, window, self.args.seed,
                                                rank=dist.get_rank() if ddp else 0,
                                                world_size=dist.get_world_size() if ddp else 1))
        buffer_rows = min(len(dataset), dataset.max_buffer_length * max(1, loader.num_workers))
        self.cache_targets.capacity = lru_chunks(window, len(chunk_of) / len(np.unique(chunk_of)), buffer_rows)
        LOGGER.info(f"atcache: streaming {self.settings.cache} from disk: chunks of {self.cache_targets.spec.chunk_rows} "
                    f"rows in a shuffled order, samples shuffled within {window} chunks, "
                    f"{self.cache_targets.capacity} decoded chunks kept per loader process")
        return loader

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
        if isinstance(self.train_loader.sampler, BlockShuffleSampler):
            self.train_loader.sampler.set_epoch(self.start_epoch)  # a resumed run continues the epochs' orders
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

    def train(self):
        """ultralytics' training; an AtcacheError raised in a loader worker (e.g. a corrupted chunk) comes back as its
        own one-line message instead of torch's wrapper with the worker's traceback."""
        try:
            return super().train()
        except AtcacheError as e:
            message = unwrap_worker_error(str(e))
            if message == str(e):
                raise
            raise AtcacheError(message) from None

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
    check_settings(settings, overrides.get("imgsz", DEFAULT_CFG.imgsz), overrides["data"], overrides.get("rect", False),
                   overrides.get("device"))
    trainer = AtcacheTrainer(overrides=overrides, settings=settings)
    LOGGER.info(f"atcache: mode={settings.mode} layers={list(settings.layers)} at_weight={settings.at_weight}")
    trainer.train()
    return trainer
