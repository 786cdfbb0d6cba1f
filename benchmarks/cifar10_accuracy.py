"""The accuracy tables of docs/BENCHMARKS.md: dynvit against EViT, ToMe, random dropping and the
dense model itself, on CIFAR-10 or cluttered CIFAR-10, at two budgets, each method without and
with the same fine-tune, over several seeds; and what the learned selection adds on its own
backbone.

    python benchmarks/cifar10_accuracy.py                              # CIFAR-10: seeds 0,1,2, both budgets
    python benchmarks/cifar10_accuracy.py --dataset clutter --seeds 0  # cluttered CIFAR-10 (build it first:
                                                                       # ../shared/tools/make_cifar10_clutter.py)
    python benchmarks/cifar10_accuracy.py --budgets low --seeds 0 --eval-images 2000   # a quick look

For each seed (``--seeds``) and budget (``--budgets``: ``preset``, the preset's stages and keep
ratio, about 0.65 of the dense GMACs on CIFAR-10; ``low``, about 0.45):

1. Fine-tunes from the dense teacher with one recipe (the dataset's preset: the same epochs,
   data, schedule, teacher and distillation, the fine-tune's seed): dynvit, then EViT, ToMe
   (``r`` matched to dynvit's top-k GMACs) and random dropping through ``model.method``, and
   per seed once the dense model itself (``dense+ft``: what the same fine-tune gives without
   pruning). A run whose ``final/`` exists is reused; an interrupted one resumes.
2. Measures on the test split: the teacher; dynvit in top-k mode, in threshold mode as trained
   (logit > 0) and calibrated (``dynvit.calibrate`` on ``--calib-images`` training images) to
   the top-k budget; every baseline off the shelf and fine-tuned; dense+ft.
3. The learned selection against fixed rules on dynvit's own fine-tuned backbone
   (:mod:`dynvit.benchmark.selection`: learned, random, similarity, attention, ...), top-k at
   the same budget: rows in ``--selection-json``.
4. Where the masks keep tokens (:func:`dynvit.benchmark.masks.mask_statistics`): the kept
   fraction on even and odd patch columns per stage (top-k, threshold as trained and
   calibrated) and, calibrated, the rank correlation between an image's kept tokens at the last
   stage and the teacher's confidence on it.

``--json`` gets every row (``method``, ``finetuned``, ``mode``, ``budget``, ``seed``, ``gmacs``,
``gmacs_ratio``, ``top1``, ...), the summary over seeds (mean, standard deviation, min, max) and
the wall time; ``--markdown`` the tables, also printed.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import dynvit  # noqa: E402
from dynvit import benchmark as bench  # noqa: E402
from dynvit.benchmark.masks import mask_statistics  # noqa: E402
from dynvit.benchmark.selection import evaluate_rules  # noqa: E402
from dynvit.config import load_config  # noqa: E402
from dynvit.data import SeededImageDataset, balanced_subset, build_transform, scan_image_folder  # noqa: E402
from dynvit.hub import load_pretrained  # noqa: E402

SHARED = REPO.parent / "shared"
BASELINES = ("evit", "tome", "random")
# name -> preset, teacher, data, and the budgets: name -> (prune_loc, cumulative keep ratios); None = the preset's
DATASETS = {
    "cifar10": dict(preset="configs/cifar10_dynvit.yaml", teacher=SHARED / "checkpoints" / "cifar10_vit_dense",
                    data=SHARED / "data" / "cifar10", budgets={"preset": None, "low": ([1, 3], [0.42, 0.2])}),
    "clutter": dict(preset="configs/cifar10_clutter_dynvit.yaml",
                    teacher=SHARED / "checkpoints" / "cifar10_clutter_vit_dense", data=REPO / "data" / "cifar10_clutter",
                    budgets={"preset": None, "high": ([2, 4], [0.58, 0.34])}),
}


def train_once(config: str, data, out: Path, overrides: list[str]) -> tuple[Path, float]:
    """Fine-tune with ``train.py`` unless ``out/final`` exists (an interrupted run resumes); the
    final directory and the seconds it took (0 if reused). Every training image is trained on
    (the benchmarks calibrate threshold mode themselves) and validation is top-k only."""
    final = out / "final"
    if (final / "config.json").is_file():
        print(f"= {final} exists, not retrained", flush=True)
        return final, 0.0
    cmd = [sys.executable, "train.py", "--config", config, "--data.path", str(data), "--train.output_dir", str(out),
           "--train.resume", "auto", "--train.progress_bar", "false", "--train.eval_modes", "[topk]",
           "--train.flops_images", "0", "--train.calibrate_images", "0", *overrides]
    print("+ " + " ".join(cmd), flush=True)
    t0 = time.time()
    subprocess.run(cmd, cwd=REPO, check=True)
    return final, time.time() - t0


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


def _list(values) -> str:
    return "[" + ",".join(str(v) for v in values) + "]"


class Bench:
    """One dataset's runs and measurements: the teacher, the data, and the fine-tunes by seed and budget."""

    def __init__(self, args, preset_cfg):
        self.args, self.preset = args, preset_cfg
        self.out = REPO / args.out
        self.dense = load_pretrained(args.teacher, device=args.device)
        self.size = (3, *self.dense.patch_embed.img_size)
        self.dense_gmacs = dynvit.count_flops(self.dense.cpu(), self.size)
        self.dense.to(args.device)
        test = _dataset(args, "test", self.dense, args.eval_images, 0)
        self.loader = [(x.to(args.device), y.to(args.device)) for x, y in torch.utils.data.DataLoader(test, batch_size=250)]
        self.images = len(test)
        calib_set = _dataset(args, "train", self.dense, args.calib_images, 1)
        self.calib = torch.stack([calib_set[i][0] for i in range(len(calib_set))]).to(args.device)
        everything = torch.cat([x for x, _ in self.loader])
        self.flops_images = everything[bench.spread_indices(len(everything), args.flops_images)]
        self.train_seconds: dict[str, float] = {}

    def budget(self, name: str) -> tuple[list[int], list[float], int]:
        """Stages, cumulative keep ratios and ToMe's matched ``r`` of a budget."""
        spec = DATASETS[self.args.dataset]["budgets"][name]
        m = self.preset.model
        loc, keep = spec if spec is not None else (list(m.prune_loc), m.keep_ratio)
        probe = dynvit.build_model(self.dense.dynvit_meta["model_name"], prune_loc=loc, keep_ratio=keep, prune_mode="topk",
                                   predictor_hidden_ratio=m.predictor_hidden_ratio, predictor_prior=m.predictor_prior,
                                   predictor_signals=m.predictor_signals, dropped_tokens=m.dropped_tokens,
                                   **self.dense.dynvit_meta["timm_kwargs"])
        tome_r, _ = bench.match_tome_r(self.dense.cpu(), dynvit.count_flops(probe, self.size), self.size)
        self.dense.to(self.args.device)
        return list(probe.prune_loc), list(probe.keep_ratio), tome_r

    def finetune(self, method: str, seed: int, budget: str | None, extra: list[str]):
        run = self.out / f"seed{seed}" / (method if budget is None else f"{budget}/{method}")
        common = ["--model.pretrained_path", str(self.args.teacher), "--train.seed", str(seed)]
        if self.args.finetune_epochs:
            common += _scaled_schedule(self.preset, self.args.finetune_epochs)
        if self.args.train_subset:
            common += ["--data.train_subset", str(self.args.train_subset)]
        method_args = [] if method == "dynvit" else ["--model.method", method]
        final, seconds = train_once(self.args.preset, self.args.data, run,
                                    common + method_args + extra + self.args.train_args)
        self.train_seconds[str(run.relative_to(self.out))] = round(seconds)
        return load_pretrained(final, device=self.args.device)

    def measure(self, tuned, finetuned: dict, dense_ft, keep_ratio, tome_r) -> list[dict]:
        """Every row at one budget and seed: the teacher, dense+ft, dynvit in three modes, the baselines."""
        common = dict(input_size=self.size, finetuned=finetuned, loader=self.loader, images=self.flops_images, tome_r=tome_r)
        model = copy.deepcopy(tuned)
        model.keep_threshold.zero_()
        rows = bench.compare(self.dense, dynvit_model=model, keep_ratio=keep_ratio, mode="topk", **common)[0]
        for row in rows:
            row.setdefault("finetuned", row["method"].endswith("+ft") or row["method"] == "dynvit")
            row["mode"] = "topk" if row["method"] == "dynvit" else "-"
        extra = []
        for mode in ("threshold", "calibrated"):
            if mode == "calibrated":
                dynvit.calibrate(model, self.calib, keep_ratio=keep_ratio)
            row = bench.compare(self.dense, dynvit_model=model, methods=("dense", "dynvit"), mode="threshold",
                                **common)[0][1]
            row.update(mode=mode, finetuned=True, thresholds=model.keep_threshold.tolist())
            row["setting"] = ("as trained (logit > 0), " if mode == "threshold" else f"calibrated to {keep_ratio}, ") + \
                row["setting"]
            extra.append(row)
        result = bench.evaluate(dense_ft, self.loader)
        extra.append({"method": "dense+ft", "finetuned": True, "mode": "-", "setting": "the same fine-tune, no pruning",
                      "gmacs": self.dense_gmacs, "params_m": sum(p.numel() for p in dense_ft.parameters()) / 1e6,
                      **result.summary()})
        rows = rows[:2] + extra + rows[2:]
        for r in rows:
            r["gmacs_ratio"] = r["gmacs"] / self.dense_gmacs
            r["method"] = "dense" if r["method"] == "dense+ft" else r["method"].removesuffix("+ft")
        return rows

    def masks(self, tuned, keep_ratio) -> dict:
        """Column balance per mode and, calibrated, the difficulty correlation."""
        model = copy.deepcopy(tuned)
        model.keep_threshold.zero_()
        out = {"topk": mask_statistics(model, self.loader, "topk"), "threshold": mask_statistics(model, self.loader, "threshold")}
        dynvit.calibrate(model, self.calib, keep_ratio=keep_ratio)
        out["calibrated"] = mask_statistics(model, self.loader, "threshold", teacher=self.dense)
        for stats in out.values():
            stats.pop("kept_last")
        return out


def summarize(rows: list[dict]) -> list[dict]:
    """Mean, standard deviation, min and max over seeds of each (budget, method, fine-tuned, mode)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["budget"], r["method"], r["finetuned"], r["mode"]), []).append(r)
    out = []
    for (budget, method, finetuned, mode), rs in groups.items():
        top1 = [r["top1"] for r in rs]
        out.append({"budget": budget, "method": method, "finetuned": finetuned, "mode": mode, "seeds": [r["seed"] for r in rs],
                    "top1": top1, "top1_mean": statistics.fmean(top1), "top1_std": statistics.stdev(top1) if len(rs) > 1 else 0.0,
                    "top1_min": min(top1), "top1_max": max(top1), "gmacs_ratio": statistics.fmean(r["gmacs_ratio"] for r in rs),
                    "setting": rs[0].get("setting", "")})
    return out


def _label(s: dict) -> str:
    name = s["method"] + ("+ft" if s["finetuned"] and s["method"] != "dynvit" else "")
    return name + (f" ({s['mode']})" if s["method"] == "dynvit" else "")


def summary_table(summary: list[dict], budget: str) -> str:
    body = [[_label(s), s["setting"], f"{s['gmacs_ratio']:.3f}", " / ".join(f"{v:.2f}" for v in s["top1"]),
             f"{s['top1_mean']:.2f}", f"{s['top1_std']:.2f}"] for s in summary if s["budget"] == budget]
    return bench.markdown_table(["method", "setting", "GMACs ratio", "top-1 per seed", "mean", "std"], body)


def selection_table(rows: list[dict], budget: str) -> str:
    by_rule: dict[str, list[float]] = {}
    ratio: dict[str, float] = {}
    for r in rows:
        if r["budget"] == budget:
            by_rule.setdefault(r["rule"], []).append(r["top1"])
            ratio[r["rule"]] = r["gmacs_ratio"]
    body = [[rule, f"{ratio[rule]:.3f}", " / ".join(f"{v:.2f}" for v in v), f"{statistics.fmean(v):.2f}"]
            for rule, v in by_rule.items()]
    return bench.markdown_table(["rule (on dynvit's fine-tuned backbone, top-k)", "GMACs ratio", "top-1 per seed", "mean"],
                                body)


def mask_table(stats: dict) -> str:
    body = []
    for (budget, seed), modes in stats.items():
        for mode, s in modes.items():
            cols = " / ".join(f"{c['even']:.3f} vs {c['odd']:.3f}" for c in s["columns"])
            rho = f"{s['confidence_spearman']:+.3f}" if "confidence_spearman" in s else ""
            body.append([budget, seed, mode, cols, rho])
    return bench.markdown_table(["budget", "seed", "mode", "kept on even vs odd columns, per stage",
                                 "spearman(kept at last stage, teacher confidence)"], body)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", choices=sorted(DATASETS), default="cifar10")
    p.add_argument("--data", help="ImageFolder root (default: the dataset's)")
    p.add_argument("--teacher", help="dense save_pretrained directory (default: the dataset's shared teacher)")
    p.add_argument("--seeds", default="0,1,2", help="fine-tune seeds")
    p.add_argument("--budgets", default="", help="comma-separated budget names (default: all of the dataset's)")
    p.add_argument("--out", default=None, help="runs folder (default runs/bench_<dataset>)")
    p.add_argument("--finetune-epochs", type=int, help="default: the preset's; the same for every method")
    p.add_argument("--train-subset", type=int, default=0, help="training images per fine-tune (0 = all)")
    p.add_argument("--eval-images", type=int, default=0, help="test images (class-balanced; 0 = all 10,000)")
    p.add_argument("--calib-images", type=int, default=2000, help="training images for dynvit.calibrate")
    p.add_argument("--flops-images", type=int, default=1000, help="test images whose mean GMACs threshold mode reports")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", default=None, help="default benchmarks/results/<dataset>_accuracy.json")
    p.add_argument("--markdown", default=None, help="default benchmarks/results/<dataset>_accuracy.md")
    p.add_argument("--selection-json", default=None, help="default benchmarks/results/selection_rules[_clutter].json")
    args, rest = p.parse_known_args(argv)
    args.train_args = [a for a in rest if a != "--"]
    spec = DATASETS[args.dataset]
    args.preset, args.data = spec["preset"], Path(args.data or spec["data"])
    args.teacher = Path(args.teacher or spec["teacher"])
    args.out = args.out or f"runs/bench_{args.dataset}"
    results = REPO / "benchmarks" / "results"
    args.json = args.json or str(results / f"{args.dataset}_accuracy.json")
    args.markdown = args.markdown or str(results / f"{args.dataset}_accuracy.md")
    args.selection_json = args.selection_json or str(
        results / ("selection_rules.json" if args.dataset == "cifar10" else f"selection_rules_{args.dataset}.json"))
    if not (args.teacher / "config.json").is_file():
        raise SystemExit(f"no dense model at {args.teacher} (a dynvit.save_pretrained directory); pass --teacher")
    start = time.time()
    seeds = [int(s) for s in args.seeds.split(",")]
    budgets = [b.strip() for b in args.budgets.split(",") if b.strip()] or list(spec["budgets"])
    unknown = sorted(set(budgets) - set(spec["budgets"]))
    if unknown:
        raise SystemExit(f"unknown budgets {unknown} for {args.dataset}; choose from {list(spec['budgets'])}")
    b = Bench(args, load_config(REPO / args.preset))
    plans = {name: b.budget(name) for name in budgets}
    for name, (loc, keep, r) in plans.items():
        print(f"budget {name}: prune_loc {loc}, keep {[round(k, 3) for k in keep]}, ToMe r={r}", flush=True)

    rows, selection, masks = [], [], {}
    for seed in seeds:
        dense_ft = b.finetune("dense", seed, None, [])
        for name, (loc, keep, tome_r) in plans.items():
            budget = ["--model.prune_loc", _list(loc), "--model.keep_ratio", _list(keep)]
            tuned = b.finetune("dynvit", seed, name, budget)
            finetuned = {m: b.finetune(m, seed, name, budget + (["--model.tome_r", str(tome_r)] if m == "tome" else []))
                         for m in BASELINES}
            measured = b.measure(tuned, finetuned, dense_ft, keep, tome_r)
            for row in measured:
                row.update(budget=name, seed=seed, keep_ratio=keep, prune_loc=loc)
            rows += measured
            for row in evaluate_rules(tuned, b.loader, trained=True, seed=seed, dense_gmacs=b.dense_gmacs):
                selection.append({**row, "budget": name, "dataset": args.dataset, "checkpoint": str(b.out / f"seed{seed}")})
            masks[(name, seed)] = b.masks(tuned, keep)
            print(f"seed {seed}, budget {name}: done ({time.time() - start:.0f} s)", flush=True)

    summary = summarize(rows)
    text = [f"# {args.dataset}: {b.images} test images, seeds {seeds}\n"]
    for name, (loc, keep, r) in plans.items():
        text += [f"\n## Budget {name}: prune_loc {loc}, keep {[round(k, 3) for k in keep]}, ToMe r={r}\n",
                 summary_table(summary, name), "\n### Learned selection against fixed rules\n", selection_table(selection, name)]
    text += ["\n## Where the masks keep tokens\n", mask_table(masks)]
    result = {"command": "python benchmarks/cifar10_accuracy.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "machine": bench.machine_info(args.device), "dataset": args.dataset, "teacher": str(args.teacher),
              "preset": args.preset, "seeds": seeds,
              "budgets": {n: {"prune_loc": loc, "keep_ratio": keep, "tome_r": r} for n, (loc, keep, r) in plans.items()},
              "train_seconds": b.train_seconds, "wall_seconds": round(time.time() - start), "rows": rows,
              "summary": summary, "masks": {f"{n}/seed{s}": v for (n, s), v in masks.items()}}
    bench.write_json(args.json, result)
    bench.write_json(args.selection_json, selection)
    text.append(f"\nwall time {result['wall_seconds']} s")
    Path(args.markdown).write_text("\n".join(text) + "\n")
    print("\n".join(text))
    print(f"wrote {args.json}, {args.markdown}, {args.selection_json}")
    return result


if __name__ == "__main__":
    main()
