"""Fit the predictors' signal weights to data, by search.

A predictor with signals (:mod:`dynvit.signals`) adds the class token's attention, the token's
redundancy and its size to its keep logit, each with a weight. Which mix selects best depends on
the data: where the object fills the image (CIFAR-10), dropping near-duplicates while covering the
image matters most and the class token's attention early in the network misleads; where the
object is small among clutter, attention finds it. The straight-through gradient is a poor guide
for these few scalars (measured: learning them 30 times faster moved the first stage's attention
weight to 0 on cluttered CIFAR-10 and cost a point of top-1), so :func:`fit_signals` chooses them
the way :func:`dynvit.calibrate` chooses thresholds: by measuring. On held-out images it runs the
model in top-k mode (so every candidate costs the same GMACs) and keeps, stage by stage, the
weights whose predictions are closest to the dense teacher's (KL divergence of the class
distributions), over a small grid, for a few passes (coordinate descent). Before fine-tuning this
picks the selection the fine-tune then adapts the backbone to.
"""
from __future__ import annotations

import itertools
import logging
from collections.abc import Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .calibrate import _image_batches

__all__ = ["SIGNAL_GRID", "fit_signals"]

_log = logging.getLogger(__name__)

#: candidate weights per signal (the ``size`` weight stays where it is unless a grid names it)
SIGNAL_GRID: dict[str, tuple[float, ...]] = {"attention": (0.0, 0.5, 1.0, 2.0), "redundancy": (0.0, 2.0, 4.0, 8.0)}


def _kl(model: nn.Module, batches: Sequence[torch.Tensor], teacher_logp: Sequence[torch.Tensor]) -> float:
    """Mean KL(teacher || model) per image, the model in top-k mode."""
    total, count = 0.0, 0
    for x, t in zip(batches, teacher_logp):
        logp = F.log_softmax(model.forward_pruned(x, "topk", details=False).logits.float(), dim=-1)
        total += float(F.kl_div(logp, t, reduction="sum", log_target=True))
        count += x.shape[0]
    return total / max(count, 1)


@torch.no_grad()
def fit_signals(
    model: nn.Module,
    images: torch.Tensor | Iterable,
    *,
    teacher: nn.Module | None = None,
    grid: Mapping[str, Sequence[float]] | None = None,
    passes: int = 2,
    max_images: int | None = None,
) -> list[dict]:
    """Set each stage's signal weights (``predictors[s].signal_weight``) to the grid point whose
    top-k predictions are closest to the teacher's on ``images``.

    Args:
        model: a dynvit model whose predictors read signals (``predictor_signals``); its
            ``keep_ratio`` is the budget every candidate is measured at.
        images: a ``(B, C, H, W)`` tensor, or an iterable of image batches or
            ``(images, targets)`` pairs (held-out training images).
        teacher: the dense model to agree with; default the model itself with pruning off
            (before fine-tuning, that is the dense model it was patched from).
        grid: candidate weights by signal name; default :data:`SIGNAL_GRID` (signals a
            predictor does not read are skipped).
        passes: rounds over the stages at most (a later stage's weights change what an earlier
            one should keep); a stage is not searched again while the other stages' weights are
            those it was fitted with, so a round that changes nothing ends the search.
        max_images: use at most this many images.

    Returns:
        The search, one entry per pass and stage: ``{"pass", "stage", "weights", "kl"}``
        (``weights`` by signal name). The model is left in the mode it was in.
    """
    if not any(getattr(p, "signals", ()) for p in model.predictors):
        raise ValueError("fit_signals needs predictors that read signals (dynvit.patch(..., predictor_signals=...))")
    grid = dict(SIGNAL_GRID if grid is None else grid)
    batches = _image_batches(images, max_images)
    device = model.keep_threshold.device
    batches = [x.to(device) for x in batches]
    was_training = model.training
    model.eval()
    try:
        reference = teacher if teacher is not None else (lambda x: model.forward_pruned(x, "none").logits)
        teacher_logp = [F.log_softmax(reference(x).float(), dim=-1) for x in batches]
        history, context = [], {}
        for round_ in range(passes):
            for s, predictor in enumerate(model.predictors):
                names = [n for n in predictor.signals if n in grid]
                others = tuple(tuple(p.signal_weight.tolist()) for i, p in enumerate(model.predictors)
                               if i != s and p.signals)
                if not names or context.get(s) == others:  # nothing it depends on changed since it was fitted
                    continue
                context[s] = others
                index = [predictor.signals.index(n) for n in names]
                best = None
                for values in itertools.product(*(grid[n] for n in names)):
                    predictor.signal_weight[index] = torch.tensor(values, device=predictor.signal_weight.device,
                                                                  dtype=predictor.signal_weight.dtype)
                    kl = _kl(model, batches, teacher_logp)
                    if best is None or kl < best[0] - 1e-9:  # ties keep the earlier (smaller) weights
                        best = (kl, values)
                predictor.signal_weight[index] = torch.tensor(best[1], device=predictor.signal_weight.device,
                                                              dtype=predictor.signal_weight.dtype)
                weights = dict(zip(predictor.signals, predictor.signal_weight.tolist()))
                history.append({"pass": round_, "stage": s, "weights": weights, "kl": best[0]})
                _log.info("fit_signals pass %d stage %d: %s (KL to the teacher %.4f)", round_, s,
                          ", ".join(f"{k} {v:g}" for k, v in weights.items()), best[0])
    finally:
        model.train(was_training)
    return history
