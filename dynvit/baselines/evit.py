"""EViT: keep the patch tokens the class token attends to, fuse the rest into one token.

Liang et al., "Not All Patches are What You Need: Expediting Vision Transformers via Token
Reorganizations", ICLR 2022. Written from the paper.

In each block of ``prune_loc`` the attention runs on all tokens; then the patch tokens are
ranked by the class token's attention (averaged over heads), the ``k`` most attended are
kept in their order and the others are fused into one token, their attention-weighted
average, appended after the kept ones. The block's MLP and all later blocks run on the
reduced sequence. Prefix tokens (class, distillation, registers) are never dropped; a fused
token of an earlier stage is ranked, kept or fused again like any other patch token.

Token counts: with ``N0`` patch tokens entering the first block, stage ``s`` keeps
``k_s = num_kept(keep_ratio[s], N0)`` patch tokens **plus the fused token**, so the blocks
after stage ``s`` see ``num_prefix_tokens + k_s + 1`` tokens. A stage with ``k_s`` at least
the current patch count does nothing (no fused token), so ``keep_ratio=1.0`` is the dense
model.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from timm.models.vision_transformer import Block, VisionTransformer

from ..attention import attention_forward
from ..ratios import normalize_keep_ratio, normalize_prune_loc
from ..tokens import batch_gather, topk_indices
from .common import check_forward_args, check_vit, embed, swap_class, stage_budget

__all__ = ["patch_evit", "fuse_inattentive", "evit_block", "EViTMixin"]

_log = logging.getLogger(__name__)


def fuse_inattentive(patches: torch.Tensor, cls_attn: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the ``k`` most attended patch tokens and fuse the others into one.

    Args:
        patches: ``(B, N, C)`` patch tokens (no prefix tokens).
        cls_attn: ``(B, N)`` non-negative attention of the class token to each patch token.
        k: tokens to keep, ``1 <= k < N``.

    Returns:
        ``(B, k + 1, C)``: the kept tokens in their original order, then the fused token
        ``sum_j a_j x_j / sum_j a_j`` over the dropped tokens ``j``.
    """
    keep = topk_indices(cls_attn, k)
    kept = batch_gather(patches, keep)
    weight = cls_attn.float().scatter(1, keep, 0.0)  # kept tokens weigh 0 in the fusion
    total = weight.sum(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    fused = torch.einsum("bn,bnc->bc", weight / total, patches.float()).unsqueeze(1)
    return torch.cat([kept, fused.to(patches.dtype)], dim=1)


def evit_block(block: Block, x: torch.Tensor, k: int, num_prefix_tokens: int) -> torch.Tensor:
    """One timm ``Block`` that reorganises tokens between its attention and its MLP.

    Args:
        block: the timm block; its own submodules do all the work.
        x: ``(B, P + N, C)`` tokens, the ``P = num_prefix_tokens`` prefix tokens first and
            the class token at position 0.
        k: patch tokens to keep, ``1 <= k < N``.
        num_prefix_tokens: prefix tokens, never dropped.
    """
    p = num_prefix_tokens
    a = attention_forward(block.attn, block.norm1(x), need_weights=True)
    x = x + block.drop_path1(block.ls1(a.out))
    cls_attn = a.weights[:, :, 0, p:].mean(dim=1)  # (B, N), before attention dropout
    x = torch.cat([x[:, :p], fuse_inattentive(x[:, p:], cls_attn, k)], dim=1)
    return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))


class EViTMixin:
    """EViT token reorganisation (keep attentive tokens, fuse the inattentive ones).

    Modifications:
        - ``forward_features`` runs the blocks one by one; each block in ``prune_loc`` keeps
          the patch tokens most attended by the class token and fuses the rest into one
          token after its attention (:func:`evit_block`). Other blocks are timm's own.
        - ``forward_head`` is timm's: class-token pooling reads the class token; average
          pooling averages the remaining patch tokens, the fused one counted once.
    """

    prune_loc: tuple[int, ...]
    keep_ratio: tuple[float, ...]

    def forward_features(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False
    ) -> torch.Tensor:
        check_forward_args(attn_mask, is_causal)
        x = embed(self, x)
        p = self.num_prefix_tokens
        kept = stage_budget(self, x)
        for i, block in enumerate(self.blocks):
            k = kept.get(i)
            # Shape arithmetic only (ints while tracing), so the control flow traces.
            if k is None or k >= x.shape[1] - p:
                x = block(x)
            else:
                x = evit_block(block, x, k, p)
        return self.norm(x)


def patch_evit(
    model: VisionTransformer,
    *,
    prune_loc: Sequence[int] | int = (3, 6, 9),
    keep_ratio: float | Sequence[float] = 0.7,
) -> VisionTransformer:
    """Patch a timm VisionTransformer in place to reduce tokens as EViT does.

    Parameters and state-dict keys are unchanged (EViT adds none), so the model can be
    evaluated off the shelf or fine-tuned.

    Args:
        model: a timm ``VisionTransformer`` with a class token (ViT, DeiT, distilled DeiT,
            registers, LayerScale, q/k-norm), ``global_pool`` ``'token'`` or ``'avg'``.
        prune_loc: indices of the blocks that reorganise tokens after their attention.
        keep_ratio: a float ``r`` (cumulative kept fraction ``r ** (s + 1)`` after stage
            ``s``) or one cumulative fraction per stage. The fused token comes on top.

    Returns:
        The same model, with ``token_reduction = "evit"``, ``prune_loc`` and ``keep_ratio``.

    Raises:
        RuntimeError: if the model is already patched.
        NotImplementedError: without a class token, or for unsupported blocks or pooling.
        ValueError: for bad ``prune_loc`` or ``keep_ratio``.
    """
    check_vit(model, "EViT", need_class_token=True)
    loc = normalize_prune_loc(prune_loc, len(model.blocks))
    ratios = normalize_keep_ratio(keep_ratio, len(loc))
    swap_class(model, EViTMixin)
    model.token_reduction = "evit"
    model.prune_loc = loc
    model.keep_ratio = ratios
    _log.info("EViT on %s: prune_loc=%s keep_ratio=%s", type(model).__name__, loc, tuple(round(r, 4) for r in ratios))
    return model
