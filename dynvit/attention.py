"""Attention arithmetic for paths where timm's fused attention cannot be used as is.

Training needs the keep mask inside the softmax (so the mask receives gradient), EViT needs
the class token's attention weights and ToMe needs the keys and a size bias. All of them use
:func:`attention_forward`, which reuses the timm module's own parameters and honours every
option of ``timm.layers.Attention`` (qkv bias, q/k-norm, scale norm, gating, attention and
projection dropout). Other attention classes are refused by :func:`check_attention`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from timm.layers import Attention
from timm.models.vision_transformer import Block

__all__ = ["AttentionOutput", "attention_forward", "check_attention", "check_block", "masked_block"]


@dataclass
class AttentionOutput:
    out: torch.Tensor  # (B, N, C) attention output after the projection
    weights: torch.Tensor | None = None  # (B, H, N, N) float32 attention probabilities, if asked for
    keys: torch.Tensor | None = None  # (B, H, N, D) keys after k-norm, if asked for


def check_block(block: nn.Module, index: int) -> None:
    """Refuse blocks whose structure the pruning paths do not reproduce."""
    if type(block) is not Block:
        raise NotImplementedError(
            f"blocks[{index}] is {type(block).__module__}.{type(block).__qualname__}; dynvit supports "
            "timm.models.vision_transformer.Block (pre-norm) only"
        )
    check_attention(block.attn, index)


def check_attention(attn: nn.Module, index: int) -> None:
    if type(attn) is not Attention:
        raise NotImplementedError(
            f"blocks[{index}].attn is {type(attn).__module__}.{type(attn).__qualname__}; dynvit supports "
            "timm.layers.Attention only (no RoPE or other attention variants)"
        )


def attention_forward(
    attn: Attention,
    x: torch.Tensor,
    *,
    key_mask: torch.Tensor | None = None,
    key_bias: torch.Tensor | None = None,
    need_weights: bool = False,
    need_keys: bool = False,
) -> AttentionOutput:
    """Self-attention of ``x`` ``(B, N, C)`` through the parameters of a timm ``Attention``.

    The softmax runs in float32 whatever the autocast dtype.

    Args:
        attn: the timm attention module whose weights are used.
        key_mask: ``(B, N)`` keep weights in [0, 1], possibly carrying gradient. Query ``i``
            attends to key ``j`` with weight proportional to ``exp(s_ij) * m_ij`` where
            ``m_ij = key_mask[j]`` for ``j != i`` and 1 on the diagonal, so nobody attends to
            a dropped token while a dropped token still attends to itself (no 0/0). With a
            0/1 mask this equals attention over the kept tokens alone.
        key_bias: ``(B, N)`` additive bias on the attention logits of each key (ToMe's
            ``log(size)``).
        need_weights: also return the attention probabilities.
        need_keys: also return the keys.
    """
    B, N, _ = x.shape
    gate = attn.gate(x).sigmoid() if attn.gate is not None else None
    qkv = attn.qkv(x).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)

    scores = ((q * attn.scale) @ k.transpose(-2, -1)).float()
    if key_bias is not None:
        scores = scores + key_bias.float()[:, None, None, :]
    if key_mask is None:
        probs = scores.softmax(dim=-1)
    else:
        eye = torch.eye(N, device=x.device, dtype=torch.float32)
        m = key_mask.float()[:, None, None, :]
        m = m + (1.0 - m) * eye  # (B, 1, N, N); the diagonal is always allowed
        # Subtract the max over allowed keys only, so allowed terms never all underflow.
        top = scores.masked_fill(m <= 0, float("-inf")).amax(dim=-1, keepdim=True).detach()
        e = torch.exp(scores - top) * m
        probs = e / e.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    out = attn.attn_drop(probs).to(v.dtype) @ v

    out = out.transpose(1, 2).reshape(B, N, attn.attn_dim)
    out = attn.norm(out)
    if gate is not None:
        out = out * gate
    out = attn.proj_drop(attn.proj(out))
    return AttentionOutput(out, probs if need_weights else None, k if need_keys else None)


def masked_block(block: Block, x: torch.Tensor, token_mask: torch.Tensor, key_bias: torch.Tensor | None = None) -> torch.Tensor:
    """One timm ``Block`` whose attention ignores tokens with ``token_mask == 0`` ``(B, N)``;
    ``key_bias`` ``(B, N)`` is added to each key's attention logit (``log(size)`` of merged tokens)."""
    a = attention_forward(block.attn, block.norm1(x), key_mask=token_mask, key_bias=key_bias).out
    x = x + block.drop_path1(block.ls1(a))
    return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))
