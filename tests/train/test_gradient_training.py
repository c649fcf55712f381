"""Gradient-based AT and the flip-symmetry term in the trainer: the criterion wrapper's terms against
atcache.attention.gradient computed by hand (factor beta/2), and one-epoch CLI runs that log them."""

import copy
import math
import pickletools
import zipfile

import pytest
import torch
from torch import nn

from atcache.attention.gradient import flip_loss, gradient_at_loss, input_gradient
from atcache.config import DistillSettings
from helpers import COMMON, assert_one_line_error, build_config, invoke, lively_model, results
from atcache.train.gradients import OnlineGradients
from atcache.train.loss import FLIP_LOSS, GRAD_LOSS, AttentionTransferLoss, TeacherTargets
from atcache.train.trainer import AtcacheTrainer


def lively(seed: int):
    """helpers.lively_model with ultralytics' default args (what the trainer's criterion reads)."""
    from atcache.yolo import get_cfg

    model = lively_model(seed)
    model.args = get_cfg()
    return model


def fixed_batch(n: int = 2, size: int = 64) -> dict:
    g = torch.Generator().manual_seed(3)
    return {"img": torch.rand(n, 3, size, size, generator=g), "batch_idx": torch.tensor([0.0, 1.0, 1.0]),
            "cls": torch.tensor([[1.0], [4.0], [7.0]]),
            "bboxes": torch.tensor([[0.3, 0.4, 0.3, 0.4], [0.6, 0.5, 0.4, 0.3], [0.4, 0.6, 0.2, 0.3]])}


def test_wrapper_adds_half_beta_times_the_gradient_and_flip_terms():
    from atcache.train.checks import RunPlan

    student, teacher = lively(0).train(), lively(1).eval()
    settings = DistillSettings(mode="online", at_weight=0.0, gradient_weight=3.0, flip_weight=5.0)
    plan = RunPlan(settings.p, settings.kind, 1e-8)
    gradients = OnlineGradients(teacher, stride=1)
    targets = TeacherTargets(settings, plan, "cpu", gradients=gradients)  # the teacher's side: J_T into the batch
    student.criterion = AttentionTransferLoss(student.init_criterion(), student, settings, plan, pool=gradients,
                                              scaler=torch.amp.GradScaler("cpu", enabled=False))
    frozen = copy.deepcopy(student)  # the student as it was before the step (a copy's criterion is unarmed: plain)
    one_forward = copy.deepcopy(student)  # BN's running statistics after the training forward alone
    batch = fixed_batch()
    labels = {k: batch[k] for k in ("batch_idx", "cls", "bboxes")}

    step = targets.fill({**batch, "img": batch["img"].clone()})  # what the trainer's preprocess_batch does
    student.criterion.arm(step)  # the step's input now requires grad (J_S), the student's next forward is watched
    x = step["img"]
    assert x.requires_grad
    loss, items = student.criterion(student(x), step)
    base_loss, base_items = frozen.criterion(frozen(batch["img"]), batch)
    one_forward(batch["img"])

    J_S = input_gradient(frozen, batch["img"], labels)  # train mode, one forward of the batch
    J_T = input_gradient(teacher, batch["img"], labels)  # eval mode
    grad_expected = 3.0 / 2 * gradient_at_loss(J_S, J_T)
    flip_expected = 5.0 / 2 * flip_loss(frozen, batch["img"], labels)
    assert grad_expected > 0 and flip_expected > 0
    torch.testing.assert_close(items[GRAD_LOSS], grad_expected.detach(), rtol=1e-4, atol=0)
    torch.testing.assert_close(items[FLIP_LOSS], flip_expected.detach(), rtol=1e-4, atol=0)
    torch.testing.assert_close(loss[:3], base_loss.detach(), rtol=1e-5, atol=0)
    torch.testing.assert_close(loss[3:].detach(), torch.stack([grad_expected, flip_expected]).detach() * 2, rtol=1e-4, atol=0)
    assert set(items) == set(base_items) | {GRAD_LOSS, FLIP_LOSS}
    # the extra flip forwards leave BN's running statistics as the one training forward left them
    for bn, ref in zip(student.modules(), one_forward.modules()):
        if isinstance(bn, nn.BatchNorm2d):
            torch.testing.assert_close(bn.running_mean, ref.running_mean)
            torch.testing.assert_close(bn.running_var, ref.running_var)
    # differentiable w.r.t. the weights (double backprop), and the loss disarmed after its one call
    loss.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in student.parameters() if p.grad is not None)
    again, again_items = student.criterion(student(batch["img"]), batch)
    assert GRAD_LOSS not in again_items and again.shape == base_loss.shape


def test_the_loss_adds_terms_only_after_the_students_armed_train_mode_forward():
    """The loss knows a training step by its taps alone: armed (the trainer's preprocess_batch) and then a forward of
    its student in train mode. An eval forward (validation), an unarmed call, a second call, or a copy of the student
    (EMA, checkpoints: cheap, no teacher, unarmed, picklable) gets the plain criterion's loss."""
    import pickle

    from atcache.train.checks import RunPlan

    student = lively(0).train()
    settings = DistillSettings(mode="plain", flip_weight=1.0)
    plan = RunPlan(settings.p, settings.kind, 1e-8)
    loss = AttentionTransferLoss(student.init_criterion(), student, settings, plan)
    student.criterion = loss
    batch = fixed_batch()
    plain = set(loss.base(student(batch["img"]), batch)[1])
    assert set(loss(student(batch["img"]), batch)[1]) == plain  # never armed

    loss.arm(batch)
    student.eval()
    with torch.no_grad():
        preds = student(batch["img"])
    student.train()
    assert set(loss(preds, batch)[1]) == plain  # armed, but the forward was an eval one (validation)
    loss.arm(batch)
    assert set(loss(student(batch["img"]), batch)[1]) == plain | {FLIP_LOSS}  # the training step
    assert not student._forward_pre_hooks and not any(m._forward_hooks for m in student.modules())  # disarmed

    copy_ = copy.deepcopy(student)  # a copy (EMA, checkpoints) carries its own unarmed loss and no hook
    assert isinstance(copy_.criterion, AttentionTransferLoss) and copy_.criterion.model is copy_
    assert not copy_._forward_pre_hooks and not any(m._forward_hooks for m in copy_.modules())
    assert set(copy_.criterion(copy_(batch["img"]), batch)[1]) == plain
    restored = pickle.loads(pickle.dumps(student))
    assert restored.criterion.model is restored and set(restored.criterion(restored(batch["img"]), batch)[1]) == plain
    loss.arm(batch)
    armed = copy.deepcopy(student)  # made while armed (ultralytics makes none then): its own taps, not the original's
    assert set(armed.criterion(armed(batch["img"]), batch)[1]) == plain | {FLIP_LOSS}
    assert set(loss(student(batch["img"]), batch)[1]) == plain | {FLIP_LOSS}  # the original's step is still to come


def test_train_with_flip_weight_logs_flip_loss_and_saves_a_plain_checkpoint(voc_yaml, tmp_path):
    result = invoke("train", "--data", voc_yaml, "--project", tmp_path, "--name", "flip", "--flip-weight", "1", *COMMON)
    assert result.exit_code == 0, (result.output, result.exception)
    row = results(tmp_path / "flip")
    assert math.isfinite(row["train/flip_loss"]) and row["train/flip_loss"] > 0
    assert "train/at_loss" not in row and not any(k.startswith("val/flip") for k in row)
    best = tmp_path / "flip" / "weights" / "best.pt"
    with zipfile.ZipFile(best) as z:  # the pickle names no atcache class (a process without atcache can load it)
        pickled = z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
    modules = {arg.split(" ")[0] for op, arg, _ in pickletools.genops(pickled) if op.name == "GLOBAL"}
    modules |= {arg for op, arg, _ in pickletools.genops(pickled) if op.name in ("SHORT_BINUNICODE", "BINUNICODE")
                and isinstance(arg, str) and arg.startswith("atcache.")}
    assert not any(m.split(".")[0] == "atcache" for m in modules), modules
    from ultralytics import YOLO

    assert YOLO(best).model.yaml["nc"] > 0


def test_train_online_gradient_weight_logs_grad_loss(voc_yaml, teacher_pt, tmp_path):
    result = invoke("train-online", "--teacher", teacher_pt, "--data", voc_yaml, "--project", tmp_path, "--name", "grad",
                    "--gradient-weight", "1", "--at-weight", "0", *COMMON)
    assert result.exit_code == 0, (result.output, result.exception)
    row = results(tmp_path / "grad")
    assert math.isfinite(row["train/grad_loss"]) and row["train/grad_loss"] > 0
    assert "train/at_loss" not in row and "train/flip_loss" not in row
    assert not any(k.startswith("val/grad") for k in row)


def test_gradient_weight_needs_train_online(voc_yaml, tmp_path):
    from atcache.errors import AtcacheError

    with pytest.raises(AtcacheError, match="train-online"):
        AtcacheTrainer(overrides={"model": "yolo11n.yaml", "data": str(voc_yaml), "imgsz": 64, "device": "cpu",
                                  "project": str(tmp_path)}, settings=DistillSettings(gradient_weight=1.0))


# --------------------------------------------------------------- train-from-cache --gradient-weight (cached J_T)
GRAD_STRIDE = 8


@pytest.fixture(scope="module")
def grad_cache(voc_yaml, teacher_pt, tmp_path_factory):
    from atcache.teacher.pipeline import build_cache

    out = tmp_path_factory.mktemp("gradcache") / "grad.zarr"
    build_cache(build_config(voc_yaml, out, teacher=str(teacher_pt), gradient=True, gradient_stride=GRAD_STRIDE))
    return out


def test_train_from_cache_gradient_weight_logs_grad_loss(voc_yaml, grad_cache, tmp_path):
    result = invoke("train-from-cache", "--cache", grad_cache, "--targets", "static", "--data", voc_yaml, "--project",
                    tmp_path, "--name", "cgrad", "--gradient-weight", "1", "--at-weight", "0", *COMMON)
    assert result.exit_code == 0, (result.output, result.exception)
    row = results(tmp_path / "cgrad")
    assert math.isfinite(row["train/grad_loss"]) and row["train/grad_loss"] > 0
    assert "train/at_loss" not in row and not any(k.startswith("val/grad") for k in row)


def test_cached_teacher_gradient_is_direction_times_norm_of_the_batch_rows(voc_yaml, grad_cache):
    import numpy as np

    from atcache.cache.store import CacheStore
    from helpers import target_dataset
    from atcache.train.gradients import CachedGradients

    store = CacheStore.open(grad_cache)
    ds = target_dataset(voc_yaml, grad_cache, mode="static")
    grads = CachedGradients.load(store, ds.im_files, ds.at_rows)
    picks = [3, 0, 7]
    batch = ds.collate_fn([ds[i] for i in picks])
    batch["img"] = batch["img"].float() / 255
    rows = ds.at_rows[picks]
    assert grads.rows(batch).tolist() == rows.tolist()
    expected = store.read("grad/direction")[rows].astype(np.float32) * store.read("grad/norm")[rows][:, None, None, None]
    J_T = grads.teacher(batch)
    g = 64 // GRAD_STRIDE
    assert J_T.shape == (3, 3, g, g) and J_T.dtype == torch.float32 and J_T.abs().sum() > 0
    torch.testing.assert_close(J_T, torch.from_numpy(expected))
    assert grads.pool(torch.ones(3, 3, 64, 64)).shape == (3, 3, g, g)


@pytest.mark.parametrize("cache,extra,message", [
    ("grad", ["--targets", "warp"], "a mosaic's loss is not a warp of per-image losses"),
    ("grad", ["--targets", "static", "--gradient-stride", "4"], "--gradient-stride 4 differs from the stride"),
    ("plain", ["--targets", "static"], "build it with build-cache --gradient"),
    ("grad", ["--targets", "static", "--stream"], "does not stream"),
])
def test_train_from_cache_gradient_weight_refusals(voc_yaml, grad_cache, built_cache, tmp_path, cache, extra, message):
    path = grad_cache if cache == "grad" else built_cache
    result = invoke("train-from-cache", "--cache", path, "--data", voc_yaml, "--project", tmp_path,
                    "--gradient-weight", "1", *COMMON, *extra)
    assert_one_line_error(result, message)
