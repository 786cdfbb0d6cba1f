"""onnxruntime images/s of a dense vs a top-k pruned ONNX export, measured in one run.

    python benchmarks/export_speed.py [--model deit_small_patch16_224] [--batch 1 16] [--repeats 15]

Default: deit_small at 224, prune_loc (3, 6, 9), keep ratio 0.7 (top-k). Random weights are
enough: top-k keeps the same number of tokens whatever the weights. Both exports are checked
against PyTorch first; each timing repeat runs dense then pruned on the same batch, warm-up
repeats are discarded and the median is reported.
"""
from __future__ import annotations

import argparse
import os
import tempfile

import onnxruntime as ort
import torch

import dynvit
from dynvit.export import export_model, ort_speed, random_images


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="deit_small_patch16_224")
    p.add_argument("--prune-loc", type=int, nargs="+", default=[3, 6, 9])
    p.add_argument("--keep-ratio", type=float, default=0.7)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--threads", type=int, help="onnxruntime intra-op threads (default: its own choice)")
    p.add_argument("--opset", type=int)
    args = p.parse_args()

    torch.manual_seed(0)
    model = dynvit.build_model(args.model, prune_loc=args.prune_loc, keep_ratio=args.keep_ratio, prune_mode="topk").eval()
    inputs = random_images(model, 4)
    gmacs = {mode: dynvit.count_flops(model, mode=mode) for mode in ("none", "topk")}
    print(f"{args.model}, prune_loc {tuple(args.prune_loc)}, keep ratio {args.keep_ratio} (top-k); onnxruntime "
          f"{ort.__version__}, {os.cpu_count()} CPUs, intra-op threads {args.threads or 'default'}")
    print(f"GMACs/image: dense {gmacs['none']:.2f}, pruned {gmacs['topk']:.2f}")
    with tempfile.TemporaryDirectory() as tmp:
        exports = {mode: export_model(model, os.path.join(tmp, f"{mode}.onnx"), mode=mode, opset=args.opset, inputs=inputs)
                   for mode in ("none", "topk")}
        for mode, r in exports.items():
            print(f"parity {mode:>5} (opset {r.opset}): max |onnxruntime - pytorch| = {r.max_abs_diff:.2e}, "
                  f"batch sizes {r.batch_sizes}")
        print(f"{'batch':>5}  {'dense img/s':>11}  {'pruned img/s':>12}  speedup")
        for b in args.batch:
            batch = inputs.repeat(-(-b // len(inputs)), 1, 1, 1)[:b]
            s = ort_speed(exports["none"].path, exports["topk"].path, [batch], repeats=args.repeats, threads=args.threads)
            print(f"{b:>5}  {s.dense:>11.1f}  {s.pruned:>12.1f}  {s.speedup:.2f}x")


if __name__ == "__main__":
    main()
