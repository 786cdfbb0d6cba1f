"""Attention arithmetic for paths where timm's ``Attention.forward`` cannot be called as is.

Training needs the keep mask inside the softmax (so the mask receives gradient), EViT needs
the class token's attention weights and ToMe needs the keys and a size bias. All of them go
through :func:`attention_forward`, which reuses the timm module's own parameters and honours
every option of ``timm.layers.Attention`` (qkv bias, q/k-norm, scale norm, gating, attention
and projection dropout). Other attention classes are refused by :func:`check_attention`.

Two kernels compute the same thing:

* :func:`masked_attention` (the default): PyTorch's fused ``scaled_dot_product_attention``
  with an additive bias. A keep weight ``m`` becomes the bias ``log(eps + (1 - eps) * m)``,
  so ``exp(s + bias) = exp(s) * (eps + (1 - eps) * m)``: the multiplicative mask up to
  ``eps = exp(LOG_EPS)``. Its gradient w.r.t. ``m`` is the multiplicative mask's as well,
  because ``d bias / d m = (1 - eps) / (eps + (1 - eps) * m)`` undoes the ``eps`` that scales
  a dropped key's probability. The fused CPU kernel returns no gradient for a bias, so on
  the CPU a small autograd function (:class:`_KeyBiasAttention`) calls the fused kernel's
  forward and backward and derives the bias gradient from one extra query channel.
* :func:`explicit_attention`: the softmax written out in float32 (the reference, and the
  only one that can return the attention weights).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange
from timm.layers import Attention
from timm.models.vision_transformer import Block
from torch import nn

__all__ = [
    "LOG_EPS",
    "AttentionOutput",
    "attention_forward",
    "check_attention",
    "check_block",
    "explicit_attention",
    "mask_log_weight",
    "masked_attention",
    "masked_block",
    "packed_block",
    "PackedLayout",
]

# Log of the weight a dropped key keeps in masked_attention (2e-22 of a kept key's). A kept
# token's output moves by about exp(gap - 50) for a dropped key whose logit is `gap` above
# the kept ones' (below float32 rounding for gaps up to 30; -24 already failed at gaps near
# 30, which trained ViTs reach). The dropped key's probability, from which its mask
# gradient is read, stays a normal float32 unless its logit is 37 below the row's
# log-sum-exp, where its gradient is negligible anyway. An integer: exact in bfloat16.
LOG_EPS = -50.0

_CPU_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_CPU_FLASH_BACKWARD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)


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


# ---- pure tensor functions -----------------------------------------------------------------
def mask_log_weight(key_mask: torch.Tensor) -> torch.Tensor:
    """``log(eps + (1 - eps) * m)`` in float32: 0 for a kept key, ``LOG_EPS`` for a dropped one.

    Args:
        key_mask: ``(B, N)`` keep weights in [0, 1], possibly carrying gradient.
    """
    eps = math.exp(LOG_EPS)
    return torch.log(key_mask.float() * (1.0 - eps) + eps)


def explicit_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    key_mask: torch.Tensor | None = None,
    key_bias: torch.Tensor | None = None,
    dropout: nn.Module | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention with the softmax written out in float32; returns the output and the weights.

    Args:
        q, k, v: ``(B, H, N, D)``.
        scale: multiplies ``q @ k^T``.
        key_mask: ``(B, N)`` keep weights in [0, 1], possibly carrying gradient. Query ``i``
            weighs key ``j`` by ``exp(s_ij) * m_ij`` where ``m_ij = key_mask[j]`` for ``j != i``
            and 1 on the diagonal, so nobody attends to a dropped token while a dropped token
            still attends to itself (no 0/0). With a 0/1 mask this equals attention over the
            kept tokens alone.
        key_bias: ``(B, N)`` additive bias on every query's logit of each key.
        dropout: applied to the weights before they weigh the values.

    Returns:
        ``(B, H, N, D)`` output and ``(B, H, N, N)`` float32 weights (before dropout).
    """
    n = q.shape[-2]
    scores = ((q * scale) @ k.transpose(-2, -1)).float()
    if key_bias is not None:
        scores = scores + key_bias.float()[:, None, None, :]
    if key_mask is None:
        probs = scores.softmax(dim=-1)
    else:
        eye = torch.eye(n, device=q.device, dtype=torch.float32)
        m = key_mask.float()[:, None, None, :]
        m = m + (1.0 - m) * eye  # (B, 1, N, N); the diagonal is always allowed
        # Subtract the max over allowed keys only, so allowed terms never all underflow.
        top = scores.masked_fill(m <= 0, float("-inf")).amax(dim=-1, keepdim=True).detach()
        e = torch.exp(scores - top) * m
        probs = e / e.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    weighted = probs if dropout is None else dropout(probs)
    return weighted.to(v.dtype) @ v, probs


def _attention_bias(key_bias: torch.Tensor | None, mask_bias: torch.Tensor | None, n: int) -> torch.Tensor | None:
    """The additive float32 mask for SDPA: ``key_bias`` on every query's logit of a key,
    ``mask_bias`` on every other query's ((B, 1, N, N) then; (B, 1, 1, N) without it)."""
    if mask_bias is None:
        return None if key_bias is None else key_bias.float()[:, None, None, :]
    bias = mask_bias.float()[:, None, None, :].expand(-1, 1, n, -1).clone()
    bias.diagonal(dim1=-2, dim2=-1).zero_()  # a token always attends to itself
    return bias if key_bias is None else bias + key_bias.float()[:, None, None, :]


class _KeyBiasAttention(torch.autograd.Function):
    """SDPA on the CPU flash kernel with gradients for per-key biases.

    Forward: ``softmax(scale * q k^T + A) v`` with ``A`` from :func:`_attention_bias`.
    Backward: the kernel's own backward gives ``dq, dk, dv``. The bias gradient is the
    column sum of ``dS`` (the gradient of the logits), which the kernel never returns; it
    comes from one extra channel: with a constant 1 appended to every query and 0 to every
    key (logits unchanged), the key gradient of that channel is ``scale * sum_i dS_ij``.
    ``mask_bias`` skips the diagonal, so its gradient subtracts ``dS_jj``, computed from the
    saved log-sum-exp in O(N).
    """

    @staticmethod
    def forward(ctx, q, k, v, key_bias, mask_bias, scale):
        bias = _attention_bias(key_bias, mask_bias, q.shape[-2])
        out, lse = _CPU_FLASH(q, k, v, 0.0, False, attn_mask=bias, scale=scale)
        ctx.save_for_backward(q, k, v, out, lse, key_bias, mask_bias)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse, key_bias, mask_bias = ctx.saved_tensors
        scale = ctx.scale
        bias = _attention_bias(key_bias, mask_bias, q.shape[-2])
        need_bias = ctx.needs_input_grad[3] or ctx.needs_input_grad[4]
        if not need_bias:
            dq, dk, dv = _CPU_FLASH_BACKWARD(grad_out, q, k, v, out, lse, 0.0, False, attn_mask=bias, scale=scale)
            return dq, dk, dv, None, None, None
        # One extra channel: 1 in the queries, 0 in the keys (logits unchanged), 0 in the output
        # gradient (so the values' and the output's extra channel never count).
        b, h, n, d = q.shape
        wide = q.new_empty(5, b, n, h, d + 1)  # (B, N, H, D + 1) memory, the layout the kernel likes
        for i, t in enumerate((q, k, v, out, grad_out)):
            wide[i, ..., :d].copy_(t.transpose(1, 2))
        wide[..., d].zero_()
        wide[0, ..., d] = 1.0
        q1, k1, v1, out1, grad1 = wide.transpose(2, 3).unbind(0)
        dq, dk, dv = _CPU_FLASH_BACKWARD(grad1, q1, k1, v1, out1, lse, 0.0, False, attn_mask=bias, scale=scale)
        column = dk[..., d].sum(dim=1, dtype=torch.float32) / scale  # (B, N): sum over heads and queries of dS
        d_key_bias = column if ctx.needs_input_grad[3] else None
        d_mask_bias = None
        if ctx.needs_input_grad[4]:
            # dS_jj = P_jj (dO_j . v_j - dO_j . O_j), P_jj from the diagonal logit and the log-sum-exp.
            # Products in the inputs' dtype, sums in float32: no full-size float32 copies.
            logit = torch.sum(q1 * k1, dim=-1, dtype=torch.float32) * scale  # the extra channel adds 1 * 0
            if key_bias is not None:
                logit = logit + key_bias.float()[:, None, :]
            diag = torch.exp(logit - lse) * torch.sum(grad1 * (v1 - out1), dim=-1, dtype=torch.float32)
            d_mask_bias = column - diag.sum(dim=1)
        return dq[..., :d], dk[..., :d], dv[..., :d], d_key_bias, d_mask_bias, None


def _common_dtype(v: torch.Tensor) -> torch.dtype:
    # What SDPA would compute in: the autocast dtype if autocast is on (q and k can come out
    # of a float32 q/k-norm), else the values' dtype.
    device = v.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else v.dtype


def masked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    key_mask: torch.Tensor | None = None,
    key_bias: torch.Tensor | None = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """:func:`explicit_attention`'s output (up to ``exp(LOG_EPS)``) through fused SDPA kernels.

    Values and gradients (w.r.t. ``q, k, v``, ``key_mask`` and ``key_bias``) equal those of
    the explicit softmax; a dropped token's own output attends to itself and the kept tokens.

    Args:
        q, k, v: ``(B, H, N, D)``.
        scale: multiplies ``q @ k^T``.
        key_mask: ``(B, N)`` keep weights in [0, 1], possibly carrying gradient; see
            :func:`explicit_attention`.
        key_bias: ``(B, N)`` additive logit bias of each key, possibly carrying gradient.
        dropout_p: attention dropout probability (0 outside training).
    """
    dtype = _common_dtype(v)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    mask_bias = None if key_mask is None else mask_log_weight(key_mask)
    bias_grad = any(b is not None and b.requires_grad for b in (mask_bias, key_bias)) and torch.is_grad_enabled()
    if bias_grad and dropout_p == 0.0 and q.device.type == "cpu" and _CPU_FLASH_BACKWARD is not None:
        return _KeyBiasAttention.apply(q, k, v, key_bias, mask_bias, scale)
    # Elsewhere SDPA differentiates the bias itself (on CUDA its memory-efficient kernel does).
    bias = _attention_bias(key_bias, mask_bias, q.shape[-2])
    if bias is not None and q.device.type != "cpu":
        bias = bias.to(dtype)  # the CUDA kernels want the bias in the query's dtype
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p, scale=scale)


# ---- timm modules ----------------------------------------------------------------------------
def attention_forward(
    attn: Attention,
    x: torch.Tensor,
    *,
    key_mask: torch.Tensor | None = None,
    key_bias: torch.Tensor | None = None,
    need_weights: bool = False,
    need_keys: bool = False,
    explicit: bool = False,
) -> AttentionOutput:
    """Self-attention of ``x`` ``(B, N, C)`` through the parameters of a timm ``Attention``.

    Args:
        attn: the timm attention module whose weights are used.
        key_mask: ``(B, N)`` keep weights in [0, 1], possibly carrying gradient; see
            :func:`explicit_attention`.
        key_bias: ``(B, N)`` additive bias on the attention logits of each key (ToMe's
            ``log(size)``), possibly carrying gradient.
        need_weights: also return the float32 attention probabilities (computed explicitly).
        need_keys: also return the keys.
        explicit: use :func:`explicit_attention` even without ``need_weights`` (the reference
            arithmetic, slower; for tests and benchmarks).
    """
    gate = attn.gate(x).sigmoid() if attn.gate is not None else None
    q, k, v = rearrange(attn.qkv(x), "b n (three h d) -> three b h n d", three=3, h=attn.num_heads).unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    weights = None
    if need_weights or explicit:
        out, weights = explicit_attention(q, k, v, scale=attn.scale, key_mask=key_mask, key_bias=key_bias,
                                          dropout=attn.attn_drop)
    else:
        dropout_p = attn.attn_drop.p if attn.training else 0.0
        out = masked_attention(q, k, v, scale=attn.scale, key_mask=key_mask, key_bias=key_bias, dropout_p=dropout_p)
    out = attn.norm(rearrange(out, "b h n d -> b n (h d)"))
    if gate is not None:
        out = out * gate
    out = attn.proj_drop(attn.proj(out))
    return AttentionOutput(out, weights if need_weights else None, k if need_keys else None)


def masked_block(
    block: Block,
    x: torch.Tensor,
    token_mask: torch.Tensor,
    key_bias: torch.Tensor | None = None,
    *,
    explicit: bool = False,
) -> torch.Tensor:
    """One timm ``Block`` whose attention ignores tokens with ``token_mask == 0``.

    Args:
        block: the timm block; its own submodules do all the work.
        x: ``(B, N, C)`` tokens.
        token_mask: ``(B, N)`` keep weights in [0, 1], possibly carrying gradient.
        key_bias: optional ``(B, N)`` additive bias on each key's attention logit (e.g.
            ToMe's ``log(size)``), possibly carrying gradient.
        explicit: compute the softmax explicitly (the reference arithmetic; see
            :func:`attention_forward`).
    """
    a = attention_forward(block.attn, block.norm1(x), key_mask=token_mask, key_bias=key_bias, explicit=explicit).out
    x = x + block.drop_path1(block.ls1(a))
    return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))


class PackedLayout(NamedTuple):
    """Where the ``T`` real tokens of a padded batch ``(batch, length)`` sit (see :func:`packed_block`)."""

    flat: torch.Tensor  # (T,) each real token's row in the padded batch flattened to (batch * length), in order
    spread: torch.Tensor  # (batch * length,) the packed row each padded row takes: its own token, padding row 0
    batch: int
    length: int


def packed_block(block: Block, x: torch.Tensor, layout: PackedLayout, attn_mask: torch.Tensor | None) -> torch.Tensor:
    """One timm ``Block`` (with ``timm.layers.Attention``) on *packed* tokens: the real tokens of
    a padded batch, without its padding, one row each.

    The per-token layers (norms, the qkv and output projections, the MLP: nearly all the
    arithmetic) run on the ``T`` real tokens alone; only attention, which mixes the tokens of an
    image, runs on the padded layout, its queries, keys and values spread there (padding rows
    take a copy of a real row: ``attn_mask`` hides them as keys, and their outputs are dropped)
    and its output gathered back. A batch whose images keep different numbers of tokens then
    costs what its real tokens cost, not ``batch`` times its largest count.

    Args:
        block: the timm block; its own submodules do all the work.
        x: ``(T, C)`` packed tokens.
        layout: where they sit in the padded batch.
        attn_mask: ``(batch, 1, 1, length)`` bool (False: padding) or additive bias of the keys
            with ``-inf`` on padding; None: none.

    Returns:
        ``(T, C)``: the block's output for each real token, as the padded batch would give it.
    """
    attn = block.attn
    h = block.norm1(x)
    gate = attn.gate(h).sigmoid() if attn.gate is not None else None
    qkv = attn.qkv(h).index_select(0, layout.spread)
    q, k, v = qkv.view(layout.batch, layout.length, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    dropout_p = attn.attn_drop.p if attn.training else 0.0
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, scale=attn.scale)
    out = out.transpose(1, 2).reshape(layout.batch * layout.length, -1).index_select(0, layout.flat)
    out = attn.norm(out)
    if gate is not None:
        out = out * gate
    x = x + block.drop_path1(block.ls1(attn.proj_drop(attn.proj(out))))
    return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))
