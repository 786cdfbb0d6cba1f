"""Temperature schedules as pure functions of the global optimisation step.

Nothing here counts calls: a run resumed at step k gets exactly the tau it would have had,
and evaluation never moves the schedule.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["TAU_SCHEDULES", "tau_at", "TauSchedule"]

TAU_SCHEDULES = ("constant", "linear", "cosine", "exponential")


def tau_at(step: int, total_steps: int, tau_start: float = 1.0, tau_end: float = 1.0, kind: str = "constant") -> float:
    """Temperature at ``step`` of a schedule that goes from ``tau_start`` (step 0) to
    ``tau_end`` (step ``total_steps`` and after).

    Args:
        step: global optimisation step, >= 0.
        total_steps: length of the annealing; steps beyond it keep ``tau_end``.
        tau_start: temperature at step 0, > 0.
        tau_end: final temperature, > 0.
        kind: ``constant`` (always ``tau_start``), ``linear``, ``cosine`` (half cosine) or
            ``exponential`` (geometric interpolation).
    """
    if kind not in TAU_SCHEDULES:
        raise ValueError(f"unknown tau schedule {kind!r}; expected one of {TAU_SCHEDULES}")
    if tau_start <= 0 or tau_end <= 0:
        raise ValueError(f"temperatures must be > 0, got tau_start={tau_start}, tau_end={tau_end}")
    if kind == "constant":
        return float(tau_start)
    t = 1.0 if total_steps <= 0 else min(max(step, 0) / total_steps, 1.0)
    if kind == "linear":
        return tau_start + (tau_end - tau_start) * t
    if kind == "cosine":
        return tau_end + 0.5 * (tau_start - tau_end) * (1.0 + math.cos(math.pi * t))
    return tau_start * (tau_end / tau_start) ** t


@dataclass(frozen=True)
class TauSchedule:
    """A tau schedule bound to its parameters: ``TauSchedule(...)(step) -> tau``."""

    kind: str = "constant"  # one of TAU_SCHEDULES
    tau_start: float = 1.0  # temperature at step 0
    tau_end: float = 1.0  # temperature from total_steps on
    total_steps: int = 0  # annealing length in optimisation steps

    def __post_init__(self):
        tau_at(0, self.total_steps, self.tau_start, self.tau_end, self.kind)  # validate once

    def __call__(self, step: int) -> float:
        return tau_at(step, self.total_steps, self.tau_start, self.tau_end, self.kind)
