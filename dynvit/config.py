"""Training configuration as data: dataclasses mirrored by the YAML files in ``configs/``.

A run's config is built in three layers, each checked against the dataclasses below:
the defaults, a YAML file, then ``--section.key value`` flags. Unknown keys and values of
the wrong type are errors that name the key and list the valid ones.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Union

import yaml

from .ratios import normalize_keep_ratio

__all__ = [
    "ModelConfig", "DataConfig", "AugConfig", "LossConfig", "OptimConfig", "TauConfig", "TrainConfig",
    "Config", "ConfigError", "load_config", "merge", "parse_overrides", "to_dict", "save_config",
]


class ConfigError(ValueError):
    """A config key that does not exist or a value that does not fit its field."""


@dataclass
class ModelConfig:
    name: str = "deit_small_patch16_224"  # timm model name
    kwargs: dict = field(default_factory=dict)  # extra timm.create_model kwargs (img_size, patch_size, depth, ...)
    pretrained: bool = False  # timm hub weights (needs network access)
    pretrained_path: str | None = None  # weight file, dynvit.save_pretrained directory, local-dir:DIR or hf-hub:org/name
    drop_path_rate: float = 0.0  # stochastic depth of the backbone
    prune_loc: list[int] = field(default_factory=lambda: [3, 6, 9])  # blocks before which tokens are pruned; [] = dense
    keep_ratio: float | list[float] = 0.7  # r (kept r**(s+1) after stage s) or one cumulative fraction per stage
    sampler: str = "gumbel"  # training-time mask sampler: gumbel, deterministic or soft
    predictor_hidden_ratio: float = 1.0  # predictor width as a multiple of the embedding width
    dropped_tokens: str = "discard"  # what a stage does with the tokens it drops: discard, or merge into the most similar kept one
    predictor_prior: str = "none"  # none, or match: the keep logit also ranks tokens by how much they repeat another (ToMe's criterion)
    match_scale: float = 8.0  # initial weight of the match prior (keep logit per unit of cosine similarity; learned)
    predictor_signals: list[str] = field(default_factory=list)  # what else the keep logit reads, with learned weights: attention (the class token's, in the block the stage feeds), redundancy (similarity to the closest token ranked ahead), size (patches merged into a token)
    fit_signals_images: int = 0  # before training, choose each stage's signal weights by search on this many training images (dynvit.fit_signals; 0 = keep the initial weights)
    drop_tokens: bool = False  # training removes dropped tokens after each stage's first block (cheaper step)
    method: str = "dynvit"  # token reduction to train: dynvit, a baseline (evit, tome, random), or dense: the same fine-tune without pruning
    tome_r: int = 0  # tokens ToMe merges in each block (method tome)


@dataclass
class DataConfig:
    path: str = ""  # dataset root holding ImageFolder splits
    train_split: str = "train"  # sub-folder with training images, one folder per class
    val_split: str = "val"  # sub-folder with validation images (same class folders)
    batch_size: int = 128  # global images per optimizer step (all processes and accumulation steps)
    val_batch_size: int = 256  # validation images per process and batch
    num_workers: int = 4  # data loader worker processes per training process (cache none)
    verify: bool = False  # decode every image before training and list all unreadable files at once
    cache: str = "none"  # none: decode and augment per image in loader workers; memory: decode once, augment on the device
    cache_dir: str | None = None  # with cache memory: keep decoded splits here for later runs; None = decode every run
    train_subset: int = 0  # use this many training images (class-balanced, seeded); 0 = all
    val_subset: int = 0  # use this many validation images; 0 = all
    input_size: int | None = None  # square image side; None = the model's default
    interpolation: str | None = None  # resize interpolation; None = the model's default
    crop_pct: float | None = None  # eval center-crop fraction; None = the model's default
    mean: list[float] | None = None  # normalisation mean; None = the model's default
    std: list[float] | None = None  # normalisation std; None = the model's default


@dataclass
class AugConfig:
    scale: list[float] = field(default_factory=lambda: [0.08, 1.0])  # random-resized-crop area range
    hflip: float = 0.5  # horizontal flip probability
    color_jitter: float | None = 0.4  # color jitter strength (ignored when auto_augment is set); None = off
    auto_augment: str | None = "rand-m9-mstd0.5-inc1"  # timm auto-augment policy string; None = off
    re_prob: float = 0.25  # random erasing probability
    mixup: float = 0.8  # mixup alpha; 0 = off
    cutmix: float = 1.0  # cutmix alpha; 0 = off
    mixup_prob: float = 1.0  # probability of applying mixup or cutmix to a batch
    mixup_switch_prob: float = 0.5  # probability of cutmix instead of mixup when both are on
    mixup_mode: str = "batch"  # how mixup parameters are drawn: batch, pair or elem
    smoothing: float = 0.1  # label smoothing


@dataclass
class LossConfig:
    cls_weight: float = 1.0  # classification (soft-target cross-entropy under mixup)
    ratio_weight: float = 2.0  # squared gap between kept fraction and target, per image, averaged over stages
    distill_logits_weight: float = 0.5  # KL(teacher || student) of the class distributions
    distill_tokens_weight: float = 0.5  # MSE to the teacher's final tokens, on the kept patch tokens
    ratio_per: str = "image"  # keep-ratio target per image (DynamicViT) or per batch (images keep different counts)
    margin_weight: float = 0.0  # hinge keeping keep logits at least loss.margin away from their threshold; 0 = off
    margin: float = 1.0  # width of that hinge, in logits


@dataclass
class OptimConfig:
    opt: str = "adamw"  # timm optimizer name
    lr: float = 1e-3  # peak learning rate of the predictors (and of a dense model) for the global batch
    sched: str = "cosine"  # timm schedule (timm.scheduler.create_scheduler_v2), a function of the optimizer step
    min_lr: float = 1e-6  # final learning rate of the schedule
    warmup_lr: float = 0.0  # learning rate at step 0 of the warm-up
    warmup_epochs: float = 5  # linear warm-up length
    decay_epochs: float | None = None  # step: epochs between decays; wsd, rsqrt: decay length (< 1: a fraction); null = timm's
    decay_milestones: list[float] = field(default_factory=lambda: [90.0, 180.0, 270.0])  # multistep: epochs of the decays
    decay_rate: float = 0.1  # step, multistep: factor per decay; poly: the power
    sched_kwargs: dict = field(default_factory=dict)  # other create_scheduler_v2 arguments (cycle_limit, k_decay, noise, ...)
    weight_decay: float = 0.05  # decoupled weight decay (not on biases, norms, embeddings)
    eps: float = 1e-8  # optimizer epsilon
    backbone_lr_scale: float = 0.01  # backbone learning rate relative to the predictors' (pruning runs)
    signal_lr_scale: float = 1.0  # learning rate of the predictors' signal weights and match scale relative to the predictors' (a few scalars: Adam moves each by about lr per step)
    backbone_freeze_epochs: float = 5  # backbone learning rate is 0 before this epoch (pruning runs)
    frozen_params: list[str] = field(default_factory=list)  # parameter-name prefixes never trained (e.g. pos_embed)
    clip_grad: float | None = None  # max gradient norm; None = no clipping
    grad_accum_steps: int | None = None  # micro-batches per step; null = accelerate launch's --gradient_accumulation_steps, else 1
    ema: bool = False  # keep an exponential moving average of the weights
    ema_decay: float = 0.9999  # EMA decay per optimizer step


@dataclass
class TauConfig:
    kind: str = "constant"  # constant, linear, cosine or exponential (see dynvit.schedule)
    tau_start: float = 1.0  # Gumbel-sigmoid temperature at step 0
    tau_end: float = 1.0  # temperature at the end of the annealing
    anneal_epochs: float | None = None  # annealing length; None = the whole run


@dataclass
class NoiseConfig:
    kind: str = "constant"  # constant, linear or cosine (see dynvit.schedule.NoiseSchedule)
    scale_start: float = 1.0  # factor on the sampler's Logistic noise at step 0 (1 = Bernoulli(sigmoid(logit)))
    scale_end: float = 1.0  # factor at the end of the annealing (0 = threshold mode's decisions)
    anneal_epochs: float | None = None  # annealing length; None = the whole run


@dataclass
class TrainConfig:
    epochs: int = 30  # passes over the training set
    seed: int = 0  # seed of initialisation, data order, augmentation and sampling
    output_dir: str = "runs/dynvit"  # checkpoints, resolved config, metrics and the final model
    mixed_precision: str | None = None  # no, bf16 or fp16 (GPU only); null = accelerate launch's --mixed_precision, else no
    save_every_steps: int = 0  # checkpoint every N optimizer steps (and at each epoch end); 0 = epoch ends only
    keep_checkpoints: int = 2  # checkpoints kept on disk (oldest deleted first)
    resume: str = ""  # "" = start fresh, "auto" = latest checkpoint in output_dir if any, or a checkpoint path
    stop_after_steps: int = 0  # end the run (with a checkpoint) after this global step; 0 = run all epochs
    log_every: int = 20  # optimizer steps between logged training metrics
    eval_every_epochs: int = 1  # validate every N epochs (and after the last)
    eval_modes: list[str] = field(default_factory=lambda: ["threshold", "topk", "none"])  # pruning modes validated
    flops_images: int = 8  # validation images traced to count threshold-mode GMACs; 0 = skip GMACs
    trackers: list[str] = field(default_factory=lambda: ["tensorboard"])  # accelerate trackers
    progress_bar: bool = True  # a tqdm bar for the whole run on the main process (only when stderr is a terminal)
    calibrate_images: int = 1000  # held-out training images threshold mode is calibrated on after training; 0 = off
    push_to_hub: str = ""  # Hub repo id (org/name) the final model and its model card are pushed to; "" = none


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    aug: AugConfig = field(default_factory=AugConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    tau: TauConfig = field(default_factory=TauConfig)
    noise: NoiseConfig = field(default_factory=NoiseConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


_CHOICES = {
    "model.sampler": ("gumbel", "deterministic", "soft"),
    "model.method": ("dynvit", "evit", "tome", "random", "dense"),
    "model.predictor_prior": ("none", "match"),
    "data.cache": ("none", "memory"),
    "aug.mixup_mode": ("batch", "pair", "elem"),
    "tau.kind": ("constant", "linear", "cosine", "exponential"),
    "noise.kind": ("constant", "linear", "cosine"),
    "model.dropped_tokens": ("discard", "merge"),
    "loss.ratio_per": ("image", "batch"),
    "train.mixed_precision": ("no", "bf16", "fp16"),
    "optim.sched": ("cosine", "tanh", "step", "multistep", "poly", "wsd", "rsqrt", "constant"),
}
_POSITIVE = ("data.batch_size", "data.val_batch_size", "optim.lr", "optim.grad_accum_steps", "train.epochs", "train.log_every",
             "train.eval_every_epochs", "tau.tau_start", "tau.tau_end", "train.keep_checkpoints")
_NON_NEGATIVE = ("optim.signal_lr_scale", "model.fit_signals_images", "model.tome_r", "data.num_workers", "data.train_subset", "data.val_subset", "optim.min_lr", "optim.weight_decay",
                 "optim.warmup_epochs", "optim.backbone_freeze_epochs", "train.save_every_steps", "train.stop_after_steps",
                 "train.flops_images", "train.calibrate_images", "loss.cls_weight", "loss.ratio_weight", "loss.distill_logits_weight",
                 "loss.distill_tokens_weight", "loss.margin_weight", "loss.margin")


# ---- type coercion ----------------------------------------------------------------------
def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; convert where it is lossless (int -> float)."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None:
            if type(None) in options:
                return None
            raise ConfigError(f"{key}: null is not allowed, expected {_type_name(tp)}")
        for option in (o for o in options if o is not type(None)):
            try:
                return _coerce(value, option, key)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: expected {' or '.join(_type_name(o) for o in options)}, got {value!r}")
    if origin is list:
        (item,) = typing.get_args(tp) or (Any,)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")


def _unknown_key(key: str, valid: list[str], section: str) -> ConfigError:
    where = f" in '{section}'" if section else ""
    prefix = f"{section}." if section else ""
    close = difflib.get_close_matches(key.rsplit(".", 1)[-1] if section else key.split(".")[0], valid, n=1)
    hint = f" Did you mean '{prefix}{close[0]}'?" if close else ""
    shown = valid if section else [f"{v}.*" for v in valid]
    return ConfigError(f"unknown config key '{key}'{where}.{hint} Valid keys: {', '.join(shown)}")


# ---- building -----------------------------------------------------------------------------
def merge(cfg: Any, updates: dict, prefix: str = "") -> Any:
    """Return a copy of the dataclass ``cfg`` with the nested ``updates`` applied and checked."""
    if not isinstance(updates, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping of keys, got {updates!r}")
    hints = typing.get_type_hints(type(cfg))
    names = [f.name for f in dataclasses.fields(cfg)]
    changes = {}
    for key, value in updates.items():
        path = f"{prefix}{key}"
        if key not in names:
            raise _unknown_key(path, names, prefix.rstrip("."))
        current = getattr(cfg, key)
        if dataclasses.is_dataclass(current):
            changes[key] = merge(current, value, f"{path}.")
        else:
            changes[key] = _coerce(value, hints[key], path)
    return dataclasses.replace(cfg, **changes)


def _parse_value(text: str, tp) -> Any:
    """A command-line string to a Python value: YAML syntax, except that str fields keep the text."""
    options = typing.get_args(tp) if typing.get_origin(tp) in (Union, types.UnionType) else (tp,)
    if text.lower() in ("null", "none", "~") and type(None) in options:
        return None
    if str in options:
        return text
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, str) and "," in value and any(typing.get_origin(o) is list for o in options):
        value = [yaml.safe_load(v) for v in value.split(",")]  # 3,6,9 as well as [3, 6, 9]
    return value


def parse_overrides(args: list[str], cfg: Config) -> dict:
    """``["--optim.lr", "1e-4", "--model.prune_loc=[2,4]"]`` to a nested update dict."""
    updates: dict = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}; overrides look like --section.key value")
        key, eq, text = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(args):
                raise ConfigError(f"--{key} needs a value")
            text = args[i + 1]
            i += 1
        i += 1
        section, dot, name = key.partition(".")
        sections = [f.name for f in dataclasses.fields(cfg)]
        if not dot or section not in sections:
            raise _unknown_key(key, sections, "")
        sub = getattr(cfg, section)
        hints = typing.get_type_hints(type(sub))
        name, dot, item = name.partition(".")
        if name not in hints:
            raise _unknown_key(key, list(hints), section)
        if dot and hints[name] is dict:  # --model.kwargs.depth 6 sets one entry of a mapping
            current = updates.setdefault(section, {}).get(name, dict(getattr(sub, name)))
            updates[section][name] = {**current, item: _parse_value(text, Any)}
        elif dot:
            raise ConfigError(f"--{key}: {section}.{name} is not a mapping")
        else:
            updates.setdefault(section, {})[name] = _parse_value(text, hints[name])
    return updates


def validate(cfg: Config) -> Config:
    """Checks that need more than a type: choices and ranges."""
    flat = to_dict(cfg)
    for key, choices in _CHOICES.items():
        section, name = key.split(".")
        if flat[section][name] is not None and flat[section][name] not in choices:  # None: unset, decided elsewhere
            raise ConfigError(f"{key}: must be one of {choices}, got {flat[section][name]!r}")
    for key in _POSITIVE + _NON_NEGATIVE:
        section, name = key.split(".")
        value = flat[section][name]
        if value is not None and (value < 0 or (key in _POSITIVE and value == 0)):
            raise ConfigError(f"{key}: must be {'> 0' if key in _POSITIVE else '>= 0'}, got {value}")
    bad_signals = [s for s in cfg.model.predictor_signals if s not in ("attention", "redundancy", "size")]
    if bad_signals:
        raise ConfigError(f"model.predictor_signals: {bad_signals} not in ('attention', 'redundancy', 'size')")
    if cfg.model.fit_signals_images and not cfg.model.predictor_signals:
        raise ConfigError("model.fit_signals_images > 0 fits the weights of the predictor signals, and "
                          "model.predictor_signals is empty; name the signals or set model.fit_signals_images: 0")
    bad_modes = [m for m in cfg.train.eval_modes if m not in ("threshold", "topk", "none")]
    if bad_modes:
        raise ConfigError(f"train.eval_modes: {bad_modes} not in ('threshold', 'topk', 'none')")
    if cfg.model.method == "tome" and cfg.model.tome_r == 0:
        raise ConfigError("model.method=tome needs model.tome_r > 0 (tokens merged per block)")
    if cfg.model.method in ("evit", "random") and not cfg.model.prune_loc:
        raise ConfigError(f"model.method={cfg.model.method} needs model.prune_loc (the blocks where tokens are dropped)")
    if cfg.model.prune_loc and cfg.model.method != "tome":
        try:
            normalize_keep_ratio(cfg.model.keep_ratio, len(cfg.model.prune_loc))
        except ValueError as e:
            fix = "" if "give" in str(e) else ("; --model.keep_ratio r keeps r**s of the patch tokens after stage s "
                                               "(e.g. 0.7), or give one cumulative fraction per stage")
            raise ConfigError(f"model.{e}{fix}") from None
    for key in ("scale_start", "scale_end"):
        if not 0.0 <= getattr(cfg.noise, key) <= 1.0:
            raise ConfigError(f"noise.{key}: must be in [0, 1], got {getattr(cfg.noise, key)}")
    if cfg.model.pretrained and cfg.model.pretrained_path:
        raise ConfigError("model.pretrained and model.pretrained_path are exclusive: hub weights or a local file")
    if len(cfg.aug.scale) != 2 or not 0 < cfg.aug.scale[0] <= cfg.aug.scale[1] <= 1:
        raise ConfigError(f"aug.scale: expected [min, max] with 0 < min <= max <= 1, got {cfg.aug.scale}")
    per_image = [k for k in ("auto_augment", "color_jitter") if getattr(cfg.aug, k)]
    if cfg.data.cache == "memory" and per_image:
        given = ", ".join(f"aug.{k}={getattr(cfg.aug, k)!r}" for k in per_image)
        fix = " and ".join(f"aug.{k}: null" for k in per_image)
        raise ConfigError(f"{given}: works on single PIL images, not on the tensor batches of data.cache: memory; "
                          f"set {fix}, or data.cache: none")
    if cfg.data.cache == "memory" and cfg.data.interpolation not in (None, "bilinear", "bicubic", "nearest"):
        raise ConfigError(f"data.interpolation={cfg.data.interpolation!r}: data.cache: memory resamples with "
                          "bilinear, bicubic or nearest")
    return cfg


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | dict | None = None) -> Config:
    """Defaults, then the YAML file at ``path``, then ``overrides`` (CLI strings or a nested dict)."""
    cfg = Config()
    if path is not None:
        if not os.path.isfile(path):
            raise ConfigError(f"config file {os.fspath(path)!r} not found")
        with open(path) as f:
            cfg = merge(cfg, yaml.safe_load(f) or {})
    if overrides:
        updates = parse_overrides(overrides, cfg) if isinstance(overrides, list) else overrides
        cfg = merge(cfg, updates)
    return validate(cfg)


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML, atomically (a temp file renamed over the target)."""
    tmp = f"{os.fspath(path)}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        yaml.safe_dump(to_dict(cfg), f, sort_keys=False)
    os.replace(tmp, path)
