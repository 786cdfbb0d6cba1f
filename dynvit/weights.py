"""Load local weight files into (patched or plain) timm ViTs, with errors that name keys."""
from __future__ import annotations

import logging
import os

import torch
from timm.models import eva, load_state_dict, vision_transformer
from torch import nn

__all__ = ["load_weights", "WeightMismatchError"]

_log = logging.getLogger(__name__)
_HEAD_KEYS = ("head.weight", "head.bias", "head_dist.weight", "head_dist.bias")
_OPTIONAL_PREFIXES = ("predictors.", "keep_threshold")  # a dense checkpoint has no predictors: they start fresh


class WeightMismatchError(ValueError):
    """A weight file does not fit the model it is loaded into."""


def _listing(keys, limit: int = 8) -> str:
    keys = sorted(keys)
    more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def _strip_wrapper_prefix(state_dict: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    # A state dict saved from dynvit.TrainingModel (or any wrapper with a `model` attribute).
    own = model.state_dict()
    if state_dict and not any(k in own for k in state_dict) and all(k.startswith("model.") for k in state_dict):
        return {k[len("model.") :]: v for k, v in state_dict.items()}
    return state_dict


def load_weights(model: nn.Module, path: str | os.PathLike, *, use_ema: bool = True) -> nn.Module:
    """Load a checkpoint into ``model`` in place and return it.

    Accepts timm-style checkpoints (``.pth``/``.pt``/``.bin`` holding a state dict or a dict
    with ``state_dict``/``model``/``state_dict_ema``), ``.safetensors`` files and folders
    written by :func:`dynvit.save_pretrained` (a path, ``local-dir:DIR`` or
    ``hf-hub:org/name``), dense or with dynvit predictors. As timm does for pretrained weights, the position embedding and
    patch embedding are resampled to the model's grid, and a classifier whose class count
    differs is left freshly initialised (logged), so a checkpoint can be fine-tuned on a new
    label set. Predictor weights absent from a dense checkpoint start from their init.

    Raises:
        FileNotFoundError: no file or folder at ``path``.
        WeightMismatchError: keys missing from or unexpected in the file, or tensors whose
            shapes do not fit; the message names them.
    """
    path = os.fspath(path)
    if path.startswith(("hf-hub:", "local-dir:")) or os.path.isdir(path):
        from .hub import load_state, resolve

        state_dict = load_state(resolve(path)[0])
    elif not os.path.isfile(path):
        raise FileNotFoundError(f"weight file {path!r} not found; pass a .pth/.safetensors file, a folder written by "
                                "dynvit.save_pretrained, local-dir:DIR or hf-hub:org/name")
    else:
        state_dict = load_state_dict(path, use_ema=use_ema)
    state_dict = _strip_wrapper_prefix(state_dict, model)
    if isinstance(model, eva.Eva):  # Eva's own key names and conversions (EVA, PE, DINOv3 checkpoints)
        state_dict = eva.checkpoint_filter_fn(state_dict, model)
    else:
        state_dict = vision_transformer.checkpoint_filter_fn(state_dict, model, adapt_layer_scale=True)
    own = model.state_dict()

    for key in _HEAD_KEYS:
        if key in state_dict and key in own and state_dict[key].shape != own[key].shape:
            _log.info("%s: checkpoint shape %s, model %s; the head is reset", key, tuple(state_dict[key].shape), tuple(own[key].shape))
            del state_dict[key]
    reset = {k for k in _HEAD_KEYS if k in own and k not in state_dict}

    missing = {k for k in own if k not in state_dict and k not in reset and not k.startswith(_OPTIONAL_PREFIXES)}
    unexpected = {k for k in state_dict if k not in own}
    wrong_shape = {
        f"{k} (file {tuple(state_dict[k].shape)}, model {tuple(own[k].shape)})"
        for k in state_dict
        if k in own and state_dict[k].shape != own[k].shape
    }
    if missing or unexpected or wrong_shape:
        parts = []
        if missing:
            parts.append(f"missing from the file: {_listing(missing)}")
        if unexpected:
            parts.append(f"not in the model: {_listing(unexpected)}")
        if wrong_shape:
            parts.append(f"shape mismatch: {_listing(wrong_shape)}")
        raise WeightMismatchError(
            f"weights in {path!r} do not fit {type(model).__name__}: " + "; ".join(parts)
            + ". Check that the model name and its options (embed_dim, depth, num_heads, reg_tokens, prune_loc) match "
            "the ones the checkpoint was trained with."
        )
    model.load_state_dict(state_dict, strict=False)
    loaded_predictors = any(k.startswith("predictors.") for k in state_dict)
    _log.info("loaded %d tensors from %s%s", len(state_dict), path, "" if loaded_predictors else " (no predictor weights)")
    return model
