"""Whether the current forward pass is being traced, exported or compiled.

The pruning paths branch on data in eager mode (a single image is never padded, a large
threshold-mode batch may be regrouped by kept count); a traced graph must not. Three questions:

* :func:`tracing`: inside ``torch.jit`` tracing, an ONNX export, ``torch.export`` or
  ``torch.compile``: no data-dependent Python control flow.
* :func:`compiling`: inside ``torch.compile`` (not an export): the graph will be run by
  inductor, which needs a few facts about data-dependent sizes spelled out (see
  :func:`dynvit.tokens.compact_indices`).
* :func:`exporting`: inside ``torch.export`` (ONNX exports go through it): sizes, the batch
  dimension included, may be symbolic.
"""
from __future__ import annotations

import torch

__all__ = ["tracing", "compiling", "exporting"]


def _exporting() -> bool:
    return bool(torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()) or exporting()


def tracing() -> bool:
    """Inside torch.jit/ONNX tracing, torch.export or torch.compile."""
    compiler = getattr(torch, "compiler", None)
    return _exporting() or bool(compiler is not None and compiler.is_compiling())


def exporting() -> bool:
    """Inside ``torch.export`` (which ``torch.onnx.export(..., dynamo=True)`` uses): sizes are symbolic."""
    compiler = getattr(torch, "compiler", None)
    return bool(compiler is not None and getattr(compiler, "is_exporting", bool)())


def compiling() -> bool:
    """Inside torch.compile, and not exporting."""
    compiler = getattr(torch, "compiler", None)
    return bool(compiler is not None and compiler.is_compiling()) and not _exporting()
