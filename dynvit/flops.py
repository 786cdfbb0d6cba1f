"""FLOPs (as GMACs) of an eval-mode model, counted by fvcore on a traced forward pass.

Convention: one fused multiply-add is one operation, as in fvcore and the DeiT/DynamicViT
tables. fvcore has no rule for ``scaled_dot_product_attention`` (what timm's fused attention
calls), so attention would silently count as zero; :func:`sdpa_flop_jit` adds it.
"""
from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterable

import torch
from torch import nn

__all__ = ["count_flops", "sdpa_flop_jit", "flop_count_analysis"]

_log = logging.getLogger(__name__)


def sdpa_flop_jit(inputs, outputs) -> int:
    """MACs of ``softmax(q @ k^T) @ v`` for q ``(..., L, E)``, k ``(..., S, E)``, v ``(..., S, Ev)``."""
    from fvcore.nn.jit_handles import get_shape

    q, k, v = (get_shape(t) for t in inputs[:3])
    batch = 1
    for d in q[:-2]:
        batch *= d
    L, E = q[-2], q[-1]
    S, Ev = k[-2], v[-1]
    return batch * L * S * (E + Ev)


def flop_count_analysis(model: nn.Module, inputs: torch.Tensor):
    """fvcore analysis with attention counted and the usual warnings silenced."""
    # Imported here: fvcore's import warns about torch.jit.script, which `import dynvit` should not.
    from fvcore.nn import FlopCountAnalysis

    analysis = FlopCountAnalysis(model, inputs)
    analysis.set_op_handle("aten::scaled_dot_product_attention", sdpa_flop_jit)
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    return analysis


@contextlib.contextmanager
def _eval_mode(model: nn.Module, mode: str | None):
    was_training = model.training
    old_mode = getattr(model, "prune_mode", None)
    model.eval()
    if mode is not None:
        if old_mode is None:
            raise ValueError(f"mode={mode!r} needs a dynvit-patched model")
        model.prune_mode = mode
    try:
        yield
    finally:
        model.train(was_training)
        if mode is not None:
            model.prune_mode = old_mode


def _total(model: nn.Module, x: torch.Tensor) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about data-dependent shapes are expected
        return float(flop_count_analysis(model, x).total())


def count_flops(
    model: nn.Module,
    input_size: tuple[int, int, int] = (3, 224, 224),
    *,
    images: torch.Tensor | Iterable[torch.Tensor] | None = None,
    mode: str | None = None,
) -> float:
    """GMACs of one image through the eval-mode ``model``, predictors and attention included.

    Args:
        model: any timm-style model; for a dynvit model its ``prune_mode`` decides the path.
        input_size: ``(C, H, W)`` of the random input used when ``images`` is not given.
        images: real images ``(B, C, H, W)`` (or an iterable of such batches). Required in
            threshold mode, where the kept count depends on the image: the result is the mean
            over the images. An image's cost depends only on how many tokens it keeps at each
            stage, so the images are grouped by those counts and one image per group is traced.
        mode: temporarily override ``model.prune_mode``.

    Returns:
        Giga multiply-accumulates per image.
    """
    with _eval_mode(model, mode), torch.no_grad():
        device = next(model.parameters()).device
        if getattr(model, "prune_mode", None) == "threshold":
            if images is None:
                raise ValueError("threshold mode keeps a different number of tokens per image: pass real images=...")
        elif images is None:
            return _total(model, torch.randn(1, *input_size, device=device)) / 1e9
        batches = [b for b in ([images] if isinstance(images, torch.Tensor) else images) if len(b)]
        if not batches:
            raise ValueError("images is empty")
        if getattr(model, "prune_mode", None) != "threshold":
            return _total(model, batches[0][:1].to(device)) / 1e9  # fixed shapes: every image costs the same
        groups: dict[tuple[int, ...], list] = {}  # kept counts per stage -> [an image with them, how many]
        for batch in batches:
            batch = batch.to(device)
            counts = torch.stack([m.sum(1) for m in model.forward_pruned(batch, "threshold").keep_masks], 1)
            for image, key in zip(batch, map(tuple, counts.tolist())):
                groups.setdefault(key, [image, 0])[1] += 1
        total = sum(_total(model, image[None]) * n for image, n in groups.values())
        return total / sum(n for _, n in groups.values()) / 1e9
