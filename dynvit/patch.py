"""Turn a timm ViT into a token-pruning one, in place.

Each supported timm model class belongs to a *family*: the mixin that implements the pruning
passes for it (:class:`dynvit.model.DynViTMixin` for ``VisionTransformer``,
:class:`dynvit.families.eva.EvaMixin` for ``Eva``) and the check that refuses, by name, what
that mixin does not reproduce. The family is chosen once, here.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence

import timm
import torch
from timm.models.eva import Eva
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from .families.eva import EvaMixin, check_eva
from .families.vit import check_vit
from .model import DynViTMixin
from .predictor import TokenPredictor, check_signals
from .ratios import DROPPED_TOKENS, check_prune_mode, normalize_keep_ratio, normalize_prune_loc

__all__ = ["patch", "build_model", "is_patched"]

_log = logging.getLogger(__name__)
_PATCHED_CLASSES: dict[type, type] = {}
# (timm class, mixin, check); subclasses of a timm class belong to its family.
_FAMILIES = (
    (VisionTransformer, DynViTMixin, check_vit),
    (Eva, EvaMixin, check_eva),
)


def is_patched(model: nn.Module) -> bool:
    return isinstance(model, DynViTMixin)


def _patched_class(cls: type, mixin: type) -> type:
    if cls not in _PATCHED_CLASSES:
        _PATCHED_CLASSES[cls] = type(f"DynViT{cls.__name__}", (mixin, cls), {"__module__": cls.__module__})
    return _PATCHED_CLASSES[cls]


def _family(model: nn.Module) -> type:
    """The mixin for ``model``, after its family's check has accepted it."""
    if is_patched(model):
        raise RuntimeError("this model is already patched by dynvit; patch the original timm model once")
    for cls, mixin, check in _FAMILIES:
        if isinstance(model, cls):
            check(model)
            return mixin
    raise NotImplementedError(
        f"dynvit patches timm's VisionTransformer (ViT, DeiT, DeiT-III, registers, SigLIP, hybrids) and Eva (RoPE ViTs, "
        f"EVA-02, Perception Encoder, DINOv3) families; got {type(model).__qualname__}"
    )


def patch(
    model: nn.Module,
    *,
    prune_loc: Sequence[int] | int = (3, 6, 9),
    keep_ratio: float | Sequence[float] = 0.7,
    prune_mode: str = "threshold",
    sampler: str = "gumbel",
    predictor_hidden_ratio: float = 1.0,
    dropped_tokens: str = "discard",
    predictor_prior: str = "none",
    match_scale: float = 8.0,
    predictor_signals: Sequence[str] = (),
) -> nn.Module:
    """Patch a timm VisionTransformer in place so that it learns to drop patch tokens.

    State-dict keys stay timm's, plus ``predictors.{stage}.*``. The model keeps its mode,
    device and dtype.

    Args:
        model: a timm ``VisionTransformer`` (DeiT, distilled DeiT, ViT, registers, LayerScale,
            q/k-norm, attention pooling, parallel blocks, hybrid CNN stems; any image or patch
            size; any depth) or ``Eva`` (RoPE ViTs, EVA-02, Perception Encoder, DINOv3).
        prune_loc: block indices before which tokens are pruned (strictly increasing).
        keep_ratio: a float ``r`` (kept fraction after stage ``s`` is ``r ** (s + 1)``) or one
            cumulative fraction per stage (non-increasing), all in (0, 1].
        prune_mode: eval-mode pruning, ``threshold``, ``topk`` or ``none``.
        sampler: training-time mask sampler, ``gumbel``, ``deterministic`` or ``soft``.
        predictor_hidden_ratio: predictor width as a multiple of the embedding width.
        dropped_tokens: ``discard`` (DynamicViT) or ``merge``: each dropped token is averaged
            into the kept token most similar to it, and attention weighs tokens by size
            (:mod:`dynvit.merge`).
        predictor_prior: ``none`` (DynamicViT's predictor) or ``match``: the keep logit also
            ranks tokens by how much they repeat another (ToMe's bipartite criterion, see
            :class:`~dynvit.predictor.TokenPredictor`); meant with ``dropped_tokens="merge"``.
        match_scale: the match prior's initial weight (keep logit per unit of cosine
            similarity; learned). The larger it is, the less the learned MLP can overrule it.
        predictor_signals: what else the predictors read, with learned weights
            (:mod:`dynvit.signals`): ``attention`` (the class token's attention in the block
            the stage feeds; timm ``Block``/``ResPostBlock`` with ``Attention``), ``redundancy``
            (similarity to the closest token ranked ahead) and ``size`` (patches merged into a
            token).

    Returns:
        The same model object, now an instance of a dynvit subclass of its class.

    Raises:
        RuntimeError: if the model is already patched.
        NotImplementedError: for a model or part the pruning paths do not handle.
        ValueError: for bad ``prune_loc``, ``keep_ratio``, ``prune_mode`` or ``sampler``.
    """
    mixin = _family(model)
    loc = normalize_prune_loc(prune_loc, len(model.blocks))
    ratios = normalize_keep_ratio(keep_ratio, len(loc))
    check_prune_mode(prune_mode)
    if dropped_tokens not in DROPPED_TOKENS:
        raise ValueError(f"dropped_tokens must be one of {DROPPED_TOKENS}, got {dropped_tokens!r}")
    signals = check_signals(predictor_signals)
    if "attention" in signals:
        mixin.check_class_attention(model, loc)
    ref = next(model.parameters())
    predictors = nn.ModuleList()
    for s in range(len(loc)):
        prev = ratios[s - 1] if s else 1.0
        predictors.append(
            TokenPredictor(model.embed_dim, hidden_ratio=predictor_hidden_ratio, init_keep_prob=ratios[s] / prev,
                           prior=predictor_prior, match_scale=match_scale, signals=signals)
        )
    predictors.to(device=ref.device, dtype=ref.dtype).train(model.training)

    model.__class__ = _patched_class(type(model), mixin)
    model.predictors = predictors
    # Threshold mode keeps a token where its logit is above its stage's threshold; 0 is keep
    # probability > 0.5, dynvit.calibrate sets a budget. A buffer, so it is saved and exported.
    model.register_buffer("keep_threshold", torch.zeros(len(loc), device=ref.device))
    model.prune_loc = loc
    model.predictor_hidden_ratio = predictor_hidden_ratio
    model.predictor_prior = predictor_prior
    model.predictor_signals = signals
    model.keep_ratio = ratios
    model.prune_mode = prune_mode
    model.sampler = sampler
    model.dropped_tokens = dropped_tokens
    _log.info("patched %s: prune_loc=%s keep_ratio=%s", type(model).__name__, loc, tuple(round(r, 4) for r in ratios))
    return model


def build_model(
    name: str,
    *,
    prune_loc: Sequence[int] | int = (3, 6, 9),
    keep_ratio: float | Sequence[float] = 0.7,
    pretrained: bool = False,
    pretrained_path: str | None = None,
    prune_mode: str = "threshold",
    sampler: str = "gumbel",
    predictor_hidden_ratio: float = 1.0,
    dropped_tokens: str = "discard",
    predictor_prior: str = "none",
    match_scale: float = 8.0,
    predictor_signals: Sequence[str] = (),
    **timm_kwargs,
) -> nn.Module:
    """Create a timm model by name and patch it.

    Args:
        name: timm model name, e.g. ``deit_small_patch16_224``.
        prune_loc, keep_ratio, prune_mode, sampler, predictor_hidden_ratio, dropped_tokens,
            predictor_prior, match_scale, predictor_signals: see
            :func:`patch`.
        pretrained: load timm's pretrained weights (from the hub; needs network access).
        pretrained_path: load a local weight file instead (timm or dynvit checkpoint,
            ``.pth``/``.pt``/``.bin``/``.safetensors``); the position embedding is resampled
            and the head reset when the image or class count differs.
        **timm_kwargs: passed to ``timm.create_model`` (``num_classes``, ``img_size``,
            ``drop_path_rate``, ``dynamic_img_size``, ...).
    """
    from .weights import load_weights

    if pretrained and pretrained_path:
        raise ValueError("give either pretrained=True (hub weights) or pretrained_path (a local file), not both")
    model = timm.create_model(name, pretrained=pretrained, **timm_kwargs)
    patch(
        model,
        prune_loc=prune_loc,
        keep_ratio=keep_ratio,
        prune_mode=prune_mode,
        sampler=sampler,
        predictor_hidden_ratio=predictor_hidden_ratio,
        dropped_tokens=dropped_tokens,
        predictor_prior=predictor_prior,
        match_scale=match_scale,
        predictor_signals=predictor_signals,
    )
    model.dynvit_meta = {"model_name": name, "timm_kwargs": dict(timm_kwargs)}
    if pretrained_path:
        load_weights(model, pretrained_path)
    return model
