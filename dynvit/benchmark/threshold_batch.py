"""``python -m dynvit.benchmark threshold-batch``: what packing a threshold-mode batch, or
regrouping it by kept count, buys, on a trained model and real images (docs/BENCHMARKS.md, section 5).

    python -m dynvit.benchmark threshold-batch [--checkpoint runs/demo/dynvit/final] [--data ../shared/data/cifar10/test]

A threshold-mode batch is padded to its largest kept count. With ``model.threshold_pack`` the
blocks after a stage run their per-token layers on the real tokens alone
(:func:`dynvit.attention.packed_block`); with ``model.threshold_regroup = True`` the images are
sorted by count after each stage and the rest of the network runs on groups padded to their own
largest count (:func:`dynvit.model.regroup_by_count`). Timed in one process (repeats
interleaved, median) on images spread over every class and shuffled, so each batch is a fair
mix: the dense backbone of the checkpoint, top-k mode, and threshold mode packed, regrouped and
as one padded batch. The logits do not depend on the choice (tests/test_model.py checks it);
only the padded work does.
"""
from __future__ import annotations

import argparse
import copy
from pathlib import Path

from ..flops import count_flops
from ..hub import load_pretrained
from .cli import Run, add_timing_options
from .compare import dense_backbone
from .deploy import REPO, load_images
from .report import markdown_table
from .speed import measure_speed, paired_speedup

__all__ = ["main"]


def main(argv: list[str], extra: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(prog="python -m dynvit.benchmark threshold-batch", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default="runs/demo/dynvit/final", help="a trained dynvit save_pretrained directory")
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "cifar10" / "test"), help="an ImageFolder split")
    p.add_argument("--images", type=int, default=256, help="images spread over the classes, shuffled")
    p.add_argument("--batch", type=int, default=64, help="the large batch (batch 1 is always timed)")
    add_timing_options(p, json="out/threshold_batch.json", repeats=5, min_seconds=2.0)
    args = p.parse_args(argv)
    run = Run("threshold-batch", args, argv)

    model = load_pretrained(args.checkpoint).eval()
    images = load_images(Path(args.data), model, args.images)
    dense = dense_backbone(model)
    topk, packed, grouped, padded = (copy.deepcopy(model) for _ in range(4))
    topk.prune_mode = "topk"
    packed.prune_mode = grouped.prune_mode = padded.prune_mode = "threshold"
    packed.threshold_pack, packed.threshold_regroup = True, False
    grouped.threshold_pack, grouped.threshold_regroup = False, True
    padded.threshold_pack, padded.threshold_regroup = False, False
    models = {"dense": dense, "dynvit top-k": topk, "dynvit threshold, packed": packed,
              "dynvit threshold, regrouped": grouped, "dynvit threshold, one padded batch": padded}
    size = tuple(images.shape[1:])
    gmacs = {name: count_flops(m, size, images=images) for name, m in list(models.items())[:3]}
    for name in list(models)[3:]:
        gmacs[name] = gmacs["dynvit threshold, packed"]  # the same decisions
    speed = measure_speed(models, images, (1, args.batch), repeats=args.repeats, min_seconds=args.min_seconds)

    rows = []
    for name in models:
        row = {"method": name, "gmacs": gmacs[name], "gmacs_ratio": gmacs[name] / gmacs["dense"]}
        for bs in (1, args.batch):
            row[f"images_per_s_b{bs}"] = speed[name][bs]["images_per_s"]
            row[f"speedup_b{bs}"] = paired_speedup(speed[name][bs]["repeats"], speed["dense"][bs]["repeats"])
        rows.append(row)
    header = ["method", "GMACs", "GMACs ratio"] + [f"{k} b{bs}" for bs in (1, args.batch) for k in ("img/s", "speed-up")]
    body = [[r["method"], f"{r['gmacs']:.4f}", f"{r['gmacs_ratio']:.3f}"]
            + [v for bs in (1, args.batch) for v in (f"{r[f'images_per_s_b{bs}']:.0f}", f"{r[f'speedup_b{bs}']:.2f}x")]
            for r in rows]
    other = max(s[bs]["other_cpu_share"] or 0.0 for s in speed.values() for bs in (1, args.batch))
    run.report(f"<!-- {run.command} -->\n{args.checkpoint} on {len(images)} images of {args.data}; img/s the median of "
               f"{args.repeats} repeats, speed-ups the median of the ratios within a round.\n{run.load_line(other)}\n")
    run.report(markdown_table(header, body))
    run.write({"rows": rows, "speed": speed})
    return rows
