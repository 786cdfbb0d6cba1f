"""Augmentation of whole image batches with tensor ops, on the batch's device.

timm's training crop (random-resized crop, then horizontal flip) drawn for many images at
once (:func:`sample_crops`) and applied to a batch as one affine resampling
(:func:`crop_flip`); :func:`normalize` is torchvision's ``Normalize`` on a batch. Used by
:mod:`dynvit.memory_data`; pure functions of their inputs and generator.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = ["RATIO", "RESAMPLE_MODES", "sample_crops", "crop_flip", "normalize"]

RATIO = (3 / 4, 4 / 3)  # aspect-ratio range of timm's and torchvision's RandomResizedCrop
RESAMPLE_MODES = ("bilinear", "bicubic", "nearest")  # timm interpolations grid_sample has


def sample_crops(
    n: int,
    scale: Sequence[float],
    *,
    ratio: Sequence[float] = RATIO,
    hflip: float = 0.5,
    aspect: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    attempts: int = 10,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random-resized-crop boxes and flip flags for ``n`` images, as torchvision draws them.

    Per image, up to ``attempts`` tries of an area fraction uniform in ``scale`` and an
    aspect ratio log-uniform in ``ratio``; the first crop that fits is placed uniformly; when
    none fits, the whole image, cut to the nearest allowed ratio, is taken from its centre.
    Boxes are continuous (no rounding to whole pixels).

    Args:
        n: number of images.
        scale: ``(min, max)`` fraction of the image area a crop covers.
        ratio: ``(min, max)`` width / height of a crop, in the original image's pixels.
        hflip: probability of a horizontal flip.
        aspect: ``(n,)`` width / height of each original image (the stored images may have
            been resized to a square: the crops keep the original pixels' proportions);
            None = square images.
        generator: the random source (CPU); None = torch's global one.
        attempts: tries per image before the centre-crop fallback.

    Returns:
        ``boxes`` ``(n, 4)``: left, top, width, height as fractions of the image's width and
        height; ``flips`` ``(n,)`` bool.
    """
    a = torch.ones(n) if aspect is None else aspect.detach().float().cpu().reshape(n)
    area = torch.empty(n, attempts).uniform_(float(scale[0]), float(scale[1]), generator=generator)
    log_r = torch.empty(n, attempts).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=generator)
    w = (area * log_r.exp() / a[:, None]).sqrt()
    h = (area / log_r.exp() * a[:, None]).sqrt()
    fits = (w <= 1) & (h <= 1)
    first = fits.to(torch.uint8).argmax(dim=1, keepdim=True)  # the first attempt that fits
    w, h = w.gather(1, first).squeeze(1), h.gather(1, first).squeeze(1)
    # torchvision's fallback: the whole image, narrowed to the ratio range
    fallback_w = torch.where(a > ratio[1], ratio[1] / a, torch.ones_like(a))
    fallback_h = torch.where(a < ratio[0], a / ratio[0], torch.ones_like(a))
    found = fits.any(dim=1)
    w, h = torch.where(found, w, fallback_w), torch.where(found, h, fallback_h)
    u = torch.rand(n, 2, generator=generator)
    left = torch.where(found, u[:, 0] * (1 - w), (1 - w) / 2)
    top = torch.where(found, u[:, 1] * (1 - h), (1 - h) / 2)
    flips = torch.rand(n, generator=generator) < hflip
    return torch.stack([left, top, w, h], dim=1), flips


def crop_flip(
    images: torch.Tensor,
    boxes: torch.Tensor,
    flips: torch.Tensor,
    size: Sequence[int] | None = None,
    *,
    mode: str = "bilinear",
) -> torch.Tensor:
    """Each image's box resampled to ``size`` and mirrored where ``flips``: one ``grid_sample``.

    Args:
        images: ``(B, C, H, W)`` floating-point batch.
        boxes: ``(B, 4)`` left, top, width, height as fractions of the image (see
            :func:`sample_crops`).
        flips: ``(B,)`` bool, True = mirror left-right.
        size: ``(h, w)`` of the output; None = the input's.
        mode: ``bilinear``, ``bicubic`` or ``nearest`` (bicubic may overshoot [0, 1]).

    Returns:
        ``(B, C, h, w)``. A full box without flip returns the input (up to float rounding).
    """
    if mode not in RESAMPLE_MODES:
        raise ValueError(f"mode must be one of {RESAMPLE_MODES}, got {mode!r}")
    b = images.shape[0]
    boxes = boxes.to(device=images.device, dtype=images.dtype)
    left, top, w, h = boxes.unbind(dim=1)
    sign = 1.0 - 2.0 * flips.to(device=images.device, dtype=images.dtype)
    # output coordinates in [-1, 1] (pixel edges, align_corners=False) -> input coordinates:
    # the box spans [2 * left - 1, 2 * (left + w) - 1]; a flip mirrors about its centre
    theta = torch.zeros(b, 2, 3, device=images.device, dtype=images.dtype)
    theta[:, 0, 0] = w * sign
    theta[:, 0, 2] = 2 * left + w - 1
    theta[:, 1, 1] = h
    theta[:, 1, 2] = 2 * top + h - 1
    out_hw = tuple(size) if size is not None else tuple(images.shape[-2:])
    grid = F.affine_grid(theta, [b, images.shape[1], *out_hw], align_corners=False)
    return F.grid_sample(images, grid, mode=mode, padding_mode="border", align_corners=False)


def normalize(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """``(images - mean) / std`` per channel, in place, as torchvision's ``Normalize`` computes it.

    Args:
        images: ``(B, C, H, W)`` floating-point batch in [0, 1].
        mean, std: ``(C,)`` on the batch's device.
    """
    return images.sub_(mean[:, None, None]).div_(std[:, None, None])
