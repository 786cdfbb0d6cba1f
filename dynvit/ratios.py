"""Normalise the user's pruning options once, with errors that name the value and the rule."""
from __future__ import annotations

from collections.abc import Sequence
from numbers import Real

__all__ = ["normalize_keep_ratio", "normalize_prune_loc", "PRUNE_MODES", "DROPPED_TOKENS", "check_prune_mode"]

PRUNE_MODES = ("threshold", "topk", "none")
DROPPED_TOKENS = ("discard", "merge")


def normalize_prune_loc(prune_loc: Sequence[int] | int, depth: int) -> tuple[int, ...]:
    """Block indices before which a predictor sits: non-empty, strictly increasing, in [0, depth)."""
    if isinstance(prune_loc, int):
        prune_loc = (prune_loc,)
    loc = tuple(prune_loc)
    if not loc:
        raise ValueError("prune_loc is empty; give at least one block index, e.g. prune_loc=(3, 6, 9)")
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in loc):
        raise ValueError(f"prune_loc must hold block indices (ints), got {loc!r}")
    if any(b <= a for a, b in zip(loc, loc[1:])):
        raise ValueError(f"prune_loc must be strictly increasing, got {loc}")
    if loc[0] < 0 or loc[-1] >= depth:
        raise ValueError(f"prune_loc {loc} is out of range: this model has {depth} blocks, so indices must be in [0, {depth - 1}]")
    return loc


def normalize_keep_ratio(keep_ratio: float | Sequence[float], num_stages: int) -> tuple[float, ...]:
    """Cumulative kept fraction of the patch tokens after each stage.

    A single float ``r`` means ``(r, r**2, ..., r**num_stages)``, as in DynamicViT. A sequence
    gives one cumulative fraction per stage; it must be non-increasing. Every value must lie
    in (0, 1].
    """
    if isinstance(keep_ratio, Real) and not isinstance(keep_ratio, bool):
        r = float(keep_ratio)
        if not 0.0 < r <= 1.0:
            raise ValueError(f"keep_ratio must be in (0, 1], got {keep_ratio}")
        return tuple(r ** (s + 1) for s in range(num_stages))
    try:
        ratios = tuple(float(r) for r in keep_ratio)
    except TypeError:
        raise ValueError(f"keep_ratio must be a float or a sequence of floats, got {keep_ratio!r}") from None
    if len(ratios) != num_stages:
        raise ValueError(
            f"keep_ratio has {len(ratios)} values but prune_loc has {num_stages} stages; give one cumulative fraction per stage or a single float"
        )
    bad = [r for r in ratios if not 0.0 < r <= 1.0]
    if bad:
        raise ValueError(f"keep_ratio values must be in (0, 1], got {list(ratios)}")
    if any(b > a for a, b in zip(ratios, ratios[1:])):
        raise ValueError(f"keep_ratio values are cumulative fractions and must not increase, got {list(ratios)}")
    return ratios


def check_prune_mode(mode: str) -> str:
    if mode not in PRUNE_MODES:
        raise ValueError(f"prune_mode must be one of {PRUNE_MODES}, got {mode!r}")
    return mode
