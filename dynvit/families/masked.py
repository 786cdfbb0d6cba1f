"""Masked attention arithmetic shared by the families' training paths. Pure tensor functions.

The masked training path keeps every token in place and hides the dropped ones inside the
softmax, so the keep mask (a straight-through Gumbel sample) receives a gradient. This is the
arithmetic of :func:`dynvit.attention.attention_forward` (the ``VisionTransformer`` path) as
functions of ``q``, ``k``, ``v``, so that every attention class of :mod:`dynvit.families` can
compute its own ``q``, ``k``, ``v`` with its own parameters and share the rest.

Shapes: ``B`` batch, ``H`` heads, ``L`` queries, ``N`` keys, ``D`` head width.
"""
from __future__ import annotations

import torch
from timm.layers import apply_rot_embed_cat
from torch import nn

__all__ = ["masked_softmax", "masked_attention", "rotate_patches"]


def masked_softmax(
    scores: torch.Tensor,
    key_mask: torch.Tensor | None = None,
    key_bias: torch.Tensor | None = None,
    *,
    self_attention: bool = True,
) -> torch.Tensor:
    """Float32 softmax of ``scores`` ``(B, H, L, N)`` over keys weighted by ``key_mask``.

    Args:
        scores: attention logits.
        key_mask: ``(B, N)`` non-negative key weights (0/1 keep masks, possibly carrying a
            gradient, or token sizes). Query ``i`` attends to key ``j`` with weight
            proportional to ``exp(s_ij) * m_j``; with a 0/1 mask this is attention over the
            kept keys alone.
        key_bias: ``(B, N)`` additive bias on each key's logit (``log(size)`` of merged tokens).
        self_attention: queries are the keys (``L == N``): the diagonal is always allowed,
            so a dropped token still attends to itself (no 0/0). False for a latent query
            (attention pooling).

    Returns:
        ``(B, H, L, N)`` float32 probabilities.
    """
    scores = scores.float()
    if key_bias is not None:
        scores = scores + key_bias.float()[:, None, None, :]
    if key_mask is None:
        return scores.softmax(dim=-1)
    m = key_mask.float()[:, None, None, :]
    if self_attention:
        eye = torch.eye(scores.shape[-1], device=scores.device, dtype=torch.float32)
        m = m + (1.0 - m) * eye  # (B, 1, N, N); the diagonal is always allowed
    # Subtract the max over allowed keys only, so allowed terms never all underflow.
    top = scores.masked_fill(m <= 0, float("-inf")).amax(dim=-1, keepdim=True).detach()
    e = torch.exp(scores - top) * m
    return e / e.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)


def masked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    attn_drop: nn.Module,
    key_mask: torch.Tensor | None = None,
    key_bias: torch.Tensor | None = None,
    *,
    self_attention: bool = True,
) -> torch.Tensor:
    """``attn_drop(masked_softmax(q k^T * scale)) @ v`` for ``q`` ``(B, H, L, D)``, ``k`` and
    ``v`` ``(B, H, N, D)``; see :func:`masked_softmax`. Returns ``(B, H, L, D)`` in ``v``'s dtype."""
    probs = masked_softmax((q * scale) @ k.transpose(-2, -1), key_mask, key_bias, self_attention=self_attention)
    return attn_drop(probs).to(v.dtype) @ v


def rotate_patches(t: torch.Tensor, rope: torch.Tensor, num_prefix_tokens: int, half: bool) -> torch.Tensor:
    """Apply the rotary embedding ``rope`` to the patch tokens of ``t`` ``(B, H, P + N, D)``, as
    timm's ``EvaAttention`` does: prefix tokens are not rotated.

    ``rope`` is timm's concatenated ``[sin, cos]`` table for the ``N`` patch tokens: ``(N, 2D)``
    shared by the batch, ``(H, N, 2D)`` per head, or gathered per image ``(B, 1 or H, N, 2D)``.
    """
    p = num_prefix_tokens
    rotated = apply_rot_embed_cat(t[:, :, p:, :], rope, half=half)
    return torch.cat([t[:, :, :p, :], rotated], dim=2)
