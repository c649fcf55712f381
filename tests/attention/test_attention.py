import math

import pytest
import torch

from atcache.attention.functional import at_loss, attention_map, attention_with_norm, layer_at_loss


def seed_attention_map(fm, p=2):
    """The reference AT code's formula (at-distillation-framework notes), verbatim."""
    am = torch.pow(torch.abs(fm), p)
    am = torch.sum(am, dim=1, keepdim=False)
    norm = torch.norm(am, p=2, dim=(1, 2), keepdim=True)
    return torch.div(am, norm + 1e-8)


def test_hand_computed_sum_p():
    fm = torch.zeros(1, 2, 1, 2)
    fm[0, 0, 0] = torch.tensor([1.0, 2.0])
    fm[0, 1, 0] = torch.tensor([-2.0, 0.0])
    # a = [1 + 4, 4 + 0] = [5, 4]; ||a|| = sqrt(41)
    expected = torch.tensor([[[5.0, 4.0]]]) / (math.sqrt(41) + 1e-8)
    torch.testing.assert_close(attention_map(fm), expected)


def test_other_kinds_hand_computed():
    fm = torch.tensor([[[[1.0, -3.0]], [[-2.0, 1.0]]]])  # (1, 2, 1, 2)
    # sum |F| = [3, 4] -> /5 ; max_p (p=2) = [4, 9] -> /sqrt(97)
    torch.testing.assert_close(attention_map(fm, kind="sum"), torch.tensor([[[3.0, 4.0]]]) / (5 + 1e-8))
    torch.testing.assert_close(attention_map(fm, kind="max_p"), torch.tensor([[[4.0, 9.0]]]) / (math.sqrt(97) + 1e-8))


def test_matches_seed_formula_and_returns_norm():
    fm = torch.randn(3, 16, 5, 7)
    a, n = attention_with_norm(fm)
    torch.testing.assert_close(a, seed_attention_map(fm))
    torch.testing.assert_close(n, fm.pow(2).sum(1).flatten(1).norm(dim=1))
    assert a.shape == (3, 5, 7)


@pytest.mark.parametrize("kind", ["sum_p", "sum", "max_p"])
def test_scale_invariance(kind):
    fm = torch.randn(2, 8, 6, 6)
    torch.testing.assert_close(attention_map(3.7 * fm, kind=kind), attention_map(fm, kind=kind), rtol=1e-5, atol=1e-6)


def test_unit_norm_per_sample():
    a = attention_map(torch.randn(4, 8, 9, 9))
    torch.testing.assert_close(a.flatten(1).norm(dim=1), torch.ones(4), rtol=1e-5, atol=1e-5)


def test_zero_map_gives_zeros_not_nan():
    a = attention_map(torch.zeros(2, 4, 3, 3))
    assert torch.equal(a, torch.zeros(2, 3, 3))


def test_fp16_large_activations_stay_finite():
    fm = torch.full((2, 512, 4, 4), 200.0, dtype=torch.float16)  # 512 * 200^2 = 2e7 >> fp16 max 65504
    a = attention_map(fm)
    assert a.dtype == torch.float32 and torch.isfinite(a).all()
    torch.testing.assert_close(a, torch.full((2, 4, 4), 0.25))


def test_at_loss_value_and_gradient():
    s = [torch.randn(2, 4, 4, requires_grad=True), torch.randn(2, 2, 2, requires_grad=True)]
    t = [torch.randn(2, 4, 4), torch.randn(2, 2, 2)]
    loss = at_loss(s, t)
    expected = sum(torch.norm(a - b, p=2) / 2 for a, b in zip(s, t))
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert all(x.grad is not None and torch.isfinite(x.grad).all() for x in s)


def test_at_loss_zero_for_identical_and_errors():
    m = torch.rand(3, 5, 5)
    assert at_loss([m], [m.clone()]).item() == 0.0
    with pytest.raises(ValueError, match="layer count"):
        at_loss([m], [m, m])
    with pytest.raises(ValueError, match="shape"):
        layer_at_loss(m, torch.rand(3, 4, 4))


def _pair(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(n, 4, 4, generator=g), torch.rand(n, 2, 2, generator=g)], \
           [torch.rand(n, 4, 4, generator=g), torch.rand(n, 2, 2, generator=g)]


@pytest.mark.parametrize("k", [2, 4, 9])
def test_at_norm_scaling_laws_measured(k):
    """k copies of the same (student, teacher) batch of N: batch norm gives loss(kN) = loss(N) / sqrt(k), per-image
    gives loss(kN) = loss(N) exactly."""
    s, t = _pair()
    sk, tk = [x.repeat(k, 1, 1) for x in s], [x.repeat(k, 1, 1) for x in t]
    torch.testing.assert_close(at_loss(sk, tk, "batch"), at_loss(s, t, "batch") / math.sqrt(k))
    torch.testing.assert_close(at_loss(sk, tk, "per-image"), at_loss(s, t, "per-image"))
    assert at_loss(s, t) == at_loss(s, t, "batch")  # the reference form is the default


def test_per_image_is_the_mean_of_single_image_losses_and_equals_batch_at_n1():
    s, t = _pair(n=5, seed=1)
    singles = [at_loss([x[i:i + 1] for x in s], [y[i:i + 1] for y in t], "per-image") for i in range(5)]
    torch.testing.assert_close(at_loss(s, t, "per-image"), torch.stack(singles).mean())
    for i in range(5):
        one_s, one_t = [x[i:i + 1] for x in s], [y[i:i + 1] for y in t]
        torch.testing.assert_close(at_loss(one_s, one_t, "per-image"), at_loss(one_s, one_t, "batch"))
    expected = sum(torch.linalg.vector_norm(a - b, dim=(1, 2)).mean() for a, b in zip(s, t))
    torch.testing.assert_close(at_loss(s, t, "per-image"), expected)


@pytest.mark.parametrize("norm", ["batch", "per-image"])
def test_at_norm_gradients_flow(norm):
    s = [torch.randn(3, 4, 4, requires_grad=True), torch.randn(3, 2, 2, requires_grad=True)]
    t = [torch.randn(3, 4, 4, requires_grad=True), torch.randn(3, 2, 2)]
    at_loss(s, t, norm).backward()
    assert all(x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0 for x in s)
    assert t[0].grad is None  # the teacher's maps are targets


def test_at_norm_unknown_is_refused():
    m = torch.rand(2, 3, 3)
    with pytest.raises(ValueError, match="unknown AT norm 'image'; choose one of batch, per-image"):
        at_loss([m], [m], "image")
