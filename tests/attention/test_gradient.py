"""Gradient-based attention transfer (atcache.attention.gradient): J against finite differences, the double-backprop
weight gradient of the AT term, per-image independence of the teacher's J, the flip term, pooling, split/join."""

from contextlib import contextmanager

import pytest
import torch

from atcache.attention.gradient import (criterion, flip_batch, flip_loss, gradient_at_loss, gradient_attention,
                                        image_labels, input_gradient, join, per_image_loss, pool_gradient, split)
from helpers import lively_model
from atcache.yolo import load_model

FP16_SMALLEST_SUBNORMAL = 2.0**-24


def make_batch(n: int, dtype=torch.float32, boxes=(1, 2, 3, 1), seed: int = 1) -> dict:
    """ultralytics' labels for n images: image i has boxes[i % len(boxes)] boxes, normalised xywh."""
    g = torch.Generator().manual_seed(seed)
    idx, cls, bb = [], [], []
    for i in range(n):
        for _ in range(boxes[i % len(boxes)]):
            idx.append(i)
            cls.append(int(torch.randint(0, 20, (1,), generator=g)))
            bb.append(torch.cat([torch.rand(2, generator=g) * 0.5 + 0.25, torch.rand(2, generator=g) * 0.3 + 0.2]))
    return {"batch_idx": torch.tensor(idx, dtype=dtype), "cls": torch.tensor(cls, dtype=dtype).view(-1, 1),
            "bboxes": torch.stack(bb).to(dtype)}


def images(n: int, size: int, dtype=torch.float32, seed: int = 2) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.fixture
def float64():
    """float64 default dtype: the criterion's loss buffer is torch.zeros(3), so float64 L needs it."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(before)


@contextmanager
def frozen_assigner(model, run):
    """The assigner's targets recorded during run() and replayed afterwards: the function autograd differentiates
    (ultralytics assigns on detached predictions, so the loss value also moves through the targets)."""
    crit = criterion(model)
    assigner, records = crit.assigner, []

    def record(*a, **k):
        records.append(assigner(*a, **k))
        return records[-1]

    crit.assigner = record
    run()
    replay = {"i": 0}

    def play(*a, **k):
        replay["i"] += 1
        return records[(replay["i"] - 1) % len(records)]

    crit.assigner = play
    try:
        yield
    finally:
        crit.assigner = assigner


def rel(a, b) -> float:
    return (torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b)).item()


# ------------------------------------------------------------------------------------------ (a) J = dL/dx
@pytest.mark.parametrize("gains", [None, (7.5, 0.0, 1.5)], ids=["default-gains", "box-and-dfl-only"])
def test_input_gradient_matches_central_differences(float64, gains):
    """Assigner targets held (autograd's view); with box only, CIoU's no_grad alpha leaves ~3e-5 between the two."""
    model = lively_model(dtype=torch.float64)
    x, batch = images(2, 32, torch.float64), make_batch(2, torch.float64)
    if gains:
        crit = criterion(model)
        crit.hyp = type(crit.hyp)(**{**vars(crit.hyp), "box": gains[0], "cls": gains[1], "dfl": gains[2]})
    J = input_gradient(model, x, batch)
    assert J.shape == x.shape and J.dtype == torch.float64 and not J.requires_grad

    def L(xx):
        with torch.no_grad():
            return per_image_loss(model, model(xx), batch).sum().item()

    pixels = J.flatten().abs().topk(3).indices.tolist() + [5000]
    eps = 1e-3
    with frozen_assigner(model, lambda: L(x)):
        for j in pixels:
            up, down = x.clone().flatten(), x.clone().flatten()
            up[j] += eps
            down[j] -= eps
            fd = (L(up.view_as(x)) - L(down.view_as(x))) / (2 * eps)
            assert abs(fd - J.flatten()[j].item()) < 1e-4 * abs(J.flatten()[j].item()), (j, fd, J.flatten()[j])


def test_input_gradient_options_agree(float64):
    """preds from the caller's own forward and a loss scale give the same J; inference mode is refused."""
    model = lively_model(dtype=torch.float64)
    x, batch = images(2, 32, torch.float64), make_batch(2, torch.float64)
    J = input_gradient(model, x, batch)
    leaf = x.clone().requires_grad_(True)
    torch.testing.assert_close(input_gradient(model, leaf, batch, preds=model(leaf)), J)
    torch.testing.assert_close(input_gradient(model, x, batch, loss_scale=1024.0), J)
    with pytest.raises(ValueError, match="require grad"):
        input_gradient(model, x, batch, preds=model(x))
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode"):
        input_gradient(model, x, batch)


# ------------------------------------------------------------------- (b) double backprop w.r.t. the weights
def test_gradient_at_term_weight_gradient_matches_finite_differences(float64):
    """d/dW_S ||J_S - J_T||_2 / N through J_S (create_graph=True), the student in train mode, against central
    differences of the term recomputed at perturbed weights (assigner targets held, as autograd holds them). Box gain 0:
    CIoU's aspect weight alpha is computed under no_grad, which puts ~1e-4 between its autograd and its differences."""
    teacher = lively_model(seed=0, dtype=torch.float64)
    student = lively_model(seed=1, dtype=torch.float64).train()
    x, batch = images(2, 64, torch.float64), make_batch(2, torch.float64)  # BN over 2 images: 2x2 maps at stride 32
    crit = criterion(student)
    crit.hyp = type(crit.hyp)(**{**vars(crit.hyp), "box": 0.0})
    J_T = input_gradient(teacher, x, batch)
    weights = [student.model[0].conv.weight, student.model[-1].cv2[0][-1].weight, student.model[-1].cv3[0][-1].weight]

    def term(create_graph=False):
        return gradient_at_loss(input_gradient(student, x, batch, create_graph=create_graph), J_T)

    value = term(create_graph=True)
    assert value.requires_grad and value.item() > 0
    grads = torch.autograd.grad(value, weights)
    eps = 1e-5
    with frozen_assigner(student, term):
        for w, g in zip(weights, grads):
            for j in g.flatten().abs().topk(2).indices.tolist():
                flat = w.data.view(-1)
                old = flat[j].item()
                flat[j] = old + eps
                up = term().item()
                flat[j] = old - eps
                down = term().item()
                flat[j] = old
                fd = (up - down) / (2 * eps)
                assert g.flatten()[j].item() != 0
                assert abs(fd - g.flatten()[j].item()) < 1e-4 * abs(g.flatten()[j].item()), (w.shape, j, fd, g.flatten()[j])


# -------------------------------------------------------------------------------- (c) per image, batch of one
def test_teacher_gradient_of_an_image_is_the_one_it_gets_alone():
    model = lively_model()
    x, batch = images(4, 64), make_batch(4)
    J = input_gradient(model, x, batch)
    with torch.no_grad():
        losses = per_image_loss(model, model(x), batch)
    for i in range(4):
        alone = image_labels(batch, i)
        assert len(alone["cls"]) == (1, 2, 3, 1)[i]
        assert rel(J[i : i + 1], input_gradient(model, x[i : i + 1], alone)) < 1e-4
        with torch.no_grad():  # the criterion on a batch of one (its * batch_size is * 1)
            one, _ = criterion(model)(model(x[i : i + 1]), alone)
        torch.testing.assert_close(losses[i], one.sum(), rtol=1e-5, atol=0)


def test_per_image_loss_normalises_by_each_image_s_own_target_scores_sum():
    """ultralytics' batch loss is N * sum_i num_i / max(sum_i tss_i, 1), the per-image loss num_i / max(tss_i, 1)
    (tss: target_scores_sum, num: the gain-weighted box/cls/dfl sums): so the batch loss is not the per-image sum."""
    model = lively_model()
    x, batch = images(4, 64), make_batch(4)
    tss = []
    crit = criterion(model)
    plain = crit.assigner

    def record(*a, **k):
        out = plain(*a, **k)
        tss.append(out[2].sum())
        return out

    crit.assigner = record
    try:
        with torch.no_grad():
            p = model(x)
            L = per_image_loss(model, p, batch)
            batch_loss = crit(p, batch)[0].sum()
    finally:
        crit.assigner = plain
    per_image_tss, batch_tss = torch.stack(tss[:4]), tss[4]
    torch.testing.assert_close(per_image_tss.sum(), batch_tss, rtol=1e-5, atol=0)  # the assigner is per image
    num = L * per_image_tss.clamp(min=1)
    torch.testing.assert_close(batch_loss, 4 * num.sum() / batch_tss.clamp(min=1), rtol=1e-5, atol=0)
    assert rel(batch_loss, L.sum()) > 1e-2


def test_student_gradient_in_train_mode_depends_on_the_rest_of_the_batch():
    """BN's batch statistics couple the images in train mode; in eval mode they do not."""
    model = lively_model()
    x, batch = images(4, 64), make_batch(4)
    other = x.clone()
    other[3] = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(9))
    assert rel(input_gradient(model, other, batch)[0], input_gradient(model, x, batch)[0]) < 1e-5
    model.train()
    assert rel(input_gradient(model, other, batch)[0], input_gradient(model, x, batch)[0]) > 1e-3


# ---------------------------------------------------------------------------------------- (d) flip, pooling
def test_flip_batch_mirrors_x_only():
    batch = {"batch_idx": torch.tensor([0.0, 1.0]), "cls": torch.tensor([[3.0], [5.0]]),
             "bboxes": torch.tensor([[0.2, 0.3, 0.1, 0.4], [0.5, 0.6, 0.2, 0.2]]), "img": torch.arange(4.0).view(1, 1, 1, 4)}
    out = flip_batch(batch)
    torch.testing.assert_close(out["bboxes"], torch.tensor([[0.8, 0.3, 0.1, 0.4], [0.5, 0.6, 0.2, 0.2]]))
    assert torch.equal(out["img"], torch.tensor([[[[3.0, 2.0, 1.0, 0.0]]]]))
    assert out["cls"] is batch["cls"] and batch["bboxes"][0, 0] == 0.2  # the input is left as it was


@pytest.mark.parametrize("stride", [1, 4])
def test_flip_term_equals_two_gradient_calls_by_hand(stride):
    model = lively_model()
    x, batch = images(3, 64), make_batch(3)
    J = input_gradient(model, x, batch)
    mirrored = {**batch, "bboxes": torch.cat([1 - batch["bboxes"][:, :1], batch["bboxes"][:, 1:]], 1)}
    J_flip = input_gradient(model, x.flip(-1), mirrored).flip(-1)
    d = J - J_flip
    if stride > 1:
        d = d.view(3, 3, 64 // stride, stride, 64 // stride, stride).mean(dim=(3, 5))
    expected = d.pow(2).sum().sqrt() / 3
    value = flip_loss(model, x, batch, stride=stride)
    torch.testing.assert_close(value, expected, rtol=1e-5, atol=0)
    assert value.item() > 0.05 * J.norm().item() / 3  # a random model is far from flip-invariant
    grad = torch.autograd.grad(value, model.model[0].conv.weight)[0]  # differentiable w.r.t. the weights
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_pooled_gradient_is_block_means_and_the_loss_commutes_with_it():
    g = torch.Generator().manual_seed(0)
    J_S, J_T = torch.randn(2, 3, 8, 8, generator=g), torch.randn(2, 3, 8, 8, generator=g)
    by_hand = J_S.view(2, 3, 4, 2, 4, 2).mean(dim=(3, 5))
    torch.testing.assert_close(pool_gradient(J_S, 2), by_hand)
    assert pool_gradient(J_S, 1) is J_S
    diff = (J_S - J_T).view(2, 3, 4, 2, 4, 2).mean(dim=(3, 5))
    torch.testing.assert_close(gradient_at_loss(pool_gradient(J_S, 2), pool_gradient(J_T, 2)), diff.norm() / 2)
    torch.testing.assert_close(gradient_at_loss(J_S, J_T), (J_S - J_T).norm() / 2)
    with pytest.raises(ValueError, match="does not divide"):
        pool_gradient(J_S, 3)


def test_pooled_gradient_is_the_gradient_at_the_coarser_resolution(float64):
    """pool_s(J) * s^2 = dL/dz for x = nearest-upsampled z (H/s): the loss on pooled J is the loss at H/s."""
    model = lively_model(dtype=torch.float64)
    z, batch = images(2, 16, torch.float64), make_batch(2, torch.float64)
    x = z.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    zz = z.clone().requires_grad_(True)
    up = zz.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    (dz,) = torch.autograd.grad(per_image_loss(model, model(up), batch).sum(), zz)
    torch.testing.assert_close(pool_gradient(input_gradient(model, x, batch), 2) * 4, dz)


# ------------------------------------------------------------------------- (e) direction and norm, the picture
def test_split_join_round_trip():
    g = torch.Generator().manual_seed(0)
    J = torch.randn(4, 3, 8, 8, generator=g) * torch.tensor([1e-9, 1.0, 1e3, 0.0]).view(4, 1, 1, 1)
    direction, norm = split(J)
    assert norm.dtype == torch.float32 and norm.shape == (4,) and direction.dtype == J.dtype
    torch.testing.assert_close(direction.flatten(1).norm(dim=1), torch.tensor([1.0, 1.0, 1.0, 0.0]))
    torch.testing.assert_close(norm[:3], J[:3].flatten(1).norm(dim=1), rtol=1e-6, atol=0)
    assert norm[3] == 0 and torch.isfinite(direction).all()
    back = join(direction, norm)
    for i in range(3):
        assert rel(back[i], J[i]) < 1e-6
    assert torch.equal(back[3], J[3])


def test_yolo11n_gradients_need_the_direction_and_norm_for_float16():
    """A YOLO11n's J at 64 px is mostly below float16's smallest subnormal (raw float16 loses it); its direction in
    float16 with a float32 norm keeps it to ~1e-3."""
    model = load_model("yolo11n.yaml", nc=20, fuse=False).model
    x, batch = images(2, 64), make_batch(2)
    J = input_gradient(model, x, batch)
    nonzero = J != 0
    assert nonzero.float().mean() > 0.99
    lost = (J.abs() < FP16_SMALLEST_SUBNORMAL / 2) & nonzero
    assert lost.any() and (J.half()[lost] == 0).all()
    assert rel(J.half().float(), J) > 0.5
    direction, norm = split(J)
    assert (direction.abs().amax() < 65504) and norm.min() > 0
    assert rel(join(direction.half(), norm), J) < 1e-3


def test_gradient_attention_is_the_normalised_channel_sum_of_squares():
    g = torch.Generator().manual_seed(0)
    J = torch.randn(2, 3, 5, 7, generator=g, dtype=torch.float64)
    a = J.pow(2).sum(1)
    expected = (a / a.flatten(1).norm(dim=1).view(2, 1, 1)).float()
    A = gradient_attention(J)
    assert A.shape == (2, 5, 7)
    torch.testing.assert_close(A, expected, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(gradient_attention((J * 1e-9).float()), expected, rtol=1e-5, atol=1e-7)  # tiny J too


def test_an_image_without_boxes_has_a_loss_and_a_gradient():
    """Images without boxes still have a loss (background classification) and a gradient."""
    model = lively_model()
    x = images(2, 64)
    batch = make_batch(1)  # image 1 has no labels
    J = input_gradient(model, x, batch)
    assert (J[1].abs().sum() > 0) and rel(J[1:], input_gradient(model, x[1:], image_labels(batch, 1))) < 1e-4
    with torch.no_grad():
        assert per_image_loss(model, model(x), batch).min() > 0
