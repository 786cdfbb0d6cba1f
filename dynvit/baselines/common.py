"""What the three baselines share: checks on the timm model, the class swap and the embedding.

Every baseline patches a live timm ``VisionTransformer`` in place, ToMe style: the model's
class becomes a dynamic subclass (one per base class and method, cached) whose
``forward_features`` runs timm's own embedding, blocks and final norm, reducing tokens on
the way. ``forward_head`` stays timm's, so the logits are computed exactly as timm does.
"""
from __future__ import annotations

import torch
from torch import nn
from timm.models.vision_transformer import VisionTransformer

from ..attention import check_block
from ..tokens import num_kept

__all__ = ["check_vit", "swap_class", "embed", "check_forward_args"]

_PATCHED_CLASSES: dict[tuple[type, type], type] = {}


def check_vit(model: nn.Module, method: str, *, need_class_token: bool = False) -> None:
    """Refuse models a baseline cannot reproduce exactly, once, at patch time.

    Args:
        model: the model about to be patched.
        method: the baseline's name, for messages.
        need_class_token: the method reads the class token's attention (EViT).

    Raises:
        RuntimeError: if the model is already patched (by a baseline or by ``dynvit.patch``).
        NotImplementedError: for anything else the baselines do not handle.
    """
    if getattr(model, "token_reduction", None) is not None or hasattr(model, "prune_loc"):
        reduction = getattr(model, "token_reduction", None) or "dynvit"
        raise RuntimeError(f"this model is already patched ({reduction}); patch the original timm model once")
    if not isinstance(model, VisionTransformer):
        raise NotImplementedError(f"{method} patches timm's VisionTransformer family; got {type(model).__qualname__}")
    if model.attn_pool is not None or model.global_pool not in ("token", "avg"):
        raise NotImplementedError(
            f"{method}: global_pool={model.global_pool!r} is not supported; use 'token' or 'avg' "
            "(attention pooling and unpooled outputs would need the dropped tokens)"
        )
    if model.global_pool == "avg" and model.pool_include_prefix:
        raise NotImplementedError(f"{method}: average pooling that includes the prefix tokens is not supported")
    if not isinstance(model.patch_drop, nn.Identity):
        raise NotImplementedError(f"{method}: patch_drop_rate > 0 (PatchDropout) drops tokens on its own; set it to 0")
    if need_class_token and not model.has_class_token:
        raise NotImplementedError(f"{method} ranks tokens by the class token's attention; this model has no class token")
    for i, block in enumerate(model.blocks):
        check_block(block, i)


def swap_class(model: nn.Module, mixin: type) -> None:
    """Make ``model`` an instance of ``(mixin, type(model))``, created once per base class."""
    base = type(model)
    key = (mixin, base)
    if key not in _PATCHED_CLASSES:
        name = mixin.__name__.removesuffix("Mixin") + base.__name__
        _PATCHED_CLASSES[key] = type(name, (mixin, base), {"__module__": mixin.__module__, "__doc__": mixin.__doc__})
    model.__class__ = _PATCHED_CLASSES[key]


def embed(model: VisionTransformer, x: torch.Tensor) -> torch.Tensor:
    """Images to the token sequence the first block sees, through timm's own modules."""
    x = model.patch_embed(x)
    x = model._pos_embed(x)
    x = model.patch_drop(x)
    return model.norm_pre(x)


def stage_budget(model: VisionTransformer, x: torch.Tensor) -> dict[int, int]:
    """Patch tokens kept from each block of ``model.prune_loc`` on, from the patch-token count
    of the embedded sequence ``x`` (dynvit's top-k counts, so methods compare at equal tokens)."""
    n0 = x.shape[1] - model.num_prefix_tokens
    return {i: num_kept(r, n0) for i, r in zip(model.prune_loc, model.keep_ratio)}


def check_forward_args(attn_mask: torch.Tensor | None, is_causal: bool) -> None:
    """timm's ``forward_features`` takes an attention mask; token reduction cannot honour one."""
    if attn_mask is not None or is_causal:
        raise NotImplementedError("token-reduction baselines do not support attn_mask or is_causal")
