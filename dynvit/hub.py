"""Save a trained model as ``model.safetensors`` + ``config.json`` and rebuild it exactly.

The JSON holds what it takes to rebuild the module (timm name and kwargs, the dynvit
settings) and to feed it (classes, input size, mean, std). A dense timm model (no dynvit
patch) is saved the same way, with ``"dynvit": null``.
"""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence

import timm
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .weights import WeightMismatchError

__all__ = ["save_pretrained", "load_pretrained", "weights_file", "CONFIG_NAME", "WEIGHTS_NAME"]

_log = logging.getLogger(__name__)
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
_FORMAT = "dynvit.pretrained/1"
_DATA_KEYS = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")


def weights_file(path: str | os.PathLike) -> str:
    """The weight file of ``path``: itself if a file, ``<dir>/model.safetensors`` for a directory."""
    path = os.fspath(path)
    return os.path.join(path, WEIGHTS_NAME) if os.path.isdir(path) else path


def _atomic_write(path: str, write) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _jsonable(value):
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return value


def save_pretrained(
    model: nn.Module,
    directory: str | os.PathLike,
    *,
    classes: Sequence[str] | None = None,
    data_config: dict | None = None,
) -> str:
    """Write ``model.safetensors`` and ``config.json`` into ``directory``; return it.

    Each file is written to a temporary name and renamed, the weights first, so a crash
    leaves either the previous pair or a complete new one behind.

    Args:
        model: a model from :func:`dynvit.build_model` (or a timm model carrying
            ``dynvit_meta = {"model_name": ..., "timm_kwargs": {...}}``).
        classes: class names, index order.
        data_config: timm data config (``input_size``, ``mean``, ``std``, ...); defaults to
            ``timm.data.resolve_model_data_config(model)``.
    """
    meta = getattr(model, "dynvit_meta", None)
    if not meta or "model_name" not in meta:
        raise ValueError(
            "save_pretrained needs model.dynvit_meta = {'model_name': ..., 'timm_kwargs': {...}} to rebuild the model; "
            "dynvit.build_model sets it"
        )
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    if data_config is None:
        data_config = timm.data.resolve_model_data_config(model)
        # timm's config carries the pretrained tag's size (224 for deit_*), not the size the
        # model was built for; the patch embedding knows the real one.
        pe = getattr(model, "patch_embed", None)
        if pe is not None and getattr(pe, "img_size", None) is not None:
            data_config["input_size"] = (data_config["input_size"][0], *pe.img_size)
    num_classes = getattr(model, "num_classes", None)
    if classes is not None and num_classes is not None and len(classes) != num_classes:
        raise ValueError(f"{len(classes)} class names for a model with {num_classes} classes")
    timm_kwargs = dict(meta.get("timm_kwargs", {}))
    timm_kwargs.pop("pretrained", None)
    if num_classes is not None:
        timm_kwargs["num_classes"] = num_classes
    config = {
        "format": _FORMAT,
        "model_name": meta["model_name"],
        "timm_kwargs": _jsonable(timm_kwargs),
        "dynvit": model.dynvit_config() if hasattr(model, "dynvit_config") else None,
        "classes": list(classes) if classes is not None else None,
        **{k: _jsonable(data_config[k]) for k in _DATA_KEYS if k in data_config},
    }
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    _atomic_write(os.path.join(directory, WEIGHTS_NAME), lambda p: save_file(state, p, metadata={"format": "pt"}))
    _atomic_write(os.path.join(directory, CONFIG_NAME), lambda p: _dump_json(config, p))
    _log.info("saved %s (%d tensors) to %s", meta["model_name"], len(state), directory)
    return directory


def _dump_json(obj, path: str) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)


def read_config(directory: str | os.PathLike) -> dict:
    path = os.path.join(os.fspath(directory), CONFIG_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path!r} not found; is {os.fspath(directory)!r} a directory written by dynvit.save_pretrained?")
    with open(path) as f:
        config = json.load(f)
    if config.get("format") != _FORMAT:
        raise ValueError(f"{path!r} is not a dynvit config (format {config.get('format')!r}, expected {_FORMAT!r})")
    return config


def load_pretrained(directory: str | os.PathLike, *, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild the model saved by :func:`save_pretrained` and load its weights (strictly).

    The model comes back in eval mode, with ``dynvit_meta`` (name, kwargs, classes) and
    ``pretrained_cfg`` updated with the saved input size, mean and std, so
    ``timm.data.resolve_model_data_config(model)`` gives the right preprocessing.

    Raises:
        WeightMismatchError: the weight file does not fit the rebuilt model; names the keys.
    """
    from .patch import build_model

    config = read_config(directory)
    name, kwargs = config["model_name"], dict(config["timm_kwargs"])
    settings = config.get("dynvit")
    if settings:
        model = build_model(name, **settings, **kwargs)
    else:
        model = timm.create_model(name, **kwargs)
        model.dynvit_meta = {"model_name": name, "timm_kwargs": dict(kwargs)}
    path = weights_file(directory)
    state = load_file(path, device=str(device))
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k} (file {tuple(state[k].shape)}, model {tuple(own[k].shape)})"
              for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        raise WeightMismatchError(
            f"{path!r} does not fit {name} as configured in {CONFIG_NAME}: missing {missing[:8]}, unexpected {unexpected[:8]}, "
            f"shape mismatch {shapes[:8]}"
        )
    model.load_state_dict(state)
    model.dynvit_meta["classes"] = config.get("classes")
    model.pretrained_cfg = {**getattr(model, "pretrained_cfg", {}),
                            **{k: tuple(v) if isinstance(v, list) else v for k, v in config.items() if k in _DATA_KEYS}}
    return model.to(device).eval()
