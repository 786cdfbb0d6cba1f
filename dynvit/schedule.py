"""Annealing schedules as pure functions of the global optimisation step.

Nothing here counts calls: a run resumed at step k gets exactly the value it would have had,
and evaluation never moves a schedule. Two quantities are annealed during a pruning
fine-tune:

* ``tau``, the temperature of the Gumbel-sigmoid relaxation (shapes the backward pass only);
* the **noise scale**, the factor on the Logistic noise of the keep sampler: at 1 a training
  mask is a Bernoulli(sigmoid(logit)) sample, at 0 it is the deterministic decision
  ``logit > threshold`` that threshold-mode inference makes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["SCHEDULE_KINDS", "TAU_SCHEDULES", "anneal", "tau_at", "TauSchedule", "NoiseSchedule"]

SCHEDULE_KINDS = ("constant", "linear", "cosine", "exponential")
TAU_SCHEDULES = SCHEDULE_KINDS


def anneal(step: int, total_steps: int, start: float, end: float, kind: str = "linear") -> float:
    """Value at ``step`` of a schedule going from ``start`` (step 0) to ``end`` (step
    ``total_steps`` and after).

    Args:
        step: global optimisation step, >= 0.
        total_steps: length of the annealing; later steps keep ``end``.
        start, end: the two end values (both > 0 for ``exponential``).
        kind: ``constant`` (always ``start``), ``linear``, ``cosine`` (half cosine) or
            ``exponential`` (geometric interpolation).
    """
    if kind not in SCHEDULE_KINDS:
        raise ValueError(f"unknown schedule {kind!r}; expected one of {SCHEDULE_KINDS}")
    if kind == "constant":
        return float(start)
    if kind == "exponential" and (start <= 0 or end <= 0):
        raise ValueError(f"an exponential schedule needs start and end > 0, got start={start}, end={end}")
    t = 1.0 if total_steps <= 0 else min(max(step, 0) / total_steps, 1.0)
    if kind == "linear":
        return start + (end - start) * t
    if kind == "cosine":
        return end + 0.5 * (start - end) * (1.0 + math.cos(math.pi * t))
    return start * (end / start) ** t


def tau_at(step: int, total_steps: int, tau_start: float = 1.0, tau_end: float = 1.0, kind: str = "constant") -> float:
    """Temperature at ``step``: :func:`anneal` from ``tau_start`` to ``tau_end``, both > 0."""
    if kind not in SCHEDULE_KINDS:
        raise ValueError(f"unknown tau schedule {kind!r}; expected one of {SCHEDULE_KINDS}")
    if tau_start <= 0 or tau_end <= 0:
        raise ValueError(f"temperatures must be > 0, got tau_start={tau_start}, tau_end={tau_end}")
    return anneal(step, total_steps, tau_start, tau_end, kind)


@dataclass(frozen=True)
class TauSchedule:
    """A tau schedule bound to its parameters: ``TauSchedule(...)(step) -> tau``."""

    kind: str = "constant"  # one of SCHEDULE_KINDS
    tau_start: float = 1.0  # temperature at step 0
    tau_end: float = 1.0  # temperature from total_steps on
    total_steps: int = 0  # annealing length in optimisation steps

    def __post_init__(self):
        tau_at(0, self.total_steps, self.tau_start, self.tau_end, self.kind)  # validate once

    def __call__(self, step: int) -> float:
        return tau_at(step, self.total_steps, self.tau_start, self.tau_end, self.kind)


@dataclass(frozen=True)
class NoiseSchedule:
    """The keep sampler's noise scale at each step: ``NoiseSchedule(...)(step) -> scale``.

    ``scale_start`` at step 0 to ``scale_end`` at ``total_steps``, both in [0, 1]; the default
    (1 throughout) samples masks from Bernoulli(sigmoid(logit)) as DynamicViT does.
    """

    kind: str = "constant"  # constant, linear or cosine (exponential cannot reach 0)
    scale_start: float = 1.0  # noise scale at step 0
    scale_end: float = 1.0  # noise scale from total_steps on
    total_steps: int = 0  # annealing length in optimisation steps

    def __post_init__(self):
        for name in ("scale_start", "scale_end"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"noise {name} must be in [0, 1], got {value}")
        anneal(0, self.total_steps, self.scale_start, self.scale_end, self.kind)  # validate once

    def __call__(self, step: int) -> float:
        return anneal(step, self.total_steps, self.scale_start, self.scale_end, self.kind)
