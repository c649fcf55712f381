"""Contracts of the ultralytics trainer internals atcache.yolo.trainer relies on: every private step that
AdaptedDetectionTrainer overrides, every field it rewrites or reads, and the criterion and DDP-launch conventions. Each
failure names the ultralytics attribute that changed and what in the adapter depends on it."""

import inspect
from pathlib import Path

import pytest
import torch

from helpers import TEST_IMGSZ

pytestmark = pytest.mark.release_range  # CI runs these on the oldest ultralytics of the range too


def _version() -> str:
    from atcache.yolo import ultralytics_version

    return ultralytics_version()


def _names(function) -> set[str]:
    """The global and attribute names a function's code reads or writes (its co_names)."""
    return set(getattr(function, "__code__", None).co_names) if hasattr(function, "__code__") else set()


def _base_trainer():
    from ultralytics.engine.trainer import BaseTrainer

    return BaseTrainer


# ---------------------------------------------------------------------- the private steps the adapter overrides
@pytest.mark.parametrize("name,used_by", [
    ("_setup_ddp", "AdaptedDetectionTrainer._setup_ddp (torchrun: every rank takes rank 0's run folder)"),
    ("_setup_train", "AdaptedDetectionTrainer._setup_train -> on_train_setup (atcache's loss and targets)"),
    ("_close_dataloader_mosaic", "AdaptedDetectionTrainer._close_dataloader_mosaic -> on_mosaic_closed (the epoch "
                                 "sampler's restart)"),
])
def test_private_steps_exist_and_take_no_arguments(name, used_by):
    from atcache.yolo import DetectionTrainer

    step = getattr(DetectionTrainer, name, None)
    assert callable(step), f"ultralytics {_version()}: DetectionTrainer.{name} is gone; {used_by} overrides it"
    params = list(inspect.signature(step).parameters)
    assert params == ["self"], (f"ultralytics {_version()}: DetectionTrainer.{name}{inspect.signature(step)} takes "
                                f"arguments now; {used_by} calls it as {name}()")


def test_the_training_loop_calls_the_private_steps():
    BaseTrainer = _base_trainer()
    loop = _names(BaseTrainer._do_train)
    for name in ("_setup_ddp", "_setup_train"):
        assert name in loop, f"ultralytics {_version()}: BaseTrainer._do_train no longer calls self.{name}()"
    closers = loop | _names(BaseTrainer.resume_training)  # 8.4.150-8.4.157 also close it when resuming
    assert "_close_dataloader_mosaic" in closers, (
        f"ultralytics {_version()}: BaseTrainer._do_train no longer calls self._close_dataloader_mosaic(); "
        "on_mosaic_closed would never run")
    assert "epoch" in loop, f"ultralytics {_version()}: BaseTrainer._do_train no longer sets self.epoch"


def test_the_world_size_reaches_the_process_group_and_the_batch_split():
    """join_world sets `world_size`: _setup_ddp hands it to init_process_group, the loaders divide the batch by it."""
    BaseTrainer = _base_trainer()
    ddp = _names(BaseTrainer._setup_ddp)
    assert {"init_process_group", "world_size"} <= ddp, (
        f"ultralytics {_version()}: BaseTrainer._setup_ddp no longer passes self.world_size to init_process_group; "
        "AdaptedDetectionTrainer.join_world sets it to torchrun's world")
    setup = _names(BaseTrainer._setup_train) | _names(getattr(BaseTrainer, "_build_train_pipeline", None))
    assert {"world_size", "batch_size"} <= setup, (
        f"ultralytics {_version()}: BaseTrainer no longer divides batch_size by self.world_size when it builds the "
        "loaders (_setup_train / _build_train_pipeline)")


def test_init_deletes_the_results_of_a_run_it_takes_over():
    """Why ranks > 0 under torchrun start in a scratch folder: BaseTrainer.__init__ unlinks <save_dir>/results.csv."""
    init = _names(_base_trainer().__init__)
    assert {"csv", "unlink", "save_dir", "world_size", "ddp"} <= init, (
        f"ultralytics {_version()}: BaseTrainer.__init__ no longer sets save_dir/csv/world_size/ddp or unlinks "
        f"results.csv as AdaptedDetectionTrainer.__init__ assumes (names: {sorted(init & {'csv', 'unlink'})})")


def test_save_model_writes_last_and_best_and_strips_the_criterion():
    save = _names(_base_trainer().save_model)
    assert {"last", "best"} <= save, (
        f"ultralytics {_version()}: BaseTrainer.save_model no longer writes self.last / self.best; "
        "atcache.yolo.trainer.checkpoints_written_to redirects them")
    assert "criterion" in save, (
        f"ultralytics {_version()}: BaseTrainer.save_model no longer strips the EMA's criterion; a copy of atcache's "
        "loss could reach the checkpoint")


def test_ultralytics_ddp_workers_get_an_empty_save_dir():
    from ultralytics.utils.dist import generate_ddp_file

    assert "save_dir=''" in inspect.getsource(generate_ddp_file), (
        f"ultralytics {_version()}: generate_ddp_file no longer passes cfg save_dir=''; "
        "atcache.yolo.trainer.is_ddp_worker recognises its workers by it")


# ---------------------------------------------------------------------- fields, on a real trainer
@pytest.fixture(scope="module")
def trainer(voc_yaml, tmp_path_factory):
    from atcache.yolo import DetectionTrainer

    project = tmp_path_factory.mktemp("contracts")
    return DetectionTrainer(overrides={"model": "yolo11n.yaml", "data": str(voc_yaml), "epochs": 1,
                                       "imgsz": TEST_IMGSZ, "batch": 4, "device": "cpu", "plots": False,
                                       "workers": 0, "nbs": 4, "project": str(project), "name": "c"})


def test_fields_set_at_construction(trainer):
    """use_run_folder derives wdir, last, best and csv from save_dir as BaseTrainer.__init__ does."""
    for name in ("save_dir", "wdir", "last", "best", "csv", "world_size", "ddp", "start_epoch", "epochs", "device"):
        assert hasattr(trainer, name), f"ultralytics {_version()}: BaseTrainer.__init__ no longer sets self.{name}"
    derived = {"wdir": trainer.save_dir / "weights", "last": trainer.save_dir / "weights" / "last.pt",
               "best": trainer.save_dir / "weights" / "best.pt", "csv": trainer.save_dir / "results.csv"}
    for name, path in derived.items():
        assert Path(getattr(trainer, name)) == path, (
            f"ultralytics {_version()}: BaseTrainer.__init__ sets {name} = {getattr(trainer, name)}, not {path}; "
            "AdaptedDetectionTrainer.use_run_folder derives it so")
    assert trainer.world_size == 0 and trainer.ddp is False, (
        f"ultralytics {_version()}: world_size {trainer.world_size} / ddp {trainer.ddp} on the CPU")


def test_fields_set_by_setup_train_and_where_save_model_writes(trainer, tmp_path):
    from atcache.yolo.trainer import checkpoints_written_to

    trainer._setup_train()
    assert hasattr(trainer.scaler, "get_scale") and hasattr(trainer.scaler, "is_enabled"), (
        f"ultralytics {_version()}: BaseTrainer._setup_train no longer sets self.scaler (a GradScaler); atcache's "
        "loss scales J_S by it")
    for name in ("train_loader", "ema", "start_epoch", "validator"):
        assert hasattr(trainer, name), f"ultralytics {_version()}: BaseTrainer._setup_train no longer sets self.{name}"
    assert hasattr(trainer.train_loader, "sampler") and callable(getattr(trainer.train_loader, "reset", None)), (
        f"ultralytics {_version()}: the training loader has no sampler / reset(); on_mosaic_closed sets the sampler's "
        "epoch for the restarted loader")
    trainer.epoch, trainer.fitness, trainer.best_fitness = 0, None, None
    final = trainer.last, trainer.best
    with checkpoints_written_to(trainer, tmp_path / "l.pt", tmp_path / "b.pt"):
        trainer.save_model()
    assert (tmp_path / "l.pt").is_file() and (tmp_path / "b.pt").is_file(), (
        f"ultralytics {_version()}: BaseTrainer.save_model no longer writes the paths in self.last and self.best")
    assert (trainer.last, trainer.best) == final and not final[0].exists()


# ---------------------------------------------------------------------- the criterion
def test_the_model_calls_its_criterion_with_preds_and_batch():
    """AdaptedDetectionTrainer.set_criterion: ultralytics' BaseModel.loss calls model.criterion(preds, batch)."""
    from atcache.yolo import DetectionModel, get_cfg

    model = DetectionModel("yolo11n.yaml", nc=2, verbose=False).train()
    model.args = get_cfg()
    calls = []

    def recording(preds, batch):
        calls.append((preds, batch))
        return torch.zeros(3), {}

    model.criterion = recording
    batch = {"img": torch.zeros(1, 3, 64, 64), "batch_idx": torch.zeros(0), "cls": torch.zeros(0, 1),
             "bboxes": torch.zeros(0, 4)}
    model(batch)
    assert len(calls) == 1 and calls[0][1] is batch, (
        f"ultralytics {_version()}: model(batch) no longer calls model.criterion(preds, batch) (BaseModel.loss); "
        "atcache's loss is set there")
    assert "init_criterion" in _names(type(model).loss), (
        f"ultralytics {_version()}: BaseModel.loss no longer makes its criterion with init_criterion()")
    assert "update" in _names(_base_trainer()._do_train), (
        f"ultralytics {_version()}: BaseTrainer._do_train no longer calls criterion.update(); AttentionTransferLoss "
        "passes attribute reads on to the plain criterion for it")
