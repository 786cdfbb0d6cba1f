"""The main job, end to end on a CPU: a dense ViT -> pruning fine-tune -> what it saved -> export.

    python scripts/demo.py                       # ../shared/data/cifar10, about 10 minutes on 2 cores
    python scripts/demo.py --data /path/to/imagefolder --out runs/demo

1. The dense "pretrained" ViT: the shared CIFAR-10 checkpoint (``--teacher``) when it exists
   and fits the data's classes, else one a previous demo left in ``<out>/dense/final``, else a
   small one trained here (``configs/cifar10_dense.yaml`` on a subset, about 4 minutes).
2. A pruning fine-tune from it (``configs/cifar10_dynvit.yaml``: one epoch): the
   predictors learn to keep 58% then 34% of the patch tokens (near-duplicates first: the match
   prior), dropped tokens are merged into the kept ones, the dense model is the frozen
   teacher, and the keep decisions end as the deterministic ones threshold mode makes at
   inference.
3. Both models measured in this run on the same images and CPU: top-1, kept tokens per image
   (mean and 5th-95th percentile) and GMACs, for top-k mode, threshold mode as trained (keep
   probability > 0.5) and threshold mode as saved: calibrated by ``train.py``
   (``dynvit.calibrate`` on 1,000 training images held out of the fine-tune) to the top-k budget.
4. The model saved by ``dynvit.save_pretrained`` (``<out>/dynvit/final``) and exported to
   ONNX in top-k and threshold mode, each checked against PyTorch in onnxruntime; then the
   speed of every row at batch 1 and 64 where it would be deployed: eager PyTorch, compiled
   (``dynvit.compile``; what compiling cost is printed) and the ONNX exports in ONNX Runtime,
   timed in one interleaved run (``dynvit.benchmark.deployment_speed``, the timing behind
   ``python -m dynvit.benchmark speed``), each speed-up against dense in the same runtime.
"""
from __future__ import annotations

import argparse
import copy
import json
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
from dynvit.benchmark import evaluate, evaluate_modes, kept_token_stats, spread_indices  # noqa: E402
from dynvit.benchmark.cli import Run  # noqa: E402
from dynvit.benchmark.deploy import cost_lines, speed_table  # noqa: E402
from dynvit.benchmark.runtimes import RUNTIMES, deployment_speed  # noqa: E402
from dynvit.config import load_config  # noqa: E402
from dynvit.data import SeededImageDataset, balanced_subset, build_transform, resolve_data, scan_image_folder  # noqa: E402
from train import train  # noqa: E402

# Sized for about 10 minutes on 2 CPU cores; a GPU runs the full recipes instead (see README).
DENSE_RUN = ["--data.train_subset", "20000", "--train.epochs", "2", "--optim.warmup_epochs", "0.2"]
PRUNE_RUN: list[str] = []  # the preset as it is: one epoch over all training images (about 5 minutes)
SPEED_BATCHES = (1, 64)
SPEED_ROUNDS = 5  # interleaved timing rounds; the median resists a round that something else on the machine slowed


def _common(args, out: Path) -> list[str]:
    return ["--data.path", args.data, "--data.val_subset", str(args.val_images), "--data.cache", "memory",
            "--train.output_dir", str(out), "--train.trackers", "[]", "--train.progress_bar", str(args.progress).lower(),
            "--data.val_split", args.val_split]


def _kept(result) -> str:
    """Kept patch tokens per stage: mean [5th-95th percentile] over the images."""
    return " / ".join(f"{k['mean']:.1f} [{k['p5']:.0f}-{k['p95']:.0f}]" for k in kept_token_stats(result.kept_tokens))


def _dense_model(args, out: Path) -> Path:
    """The dense model to start from: the shared teacher, an earlier demo's, or one trained now."""
    classes = scan_image_folder(Path(args.data) / "train", what="training").classes
    teacher = Path(args.teacher)
    if not args.retrain_dense and (teacher / "config.json").is_file():
        saved = json.loads((teacher / "config.json").read_text())
        if saved.get("label_names", saved.get("classes")) == classes:  # timm's key, or the earlier dynvit format's
            print(f"[1/4] the dense ViT: {teacher} (pretrained, not retrained)", flush=True)
            return teacher
        print(f"      {teacher} was trained on other classes than {args.data}: training a dense ViT instead", flush=True)
    dense_dir = out / "dense" / "final"
    if not args.retrain_dense and (dense_dir / "model.safetensors").is_file():
        print(f"[1/4] reusing the dense ViT in {dense_dir} (--retrain-dense to train it again)", flush=True)
        return dense_dir
    shutil.rmtree(out / "dense", ignore_errors=True)
    print(f"[1/4] training a dense ViT on {args.data} (about 4 minutes on 2 cores) ...", flush=True)
    t0 = time.perf_counter()
    train(load_config(REPO / "configs" / "cifar10_dense.yaml", DENSE_RUN + _common(args, out / "dense")))
    print(f"      done in {time.perf_counter() - t0:.0f} s -> {dense_dir}", flush=True)
    return dense_dir


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "cifar10"),
                        help="ImageFolder root with train/ and test/ (or --val-split) sub-folders")
    parser.add_argument("--val-split", default="test", help="validation sub-folder of --data")
    parser.add_argument("--teacher", default=str(REPO.parent / "shared" / "checkpoints" / "cifar10_vit_dense"),
                        help="a dense save_pretrained directory to fine-tune (used when its classes match --data)")
    parser.add_argument("--out", default=str(REPO / "runs" / "demo"), help="where the runs and the table go")
    parser.add_argument("--val-images", type=int, default=2000, help="validation images measured (0 = all)")
    parser.add_argument("--calib-images", type=int, default=1000,
                        help="training images held out of the fine-tune for calibrating threshold mode")
    parser.add_argument("--retrain-dense", action="store_true", help="train the dense model here even if one exists")
    parser.add_argument("--export", default="onnx", choices=["onnx", "pt2", "none"], help="export the pruned model")
    parser.add_argument("--runtimes", nargs="+", choices=RUNTIMES, default=list(RUNTIMES),
                        help="where the speed is measured (compiling costs a few minutes on 2 cores)")
    parser.add_argument("--progress", action="store_true", help="show progress bars")
    parser.add_argument("--threads", type=int, help="torch threads (default: one per core)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    start = time.perf_counter()
    out = Path(args.out)

    dense_dir = _dense_model(args, out)

    # 2. The pruning fine-tune, always from the dense model.
    shutil.rmtree(out / "dynvit", ignore_errors=True)
    print("[2/4] fine-tuning it with token pruning ...", flush=True)
    t0 = time.perf_counter()
    cfg = load_config(REPO / "configs" / "cifar10_dynvit.yaml",
                      PRUNE_RUN + _common(args, out / "dynvit") + ["--model.pretrained_path", str(dense_dir),
                                                                   "--train.calibrate_images", str(args.calib_images)])
    train(cfg)
    print(f"      done in {time.perf_counter() - t0:.0f} s -> {out / 'dynvit' / 'final'}", flush=True)

    # 3. Both models, measured now on the same images and the same CPU.
    print("[3/4] measuring accuracy, kept tokens and GMACs ...", flush=True)
    dense, pruned = dynvit.load_pretrained(dense_dir), dynvit.load_pretrained(out / "dynvit" / "final")
    data_cfg = resolve_data(pruned, cfg.data)
    val_set = _eval_images(args.data, args.val_split, data_cfg, args.val_images, cfg.train.seed)  # train.py's subset
    batches = list(torch.utils.data.DataLoader(val_set, batch_size=250))  # decoded once
    images = torch.cat([x for x, _ in batches])
    input_size = data_cfg["input_size"]

    as_trained = copy.deepcopy(pruned)  # train.py saved it calibrated to the top-k budget (per image adaptive)
    as_trained.keep_threshold.zero_()  # keep probability > 0.5: the decisions the fine-tune ended on

    r = cfg.model.keep_ratio
    labels = {"dense": "dense ViT (teacher)", "topk": f"DynViT, top-k {r}", "threshold": "DynViT, threshold p > 0.5",
              "calibrated": f"DynViT, threshold calibrated to {r}"}
    models = {"dense": dense, "topk": copy.deepcopy(pruned), "threshold": as_trained, "calibrated": pruned}
    models["topk"].prune_mode = "topk"
    accuracy = {"dense": evaluate(dense, batches), "threshold": evaluate(as_trained, batches, mode="threshold"),
                **evaluate_modes(pruned, batches, ("topk",)), "calibrated": evaluate(pruned, batches, mode="threshold")}

    def spread(k: int) -> torch.Tensor:  # k images of every class, not the first classes' images
        return images[spread_indices(len(images), k)]

    gmacs = {k: dynvit.count_flops(m, input_size, images=spread(1000)) for k, m in models.items()}  # threshold: the mean

    # 4. Save, export, and time where the models would be deployed.
    print("[4/4] exporting, then timing eager, compiled and in ONNX Runtime ...", flush=True)
    exported, onnx_files = [], {}
    if args.export != "none":
        for mode in ("topk", "threshold"):
            try:
                result = dynvit.export_model(pruned, out / f"dynvit_{mode}.{args.export}", format=args.export, mode=mode,
                                             inputs=images[:4])
                exported.append(f"{mode} -> {result.path} (max |diff| {result.max_abs_diff:.1e})")
                if args.export == "onnx":
                    onnx_files[labels[mode]] = result.path
            except Exception as e:  # an export problem must not hide the measurements
                exported.append(f"{mode} export failed: {type(e).__name__}: {e}")
    mixed = spread(256)
    mixed = mixed[torch.randperm(len(mixed), generator=torch.Generator().manual_seed(0))]  # each batch: every class
    run = Run("speed", argparse.Namespace(json=str(out / "speed.json")), [],
              command="python scripts/demo.py " + " ".join(sys.argv[1:] if argv is None else argv))
    speed = deployment_speed({labels[k]: m for k, m in models.items()}, mixed, SPEED_BATCHES, dense=labels["dense"],
                             runtimes=args.runtimes, repeats=SPEED_ROUNDS, min_seconds=1.0,
                             onnx_files=onnx_files)

    # The tables.
    n0 = dense.patch_embed.num_patches
    table = [f"{Path(args.data).name}/{args.val_split}: {len(val_set)} images; "
             f"target kept fraction per stage: {' / '.join(f'{t:.3f}' for t in pruned.keep_ratio)} of {n0} patch tokens",
             f"{'model':<36} {'top-1 %':>8} {'kept tokens/stage, mean [p5-p95]':>34} {'GMACs':>8} {'x dense':>8}"]
    for key, label in labels.items():
        tokens = _kept(accuracy[key]) or f"{n0}"
        table.append(f"{label:<36} {accuracy[key].top1:>8.2f} {tokens:>34} {gmacs[key]:>8.4f} "
                     f"{gmacs[key] / gmacs['dense']:>8.2f}")
    table += ["", f"Speed on {len(mixed)} of these images, images/s the median of {SPEED_ROUNDS} interleaved rounds, speed-ups against "
                  f"dense in the same runtime:", run.load_line(speed["other_cpu_share"]), "",
              speed_table(speed, {labels[k]: g for k, g in gmacs.items()}, dense=labels["dense"]), "",
              *cost_lines(speed), "",
              f"saved {out / 'dynvit' / 'final'} (dynvit.load_pretrained)", *[f"exported {e}" for e in exported],
              f"wall time {time.perf_counter() - start:.0f} s"]
    text = "\n".join(table)
    print("\n" + text)
    (out / "table.txt").write_text(text + "\n")
    run.write({"gmacs": {labels[k]: g for k, g in gmacs.items()}, **speed})
    return 0


def _eval_images(root: str, split: str, data_cfg: dict, size: int, seed: int) -> SeededImageDataset:
    """``size`` class-balanced images of a split (0 = all) under the evaluation transform."""
    folder = scan_image_folder(Path(root) / split, what=split)
    indices = balanced_subset(folder.targets, size, seed)
    return SeededImageDataset(folder, build_transform(data_cfg, is_training=False), indices=indices)


if __name__ == "__main__":
    sys.exit(main())
