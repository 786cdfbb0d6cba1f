"""Pure tensor functions that choose and gather tokens. No modules, no state.

Shapes: ``B`` batch, ``N`` current patch tokens, ``C`` channels, ``K`` kept tokens.
Kept tokens always stay in their original order, so a pruned sequence is a subsequence of
the one it came from (this keeps the gather cheap to check and easy to visualise).
"""
from __future__ import annotations

import torch

from .tracing import compiling, exporting

__all__ = ["batch_gather", "gather_tokens", "topk_indices", "threshold_indices", "compact_indices", "largest_count",
           "num_kept"]


def batch_gather(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Gather ``x[b, index[b, k]]`` for every ``b, k``.

    Args:
        x: ``(B, N)`` or ``(B, N, C)``.
        index: ``(B, K)`` integer indices into dimension 1.
    """
    if x.dim() == 2:
        return torch.gather(x, 1, index)
    return torch.gather(x, 1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def gather_tokens(x: torch.Tensor, index: torch.Tensor, num_prefix_tokens: int) -> torch.Tensor:
    """The prefix tokens of ``x`` followed by its patch tokens ``index``, in one gather.

    Args:
        x: ``(B, P + N, C)`` tokens, the ``P = num_prefix_tokens`` prefix tokens first.
        index: ``(B, K)`` indices into the patch tokens (``0 <= index < N``).

    Returns:
        ``(B, P + K, C)``; equals ``cat([x[:, :P], batch_gather(x[:, P:], index)], 1)`` without
        copying the gathered tokens a second time.
    """
    p = num_prefix_tokens
    if p:
        prefix = torch.arange(p, device=index.device, dtype=index.dtype).expand(index.shape[0], p)
        index = torch.cat([prefix, index + p], dim=1)
    return batch_gather(x, index)


def num_kept(fraction: float, total: int) -> int:
    """Tokens kept for a cumulative ``fraction`` of ``total`` patch tokens: rounded, at least one."""
    total = int(total)  # shapes are tensors while tracing
    return max(1, min(total, int(round(float(fraction) * total))))


def topk_indices(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` highest logits of each row, in ascending order. ``logits``: ``(B, N)``."""
    index = torch.topk(logits, k, dim=1, sorted=False).indices
    return torch.sort(index, dim=1).values


def threshold_indices(logits: torch.Tensor, valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep tokens whose logit is > 0 (keep probability > 0.5), at least one per row.

    Rows keep different counts, so the result is padded to the largest count.

    Args:
        logits: ``(B, N)`` keep logits.
        valid: optional ``(B, N)`` bool, False for padding positions of a padded batch;
            padding is never kept.

    Returns:
        ``index`` ``(B, K)``: kept positions first (in order), then arbitrary padding.
        ``index_valid`` ``(B, K)`` bool: True for the real kept positions.
    """
    keep = logits > 0
    if valid is not None:
        keep = keep & valid
        logits = logits.masked_fill(~valid, float("-inf"))
    # At least one token per image: the most likely one.
    top = logits.argmax(dim=1, keepdim=True)
    best = torch.zeros_like(keep).scatter(1, top, torch.ones_like(top, dtype=torch.bool))
    keep = keep | (best & ~keep.any(dim=1, keepdim=True))
    return compact_indices(keep)


def compact_indices(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices that bring each row's kept tokens to the front, in their order.

    Args:
        keep: ``(B, N)`` bool.

    Returns:
        ``index`` ``(B, K)``, ``K`` the largest kept count (:func:`largest_count`): kept
        positions first, then positions of dropped tokens as padding; ``index_valid`` ``(B, K)``
        bool, True for the kept ones.
    """
    n = keep.shape[1]
    count = keep.sum(dim=1)
    position = torch.arange(n, device=keep.device).expand_as(keep)
    # Sort key: kept tokens in original order first, then the rest.
    order = torch.argsort(torch.where(keep, position, position + n), dim=1)
    k = largest_count(count, n)
    index = order[:, :k]
    index_valid = torch.arange(k, device=keep.device).unsqueeze(0) < count.unsqueeze(1)
    return index, index_valid


def largest_count(count: torch.Tensor, n: int) -> int:
    """The largest of the kept counts ``count`` ``(B,)`` (each at most ``n``), as a size to slice
    with.

    ``.item()`` rather than ``int()``: under torch.export and torch.compile the count becomes a
    symbolic size (the graph computes it per batch) instead of a guard on one traced value, so
    one graph serves every count. Inside torch.compile (which captures it with ``fullgraph=True``)
    and in an exported graph of anything but a single image it is at least 2: inductor's matmul
    lowering and the exporter's broadcasting checks need to know a data-dependent size is not 1,
    so such a graph pads a lone kept token with one slot, which the caller masks out.
    """
    top = count.max()
    graph = compiling() or (exporting() and not (isinstance(count.shape[0], int) and count.shape[0] == 1))
    if graph:
        top = top.clamp(min=min(2, n))
    k = top.item()
    if graph:
        torch._check(k >= min(2, n))
        torch._check(k <= n)
    return k


def keep_at_least_one(decision: torch.Tensor, logits: torch.Tensor, alive: torch.Tensor | None = None) -> torch.Tensor:
    """The training-side twin of :func:`threshold_indices`'s rule: a row whose cumulative
    decision keeps no token keeps its most likely alive token.

    Args:
        decision: ``(B, N)`` 0/1 keep decisions of this stage (may carry a straight-through gradient).
        logits: ``(B, N)`` the logits behind them.
        alive: optional ``(B, N)`` 0/1 mask of the tokens still present before this stage.

    Returns:
        ``decision`` with 1 added at the chosen token of empty rows (a constant: the gradient
        of ``decision`` is unchanged).
    """
    with torch.no_grad():  # no branch on `empty`: that would synchronise with the device
        kept = decision if alive is None else decision * alive
        empty = kept.sum(dim=1, keepdim=True) == 0
        scores = logits.float() if alive is None else logits.float().masked_fill(alive <= 0, float("-inf"))
        best = torch.zeros_like(decision).scatter(1, scores.argmax(dim=1, keepdim=True), 1.0)
        fix = best * empty * (1 - decision)
    return decision + fix
