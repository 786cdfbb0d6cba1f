"""Progress bars: tqdm on stderr, drawn only where someone watches (stderr is a terminal) and
switched off for a whole program by :func:`disable_progress_bars` or
``DYNVIT_DISABLE_PROGRESS_BARS=1``, as ``huggingface_hub`` does for its own bars."""
from __future__ import annotations

import os
from collections.abc import Iterable

from tqdm.auto import tqdm

__all__ = ["progress", "disable_progress_bars", "enable_progress_bars", "progress_bars_enabled"]

_enabled = os.environ.get("DYNVIT_DISABLE_PROGRESS_BARS", "").lower() not in ("1", "true", "yes")


def disable_progress_bars() -> None:
    global _enabled
    _enabled = False


def enable_progress_bars() -> None:
    global _enabled
    _enabled = True


def progress_bars_enabled() -> bool:
    return _enabled


def progress(iterable: Iterable | None = None, *, desc: str, total: int | None = None, leave: bool = False,
             unit: str = "it", disable: bool = False, **kwargs) -> tqdm:
    """A tqdm bar over ``iterable`` (or a manual one: ``update``), shown when bars are enabled,
    ``disable`` is false and stderr is a terminal; inner bars vanish when done (``leave``)."""
    off = disable or not _enabled
    return tqdm(iterable, desc=desc, total=total, leave=leave, unit=unit, dynamic_ncols=True,
                disable=True if off else None, **kwargs)
