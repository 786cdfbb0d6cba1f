"""Choose the compute budget of threshold mode after training.

Threshold mode keeps a token where its keep logit is above its stage's threshold, so each image
keeps its own count. :func:`calibrate` sets the thresholds (``model.keep_threshold``, a buffer
saved and exported with the model) so that, over a set of calibration images, the *mean* kept
fraction of every stage equals a target. The count still varies per image: one threshold is
shared by all images, so an image whose tokens all look important keeps more of them.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from .patch import is_patched
from .ratios import normalize_keep_ratio

__all__ = ["calibrate", "kept_count_for_threshold"]

_log = logging.getLogger(__name__)


def _image_batches(images, max_images: int | None) -> list[torch.Tensor]:
    """A list of image batches from a tensor ``(B, C, H, W)`` or an iterable of tensors or of
    ``(images, targets)`` pairs (a DataLoader), stopping after ``max_images``."""
    source = [images] if isinstance(images, torch.Tensor) else images
    batches, seen = [], 0
    for batch in source:
        if isinstance(batch, (tuple, list)):
            batch = batch[0]
        if not isinstance(batch, torch.Tensor) or batch.dim() != 4:
            raise TypeError(f"calibration expects image batches (B, C, H, W) or (images, targets) pairs, got {type(batch).__name__}"
                            + (f" of shape {tuple(batch.shape)}" if isinstance(batch, torch.Tensor) else ""))
        if max_images is not None:
            batch = batch[: max_images - seen]
        if len(batch):
            batches.append(batch)
            seen += len(batch)
        if max_images is not None and seen >= max_images:
            break
    if not seen:
        raise ValueError("calibration needs at least one image; the images or loader given yielded none")
    return batches


def kept_count_for_threshold(logits: torch.Tensor, threshold: float) -> int:
    """Tokens threshold mode keeps over a set of images at ``threshold``: the logits above it,
    at least one per image. ``logits``: ``(M, N)`` with ``-inf`` for absent tokens."""
    above = (logits > threshold).sum(dim=1)
    return int(above.clamp_min(1).sum())


def _threshold_for_count(logits: torch.Tensor, target: float) -> float:
    """The threshold whose kept count (see :func:`kept_count_for_threshold`) is closest to
    ``target``, placed halfway between two consecutive logits."""
    values = torch.sort(logits[torch.isfinite(logits)].double(), descending=True).values
    if values.numel() == 0:
        raise ValueError("no tokens reached this stage")

    def threshold(k: int) -> float:  # keeps the k largest values (k in [1, len])
        if k >= values.numel():
            return float(values[-1]) - 1.0
        return 0.5 * float(values[k - 1] + values[k])

    lo, hi = 1, values.numel()  # smallest k whose count reaches the target
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (mid + 1, hi) if kept_count_for_threshold(logits, threshold(mid)) < target else (lo, mid)
    best = min((k for k in (lo - 1, lo) if k >= 1),
               key=lambda k: abs(kept_count_for_threshold(logits, threshold(k)) - target))
    return threshold(best)


@torch.no_grad()
def calibrate(
    model: nn.Module,
    images: torch.Tensor | Iterable,
    keep_ratio: float | Sequence[float] | None = None,
    *,
    max_images: int | None = None,
) -> torch.Tensor:
    """Set ``model.keep_threshold`` so threshold mode keeps ``keep_ratio`` on average.

    Stage by stage, the logits of the tokens that reach the stage are pooled over all images
    and the threshold is placed so that the total kept count (at least one token per image, as
    threshold mode keeps) matches ``keep_ratio[s] * N0 * images``. Later stages are calibrated
    on the tokens the earlier, already calibrated stages keep.

    Args:
        model: a dynvit model (``dynvit.patch`` / ``build_model`` / ``load_pretrained``).
        images: calibration images ``(B, C, H, W)``, or an iterable of such batches or of
            ``(images, targets)`` pairs (a DataLoader), preprocessed as for evaluation. Use
            images that are not in the evaluation set.
        keep_ratio: the target, as for :func:`dynvit.patch` (a float ``r`` means ``r ** (s + 1)``
            after stage ``s``, or one cumulative fraction per stage, in (0, 1]); ``None`` uses
            ``model.keep_ratio``. It becomes ``model.keep_ratio``, so top-k mode runs at the
            same budget.
        max_images: use at most this many images.

    Returns:
        The thresholds, one logit per stage (also written into ``model.keep_threshold``).

    Raises:
        TypeError: ``model`` is not a dynvit model, or ``images`` are not image batches.
        ValueError: ``keep_ratio`` outside (0, 1] or not one value per stage; no images.
    """
    if not is_patched(model):
        raise TypeError(f"calibrate needs a model patched by dynvit.patch or built by dynvit.build_model; got "
                        f"{type(model).__qualname__}")
    ratios = normalize_keep_ratio(model.keep_ratio if keep_ratio is None else keep_ratio, len(model.prune_loc))
    batches = _image_batches(images, max_images)
    was_training = model.training
    model.eval()
    device = model.keep_threshold.device
    thresholds = torch.full_like(model.keep_threshold, float("-inf"))  # -inf: keep every token
    fractions = []
    try:
        for s, ratio in enumerate(ratios):
            logits = torch.cat([model.forward_pruned(b.to(device), "threshold", thresholds=thresholds).keep_logits[s].float()
                                for b in batches])
            n0 = logits.shape[1]
            thresholds[s] = _threshold_for_count(logits, ratio * n0 * len(logits))
            fractions.append(kept_count_for_threshold(logits, float(thresholds[s])) / (n0 * len(logits)))
    finally:
        model.train(was_training)
    model.keep_ratio = ratios
    model.keep_threshold.copy_(thresholds)
    _log.info("calibrated on %d images: thresholds %s keep %s (targets %s)", sum(len(b) for b in batches),
              [round(float(t), 4) for t in thresholds], [round(f, 4) for f in fractions], [round(r, 4) for r in ratios])
    return thresholds.clone()
