"""Random token dropping: the floor any learned pruning has to beat.

Before each block of ``prune_loc`` the model keeps ``k_s = num_kept(keep_ratio[s], N0)``
patch tokens chosen uniformly at random per image (``N0`` = patch tokens entering the first
block), so the token counts are exactly those of dynvit's top-k pruning at the same
settings. Prefix tokens are always kept; kept tokens stay in their order.

Randomness: in eval mode every forward draws from a ``torch.Generator`` freshly seeded with
``model.random_seed``, so evaluation is reproducible (the same batch always gives the same
logits). In train mode the drops come from torch's global generator, like dropout, so each
step sees new drops and ``torch.manual_seed`` (or accelerate's ``set_seed``) controls them.
A ``torch.jit.trace`` of the model (what fvcore counts FLOPs on) has the right shapes and
FLOPs but does not replay the seeded draws.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from timm.models.vision_transformer import VisionTransformer

from ..ratios import normalize_keep_ratio, normalize_prune_loc
from ..tokens import batch_gather, topk_indices
from .common import check_forward_args, check_vit, embed, swap_class, stage_budget

__all__ = ["patch_random", "keep_random", "RandomDropMixin"]

_log = logging.getLogger(__name__)


def keep_random(
    x: torch.Tensor, k: int, num_prefix_tokens: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Keep the prefix tokens and ``k`` patch tokens drawn uniformly without replacement.

    Args:
        x: ``(B, P + N, C)`` tokens, the ``P = num_prefix_tokens`` prefix tokens first.
        k: patch tokens to keep per image, ``1 <= k <= N``.
        num_prefix_tokens: prefix tokens, always kept.
        generator: random source on ``x.device``; ``None`` uses torch's global one.

    Returns:
        ``(B, P + k, C)``.
    """
    p = num_prefix_tokens
    scores = torch.rand(x.shape[0], x.shape[1] - p, generator=generator, device=x.device)
    keep = topk_indices(scores, k)  # the k largest of i.i.d. uniforms: a uniform k-subset
    return torch.cat([x[:, :p], batch_gather(x[:, p:], keep)], dim=1)


class RandomDropMixin:
    """Random token dropping at dynvit's stages and kept counts.

    Modifications:
        - ``forward_features`` runs the blocks one by one; before each block in
          ``prune_loc`` it keeps a random subset of the patch tokens (:func:`keep_random`).
          The blocks themselves are timm's, called as they are.
        - In eval mode the drops are drawn from a generator seeded with ``random_seed`` at
          every forward (reproducible); in train mode from torch's global generator.
    """

    prune_loc: tuple[int, ...]
    keep_ratio: tuple[float, ...]
    random_seed: int

    def forward_features(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False
    ) -> torch.Tensor:
        check_forward_args(attn_mask, is_causal)
        x = embed(self, x)
        p = self.num_prefix_tokens
        kept = stage_budget(self, x)
        generator = None
        if not self.training:
            generator = torch.Generator(device=x.device)
            generator.manual_seed(self.random_seed)
        for i, block in enumerate(self.blocks):
            k = kept.get(i)
            if k is not None and k < x.shape[1] - p:
                x = keep_random(x, k, p, generator)
            x = block(x)
        return self.norm(x)


def patch_random(
    model: VisionTransformer,
    *,
    prune_loc: Sequence[int] | int = (3, 6, 9),
    keep_ratio: float | Sequence[float] = 0.7,
    seed: int = 0,
) -> VisionTransformer:
    """Patch a timm VisionTransformer in place to drop patch tokens at random.

    Args:
        model: a timm ``VisionTransformer`` (ViT, DeiT, distilled DeiT, registers,
            LayerScale, q/k-norm, with or without class token), ``global_pool`` ``'token'``
            or ``'avg'``.
        prune_loc: block indices before which tokens are dropped.
        keep_ratio: a float ``r`` (cumulative kept fraction ``r ** (s + 1)`` after stage
            ``s``) or one cumulative fraction per stage.
        seed: seed of the eval-mode generator.

    Returns:
        The same model, with ``token_reduction = "random"``, ``prune_loc``, ``keep_ratio``
        and ``random_seed``.

    Raises:
        RuntimeError: if the model is already patched.
        NotImplementedError: for unsupported blocks or pooling.
        ValueError: for bad ``prune_loc`` or ``keep_ratio``.
    """
    check_vit(model, "random dropping")
    loc = normalize_prune_loc(prune_loc, len(model.blocks))
    ratios = normalize_keep_ratio(keep_ratio, len(loc))
    swap_class(model, RandomDropMixin)
    model.token_reduction = "random"
    model.prune_loc = loc
    model.keep_ratio = ratios
    model.random_seed = int(seed)
    _log.info("random dropping on %s: prune_loc=%s keep_ratio=%s seed=%d", type(model).__name__, loc,
              tuple(round(r, 4) for r in ratios), seed)
    return model
