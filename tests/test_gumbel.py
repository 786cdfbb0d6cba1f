"""The binary Gumbel-sigmoid: right distribution, straight-through gradient, finite in low precision."""
from __future__ import annotations

import math

import pytest
import torch

from dynvit import gumbel_sigmoid, logistic_noise, straight_through_sigmoid
from dynvit.gumbel import sample_keep_mask

LOGITS = torch.linspace(-4, 4, 17)
SAMPLES = 100_000


@pytest.mark.parametrize("tau", [0.1, 0.5, 1.0, 5.0])
def test_keep_frequency_matches_sigmoid_of_logit(tau):
    g = torch.Generator().manual_seed(0)
    logits = LOGITS.expand(SAMPLES, -1)
    freq = gumbel_sigmoid(logits, tau, hard=True, generator=g).mean(0)
    p = torch.sigmoid(LOGITS)
    tolerance = 5 * torch.sqrt(p * (1 - p) / SAMPLES)  # five standard errors
    assert ((freq - p).abs() <= tolerance).all(), (freq - p).abs().max()


def test_single_gumbel_noise_would_fail_the_same_check():
    # The check above can fail: adding ONE Gumbel(0, 1) sample (a common mistake) is caught.
    g = torch.Generator().manual_seed(0)
    u = torch.rand(SAMPLES, LOGITS.numel(), generator=g).clamp(1e-7, 1 - 1e-7)
    freq = ((LOGITS - torch.log(-torch.log(u))) > 0).float().mean(0)
    p = torch.sigmoid(LOGITS)
    assert ((freq - p).abs() > 5 * torch.sqrt(p * (1 - p) / SAMPLES)).any()


def test_logistic_noise_moments():
    noise = logistic_noise((200_000,), generator=torch.Generator().manual_seed(0))
    assert abs(noise.mean().item()) < 0.02
    assert abs(noise.var().item() - math.pi**2 / 3) < 0.05  # Logistic(0, 1) variance
    assert torch.isfinite(noise).all()


def test_forward_is_hard_zero_one():
    y = gumbel_sigmoid(torch.randn(1000), 0.7, hard=True)
    assert set(y.unique().tolist()) <= {0.0, 1.0}


@pytest.mark.parametrize("tau", [0.3, 1.0, 3.0])
def test_straight_through_gradient_equals_relaxed_gradient(tau):
    logits = torch.randn(64, requires_grad=True)
    noise = logistic_noise((64,), generator=torch.Generator().manual_seed(3))
    upstream = torch.randn(64)
    (gumbel_sigmoid(logits, tau, hard=True, noise=noise) * upstream).sum().backward()
    st_grad = logits.grad.clone()
    logits.grad = None
    (torch.sigmoid((logits + noise) / tau) * upstream).sum().backward()
    torch.testing.assert_close(st_grad, logits.grad)
    # and the soft variant returns exactly the relaxed value
    torch.testing.assert_close(gumbel_sigmoid(logits, tau, hard=False, noise=noise), torch.sigmoid((logits + noise) / tau))


def test_deterministic_straight_through():
    logits = torch.tensor([-2.0, -0.1, 0.1, 3.0], requires_grad=True)
    y = straight_through_sigmoid(logits, tau=0.5)
    assert y.tolist() == [0.0, 0.0, 1.0, 1.0]
    y.sum().backward()
    s = torch.sigmoid(logits.detach() / 0.5)
    torch.testing.assert_close(logits.grad, s * (1 - s) / 0.5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("sampler", ["gumbel", "deterministic", "soft"])
def test_no_inf_or_nan_in_low_precision(dtype, sampler):
    big = 6e4 if dtype == torch.float16 else 1e30
    logits = torch.tensor([-big, -100.0, -20.0, 0.0, 20.0, 100.0, big], dtype=dtype).repeat(100).requires_grad_()
    for tau in (1e-3, 1.0, 100.0):
        y = sample_keep_mask(logits, tau, sampler)
        assert y.dtype == dtype and torch.isfinite(y).all()
        (grad,) = torch.autograd.grad(y.float().sum(), logits)
        assert torch.isfinite(grad).all()


def test_bad_tau_is_rejected():
    with pytest.raises(ValueError, match="tau"):
        gumbel_sigmoid(torch.zeros(3), tau=0.0)
    with pytest.raises(ValueError, match="sampler"):
        sample_keep_mask(torch.zeros(3), 1.0, "bernoulli")


@pytest.mark.parametrize("sampler", ["gumbel", "soft"])
def test_noise_scale_zero_is_the_deterministic_sampler_exactly(sampler):
    logits = torch.randn(4096, generator=torch.Generator().manual_seed(4), requires_grad=True)
    for tau in (0.2, 1.0):
        a = sample_keep_mask(logits, tau, sampler, noise_scale=0.0)
        (grad_a,) = torch.autograd.grad(a.sum(), logits)
        b = straight_through_sigmoid(logits, tau) if sampler == "gumbel" else torch.sigmoid(logits / tau)
        (grad_b,) = torch.autograd.grad(b.sum(), logits)
        assert torch.equal(a, b) and torch.equal(grad_a, grad_b)


def test_intermediate_noise_scale_sharpens_the_bernoulli():
    """logit + s * Logistic > 0 has probability sigmoid(logit / s): between the sample (s = 1)
    and the threshold decision (s = 0)."""
    g = torch.Generator().manual_seed(0)
    logits = LOGITS.expand(SAMPLES, -1)
    freq = gumbel_sigmoid(logits, 1.0, hard=True, generator=g, noise_scale=0.5).mean(0)
    p = torch.sigmoid(LOGITS / 0.5)
    assert ((freq - p).abs() <= 5 * torch.sqrt(p * (1 - p) / SAMPLES) + 1e-9).all()


def test_bad_noise_scale_is_rejected():
    with pytest.raises(ValueError, match="noise_scale"):
        gumbel_sigmoid(torch.zeros(3), noise_scale=1.5)
