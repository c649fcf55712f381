"""Stage 2: the student trains with ultralytics' DetectionTrainer, plus attention transfer from the cache.

One trainer serves three modes so that they are compared like for like:
    plain   the student alone (ultralytics as is)                                   `atcache train`
    cache   AT targets streamed from the cache, aligned with the augmentation       `atcache train-from-cache`
            (in RAM, or read from disk chunk by chunk with a block-shuffled sampler when larger than --ram-budget)
    online  AT targets from a teacher forward on every augmented batch (reference)  `atcache train-online`
The settings are checked once, when the trainer is made. ultralytics' DDP workers rebuild the trainer from its args
alone, so `train()` hands them the settings as JSON in an environment variable, read only in those workers.

The loss and the teacher's side of each batch are train.loss's (AttentionTransferLoss, TeacherTargets); this module
only wires them in. ultralytics' private steps are atcache.yolo.trainer's (AdaptedDetectionTrainer and its hooks);
ultralytics names come through atcache.yolo.
"""

from __future__ import annotations

import contextlib
import os

import numpy as np
import torch.distributed as dist
from atcache.yolo import DEFAULT_CFG, LOGGER, get_cfg, unwrap_model, with_sampler
from atcache.yolo.trainer import AdaptedDetectionTrainer, is_ddp_worker

from atcache.config import DistillSettings
from atcache.devices import cuda_indices
from atcache.errors import AtcacheError
from atcache.cache.store import CacheStore
from atcache.train.checkpoints import ResumableTraining
from atcache.train.checks import RunPlan, cache_streams, check_cache, check_settings, ram_need_gb, replay_overrides
from atcache.train.datasets import build_dataset
from atcache.train.gradients import check_gradient_mode
from atcache.train.loss import (AT_LOSS, FLIP_LOSS, GRAD_LOSS, TERM_LOSSES, AttentionTransferLoss, TeacherTargets,
                                distillation)
from atcache.train.samplers import BlockShuffleSampler, EpochSampler, lru_chunks
from atcache.train.streaming import StreamingCacheTargets
from atcache.train.targets import CacheTargets, TargetSource

# check_cache, ram_need_gb and cache_streams (checks.py) are imported from here too
__all__ = ["AtcacheTrainer", "AttentionTransferLoss", "DistillSettings", "train_student", "unwrap_worker_error",
           "SETTINGS_ENV", "AT_LOSS", "GRAD_LOSS", "FLIP_LOSS", "check_cache", "ram_need_gb", "cache_streams"]
SETTINGS_ENV = "ATCACHE_TRAIN_SETTINGS"


def _settings_for(settings: DistillSettings | None, cfg) -> DistillSettings:
    """The run's settings: as given, else (only in a DDP worker that ultralytics started, where the trainer is rebuilt
    from its args alone) from SETTINGS_ENV, else plain."""
    if settings is not None:
        return settings
    text = os.environ.get(SETTINGS_ENV)
    return DistillSettings.from_json(text) if text and is_ddp_worker(cfg) else DistillSettings()


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


def _load_targets(settings: DistillSettings, plan: RunPlan) -> TargetSource:
    """The cache's targets for training: replay arrays (read in order), streamed chunks, or the maps in RAM."""
    if settings.targets == "replay":
        from atcache.train.replay import ReplayTargets

        return ReplayTargets(plan.store.path, plan.store.spec, settings.source_layers,
                             gradients=settings.gradient_weight > 0)
    load = StreamingCacheTargets.open if plan.streaming else CacheTargets.load
    return load(plan.store, settings.source_layers)


class AtcacheTrainer(ResumableTraining, AdaptedDetectionTrainer):
    """DetectionTrainer + attention transfer (mode cache or online) or nothing (plain), its checkpoints safe to stop at
    (ResumableTraining); everything else is ultralytics'. Once training is set up, `teacher_targets` fills each
    training batch's targets and `transfer_loss` is the student's criterion (train.loss; None when not needed)."""

    cache_targets: TargetSource | None = None  # cache mode: where the dataset reads targets from (build_dataset)
    teacher_targets: TeacherTargets | None = None
    transfer_loss: AttentionTransferLoss | None = None

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
        self.streaming = self.plan.streaming
        super().__init__(cfg, overrides, _callbacks)
        if (s.gradient_weight > 0 or s.flip_weight > 0) and (self.torchrun or self.world_size > 1):
            raise AtcacheError("--gradient-weight and --flip-weight (double backprop) are not supported with DDP; "
                               "train on one device")

    def join_world(self, world: int, rank: int, local_world: int) -> None:
        """torchrun's world, on CUDA devices only (ultralytics trains DDP on CUDA), one device per process here."""
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
        super().join_world(world, rank, local_world)

    # ------------------------------------------------------------------ data
    def build_dataset(self, img_path: str, mode: str = "train", batch: int | None = None):
        """ultralytics' dataset; for training, atcache's (`datasets.build_dataset`, the same arguments) with the cached
        targets (cache mode) and/or seeded augmentation (--aug-seed)."""
        s = self.settings
        cached = s.mode == "cache"
        if mode != "train" or not (cached or s.aug_seed is not None):
            return super().build_dataset(img_path, mode, batch)
        if cached and self.cache_targets is None:
            self.cache_targets = _load_targets(self.settings, self.plan)
        gs = max(int(unwrap_model(self.model).stride.max()), 32)
        return build_dataset(self.args, img_path, self.data, mode, batch, gs,
                             targets=self.cache_targets if cached else None, target_mode=s.targets if cached else None,
                             root=self.data["path"], pieces=True, aug_seed=s.aug_seed, epochs=self.epochs)

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

    def on_mosaic_closed(self, epoch: int) -> None:
        """ultralytics' loader restarts (reset) after its close_mosaic switch: the epoch sampler resumes at `epoch`."""
        if isinstance(self.train_loader.sampler, EpochSampler):
            self.train_loader.sampler.set_epoch(epoch, exact=True)

    def preprocess_batch(self, batch: dict) -> dict:
        """ultralytics' preprocessing; then the teacher's side of the step into the batch (targets, J_T) and the loss
        armed for the student's forward on it."""
        batch = super().preprocess_batch(batch)
        if self.teacher_targets is not None:
            batch = self.teacher_targets.fill(batch)
        if self.transfer_loss is not None:
            self.transfer_loss.arm(batch)
        return batch

    def plot_training_samples(self, batch: dict, ni: int) -> None:
        """ultralytics' plot, of the images without their autograd flag (numpy() refuses a tensor requiring grad)."""
        super().plot_training_samples({**batch, "img": batch["img"].detach()}, ni)

    # ------------------------------------------------------------------ model and loss
    def on_train_setup(self) -> None:
        """A resumed run continues the epochs' orders; the teacher's side and the loss made (train.loss.distillation),
        the loss set as the student's criterion."""
        if isinstance(self.train_loader.sampler, EpochSampler):
            self.train_loader.sampler.set_epoch(self.start_epoch)
        self.teacher_targets, self.transfer_loss = distillation(
            self.settings, self.plan, unwrap_model(self.model), self.plain_criterion, device=self.device,
            nc=self.data["nc"], imgsz=self.args.imgsz, cache=self.cache_targets,
            train_dataset=self.train_loader.dataset, scaler=self.scaler)
        self._renderer = self.teacher_targets.renderer if self.teacher_targets is not None else None  # warp targets'
        if self.transfer_loss is not None:
            self.set_criterion(self.transfer_loss)

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
