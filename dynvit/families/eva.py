"""timm's ``Eva`` family: RoPE ViTs (``vit_*_rope_*``), EVA and EVA-02, Perception Encoder,
DINOv3, LingBot and Sapiens2.

Three things differ from ``VisionTransformer``:

* **Rotary position embeddings.** ``Eva._pos_embed`` returns the tokens and the rotary table of
  the patch grid (``(N, 2D)``, or ``(depth, H, N, 2D)`` for mixed RoPE), which every block
  takes as ``rope=``. Kept tokens keep their original positions, so when they are gathered
  their rows of the table are gathered with them, per image (``(B, 1, K, 2D)`` broadcast over
  heads, or ``(depth, B, H, K, 2D)``), with timm's ``apply_keep_indices_nlc`` (what ``Eva``
  itself does for ``PatchDropout``). A merged token keeps the kept token's position.
* **Blocks and attention.** ``EvaBlock`` (LayerScale ``gamma_1``/``gamma_2``, SwiGLU or plain
  MLP) and the post-norm ``EvaBlockPostNorm``, with ``EvaAttention`` (fused qkv with separate
  q/v biases, or separate projections) or ``AttentionRope`` (grouped-query attention). The
  pruned path calls them as timm does; the masked path has one function per attention class
  below, honouring q/k-norm, the rotation layout, scale norm, gating and dropout.
* **The head.** Attention pooling reads every token (prefix included); average pooling never
  reads the prefix tokens.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from einops import rearrange
from timm.layers import AttentionRope, apply_keep_indices_nlc
from timm.layers.pos_embed_sincos import (
    RotaryEmbeddingCat,
    RotaryEmbeddingDinoV3,
    RotaryEmbeddingMixed,
    RotaryEmbeddingMRope,
)
from timm.models.eva import Eva, EvaAttention, EvaBlock, EvaBlockPostNorm
from torch import nn

from ..model import DynViTMixin
from .masked import masked_attention, rotate_patches
from .pool import check_attention_pool

__all__ = ["EvaMixin", "check_eva", "eva_masked_block", "eva_attention_forward", "rope_attention_forward"]

_ROPES = (RotaryEmbeddingCat, RotaryEmbeddingMixed, RotaryEmbeddingDinoV3, RotaryEmbeddingMRope)


# ---- attention: one function per class ---------------------------------------------------------
def _attend(attn: nn.Module, x, q, k, v, rope, token_mask, key_bias) -> torch.Tensor:
    """What ``EvaAttention`` and ``AttentionRope`` share after their projections: q/k-norm,
    rotation of the patch tokens, grouped-query expansion, masked softmax, scale norm, gate,
    output projection."""
    gate = attn.gate(x).sigmoid() if attn.gate is not None else None
    q, k = attn.q_norm(q), attn.k_norm(k)
    if rope is not None:
        half = getattr(attn, "rotate_half", False)
        q = rotate_patches(q, rope, attn.num_prefix_tokens, half).type_as(v)
        k = rotate_patches(k, rope, attn.num_prefix_tokens, half).type_as(v)
    groups = getattr(attn, "num_kv_groups", 1)
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    out = masked_attention(q, k, v, attn.scale, attn.attn_drop, token_mask, key_bias)
    out = attn.norm(rearrange(out, "b h n d -> b n (h d)"))
    if gate is not None:
        out = out * gate
    return attn.proj_drop(attn.proj(out))


def eva_attention_forward(attn: EvaAttention, x, rope, token_mask, key_bias=None) -> torch.Tensor:
    """timm's ``EvaAttention`` on ``x`` ``(B, N, C)`` with the keep mask in its softmax."""
    if attn.qkv is not None:
        if attn.q_bias is None:
            qkv = attn.qkv(x)
        else:
            bias = torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
            qkv = attn.qkv(x) + bias if attn.qkv_bias_separate else F.linear(x, weight=attn.qkv.weight, bias=bias)
        q, k, v = rearrange(qkv, "b n (qkv h d) -> qkv b h n d", qkv=3, h=attn.num_heads).unbind(0)
    else:
        q, k, v = (rearrange(proj(x), "b n (h d) -> b h n d", h=attn.num_heads)
                   for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
    return _attend(attn, x, q, k, v, rope, token_mask, key_bias)


def rope_attention_forward(attn: AttentionRope, x, rope, token_mask, key_bias=None) -> torch.Tensor:
    """timm's ``AttentionRope`` (grouped-query when ``num_kv_heads < num_heads``) with the keep
    mask in its softmax."""
    if attn.qkv is not None:
        q, k, v = rearrange(attn.qkv(x), "b n (qkv h d) -> qkv b h n d", qkv=3, h=attn.num_heads,
                            d=attn.head_dim).unbind(0)
    else:  # grouped-query attention: fewer key and value heads
        q = rearrange(attn.q_proj(x), "b n (h d) -> b h n d", h=attn.num_heads, d=attn.head_dim)
        k, v = (rearrange(proj(x), "b n (h d) -> b h n d", h=attn.num_kv_heads, d=attn.head_dim)
                for proj in (attn.k_proj, attn.v_proj))
    return _attend(attn, x, q, k, v, rope, token_mask, key_bias)


_ATTENTION: dict[type, Callable] = {EvaAttention: eva_attention_forward, AttentionRope: rope_attention_forward}


# ---- blocks --------------------------------------------------------------------------------
def eva_masked_block(block: nn.Module, x: torch.Tensor, token_mask: torch.Tensor, key_bias: torch.Tensor | None = None,
                     rope: torch.Tensor | None = None) -> torch.Tensor:
    """One ``EvaBlock`` or ``EvaBlockPostNorm`` whose attention ignores tokens with
    ``token_mask == 0`` ``(B, N)``; ``key_bias`` ``(B, N)`` is added to each key's logit and
    ``rope`` is the block's rotary table for the patch tokens of ``x``."""
    attend = _ATTENTION[type(block.attn)]
    if type(block) is EvaBlockPostNorm:
        x = x + block.drop_path1(block.norm1(attend(block.attn, x, rope, token_mask, key_bias)))
        return x + block.drop_path2(block.norm2(block.mlp(x)))
    a = attend(block.attn, block.norm1(x), rope, token_mask, key_bias)
    if block.gamma_1 is not None:
        a = block.gamma_1 * a
    x = x + block.drop_path1(a)
    m = block.mlp(block.norm2(x))
    if block.gamma_2 is not None:
        m = block.gamma_2 * m
    return x + block.drop_path2(m)


def _check_block(block: nn.Module, index: int, model: Eva) -> None:
    if type(block) not in (EvaBlock, EvaBlockPostNorm):
        raise NotImplementedError(
            f"blocks[{index}] is {type(block).__module__}.{type(block).__qualname__}; dynvit supports timm's EvaBlock "
            "and EvaBlockPostNorm in Eva models"
        )
    if type(block.attn) not in _ATTENTION:
        raise NotImplementedError(
            f"blocks[{index}].attn is {type(block.attn).__module__}.{type(block.attn).__qualname__}; dynvit supports "
            "EvaAttention and AttentionRope in Eva models"
        )
    if model.rope is not None and block.attn.num_prefix_tokens != model.num_prefix_tokens:
        raise NotImplementedError(
            f"blocks[{index}].attn leaves {block.attn.num_prefix_tokens} tokens unrotated but the model has "
            f"{model.num_prefix_tokens} prefix tokens"
        )


def check_eva(model: nn.Module) -> None:
    """Refuse ``Eva`` models the pruning paths do not reproduce, naming the part."""
    if not isinstance(model, Eva):
        raise NotImplementedError(f"expected a timm Eva, got {type(model).__qualname__}")
    check_attention_pool(model.attn_pool, model.global_pool)
    if model.patch_drop is not None:
        raise NotImplementedError("patch_drop_rate > 0 (PatchDropout) is not supported: it drops tokens on its own; set it to 0")
    if model.rope is not None and not isinstance(model.rope, _ROPES):
        raise NotImplementedError(
            f"rotary embedding {type(model.rope).__qualname__} is not supported; dynvit gathers "
            + ", ".join(c.__name__ for c in _ROPES)
        )
    for i, blk in enumerate(model.blocks):
        _check_block(blk, i, model)


# ---- the family mixin ------------------------------------------------------------------------
class EvaMixin(DynViTMixin):
    """Modifications to a timm ``Eva``, on top of :class:`~dynvit.model.DynViTMixin`'s:

    - ``_embed`` returns the rotary table of the patch grid with the tokens (timm's
      ``_pos_embed``); blocks are called with ``rope=`` (their own row of a mixed table).
    - ``_gather_rope``: kept tokens carry their rows of the rotary table, per image.
    - ``_masked_block``: :func:`eva_masked_block`.
    - pooling: attention pooling reads the prefix tokens, average pooling does not (as timm's
      ``Eva.pool``).
    """

    def _embed(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        self.check_input(x)
        x, rope = self._pos_embed(self.patch_embed(x))
        return self.norm_pre(x), rope

    def _gather_rope(self, rope: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        # timm's PatchDropout helper: rows of (..., N, 2D) tables per image (it reads the batch
        # size from its first argument), then the layout Eva's blocks take.
        rope = apply_keep_indices_nlc(position, rope, position)
        return rope.transpose(0, 1) if self.rope_mixed else rope.unsqueeze(1)

    def _block_rope(self, index: int, rope: torch.Tensor | None) -> torch.Tensor | None:
        return rope[index] if rope is not None and self.rope_mixed else rope

    def _call_block(self, index, block, x, rope, attn_mask):
        return block(x, rope=self._block_rope(index, rope), attn_mask=attn_mask)

    def _masked_block(self, index, block, x, rope, token_mask, key_bias):
        return eva_masked_block(block, x, token_mask, key_bias, self._block_rope(index, rope))

    @staticmethod
    def check_class_attention(model: nn.Module, prune_loc) -> None:
        raise NotImplementedError(
            "the predictors' attention signal is not implemented for timm's Eva family (RoPE ViTs, EVA-02, PE, DINOv3); "
            "choose predictor signals without 'attention'")

    def _pool_includes_prefix(self) -> bool:
        return self.attn_pool is not None
