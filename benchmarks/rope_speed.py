"""GMACs and CPU images/s of a pruned RoPE ViT against its dense self, measured in one run.

    python benchmarks/rope_speed.py [--model vit_small_patch16_rope_224] [--keep-ratio 0.7] [--batch 64]

One randomly initialised timm ``Eva`` model (speed does not depend on the weights) is timed
dense, and patched with predictors before blocks 3, 6 and 9 in top-k mode and in threshold
mode (untrained predictors calibrated so that threshold mode keeps the target fraction on the
timed images), with :func:`dynvit.benchmark.measure_speed`: repeats interleaved across the
models, warm-up discarded, median reported, with the CPU share other processes took while
timing. Prints a Markdown table; ``--json`` writes every figure.
"""
from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
from pathlib import Path

import timm
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import dynvit  # noqa: E402
from dynvit import benchmark as bench  # noqa: E402
from dynvit import count_flops  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="vit_small_patch16_rope_224")
    p.add_argument("--keep-ratio", type=float, default=0.7)
    p.add_argument("--prune-loc", default="3,6,9")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--min-seconds", type=float, default=2.0, help="minimum length of one timed repeat")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's, usually the core count)")
    p.add_argument("--flops-images", type=int, default=16, help="images averaged for threshold-mode GMACs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default="out/rope_speed.json")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("dynvit.benchmark").setLevel(logging.ERROR)  # "untrained predictors" is expected here
    if args.threads:
        torch.set_num_threads(args.threads)
    load = os.getloadavg()[0]

    torch.manual_seed(args.seed)
    dense = timm.create_model(args.model, pretrained=False).eval()
    size = (3, *dense.patch_embed.img_size)
    images = torch.randn(args.batch, *size, generator=torch.Generator().manual_seed(args.seed))
    kw = dict(prune_loc=[int(v) for v in args.prune_loc.split(",")], keep_ratio=args.keep_ratio)
    topk = bench.make_method(dense, "dynvit", prune_mode="topk", **kw)
    threshold = bench.make_method(dense, "dynvit", prune_mode="threshold", **kw)
    dynvit.calibrate(threshold, images)  # thresholds that keep the target fraction of these images
    models = {"dense": dense, "dynvit topk": topk, "dynvit threshold": threshold}
    gmacs = {"dense": count_flops(dense, size), "dynvit topk": count_flops(topk, size),
             "dynvit threshold": count_flops(threshold, size, images=images[: args.flops_images])}
    with torch.no_grad():
        kept = [m.sum(1).float().mean().item() for m in threshold.forward_pruned(images[: args.flops_images]).keep_masks]

    machine = bench.machine_info()
    speed = bench.measure_speed(models, images, (args.batch,), repeats=args.repeats, min_seconds=args.min_seconds)
    after = bench.machine_info()
    bs = args.batch
    rows, lines = {}, []
    for name in models:
        ips = speed[name][bs]["images_per_s"]
        up = bench.paired_speedup(speed[name][bs]["repeats"], speed["dense"][bs]["repeats"])
        rows[name] = {"gmacs": gmacs[name], **speed[name][bs], "speedup": up, "gmacs_ratio": gmacs[name] / gmacs["dense"]}
        lines.append([name, f"{gmacs[name]:.3f}", f"{rows[name]['gmacs_ratio']:.3f}", f"{ips:.1f}",
                      f"{rows[name]['speedup']:.2f}x"])
    command = "python benchmarks/rope_speed.py " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    n = dense.patch_embed.num_patches
    print(f"<!-- {command} -->\n{args.model} (random weights, {size[1]}x{size[2]}, {n} patches), keep "
          f"{'/'.join(f'{r:.2f}' for r in topk.keep_ratio)} before blocks {args.prune_loc}; threshold mode keeps "
          f"{'/'.join(f'{k:.1f}' for k in kept)} patches on average. {machine['processor']}, {machine['threads']} threads, "
          f"torch {machine['torch']}, timm {machine['timm']}; img/s the median of {args.repeats} repeats at batch {bs}, "
          f"speed-ups the median of the ratios within a round; 1-minute load average {load:.2f} before, "
          f"{after['load_average'][0]:.2f} after; CPU taken by other processes while timing: "
          f"{100 * (speed['dense'][bs]['other_cpu_share'] or 0):.0f}%\n")
    print(bench.markdown_table(["model", "GMACs", "GMACs ratio", f"img/s b{bs}", "speed-up"], lines))
    bench.write_json(args.json, {"command": command, "machine": machine, "load_average_start": load,
                                 "load_average_after": after.get("load_average"), "model": args.model,
                                 "threshold_kept_patches": kept, "rows": rows})


if __name__ == "__main__":
    main()
