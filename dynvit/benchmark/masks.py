"""What the keep masks look like over a data set: where tokens are kept, and whether the kept
count follows how hard an image is.

- :func:`mask_statistics` runs a model over a loader once (in one pruning mode) and returns, per
  stage, the fraction of images that keep each patch position (the kept-frequency map), the kept
  fraction on even and on odd patch columns (a fixed spatial split, such as the ``match`` prior's
  alternate split in patch order, shows as a gap between the two), and, given a dense teacher,
  the rank correlation between each image's kept tokens at the last stage and the teacher's
  confidence on it (negative: harder images keep more tokens).
- :func:`spearman` is that rank correlation.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

__all__ = ["mask_statistics", "spearman", "column_balance"]


def _ranks(values: torch.Tensor) -> torch.Tensor:
    """Ranks 0..n-1 with ties given their mean rank."""
    v = values.double()
    order = v.argsort()
    ranks = torch.empty_like(v)
    ranks[order] = torch.arange(len(v), dtype=v.dtype)
    unique, inverse = torch.unique(v, return_inverse=True)
    mean_rank = torch.zeros(len(unique), dtype=v.dtype).scatter_add_(0, inverse, ranks)
    mean_rank /= torch.zeros(len(unique), dtype=v.dtype).scatter_add_(0, inverse, torch.ones_like(v))
    return mean_rank[inverse]


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman's rank correlation of two 1-D tensors (ties: mean ranks); NaN if either is constant."""
    ra, rb = _ranks(a.flatten()), _ranks(b.flatten())
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denominator = float((ra.square().sum() * rb.square().sum()).sqrt())
    return float((ra * rb).sum()) / denominator if denominator > 0 else float("nan")


def column_balance(frequency: torch.Tensor) -> list[dict[str, float]]:
    """Per stage, the mean kept frequency on even and on odd patch columns and their gap.

    Args:
        frequency: ``(stages, rows, columns)`` fraction of images keeping each patch position.
    """
    even, odd = frequency[..., 0::2].mean(dim=(1, 2)), frequency[..., 1::2].mean(dim=(1, 2))
    return [{"even": float(e), "odd": float(o), "gap": float((e - o).abs())} for e, o in zip(even, odd)]


@torch.no_grad()
def mask_statistics(model: nn.Module, loader: Iterable, mode: str | None = None, *,
                    teacher: nn.Module | None = None) -> dict:
    """Kept-frequency maps, column balance and (with ``teacher``) the difficulty correlation of
    a dynvit ``model`` in pruning ``mode`` (default its own) over ``loader``'s images.

    Returns a dict: ``frequency`` (nested lists ``(stages, rows, columns)``), ``columns``
    (:func:`column_balance`), ``kept_last`` (kept tokens per image at the last stage, as a list),
    and with a teacher ``confidence_spearman`` (kept tokens at the last stage against the
    teacher's top softmax probability) and ``true_class_spearman`` (against its probability of
    the labelled class).
    """
    device = next(model.parameters()).device
    rows, cols = model.patch_embed.grid_size
    totals, kept_last, confidence, true_prob, seen = None, [], [], [], 0
    was_training = model.training
    model.eval()
    try:
        for images, target in loader:
            images, target = images.to(device), target.to(device)
            out = model.forward_pruned(images, mode=mode)
            masks = torch.stack([m.float() for m in out.keep_masks], dim=1)  # (B, stages, N0)
            part = masks.sum(dim=0)
            totals = part if totals is None else totals + part
            kept_last.append(masks[:, -1].sum(dim=1).cpu())
            seen += images.shape[0]
            if teacher is not None:
                probs = teacher(images).float().softmax(dim=-1)
                confidence.append(probs.amax(dim=-1).cpu())
                true_prob.append(probs.gather(1, target[:, None]).squeeze(1).cpu())
    finally:
        model.train(was_training)
    if not seen:
        raise ValueError("the loader yielded no images")
    frequency = (totals / seen).view(-1, rows, cols).cpu()
    kept = torch.cat(kept_last)
    result = {"frequency": frequency.tolist(), "columns": column_balance(frequency), "kept_last": kept.tolist()}
    if teacher is not None:
        result["confidence_spearman"] = spearman(kept, torch.cat(confidence))
        result["true_class_spearman"] = spearman(kept, torch.cat(true_prob))
    return result
