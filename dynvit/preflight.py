"""Checks of a training config against what it names: the timm model, the launcher, the file
system, the trackers and the scheduler. ``train.py`` runs them before any data is scanned or
anything is written; each failure is a :class:`~dynvit.config.ConfigError` that names the key,
the problem and the fix.

Precision and gradient accumulation follow the launcher unless the config sets them:
``accelerate launch --mixed_precision`` reaches the script as ``ACCELERATE_MIXED_PRECISION``;
``--gradient_accumulation_steps`` is exported by Accelerate for DeepSpeed only, so it is read
from ``ACCELERATE_GRADIENT_ACCUMULATION_STEPS`` or else from the launcher's own command line.
"""
from __future__ import annotations

import contextlib
import dataclasses
import difflib
import inspect
import io
import logging
import os
from dataclasses import dataclass

import torch

from .config import Config, ConfigError

__all__ = ["LaunchSettings", "launch_settings", "launcher_argv", "preflight"]

_log = logging.getLogger(__name__)
# create_scheduler_v2 arguments train.py sets itself, or that do not fit a schedule fixed by train.epochs
_SCHED_OWN = {"optimizer", "sched", "num_epochs", "decay_epochs", "decay_milestones", "decay_rate", "min_lr", "warmup_lr",
              "warmup_epochs", "warmup_prefix", "step_on_epochs", "updates_per_epoch", "cooldown_epochs",
              "patience_epochs", "plateau_mode"}


@dataclass(frozen=True)
class LaunchSettings:
    """What a run uses, after the config and the launcher have been reconciled."""

    mixed_precision: str  # no, bf16 or fp16
    grad_accum_steps: int  # micro-batches per optimizer step
    num_processes: int  # training processes (WORLD_SIZE)


# ---- the launcher -----------------------------------------------------------------------------
def launcher_argv(pid: int | None = None) -> list[str] | None:
    """The arguments after ``launch`` of the ``accelerate launch`` command that started this
    process (its parent, for the plain and the torchrun launchers), or None."""
    pid = os.getppid() if pid is None else pid
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return None
    for i, arg in enumerate(argv[:-1]):
        if arg == "launch" and i and os.path.basename(argv[i - 1]).startswith("accelerate"):
            return argv[i + 1:]
        if arg == "accelerate.commands.launch":
            return argv[i + 1:]
    return None


def _launcher_accumulation(argv: list[str] | None) -> int | None:
    """``--gradient_accumulation_steps`` of an ``accelerate launch`` command line, parsed by
    Accelerate's own parser."""
    if not argv:
        return None
    from accelerate.commands.launch import launch_command_parser

    try:
        with contextlib.redirect_stderr(io.StringIO()):
            args, _ = launch_command_parser().parse_known_args(argv)
    except SystemExit:
        return None
    return getattr(args, "gradient_accumulation_steps", None)


def _main_process(environ) -> bool:
    return int(environ.get("RANK", environ.get("LOCAL_RANK", "0"))) == 0


def _reconcile(key: str, configured, launcher, source: str, default, environ):
    """The config's value when set (a one-line warning when the launcher says otherwise),
    else the launcher's, else ``default``."""
    if configured is None:
        return launcher if launcher is not None else default
    if launcher is not None and launcher != configured and _main_process(environ):
        _log.warning("%s=%s from the config overrides the launcher's %s (%s); unset it (null) to follow the launcher",
                     key, configured, launcher, source)
    return configured


def launch_settings(cfg: Config, environ=None, argv: list[str] | None = None) -> LaunchSettings:
    """Mixed precision, accumulation steps and process count of this run.

    Args:
        cfg: the run's config (``train.mixed_precision``, ``optim.grad_accum_steps``; null =
            the launcher's).
        environ: the environment (default ``os.environ``).
        argv: the launcher's arguments (default :func:`launcher_argv`).
    """
    environ = os.environ if environ is None else environ
    launcher_mp = environ.get("ACCELERATE_MIXED_PRECISION") or None
    mixed_precision = _reconcile("train.mixed_precision", cfg.train.mixed_precision, launcher_mp,
                                 "accelerate launch --mixed_precision / ACCELERATE_MIXED_PRECISION", "no", environ)
    text = environ.get("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "")
    launcher_accum = int(text) if text.isdigit() else _launcher_accumulation(launcher_argv() if argv is None else argv)
    accum = _reconcile("optim.grad_accum_steps", cfg.optim.grad_accum_steps, launcher_accum,
                       "accelerate launch --gradient_accumulation_steps", 1, environ)
    if accum < 1:
        raise ConfigError(f"gradient accumulation steps must be >= 1, got {accum} from the launcher")
    return LaunchSettings(str(mixed_precision), int(accum), int(environ.get("WORLD_SIZE", "1")))


def _check_precision(cfg: Config, launch: LaunchSettings, environ) -> None:
    cpu_only = environ.get("ACCELERATE_USE_CPU", "false").lower() in ("1", "true", "yes")
    if launch.mixed_precision == "fp16" and (cpu_only or not torch.cuda.is_available()):
        where = ("train.mixed_precision=fp16" if cfg.train.mixed_precision else
                 "the launcher's --mixed_precision fp16")
        raise ConfigError(f"{where} needs a CUDA GPU and this run has none; use bf16 or no "
                          "(--train.mixed_precision bf16)")


def _check_batch(cfg: Config, launch: LaunchSettings) -> None:
    per_step = launch.num_processes * launch.grad_accum_steps
    size = cfg.data.batch_size
    if size % per_step:
        parts = f"{launch.num_processes} process(es) x {launch.grad_accum_steps} accumulation step(s) = {per_step}"
        raise ConfigError(f"data.batch_size={size} (the global batch) is not a multiple of {parts}; use a multiple, "
                          f"e.g. --data.batch_size {-(-size // per_step) * per_step}, or change optim.grad_accum_steps")
    micro = size // per_step
    mixup = cfg.aug.mixup_prob > 0 and (cfg.aug.mixup > 0 or cfg.aug.cutmix > 0)
    if mixup and micro % 2:
        raise ConfigError(f"mixup and cutmix pair the images of a micro-batch, which holds {micro} (data.batch_size "
                          f"{size} / {per_step}); use an even micro-batch, e.g. --data.batch_size {2 * size}, or "
                          "--aug.mixup 0 --aug.cutmix 0")


# ---- the model ------------------------------------------------------------------------------
def _check_model(cfg: Config) -> None:
    """Build the configured model on the meta device (no weights, no memory): the name, the
    kwargs, prune_loc against its depth, and every pruning option are checked by the code
    that will build it."""
    import timm

    from .training import create_model

    probe = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, pretrained=False, pretrained_path=None))
    if not timm.is_model(cfg.model.name):
        close = difflib.get_close_matches(cfg.model.name, timm.list_models(), n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise ConfigError(f"model.name: {cfg.model.name!r} is not a timm model; {hint}timm.list_models('*vit*') lists them")
    try:
        with torch.device("meta"):
            create_model(probe, num_classes=cfg.model.kwargs.get("num_classes", 1000))
    except TypeError as e:
        raise ConfigError(f"model.kwargs {cfg.model.kwargs}: {e}; use arguments of {cfg.model.name}'s timm class") from None
    except NotImplementedError as e:
        raise ConfigError(f"model.name: {e}") from None
    except ValueError as e:
        text = str(e)
        key = next((k for k in ("prune_loc", "keep_ratio") if text.startswith(k)), None)
        raise ConfigError(f"model.{text}" if key else f"model: {text}") from None


# ---- paths, trackers, scheduler -----------------------------------------------------------------
def _check_paths(cfg: Config) -> None:
    from .training import find_checkpoint

    if not cfg.data.path:
        raise ConfigError("data.path is unset: give --data.path DIR (a folder holding the train and val image folders, "
                          "one sub-folder per class) or a --config preset that sets it")
    for split, what in ((cfg.data.train_split, "training"), (cfg.data.val_split, "validation")):
        folder = os.path.join(cfg.data.path, split)
        if not os.path.isdir(folder):
            raise ConfigError(f"data.path: {what} folder {folder!r} does not exist; data.path must hold the "
                              f"{split!r} split (data.{'train' if what == 'training' else 'val'}_split), one sub-folder "
                              "of images per class")
    path = cfg.model.pretrained_path
    if path and not path.startswith("hf-hub:") and not os.path.exists(path.removeprefix("local-dir:")):
        raise ConfigError(f"model.pretrained_path: {path!r} does not exist; give a weight file, a folder written by "
                          "dynvit.save_pretrained, local-dir:DIR or hf-hub:org/name")
    try:
        find_checkpoint(cfg.train.resume, os.path.join(cfg.train.output_dir, "checkpoints"))
    except (FileNotFoundError, FileExistsError) as e:
        raise ConfigError(str(e)) from None


def _check_trackers(cfg: Config) -> None:
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS, get_available_trackers

    known = sorted(LOGGER_TYPE_TO_CLASS)
    available = {str(t) for t in get_available_trackers()}
    for name in cfg.train.trackers:
        if name == "all":
            continue
        if name not in LOGGER_TYPE_TO_CLASS:
            close = difflib.get_close_matches(name, known, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"train.trackers: {name!r} is not an Accelerate tracker{hint} Choose from {', '.join(known)}, "
                              "or [] for none")
        if name not in available:
            raise ConfigError(f"train.trackers: {name} is not installed; pip install {name}, or leave it out "
                              "(--train.trackers [] logs to metrics.jsonl only)")


def _check_scheduler(cfg: Config) -> None:
    from timm.scheduler import create_scheduler_v2

    allowed = sorted(set(inspect.signature(create_scheduler_v2).parameters) - _SCHED_OWN)
    unknown = sorted(set(cfg.optim.sched_kwargs) - set(allowed))
    if unknown:
        raise ConfigError(f"optim.sched_kwargs: {', '.join(unknown)} not accepted; other create_scheduler_v2 arguments "
                          f"are {', '.join(allowed)} (the rest are optim.* keys)")


def _check_hub(cfg: Config) -> None:
    if not cfg.train.push_to_hub:
        return
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(cfg.train.push_to_hub)
    except HFValidationError as e:
        raise ConfigError(f"train.push_to_hub: {str(e).splitlines()[0].rstrip('.')}; give a Hub repo id, org/name") from None


def preflight(cfg: Config, environ=None) -> LaunchSettings:
    """Every check above, cheapest first; return the launch settings of the run."""
    environ = os.environ if environ is None else environ
    _check_paths(cfg)
    _check_trackers(cfg)
    _check_scheduler(cfg)
    _check_hub(cfg)
    launch = launch_settings(cfg, environ)
    _check_precision(cfg, launch, environ)
    _check_batch(cfg, launch)
    _check_model(cfg)
    return launch
