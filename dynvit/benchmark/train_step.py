"""``python -m dynvit.benchmark train-step``: what one pruning fine-tune step costs next to one
dense training step (docs/BENCHMARKS.md, section 6).

    python -m dynvit.benchmark train-step [--models deit_tiny deit_small] [--batch 16] [--repeats 5]
                                          [--mixed-precision no|bf16] [--explicit]

Per model, in one process, with the pieces train.py uses (the DynamicViT preset of
``configs/<model>_dynamicvit.yaml``, random weights, 224x224 random images):

* **dense**: the plain timm model, ``DenseTrainingModel``, cross-entropy, backward, AdamW
  (timm's optimizer factory on :func:`dynvit.training.param_groups`), as a dense run of
  train.py does;
* **fine-tune, masked**: ``dynvit.TrainingModel`` (masked path, Gumbel masks), the frozen
  teacher of :func:`dynvit.training.create_teacher` under ``inference_mode``, ``PruningLoss``
  with both distillation terms and the keep-ratio term, backward, AdamW;
* **fine-tune, dropping**: the same step with ``TrainingModel(model, drop_tokens=True)``
  (dropped tokens removed after the first block of each stage; untrained predictors keep
  about the target fractions);
* with ``--explicit``, **fine-tune, explicit attention**: the masked step with the explicit
  float32 softmax and the teacher under ``no_grad`` (the previous version's attention);
* **teacher forward**: the teacher's share of a fine-tune step.

The preset's own path (its ``model.drop_tokens``) is marked. Data loading, Mixup, EMA and
logging are left out (the same for both kinds of step). Every kind is warmed up, then the
repeats go round the kinds in turn so a change in machine load hits all of them; each ratio is
the median of the ratios within a round, also as a ratio of this process's CPU time (in
brackets: with ``--threads 1`` that is the work a step does, which a busy machine distorts far
less than the wall time).
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import statistics
import time

import torch
from timm.models.vision_transformer import Attention, Block
from timm.optim import create_optimizer_v2

from ..attention import masked_block
from ..config import load_config
from ..families import vit as vit_family
from ..losses import PruningLoss, classification_criterion
from ..model import TrainingModel
from ..training import DenseTrainingModel, create_model, create_teacher, param_groups
from .cli import Run, add_timing_options
from .deploy import REPO
from .report import markdown_table
from .speed import OtherCpuUse

__all__ = ["make_steps", "measure_steps", "main"]


@contextlib.contextmanager
def explicit_attention():
    """The masked blocks with the explicit float32 softmax (the previous training path)."""
    registry = vit_family._MASKED_BLOCKS
    key = (Block, Attention)
    fused = registry[key]
    registry[key] = functools.partial(masked_block, explicit=True)
    try:
        yield
    finally:
        registry[key] = fused


def make_steps(name: str, batch: int, mixed_precision: str = "no", *, explicit: bool = False, device="cpu",
               model_overrides: dict | None = None) -> tuple[dict, bool]:
    """One closure per kind of step, each running one full step on its own model, and whether
    the preset ``configs/<name>_dynamicvit.yaml`` drops tokens in training. ``model_overrides``
    change the preset's ``model:`` section (a smaller model for a quick run)."""
    preset = REPO / "configs" / f"{name}_dynamicvit.yaml"
    common = {"pretrained": False, **(model_overrides or {})}
    cfg = load_config(preset, {"model": common, "train": {"mixed_precision": mixed_precision}})
    dense_cfg = load_config(preset, {"model": {**common, "prune_loc": []}})
    num_classes = 1000
    device = torch.device(device)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if mixed_precision == "bf16"
                else contextlib.nullcontext())
    torch.manual_seed(0)
    dense = create_model(dense_cfg, num_classes).to(device).train()
    g = torch.Generator().manual_seed(0)
    images = torch.randn(batch, dense.in_chans, *dense.patch_embed.img_size, generator=g).to(device)
    target = torch.softmax(torch.randn(batch, num_classes, generator=g), dim=-1).to(device)  # soft, as under Mixup
    criterion_cls = classification_criterion(mixup=True, smoothing=cfg.aug.smoothing)

    def optimizer(model, c):
        return create_optimizer_v2(param_groups(model, c), opt=c.optim.opt, lr=1e-6, weight_decay=c.optim.weight_decay,
                                   eps=c.optim.eps)

    dense_net, dense_opt = DenseTrainingModel(dense), optimizer(dense, dense_cfg)
    dense_loss = PruningLoss(criterion_cls, (), distill_logits_weight=0.0, distill_tokens_weight=0.0)

    torch.manual_seed(0)
    model = create_model(cfg, num_classes).to(device).train()
    teacher = create_teacher(model, torch.bfloat16 if mixed_precision == "bf16" else None).to(device)
    net, opt = TrainingModel(model), optimizer(model, cfg)
    dropping_net = TrainingModel(model, drop_tokens=True)
    loss = PruningLoss(criterion_cls, model.keep_ratio, cls_weight=cfg.loss.cls_weight,
                       ratio_weight=cfg.loss.ratio_weight, distill_logits_weight=cfg.loss.distill_logits_weight,
                       distill_tokens_weight=cfg.loss.distill_tokens_weight)
    p = model.num_prefix_tokens

    def dense_step():
        with autocast:
            terms = dense_loss(dense_net(images), target)
        terms.total.backward()
        dense_opt.step()
        dense_opt.zero_grad()

    def teacher_forward(no_grad: bool = False):
        with autocast, (torch.no_grad() if no_grad else torch.inference_mode()):
            tokens = teacher.forward_features(images)
            return teacher.forward_head(tokens), tokens

    def fine_tune_step(old: bool = False, dropping: bool = False):
        with autocast:
            out = (dropping_net if dropping else net)(images, 1.0)
            t_logits, t_tokens = teacher_forward(no_grad=old)
            terms = loss(out, target, t_logits, t_tokens, p)
        terms.total.backward()
        opt.step()
        opt.zero_grad()

    def old_step():
        with explicit_attention():
            fine_tune_step(old=True)

    steps = {"dense": dense_step, "fine-tune, masked": fine_tune_step,
             "fine-tune, dropping": functools.partial(fine_tune_step, dropping=True), "teacher forward": teacher_forward}
    if explicit:
        steps["fine-tune, explicit attention"] = old_step
    return steps, cfg.model.drop_tokens


def measure_steps(steps: dict, repeats: int, min_seconds: float, warmup: int, sync=lambda: None) -> dict:
    """Wall and CPU seconds per call of each closure: warm-up, then interleaved repeats, medians,
    and each kind's ratio to ``dense`` paired within a round (``sync`` waits for the device)."""
    calls = {}
    for name, fn in steps.items():
        for _ in range(warmup):
            fn()
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        calls[name] = max(1, round(min_seconds / (time.perf_counter() - t0)))
    wall, cpu = {name: [] for name in steps}, {name: [] for name in steps}
    with OtherCpuUse() as other:
        for _ in range(repeats):
            for name, fn in steps.items():
                sync()
                t0, c0 = time.perf_counter(), time.process_time()
                for _ in range(calls[name]):
                    fn()
                sync()
                wall[name].append((time.perf_counter() - t0) / calls[name])
                cpu[name].append((time.process_time() - c0) / calls[name])

    def ratio(times, name):
        return statistics.median(t / d for t, d in zip(times[name], times["dense"]))

    return {"seconds": {n: statistics.median(t) for n, t in wall.items()},
            "cpu_seconds": {n: statistics.median(t) for n, t in cpu.items()},
            "ratio_to_dense": {n: ratio(wall, n) for n in steps}, "cpu_ratio_to_dense": {n: ratio(cpu, n) for n in steps},
            "repeats": wall, "cpu_repeats": cpu, "calls": calls, "other_cpu_share": other.share,
            "steal_share": other.steal}


def main(argv: list[str], extra: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m dynvit.benchmark train-step", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["deit_tiny", "deit_small"],
                   help="names with a configs/<name>_dynamicvit.yaml preset")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--mixed-precision", choices=["no", "bf16"], default="no")
    p.add_argument("--explicit", action="store_true", help="also time the masked step with the explicit (previous) attention")
    add_timing_options(p, json="out/train_step.json", repeats=5, min_seconds=1.0)
    args = p.parse_args(argv)
    run = Run("train-step", args, argv)
    kinds = ["fine-tune, masked", "fine-tune, dropping"] + (["fine-tune, explicit attention"] if args.explicit else [])
    rows, lines, other = {}, [], 0.0
    for name in args.models:
        steps, drops = make_steps(name, args.batch, args.mixed_precision, explicit=args.explicit)
        r = rows[name] = measure_steps(steps, args.repeats, args.min_seconds, args.warmup)
        r["preset_path"] = "fine-tune, dropping" if drops else "fine-tune, masked"
        s, q, c = r["seconds"], r["ratio_to_dense"], r["cpu_ratio_to_dense"]
        line = [name, f"{s['dense']:.2f}"]
        for kind in kinds:
            mark = " (preset)" if kind == r["preset_path"] else ""
            line += [f"{s[kind]:.2f}", f"{q[kind]:.2f}x ({c[kind]:.2f}x){mark}"]
        lines.append(line + [f"{s['teacher forward']:.2f}"])
        other = max(other, r["other_cpu_share"] or 0.0)
    header = ["model", "dense step (s)"]
    for kind in kinds:
        short = kind.removeprefix("fine-tune, ")
        header += [f"{short} step (s)", f"{short} / dense (CPU time)"]
    header.append("teacher forward (s)")
    run.report(f"<!-- {run.command} -->\nbatch {args.batch}, 224x224, mixed precision {args.mixed_precision}; median of "
               f"{args.repeats} interleaved repeats, ratios paired within a round.\n{run.load_line(other)}\n")
    run.report(markdown_table(header, lines))
    run.write({"batch": args.batch, "mixed_precision": args.mixed_precision, "rows": rows})
    return rows
