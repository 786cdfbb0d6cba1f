"""The accuracy table of docs/BENCHMARKS.md: dynvit against EViT, ToMe and random dropping on
CIFAR-10, at matched GMACs, from one dense "pretrained" ViT, each method without and with the
same fine-tuning budget.

    python benchmarks/cifar10_accuracy.py [--teacher DIR] [--finetune-epochs 2] [--keep-ratio R]
    python benchmarks/cifar10_accuracy.py --teacher none --dense-epochs 24     # train the dense model too

1. The dense model: ``--teacher`` (default ``../shared/checkpoints/cifar10_vit_dense``, a
   ``dynvit.save_pretrained`` directory); with ``--teacher none`` or when it is missing,
   ``configs/cifar10_dense.yaml`` is trained for ``--dense-epochs`` (about 250 s per epoch on
   2 CPU cores; 24 epochs give the shared teacher's 71.5%).
2. ToMe's ``r`` is matched to dynvit's top-k GMACs at ``--keep-ratio``.
3. Fine-tunes from the dense model with one budget (``configs/cifar10_dynvit.yaml``: the same
   epochs, data, schedule, teacher and distillation): dynvit, then EViT, ToMe and random
   dropping through ``model.method``. A run whose ``final/`` exists is reused; an interrupted
   one resumes.
4. Measured on the test split: the dense row; dynvit in top-k mode and in threshold mode
   calibrated (``dynvit.calibrate`` on ``--calib-images`` training images) to the same budget;
   every baseline off the shelf and fine-tuned. Then the sweep: each budget of ``--sweep``
   for dynvit (the same fine-tuned model, top-k and calibrated) and the baselines.

Rows go to ``--json`` (``method``, ``finetuned``, ``mode``, ``gmacs``, ``gmacs_ratio``, ``top1``,
...), the tables to stdout and ``--markdown``, the sweep to ``--plot``.
"""
from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import dynvit  # noqa: E402
from dynvit import benchmark as bench  # noqa: E402
from dynvit.config import load_config  # noqa: E402
from dynvit.data import SeededImageDataset, balanced_subset, build_transform, scan_image_folder  # noqa: E402
from dynvit.hub import load_pretrained  # noqa: E402
from dynvit.visualize import save_accuracy_vs_gmacs  # noqa: E402

BASELINES = ("evit", "tome", "random")
PRESET = "configs/cifar10_dynvit.yaml"


def _run(cmd: list[str]) -> float:
    print("+ " + " ".join(cmd), flush=True)
    t0 = time.time()
    subprocess.run(cmd, cwd=REPO, check=True)
    return time.time() - t0


def _train(config: str, out: Path, overrides: list[str], args) -> tuple[Path, float]:
    """Train unless ``out/final`` exists; the final directory and the seconds it took (0 if reused)."""
    final = out / "final"
    if (final / "config.json").is_file():
        print(f"= {final} exists, not retrained", flush=True)
        return final, 0.0
    seconds = _run([sys.executable, "train.py", "--config", config, "--data.path", args.data, "--train.output_dir", str(out),
                    "--train.resume", "auto", "--train.progress_bar", "false",
                    "--train.calibrate_images", "0",  # all training images trained on; main() calibrates itself
                    *overrides, *args.train_args])
    return final, seconds


def _scaled_schedule(cfg, epochs: int) -> list[str]:
    """Overrides for ``epochs`` epochs that keep the preset's schedules (warm-up, backbone freeze,
    noise and tau annealing, all given in epochs) at the same fractions of the run."""
    factor = epochs / cfg.train.epochs
    out = ["--train.epochs", str(epochs)]
    for key, value in (("optim.warmup_epochs", cfg.optim.warmup_epochs),
                       ("optim.backbone_freeze_epochs", cfg.optim.backbone_freeze_epochs),
                       ("noise.anneal_epochs", cfg.noise.anneal_epochs), ("tau.anneal_epochs", cfg.tau.anneal_epochs)):
        if value is not None:
            out += [f"--{key}", str(round(value * factor, 4))]
    return out


def _dataset(args, split: str, model, size: int, seed: int):
    folder = scan_image_folder(Path(args.data) / split, what=split)
    indices = balanced_subset(folder.targets, size, seed) if size else None
    return SeededImageDataset(folder, build_transform(dict(model.pretrained_cfg), is_training=False), indices=indices)


def _tag(rows: list[dict], **fields) -> list[dict]:
    for row in rows:
        method = row["method"]
        row.setdefault("finetuned", method.endswith("+ft") or method == "dynvit")
        row.setdefault("mode", "topk" if method == "dynvit" else "-")
        row.update(fields)
    return rows


def measure_budget(dense, tuned, finetuned, loader, calib, flops_images, keep_ratio, tome_r, args) -> list[dict]:
    """Every row at one budget: dense, dynvit top-k and calibrated threshold, the baselines."""
    size = tuple(flops_images.shape[1:])
    common = dict(input_size=size, finetuned=finetuned, loader=loader, images=flops_images, tome_r=tome_r)
    model = copy.deepcopy(tuned)
    model.keep_threshold.zero_()
    rows = _tag(bench.compare(dense, dynvit_model=model, keep_ratio=keep_ratio, mode="topk", **common)[0])
    dynvit.calibrate(model, calib, keep_ratio=keep_ratio)
    calibrated = bench.compare(dense, dynvit_model=model, methods=("dense", "dynvit"), mode="threshold", **common)[0]
    row = calibrated[1]
    row.update(method="dynvit", setting=f"threshold calibrated to {keep_ratio}, {row['setting']}", mode="calibrated",
               finetuned=True, thresholds=model.keep_threshold.tolist())
    rows.insert(2, row)
    for r in rows:
        r["gmacs_ratio"] = r["gmacs"] / rows[0]["gmacs"]
        r["keep_ratio"] = keep_ratio
    return rows


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "cifar10"))
    p.add_argument("--teacher", default=str(REPO.parent / "shared" / "checkpoints" / "cifar10_vit_dense"),
                   help="dense save_pretrained directory; 'none' trains one")
    p.add_argument("--out", default="runs/bench_cifar10")
    p.add_argument("--dense-epochs", type=int, default=24, help="epochs of the dense model when it is trained here")
    p.add_argument("--finetune-epochs", type=int,
                   help="default: the preset's; the same for every method (its schedules scale with it)")
    p.add_argument("--train-subset", type=int, default=0, help="training images per fine-tune (0 = all 50,000)")
    p.add_argument("--keep-ratio", type=float, default=None,
                   help="r of the main table; default the preset's (about 0.65 of dense GMACs)")
    p.add_argument("--sweep", default="0.9,0.8,0.7,0.6,0.5", help="budgets of the sweep ('' = none)")
    p.add_argument("--eval-images", type=int, default=0, help="test images (class-balanced; 0 = all 10,000)")
    p.add_argument("--calib-images", type=int, default=2000, help="training images for dynvit.calibrate")
    p.add_argument("--flops-images", type=int, default=1000,
                   help="test images whose mean GMACs threshold mode reports (other modes: fixed shapes)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", default="benchmarks/results/cifar10_accuracy.json")
    p.add_argument("--markdown", default="benchmarks/results/cifar10_accuracy.md")
    p.add_argument("--plot", default="benchmarks/results/cifar10_accuracy.png")
    args, rest = p.parse_known_args(argv)
    args.train_args = [a for a in rest if a != "--"]
    start = time.time()
    out = REPO / args.out
    timings = {}

    teacher = Path(args.teacher) if args.teacher != "none" else None
    if teacher is None or not (teacher / "config.json").is_file():
        print(f"no dense model at {args.teacher}: training one ({args.dense_epochs} epochs, ~250 s each on 2 CPU cores)")
        teacher, timings["dense"] = _train("configs/cifar10_dense.yaml", out / "dense",
                                           ["--train.epochs", str(args.dense_epochs)], args)
    dense = load_pretrained(teacher, device=args.device)
    preset_cfg = load_config(REPO / PRESET)
    preset = preset_cfg.model
    if args.keep_ratio is None:
        args.keep_ratio = preset.keep_ratio
    size = (3, *dense.patch_embed.img_size)
    # The preset's predictors (width, prior) and merging, so that ToMe's r matches what dynvit computes.
    probe = dynvit.build_model(dense.dynvit_meta["model_name"], prune_loc=preset.prune_loc, keep_ratio=args.keep_ratio,
                               prune_mode="topk", predictor_hidden_ratio=preset.predictor_hidden_ratio,
                               predictor_prior=preset.predictor_prior, dropped_tokens=preset.dropped_tokens,
                               **dense.dynvit_meta["timm_kwargs"])
    tome_r, _ = bench.match_tome_r(dense.cpu(), dynvit.count_flops(probe, size), size)
    dense.to(args.device)
    print(f"ToMe r={tome_r} matches dynvit's top-k GMACs at keep ratio {args.keep_ratio}", flush=True)

    budget = ["--model.pretrained_path", str(teacher), "--model.keep_ratio", str(args.keep_ratio)]
    budget += ["--data.train_subset", str(args.train_subset)] if args.train_subset else []
    budget += _scaled_schedule(preset_cfg, args.finetune_epochs) if args.finetune_epochs else []
    final, timings["dynvit"] = _train(PRESET, out / "dynvit", budget, args)
    tuned = load_pretrained(final, device=args.device)
    finetuned = {}
    for method in BASELINES:
        extra = ["--model.method", method] + (["--model.tome_r", str(tome_r)] if method == "tome" else [])
        path, timings[method] = _train(PRESET, out / method, budget + extra, args)
        finetuned[method] = load_pretrained(path, device=args.device)

    test = _dataset(args, "test", dense, args.eval_images, 0)
    loader = [(x.to(args.device), y.to(args.device)) for x, y in torch.utils.data.DataLoader(test, batch_size=250)]
    calib_set = _dataset(args, "train", dense, args.calib_images, 1)
    calib = torch.stack([calib_set[i][0] for i in range(len(calib_set))]).to(args.device)
    everything = torch.cat([x for x, _ in loader])
    flops_images = everything[bench.spread_indices(len(everything), args.flops_images)]

    rows = measure_budget(dense, tuned, finetuned, loader, calib, flops_images, args.keep_ratio, tome_r, args)
    text = [f"## Keep ratio {args.keep_ratio} ({len(test)} test images)\n", bench.results_table(rows)]
    sweep = []
    for r in [float(v) for v in args.sweep.split(",") if v.strip()]:
        probe.keep_ratio = r
        r_tome, _ = bench.match_tome_r(dense, dynvit.count_flops(probe.to(args.device), size), size)
        sweep += measure_budget(dense, tuned, finetuned, loader, calib, flops_images, r, r_tome, args)
        text += [f"\n## Sweep: keep ratio {r}\n", bench.results_table(sweep[-len(rows):])]
    result = {"command": "python benchmarks/cifar10_accuracy.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "machine": bench.machine_info(args.device), "teacher": str(teacher), "keep_ratio": args.keep_ratio,
              "tome_r": tome_r, "train_seconds": timings, "wall_seconds": round(time.time() - start),
              "finetune": {"config": PRESET, "overrides": budget + args.train_args},
              "rows": rows, "sweep": sweep}
    bench.write_json(args.json, result)
    Path(args.markdown).write_text("\n".join(text) + "\n")
    if sweep:
        plot_rows = [dict(r, method=_curve(r)) for r in sweep]
        save_accuracy_vs_gmacs(args.plot, plot_rows, title=f"CIFAR-10, {len(test)} test images")
    print("\n".join(text))
    print(f"\nwall time {result['wall_seconds']} s; wrote {args.json}, {args.markdown}" + (f", {args.plot}" if sweep else ""))
    return result


def _curve(row: dict) -> str:
    """Sweep line of a row: dynvit split by mode, baselines by fine-tuning."""
    if row["method"] == "dynvit":
        return f"dynvit {'threshold (calibrated)' if row['mode'] == 'calibrated' else 'top-k'}"
    return row["method"]


if __name__ == "__main__":
    main()
