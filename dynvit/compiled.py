"""``torch.compile`` set up for pruned inference: :func:`compile`.

A dynvit model compiles as any timm model does; what this helper adds is the setting each
pruning mode needs:

* **Top-k** keeps a fixed number of tokens per stage: every shape is static, and the whole
  forward is one graph (no graph break). On a GPU, CUDA graphs (``mode="reduce-overhead"``)
  replay it without launch overhead.
* **Threshold** keeps a per-image number of tokens. The kept count is read from the data
  (``.item()`` in :func:`dynvit.tokens.compact_indices`); with ``fullgraph=True`` torch captures
  it as a symbolic, data-dependent size instead of breaking the graph there, so *one* graph
  serves every kept count: no recompile per count, no padding to a bucket. CUDA graphs cannot
  replay data-dependent sizes, so threshold mode compiles without them.
* **Batch size**: ``dynamic=False`` (default) gives each batch size its own static graph (the
  fastest kernels; a new batch size compiles again, up to torch's ``recompile_limit``);
  ``dynamic=True`` makes the batch dimension, and every other size, symbolic.

A plain ``torch.compile(model)`` works too: top-k compiles without a graph break; threshold mode
then breaks the graph at each stage's kept count (``.item()`` without ``fullgraph``) and torch's
automatic dynamic shapes recompile once per stage for the second count seen, then reuse a
dynamic graph. ``tests/test_compile.py`` checks both.
"""
from __future__ import annotations

import inspect
import logging

import torch
from torch import nn

__all__ = ["compile", "STATIC_MODES", "CPU_OPTIONS"]

_log = logging.getLogger(__name__)

#: prune modes whose shapes do not depend on the images (CUDA graphs can replay them)
STATIC_MODES = ("topk", "none")
#: inductor options on a CPU: the generated code calls its kernels from a C++ wrapper rather than
#: from Python. A pruned graph has more (small) kernels than the dense one (predictors, matching,
#: gathers); measured on the demo's model at batch 1 and 64, the C++ wrapper made top-k and
#: threshold mode 4-6% faster and the dense model no faster (docs/BENCHMARKS.md, section 2b).
CPU_OPTIONS = {"cpp_wrapper": True}


def compile(model: nn.Module, *, mode: str | None = None, dynamic: bool | None = False, fullgraph: bool = True,
            backend="inductor", **kwargs) -> nn.Module:
    """``torch.compile(model)`` with the settings pruned inference needs (see the module docstring).

    Compilation happens at the first call of each new input shape (seconds to a minute on a
    CPU); later calls run the compiled graph. The model's ``prune_mode`` is read when a graph is
    traced: changing it afterwards compiles again.

    Args:
        model: an eval-mode dynvit model (any ``nn.Module`` works: then it is ``torch.compile``
            with these defaults).
        mode: ``torch.compile``'s mode. ``None`` picks ``"reduce-overhead"`` (CUDA graphs) for a
            CUDA model in a static-shape prune mode (``topk``, ``none``), ``"default"`` for one in
            threshold mode, and inductor's :data:`CPU_OPTIONS` on a CPU.
        dynamic: ``False``: one static graph per batch size; ``True``: symbolic sizes; ``None``:
            torch's automatic choice (static first, dynamic after a second batch size).
        fullgraph: one graph for the whole forward (an error if it cannot be), and threshold
            mode's kept counts captured as symbolic sizes. ``False`` allows graph breaks.
        backend: ``torch.compile``'s backend.
        **kwargs: passed on to ``torch.compile`` (``options``, ``recompile_limit``, ...).

    Returns:
        The ``torch.compile`` module wrapping ``model`` (the original is ``._orig_mod``).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"dynvit.compile takes an nn.Module, got {type(model).__name__}")
    prune_mode = getattr(model, "prune_mode", "none")
    if mode is None and "options" not in kwargs:  # torch takes a mode or options, not both
        if any(p.is_cuda for p in model.parameters()):
            mode = "reduce-overhead" if prune_mode in STATIC_MODES else "default"
        elif backend == "inductor":
            kwargs["options"] = dict(CPU_OPTIONS)
    if mode == "reduce-overhead" and prune_mode not in STATIC_MODES:
        _log.warning("mode='reduce-overhead' (CUDA graphs) with prune_mode=%r: its kept counts are data-dependent "
                     "sizes, which CUDA graphs skip; use prune_mode='topk' for CUDA graphs", prune_mode)
    if model.training:
        _log.warning("compiling a model in train mode: its forward is the masked training path, not pruned inference; "
                     "call model.eval() first for inference")
    accepted = inspect.signature(torch.compile).parameters
    if "isolate_recompiles" in accepted:  # models of one class share code objects, hence recompile limits
        kwargs.setdefault("isolate_recompiles", True)
    _log.info("compiling %s (prune_mode %s): mode %s, options %s, dynamic %s, fullgraph %s", type(model).__name__,
              prune_mode, mode, kwargs.get("options"), dynamic, fullgraph)
    return torch.compile(model, mode=mode, dynamic=dynamic, fullgraph=fullgraph, backend=backend, **kwargs)
