"""Pictures for the benchmark: what a dynvit model keeps, and accuracy against GMACs.

:func:`keep_mask_grid` is the picture users look at to trust the predictor: each image followed
by one panel per stage, dropped patches blanked. Masks come from
:meth:`DynViTMixin.forward_pruned`, indexed by original patch position, so the panels show
exactly what the pruned model computed on. :func:`save_accuracy_vs_gmacs` draws a sweep.
"""
from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["unnormalize", "masked_panels", "keep_mask_grid", "save_keep_mask_grid", "save_accuracy_vs_gmacs",
           "save_kept_histogram"]

_log = logging.getLogger(__name__)


def unnormalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Normalised images ``(B, C, H, W)`` back to [0, 1] with the model's mean and std."""
    mean_t = torch.as_tensor(mean, dtype=images.dtype, device=images.device)[:, None, None]
    std_t = torch.as_tensor(std, dtype=images.dtype, device=images.device)[:, None, None]
    return (images * std_t + mean_t).clamp(0.0, 1.0)


def masked_panels(
    images: torch.Tensor, keep_masks: Sequence[torch.Tensor], patch_size: Sequence[int], blank: float = 1.0
) -> torch.Tensor:
    """Each image with the patches dropped by each stage set to ``blank``.

    Args:
        images: ``(B, C, H, W)`` in [0, 1].
        keep_masks: per stage, ``(B, N0)`` bool over the original patch positions (row-major
            over the patch grid).
        patch_size: ``(ph, pw)``.
        blank: the value of a dropped patch (1.0: white).

    Returns:
        ``(B, 1 + S, C, H, W)``: the image, then one panel per stage.
    """
    B, _, H, W = images.shape
    ph, pw = patch_size
    gh, gw = H // ph, W // pw
    panels = [images]
    for mask in keep_masks:
        if mask.shape != (B, gh * gw):
            raise ValueError(f"keep mask of shape {tuple(mask.shape)} does not fit a {gh}x{gw} patch grid of {B} images")
        pixel = mask.view(B, 1, gh, gw).repeat_interleave(ph, 2).repeat_interleave(pw, 3)
        covered = torch.zeros(B, 1, H, W, dtype=torch.bool, device=images.device)
        covered[..., : gh * ph, : gw * pw] = pixel  # borders not covered by a patch stay visible
        covered[..., gh * ph :, :] = True
        covered[..., :, gw * pw :] = True
        panels.append(torch.where(covered, images, torch.full_like(images, blank)))
    return torch.stack(panels, dim=1)


@torch.no_grad()
def keep_mask_grid(
    model: nn.Module,
    images: torch.Tensor,
    *,
    labels: Sequence[int] | None = None,
    class_names: Sequence[str] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    mode: str | None = None,
    images_per_row: int | None = None,
):
    """A matplotlib figure: per image, the input and the surviving patches after each stage.

    Args:
        model: a dynvit model (eval mode is used; ``mode`` overrides its ``prune_mode``).
        images: normalised images ``(B, C, H, W)`` as the model takes them.
        labels: true class indices, shown with the prediction.
        class_names: names for the class indices.
        mean, std: normalisation to undo; default the model's data config.
        mode: ``threshold`` or ``topk``.
        images_per_row: images side by side; default so that the grid is roughly square.

    Returns:
        The ``matplotlib.figure.Figure``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import timm

    if not hasattr(model, "forward_pruned"):
        raise TypeError("keep_mask_grid needs a dynvit model (dynvit.build_model, dynvit.patch or dynvit.load_pretrained)")
    was_training = model.training
    model.eval()
    try:
        out = model.forward_pruned(images, mode=mode)
    finally:
        model.train(was_training)
    if not out.keep_masks:
        raise ValueError("prune mode 'none' keeps every token: nothing to show; use mode='threshold' or 'topk'")
    data_cfg = timm.data.resolve_model_data_config(model)
    pixels = unnormalize(images.float().cpu(), mean or data_cfg["mean"], std or data_cfg["std"])
    pe = model.patch_embed  # a hybrid stem's patches are taken from its CNN's feature map (stride feature_ratio)
    patch = [p * r for p, r in zip(pe.patch_size, getattr(pe, "feature_ratio", (1, 1)))]
    panels = masked_panels(pixels, [m.cpu() for m in out.keep_masks], patch)
    preds = out.logits.argmax(-1).tolist()
    n, per_image = panels.shape[0], panels.shape[1]
    num_patches = out.keep_masks[0].shape[1]
    if images_per_row is None:
        images_per_row = max(1, round(math.sqrt(n / per_image)))
    rows = math.ceil(n / images_per_row)
    cols = images_per_row * per_image
    fig, axes = plt.subplots(rows, cols, figsize=(1.3 * cols, 1.45 * rows), squeeze=False)
    name = (lambda c: class_names[c] if class_names else str(c))
    for ax in axes.flat:
        ax.axis("off")
    for i in range(n):
        r, c0 = divmod(i, images_per_row)
        for j in range(per_image):
            ax = axes[r, c0 * per_image + j]
            ax.imshow(panels[i, j].permute(1, 2, 0).numpy(), interpolation="nearest")
            if j == 0:
                truth = f" ({name(labels[i])})" if labels is not None else ""
                ax.set_title(f"{name(preds[i])}{truth}", fontsize=6, color="black" if labels is None or
                             preds[i] == labels[i] else "red")
            else:
                kept = int(out.keep_masks[j - 1][i].sum())
                ax.set_title(f"stage {j}: {kept}/{num_patches}", fontsize=6)
    fig.suptitle(f"kept patches per stage ({mode or model.prune_mode}); title: prediction (truth)", fontsize=8)
    fig.tight_layout()
    return fig


def save_keep_mask_grid(path: str | os.PathLike, model: nn.Module, images: torch.Tensor, **kwargs) -> str:
    """:func:`keep_mask_grid` saved as a PNG at ``path`` (folders created); returns the path."""
    fig = keep_mask_grid(model, images, **kwargs)
    return _save_figure(fig, path, f"the keep-mask grid of {len(images)} images")


def save_accuracy_vs_gmacs(path: str | os.PathLike, rows: Sequence[dict], *, metric: str = "top1", title: str = "") -> str:
    """Accuracy against GMACs, one line per curve (rows of a sweep, each with ``gmacs``,
    ``metric`` and a ``curve`` name, else its ``method``), saved as a PNG; returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_method: dict[str, list[tuple[float, float]]] = {}
    for row in rows:
        if metric in row:
            by_method.setdefault(row.get("curve") or row["method"], []).append((row["gmacs"], row[metric]))
    if not by_method:
        raise ValueError(f"no row has {metric!r}: accuracy needs evaluation data")
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for method, points in by_method.items():
        points = sorted(set(points))
        style = dict(marker="*", markersize=10) if method == "dense" else dict(marker="o", markersize=4)
        ax.plot([p[0] for p in points], [p[1] for p in points], label=method, linestyle="" if method == "dense" else "-", **style)
    ax.set_xlabel("GMACs per image")
    ax.set_ylabel(f"{'top-1' if metric == 'top1' else metric} accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return _save_figure(fig, path, "the accuracy-vs-GMACs plot")


def save_kept_histogram(path: str | os.PathLike, kept_tokens: torch.Tensor, num_patches: int, *, title: str = "") -> str:
    """Histogram of the patch tokens each image keeps after each stage, saved as a PNG.

    Args:
        kept_tokens: ``(images, stages)`` kept counts (``dynvit.benchmark.Accuracy.kept_tokens``).
        num_patches: patch tokens of an image before pruning (the x-axis ends there).
        title: figure title.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if kept_tokens.ndim != 2 or kept_tokens.shape[1] == 0 or kept_tokens.shape[0] == 0:
        raise ValueError(f"kept_tokens must be (images, stages) with at least one of each, got {tuple(kept_tokens.shape)}")
    counts = kept_tokens.float().cpu()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    bins = torch.arange(0, num_patches + 2).float() - 0.5
    for s in range(counts.shape[1]):
        c = counts[:, s]
        ax.hist(c.numpy(), bins=bins.numpy(), alpha=0.55,
                label=f"stage {s + 1}: mean {c.mean():.1f}, 5-95% {c.quantile(0.05):.0f}-{c.quantile(0.95):.0f}")
    ax.set_xlabel(f"patch tokens kept per image (of {num_patches})")
    ax.set_ylabel("images")
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return _save_figure(fig, path, f"the kept-token histogram of {len(counts)} images")


def _save_figure(fig, path: str | os.PathLike, what: str) -> str:
    """Save ``fig`` as a PNG at ``path`` (folders created), close it, and return the path."""
    import matplotlib.pyplot as plt

    path = os.fspath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=150)
    plt.close(fig)
    _log.info("saved %s to %s", what, path)
    return path
