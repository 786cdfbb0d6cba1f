"""Pooling the final tokens when some of them are dropped, padded or merged.

timm pools the final tokens in ``forward_head``; when every token is real and counts once,
dynvit calls it as is. Otherwise each patch token carries a weight: 0 for a dropped or padded
token, the number of patches a merged token stands for, or a straight-through keep mask in the
training path. Average pooling becomes a weighted mean and attention pooling (``global_pool=
'map'``, timm's ``AttentionPoolLatent``) attends to each key with weight ``exp(score) * w``,
which is its softmax over the kept tokens alone, with ``log(size)`` added for merged ones.
"""
from __future__ import annotations

import torch
from einops import rearrange
from timm.layers import AttentionPoolLatent
from torch import nn

from .masked import masked_attention

__all__ = ["check_attention_pool", "attention_pool_forward", "weighted_pool"]

POOLS = ("token", "avg", "map")


def check_attention_pool(pool: nn.Module | None, global_pool: str) -> None:
    """Refuse pooling heads the weighted pooling does not reproduce."""
    if global_pool not in POOLS:
        raise NotImplementedError(
            f"global_pool={global_pool!r} is not supported; use one of {POOLS} (unpooled outputs and max pooling "
            "would need the dropped tokens)"
        )
    if global_pool == "map" and type(pool) is not AttentionPoolLatent:
        raise NotImplementedError(
            f"attention pooling {type(pool).__module__}.{type(pool).__qualname__} is not supported; dynvit supports "
            "timm.layers.AttentionPoolLatent (global_pool='map')"
        )
    if global_pool != "map" and pool is not None:
        raise NotImplementedError(
            f"global_pool={global_pool!r} with an attention pool ({type(pool).__qualname__}) is not supported"
        )
    if pool is not None and pool.pos_embed is not None:
        raise NotImplementedError("attention pooling with its own position embedding (pos_embed='abs') is not supported")


def attention_pool_forward(pool: AttentionPoolLatent, x: torch.Tensor, key_weight: torch.Tensor) -> torch.Tensor:
    """timm's ``AttentionPoolLatent`` over ``x`` ``(B, N, C)`` with key weights ``(B, N)``.

    Honours the latent length, q/k-norm, the projection, norm and MLP, and the pool type of
    the module. ``key_weight`` may carry a gradient (the training path's keep mask).
    """
    heads = dict(h=pool.num_heads, d=pool.head_dim)
    q = rearrange(pool.q(pool.latent.expand(len(x), -1, -1)), "b n (h d) -> b h n d", **heads)
    k, v = rearrange(pool.kv(x), "b n (kv h d) -> kv b h n d", kv=2, **heads).unbind(0)
    q, k = pool.q_norm(q), pool.k_norm(k)
    out = masked_attention(q, k, v, pool.scale, nn.Identity(), key_weight, self_attention=False)
    out = pool.proj_drop(pool.proj(rearrange(out, "b h n d -> b n (h d)")))
    if pool.mlp is not None:
        out = out + pool.mlp(pool.norm(out))
    if pool.pool == "token":
        return out[:, 0]
    return out.mean(1) if pool.pool == "avg" else out


def weighted_pool(
    x: torch.Tensor,
    patch_weight: torch.Tensor,
    num_prefix_tokens: int,
    *,
    include_prefix: bool,
    attn_pool: AttentionPoolLatent | None = None,
) -> torch.Tensor:
    """Pooled features ``(B, C)`` of the final tokens ``x`` ``(B, P + N, C)``.

    Args:
        x: final (normed) tokens, prefix tokens first.
        patch_weight: ``(B, N)`` weight of each patch token (bool or float, may carry gradient).
        num_prefix_tokens: ``P``.
        include_prefix: the pool reads the prefix tokens too (each with weight 1).
        attn_pool: the model's attention pool, or None for average pooling.
    """
    p = num_prefix_tokens
    if attn_pool is not None:
        tokens = x if include_prefix else x[:, p:]
        weight = patch_weight.to(x.dtype)
        if include_prefix:
            weight = torch.cat([weight.new_ones(x.shape[0], p), weight], dim=1)
        return attention_pool_forward(attn_pool, tokens, weight)
    w = torch.cat([patch_weight.new_full((x.shape[0], p), float(include_prefix)), patch_weight.to(x.dtype)], dim=1).unsqueeze(-1)
    return (x * w).sum(dim=1) / w.sum(dim=1).clamp_min(1e-6)
