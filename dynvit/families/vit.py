"""timm's ``VisionTransformer`` family: what dynvit supports, and the masked training path of
each block type.

The pruned path calls timm's own blocks with ``attn_mask``; the masked path needs the keep mask
inside each softmax, so every block type has one function here that reuses the block's own
modules and parameters and honours every option of its class (q/k-norm, qkv bias, LayerScale,
fused or separate output projections, differential attention's lambda and sub-norm, dropout)
or is refused. :func:`vit_masked_block` chooses the function by block and attention class.

Supported: ``Block`` with ``Attention`` (:func:`dynvit.attention.masked_block`) or
``DiffAttention``, post-norm ``ResPostBlock``, and the parallel blocks ``ParallelScalingBlock``,
``DiffParallelScalingBlock`` and ``ParallelThingsBlock``; patch or hybrid (CNN stem)
embeddings; ``global_pool`` ``token``, ``avg`` or ``map``.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from einops import rearrange
from timm.layers import Attention
from timm.layers.diff_attention import DiffAttention
from timm.models.vision_transformer import (
    Block,
    DiffParallelScalingBlock,
    ParallelScalingBlock,
    ParallelThingsBlock,
    ResPostBlock,
    VisionTransformer,
)
from torch import nn

from ..attention import attention_forward, check_attention, masked_block
from .masked import masked_softmax, masked_attention
from .pool import check_attention_pool

__all__ = ["check_vit", "vit_masked_block", "diff_attention_forward", "vit_class_attention", "class_attention_probs", "check_class_attention",
           "class_query"]


# ---- differential attention ----------------------------------------------------------------
def _diff_heads(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int):
    """``(B, N, C)`` projections to differential attention's heads: ``2H`` query and key heads
    (two per head), ``H`` value heads of twice the width."""
    q, k = (rearrange(t, "b n (h d) -> b h n d", h=2 * num_heads) for t in (q, k))
    return q, k, rearrange(v, "b n (h d) -> b h n d", h=num_heads)


def _diff_attend(mod: nn.Module, q, k, v, token_mask, key_bias) -> torch.Tensor:
    """``(softmax(q1 k1) - lambda softmax(q2 k2)) @ v``, masked, then the sub-norm: the part
    ``DiffAttention`` and ``DiffParallelScalingBlock`` share. ``q``, ``k``: ``(B, 2H, N, D)``
    (head ``h`` owns rows ``2h`` and ``2h + 1``), ``v``: ``(B, H, N, 2D)``. Returns ``(B, N, 2HD)``."""
    lam = mod._compute_lambda().type_as(q).float()
    probs = mod.attn_drop(masked_softmax((q * mod.scale) @ k.transpose(-2, -1), token_mask, key_bias))
    probs = rearrange(probs, "b (h pair) n m -> b h pair n m", pair=2)
    out = (probs[:, :, 0] - lam * probs[:, :, 1]).to(v.dtype) @ v
    out = mod.sub_norm(out) * (1 - mod.lambda_init)
    return rearrange(out, "b h n d -> b n (h d)")


def diff_attention_forward(attn: DiffAttention, x: torch.Tensor, token_mask, key_bias=None) -> torch.Tensor:
    """timm's ``DiffAttention`` with a keep mask in both softmaxes."""
    q, k, v = _diff_heads(*attn.qkv(x).chunk(3, dim=2), attn.num_heads)
    q, k = attn.q_norm(q), attn.k_norm(k)
    out = attn.norm(_diff_attend(attn, q, k, v, token_mask, key_bias))
    return attn.proj_drop(attn.proj(out))


# ---- one masked function per block type ------------------------------------------------------
def _diff_block(block: Block, x, token_mask, key_bias=None):
    a = diff_attention_forward(block.attn, block.norm1(x), token_mask, key_bias)
    x = x + block.drop_path1(block.ls1(a))
    return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))


def _res_post_block(block: ResPostBlock, x, token_mask, key_bias=None):
    a = attention_forward(block.attn, x, key_mask=token_mask, key_bias=key_bias).out
    x = x + block.drop_path1(block.norm1(a))
    return x + block.drop_path2(block.norm2(block.mlp(x)))


def _split_in_proj(block: nn.Module, x: torch.Tensor):
    """The fused MLP-fc1 + qkv projection of the parallel scaling blocks."""
    x_mlp, q, k, v = torch.split(block.in_proj(block.in_norm(x)), block.in_split, dim=-1)
    if block.mlp_bias is not None:
        x_mlp = x_mlp + block.mlp_bias
    return block.mlp_drop(block.mlp_act(x_mlp)), q, k, v


def _parallel_scaling_block(block: ParallelScalingBlock, x, token_mask, key_bias=None):
    x_mlp, q, k, v = _split_in_proj(block, x)
    q, k, v = (rearrange(t, "b n (h d) -> b h n d", h=block.num_heads) for t in (q, k, v))
    q, k = block.q_norm(q), block.k_norm(k)  # per head vector: the same numbers before or after the transpose
    x_attn = rearrange(masked_attention(q, k, v, block.scale, block.attn_drop, token_mask, key_bias), "b h n d -> b n (h d)")
    if block.out_proj is not None:
        y = block.out_proj(torch.cat((x_attn, x_mlp), dim=-1))
    else:
        y = block.attn_out_proj(x_attn) + block.mlp_out_proj(x_mlp)
    return x + block.drop_path(block.ls(y))


def _diff_parallel_scaling_block(block: DiffParallelScalingBlock, x, token_mask, key_bias=None):
    x_mlp, q, k, v = _split_in_proj(block, x)
    q, k, v = _diff_heads(q, k, v, block.num_heads)
    q, k = block.q_norm(q), block.k_norm(k)
    x_attn = _diff_attend(block, q, k, v, token_mask, key_bias)
    return x + block.drop_path(block.ls(block.out_proj(torch.cat((x_attn, x_mlp), dim=-1))))


def _parallel_things_block(block: ParallelThingsBlock, x, token_mask, key_bias=None):
    attn_out = []
    for branch in block.attns:
        a = attention_forward(branch.attn, branch.norm(x), key_mask=token_mask, key_bias=key_bias).out
        attn_out.append(branch.drop_path(branch.ls(a)))
    x = x + torch.stack(attn_out).sum(dim=0)
    return x + torch.stack([ffn(x) for ffn in block.ffns]).sum(dim=0)


_MASKED_BLOCKS: dict[tuple[type, type], Callable] = {
    (Block, Attention): masked_block,
    (Block, DiffAttention): _diff_block,
    (ResPostBlock, Attention): _res_post_block,
    (ParallelScalingBlock, type(None)): _parallel_scaling_block,
    (DiffParallelScalingBlock, type(None)): _diff_parallel_scaling_block,
    (ParallelThingsBlock, type(None)): _parallel_things_block,
}


def _masked_fn(block: nn.Module, index: int | None = None) -> Callable:
    fn = _MASKED_BLOCKS.get((type(block), type(getattr(block, "attn", None))))
    if fn is None:
        where = "a block" if index is None else f"blocks[{index}]"
        attn = getattr(block, "attn", None)
        raise NotImplementedError(
            f"{where} is {type(block).__module__}.{type(block).__qualname__}"
            + (f" with {type(attn).__qualname__}" if attn is not None else "")
            + "; dynvit supports the VisionTransformer blocks "
            + ", ".join(sorted({f"{b.__name__}" + (f"({a.__name__})" if a is not type(None) else "") for b, a in _MASKED_BLOCKS}))
        )
    return fn


def vit_masked_block(block: nn.Module, x: torch.Tensor, token_mask: torch.Tensor, key_bias: torch.Tensor | None = None):
    """One ``VisionTransformer`` block whose attention ignores tokens with ``token_mask == 0``
    ``(B, N)``; ``key_bias`` ``(B, N)`` is added to each key's attention logit."""
    return _masked_fn(block)(block, x, token_mask, key_bias)


# ---- the class token's attention (the predictors' attention signal) ---------------------------
def class_attention_probs(q: torch.Tensor, k: torch.Tensor | None, scale: float, num_prefix_tokens: int,
                          alive: torch.Tensor, size: torch.Tensor | None) -> torch.Tensor:
    """``(B, N)`` attention of one query per image over the patch tokens, averaged over heads.

    ``q`` ``(B, H, 1, D)``, ``k`` ``(B, H, P + N, D)`` after q/k-norm (and rotation); or, with
    ``k`` None, ``q`` holds the unscaled logits ``(B, H, 1, P + N)``. Keys of dead tokens
    (``alive`` False) are left out of the softmax, merged tokens weigh ``log(size)`` more, as in
    the blocks. Float32 softmax; the prefix tokens' share is not returned.
    """
    p = num_prefix_tokens
    logits = q.float() if k is None else q.float() @ k.float().transpose(-2, -1)
    logits = (logits * scale).squeeze(-2)  # (B, H, P + N)
    bias = torch.zeros(alive.shape, device=alive.device) if size is None else torch.log(size.float().clamp_min(1e-6))
    bias = F.pad(bias.masked_fill(~alive, float("-inf")), (p, 0))
    return torch.softmax(logits + bias[:, None, :], dim=-1)[..., p:].mean(dim=1)


def class_query(tokens: torch.Tensor, num_prefix_tokens: int, has_class_token: bool, alive: torch.Tensor) -> torch.Tensor:
    """``(B, 1, C)`` the (normed) token whose attention the signal reads: the class token, or
    without one the mean of the alive patch tokens."""
    if has_class_token:
        return tokens[:, :1]
    w = alive.to(tokens.dtype).unsqueeze(1)  # (B, 1, N)
    return (w @ tokens[:, num_prefix_tokens:]) / w.sum(dim=-1, keepdim=True).clamp_min(1.0)


def check_class_attention(block: nn.Module, index: int) -> None:
    """Refuse the attention signal before a block :func:`vit_class_attention` cannot read."""
    attn = getattr(block, "attn", None)
    if type(block) not in (Block, ResPostBlock) or type(attn) is not Attention:
        raise NotImplementedError(
            f"the attention signal reads timm's Block or ResPostBlock with Attention; blocks[{index}] is "
            f"{type(block).__qualname__}{' with ' + type(attn).__qualname__ if attn is not None else ''}: "
            "choose predictor signals without 'attention'")


def vit_class_attention(block: nn.Module, x: torch.Tensor, num_prefix_tokens: int, has_class_token: bool,
                        alive: torch.Tensor, size: torch.Tensor | None) -> torch.Tensor:
    """``(B, N)`` the attention the class token would pay each alive patch token in ``block``
    (a ``Block`` or ``ResPostBlock`` with timm's ``Attention``), computed from ``x`` ``(B, P + N, C)``
    with the block's own norm, projections and q/k-norm.

    Only the class token's query is needed. Without k-norm the keys are never formed: per head,
    ``q . (W_k y + b_k) = (W_k^T q) . y + q . b_k``, so the class token's query is carried back
    through the key projection once (``C`` x ``C`` multiply-adds per image) and the tokens are
    read with it (``N`` x ``C`` per head) instead of projecting every token's key (``N`` x ``C``
    x ``C``). With k-norm (a norm per key) the keys are projected.
    """
    attn = block.attn
    y = block.norm1(x) if type(block) is Block else x
    h, d = attn.num_heads, attn.head_dim
    width = h * d
    weight, bias = attn.qkv.weight, attn.qkv.bias
    query = class_query(y, num_prefix_tokens, has_class_token, alive)
    q = F.linear(query, weight[:width], None if bias is None else bias[:width])
    q = attn.q_norm(rearrange(q, "b n (h d) -> b h n d", h=h))
    w_k, b_k = weight[width:2 * width], None if bias is None else bias[width:2 * width]
    if isinstance(attn.k_norm, nn.Identity):
        back = torch.einsum("bhd,hdc->bhc", q[:, :, 0], w_k.view(h, d, -1))  # (B, H, C)
        logits = torch.einsum("bnc,bhc->bhn", y, back)
        if b_k is not None:
            logits = logits + (q[:, :, 0] * b_k.view(h, d)).sum(-1, keepdim=True)
        logits = logits.unsqueeze(2)  # (B, H, 1, P + N)
        return class_attention_probs(logits, None, attn.scale, num_prefix_tokens, alive, size)
    k = attn.k_norm(rearrange(F.linear(y, w_k, b_k), "b n (h d) -> b h n d", h=h))
    return class_attention_probs(q, k, attn.scale, num_prefix_tokens, alive, size)


# ---- what the family supports ----------------------------------------------------------------
def check_vit(model: nn.Module) -> None:
    """Refuse ``VisionTransformer`` models the pruning paths do not reproduce, naming the part."""
    if not isinstance(model, VisionTransformer):
        raise NotImplementedError(f"expected a timm VisionTransformer, got {type(model).__qualname__}")
    check_attention_pool(model.attn_pool, model.global_pool)
    if not isinstance(model.patch_drop, nn.Identity):
        raise NotImplementedError("patch_drop_rate > 0 (PatchDropout) is not supported: it drops tokens on its own; set it to 0")
    if model.num_prefix_tokens and model.cls_token is None and model.reg_token is None and not hasattr(model, "dist_token"):
        raise NotImplementedError("unknown prefix tokens")
    for i, blk in enumerate(model.blocks):
        _masked_fn(blk, i)
        if isinstance(blk, ParallelThingsBlock):
            for branch in blk.attns:
                check_attention(branch.attn, i)
