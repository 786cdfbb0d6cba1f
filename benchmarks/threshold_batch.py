"""What regrouping a threshold-mode batch by kept count buys, on a trained model and real images.

    python benchmarks/threshold_batch.py [--checkpoint runs/demo/dynvit/final] [--data ../shared/data/cifar10/test]

A threshold-mode batch is padded to its largest kept count; with ``model.threshold_regroup =
True`` (off by default) the images are sorted by count after each stage and the rest of the network runs on
groups padded to their own largest count (:func:`dynvit.model.regroup_by_count`). Timed in one
process with :func:`dynvit.benchmark.measure_speed` (repeats interleaved, median) on images
spread over every class and shuffled, so each batch is a fair mix: the dense backbone of the
checkpoint, top-k mode, and threshold mode with and without regrouping. The logits do not
depend on the grouping (tests/test_model.py checks it); only the padded work does.
"""
from __future__ import annotations

import argparse
import copy
import logging
import os
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import dynvit  # noqa: E402
from dynvit import benchmark as bench  # noqa: E402
from dynvit.data import SeededImageDataset, build_transform, scan_image_folder  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default="runs/demo/dynvit/final", help="a trained dynvit save_pretrained directory")
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "cifar10" / "test"), help="an ImageFolder split")
    p.add_argument("--images", type=int, default=256, help="images spread over the classes, shuffled")
    p.add_argument("--batch", type=int, default=64, help="the large batch (batch 1 is always timed)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--min-seconds", type=float, default=2.0)
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    p.add_argument("--json", default="out/threshold_batch.json")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)

    model = dynvit.load_pretrained(args.checkpoint).eval()
    folder = scan_image_folder(Path(args.data), what="evaluation")
    dataset = SeededImageDataset(folder, build_transform(dict(model.pretrained_cfg), is_training=False))
    index = bench.spread_indices(len(dataset), args.images)
    images = torch.stack([dataset[i][0] for i in index])
    images = images[torch.randperm(len(images), generator=torch.Generator().manual_seed(0))]

    dense = bench.dense_backbone(model)
    topk, grouped, padded = (copy.deepcopy(model) for _ in range(3))
    topk.prune_mode = "topk"
    grouped.prune_mode = padded.prune_mode = "threshold"
    grouped.threshold_regroup, padded.threshold_regroup = True, False
    models = {"dense": dense, "dynvit top-k": topk, "dynvit threshold, regrouped": grouped,
              "dynvit threshold, one padded batch": padded}
    size = tuple(images.shape[1:])
    gmacs = {name: dynvit.count_flops(m, size, images=images) for name, m in list(models.items())[:3]}
    gmacs["dynvit threshold, one padded batch"] = gmacs["dynvit threshold, regrouped"]  # the same decisions
    speed = bench.measure_speed(models, images, (1, args.batch), repeats=args.repeats, min_seconds=args.min_seconds)

    rows = []
    for name in models:
        row = {"method": name, "gmacs": gmacs[name], "gmacs_ratio": gmacs[name] / gmacs["dense"]}
        for bs in (1, args.batch):
            rate = speed[name][bs]["images_per_s"]
            row[f"images_per_s_b{bs}"] = rate
            row[f"speedup_b{bs}"] = bench.paired_speedup(speed[name][bs]["repeats"], speed["dense"][bs]["repeats"])
        rows.append(row)
    header = ["method", "GMACs", "GMACs ratio"] + [f"{k} b{bs}" for bs in (1, args.batch) for k in ("img/s", "speed-up")]
    body = [[r["method"], f"{r['gmacs']:.4f}", f"{r['gmacs_ratio']:.3f}"]
            + [v for bs in (1, args.batch) for v in (f"{r[f'images_per_s_b{bs}']:.0f}", f"{r[f'speedup_b{bs}']:.2f}x")]
            for r in rows]
    other = max(s[bs]["other_cpu_share"] or 0.0 for s in speed.values() for bs in (1, args.batch))
    title = (f"{args.checkpoint} on {len(images)} images of {args.data}; {torch.get_num_threads()} threads; "
              f"img/s the median of {args.repeats} repeats, speed-ups the median of the ratios within a round; "
              f"CPU taken by other processes while timing: up to {100 * other:.0f}%")
    print(title + "\n\n" + bench.markdown_table(header, body))
    result = {"command": "python benchmarks/threshold_batch.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "machine": bench.machine_info("cpu"), "rows": rows, "speed": speed}
    os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
    bench.write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
