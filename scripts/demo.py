"""The main job, end to end on a CPU: dense ViT -> pruning fine-tune -> dense vs pruned table.

    python scripts/demo.py                       # ../shared/data/cifar10, about 10 minutes on 2 cores
    python scripts/demo.py --data /path/to/imagefolder --out runs/demo

1. Train a small dense ViT on CIFAR-10 (configs/cifar10_dense.yaml, on a subset), or reuse the
   one a previous demo left in ``<out>/dense/final``.
2. Fine-tune it with token pruning (configs/cifar10_dynvit.yaml): predictors learn to keep
   70% then 49% of the patch tokens, the dense model is the frozen teacher.
3. Measure both in this run on the same validation images: top-1, GMACs per image and
   images/s on this machine's CPU, and print a table. Export the pruned model when
   ``dynvit.export_model`` is available.
"""
from __future__ import annotations

import argparse
import copy
import logging
import os
import shutil
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import dynvit  # noqa: E402
from dynvit.benchmark import evaluate, evaluate_modes, kept_token_stats, measure_speed  # noqa: E402
from dynvit.config import load_config  # noqa: E402
from dynvit.data import build_datasets, resolve_data  # noqa: E402
from train import train  # noqa: E402

# Sized for about 10 minutes on 2 CPU cores; a GPU runs the full recipes instead (see README).
DENSE_RUN = ["--data.train_subset", "20000", "--train.epochs", "2", "--optim.warmup_epochs", "0.2"]
PRUNE_RUN = ["--data.train_subset", "5000", "--train.epochs", "2", "--optim.warmup_epochs", "0.2",
             "--optim.backbone_freeze_epochs", "0.2"]


def _common(args, out: Path) -> list[str]:
    return ["--data.path", args.data, "--data.val_subset", str(args.val_images), "--data.num_workers", str(args.workers),
            "--train.output_dir", str(out), "--train.trackers", "[]", "--train.progress_bar", str(args.progress).lower()]


def _kept(result) -> str:
    """Kept patch tokens per stage: mean [5th-95th percentile] over the images."""
    return " / ".join(f"{k['mean']:.1f} [{k['p5']:.0f}-{k['p95']:.0f}]" for k in kept_token_stats(result.kept_tokens))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "cifar10"),
                        help="ImageFolder root with train/ and test/ (or --val-split) sub-folders")
    parser.add_argument("--val-split", default="test", help="validation sub-folder of --data")
    parser.add_argument("--out", default=str(REPO / "runs" / "demo"), help="where the runs and the table go")
    parser.add_argument("--val-images", type=int, default=2000, help="validation images measured (0 = all)")
    parser.add_argument("--workers", type=int, default=1, help="data loader workers per process")
    parser.add_argument("--retrain-dense", action="store_true", help="train the dense model even if one exists")
    parser.add_argument("--export", default="onnx", choices=["onnx", "pt2", "none"], help="export the pruned model")
    parser.add_argument("--progress", action="store_true", help="show progress bars")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(os.cpu_count() or 1)
    start = time.perf_counter()
    out = Path(args.out)
    split = ["--data.val_split", args.val_split]

    # 1. The dense model: trained here, or reused from an earlier demo.
    dense_dir = out / "dense" / "final"
    if args.retrain_dense or not (dense_dir / "model.safetensors").is_file():
        shutil.rmtree(out / "dense", ignore_errors=True)
        print(f"[1/3] training the dense ViT on {args.data} ...", flush=True)
        t0 = time.perf_counter()
        train(load_config(REPO / "configs" / "cifar10_dense.yaml", DENSE_RUN + split + _common(args, out / "dense")))
        print(f"      done in {time.perf_counter() - t0:.0f} s -> {dense_dir}", flush=True)
    else:
        print(f"[1/3] reusing the dense ViT in {dense_dir} (--retrain-dense to train it again)", flush=True)

    # 2. The pruning fine-tune, always from the dense model.
    shutil.rmtree(out / "dynvit", ignore_errors=True)
    print("[2/3] fine-tuning it with token pruning ...", flush=True)
    t0 = time.perf_counter()
    cfg = load_config(REPO / "configs" / "cifar10_dynvit.yaml",
                      PRUNE_RUN + split + _common(args, out / "dynvit") + ["--model.pretrained_path", str(dense_dir)])
    train(cfg)
    print(f"      done in {time.perf_counter() - t0:.0f} s -> {out / 'dynvit' / 'final'}", flush=True)

    # 3. Both models, measured now on the same images and the same CPU.
    print("[3/3] measuring ...", flush=True)
    dense, pruned = dynvit.load_pretrained(dense_dir), dynvit.load_pretrained(out / "dynvit" / "final")
    data_config = resolve_data(pruned, cfg.data)
    _, val_set = build_datasets(cfg.data, cfg.aug, data_config, seed=cfg.train.seed)
    batches = list(torch.utils.data.DataLoader(val_set, batch_size=250, num_workers=args.workers))  # decoded once
    bench = torch.cat([images for images, _ in batches])[:256]
    input_size = data_config["input_size"]
    modes = {"topk": f"DynViT, top-k {cfg.model.keep_ratio}", "threshold": "DynViT, threshold 0.5"}
    accuracy = {"dense": evaluate(dense, batches), **evaluate_modes(pruned, batches, tuple(modes))}
    models = {"dense": dense}
    for mode in modes:
        models[mode] = copy.deepcopy(pruned)
        models[mode].prune_mode = mode
    speed = measure_speed(models, bench, (len(bench),), repeats=3, min_seconds=1.0)
    labels = {"dense": "dense ViT (teacher)", **modes}
    rows = []
    for key, label in labels.items():
        gmacs = dynvit.count_flops(models[key], input_size, images=bench[:16], mode=None if key == "dense" else key)
        rows.append((label, accuracy[key], gmacs, speed[key][len(bench)]))  # threshold GMACs: mean of 16 images

    exported = ""
    if args.export != "none" and hasattr(dynvit, "export_model"):
        try:
            result = dynvit.export_model(pruned, out / f"dynvit_topk.{args.export}", format=args.export, mode="topk",
                                         inputs=bench[:4])
            exported = f"exported {result.format} (top-k) to {result.path}"
        except Exception as e:  # an export problem must not hide the measurements
            exported = f"export skipped: {type(e).__name__}: {e}"

    n, other = len(val_set), speed["dense"][len(bench)]["other_cpu_share"]
    table = [f"{Path(args.data).name}/{args.val_split}: {n} images; {torch.get_num_threads()} CPU threads; "
             f"images/s at batch {len(bench)} (median of 3 repeats"
             + (f", other processes took {100 * other:.0f}% of the CPUs meanwhile)" if other is not None else ")"),
             f"{'model':<24} {'top-1 %':>8} {'top-5 %':>8} {'kept tokens/stage, mean [p5-p95]':>34} {'GMACs':>8} "
             f"{'images/s':>9}"]
    for name, acc, gmacs, s in rows:
        tokens = _kept(acc) or f"{dense.patch_embed.num_patches}"
        table.append(f"{name:<24} {acc.top1:>8.2f} {acc.top5:>8.2f} {tokens:>34} {gmacs:>8.4f} {s['images_per_s']:>9.0f}")
    dense_row = rows[0]
    for name, _, gmacs, s in rows[1:]:
        table.append(f"{name}: {gmacs / dense_row[2]:.2f}x the dense GMACs, "
                     f"{s['images_per_s'] / dense_row[3]['images_per_s']:.2f}x its speed")
    table.append(f"wall time {time.perf_counter() - start:.0f} s" + (f"; {exported}" if exported else ""))
    text = "\n".join(table)
    print("\n" + text)
    (out / "table.txt").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
