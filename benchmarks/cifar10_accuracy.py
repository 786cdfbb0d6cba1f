"""Table 3 of docs/BENCHMARKS.md: CIFAR-10 accuracy of dynvit, EViT, ToMe and random dropping
at matched GMACs, each without and with the same fine-tuning budget, against the dense model.

    python benchmarks/cifar10_accuracy.py [--data ../shared/data/cifar10] [--out runs/bench_cifar10]
        [--dense-epochs 30] [--finetune-epochs 10] [--train-subset 0] [--keep-ratio 0.55]

1. The dense ViT (configs/cifar10_dense.yaml), unless ``<out>/dense/final`` exists.
2. ToMe's ``r`` matched to dynvit's top-k GMACs at ``--keep-ratio``.
3. Fine-tunes from the dense model with one budget (configs/cifar10_dynvit.yaml, same epochs,
   data, schedule and teacher): dynvit, then EViT, ToMe and random dropping through
   train.py's ``model.method`` key. A run whose ``final/`` exists is skipped; an interrupted
   one resumes (``train.resume: auto``).
4. eval.py on the whole test split, in threshold and in top-k mode: the dense row, every
   baseline off the shelf on the dense checkpoint and fine-tuned (``+ft``), at matched GMACs.

``--keep-ratio 0.55`` (cumulative 0.55, 0.30 before blocks 2 and 4) puts dynvit at about 0.65
of the dense GMACs on this 6-block model: its predictors are not free at width 128.
Extra ``train.py`` overrides go after ``--``, e.g. ``-- --data.num_workers 4``.
"""
from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import dynvit  # noqa: E402
from dynvit import benchmark as bench  # noqa: E402
from dynvit.config import ModelConfig, load_config  # noqa: E402
from dynvit.hub import load_pretrained  # noqa: E402

BASELINES = ("evit", "tome", "random")


def _run(cmd: list[str], dry: bool) -> None:
    print("+ " + " ".join(cmd), flush=True)
    if not dry:
        subprocess.run(cmd, cwd=REPO, check=True)


def _train(config: str, out: Path, overrides: list[str], args) -> Path:
    final = out / "final"
    if (final / "config.json").is_file():
        print(f"= {final} exists, not retrained", flush=True)
        return final
    _run([sys.executable, "train.py", "--config", config, "--data.path", args.data, "--train.output_dir", str(out),
          *overrides, *args.train_args], args.dry_run)
    return final


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "cifar10"))
    p.add_argument("--out", default="runs/bench_cifar10")
    p.add_argument("--dense-epochs", type=int, help="default: configs/cifar10_dense.yaml's")
    p.add_argument("--finetune-epochs", type=int, help="default: configs/cifar10_dynvit.yaml's; the same for every method")
    p.add_argument("--train-subset", type=int, default=0, help="training images per run (0 = all 50,000)")
    p.add_argument("--keep-ratio", type=float, default=0.55)
    p.add_argument("--json-dir", default="out")
    p.add_argument("--dry-run", action="store_true", help="print the commands only")
    args, rest = p.parse_known_args(argv)
    args.train_args = [a for a in rest if a != "--"]
    out = REPO / args.out
    subset = ["--data.train_subset", str(args.train_subset)] if args.train_subset else []

    dense_over = subset + (["--train.epochs", str(args.dense_epochs)] if args.dense_epochs else [])
    dense_dir = _train("configs/cifar10_dense.yaml", out / "dense", dense_over, args)

    budget = subset + (["--train.epochs", str(args.finetune_epochs)] if args.finetune_epochs else [])
    tune = ["--model.pretrained_path", str(dense_dir), "--model.keep_ratio", str(args.keep_ratio), *budget]
    dynvit_dir = _train("configs/cifar10_dynvit.yaml", out / "dynvit", tune, args)

    tome_r = None
    if not args.dry_run:
        dense = load_pretrained(dense_dir)
        prune_loc = load_config(REPO / "configs" / "cifar10_dynvit.yaml").model.prune_loc
        dyn = dynvit.build_model(dense.dynvit_meta["model_name"], prune_loc=prune_loc, keep_ratio=args.keep_ratio,
                                 prune_mode="topk", **dense.dynvit_meta["timm_kwargs"])
        size = (3, *dense.patch_embed.img_size)
        tome_r, _ = bench.match_tome_r(dense, dynvit.count_flops(dyn, size), size)
        print(f"ToMe r={tome_r} matches dynvit's GMACs at keep ratio {args.keep_ratio}", flush=True)

    finetuned = []
    if "method" in {f.name for f in dataclasses.fields(ModelConfig)}:
        for method in BASELINES:
            extra = ["--model.method", method] + (["--model.tome_r", str(tome_r)] if method == "tome" and tome_r else [])
            final = _train("configs/cifar10_dynvit.yaml", out / method, tune + extra, args)
            finetuned += ["--finetuned", f"{method}={final}"]
    else:
        print("! train.py has no model.method key yet: the baselines are evaluated without fine-tuning only", flush=True)

    for mode in ("threshold", "topk"):
        _run([sys.executable, "eval.py", "--checkpoint", str(dynvit_dir), "--dense", str(dense_dir), *finetuned,
              "--data", args.data, "--split", "test", "--mode", mode, "--no-speed",
              *(["--tome-r", str(tome_r)] if tome_r is not None else []),
              "--json", f"{args.json_dir}/cifar10_accuracy_{mode}.json"], args.dry_run)


if __name__ == "__main__":
    main()
