"""Pieces of the training loop that are not the loop: model construction from a config,
parameter groups, the learning-rate rule, per-step seeding, checkpoints and the metrics file.
(Validation measures through :func:`dynvit.benchmark.evaluate_modes`.)
"""
from __future__ import annotations

import json
import logging
import os
import random
import shutil

import numpy as np
import timm
import torch
from torch import nn

from .config import Config, save_config
from .model import PruningOutput
from .weights import load_weights

__all__ = ["create_accelerator", "create_model", "create_teacher", "DenseTrainingModel", "param_groups", "create_scheduler",
           "set_learning_rates", "seed_step", "TrainState", "save_checkpoint", "find_checkpoint", "MetricsFile",
           "calibration_indices"]

_log = logging.getLogger(__name__)
LATEST = "latest"


# ---- the accelerator ----------------------------------------------------------------------
def create_accelerator(cfg: Config, launch):
    """The run's ``Accelerator``: precision and accumulation as reconciled by
    :func:`dynvit.preflight.launch_settings` (``launch``), Accelerate's trackers, the run's
    folders, seedable samplers (a resumed run sees the batches an uninterrupted one sees)."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, GradientAccumulationPlugin, ProjectConfiguration

    out_dir = cfg.train.output_dir
    return Accelerator(
        mixed_precision=launch.mixed_precision,
        gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=launch.grad_accum_steps, sync_with_dataloader=False),
        log_with=cfg.train.trackers or None,
        project_config=ProjectConfiguration(project_dir=out_dir, logging_dir=os.path.join(out_dir, "logs")),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=cfg.train.seed),
    )


# ---- models -------------------------------------------------------------------------------
def create_model(cfg: Config, num_classes: int) -> nn.Module:
    """The student: a dynvit model (``prune_loc`` non-empty), a baseline token reduction
    (``method`` evit, tome or random, patched onto the loaded dense model) or a plain timm
    model (a dense run, or ``method`` dense: a dense fine-tune with a pruning recipe)."""
    from .baselines import BASELINES
    from .patch import build_model

    m = cfg.model
    kwargs = {**m.kwargs, "num_classes": num_classes, "drop_path_rate": m.drop_path_rate}
    path = m.pretrained_path or None  # a file, a save_pretrained folder, local-dir:DIR or hf-hub:org/name
    if m.prune_loc and m.method == "dynvit":
        return build_model(m.name, prune_loc=m.prune_loc, keep_ratio=m.keep_ratio, sampler=m.sampler,
                           predictor_hidden_ratio=m.predictor_hidden_ratio, dropped_tokens=m.dropped_tokens,
                           predictor_prior=m.predictor_prior, match_scale=m.match_scale,
                           predictor_signals=m.predictor_signals,
                           pretrained=m.pretrained,
                           pretrained_path=path, **kwargs)
    model = timm.create_model(m.name, pretrained=m.pretrained, **kwargs)
    model.dynvit_meta = {"model_name": m.name, "timm_kwargs": kwargs}
    if path:
        load_weights(model, path)
    if m.method == "tome":
        BASELINES["tome"](model, r=m.tome_r)
    elif m.method not in ("dynvit", "dense"):
        BASELINES[m.method](model, prune_loc=m.prune_loc, keep_ratio=m.keep_ratio)
    return model


def create_teacher(student: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """A frozen dense copy of the student's backbone as it is now (before fine-tuning).

    Args:
        student: the model being fine-tuned (dynvit or baseline), built by :func:`create_model`.
        dtype: store the teacher in this dtype (``torch.bfloat16`` when the student trains in
            bf16: autocast then has no weights to cast on every call); default the student's.
    """
    meta = student.dynvit_meta
    kwargs = {**meta["timm_kwargs"], "drop_path_rate": 0.0}
    teacher = timm.create_model(meta["model_name"], **kwargs)
    own = student.state_dict()
    teacher.load_state_dict({k: own[k] for k in teacher.state_dict()})
    teacher.requires_grad_(False)
    ref = next(student.parameters())
    return teacher.to(device=ref.device, dtype=dtype or ref.dtype).eval()


class DenseTrainingModel(nn.Module):
    """The dense counterpart of :class:`dynvit.TrainingModel`: ``forward(x, tau)`` returns a
    :class:`dynvit.PruningOutput` with logits and final tokens, no masks (tau and
    noise_scale are ignored)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, tau: float = 1.0, noise_scale: float = 1.0) -> PruningOutput:
        tokens = self.model.forward_features(x)
        return PruningOutput(self.model.forward_head(tokens), tokens=tokens)


# ---- optimisation -------------------------------------------------------------------------
def param_groups(model: nn.Module, cfg: Config) -> list[dict]:
    """Predictors at the full learning rate, their signal weights and match scale at
    ``signal_lr_scale`` of it, the backbone at ``backbone_lr_scale`` (pruning runs); no weight
    decay on biases, norms, embeddings and those scalars; ``frozen_params`` left out."""
    o = cfg.optim
    pruning = bool(cfg.model.prune_loc)
    skip = set(getattr(model, "no_weight_decay", lambda: set())())
    groups: dict[str, dict] = {}
    for name, p in model.named_parameters():
        if any(name.startswith(prefix) for prefix in o.frozen_params):
            p.requires_grad_(False)
        if not p.requires_grad:
            continue
        part = "predictors" if name.startswith("predictors.") else "backbone"
        if part == "predictors" and name.endswith((".signal_weight", ".match_scale")):
            part = "predictor_scalars"
        no_decay = p.ndim <= 1 or name.endswith(".bias") or name in skip
        key = f"{part}_{'no_decay' if no_decay else 'decay'}"
        scale = {"backbone": o.backbone_lr_scale if pruning else 1.0, "predictor_scalars": o.signal_lr_scale}.get(part, 1.0)
        groups.setdefault(key, {"params": [], "name": key, "weight_decay": 0.0 if no_decay else o.weight_decay,
                                "lr_scale": scale, "backbone": part == "backbone"})["params"].append(p)
    return list(groups.values())


def create_scheduler(optimizer, cfg: Config, steps_per_epoch: int):
    """timm's ``optim.sched`` schedule (``create_scheduler_v2``) in optimizer steps, the
    warm-up ahead of ``train.epochs``; ``optim.sched_kwargs`` reach timm as they are."""
    from timm.scheduler import create_scheduler_v2

    o = cfg.optim
    scheduler, _ = create_scheduler_v2(
        optimizer, sched=o.sched, num_epochs=cfg.train.epochs, min_lr=o.min_lr, warmup_lr=o.warmup_lr,
        warmup_epochs=o.warmup_epochs, decay_epochs=o.decay_epochs, decay_milestones=list(o.decay_milestones),
        decay_rate=o.decay_rate, warmup_prefix=True, step_on_epochs=False, updates_per_epoch=steps_per_epoch,
        **o.sched_kwargs)
    return scheduler


def set_learning_rates(optimizer, scheduler, step: int, freeze_backbone_steps: int) -> None:
    """Learning rates at global ``step``: timm's schedule (times each group's ``lr_scale``),
    and 0 for the backbone before ``freeze_backbone_steps`` (DynamicViT's warm-up of the
    predictors). A pure function of the step, so a resumed run gets the same rates."""
    scheduler.step_update(step)
    if step < freeze_backbone_steps:
        for group in optimizer.param_groups:
            if group.get("backbone"):
                group["lr"] = 0.0


def seed_step(seed: int, step: int, micro: int, rank: int) -> None:
    """Seed every RNG from (seed, global step, micro-batch, process) so the randomness of a
    step (mixup, Gumbel noise, drop-path) does not depend on what ran before it."""
    s = int(np.random.SeedSequence([seed, step, micro, rank]).generate_state(1)[0])
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)


class TrainState:
    """The global optimizer step, checkpointed with ``accelerator.register_for_checkpointing``."""

    def __init__(self):
        self.step = 0

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])


# ---- checkpoints ----------------------------------------------------------------------------
def save_checkpoint(accelerator, root: str, step: int, cfg: Config, keep: int) -> str:
    """``accelerator.save_state`` into ``root/step_XXXXXXXX`` without ever exposing a partial
    checkpoint: state is written to a temporary folder that is renamed when complete, then
    the ``latest`` pointer is replaced atomically, then old checkpoints are removed."""
    name = f"step_{step:08d}"
    final, tmp = os.path.join(root, name), os.path.join(root, f".{name}.tmp")
    if accelerator.is_main_process:
        for stale in (d for d in os.listdir(root) if d.startswith(".step_")):  # left by a crash mid-save
            shutil.rmtree(os.path.join(root, stale), ignore_errors=True)
        os.makedirs(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(tmp)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_config(cfg, os.path.join(tmp, "config.yaml"))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        pointer = os.path.join(root, f".{LATEST}.tmp")
        with open(pointer, "w") as f:
            f.write(name + "\n")
        os.replace(pointer, os.path.join(root, LATEST))
        done = sorted(d for d in os.listdir(root) if d.startswith("step_"))
        for old in done[:-keep]:
            shutil.rmtree(os.path.join(root, old), ignore_errors=True)
        _log.info("saved checkpoint %s", final)
    accelerator.wait_for_everyone()
    return final


def find_checkpoint(resume: str, root: str) -> str | None:
    """The checkpoint to resume from: ``"auto"`` = the ``latest`` one under ``root`` (None
    when there is none), a path = that checkpoint (or the ``latest`` of that folder)."""
    if not resume:
        if os.path.isfile(os.path.join(root, LATEST)):
            raise FileExistsError(f"train.output_dir: {os.path.dirname(root)} holds checkpoints of an earlier run; resume "
                                  "it (--resume, or train.resume: auto) or choose another train.output_dir")
        return None
    base = root if resume == "auto" else resume
    pointer = os.path.join(base, LATEST)
    if os.path.isfile(pointer):
        with open(pointer) as f:
            return os.path.join(base, f.read().strip())
    if resume == "auto":
        return None
    if not os.path.isdir(resume):
        raise FileNotFoundError(f"train.resume: no checkpoint folder {resume!r}; give auto, a run's checkpoints folder "
                                "or one of its step_* folders, or \"\" to start fresh")
    return resume


# ---- calibration -----------------------------------------------------------------------------
def calibration_indices(targets, size: int, seed: int) -> list[int]:
    """``size`` training images (class-balanced, seeded) held out of training for calibrating
    threshold mode; at most a fifth of the split."""
    from .data import balanced_subset

    size = min(size, len(targets) // 5)
    if size < 1:
        return []
    return balanced_subset(targets, size, seed + 1)


# ---- metrics ------------------------------------------------------------------------------
class MetricsFile:
    """Appends one JSON object per record to ``path`` (main process only)."""

    def __init__(self, path: str, enabled: bool = True):
        self.path, self.enabled = path, enabled

    def write(self, record: dict) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
