"""Binary Gumbel-sigmoid sampling with a straight-through estimator.

A keep decision is a Bernoulli variable with P(keep) = sigmoid(logit). The binary form of
the Gumbel-max trick adds the *difference* of two independent Gumbel(0, 1) samples to the
logit; that difference is a Logistic(0, 1) sample, so ``logit + noise > 0`` happens with
probability exactly ``sigmoid(logit)``. (Adding a single Gumbel sample, as some write-ups
do, gives a different probability.) The temperature only shapes the relaxed value used
for the backward pass: the hard sample's distribution does not depend on ``tau``.

All arithmetic runs in float32 and the result is cast back, so fp16/bf16 inputs at
extreme logits give neither inf nor NaN.
"""
from __future__ import annotations

import torch

__all__ = ["logistic_noise", "gumbel_sigmoid", "straight_through_sigmoid", "SAMPLERS", "sample_keep_mask"]

SAMPLERS = ("gumbel", "deterministic", "soft")


def logistic_noise(shape: torch.Size | tuple[int, ...], *, device=None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Logistic(0, 1) noise in float32, i.e. Gumbel(0, 1) minus an independent Gumbel(0, 1).

    Sampled as ``log(u) - log(1 - u)`` with ``u ~ Uniform(0, 1)``, clamped away from 0 and 1
    so the result is always finite (|noise| < 17).
    """
    u = torch.rand(shape, device=device, dtype=torch.float32, generator=generator)
    eps = torch.finfo(torch.float32).eps
    u = u.clamp(eps, 1.0 - eps)
    return torch.log(u) - torch.log1p(-u)


def _straight_through(hard: torch.Tensor, soft: torch.Tensor) -> torch.Tensor:
    # Forward value is `hard`; the gradient is that of `soft`.
    return hard + (soft - soft.detach())


def gumbel_sigmoid(
    logits: torch.Tensor,
    tau: float = 1.0,
    hard: bool = True,
    *,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    noise_scale: float = 1.0,
) -> torch.Tensor:
    """Sample a keep mask from Bernoulli(sigmoid(logits)) with a relaxed gradient.

    Args:
        logits: keep logits of any shape and floating dtype.
        tau: temperature of the relaxation, > 0. Lower is closer to a step function.
        hard: if True, the forward value is the 0/1 sample and the backward pass uses the
            gradient of ``sigmoid((logits + noise) / tau)`` (straight-through). If False,
            the relaxed value itself is returned.
        noise: optional Logistic(0, 1) noise of the same shape (for reproducible tests);
            drawn fresh when omitted.
        generator: optional random generator for the noise.
        noise_scale: factor on the noise, in [0, 1]. At 1 the sample is exactly
            Bernoulli(sigmoid(logits)); at 0 it is the deterministic decision ``logits > 0``
            (:func:`straight_through_sigmoid`); in between, a sharper Bernoulli,
            P(keep) = P(logit + scale * noise > 0) = sigmoid(logit / scale).

    Returns:
        A tensor of the same shape and dtype as ``logits``.
    """
    if tau <= 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    if not 0.0 <= noise_scale <= 1.0:
        raise ValueError(f"noise_scale must be in [0, 1], got {noise_scale}")
    z = logits.float()
    if noise_scale > 0:
        if noise is None:
            noise = logistic_noise(z.shape, device=z.device, generator=generator)
        z = z + noise_scale * noise.float()
    soft = torch.sigmoid(z / tau)
    if not hard:
        return soft.to(logits.dtype)
    return _straight_through((z > 0).float(), soft).to(logits.dtype)


def straight_through_sigmoid(logits: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """Deterministic keep mask ``logits > 0`` with the gradient of ``sigmoid(logits / tau)``.

    The noise-free counterpart of :func:`gumbel_sigmoid`: no exploration, the same decision
    as threshold-mode inference.
    """
    if tau <= 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    z = logits.float()
    return _straight_through((z > 0).float(), torch.sigmoid(z / tau)).to(logits.dtype)


def sample_keep_mask(logits: torch.Tensor, tau: float, sampler: str = "gumbel", noise_scale: float = 1.0) -> torch.Tensor:
    """Training-time keep mask by sampler name: ``gumbel`` (stochastic, hard, straight-through;
    ``noise_scale`` scales its noise), ``deterministic`` (hard threshold, straight-through) or
    ``soft`` (relaxed, no hard step)."""
    if sampler == "gumbel":
        return gumbel_sigmoid(logits, tau, hard=True, noise_scale=noise_scale)
    if sampler == "deterministic":
        return straight_through_sigmoid(logits, tau)
    if sampler == "soft":
        return gumbel_sigmoid(logits, tau, hard=False, noise_scale=noise_scale)
    raise ValueError(f"unknown sampler {sampler!r}; expected one of {SAMPLERS}")
