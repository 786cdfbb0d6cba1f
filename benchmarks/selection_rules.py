"""Which tokens to keep, with everything else fixed: one model, one budget, different rules.

    python benchmarks/selection_rules.py --checkpoint runs/bench_cifar10/dynvit/final
    python benchmarks/selection_rules.py --checkpoint ../shared/checkpoints/cifar10_vit_dense --prune-loc 2,4
    python benchmarks/selection_rules.py --checkpoint DIR --data data/cifar10_clutter --json out.json --seed 1
    python benchmarks/selection_rules.py --checkpoint ../shared/checkpoints/cifar10_vit_dense --prune-loc 1,3 \
        --keep-ratio 0.5,0.2 --fit-signals 1000

Every rule replaces the model's predictors by a function of the same tokens and keeps the same
number of tokens per stage (top-k at the model's keep ratio), so the backbone, the merging of
dropped tokens and the budget stay as they are and only the choice of tokens differs (the rules
of :mod:`dynvit.benchmark.selection`): ``learned``, ``learned_mlp``, ``inverted``, ``random``,
``similarity`` (ToMe's bipartite criterion) and ``attention`` (EViT's criterion).

A dense checkpoint is patched first (``--prune-loc``, ``--keep-ratio``, ``--dropped-tokens``);
it has no learned rules, unless ``--fit-signals N`` patches it with predictors that read the
signals (:mod:`dynvit.signals`) and fits their weights on N training images
(:func:`dynvit.fit_signals`): the rule ``learned_signals`` is then that fitted mix, off the
shelf. Top-1 is over the test split (all of it by default). ``--json`` appends
one row per rule (``rule``, ``keep_ratio``, ``gmacs_ratio``, ``top1``, ``seed``, ...), replacing
rows of the same checkpoint, rule and seed.
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
from dynvit.data import SeededImageDataset, balanced_subset, build_transform, scan_image_folder  # noqa: E402
from dynvit.hub import load_pretrained  # noqa: E402
from dynvit.patch import is_patched  # noqa: E402
from dynvit.benchmark.masks import mask_statistics  # noqa: E402
from dynvit.benchmark.selection import RULES, evaluate_rules  # noqa: E402

def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="a save_pretrained directory (pruning or dense)")
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "cifar10"))
    p.add_argument("--split", default="test")
    p.add_argument("--images", type=int, default=0, help="class-balanced test images (0 = all)")
    p.add_argument("--rules", default=",".join(RULES), help="comma-separated, from " + ", ".join(RULES))
    p.add_argument("--prune-loc", default="2,4", help="for a dense checkpoint: the stages")
    p.add_argument("--keep-ratio", default=None,
                   help="r or cumulative fractions (0.5,0.23); default: a fine-tuned model's own, 0.55 for a dense one")
    p.add_argument("--dropped-tokens", default="merge", help="for a dense checkpoint: discard or merge")
    p.add_argument("--seed", type=int, default=0, help="seed of the random rule (recorded in each row)")
    p.add_argument("--tag", default="", help="free text recorded in each row (e.g. the fine-tune's seed and budget)")
    p.add_argument("--fit-signals", type=int, default=0, metavar="N",
                   help="for a dense checkpoint: predictors reading the signals, their weights fitted on N training images")
    p.add_argument("--masks", default="", metavar="TEACHER",
                   help="also print where threshold mode keeps tokens (column balance, kept tokens p5-p95) and the "
                        "rank correlation of the last stage's kept tokens with TEACHER's confidence (a dense checkpoint)")
    p.add_argument("--json", default="", help="append the rows here")
    args = p.parse_args(argv)

    model = load_pretrained(args.checkpoint).eval()
    trained = is_patched(model)
    kind = "fine-tuned" if trained else "dense, patched" + (", signals fitted" if args.fit_signals else "")
    dense_gmacs = dynvit.count_flops(bench.dense_backbone(model), (3, *model.patch_embed.img_size))
    keep = [float(v) for v in (args.keep_ratio or "0.55").split(",")]
    keep = keep[0] if len(keep) == 1 else keep
    if not trained:
        signals = ("attention", "redundancy", "size") if args.fit_signals else ()
        model = dynvit.patch(model, prune_loc=[int(a) for a in args.prune_loc.split(",")], keep_ratio=keep,
                             dropped_tokens=args.dropped_tokens, predictor_signals=signals).eval()
    elif args.keep_ratio:
        model.keep_ratio = keep
    transform = build_transform(dict(model.pretrained_cfg), is_training=False)
    if args.fit_signals and not trained:
        train = scan_image_folder(Path(args.data) / "train", what="training")
        fit_set = SeededImageDataset(train, transform, indices=balanced_subset(train.targets, args.fit_signals, seed=1))
        search = dynvit.fit_signals(model, torch.utils.data.DataLoader(fit_set, batch_size=250))
        for step in search:
            print(f"fit_signals pass {step['pass']} stage {step['stage']}: {step['weights']} (KL {step['kl']:.4f})")
        trained, args.rules = True, ",".join(r for r in args.rules.split(",") if r not in ("learned", "inverted", "learned_mlp"))
        args.tag = (args.tag + " " if args.tag else "") + f"signals fitted on {args.fit_signals} training images"
    folder = scan_image_folder(Path(args.data) / args.split, what=args.split)
    indices = balanced_subset(folder.targets, args.images, seed=0) if args.images else None
    data = SeededImageDataset(folder, transform, indices=indices)
    loader = [(x, y) for x, y in torch.utils.data.DataLoader(data, batch_size=500, num_workers=1)]
    wanted = tuple(r.strip() for r in args.rules.split(",") if r.strip())
    rows = evaluate_rules(model, loader, trained=trained, seed=args.seed, rules=wanted, dense_gmacs=dense_gmacs)
    for row in rows:
        row.update(checkpoint=str(args.checkpoint), data=str(args.data), tag=args.tag)
    table = [[r["rule"], f"{r['top1']:.2f}", f"{r['gmacs_ratio']:.3f}", " / ".join(f"{t:.0f}" for t in r["tokens"])]
             for r in rows]
    print(f"\n{args.checkpoint} ({kind}; prune_loc {list(model.prune_loc)}, "
          f"keep {[round(r, 3) for r in model.keep_ratio]}, {model.dropped_tokens}), {len(data)} {args.split} images, top-k:\n")
    print(bench.markdown_table(["rule", "top-1", "GMACs ratio", "tokens at the stages"], table))
    if args.masks:
        print_masks(model, loader, load_pretrained(args.masks).eval())
    if args.json:
        path = Path(args.json)
        old = json.loads(path.read_text()) if path.is_file() else []
        same = {(r["checkpoint"], r["rule"], r["seed"], tuple(r["keep_ratio"])) for r in rows}
        old = [r for r in old if (r["checkpoint"], r["rule"], r["seed"], tuple(r["keep_ratio"])) not in same]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(old + rows, indent=1))
    return rows


def print_masks(model, loader, teacher) -> dict:
    """Threshold mode's masks over ``loader``: kept fraction on even and odd patch columns per
    stage, kept tokens at the last stage (mean, p5-p95), and their rank correlation with the
    teacher's confidence (negative: harder images keep more)."""
    stats = mask_statistics(model, loader, "threshold", teacher=teacher)
    kept = torch.tensor(stats["kept_last"])
    p5, p95 = (float(q) for q in torch.quantile(kept, torch.tensor([0.05, 0.95])))
    columns = ", ".join(f"stage {i}: even {c['even']:.3f} odd {c['odd']:.3f} (gap {c['gap']:.3f})"
                        for i, c in enumerate(stats["columns"]))
    print(f"\nthreshold mode (thresholds {[round(float(t), 3) for t in torch.as_tensor(model.keep_threshold).flatten()]}): {columns}; kept at the last "
          f"stage {float(kept.mean()):.1f} [{p5:.0f}-{p95:.0f}]; Spearman with the teacher's confidence "
          f"{stats['confidence_spearman']:+.3f}, with its probability of the true class {stats['true_class_spearman']:+.3f}")
    return stats


if __name__ == "__main__":
    main()
