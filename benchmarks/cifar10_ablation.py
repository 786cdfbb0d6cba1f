"""The ablation table of docs/BENCHMARKS.md: pruning fine-tunes of the CIFAR-10 teacher that differ
in one choice each, at the same budget, measured the same way.

    python benchmarks/cifar10_ablation.py --variants dynamicvit,noise_anneal [--epochs 1] [--keep-ratio 0.55]
    python benchmarks/cifar10_ablation.py --variants signals,match_h025 --prune-loc 1,3 --keep-ratio 0.42,0.2 --rules
    python benchmarks/cifar10_ablation.py --dataset clutter --variants signals --prune-loc 1,3 --keep-ratio 0.45,0.2
    python benchmarks/cifar10_ablation.py --list            # the variants and what each changes

Every variant starts from the same dense model (``--teacher``, default the dataset's shared
teacher), fine-tunes with the dataset's preset (``configs/cifar10_dynvit.yaml``, or
``configs/cifar10_clutter_dynvit.yaml`` for ``--dataset clutter``) plus the base recipe and its
own overrides for ``--epochs`` epochs, and is measured on the test split in three ways:

- ``topk``: a fixed ``round(r * 64)`` tokens per stage (the budget),
- ``threshold``: the thresholds the training left (logit > 0, keep probability > 0.5): the
  kept fraction per stage shows whether training converged to the decisions inference makes,
- ``calibrated``: thresholds set by ``dynvit.calibrate`` on ``--calib-images`` training images
  for the same budget as top-k, so threshold and top-k compare at equal mean GMACs.

With ``--rules`` the fine-tuned model's own predictors are also swapped for fixed rules at the
same top-k budget (:mod:`dynvit.benchmark.selection`: random, similarity, attention), rows with
mode ``rule:<name>``: what the learned selection adds on its own backbone.

A run whose ``final/`` exists is not retrained; an interrupted one resumes. Results are
appended to ``--json`` (one row per variant and mode) and printed as a Markdown table.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import dynvit  # noqa: E402
from dynvit import benchmark as bench  # noqa: E402
from dynvit.benchmark.selection import evaluate_rules  # noqa: E402
from dynvit.data import SeededImageDataset, balanced_subset, build_transform, scan_image_folder  # noqa: E402
from dynvit.hub import load_pretrained  # noqa: E402
sys.path.insert(0, str(REPO / "benchmarks"))
from cifar10_accuracy import train_once  # noqa: E402

# What every variant starts from: the DynamicViT-style recipe the preset had before this ablation
# (Bernoulli masks, dropped tokens discarded, masked training path, a predictor-only warm-up over
# half the run, the per-image loader), so each row differs from it only in what it names.
BASE = ["--model.dropped_tokens", "discard", "--model.drop_tokens", "false", "--noise.kind", "constant",
        "--noise.scale_start", "1", "--noise.scale_end", "1", "--optim.warmup_epochs", "{0.5}",
        "--optim.backbone_freeze_epochs", "{0.5}", "--data.cache", "none", "--loss.margin_weight", "0",
        "--loss.ratio_per", "image", "--model.prune_loc", "[2,4]", "--model.predictor_prior", "none",
        "--model.predictor_hidden_ratio", "1.0", "--model.predictor_signals", "[]"]
_MERGE = ["--noise.kind", "linear", "--noise.scale_end", "0", "--noise.anneal_epochs", "{0.7}",
          "--model.dropped_tokens", "merge"]
_WARM01 = ["--optim.warmup_epochs", "{0.1}", "--optim.backbone_freeze_epochs", "{0.1}"]
_LR3 = ["--optim.lr", "3e-3", "--optim.backbone_lr_scale", "0.0333"]
# merge_warm01_drop: merging, the short warm-up, dropped tokens removed in training.
_MERGE_DROP = [*_MERGE, *_WARM01, "--model.drop_tokens", "true"]
# merge_warm01_drop with the in-memory data path: the preset before the match prior.
_DROP = [*_MERGE_DROP, "--data.cache", "memory"]
_MATCH = [*_DROP, "--model.predictor_prior", "match"]
# The preset before the signals: the match prior, predictors a quarter as wide, keep 0.58.
_PRESET = [*_MATCH, "--model.predictor_hidden_ratio", "0.25", "--model.keep_ratio", "0.58"]
_H025 = ["--model.predictor_hidden_ratio", "0.25"]
# The signals: the keep logit reads the class token's attention, redundancy ranked by the logit and size.
_SIG = [*_DROP, *_H025, "--model.predictor_signals", "[attention,redundancy,size]"]


def _frozen_mlp(stages: int = 2) -> list[str]:
    """Freeze the predictors' MLPs except the last bias (what a variant names ``fixed_mlp``)."""
    return ["--optim.frozen_params", "[cls_token,pos_embed" + "".join(
        f",predictors.{s}.in_proj,predictors.{s}.out_mlp.0,predictors.{s}.out_mlp.2,predictors.{s}.out_mlp.4.weight"
        for s in range(stages)) + "]"]

# name -> (what it changes, train.py overrides; "{f}" is replaced by f times the epochs)
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "dynamicvit": ("DynamicViT: Bernoulli masks throughout (noise 1, tau 1), ratio per image", []),
    "deterministic": ("deterministic straight-through masks throughout (noise 0)", ["--model.sampler", "deterministic"]),
    "noise_anneal": ("noise scale 1 -> 0 (linear) over the first 70% of the steps, then threshold decisions",
                     ["--noise.kind", "linear", "--noise.scale_end", "0", "--noise.anneal_epochs", "{0.7}"]),
    "noise_tau_anneal": ("noise_anneal + tau 1 -> 0.1 (exponential) over the run",
                         ["--noise.kind", "linear", "--noise.scale_end", "0", "--noise.anneal_epochs", "{0.7}",
                          "--tau.kind", "exponential", "--tau.tau_end", "0.1"]),
    "noise_anneal_batch_ratio": ("noise_anneal, keep-ratio loss on the batch mean (images keep different counts)",
                                 ["--noise.kind", "linear", "--noise.scale_end", "0", "--noise.anneal_epochs", "{0.7}",
                                  "--loss.ratio_per", "batch"]),
    "merge": ("noise_anneal + dropped tokens merged into the most similar kept token",
              ["--noise.kind", "linear", "--noise.scale_end", "0", "--noise.anneal_epochs", "{0.7}",
               "--model.dropped_tokens", "merge"]),
    "merge_batch_ratio": ("merge + keep-ratio loss on the batch mean",
                          ["--noise.kind", "linear", "--noise.scale_end", "0", "--noise.anneal_epochs", "{0.7}",
                           "--model.dropped_tokens", "merge", "--loss.ratio_per", "batch"]),
    "merge_warm01": ("merge, warm-up and backbone freeze over 10% of the steps instead of 50%",
                     [*_MERGE, *_WARM01]),
    "merge_warm01_margin": ("merge_warm01 + decision margin 1 (weight 0.1) from the start (run before the margin was phased in)",
                            [*_MERGE, *_WARM01, "--loss.margin_weight", "0.1"]),
    "merge_warm01_lr3": ("merge_warm01 with predictors at lr 3e-3 (backbone still 1e-4)",
                         [*_MERGE, *_WARM01, "--optim.lr", "3e-3", "--optim.backbone_lr_scale", "0.0333"]),
    "merge_warm01_drop": ("merge_warm01, dropped tokens removed after each stage's first block in training",
                          _MERGE_DROP),
    "merge_warm01_noise1": ("merge_warm01 with Bernoulli masks throughout (noise 1, as DynamicViT)",
                            ["--model.dropped_tokens", "merge", *_WARM01]),
    "merge_warm01_deterministic": ("merge_warm01 with deterministic masks throughout (noise 0)",
                                   ["--model.dropped_tokens", "merge", *_WARM01, "--model.sampler", "deterministic"]),
    "merge_warm01_tau": ("merge_warm01 + tau 1 -> 0.1 (exponential) over the run",
                         [*_MERGE, *_WARM01, "--tau.kind", "exponential", "--tau.tau_end", "0.1"]),
    "merge_warm01_batch_ratio": ("merge_warm01 + keep-ratio loss on the batch mean",
                                 [*_MERGE, *_WARM01, "--loss.ratio_per", "batch"]),
    "merge_warm01_lr3_margin": ("merge_warm01_lr3 + decision margin 1 (weight 0.1) phased in as the noise goes",
                                [*_MERGE, *_WARM01, "--optim.lr", "3e-3", "--optim.backbone_lr_scale", "0.0333",
                                 "--loss.margin_weight", "0.1"]),
    "merge_lr3_loc2": ("merge_warm01_lr3 with one stage, before block 2, keeping 0.45",
                       [*_MERGE, *_WARM01, "--optim.lr", "3e-3", "--optim.backbone_lr_scale", "0.0333",
                        "--model.prune_loc", "[2]", "--model.keep_ratio", "0.45"]),
    "merge_drop_lr3": ("merge_warm01_drop with predictors at lr 3e-3 (backbone still 1e-4)",
                       [*_MERGE_DROP, *_LR3]),
    "merge_drop_margin": ("merge_warm01_drop + decision margin 1 (weight 0.1) phased in as the noise goes",
                          [*_MERGE_DROP, "--loss.margin_weight", "0.1"]),
    "merge_drop_loc135": ("merge_warm01_drop with three stages, before blocks 1, 3 and 5, at keep 0.7 (0.70/0.49/0.34)",
                          [*_MERGE_DROP, "--model.prune_loc", "[1,3,5]",
                           "--model.keep_ratio", "0.7"]),
    "merge_drop_loc12345": ("merge_warm01_drop with a stage before every block from 1, at keep 0.8 (0.80 ... 0.33), "
                            "ToMe-like gradual reduction",
                            [*_MERGE_DROP, "--model.prune_loc", "[1,2,3,4,5]",
                             "--model.keep_ratio", "0.8"]),
    "merge_drop_floor": ("merge_warm01_drop with the noise annealed to 0.2 instead of 0 (a noise floor)",
                         [*_MERGE_DROP, "--noise.scale_end", "0.2"]),
    "merge_drop_lr3_margin": ("merge_drop_lr3 + decision margin 1 (weight 0.1) phased in as the noise goes",
                              [*_MERGE_DROP, *_LR3, "--loss.margin_weight", "0.1"]),
    "merge_drop_lr3_loc2": ("merge_drop_lr3 with one stage, before block 2, keeping 0.45",
                            [*_MERGE_DROP, *_LR3, "--model.prune_loc", "[2]",
                             "--model.keep_ratio", "0.45"]),
    "merge_warm01_loc135": ("merge_warm01 with three stages, before blocks 1, 3 and 5, at keep 0.7 (0.70/0.49/0.34)",
                            [*_MERGE, *_WARM01, "--model.prune_loc", "[1,3,5]", "--model.keep_ratio", "0.7"]),
    "drop_seed1": ("merge_warm01_drop with the in-memory data path (the preset before the match prior), seed 1; "
                   "seed 0 is the accuracy table's 71.11 / 70.71", [*_DROP, "--train.seed", "1"]),
    "match": ("drop_seed1's recipe at seed 0 + the match prior: the keep logit also ranks tokens by how much they "
              "repeat another (ToMe's bipartite criterion; model.predictor_prior match)", _MATCH),
    "match_seed1": ("match with seed 1", [*_MATCH, "--train.seed", "1"]),
    "match_fixed_mlp": ("match with the predictors' MLPs frozen at their initialisation except the last bias: the "
                        "similarity, its learned scale and the bias decide (the bias learns too slowly: training "
                        "kept exactly the prior's half, 0.50 / 0.25, throughout)",
                        [*_MATCH, *_frozen_mlp()]),
    "match_h025_k058": ("match with predictors a quarter as wide, the GMACs saved spent on keep ratio 0.58 "
                        "(0.58 / 0.34; the same GMACs as match): the preset", _PRESET),
    "match_h025_k058_seed1": ("match_h025_k058 (the preset) with seed 1", [*_PRESET, "--train.seed", "1"]),
    "match_h025": ("match with predictors a quarter as wide (the preset before the signals) at the budget given",
                   [*_MATCH, *_H025]),
    "signals": ("drop_seed1's recipe at seed 0, predictors a quarter as wide, reading the class token's attention, "
                "redundancy (similarity to the closest token ranked ahead by the logit) and size, with learned weights",
                _SIG),
    "signals_seed1": ("signals with seed 1", [*_SIG, "--train.seed", "1"]),
    "signals_slr30": ("signals with the signal weights learning 30 times faster than the predictors (lr 0.03)",
                      [*_SIG, "--optim.signal_lr_scale", "30"]),
    "signals_no_attention": ("signals without the attention signal",
                             [*_DROP, *_H025, "--model.predictor_signals", "[redundancy,size]"]),
    "signals_no_redundancy": ("signals without the redundancy signal",
                              [*_DROP, *_H025, "--model.predictor_signals", "[attention,size]"]),
    "signals_no_size": ("signals without the size signal",
                        [*_DROP, *_H025, "--model.predictor_signals", "[attention,redundancy]"]),
    "signals_fit": ("signals with their weights chosen by search before training (dynvit.fit_signals on 1000 "
                    "training images, KL to the teacher in top-k mode) and kept fixed while the rest trains",
                    [*_SIG, "--model.fit_signals_images", "1000", "--optim.signal_lr_scale", "0"]),
    "signals_fit_lr1": ("signals_fit with the signal weights trained on from the fitted ones (straight-through, lr 1e-3)",
                        [*_SIG, "--model.fit_signals_images", "1000"]),
    "signals_fixed_mlp": ("signals with the MLPs frozen at their initialisation except the last bias: the signals, "
                          "their learned weights and the bias decide", [*_SIG, *_frozen_mlp()]),
    "match_h025_loc12345": ("match with predictors a quarter as wide and a stage before every block from 1 at keep "
                            "0.8 (0.80 ... 0.33; ToMe-like gradual merging; the same GMACs as match)",
                            [*_MATCH, "--model.predictor_hidden_ratio", "0.25", "--model.prune_loc", "[1,2,3,4,5]",
                             "--model.keep_ratio", "0.8"]),
    "match_h025_loc12345_seed1": ("match_h025_loc12345 with seed 1",
                                  [*_PRESET, "--model.prune_loc", "[1,2,3,4,5]", "--model.keep_ratio", "0.8",
                                   "--train.seed", "1"]),
    "match_h025_loc135": ("the preset with three stages, before blocks 1, 3 and 5, at keep 0.71 (0.71 / 0.50 / 0.36; "
                          "0.650 of the dense GMACs against the preset's 0.656)",
                          [*_PRESET, "--model.prune_loc", "[1,3,5]", "--model.keep_ratio", "0.71"]),
    "match_h025_loc13": ("the preset with its two stages one block earlier, before blocks 1 and 3, at keep 0.7 "
                         "(0.70 / 0.49; 0.659 of the dense GMACs)",
                         [*_PRESET, "--model.prune_loc", "[1,3]", "--model.keep_ratio", "0.7"]),
}


SHARED = REPO.parent / "shared"
# name -> (preset, teacher, data)
DATASETS = {
    "cifar10": ("configs/cifar10_dynvit.yaml", SHARED / "checkpoints" / "cifar10_vit_dense", SHARED / "data" / "cifar10"),
    "clutter": ("configs/cifar10_clutter_dynvit.yaml", SHARED / "checkpoints" / "cifar10_clutter_vit_dense",
                REPO / "data" / "cifar10_clutter"),
}


def _overrides(variant: str, epochs: float) -> list[str]:
    out = []
    for item in BASE + VARIANTS[variant][1]:
        if item.startswith("{") and item.endswith("}"):
            item = str(round(float(item[1:-1]) * epochs, 4))
        out.append(item)
    return out


def _images(folder, data_config, indices) -> SeededImageDataset:
    return SeededImageDataset(folder, build_transform(data_config, is_training=False), indices=indices)


def measure(model, loader, calib: torch.Tensor, flops_images: torch.Tensor) -> list[dict]:
    """Rows for top-k, threshold as trained and calibrated threshold, at the keep ratio the model
    was trained for."""
    keep_ratio = model.keep_ratio
    input_size = tuple(flops_images.shape[1:])
    n0 = model.patch_embed.num_patches
    rows = []
    for mode in ("topk", "threshold", "calibrated"):
        if mode == "calibrated":
            dynvit.calibrate(model, calib, keep_ratio=keep_ratio)
        else:
            model.keep_ratio = keep_ratio
        model.prune_mode = "topk" if mode == "topk" else "threshold"
        result = bench.evaluate(model, loader)
        kept = [result.tokens_per_block[b] / n0 for b in model.prune_loc]
        gmacs = dynvit.count_flops(model, input_size, images=flops_images)
        rows.append({"mode": mode, "top1": result.top1, "top5": result.top5, "images": result.images,
                     "kept_fraction": kept, "kept_tokens": bench.kept_token_stats(result.kept_tokens),
                     "target": list(model.keep_ratio), "gmacs": gmacs, "thresholds": model.keep_threshold.tolist()})
        model.keep_threshold.zero_()
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", default="dynamicvit,noise_anneal", help="comma-separated names (see --list)")
    p.add_argument("--list", action="store_true", help="print the variants and exit")
    p.add_argument("--table", action="store_true", help="print the table of --json and exit (no training)")
    p.add_argument("--dataset", choices=sorted(DATASETS), default="cifar10")
    p.add_argument("--data", help="ImageFolder root (default: the dataset's)")
    p.add_argument("--teacher", help="dense save_pretrained directory (default: the dataset's shared teacher)")
    p.add_argument("--epochs", type=float, default=1.0, help="fine-tuning epochs, the same for every variant")
    p.add_argument("--keep-ratio", default="0.55", help="r (cumulative r, r**2, ...) or cumulative fractions (0.42,0.2)")
    p.add_argument("--prune-loc", default="", help="the stages (default: the variant's, [2,4] in the base recipe)")
    p.add_argument("--rules", action="store_true", help="also measure fixed selection rules on each fine-tuned backbone")
    p.add_argument("--out", default="runs/ablation")
    p.add_argument("--eval-images", type=int, default=0, help="test images measured (class-balanced; 0 = all)")
    p.add_argument("--calib-images", type=int, default=2000, help="training images the calibration uses")
    p.add_argument("--flops-images", type=int, default=1000, help="test images whose mean GMACs threshold mode reports")
    p.add_argument("--json", default="benchmarks/results/cifar10_ablation.json")
    args, rest = p.parse_known_args(argv)
    extra = [a for a in rest if a != "--"]
    if args.list:
        for name, (what, overrides) in VARIANTS.items():
            print(f"{name:28s} {what}\n{'':28s} {' '.join(overrides) or '(the base recipe, BASE)'}")
        return
    if args.table:
        print(table(json.loads(Path(args.json).read_text())))
        return
    preset, teacher, data = DATASETS[args.dataset]
    args.data, args.teacher = str(args.data or data), str(args.teacher or teacher)
    keep = [float(v) for v in args.keep_ratio.split(",")]
    budget = ["--model.keep_ratio", str(keep[0]) if len(keep) == 1 else "[" + args.keep_ratio + "]"]
    budget += ["--model.prune_loc", f"[{args.prune_loc}]"] if args.prune_loc else []
    tag = ("" if args.dataset == "cifar10" else f"{args.dataset}_") + f"r{args.keep_ratio}" + (
        f"_loc{args.prune_loc.replace(',', '')}" if args.prune_loc else "")
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; see --list")
    epochs = int(args.epochs) if float(args.epochs).is_integer() else args.epochs
    steps_note = f"{epochs} epoch(s)"
    path = Path(args.json)
    test = scan_image_folder(Path(args.data) / "test", what="test")
    train = scan_image_folder(Path(args.data) / "train", what="training")
    dense_gmacs = None
    for name in names:
        out = REPO / args.out / f"{name}_{tag}_e{args.epochs}"
        final = out / "final"
        _, seconds = train_once(preset, args.data, out, ["--model.pretrained_path", args.teacher, "--train.epochs",
                                                         str(epochs), *_overrides(name, float(args.epochs)), *budget, *extra])
        if seconds:
            print(f"= trained {name} in {seconds:.0f} s", flush=True)
        model = load_pretrained(final)
        data_config = dict(model.pretrained_cfg)
        test_set = _images(test, data_config, bench_indices(test.targets, args.eval_images))
        loader = torch.utils.data.DataLoader(test_set, batch_size=250, num_workers=1)
        loader = [(x, y) for x, y in loader]  # decoded once, measured three times
        calib_set = _images(train, data_config, balanced_subset(train.targets, args.calib_images, seed=1))
        calib = torch.stack([calib_set[i][0] for i in range(len(calib_set))])
        everything = torch.cat([x for x, _ in loader])
        flops_images = everything[bench.spread_indices(len(everything), args.flops_images)]
        config = json.loads((final / "config.json").read_text())["dynvit"]
        config = config.get("pruning", config)  # format 2 nests the pruning settings
        if dense_gmacs is None:
            dense_gmacs = dynvit.count_flops(bench.dense_backbone(model), tuple(flops_images.shape[1:]))
        measured = measure(model, loader, calib, flops_images)
        if args.rules:
            measured += [{"mode": f"rule:{r['rule']}", **r} for r in
                         evaluate_rules(model, loader, trained=True, rules=("learned", "random", "similarity", "attention"))]
        for row in measured:
            row["gmacs_ratio"] = row["gmacs"] / dense_gmacs
        # Read just before writing: another run of this script may have added rows meanwhile.
        rows = json.loads(path.read_text()) if path.is_file() else []
        for row in measured:
            row.update(variant=name, what=VARIANTS[name][0], budget=steps_note, dropped_tokens=config.get("dropped_tokens"),
                       keep_ratio=args.keep_ratio, prune_loc=config["prune_loc"], checkpoint=str(final),
                       dataset=args.dataset)
            rows = [r for r in rows if not (r.get("checkpoint") == row["checkpoint"] and r["mode"] == row["mode"])]
            rows.append(row)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(rows, indent=1))
    if path.is_file():
        print(table(json.loads(path.read_text())))


def bench_indices(targets, n: int):
    return balanced_subset(targets, n, seed=0) if n else None


def table(rows: list[dict]) -> str:
    """One line per variant and budget: top-k, threshold as trained (kept fraction per stage against
    the target) and calibrated threshold (kept tokens per image, mean [p5-p95]), each with top-1
    and GMACs (and its ratio to the dense model's); then the rules measured on its backbone."""
    by_variant: dict[tuple, dict] = {}
    for r in rows:
        key = (r["variant"], r["budget"], r.get("dataset", "cifar10"), str(r["keep_ratio"]), str(r.get("prune_loc", [2, 4])))
        by_variant.setdefault(key, {})[r["mode"]] = r
    dense = 0.07132  # the shared CIFAR-10 teacher's GMACs: rows written before gmacs_ratio was recorded

    def ratio(row):
        return f" ({row.get('gmacs_ratio', row['gmacs'] / dense):.3f})"
    head = ["variant", "what it changes", "data, stages", "top-k: top-1", "threshold p > 0.5: kept (target)", "top-1",
            "GMACs", "calibrated: kept per image", "top-1", "GMACs", "rules on its backbone: top-1"]
    body = []
    for (name, budget, dataset, _, loc), modes in by_variant.items():
        k, t, c = modes.get("topk"), modes.get("threshold"), modes.get("calibrated")
        if not (k and t and c):
            continue
        kept = " / ".join(f"{a:.3f}" for a in t["kept_fraction"])
        target = " / ".join(f"{a:.3f}" for a in t["target"])
        spread = " / ".join(f"{q['mean']:.1f} [{q['p5']:.0f}-{q['p95']:.0f}]" for q in c.get("kept_tokens") or [])
        rules = ", ".join(f"{m[5:]} {r['top1']:.2f}" for m, r in modes.items() if m.startswith("rule:"))
        body.append([name, k["what"], f"{dataset} {budget}, {loc}", f"{k['top1']:.2f}", f"{kept} ({target})",
                     f"{t['top1']:.2f}", f"{t['gmacs']:.4f}{ratio(t)}", spread, f"{c['top1']:.2f}",
                     f"{c['gmacs']:.4f}{ratio(c)}", rules])
    return bench.markdown_table(head, body)


if __name__ == "__main__":
    main()
