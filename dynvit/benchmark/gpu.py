"""``python -m dynvit.benchmark.gpu``: everything a GPU should tell us, in one unattended call.

    python -m dynvit.benchmark.gpu                      # one GPU, bf16, about 7 minutes
    python -m dynvit.benchmark.gpu --quick              # a small CPU run of the same code (seconds)
    python -m dynvit.benchmark.gpu --models deit_base_patch16_224 --methods evit tome   # what a budget skipped

Writes ``<out>/gpu.json`` and ``<out>/gpu.md`` after every row, so a run that is cut off leaves
what it measured:

* **Inference**: images/s of dense, dynvit top-k, dynvit threshold, EViT and ToMe on each model
  (random weights: speed does not depend on them) at each batch size, eager and compiled
  (:func:`dynvit.compile`: CUDA graphs through ``mode="reduce-overhead"`` where the shapes are
  static, i.e. everything but threshold mode), with the peak memory of one call. dynvit and EViT
  keep 0.7 / 0.49 / 0.34 of the patch tokens before blocks 3, 6 and 9 (DynamicViT's DeiT
  setting; threshold mode's untrained predictors are calibrated to it on the timed images), ToMe
  merges ``r`` tokens per block, ``r`` matched to top-k's GMACs (11 for 196 patches, table 1 of
  docs/BENCHMARKS.md). Per model and batch size every row is timed in one
  :func:`~dynvit.benchmark.speed.measure_speed` call (repeats interleaved) and its speed-up is
  paired with dense in the same runtime.
* **Training**: a bf16 fine-tune step of the model's ``configs/<name>_dynamicvit.yaml`` preset
  (masked path and token dropping; frozen teacher, distillation) against a dense training step,
  with the peak memory of each.

Every row fails on its own: its error goes into the JSON and the table, and the run goes on.
``--budget-s`` bounds the run: rows not started in time are listed as skipped (rerun them with
``--models``/``--methods``/``--batch``). No network is needed (``pretrained=False``).
"""
from __future__ import annotations

import argparse
import copy
import os
import time
import traceback

import timm
import torch
from torch import nn

from ..calibrate import calibrate
from ..compiled import compile as dynvit_compile
from ..ratios import normalize_prune_loc
from .cli import Run
from .compare import make_method
from .deploy import REPO
from .report import markdown_table, write_json, write_text
from .speed import measure_speed, paired_speedup
from .train_step import make_steps, measure_steps

__all__ = ["METHODS", "main"]

METHODS = ("dense", "topk", "threshold", "evit", "tome")
FULL = dict(models=["deit_small_patch16_224", "deit_base_patch16_224"], batch=[1, 64, 256], repeats=5, min_seconds=1.0,
            train_batch=128, budget_s=420.0, threads=None)
# Tiny ViTs on 32x32 images (16 patch tokens), for a CPU: the same code end to end in seconds.
QUICK_MODELS = {"quick_a": dict(embed_dim=64, depth=4, num_heads=2), "quick_b": dict(embed_dim=96, depth=4, num_heads=3)}
QUICK = dict(models=list(QUICK_MODELS), batch=[1, 4], repeats=2, min_seconds=0.05, train_batch=2, budget_s=900.0, threads=1)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dynvit.benchmark.gpu", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny models and batches on the CPU (what the test suite runs)")
    p.add_argument("--models", nargs="+", help=f"timm names (default {' '.join(FULL['models'])})")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--batch", type=int, nargs="+", help="batch sizes (default 1 64 256)")
    p.add_argument("--runtimes", nargs="+", choices=["eager", "compiled"], default=["eager", "compiled"])
    p.add_argument("--dtype", choices=["bf16", "fp32"], help="default bf16 on a GPU, fp32 on the CPU")
    p.add_argument("--device", help="default cuda when there is one, else cpu")
    p.add_argument("--backend", default="inductor", help="torch.compile backend (the test suite uses 'eager')")
    p.add_argument("--no-train", dest="train", action="store_false", help="skip the fine-tune step rows")
    p.add_argument("--train-batch", type=int, help="images per training step (default 128)")
    p.add_argument("--repeats", type=int)
    p.add_argument("--min-seconds", type=float)
    p.add_argument("--budget-s", type=float, help="start no new row after this many seconds (default 420; --quick 900)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default torch's; --quick 1)")
    p.add_argument("--out", default="out/gpu", help="folder of gpu.json and gpu.md")
    return p


class Progress:
    """Elapsed time, the budget, and the output files rewritten after every row."""

    def __init__(self, args, run: Run):
        self.start, self.args, self.run = time.perf_counter(), args, run
        self.log = run.progress_logger()
        self.result = {"command": run.command, "machine": run.machine, "settings": {k: v for k, v in vars(args).items()},
                       "inference": [], "training": [], "skipped": [], "errors": []}

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def say(self, text: str) -> None:
        self.log.info("[%6.0f s] %s", self.elapsed(), text)

    def over_budget(self, what: str) -> bool:
        if self.elapsed() < self.args.budget_s:
            return False
        self.result["skipped"].append(what)
        self.say(f"skipped (time budget {self.args.budget_s:.0f} s): {what}")
        return True

    def error(self, what: str, exc: BaseException) -> str:
        text = f"{type(exc).__name__}: {exc}"
        self.result["errors"].append({"what": what, "error": text, "traceback": traceback.format_exc(limit=6)})
        self.say(f"FAILED {what}: {text[:300]}")
        return text

    def save(self) -> None:
        self.result["elapsed_s"] = round(self.elapsed(), 1)
        write_json(os.path.join(self.args.out, "gpu.json"), self.result)
        write_text(os.path.join(self.args.out, "gpu.md"), report(self.result))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_mb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def build_methods(name: str, args, device, dtype, images: torch.Tensor, progress: Progress) -> dict[str, nn.Module]:
    """The inference methods on one randomly initialised dense model, on ``device`` in ``dtype``."""
    kwargs = dict(QUICK_MODELS[name], img_size=32, patch_size=8) if args.quick else {}
    dense = timm.create_model("deit_tiny_patch16_224" if args.quick else name, pretrained=False, **kwargs).eval()
    depth, n0 = len(dense.blocks), dense.patch_embed.num_patches
    loc = normalize_prune_loc([depth // 4, depth // 2, 3 * depth // 4] if depth >= 12 else [1, 2, 3], depth)
    common = dict(prune_loc=loc, keep_ratio=0.7)
    models = {}
    for method in args.methods:
        what = f"{name} {method}: build"
        try:
            if method in ("topk", "threshold"):
                model = make_method(dense, "dynvit", prune_mode=method, **common)
            elif method == "tome":
                model = make_method(dense, "tome", tome_r=max(1, round(11 * n0 / 196)))
            else:
                model = make_method(dense, method, **common) if method == "evit" else copy.deepcopy(dense)
            model = model.to(device=device, dtype=dtype).eval()
            if method == "threshold":
                calibrate(model, images[:64])  # untrained predictors: the budget on these images
            models[method] = model
        except Exception as exc:  # noqa: BLE001 - a failing row is recorded, the run goes on
            progress.error(what, exc)
    return models


def _wrap(models: dict[str, nn.Module], runtime: str, args, device) -> dict[str, nn.Module]:
    if runtime == "eager":
        return dict(models)
    # ours compile in one graph; a baseline may break the graph (allowed); batch size: static first,
    # then one dynamic graph (torch's automatic dynamic shapes), so 2 compiles per model, not 3
    return {method: dynvit_compile(model, fullgraph=method in ("topk", "threshold"), backend=args.backend,
                                   dynamic=None if device.type == "cuda" else False) for method, model in models.items()}


def inference_rows(name: str, models: dict[str, nn.Module], images: torch.Tensor, runtime: str, args, device,
                   progress: Progress) -> None:
    """Every method of one model in one runtime at every batch size, one interleaved timing per
    batch size; each speed-up paired with dense in that runtime."""
    modules = _wrap(models, runtime, args, device)
    for bs in args.batch:
        ready, first_call = {}, {}
        for method, module in modules.items():
            what = f"{name} {method} {runtime} batch {bs}"
            if progress.over_budget(what):
                continue
            try:
                _reset_peak(device)
                _sync(device)
                start = time.perf_counter()
                with torch.no_grad():
                    module(images[:bs])  # compiles at the first call of a shape
                _sync(device)
                first_call[method] = (time.perf_counter() - start, _peak_mb(device))
                if runtime == "compiled":
                    progress.say(f"compiled {what} in {first_call[method][0]:.1f} s")
                ready[method] = module
            except Exception as exc:  # noqa: BLE001
                progress.result["inference"].append({"model": name, "method": method, "runtime": runtime, "batch": bs,
                                                     "error": progress.error(what, exc)})
        if not ready:
            continue
        progress.say(f"{name} {runtime} batch {bs}: timing {', '.join(ready)}")
        try:
            speed = measure_speed(ready, images[:bs] if bs > 1 else images, (bs,), repeats=args.repeats,
                                  min_seconds=args.min_seconds, warmup=2)
        except Exception as exc:  # noqa: BLE001
            speed = {}
            progress.error(f"{name} {runtime} batch {bs}: timing", exc)
        for method in ready:
            row = {"model": name, "method": method, "runtime": runtime, "batch": bs,
                   "first_call_s": first_call[method][0], "peak_mb": first_call[method][1]}
            if method in speed:
                row.update(images_per_s=speed[method][bs]["images_per_s"], repeats=speed[method][bs]["repeats"])
                if "dense" in speed:
                    row["speedup"] = paired_speedup(speed[method][bs]["repeats"], speed["dense"][bs]["repeats"])
            progress.result["inference"].append(row)
        progress.save()


def training_rows(name: str, args, device, progress: Progress) -> None:
    """A fine-tune step (masked path, token dropping) against a dense step, mixed precision."""
    preset = name.removesuffix("_patch16_224").replace("_distilled", "")
    what = f"{name} training steps (batch {args.train_batch})"
    if progress.over_budget(what):
        return
    if not args.quick and not (REPO / "configs" / f"{preset}_dynamicvit.yaml").is_file():
        progress.error(what, FileNotFoundError(f"no configs/{preset}_dynamicvit.yaml preset"))
        return
    overrides = (dict(name="deit_tiny_patch16_224", kwargs=dict(QUICK_MODELS[name], img_size=32, patch_size=8),
                      prune_loc=[1, 2, 3]) if args.quick else None)
    precision = "bf16" if args.dtype == "bf16" else "no"
    progress.say(f"{what}: building")
    try:
        steps, drops = make_steps("deit_tiny" if args.quick else preset, args.train_batch, precision, device=device,
                                  model_overrides=overrides)
        steps.pop("teacher forward")
        peaks = {}
        for kind, fn in steps.items():
            _reset_peak(device)
            fn()
            _sync(device)
            peaks[kind] = _peak_mb(device)
        progress.say(f"{what}: timing")
        r = measure_steps(steps, args.repeats, args.min_seconds, warmup=1, sync=lambda: _sync(device))
    except Exception as exc:  # noqa: BLE001
        progress.result["training"].append({"model": name, "error": progress.error(what, exc)})
        return
    for kind in steps:
        progress.result["training"].append({"model": name, "kind": kind, "batch": args.train_batch, "precision": precision,
                                            "seconds": r["seconds"][kind], "ratio_to_dense": r["ratio_to_dense"][kind],
                                            "peak_mb": peaks[kind],
                                            "preset_path": kind == ("fine-tune, dropping" if drops else "fine-tune, masked")})
    progress.save()


def _fmt(value, spec: str) -> str:
    return "" if value is None else format(value, spec)


def report(result: dict) -> str:
    """The Markdown of a (possibly partial) run."""
    s, m = result["settings"], result["machine"]
    lines = [f"<!-- {result['command']} -->", f"{m.get('gpu', m['processor'])}, torch {m['torch']}, timm {m['timm']}; "
             f"{s['dtype']}; img/s the median of {s['repeats']} interleaved rounds, speed-ups paired with dense in the same "
             f"runtime; {result.get('elapsed_s', 0):.0f} s", ""]
    rows = [r for r in result["inference"]]
    if rows:
        body = [[r["model"], r["method"], r["runtime"], str(r["batch"]), _fmt(r.get("images_per_s"), ".1f"),
                 _fmt(r.get("speedup"), ".2f") + ("x" if "speedup" in r else ""), _fmt(r.get("peak_mb"), ".0f"),
                 _fmt(r.get("first_call_s"), ".1f"), r.get("error", "")[:80]] for r in rows]
        lines += [markdown_table(["model", "method", "runtime", "batch", "img/s", "speed-up", "peak MB",
                                  "first call (s)", "error"], body), ""]
    if result["training"]:
        body = [[r["model"], r.get("kind", ""), str(r.get("batch", "")), _fmt(r.get("seconds") and 1000 * r["seconds"], ".1f"),
                 _fmt(r.get("ratio_to_dense"), ".2f") + ("x" if "ratio_to_dense" in r else "")
                 + (" (preset)" if r.get("preset_path") else ""), _fmt(r.get("peak_mb"), ".0f"),
                 r.get("error", "")[:80]] for r in result["training"]]
        lines += [markdown_table(["model", "step", "batch", "ms per step", "/ dense step", "peak MB", "error"], body), ""]
    if result["skipped"]:
        lines.append("skipped (time budget): " + "; ".join(result["skipped"]))
    if result["errors"]:
        lines.append(f"{len(result['errors'])} row(s) failed; tracebacks in gpu.json")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None, extra: list[str] | None = None) -> dict:
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() and not args.quick else "cpu"))
    args.device = str(device)
    args.dtype = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    args.json = os.path.join(args.out, "gpu.json")
    run = Run("gpu", args, argv)
    progress = Progress(args, run)
    progress.result["machine"] = run.machine = {**run.machine, **({"gpu": torch.cuda.get_device_name(device)}
                                                                   if device.type == "cuda" else {})}
    progress.say(f"{run.command}: {args.models} on {device} in {args.dtype}, budget {args.budget_s:.0f} s")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    # Cheap and telling first: every model eager, then the training steps, then the compiled rows
    # (compiling takes most of the time): a budget cut loses compiled rows of the last models only.
    size = 32 if args.quick else 224
    images = torch.randn(max(max(args.batch), 64), 3, size, size, generator=torch.Generator().manual_seed(0))
    images = images.to(device=device, dtype=dtype)
    built: dict[str, dict[str, nn.Module]] = {}
    phases = [("eager", name) for name in args.models if "eager" in args.runtimes]
    phases += [("training", name) for name in args.models if args.train]
    phases += [("compiled", name) for name in args.models if "compiled" in args.runtimes]
    for phase, name in phases:
        try:
            if phase == "training":
                training_rows(name, args, device, progress)
                continue
            if name not in built:
                progress.say(f"{name}: building {', '.join(args.methods)}")
                built[name] = build_methods(name, args, device, dtype, images, progress)
            inference_rows(name, built[name], images, phase, args, device, progress)
        except Exception as exc:  # noqa: BLE001 - e.g. out of memory while building: the next model may fit
            progress.error(f"{name} {phase}", exc)
        progress.save()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    progress.say(f"done: {os.path.join(args.out, 'gpu.md')}, {os.path.join(args.out, 'gpu.json')}")
    run.report("\n" + report(progress.result))
    return progress.result


if __name__ == "__main__":
    main()
