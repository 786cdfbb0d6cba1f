"""Save models as folders that timm and the Hugging Face Hub read, load them back exactly, push
them to the Hub.

A saved folder holds

- ``config.json``: timm's keys (``architecture``, ``num_classes``, ``num_features``,
  ``global_pool``, ``label_names``, ``model_args``, ``pretrained_cfg``), written by timm's own
  ``save_config_for_hf``, plus a ``dynvit`` block: the format, the pruning settings (``null``
  for a dense model) and the file holding the pruning weights;
- ``model.safetensors``: the timm model's own tensors (of a pruned model: its backbone), so
  ``timm.create_model("local-dir:DIR", pretrained=True)`` (or ``"hf-hub:org/name"``) loads
  a dense model exactly and a pruned one as its dense backbone;
- ``dynvit.safetensors``: what dynvit adds (predictors, thresholds), pruned models only;
- ``README.md``: the model card (:mod:`dynvit.card`), and ``eval.json`` when evaluation
  results were given.

:func:`load_pretrained` also reads folders in the earlier dynvit format
(``"format": "dynvit.pretrained/1"``, every tensor in ``model.safetensors``).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Sequence

import timm
import torch
from safetensors.torch import load_file, save_file
from timm.models._hub import load_model_config_from_path, save_config_for_hf
from torch import nn

from .card import model_card
from .weights import WeightMismatchError

__all__ = ["save_pretrained", "load_pretrained", "push_to_hub", "resolve", "read_config", "load_state",
           "CONFIG_NAME", "WEIGHTS_NAME", "DYNVIT_WEIGHTS_NAME"]

_log = logging.getLogger(__name__)
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
DYNVIT_WEIGHTS_NAME = "dynvit.safetensors"
EVAL_NAME = "eval.json"
TRAINING_CONFIG_NAME = "training_config.yaml"
_FORMAT = "dynvit.pretrained/2"
_LEGACY_FORMAT = "dynvit.pretrained/1"
_DATA_KEYS = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
# pretrained_cfg fields that describe the weights the model started from, not the saved ones
_SOURCE_FIELDS = ("tag", "description", "origin_url", "paper_name", "paper_ids", "notes", "hf_hub_filename")


# ---- names --------------------------------------------------------------------------------
def resolve(source: str | os.PathLike) -> tuple[str, dict]:
    """The local folder of ``source`` and where it came from (``pretrained_cfg`` fields).

    ``source`` is a folder, ``local-dir:DIR`` or ``hf-hub:org/name[@revision]`` (downloaded
    into, or read offline from, the Hugging Face cache with ``huggingface_hub``).

    Raises:
        FileNotFoundError: no such folder, or a Hub repository that cannot be reached or is
            not in the cache; the message says which.
    """
    text = os.fspath(source)
    if text.startswith("hf-hub:"):
        return _download(text[len("hf-hub:"):])
    directory = text[len("local-dir:"):] if text.startswith("local-dir:") else text
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{directory!r} is not a folder; give a folder written by dynvit.save_pretrained, "
                                "local-dir:DIR or hf-hub:org/name")
    return directory, {"source": "local-dir", "file": directory}


def _download(repo: str) -> tuple[str, dict]:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    repo_id, _, revision = repo.partition("@")
    try:
        directory = snapshot_download(repo_id, revision=revision or None,
                                      allow_patterns=[CONFIG_NAME, "*.safetensors", "*.md", EVAL_NAME, TRAINING_CONFIG_NAME])
    except LocalEntryNotFoundError as e:
        raise FileNotFoundError(f"hf-hub:{repo}: not in the Hugging Face cache and the Hub cannot be reached ({e}); "
                                "connect, or unset HF_HUB_OFFLINE, or point HF_HUB_CACHE at a cache that holds it") from None
    except (RepositoryNotFoundError, HfHubHTTPError) as e:
        raise FileNotFoundError(f"hf-hub:{repo}: {str(e).splitlines()[0]}; check the repo id (and HF_TOKEN for a "
                                "private repo)") from None
    return directory, {"source": "hf-hub", "hf_hub_id": repo_id, "file": None}


# ---- saving -------------------------------------------------------------------------------
def _atomic_write(path: str, write) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _write_text(text: str):
    def write(path: str) -> None:
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
    return write


def _data_config(model: nn.Module, data_config: dict | None) -> dict:
    if data_config is not None:
        return {k: tuple(v) if isinstance(v, list) else v for k, v in data_config.items() if k in _DATA_KEYS}
    config = dict(timm.data.resolve_model_data_config(model))
    # timm's config carries the pretrained tag's size (224 for deit_*), not the size the model
    # was built for; the patch embedding knows the real one.
    pe = getattr(model, "patch_embed", None)
    if pe is not None and getattr(pe, "img_size", None) is not None:
        config["input_size"] = (config["input_size"][0], *pe.img_size)
    return {k: config[k] for k in _DATA_KEYS if k in config}


def _timm_config(model: nn.Module, model_args: dict, classes, data_config: dict) -> dict:
    """timm's ``config.json`` keys for ``model`` (through timm's own ``save_config_for_hf``),
    without the fields of the weights it was started from."""
    extra = {"pretrained_cfg": {}, **({"label_names": list(classes)} if classes is not None else {})}
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, CONFIG_NAME)
        save_config_for_hf(model, path, model_config=extra, model_args=model_args, data_config=data_config)
        with open(path) as f:
            config = json.load(f)
    for key in _SOURCE_FIELDS:
        config["pretrained_cfg"].pop(key, None)
    return config


def save_pretrained(
    model: nn.Module,
    directory: str | os.PathLike,
    *,
    classes: Sequence[str] | None = None,
    data_config: dict | None = None,
    evaluation: dict | None = None,
    training_config: dict | None = None,
    card_source: str | None = None,
) -> str:
    """Write the model folder described in the module docstring into ``directory``; return it.

    Each file is written to a temporary name and renamed, the weights first, so a crash
    leaves either the previous files or complete new ones behind.

    Args:
        model: a model from :func:`dynvit.build_model` (or a timm model carrying
            ``dynvit_meta = {"model_name": ..., "timm_kwargs": {...}}``).
        classes: class names, index order (timm's ``label_names``).
        data_config: timm data config (``input_size``, ``mean``, ``std``, ...); defaults to
            ``timm.data.resolve_model_data_config(model)`` at the model's image size.
        evaluation: evaluation results (``eval.py --json``'s output, or ``rows`` of the same
            shape), written to ``eval.json`` and summarised in the model card.
        training_config: the resolved training config, shown in the model card and written
            to ``training_config.yaml``.
        card_source: the name the card tells users to load (default ``local-dir:<directory>``).
    """
    meta = getattr(model, "dynvit_meta", None)
    if not meta or "model_name" not in meta:
        raise ValueError(
            "save_pretrained needs model.dynvit_meta = {'model_name': ..., 'timm_kwargs': {...}} to rebuild the model; "
            "dynvit.build_model sets it"
        )
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    num_classes = getattr(model, "num_classes", None)
    if classes is not None and num_classes is not None and len(classes) != num_classes:
        raise ValueError(f"{len(classes)} class names for a model with {num_classes} classes")
    model_args = {k: v for k, v in meta.get("timm_kwargs", {}).items() if k not in ("pretrained", "drop_path_rate")}
    config = _timm_config(model, model_args, classes, _data_config(model, data_config))
    pruning = model.dynvit_config() if hasattr(model, "dynvit_config") else None
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    backbone = _backbone_keys(model, state)
    config["dynvit"] = {"format": _FORMAT, "pruning": pruning, "weights": DYNVIT_WEIGHTS_NAME if pruning else None}
    _atomic_write(os.path.join(directory, WEIGHTS_NAME),
                  lambda p: save_file({k: state[k] for k in backbone}, p, metadata={"format": "pt"}))
    extra = {k: v for k, v in state.items() if k not in backbone}
    if extra and not pruning:
        raise ValueError(f"tensors {sorted(extra)[:5]} are not part of {meta['model_name']} and the model has no dynvit "
                         "settings to rebuild them")
    if pruning:
        _atomic_write(os.path.join(directory, DYNVIT_WEIGHTS_NAME), lambda p: save_file(extra, p, metadata={"format": "pt"}))
    if evaluation is not None:
        _atomic_write(os.path.join(directory, EVAL_NAME), _write_text(json.dumps(evaluation, indent=2)))
    if training_config is not None:
        import yaml

        _atomic_write(os.path.join(directory, TRAINING_CONFIG_NAME), _write_text(yaml.safe_dump(training_config, sort_keys=False)))
    card = model_card(config, evaluation=evaluation, training_config=training_config,
                      source=card_source or f"local-dir:{directory}")
    _atomic_write(os.path.join(directory, "README.md"), _write_text(card))
    _atomic_write(os.path.join(directory, CONFIG_NAME), _write_text(json.dumps(config, indent=2)))
    _log.info("saved %s (%d tensors) to %s", meta["model_name"], len(state), directory)
    return directory


def _backbone_keys(model: nn.Module, state: dict) -> set[str]:
    """The keys of ``state`` that the plain timm model has (built on the meta device, no memory)."""
    meta = model.dynvit_meta
    with torch.device("meta"):
        plain = timm.create_model(meta["model_name"], **{**meta.get("timm_kwargs", {}), "pretrained": False})
    return set(plain.state_dict()) & set(state)


# ---- loading ------------------------------------------------------------------------------
def read_config(directory: str | os.PathLike) -> tuple[dict, str, dict, dict]:
    """``(pretrained_cfg, architecture, model_args)`` as timm reads them, and the ``dynvit``
    block, from the ``config.json`` in ``directory`` (either dynvit format)."""
    path = os.path.join(os.fspath(directory), CONFIG_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path!r} not found; is {os.fspath(directory)!r} a folder written by dynvit.save_pretrained?")
    with open(path) as f:
        config = json.load(f)
    if config.get("format") == _LEGACY_FORMAT:
        return _read_legacy(config)
    if "architecture" not in config:
        raise ValueError(f"{path!r} is neither a timm nor a dynvit config (no 'architecture', format "
                         f"{config.get('format')!r})")
    pretrained_cfg, name, model_args = load_model_config_from_path(os.fspath(directory))
    block = config.get("dynvit") or {"format": None, "pruning": None, "weights": None}
    return pretrained_cfg, name, dict(model_args), block


def _read_legacy(config: dict) -> tuple[dict, str, dict, dict]:
    """The earlier format: timm's registry entry for the architecture (without its weight
    source) under the saved input size, mean, std and classes."""
    kwargs = {k: v for k, v in config["timm_kwargs"].items() if k != "drop_path_rate"}
    registry = timm.models.get_pretrained_cfg(config["model_name"])
    pretrained_cfg = registry.to_dict() if registry is not None else {}
    for key in ("url", "hf_hub_id", "file", "source", *_SOURCE_FIELDS):
        pretrained_cfg.pop(key, None)
    pretrained_cfg.update({k: v for k, v in config.items() if k in _DATA_KEYS})
    pretrained_cfg.update(num_classes=kwargs.get("num_classes", 1000), label_names=config.get("classes"), custom_load=False)
    return pretrained_cfg, config["model_name"], kwargs, {"format": _LEGACY_FORMAT, "pruning": config.get("dynvit"),
                                                          "weights": None}


def load_state(directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of a saved folder: ``model.safetensors`` and, when present, ``dynvit.safetensors``."""
    directory = os.fspath(directory)
    state = load_file(os.path.join(directory, WEIGHTS_NAME))
    extra = os.path.join(directory, DYNVIT_WEIGHTS_NAME)
    if os.path.isfile(extra):
        state.update(load_file(extra))
    return state


def load_pretrained(source: str | os.PathLike, *, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild the model saved by :func:`save_pretrained` and load its weights (strictly).

    Args:
        source: a folder, ``local-dir:DIR`` or ``hf-hub:org/name[@revision]``.
        device: where the model goes.

    The model comes back in eval mode, with ``dynvit_meta`` (name, kwargs, classes) and a
    ``pretrained_cfg`` describing the saved model (its input size, mean, std, ``label_names``,
    where it was loaded from), so ``timm.data.resolve_model_data_config(model)`` gives the
    right preprocessing.

    Raises:
        FileNotFoundError: ``source`` is not a saved model folder, or a Hub repository that
            cannot be fetched.
        WeightMismatchError: the weight files do not fit the rebuilt model; names the keys.
    """
    from .patch import patch

    directory, origin = resolve(source)
    pretrained_cfg, name, model_args, block = read_config(directory)
    # Where this model was loaded from, nothing of the weights it was once started from.
    pretrained_cfg = {**{k: tuple(v) if isinstance(v, list) else v for k, v in pretrained_cfg.items()
                         if k not in ("url", "hf_hub_id")}, **origin}
    model = timm.create_model(name, pretrained=False, pretrained_cfg=pretrained_cfg, **model_args)
    if block.get("pruning"):
        patch(model, **block["pruning"])
    classes = pretrained_cfg.get("label_names")
    model.dynvit_meta = {"model_name": name, "timm_kwargs": dict(model_args), "classes": list(classes) if classes else None}
    state = load_state(directory)
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k} (file {tuple(state[k].shape)}, model {tuple(own[k].shape)})"
              for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        raise WeightMismatchError(
            f"the weights in {directory!r} do not fit {name} as configured in {CONFIG_NAME}: missing {missing[:8]}, "
            f"unexpected {unexpected[:8]}, shape mismatch {shapes[:8]}"
        )
    model.load_state_dict(state)
    return model.to(device).eval()


# ---- the Hub ------------------------------------------------------------------------------
def push_to_hub(
    model: nn.Module | str | os.PathLike,
    repo_id: str,
    *,
    classes: Sequence[str] | None = None,
    data_config: dict | None = None,
    evaluation: dict | None = None,
    training_config: dict | None = None,
    private: bool = False,
    token: str | None = None,
    commit_message: str = "Upload dynvit model",
    revision: str | None = None,
    create_pr: bool = False,
):
    """Upload a model folder, with its model card, to the Hugging Face Hub repo ``repo_id``
    (created if missing); return ``HfApi.upload_folder``'s commit info.

    Args:
        model: a model (saved first, with ``classes``, ``data_config``, ``evaluation`` and
            ``training_config`` as in :func:`save_pretrained`; ``classes`` default to
            ``model.dynvit_meta["classes"]``) or a folder written by :func:`save_pretrained`
            (uploaded with its ``eval.json`` and training config).
        repo_id: ``org/name``; the card tells users to load ``hf-hub:org/name``.
        private, token, commit_message, revision, create_pr: as for ``huggingface_hub.HfApi``.
    """
    from huggingface_hub import HfApi

    from . import __version__

    api = HfApi(token=token, library_name="dynvit", library_version=__version__)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    with tempfile.TemporaryDirectory() as tmp:
        folder = os.path.join(tmp, "model")
        if isinstance(model, nn.Module):
            if classes is None:
                classes = (getattr(model, "dynvit_meta", None) or {}).get("classes")
            save_pretrained(model, folder, classes=classes, data_config=data_config, evaluation=evaluation,
                            training_config=training_config, card_source=f"hf-hub:{repo_id}")
        else:
            shutil.copytree(resolve(model)[0], folder)
            _rewrite_card(folder, f"hf-hub:{repo_id}")
        _log.info("uploading %s to the Hub repo %s", sorted(os.listdir(folder)), repo_id)
        return api.upload_folder(repo_id=repo_id, folder_path=folder, revision=revision, create_pr=create_pr,
                                 commit_message=commit_message)


def _rewrite_card(folder: str, source: str) -> None:
    """The model card of a saved folder, told to load from ``source``."""
    import yaml

    def read(name, parse):
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            return None
        with open(path) as f:
            return parse(f)

    config = read(CONFIG_NAME, json.load)
    if config is None or "architecture" not in config:
        raise ValueError(f"{folder!r} is not in the current format; load it with dynvit.load_pretrained and push the model")
    card = model_card(config, evaluation=read(EVAL_NAME, json.load), training_config=read(TRAINING_CONFIG_NAME, yaml.safe_load),
                      source=source)
    _write_text(card)(os.path.join(folder, "README.md"))
