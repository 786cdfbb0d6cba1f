"""Merging the tokens a stage drops into the kept tokens most like them. Pure tensor functions.

Dropping a token throws away what it carried; merging it keeps that, at the cost of a small
matching step per stage. Each dropped patch token is averaged into the kept patch token it is
most similar to (cosine similarity of the token features), weighted by *size*: the number of
input patches a token stands for. Later attention is proportional, as in ToMe: ``log(size)``
is added to each key's attention logit, so a token that absorbed three others weighs as much as
the four of them would. The predictors still choose which tokens survive; merging only decides
where the others go. Prefix tokens never merge.

Two forms compute the same thing for the same keep decisions:

* :func:`merge_masked` for the training path, where every token stays in place: a dropped
  token's features and size are added to its target's row, and it becomes dead. It is written
  with the keep mask as a multiplier, so a straight-through mask gets a gradient from merging.
* :func:`merge_gathered` for the inference path, where kept tokens are gathered: dropped ones
  are scatter-added into their target's slot.

Shapes: ``B`` batch, ``N`` patch tokens, ``C`` channels, ``K`` kept tokens.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["merge_targets", "merge_masked", "merge_gathered", "size_bias"]


@torch.no_grad()
def merge_targets(x: torch.Tensor, targets: torch.Tensor | None = None, allowed: torch.Tensor | None = None, *,
                  index: torch.Tensor | None = None) -> torch.Tensor:
    """For every token of ``x``, the index of its most similar token among ``targets``.

    Args:
        x: ``(B, N, C)`` tokens to place.
        targets: ``(B, K, C)`` candidate destinations; None: ``x`` itself, or with ``index`` the
            tokens ``index`` ``(B, K)`` of ``x``. Those two are normalised once, not twice.
        allowed: optional ``(B, K)`` bool; False candidates are never chosen.

    Returns:
        ``(B, N)`` long indices into ``K`` (ties go to the lowest index).
    """
    z = F.normalize(x.float(), dim=-1)
    if targets is not None:
        zt = F.normalize(targets.float(), dim=-1)
    else:  # a row's normalisation does not depend on the others: gathering normalised rows is exact
        zt = z if index is None else torch.gather(z, 1, index.unsqueeze(-1).expand(-1, -1, z.shape[-1]))
    sim = z @ zt.transpose(1, 2)
    if allowed is not None:
        sim = sim.masked_fill(~allowed[:, None, :], float("-inf"))
    return sim.argmax(dim=-1)


def merge_masked(
    x: torch.Tensor, size: torch.Tensor, alive: torch.Tensor, keep: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge the tokens dropped at this stage into kept ones, all tokens staying in place.

    Args:
        x: ``(B, N, C)`` patch tokens.
        size: ``(B, N)`` patches each token stands for.
        alive: ``(B, N)`` keep mask before this stage (0/1, may carry gradient).
        keep: ``(B, N)`` keep mask after this stage (``<= alive``; 0/1, may carry gradient).

    Returns:
        ``(x, size)``: a kept token becomes the size-weighted mean of itself and the tokens
        merged into it, with their summed size; every other token is unchanged (a token
        dropped here is dead from now on, as in the masked path without merging).
    """
    dropped = alive - keep  # 1 for tokens dropped at this stage
    target = merge_targets(x, allowed=keep.detach() > 0.5)  # (B, N)
    n = x.shape[1]
    # into[b, i, j] = 1 where token j merges into token i (j dropped here, i its target), plus i itself.
    into = F.one_hot(target, n).to(x.dtype).transpose(1, 2) * dropped.to(x.dtype)[:, None, :]
    into = into + torch.eye(n, device=x.device, dtype=x.dtype)
    size = size.to(x.dtype)
    new_size = (into @ size.unsqueeze(-1)).squeeze(-1)
    merged = (into @ (x * size.unsqueeze(-1))) / new_size.unsqueeze(-1)
    return merged, new_size


def merge_gathered(
    x: torch.Tensor,
    size: torch.Tensor | None,
    index: torch.Tensor,
    index_valid: torch.Tensor | None = None,
    valid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather the kept tokens and add every other token into its most similar kept one.

    Args:
        x: ``(B, N, C)`` current patch tokens.
        size: ``(B, N)`` patches each token stands for; None: one each.
        index: ``(B, K)`` positions of the kept tokens in ``N`` (ascending for real ones).
        index_valid: optional ``(B, K)`` bool, False for padding slots of a padded batch.
        valid: optional ``(B, N)`` bool, False for padding positions of ``x``.

    Returns:
        ``(x, size)`` of the ``K`` kept slots. A padding slot gets the gathered token and
        size 1 (it is masked out of attention and pooling anyway).
    """
    B, _, C = x.shape
    k = index.shape[1]
    kept = torch.gather(x, 1, index.unsqueeze(-1).expand(-1, -1, C))
    slot = merge_targets(x, allowed=index_valid, index=index)  # (B, N): the kept slot each token goes to
    own = torch.arange(k, device=x.device).expand(B, k)
    if index_valid is None:
        slot = slot.scatter(1, index, own)  # a kept token stays in its own slot
    else:
        slot = slot.scatter(1, index, torch.where(index_valid, own, torch.gather(slot, 1, index)))
    if size is None:  # every token stands for one patch: weights 1 (exact), or 0 on padding
        weight = torch.ones_like(x[..., 0]) if valid is None else valid.to(x.dtype)
        weighted = x if valid is None else x * weight.unsqueeze(-1)
    else:
        weight = size.to(x.dtype) if valid is None else size.to(x.dtype) * valid.to(x.dtype)
        weighted = x * weight.unsqueeze(-1)
    new_size = torch.zeros(B, k, device=x.device, dtype=x.dtype).scatter_add(1, slot, weight)
    sums = torch.zeros_like(kept).scatter_add(1, slot.unsqueeze(-1).expand(-1, -1, C), weighted)
    empty = new_size <= 0  # padding slots
    merged = torch.where(empty.unsqueeze(-1), kept, sums / new_size.clamp_min(1e-6).unsqueeze(-1))
    return merged, new_size.masked_fill(empty, 1.0)


def size_bias(size: torch.Tensor, num_prefix_tokens: int) -> torch.Tensor:
    """``(B, P + N)`` additive attention bias ``log(size)`` for keys, 0 for prefix tokens."""
    bias = torch.log(size.float().clamp_min(1e-6))
    return F.pad(bias, (num_prefix_tokens, 0))
