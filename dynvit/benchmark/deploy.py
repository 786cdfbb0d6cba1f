"""``python -m dynvit.benchmark speed``: dense against pruned where users deploy, in one run.

    python -m dynvit.benchmark speed --preset demo          # the demo's CIFAR-10 ViT (shared teacher)
    python -m dynvit.benchmark speed --preset deit_small    # DeiT-S at 224, random weights
    python -m dynvit.benchmark speed --checkpoint runs/demo/dynvit/final --data ../shared/data/cifar10/test
    python -m dynvit.benchmark speed --config configs/deit_small_dynamicvit.yaml --model.name vit_small_patch16_rope_224

A preset is a training config of ``configs/`` (its ``model:`` section says how the model is
patched) with, for ``demo``, the shared dense CIFAR-10 checkpoint as weights and its test images.
Untrained predictors (every preset) get thresholds from :func:`dynvit.calibrate` so that threshold
mode keeps the preset's budget on the timed images. The dense model, top-k and threshold mode
are timed eager, compiled (:func:`dynvit.compile`) and in ONNX Runtime (exports checked against
PyTorch), repeats interleaved; each speed-up is paired with dense *in the same runtime*, and
``compiled / limit`` is the compiled speed-up over the GMACs limit (dense / pruned GMACs).
"""
from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch
from torch import nn

from ..calibrate import calibrate
from ..config import load_config
from ..flops import count_flops
from ..hub import load_pretrained
from ..training import create_model
from .accuracy import spread_indices
from .cli import Run, add_timing_options
from .compare import dense_backbone
from .report import markdown_table
from .runtimes import RUNTIMES, deployment_speed

__all__ = ["PRESETS", "add_arguments", "main", "speed_table", "load_images"]

REPO = Path(__file__).resolve().parents[2]
SHARED = REPO.parent / "shared"
#: name -> (config, dense weights, evaluation images); paths relative to the repository
PRESETS = {
    "demo": ("configs/cifar10_dynvit.yaml", SHARED / "checkpoints" / "cifar10_vit_dense", SHARED / "data" / "cifar10" / "test"),
    "deit_tiny": ("configs/deit_tiny_dynamicvit.yaml", None, None),
    "deit_small": ("configs/deit_small_dynamicvit.yaml", None, None),
    "deit_base": ("configs/deit_base_dynamicvit.yaml", None, None),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", choices=sorted(PRESETS), default="demo")
    p.add_argument("--config", help="a training config whose model: section to patch with (instead of the preset's)")
    p.add_argument("--weights", help="dense weights to start from (a save_pretrained folder or a file); 'none' = random")
    p.add_argument("--checkpoint", help="a trained dynvit save_pretrained folder: time it (as trained) against its backbone")
    p.add_argument("--data", help="ImageFolder split whose images fill the batches; 'none' = random images")
    p.add_argument("--images", type=int, default=256, help="images spread over the classes (shuffled)")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 64])
    p.add_argument("--runtimes", nargs="+", choices=RUNTIMES, default=list(RUNTIMES))
    p.add_argument("--flops-images", type=int, default=64, help="images averaged for threshold-mode GMACs")
    p.add_argument("--seed", type=int, default=0)
    add_timing_options(p, json="out/speed.json", repeats=5, min_seconds=1.0)


def load_images(folder: Path | None, model: nn.Module, count: int, seed: int = 0, data_cfg=None) -> torch.Tensor:
    """``count`` images spread over the classes of an ImageFolder split, preprocessed for ``model``
    (with the preprocessing ``data_cfg``, a :class:`dynvit.config.DataConfig`, sets) and shuffled;
    random normal images when ``folder`` is None."""
    from ..config import DataConfig
    from ..data import SeededImageDataset, build_transform, resolve_data, scan_image_folder

    g = torch.Generator().manual_seed(seed)
    if folder is None:
        return torch.randn(count, model.in_chans, *model.patch_embed.img_size, generator=g)
    transform = build_transform(resolve_data(model, data_cfg or DataConfig()), is_training=False)
    data = SeededImageDataset(scan_image_folder(folder, what="timing"), transform)
    images = torch.stack([data[i][0] for i in spread_indices(len(data), count)])
    return images[torch.randperm(len(images), generator=g)]


def build_models(args, extra: list[str]) -> tuple[dict[str, nn.Module], torch.Tensor, str]:
    """dense, top-k and threshold models (eval mode), the images, and what they are."""
    config, weights, data = PRESETS[args.preset]
    data = None if args.data == "none" else Path(args.data) if args.data else data
    torch.manual_seed(args.seed)
    if args.checkpoint:
        pruned, what, data_cfg = load_pretrained(args.checkpoint), f"{args.checkpoint} (trained)", None
    else:
        config = args.config or REPO / config
        weights = None if args.weights == "none" else args.weights or weights
        cfg = load_config(config, extra or None)  # --model.key value overrides, as train.py takes them
        cfg.model.pretrained, cfg.model.pretrained_path = False, str(weights) if weights else None
        num_classes = load_pretrained(weights).num_classes if weights else 1000
        pruned, data_cfg = create_model(cfg, num_classes), cfg.data
        what = f"{Path(config).name} on {'random weights' if weights is None else weights}, untrained predictors"
    pruned.eval()
    images = load_images(data if data is not None and Path(data).is_dir() else None, pruned, args.images, args.seed, data_cfg)
    topk, threshold = copy.deepcopy(pruned), pruned
    topk.prune_mode, threshold.prune_mode = "topk", "threshold"
    if not args.checkpoint:
        calibrate(threshold, images)  # untrained predictors: thresholds that keep the budget on these images
    return {"dense": dense_backbone(pruned), "top-k": topk, "threshold": threshold}, images, what


def speed_table(result: dict, gmacs: dict[str, float], dense: str = "dense") -> str:
    """The Markdown table of :func:`~dynvit.benchmark.runtimes.deployment_speed`'s result: one row
    per model and batch size, a pair of columns per runtime (img/s, speed-up over dense there)."""
    speed = result["speed"]
    runtimes = [r for r in RUNTIMES if r in speed[dense]]
    names = {"eager": "eager", "compiled": "compiled", "onnxruntime": "ONNX Runtime"}
    header = ["model", "batch", "GMACs", "speed-up limit"]
    for r in runtimes:
        header += [f"{names[r]} img/s", f"{names[r]} speed-up"] + (["compiled / limit"] if r == "compiled" else [])
    body = []
    for bs in next(iter(speed[dense].values())):
        for name, by_runtime in speed.items():
            limit = gmacs[dense] / gmacs[name]
            line = [name, str(bs), f"{gmacs[name]:.4g}", f"{limit:.2f}x"]
            for r in runtimes:
                s = by_runtime[r][bs]
                line += [f"{s['images_per_s']:.1f}", f"{s['speedup']:.2f}x"]
                if r == "compiled":
                    line.append(f"{s['speedup'] / limit:.2f}")
            body.append(line)
    return markdown_table(header, body)


def cost_lines(result: dict) -> list[str]:
    """What compiling (first call per batch size) and exporting cost, per model."""
    lines = []
    if result["compile_seconds"]:
        lines.append("compiling (the first call at each batch size): " + "; ".join(
            f"{name} " + ", ".join(f"{s:.1f} s at batch {bs}" for bs, s in by.items())
            for name, by in result["compile_seconds"].items()))
    def export(name: str, o: dict) -> str:
        text = f"{name} {o['export_seconds']:.1f} s (max |diff| {o['max_abs_diff']:.1e})" if "export_seconds" in o else ""
        if "single_image_export_seconds" in o:
            text += (" and " if text else f"{name} ") + (f"for single images {o['single_image_export_seconds']:.1f} s "
                                                         f"(max |diff| {o['single_image_max_abs_diff']:.1e})")
        return text

    exported = [text for n, o in result["onnx"].items() if (text := export(n, o))]
    if exported:
        lines.append("ONNX export (checked against PyTorch): " + "; ".join(exported)
                     + "; threshold mode runs batch 1 on its graph for single images (no padding), larger batches "
                       "on its graph of any batch size (padded to each batch's largest kept count)")
    return lines


def main(argv: list[str], extra: list[str]) -> dict:
    p = argparse.ArgumentParser(prog="python -m dynvit.benchmark speed", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    args = p.parse_args(argv)
    run = Run("speed", args, argv + extra)
    models, images, what = build_models(args, extra)
    size = tuple(images.shape[1:])
    gmacs = {name: count_flops(m, size, images=images[: args.flops_images]) if getattr(m, "prune_mode", "") == "threshold"
             else count_flops(m, size) for name, m in models.items()}
    result = deployment_speed(models, images, args.batch, runtimes=args.runtimes, repeats=args.repeats,
                              min_seconds=args.min_seconds)
    run.report(f"<!-- {run.command} -->\n{what}; {len(images)} images, {size[1]}x{size[2]}; img/s the median of "
               f"{args.repeats} interleaved rounds, speed-ups the median of the ratios to dense in the same runtime within a "
               f"round.\n{run.load_line(result['other_cpu_share'])}\n")
    run.report(speed_table(result, gmacs), *("\n" + line for line in cost_lines(result)))
    run.write({"what": what, "gmacs": gmacs, **result})
    return result
