"""The one accuracy loop: top-1, top-5, tokens per block and kept tokens per image.

:func:`evaluate_modes` runs every batch of a loader through a model in one or more pruning
modes (one pass over the data) and, given an ``accelerator``, gathers across processes with
``gather_for_metrics``; :func:`evaluate` is its one-mode form. ``train.py`` (validation),
``eval.py`` and the benchmarks all measure through it.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..patch import is_patched
from ..progress import progress

__all__ = ["Accuracy", "evaluate", "evaluate_modes", "kept_token_stats"]


@dataclass
class Accuracy:
    """What :func:`evaluate` measured for one model in one pruning mode."""

    top1: float  # % of images whose label is the top logit
    top5: float  # % of images whose label is among the 5 top logits
    images: int  # images measured (duplicates added by sharding excluded)
    tokens_per_block: list[float]  # mean patch tokens each block's MLP computes per image
    kept_tokens: torch.Tensor  # (images, stages) patch tokens kept after each pruning stage; (images, 0) if none

    def summary(self) -> dict:
        """Plain numbers for JSON: the fields, with ``kept_tokens`` as per-stage mean/p5/p95."""
        return {"top1": self.top1, "top5": self.top5, "images": self.images, "tokens_per_block": list(self.tokens_per_block),
                "kept_tokens": kept_token_stats(self.kept_tokens)}


def kept_token_stats(kept_tokens: torch.Tensor, percentiles: Sequence[float] = (5, 95)) -> list[dict[str, float]]:
    """Per stage, the mean and percentiles (linear interpolation) of the kept tokens per image.

    Args:
        kept_tokens: ``(images, stages)`` counts, e.g. :attr:`Accuracy.kept_tokens`.
        percentiles: in [0, 100]; each is reported as ``p<value>`` (``p5``, ``p95``).

    Returns:
        One dict per stage: ``{"mean": ..., "p5": ..., "p95": ...}``; empty without stages.
    """
    if kept_tokens.ndim != 2:
        raise ValueError(f"kept_tokens must be (images, stages), got shape {tuple(kept_tokens.shape)}")
    if kept_tokens.shape[1] == 0:
        return []
    if kept_tokens.shape[0] == 0:
        raise ValueError("kept_tokens has no images")
    k = kept_tokens.double()
    q = torch.quantile(k, torch.tensor([p / 100 for p in percentiles], dtype=k.dtype), dim=0)  # (P, stages)
    return [{"mean": float(k[:, s].mean()), **{f"p{p:g}": float(q[i, s]) for i, p in enumerate(percentiles)}}
            for s in range(k.shape[1])]


def num_patches(model: nn.Module, hw: Sequence[int]) -> int:
    """Patch tokens of an ``hw``-sized image (before any pruning)."""
    ph, pw = model.patch_embed.patch_size
    return (int(hw[0]) // ph) * (int(hw[1]) // pw)


def _block_tokens_hooks(model: nn.Module, counts: list[int]):
    """Hooks writing, per block, the patch tokens its MLP computes in the current batch
    (EViT's fused token and ToMe's merged tokens count)."""
    p = model.num_prefix_tokens
    handles = []
    for i, block in enumerate(model.blocks):
        def hook(module, args, i=i):
            counts[i] = args[0].shape[1] - p
        handles.append(block.norm2.register_forward_pre_hook(hook))
    return handles


def _dynvit_tokens(model: nn.Module, kept: torch.Tensor, n0: int) -> torch.Tensor:
    """(B, blocks) patch tokens per image and block from the kept counts ``(B, stages)``:
    padding of a threshold-mode batch does not count."""
    stage_of = {b: s for s, b in enumerate(model.prune_loc)}
    current = torch.full((kept.shape[0],), float(n0), device=kept.device)
    columns = []
    for i in range(len(model.blocks)):
        if i in stage_of:
            current = kept[:, stage_of[i]]
        columns.append(current)
    return torch.stack(columns, dim=1)


def _forward(model: nn.Module, images: torch.Tensor, mode: str, patched: bool):
    """Logits, kept tokens ``(B, stages)`` and tokens per block ``(B, blocks)`` of one batch."""
    n0 = num_patches(model, images.shape[-2:])
    if patched and mode != "none":
        out = model.forward_pruned(images, mode=mode)
        kept = torch.stack([m.sum(1) for m in out.keep_masks], dim=1).float()
        return out.logits, kept, _dynvit_tokens(model, kept, n0)
    counts = [n0] * len(model.blocks)
    handles = _block_tokens_hooks(model, counts)
    try:
        logits = model.forward_pruned(images, mode="none").logits if patched else model(images)
    finally:
        for h in handles:
            h.remove()
    tokens = torch.tensor(counts, dtype=torch.float32, device=logits.device).repeat(len(images), 1)
    return logits, None, tokens


@torch.no_grad()
def evaluate_modes(
    model: nn.Module,
    loader: Iterable,
    modes: Sequence[str | None] = (None,),
    *,
    device: str | torch.device | None = None,
    accelerator=None,
    progress_bar: bool = True,
) -> dict[str, Accuracy]:
    """Accuracy and tokens of the eval-mode ``model`` in each pruning mode, in one pass.

    Args:
        model: a dynvit model, a baseline or a plain timm model (left in the train/eval
            state it had).
        loader: ``(images, targets)`` batches.
        modes: dynvit pruning modes (``threshold``, ``topk``, ``none``); ``None`` is the
            model's own ``prune_mode``. A model that is not dynvit has only ``none``.
        device: where batches go; default the model's device.
        accelerator: gathers every process's share of a sharded loader
            (``gather_for_metrics``, which also drops the samples sharding repeated).
        progress_bar: a bar over the batches (:func:`dynvit.progress.progress`: on a terminal only).

    Returns:
        ``{mode: Accuracy}``, keyed by the resolved mode name.
    """
    patched = is_patched(model)
    names = list(dict.fromkeys((m or model.prune_mode) if patched else (m or "none") for m in modes))
    if not patched and any(m != "none" for m in names):
        raise ValueError(f"pruning modes {names} need a dynvit model; {type(model).__name__} has only 'none'")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    parts: dict[str, dict[str, list[torch.Tensor]]] = {m: {"hit1": [], "hit5": [], "kept": [], "tokens": []} for m in names}
    try:
        for images, target in progress(loader, desc=f"accuracy ({', '.join(names)})", unit="batch", disable=not progress_bar):
            images, target = images.to(device), target.to(device)
            for mode in names:
                logits, kept, tokens = _forward(model, images, mode, patched)
                top = logits.topk(min(5, logits.shape[1]), dim=1).indices == target[:, None]
                hits = top.float()  # gloo gathers no bool tensors
                batch = (hits[:, 0], hits.amax(dim=1), tokens) + ((kept,) if kept is not None else ())
                if accelerator is not None:
                    batch = accelerator.gather_for_metrics(batch)
                for key, value in zip(("hit1", "hit5", "tokens", "kept"), batch):
                    parts[mode][key].append(value.cpu())
    finally:
        model.train(was_training)
    results = {}
    for mode, p in parts.items():
        seen = sum(len(h) for h in p["hit1"])
        if not seen:
            raise ValueError("the evaluation loader yielded no images")
        kept = torch.cat(p["kept"]) if p["kept"] else torch.zeros(seen, 0)
        results[mode] = Accuracy(top1=100.0 * float(torch.cat(p["hit1"]).sum()) / seen,
                                 top5=100.0 * float(torch.cat(p["hit5"]).sum()) / seen, images=seen,
                                 tokens_per_block=torch.cat(p["tokens"]).double().mean(0).tolist(), kept_tokens=kept)
    return results


def evaluate(model: nn.Module, loader: Iterable, *, mode: str | None = None, device: str | torch.device | None = None,
             accelerator=None) -> Accuracy:
    """:func:`evaluate_modes` for one pruning ``mode`` (``None``: the model's own)."""
    (result,) = evaluate_modes(model, loader, (mode,), device=device, accelerator=accelerator).values()
    return result


def spread_indices(n: int, k: int) -> list[int]:
    """``min(k, n)`` indices spread evenly over ``range(n)``. An ImageFolder lists its images class
    by class, so the first ``k`` would all be of the first classes: GMACs in threshold mode and
    speed measured on them would describe those classes only (easy airplanes on sky keep fewer
    tokens than the average CIFAR-10 image)."""
    if k <= 0 or n <= 0:
        return []
    if k >= n:
        return list(range(n))
    return torch.linspace(0, n - 1, k).round().long().tolist()
