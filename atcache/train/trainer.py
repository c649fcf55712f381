"""Stage 2: the student trains with ultralytics' DetectionTrainer, plus attention transfer from the cache.

One trainer serves three modes so that they are compared like for like:
    plain   the student alone (ultralytics as is)                                   `atcache train`
    cache   AT targets streamed from the cache, aligned with the augmentation       `atcache train-from-cache`
            (in RAM, or read from disk chunk by chunk with a block-shuffled sampler when larger than --ram-budget)
    online  AT targets from a teacher forward on every augmented batch (reference)  `atcache train-online`
The settings are checked once, when the trainer is made. ultralytics' DDP workers rebuild the trainer from its args
alone, so `train()` hands them the settings as JSON in an environment variable, read only in those workers.
ultralytics names come through atcache.yolo.
"""

from __future__ import annotations

import contextlib
import copy
import os
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from atcache.yolo import get_cfg
from atcache.yolo import DetectionTrainer
from atcache.yolo import DEFAULT_CFG, LOGGER
from atcache.yolo import unwrap_model

from atcache.attention.functional import at_loss, attention_map
from atcache.attention.gradient import flip_loss, gradient_at_loss, input_gradient, loss_labels
from atcache.config import DistillSettings
from atcache.devices import cuda_indices
from atcache.errors import AtcacheError
from atcache.attention.hooks import FeatureHooks, probe_layers
from atcache.attention.recipe import layer_maps
from atcache.cache.store import CacheStore
from atcache.train.checkpoints import ResumableTraining
from atcache.train.checks import cache_streams, check_cache, check_settings, ram_need_gb, replay_overrides
from atcache.train.datasets import build_dataset
from atcache.train.gradients import (CachedGradients, OnlineGradients, ReplayGradients, TeacherGradients,
                                     check_gradient_mode)
from atcache.train.render import PIECES_KEY
from atcache.train.samplers import BlockShuffleSampler, EpochSampler, lru_chunks
from atcache.yolo import with_sampler
from atcache.train.streaming import StreamingCacheTargets
from atcache.train.targets import TARGETS_KEY, CacheTargets, TargetSource

# check_cache, ram_need_gb and cache_streams (checks.py) are imported from here too
__all__ = ["AtcacheTrainer", "AttentionTransferLoss", "DistillSettings", "train_student", "unwrap_worker_error",
           "SETTINGS_ENV", "AT_LOSS", "GRAD_LOSS", "FLIP_LOSS", "check_cache", "ram_need_gb", "cache_streams"]
SETTINGS_ENV = "ATCACHE_TRAIN_SETTINGS"
AT_LOSS, GRAD_LOSS, FLIP_LOSS = "at_loss", "grad_loss", "flip_loss"
TERM_LOSSES = (AT_LOSS, GRAD_LOSS, FLIP_LOSS)  # training-only items: validation has no targets


def _settings_for(settings: DistillSettings | None, cfg) -> DistillSettings:
    """The run's settings: as given, else (only in a DDP worker that ultralytics started, where the trainer is rebuilt
    from its args alone) from SETTINGS_ENV, else plain. ultralytics' workers run under torch.distributed.run
    (LOCAL_RANK) from its DDP file, which passes a cfg dict with save_dir ''."""
    if settings is not None:
        return settings
    text = os.environ.get(SETTINGS_ENV)
    ddp_worker = "LOCAL_RANK" in os.environ or (isinstance(cfg, dict) and cfg.get("save_dir") == "")
    return DistillSettings.from_json(text) if text and ddp_worker else DistillSettings()


@contextlib.contextmanager
def _settings_in_environment(settings: DistillSettings):
    """SETTINGS_ENV set while this process trains (and may launch ultralytics' DDP workers), then restored."""
    previous = os.environ.get(SETTINGS_ENV)
    os.environ[SETTINGS_ENV] = settings.to_json()
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(SETTINGS_ENV, None)
        else:
            os.environ[SETTINGS_ENV] = previous


def unwrap_worker_error(message: str) -> str:
    """The original one-line message of an AtcacheError that torch re-raised from a loader worker, traceback and all."""
    if not message.startswith("Caught AtcacheError"):
        return message
    lines = [line for line in message.splitlines() if "AtcacheError: " in line]
    return lines[-1].split("AtcacheError: ", 1)[1].strip() if lines else message


def _torchrun_world() -> tuple[int, int, int] | None:
    """(WORLD_SIZE, RANK, LOCAL_WORLD_SIZE) when torchrun (one node or several; ultralytics' own launcher runs it too)
    started this process as one rank of several, None otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or "LOCAL_RANK" not in os.environ:
        return None
    return world, int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))


class AttentionTransferLoss:
    """ultralytics' detection criterion + the terms the settings turn on, each its own item:
        at_loss    at_weight x the reference setup's AT loss (feature attention maps)
        grad_loss  gradient_weight/2 x gradient_at_loss(J_S, J_T), both pooled by one stride (train.gradients: J_T
                   from the teacher every step, a cache row's, or a replayed view's)
        flip_loss  flip_weight/2 x flip_loss(student, x)            (any mode)
    J = d(per-image detection loss)/d(input), atcache.attention.gradient. Scaled like ultralytics scales its items (the
    returned loss is item x batch size). A copy or pickle of it is the plain ultralytics criterion, so EMA copies and
    checkpoints never carry atcache objects."""

    def __init__(self, base, trainer: "AtcacheTrainer"):
        self.base, self.trainer = base, trainer

    def __call__(self, preds, batch):
        loss, items = self.base(preds, batch)
        t, s = self.trainer, self.trainer.settings
        if not t.take_step():  # not a training step of ours (e.g. a loss call on a copy)
            return loss, items
        terms = {}
        if t.at_on:
            student, teacher = t.student_features(), t.teacher_maps(batch)
        with torch.autocast(device_type=batch["img"].device.type, enabled=False):  # the terms' math in float32
            if t.at_on:
                maps = [attention_map(f, t.p, t.kind, t.eps) for f in student]
                terms[AT_LOSS] = s.at_weight * at_loss(maps, teacher, s.at_norm)
            if t.grad_on:
                terms[GRAD_LOSS] = s.gradient_weight / 2 * gradient_at_loss(t.student_gradient(preds, batch),
                                                                            t.teacher_gradient(batch))
            if t.flip_on:
                terms[FLIP_LOSS] = s.flip_weight / 2 * t.flip_term(batch)
        n = batch["img"].shape[0]
        items = {**items, **{k: v.detach() for k, v in terms.items()}}
        return torch.cat([loss, *[(v * n).reshape(1).to(loss.dtype) for v in terms.values()]]), items

    def __getattr__(self, name):  # the trainer and validator read attributes of the criterion (e.g. hyp, stride)
        if name in ("base", "trainer"):
            raise AttributeError(name)
        return getattr(self.base, name)

    def __deepcopy__(self, memo):
        return copy.deepcopy(self.base, memo)

    def __reduce_ex__(self, protocol):
        return self.base.__reduce_ex__(protocol)


class AtcacheTrainer(ResumableTraining, DetectionTrainer):
    """DetectionTrainer + attention transfer (mode cache or online) or nothing (plain), its checkpoints safe to stop at
    (ResumableTraining); everything else is ultralytics'."""

    gradients: TeacherGradients | None = None  # --gradient-weight: where J_T comes from (_setup_train)

    def __init__(self, cfg=DEFAULT_CFG, overrides: dict | None = None, _callbacks=None, settings: DistillSettings | None = None):
        self.settings = s = _settings_for(settings, cfg)
        store = None
        check_gradient_mode(s)  # before replay_overrides reads the cache
        if s.mode == "cache" and s.targets == "replay":
            store = CacheStore.open(s.cache)  # the one open: the settings check below reuses it
            overrides, s = replay_overrides(s, overrides, store)
            self.settings = s
        args = get_cfg(cfg, overrides)  # checked before ultralytics makes the run folder
        self.plan = check_settings(s, args.imgsz, args.data, args.rect, args.device, store)
        for name in ("gradient_weight", "flip_weight"):
            if not (getattr(s, name) >= 0 and np.isfinite(getattr(s, name))):
                raise AtcacheError(f"--{name.replace('_', '-')} {getattr(s, name)} must be a finite number >= 0")
        self.at_on = s.mode != "plain" and s.at_weight != 0  # at_weight 0: no AT term, no at_loss item
        self.grad_on, self.flip_on = s.gradient_weight > 0, s.flip_weight > 0
        self.p, self.kind, self.eps, self.streaming = self.plan.p, self.plan.kind, self.plan.eps, self.plan.streaming
        launch = _torchrun_world()
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
        if (self.grad_on or self.flip_on) and (launch or self.world_size > 1):
            raise AtcacheError("--gradient-weight and --flip-weight (double backprop) are not supported with DDP; "
                               "train on one device")
        self._armed = False  # preprocess_batch arms the criterion wrapper for the one loss call of a training step
        self.cache_targets: TargetSource | None = None
        self.teacher = None
        self._taps: FeatureHooks | None = None
        self._renderer = None  # render.BatchRenderer of warp targets, made on the first batch

    def _join_world(self, world: int, rank: int, local_world: int) -> None:
        """torchrun started this process as global `rank` of `world`. ultralytics sizes the DDP world by the devices in
        `device` (BaseTrainer.__init__) and passes that with the global RANK to init_process_group (_setup_ddp); the
        per-rank batch and the loss scaling use it too. Across nodes that is this node's share only, so take torchrun's
        world. Under ultralytics' own single-node launcher the two agree and nothing changes."""
        devices = cuda_indices(self.args.device)
        if self.device.type in ("cpu", "mps") or not devices:
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
        """ultralytics' dataset; for training, atcache's (`datasets.build_dataset`, the same arguments) with the cached
        targets (cache mode) and/or seeded augmentation (--aug-seed)."""
        s = self.settings
        cached = s.mode == "cache"
        if mode != "train" or not (cached or s.aug_seed is not None):
            return super().build_dataset(img_path, mode, batch)
        if cached and self.cache_targets is None:
            self.cache_targets = self._load_targets()
        gs = max(int(unwrap_model(self.model).stride.max()), 32)
        return build_dataset(self.args, img_path, self.data, mode, batch, gs,
                             targets=self.cache_targets if cached else None, target_mode=s.targets if cached else None,
                             root=self.data["path"], pieces=True, aug_seed=s.aug_seed, epochs=self.epochs)

    def _load_targets(self):
        """The cache's targets for training: replay arrays (read in order), streamed chunks, or the maps in RAM."""
        if self.settings.targets == "replay":
            from atcache.train.replay import ReplayTargets

            return ReplayTargets(self.plan.store.path, self.plan.store.spec, self.settings.source_layers,
                                 gradients=self.grad_on)
        load = StreamingCacheTargets.open if self.streaming else CacheTargets.load
        return load(self.plan.store, self.settings.source_layers)

    def get_dataloader(self, dataset_path: str, batch_size: int = 16, rank: int = 0, mode: str = "train"):
        """ultralytics' loader; when streaming or seeded, the same loader drawing its training indices from atcache's
        sampler: chunk by chunk (BlockShuffleSampler) and/or with the epoch in each index (--aug-seed)."""
        loader = super().get_dataloader(dataset_path, batch_size, rank, mode)
        seeded = self.settings.aug_seed is not None
        if mode != "train" or not (self.streaming or seeded):
            return loader
        dataset, window = loader.dataset, self.settings.shuffle_window
        ddp = rank != -1 and dist.is_available() and dist.is_initialized()
        share = {"rank": dist.get_rank() if ddp else 0, "world_size": dist.get_world_size() if ddp else 1,
                 "encode_epoch": seeded}
        seed = self.settings.aug_seed if seeded else self.args.seed
        if not self.streaming:
            return with_sampler(loader, EpochSampler(len(dataset), seed, **share))
        chunk_of = dataset.at_rows // self.cache_targets.spec.chunk_rows
        loader = with_sampler(loader, BlockShuffleSampler(chunk_of, window, seed, **share))
        buffer_rows = min(len(dataset), dataset.max_buffer_length * max(1, loader.num_workers))
        self.cache_targets.capacity = lru_chunks(window, len(chunk_of) / len(np.unique(chunk_of)), buffer_rows)
        LOGGER.info(f"atcache: streaming {self.settings.cache} from disk: chunks of {self.cache_targets.spec.chunk_rows} "
                    f"rows in a shuffled order, samples shuffled within {window} chunks, "
                    f"{self.cache_targets.capacity} decoded chunks kept per loader process")
        return loader

    def _close_dataloader_mosaic(self):
        """ultralytics' switch, then its loader restarts (reset): the epoch sampler resumes at this epoch exactly."""
        super()._close_dataloader_mosaic()
        if isinstance(self.train_loader.sampler, EpochSampler):
            self.train_loader.sampler.set_epoch(self.epoch, exact=True)

    def preprocess_batch(self, batch: dict) -> dict:
        batch = super().preprocess_batch(batch)
        self._armed = self.at_on or self.grad_on or self.flip_on
        if self.grad_on:  # J_S from the training forward itself: its input must require grad before it runs
            batch["img"].requires_grad_(True)
        if self.settings.mode == "plain":
            return batch
        if PIECES_KEY in batch:  # warp targets of the whole batch, rendered here on the training device
            if self._renderer is None:
                self._renderer = self.cache_targets.batch_renderer(self.device)
            batch[TARGETS_KEY] = self._renderer.render(batch.pop(PIECES_KEY))
        if TARGETS_KEY in batch:
            batch[TARGETS_KEY] = self._fit_targets(batch[TARGETS_KEY], batch["img"].shape[-2:])
        if self.at_on:
            self._arm_taps()
        return batch

    def plot_training_samples(self, batch: dict, ni: int) -> None:
        """ultralytics' plot, of the images without their autograd flag (numpy() refuses a tensor requiring grad)."""
        super().plot_training_samples({**batch, "img": batch["img"].detach()}, ni)

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
        if isinstance(self.train_loader.sampler, EpochSampler):
            self.train_loader.sampler.set_epoch(self.start_epoch)  # a resumed run continues the epochs' orders
        if not (self.at_on or self.grad_on or self.flip_on):
            return
        model = unwrap_model(self.model)
        if self.settings.mode == "online":
            from atcache.yolo import load_model

            # unfused for input gradients: the teacher's J_T through the same layers (conv + BN) as the student's J_S
            self.teacher = load_model(self.settings.teacher, nc=self.data["nc"], device=self.device,
                                      fuse=not self.grad_on).model
            if self.grad_on:
                self.gradients = OnlineGradients(self.teacher, self.settings.gradient_stride)
        elif self.grad_on and self.settings.targets == "replay":
            self.gradients = ReplayGradients(self.plan.store.spec.gradient_stride, self.plan.store.spec.imgsz)
        elif self.grad_on:
            ds = self.train_loader.dataset
            self.gradients = CachedGradients.load(self.plan.store, ds.im_files, ds.at_rows)
        if self.at_on:
            self._check_strides(model)
        model.criterion = AttentionTransferLoss(model.init_criterion(), self)

    def _check_strides(self, model) -> None:
        student_strides = self._strides(model, self.settings.student_layers)
        if self.settings.mode == "online":
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
            self._taps.detach()
        self._taps = FeatureHooks(unwrap_model(self.model), self.settings.student_layers).attach()

    def student_features(self) -> list[torch.Tensor] | None:
        taps, self._taps = self._taps, None
        if taps is None:
            return None
        taps.detach()
        return [taps.features[i] for i in self.settings.student_layers]

    def teacher_maps(self, batch: dict) -> list[torch.Tensor]:
        if self.settings.mode == "cache":
            return batch[TARGETS_KEY]
        return layer_maps(self.teacher, batch["img"].detach(), self.settings.source_layers, self.p, self.kind, self.eps)[0]

    def take_step(self) -> bool:
        """Whether this loss call is the training step's one (armed by preprocess_batch); disarms."""
        armed, self._armed = self._armed, False
        return armed

    def student_gradient(self, preds, batch: dict) -> torch.Tensor:
        """J_S (train mode, BN-coupled), differentiable w.r.t. the weights, from the training forward's `preds`. Under
        AMP the backward runs through that half-precision forward, scaled by the GradScaler's scale against underflow."""
        scale = self.scaler.get_scale() if self.scaler.is_enabled() else 1.0
        J = input_gradient(unwrap_model(self.model), batch["img"], loss_labels(batch), create_graph=True, preds=preds,
                           loss_scale=scale)
        return self.gradients.pool(J)

    def teacher_gradient(self, batch: dict) -> torch.Tensor:
        """J_T (teacher in eval mode, per image, float32, pooled) of the batch: live, a cache row's or a replayed
        view's; a constant."""
        return self.gradients.teacher(batch)

    def flip_term(self, batch: dict) -> torch.Tensor:
        """flip_loss of the student (train mode, float32) on the batch; its two extra forwards leave BN's running
        statistics as they were (momentum 0), so those follow the training forwards alone, as in a plain run."""
        bns = [m for m in unwrap_model(self.model).modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        momenta = [m.momentum for m in bns]
        try:
            for m in bns:
                m.momentum = 0.0
            return flip_loss(unwrap_model(self.model), batch["img"].detach().float(), loss_labels(batch))
        finally:
            for m, momentum in zip(bns, momenta):
                m.momentum = momentum

    def train(self):
        """ultralytics' training; an AtcacheError raised in a loader worker (e.g. a corrupted chunk) comes back as its
        own one-line message instead of torch's wrapper with the worker's traceback."""
        try:
            with _settings_in_environment(self.settings):  # for the DDP workers ultralytics may launch
                return super().train()
        except AtcacheError as e:
            message = unwrap_worker_error(str(e))
            if message == str(e):
                raise
            raise AtcacheError(message) from None

    # ------------------------------------------------------------------ logging
    def label_loss_items(self, loss_items=None, prefix="train"):
        """Validation has no targets: its columns leave `at_loss`, `grad_loss` and `flip_loss` out; training logs them
        like any other loss."""
        if prefix == "val":
            if loss_items is None:
                return [f"{prefix}/{x}" for x in self.loss_names if x not in TERM_LOSSES]
            loss_items = {k: v for k, v in loss_items.items() if k not in TERM_LOSSES}
        return super().label_loss_items(loss_items, prefix)


def train_student(settings: DistillSettings, overrides: dict) -> AtcacheTrainer:
    """Run one ultralytics training with atcache's settings; returns the finished trainer (save_dir, best, metrics)."""
    trainer = AtcacheTrainer(overrides=overrides, settings=settings)
    LOGGER.info(f"atcache: mode={settings.mode} layers={list(settings.layers)} at_weight={settings.at_weight} "
                f"gradient_weight={settings.gradient_weight} flip_weight={settings.flip_weight}")
    trainer.train()
    return trainer
