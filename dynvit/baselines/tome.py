"""ToMe: merge similar tokens instead of dropping them.

Bolya et al., "Token Merging: Your ViT but Faster", ICLR 2023. Written from the paper.

In each block, between the attention and the MLP, ``r`` patch tokens are merged away by
bipartite soft matching: the patch tokens are split alternately into sets A and B, every A
token finds its most similar B token (cosine similarity of the attention keys, averaged
over heads), and the ``r`` A tokens with the most similar matches are averaged into them,
weighted by token size (how many input patches a token stands for). Later attention is
proportional: ``log(size)`` is added to each key's logit, so a merged token weighs as much
as the tokens it replaced. Prefix tokens (class, distillation, registers) never merge.

The tensor functions (:func:`bipartite_soft_matching`, :func:`merge_wavg`,
:func:`merge_tokens`) are pure; :class:`ToMeMixin` wires them into timm's blocks.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block, VisionTransformer

from ..attention import attention_forward
from ..tokens import batch_gather
from .common import check_forward_args, check_vit, embed, swap_class

__all__ = [
    "Matching",
    "bipartite_soft_matching",
    "merge_wavg",
    "merge_tokens",
    "tome_block",
    "normalize_tome_r",
    "patch_tome",
    "ToMeMixin",
]

_log = logging.getLogger(__name__)


@dataclass
class Matching:
    """Which tokens merge where. Set A is patch positions ``0, 2, 4, ...``, set B ``1, 3, ...``."""

    unmerged: torch.Tensor  # (B, Na - r) positions in A of the tokens left as they are, ascending
    src: torch.Tensor  # (B, r) positions in A of the tokens merged away
    dst: torch.Tensor  # (B, r) positions in B each of them merges into


def bipartite_soft_matching(metric: torch.Tensor, r: int) -> Matching:
    """Choose the ``r`` most similar (A, B) pairs, at most one per A token.

    Args:
        metric: ``(B, N, D)`` features of the patch tokens (ToMe uses the keys); compared
            by cosine similarity.
        r: tokens to merge away, ``0 <= r <= N // 2``.
    """
    if not 0 <= r <= metric.shape[1] // 2:
        raise ValueError(f"r must be in [0, N // 2] = [0, {metric.shape[1] // 2}], got {r}")
    with torch.no_grad():  # the choice is discrete; gradients flow through the merge
        metric = F.normalize(metric.float(), dim=-1)
        scores = metric[:, ::2] @ metric[:, 1::2].transpose(1, 2)  # (B, Na, Nb)
        best, best_dst = scores.max(dim=-1)
        order = best.argsort(dim=-1, descending=True)
        src = order[:, :r]
        unmerged = order[:, r:].sort(dim=-1).values
        dst = best_dst.gather(1, src)
    return Matching(unmerged, src, dst)


def merge_wavg(x: torch.Tensor, size: torch.Tensor, matching: Matching) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge patch tokens as ``matching`` says, averaging them weighted by size.

    ``sum(size * x)`` over tokens and ``sum(size)`` are preserved.

    Args:
        x: ``(B, N, C)`` patch tokens.
        size: ``(B, N)`` float sizes.
        matching: from :func:`bipartite_soft_matching` on the same tokens.

    Returns:
        ``x`` ``(B, N - r, C)``: the unmerged A tokens, then all B tokens; and their sizes.
    """
    dtype = torch.promote_types(x.dtype, torch.float32)  # low-precision sums would drift
    weighted = x.to(dtype) * size.to(dtype).unsqueeze(-1)
    a, b = weighted[:, ::2], weighted[:, 1::2]
    size_a, size_b = size[:, ::2], size[:, 1::2]
    dst = matching.dst.unsqueeze(-1).expand(-1, -1, x.shape[-1])
    b = b.scatter_add(1, dst, batch_gather(a, matching.src))
    size_b = size_b.scatter_add(1, matching.dst, batch_gather(size_a, matching.src))
    size = torch.cat([batch_gather(size_a, matching.unmerged), size_b], dim=1)
    merged = torch.cat([batch_gather(a, matching.unmerged), b], dim=1) / size.unsqueeze(-1)
    return merged.to(x.dtype), size


def merge_tokens(
    x: torch.Tensor, size: torch.Tensor, metric: torch.Tensor, r: int, num_prefix_tokens: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge ``r`` patch tokens of a full sequence; the prefix tokens pass through untouched.

    Args:
        x: ``(B, P + N, C)`` tokens, the ``P = num_prefix_tokens`` prefix tokens first.
        size: ``(B, N)`` sizes of the patch tokens.
        metric: ``(B, N, D)`` similarity features of the patch tokens.
        r: tokens to merge away, ``0 <= r <= N // 2``.
        num_prefix_tokens: prefix tokens, never merged.

    Returns:
        ``x`` ``(B, P + N - r, C)`` and patch sizes ``(B, N - r)``.
    """
    p = num_prefix_tokens
    patches, size = merge_wavg(x[:, p:], size, bipartite_soft_matching(metric, r))
    return torch.cat([x[:, :p], patches], dim=1), size


def tome_block(
    block: Block, x: torch.Tensor, size: torch.Tensor | None, r: int, num_prefix_tokens: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One timm ``Block`` with proportional attention and merging between attention and MLP.

    Args:
        block: the timm block; its own submodules do all the work.
        x: ``(B, P + N, C)`` tokens, prefix tokens first.
        size: ``(B, N)`` patch-token sizes, or ``None`` while every token has size 1.
        r: tokens to merge away; capped at ``N // 2``.
        num_prefix_tokens: prefix tokens (size 1, never merged).

    Returns:
        The tokens after the block and their patch-token sizes.
    """
    p = num_prefix_tokens
    n = x.shape[1] - p
    r = min(r, n // 2)
    # Prefix tokens have size 1: log(1) = 0.
    key_bias = None if size is None else F.pad(size.log(), (p, 0))
    a = attention_forward(block.attn, block.norm1(x), key_bias=key_bias, need_keys=r > 0)
    x = x + block.drop_path1(block.ls1(a.out))
    if r > 0:
        if size is None:
            size = x.new_ones(x.shape[0], n, dtype=torch.float32)
        metric = a.keys[:, :, p:].mean(dim=1)  # (B, N, D), keys averaged over heads
        x, size = merge_tokens(x, size, metric, r, p)
    x = x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))
    return x, size


def normalize_tome_r(r: int | Sequence[int], depth: int) -> tuple[int, ...]:
    """Tokens merged in each block: an int for every block, or one non-negative int per block."""
    if isinstance(r, int) and not isinstance(r, bool):
        per_block = (r,) * depth
    else:
        try:
            per_block = tuple(r)
        except TypeError:
            raise ValueError(f"r must be an int or a sequence of ints, got {r!r}") from None
        if len(per_block) != depth:
            raise ValueError(f"r has {len(per_block)} values but the model has {depth} blocks; give one per block or an int")
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in per_block):
        raise ValueError(f"r values must be non-negative ints, got {per_block!r}")
    return per_block


class ToMeMixin:
    """ToMe token merging with proportional attention.

    Modifications:
        - ``forward_features`` runs the blocks one by one; from the first block that merges
          on, each block uses proportional attention and merges ``tome_r[i]`` patch tokens
          between its attention and its MLP (:func:`tome_block`). Blocks before that are
          timm's own, called as they are, so ``r=0`` is exactly the dense model.
        - ``forward`` pools size-weighted when ``global_pool == 'avg'`` (a merged token
          stands for ``size`` patches); with ``'token'`` it is timm's ``forward_head``.
          ``forward_head`` itself is timm's and averages unweighted.
    """

    tome_r: tuple[int, ...]

    def forward_tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Final-normed tokens ``(B, P + N', C)`` and patch sizes ``(B, N')`` (``None`` if unmerged)."""
        x = embed(self, x)
        p = self.num_prefix_tokens
        size = None
        for block, r in zip(self.blocks, self.tome_r):
            # Shape arithmetic only (ints while tracing), so the control flow traces.
            if size is None and min(r, (x.shape[1] - p) // 2) == 0:
                x = block(x)
            else:
                x, size = tome_block(block, x, size, r, p)
        return self.norm(x), size

    def forward_features(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False
    ) -> torch.Tensor:
        check_forward_args(attn_mask, is_causal)
        return self.forward_tokens(x)[0]

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False):
        check_forward_args(attn_mask, is_causal)
        x, size = self.forward_tokens(x)
        if self.global_pool != "avg" or size is None:
            return self.forward_head(x)
        weight = (size / size.sum(dim=1, keepdim=True)).to(x.dtype)
        x = torch.einsum("bn,bnc->bc", weight, x[:, self.num_prefix_tokens :])
        return self.head(self.head_drop(self.fc_norm(x)))


def patch_tome(model: VisionTransformer, *, r: int | Sequence[int]) -> VisionTransformer:
    """Patch a timm VisionTransformer in place to merge tokens as ToMe does.

    Args:
        model: a timm ``VisionTransformer`` (ViT, DeiT, distilled DeiT, registers,
            LayerScale, q/k-norm, with or without class token), ``global_pool`` ``'token'``
            or ``'avg'``.
        r: patch tokens merged away in every block, or one value per block (use zeros to
            merge only in a range of blocks). Each block merges at most half its patch
            tokens. ``r=0`` is the dense model.

    Returns:
        The same model, with ``token_reduction = "tome"`` and ``tome_r`` (one int per block).

    Raises:
        RuntimeError: if the model is already patched.
        NotImplementedError: for unsupported blocks or pooling.
        ValueError: for a bad ``r``.
    """
    check_vit(model, "ToMe")
    per_block = normalize_tome_r(r, len(model.blocks))
    swap_class(model, ToMeMixin)
    model.token_reduction = "tome"
    model.tome_r = per_block
    _log.info("ToMe on %s: r=%s", type(model).__name__, per_block)
    return model
