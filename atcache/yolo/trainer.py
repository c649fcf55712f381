"""ultralytics' DetectionTrainer as atcache subclasses it: every private step of ultralytics' trainer that atcache
hooks into, and every trainer field it rewrites, is here and nowhere else (tests/yolo/test_trainer_contracts.py checks
each on the installed release).

`AdaptedDetectionTrainer` overrides ultralytics' private steps only to call named hooks, no-ops here, that a subclass
implements; each names the ultralytics internal it rides on, checked on 8.4.150 to 8.4.190:

    join_world(world, rank, local_world)  BaseTrainer.__init__ sizes `world_size` by the devices in `device`, and
                                          _setup_ddp hands it with the global RANK to init_process_group; under
                                          torchrun the hook runs after __init__ (default: take torchrun's world)
    on_train_setup()                      after BaseTrainer._setup_train (model, loaders, optimizer, EMA, `scaler`,
                                          validator made; a resumed run's state loaded)
    on_mosaic_closed(epoch)               after BaseTrainer._close_dataloader_mosaic (called by _do_train before
                                          train_loader.reset(); 8.4.150 to 8.4.157 also from resume_training, before
                                          _do_train sets `epoch`: `epoch` is then start_epoch)

Besides: under torchrun every rank takes rank 0's run folder (`_setup_ddp`), the model's criterion is set through
`set_criterion`, `checkpoints_written_to` redirects save_model's files, `is_ddp_worker` recognises the process
ultralytics' own DDP launcher started.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import NamedTuple

import torch.distributed as dist

from atcache.errors import AtcacheError
from atcache.yolo import DEFAULT_CFG, DetectionTrainer, unwrap_model

__all__ = ["AdaptedDetectionTrainer", "TorchrunWorld", "torchrun_world", "is_ddp_worker", "checkpoints_written_to"]


class TorchrunWorld(NamedTuple):
    world: int  # WORLD_SIZE: processes over all nodes
    rank: int  # RANK: this process' global rank
    local_world: int  # LOCAL_WORLD_SIZE: processes on this node


def torchrun_world() -> TorchrunWorld | None:
    """torchrun's world when it started this process as one rank of several (one node or several; ultralytics' own
    launcher runs torch.distributed.run too), None otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or "LOCAL_RANK" not in os.environ:
        return None
    return TorchrunWorld(world, int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_WORLD_SIZE", str(world))))


def is_ddp_worker(cfg) -> bool:
    """Whether this process is a worker that ultralytics' DDP launcher started, which rebuilds the trainer from its
    args alone: it runs under torch.distributed.run (LOCAL_RANK), and the script `ultralytics.utils.dist.
    generate_ddp_file` writes passes a cfg dict with save_dir '' (8.4.150 to 8.4.190)."""
    return "LOCAL_RANK" in os.environ or (isinstance(cfg, dict) and cfg.get("save_dir") == "")


@contextlib.contextmanager
def checkpoints_written_to(trainer, last: Path, best: Path):
    """Within: ultralytics' `save_model` writes last.pt to `last` and best.pt to `best`. BaseTrainer.save_model writes
    the paths in `trainer.last` and `trainer.best` (8.4.150 to 8.4.190); they are restored afterwards."""
    final = trainer.last, trainer.best
    trainer.last, trainer.best = last, best
    try:
        yield
    finally:
        trainer.last, trainer.best = final


class AdaptedDetectionTrainer(DetectionTrainer):
    """DetectionTrainer whose private steps call the named hooks above; under torchrun (ranks of one or several nodes)
    it trains in torchrun's world and every rank in rank 0's run folder. Attributes: `torchrun` (TorchrunWorld or
    None), `shares_run_folder` (ranks > 0 take rank 0's run folder once the process group is up)."""

    def __init__(self, cfg=DEFAULT_CFG, overrides: dict | None = None, _callbacks=None):
        self.torchrun = launch = torchrun_world()
        # torchrun runs this on every rank, without the save_dir ultralytics' own launcher hands its workers
        self.shares_run_folder = bool(launch) and not (overrides or {}).get("save_dir")
        if self.shares_run_folder and launch.rank > 0:
            # ultralytics lets ranks > 0 take `name` as is (get_save_dir: exist_ok for RANK > 0), i.e. an earlier run
            # of that name whose results.csv BaseTrainer.__init__ deletes; they start in a scratch folder instead and
            # take rank 0's in _setup_ddp
            scratch = Path(tempfile.gettempdir()) / f"atcache-rank{launch.rank}-{os.getpid()}"
            overrides = {**(overrides or {}), "save_dir": str(scratch)}
        super().__init__(cfg, overrides, _callbacks)
        if launch:
            self.join_world(*launch)

    # ------------------------------------------------------------------ hooks (no-ops unless said otherwise)
    def join_world(self, world: int, rank: int, local_world: int) -> None:
        """torchrun started this process as global `rank` of `world` (`local_world` on this node). ultralytics sizes
        the DDP world by the devices in `device` (BaseTrainer.__init__: `world_size`), which _setup_ddp passes to
        init_process_group and _build_train_pipeline divides the batch by; across nodes that is this node's share
        only, so this takes torchrun's world. Under ultralytics' own single-node launcher the two agree."""
        self.world_size = world

    def on_train_setup(self) -> None:
        """After ultralytics' _setup_train: model, loaders, optimizer, EMA, scaler and validator made, a resumed run's
        state loaded."""

    def on_mosaic_closed(self, epoch: int) -> None:
        """After ultralytics switched the training dataset's mosaic off; its loader restarts with `epoch`."""

    # ------------------------------------------------------------------ adapter services
    def set_criterion(self, criterion) -> None:
        """The trained model's loss from now on: ultralytics' BaseModel.loss calls `model.criterion(preds, batch)`
        (init_criterion() when None) and BaseTrainer.save_model strips `criterion` from the checkpoint's EMA copy."""
        unwrap_model(self.model).criterion = criterion

    def plain_criterion(self):
        """A new ultralytics criterion of the trained model (its `init_criterion()`, reading model.args)."""
        return unwrap_model(self.model).init_criterion()

    def use_run_folder(self, save_dir: Path) -> None:
        """Train in `save_dir`: the fields BaseTrainer.__init__ derives from it (wdir, last, best, csv)."""
        self.save_dir = Path(save_dir)
        self.wdir = self.save_dir / "weights"
        self.last, self.best, self.csv = self.wdir / "last.pt", self.wdir / "best.pt", self.save_dir / "results.csv"

    def take_rank0_run_folder(self) -> None:
        """Every rank takes rank 0's run folder (process group up), which must be visible on every node: ultralytics'
        final validation of best.pt gathers over all ranks, and a rank that does not see the file skips it, leaving
        the others waiting until the process-group timeout."""
        folder = [str(self.save_dir)]
        dist.broadcast_object_list(folder, src=0)
        self.use_run_folder(Path(folder[0]))
        visible = [None] * dist.get_world_size()
        dist.all_gather_object(visible, self.wdir.is_dir())  # rank 0 made it in BaseTrainer.__init__
        if not all(visible):
            missing = [r for r, ok in enumerate(visible) if not ok]
            raise AtcacheError(
                f"run folder {self.save_dir} is not visible to ranks {missing}; put --project on a filesystem that "
                "every node mounts at the same path (ultralytics validates best.pt from it on every rank at the end)"
            )

    # ------------------------------------------------------------------ ultralytics' private steps
    def _setup_ddp(self):
        super()._setup_ddp()
        if self.shares_run_folder:
            self.take_rank0_run_folder()

    def _setup_train(self):
        super()._setup_train()
        self.on_train_setup()

    def _close_dataloader_mosaic(self):
        super()._close_dataloader_mosaic()
        self.on_mosaic_closed(vars(self).get("epoch", self.start_epoch))
