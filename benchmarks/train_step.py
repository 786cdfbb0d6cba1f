"""What one fine-tune step costs next to one dense training step, on this machine.

    python benchmarks/train_step.py [--models deit_tiny deit_small] [--batch 16] [--repeats 5]
                                    [--mixed-precision no|bf16] [--no-explicit]

Per model, in one process, with the pieces train.py uses (the DynamicViT preset of
``configs/<model>_dynamicvit.yaml``, random weights, 224x224 random images):

* **dense**: the plain timm model, ``DenseTrainingModel``, cross-entropy, backward, AdamW
  (timm's optimizer factory on :func:`dynvit.training.param_groups`), as a dense run of
  train.py does;
* **fine-tune**: ``dynvit.TrainingModel`` (masked path, Gumbel masks), the frozen teacher of
  :func:`dynvit.training.create_teacher` under ``inference_mode``, ``PruningLoss`` with both
  distillation terms and the keep-ratio term, backward, AdamW;
* **fine-tune, explicit attention**: the same with the explicit float32 softmax in the
  masked blocks and the teacher under ``no_grad`` (the attention and teacher of the previous
  version; the predictor is the current one);
* **fine-tune, dropping**: the fine-tune step with ``TrainingModel(model, drop_tokens=True)``
  (dropped tokens removed after the first block of each stage; untrained predictors keep
  about the target fractions);
* **teacher forward**: the teacher's share of a fine-tune step.

Data loading, Mixup, EMA and logging are left out (the same for both kinds of step). Every
kind is warmed up, then the repeats go round the kinds in turn so a change in machine load
hits all of them, and the median is reported with the share of the CPUs that other
processes took while timing (:class:`dynvit.benchmark.OtherCpuUse`); figures taken while
others used more than 5% are not for publishing. Each ratio also comes as a ratio of this
process's CPU time (in brackets): with ``--threads 1`` that is the work a step does, which a
busy machine distorts far less than the wall time.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch
from timm.models.vision_transformer import Attention, Block
from timm.optim import create_optimizer_v2

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import dynvit  # noqa: E402
import dynvit.families.vit  # noqa: E402
from dynvit.attention import masked_block  # noqa: E402
from dynvit.benchmark import OtherCpuUse, machine_info, markdown_table, write_json  # noqa: E402
from dynvit.config import load_config  # noqa: E402
from dynvit.losses import PruningLoss, classification_criterion  # noqa: E402
from dynvit.training import DenseTrainingModel, create_model, create_teacher, param_groups  # noqa: E402



@contextlib.contextmanager
def explicit_attention():
    """The masked blocks with the explicit float32 softmax (the previous training path)."""
    registry = dynvit.families.vit._MASKED_BLOCKS
    key = (Block, Attention)
    fused = registry[key]
    registry[key] = functools.partial(masked_block, explicit=True)
    try:
        yield
    finally:
        registry[key] = fused


def make_steps(name: str, batch: int, mixed_precision: str, explicit: bool) -> dict:
    """One closure per kind of step, each running one full step on its own model."""
    preset = REPO / "configs" / f"{name}_dynamicvit.yaml"
    cfg = load_config(preset, {"model": {"pretrained": False}, "train": {"mixed_precision": mixed_precision}})
    dense_cfg = load_config(preset, {"model": {"pretrained": False, "prune_loc": []}})
    num_classes = 1000
    autocast = (torch.autocast("cpu", dtype=torch.bfloat16) if mixed_precision == "bf16"
                else contextlib.nullcontext())
    g = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, 224, 224, generator=g)
    target = torch.softmax(torch.randn(batch, num_classes, generator=g), dim=-1)  # soft targets, as under Mixup
    criterion_cls = classification_criterion(mixup=True, smoothing=cfg.aug.smoothing)

    def optimizer(model, c):
        return create_optimizer_v2(param_groups(model, c), opt=c.optim.opt, lr=1e-6, weight_decay=c.optim.weight_decay,
                                   eps=c.optim.eps)

    torch.manual_seed(0)
    dense = create_model(dense_cfg, num_classes).train()
    dense_net, dense_opt = DenseTrainingModel(dense), optimizer(dense, dense_cfg)
    dense_loss = PruningLoss(criterion_cls, (), distill_logits_weight=0.0, distill_tokens_weight=0.0)

    torch.manual_seed(0)
    model = create_model(cfg, num_classes).train()
    teacher = create_teacher(model, torch.bfloat16 if mixed_precision == "bf16" else None)
    net, opt = dynvit.TrainingModel(model), optimizer(model, cfg)
    dropping_net = dynvit.TrainingModel(model, drop_tokens=True)
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

    steps = {"dense": dense_step, "fine-tune": fine_tune_step,
             "fine-tune, dropping": functools.partial(fine_tune_step, dropping=True), "teacher forward": teacher_forward}
    if explicit:
        steps["fine-tune, explicit attention"] = old_step
    return steps


def measure(steps: dict, repeats: int, min_seconds: float, warmup: int) -> dict:
    """Wall and CPU seconds per call of each closure: warm-up, then interleaved repeats,
    medians. The CPU time (this process, all threads) is a second opinion on a busy machine:
    with one thread it is the work a step does, whatever else runs."""
    calls = {}
    for name, fn in steps.items():
        for _ in range(warmup):
            fn()
        t0 = time.perf_counter()
        fn()
        calls[name] = max(1, round(min_seconds / (time.perf_counter() - t0)))
    wall, cpu = {name: [] for name in steps}, {name: [] for name in steps}
    with OtherCpuUse() as other:
        for _ in range(repeats):
            for name, fn in steps.items():
                t0, c0 = time.perf_counter(), time.process_time()
                for _ in range(calls[name]):
                    fn()
                wall[name].append((time.perf_counter() - t0) / calls[name])
                cpu[name].append((time.process_time() - c0) / calls[name])
    return {"seconds": {n: statistics.median(t) for n, t in wall.items()},
            "cpu_seconds": {n: statistics.median(t) for n, t in cpu.items()},
            "repeats": wall, "cpu_repeats": cpu, "calls": calls,
            "other_cpu_share": other.share, "steal_share": other.steal}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["deit_tiny", "deit_small"],
                   help="names with a configs/<name>_dynamicvit.yaml preset")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--min-seconds", type=float, default=1.0, help="minimum length of one timed repeat")
    p.add_argument("--mixed-precision", choices=["no", "bf16"], default="no")
    p.add_argument("--no-explicit", dest="explicit", action="store_false",
                   help="skip the fine-tune step with the explicit (previous) attention")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's, usually the core count)")
    p.add_argument("--json", default="out/train_step.json")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    load = os.getloadavg()[0]
    rows, lines = {}, []
    kinds = ["fine-tune", "fine-tune, dropping"] + (["fine-tune, explicit attention"] if args.explicit else [])
    for name in args.models:
        r = measure(make_steps(name, args.batch, args.mixed_precision, args.explicit), args.repeats,
                    args.min_seconds, args.warmup)
        rows[name] = r
        s, c = r["seconds"], r["cpu_seconds"]
        line = [name, f"{s['dense']:.2f}"]
        for kind in kinds:
            line += [f"{s[kind]:.2f}", f"{s[kind] / s['dense']:.2f}x ({c[kind] / c['dense']:.2f}x)"]
        line += [f"{s['teacher forward']:.2f}", f"{100 * (r['other_cpu_share'] or 0):.0f}%"]
        lines.append(line)
    header = ["model", "dense step (s)"]
    for kind, short in zip(kinds, ["fine-tune", "dropping", "explicit attention"]):
        header += [f"{short} step (s)", f"{short} / dense (CPU time)"]
    header += ["teacher forward (s)", "CPU taken by others"]
    info = machine_info()
    command = "python benchmarks/train_step.py " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    print(f"<!-- {command} -->\n{info['processor']}, {info['threads']} threads, torch {info['torch']}, timm "
          f"{info['timm']}; batch {args.batch}, 224x224, mixed precision {args.mixed_precision}; median of "
          f"{args.repeats} interleaved repeats; 1-minute load average {load:.2f} at the start\n")
    print(markdown_table(header, lines))
    write_json(args.json, {"command": command, "machine": info, "load_average_start": load, "batch": args.batch,
                           "mixed_precision": args.mixed_precision, "rows": rows})


if __name__ == "__main__":
    main()
