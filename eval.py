"""Benchmark dynvit against EViT, ToMe and random dropping: accuracy, GMACs, tokens, speed.

    python eval.py --checkpoint DIR --data.path PATH [--mode threshold|topk|none] [--model.keep_ratio R]
    python eval.py --checkpoint hf-hub:org/name --data.path PATH           # a model on the Hugging Face Hub
    python eval.py --model.name deit_small_patch16_224 --model.keep_ratio 0.7 --flops-only   # no data, no weights
    python eval.py --model.name deit_small_patch16_224 --pretrained --data.path /imagenet/val --methods dense,evit,tome
    python eval.py --checkpoint DIR --data.path PATH --budget 0.6 [--calib-images 1000] [--hist out/kept.png]
    python eval.py --checkpoint DIR --data.path PATH --sweep 0.9,0.8,0.7,0.6,0.5 --plot out/pareto.png
    python eval.py --checkpoint DIR --data.path PATH --visualize 16 --out out/masks.png

Options that train.py also has take its names (--data.path, --data.num_workers, --model.name,
--model.keep_ratio, --model.prune_loc, --train.seed, ...); the short names of earlier versions
(--data, --workers, --model, --keep-ratio, --seed, ...) still work.

``--budget R`` calibrates the thresholds of threshold mode (``dynvit.calibrate``) so that the
mean kept fraction is R (``R**s`` after stage ``s``) on ``--calib-images`` images held out of
the evaluated split (or taken from ``--calib-split``), then measures on the rest. A sweep of a
trained model measures dynvit at each budget in top-k mode and in calibrated threshold mode.

Every method is built from the same dense model (``--dense DIR``, else the backbone of
``--checkpoint``) and measured in this one process: a Markdown table goes to stdout, every
figure to ``--json`` and progress bars to stderr (when it is a terminal; ``--no-progress``).
``--data.path`` is an ImageFolder split (class folders), or a dataset root holding ``val/`` or
``test/`` (or ``--split NAME``). See docs/BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys

import timm
import torch
from torch.utils.data import DataLoader
from tqdm.contrib.logging import logging_redirect_tqdm

import dynvit
from dynvit import benchmark as bench
from dynvit.cli import ArgumentParser, HelpFormatter, user_errors
from dynvit.config import ConfigError
from dynvit.data import DataError, SeededImageDataset, balanced_subset, build_transform, scan_image_folder
from dynvit.hub import load_pretrained
from dynvit.progress import disable_progress_bars, progress
from dynvit.visualize import save_accuracy_vs_gmacs, save_keep_mask_grid, save_kept_histogram

logger = logging.getLogger("eval")
_CACHE_BYTES = 1 << 30  # evaluation sets smaller than this are decoded once and kept in memory


def _floats(text: str) -> list[float]:
    """``0.7``, ``0.8,0.5`` or ``[0.8, 0.5]`` (train.py's YAML form)."""
    return [float(v) for v in text.strip("[] ").split(",") if v.strip()]


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.strip("[] ").split(",") if v.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="eval.py", description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1], allow_abbrev=False)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="a model saved by dynvit.save_pretrained (dynvit or dense): a folder, "
                     "local-dir:DIR or hf-hub:org/name")
    src.add_argument("--model.name", "--model", dest="model", help="timm model name: random weights (GMACs and speed "
                     "need no training), or the hub's with --pretrained")
    p.add_argument("--model.pretrained", "--pretrained", dest="pretrained", action="store_true",
                   help="with --model.name: timm's pretrained weights (timm.create_model(pretrained=True); needs the "
                   "network or a populated Hugging Face cache)")
    p.add_argument("--model.kwargs", "--model-kwargs", dest="model_kwargs", default="",
                   help="timm kwargs for --model.name as YAML, e.g. '{img_size: 32}'")
    p.add_argument("--dense", help="dense checkpoint the baselines start from (default: the backbone of --checkpoint)")
    p.add_argument("--finetuned", action="append", default=[], metavar="METHOD=DIR",
                   help="a fine-tuned baseline checkpoint (evit, tome or random), reported as METHOD+ft; repeatable")
    p.add_argument("--data.path", "--data", dest="data", help="ImageFolder split, or a root with val/ or test/")
    p.add_argument("--split", help="sub-folder of --data.path to evaluate")
    p.add_argument("--limit", type=int, default=0, help="evaluate on this many images (class-balanced); 0 = all")
    p.add_argument("--data.val_batch_size", "--batch-size", dest="batch_size", type=int, default=128,
                   help="evaluation batch size")
    p.add_argument("--data.num_workers", "--workers", dest="workers", type=int, default=2, help="data loader workers")
    p.add_argument("--methods", default=",".join(bench.METHODS), help="rows, comma-separated (dense is always measured)")
    p.add_argument("--mode", choices=("threshold", "topk", "none"),
                   help="dynvit pruning mode (default: threshold for a trained dynvit model, else topk)")
    p.add_argument("--model.keep_ratio", "--keep-ratio", dest="keep_ratio", type=_floats,
                   help="r, or one cumulative fraction per stage (topk mode and baselines)")
    p.add_argument("--model.prune_loc", "--prune-loc", dest="prune_loc", type=_ints,
                   help="stages, e.g. 3,6,9 (no checkpoint)")
    p.add_argument("--model.tome_r", "--tome-r", dest="tome_r", type=int,
                   help="ToMe tokens merged per block (default: matched to dynvit's GMACs)")
    p.add_argument("--flops-only", action="store_true", help="GMACs, tokens and parameters only: no data, no timing")
    p.add_argument("--flops-images", type=int, default=64,
                   help="images (spread over the classes) averaged for threshold-mode GMACs")
    p.add_argument("--no-speed", action="store_true", help="skip the timing")
    p.add_argument("--speed-batch", type=int, default=64, help="the large timed batch (batch 1 is always timed)")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats per model and batch (median reported)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--budget", type=_floats, help="calibrate threshold mode to this keep ratio (r, or one per stage) "
                   "on held-out images, then measure")
    p.add_argument("--calib-images", type=int, default=1000, help="images held out of the split for --budget/--sweep")
    p.add_argument("--calib-split", help="calibrate on this sub-folder of --data.path instead of holding images out")
    p.add_argument("--sweep", type=_floats, help="keep ratios for an accuracy-vs-GMACs curve (dynvit: top-k and "
                   "calibrated threshold at each)")
    p.add_argument("--plot", help="PNG of the sweep, one line per method")
    p.add_argument("--hist", help="PNG histogram of the patch tokens each image keeps (trained dynvit model)")
    p.add_argument("--visualize", type=int, default=0, metavar="N", help="only draw the kept patches of N images")
    p.add_argument("--out", default="out/masks.png", help="PNG of --visualize")
    p.add_argument("--json", default="out/eval.json", help="where every figure is written")
    p.add_argument("--train.seed", "--seed", dest="seed", type=int, default=0,
                   help="seed of the image subset and of random dropping")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (they show only on a terminal anyway)")
    return p


def parse_args(argv: list[str] | None = None, p: argparse.ArgumentParser | None = None) -> argparse.Namespace:
    p = p or build_parser()
    args = p.parse_args(argv)
    if args.plot and not args.sweep:
        p.error("--plot draws a --sweep")
    if args.visualize and not args.data:
        p.error("--visualize needs --data.path")
    if (args.budget or args.hist) and not args.data:
        p.error("--budget and --hist need --data.path")
    if args.budget and args.sweep:
        p.error("--sweep calibrates at every budget; give --budget or --sweep, not both")
    if args.budget and args.mode in ("topk", "none"):
        p.error(f"--budget calibrates threshold mode; it does not apply to --mode {args.mode}")
    bad = [r for r in args.keep_ratio or [] if not 0.0 < r <= 1.0]
    if bad:
        p.error(f"--model.keep_ratio must be in (0, 1], got {bad}: r keeps r**s of the patch tokens after stage s "
                "(e.g. 0.7), or give one cumulative fraction per stage")
    bad = [r for r in (args.budget or []) + (args.sweep or []) if not 0.0 < r <= 1.0]
    if bad:
        p.error(f"budgets and sweep keep ratios must be in (0, 1], got {bad}")
    if args.pretrained and not args.model:
        p.error("--pretrained loads timm's weights for --model.name; a --checkpoint has its own")
    if (args.budget or args.sweep) and args.calib_images <= 0:
        p.error("--calib-images must be > 0: calibration needs images")
    return args


# ---- models and data ----------------------------------------------------------------------
def data_config(model) -> dict:
    """timm's data config of ``model``, with the input size the model was built for (timm keeps
    224 in ``pretrained_cfg`` when a model is created with another ``img_size``)."""
    config = dict(timm.data.resolve_model_data_config(model))
    pe = model.patch_embed
    if pe.img_size is not None and not getattr(model, "dynamic_img_size", False):
        config["input_size"] = (model.in_chans, *pe.img_size)
    return config


def load_models(args) -> tuple[torch.nn.Module, torch.nn.Module | None, dict]:
    """The dense model, the trained dynvit model (or None) and fine-tuned baselines."""
    import yaml

    if args.checkpoint:
        model = load_pretrained(args.checkpoint, device=args.device)
    else:
        kwargs = yaml.safe_load(args.model_kwargs) or {} if args.model_kwargs else {}
        model = timm.create_model(args.model, pretrained=args.pretrained, **kwargs).to(args.device).eval()
        model.dynvit_meta = {"model_name": args.model, "timm_kwargs": kwargs}
    trained = model if dynvit.is_patched(model) else None
    dense = bench.dense_backbone(load_pretrained(args.dense, device=args.device) if args.dense else model)
    finetuned = {}
    for item in args.finetuned:
        method, _, path = item.partition("=")
        if method not in ("evit", "tome", "random") or not path:
            raise ConfigError(f"--finetuned expects evit=DIR, tome=DIR or random=DIR, got {item!r}")
        finetuned[method] = load_pretrained(path, device=args.device)
    return dense, trained, finetuned


def _split_folder(args) -> str:
    if args.split:
        return os.path.join(args.data, args.split)
    for split in ("val", "test"):
        if os.path.isdir(os.path.join(args.data, split)):
            logger.info("evaluating the %r split of %s", split, args.data)
            return os.path.join(args.data, split)
    return args.data


def _check_classes(folder, model) -> None:
    classes = (getattr(model, "dynvit_meta", None) or {}).get("classes")
    if classes and list(classes) != list(folder.classes):
        raise DataError(f"the checkpoint's classes {classes[:5]}... differ from the folder's {folder.classes[:5]}...")
    if model.num_classes != len(folder.classes):
        raise DataError(f"the model has {model.num_classes} classes, the folder {len(folder.classes)}")


def load_data(args, model, limit: int, hold_out: int = 0):
    """The evaluation dataset (model's own preprocessing), the folder's class names and the
    ``hold_out`` images (class-balanced, ``None`` when 0) kept out of it for calibration."""
    folder = scan_image_folder(_split_folder(args), what="evaluation")
    _check_classes(folder, model)
    transform = build_transform(data_config(model), is_training=False)
    held = balanced_subset(folder.targets, hold_out, args.seed + 1) if hold_out else []
    if hold_out and len(held) >= len(folder):
        raise DataError(f"--calib-images {hold_out} leaves no image of {_split_folder(args)} to evaluate; hold out fewer "
                        "or calibrate on another split (--calib-split)")
    rest = sorted(set(range(len(folder))) - set(held))
    indices = [rest[i] for i in balanced_subset([folder.targets[i] for i in rest], limit, args.seed)]
    dataset = SeededImageDataset(folder, transform, indices=indices, seed=args.seed)
    calib = SeededImageDataset(folder, transform, indices=held, seed=args.seed) if held else None
    return dataset, folder.classes, calib


def calibration_images(args, model, held_out) -> torch.Tensor:
    """The images ``dynvit.calibrate`` sees: ``--calib-split`` of ``--data``, else the held-out ones."""
    if args.calib_split:
        folder = scan_image_folder(os.path.join(args.data, args.calib_split), what="calibration")
        _check_classes(folder, model)
        held_out = SeededImageDataset(folder, build_transform(data_config(model), is_training=False),
                                      indices=balanced_subset(folder.targets, args.calib_images, args.seed + 1))
    loader = DataLoader(held_out, batch_size=args.batch_size, num_workers=args.workers)
    return torch.cat([x for x, _ in progress(loader, desc="calibration images", unit="batch")]).to(args.device)


def make_loader(dataset, args):
    loader = DataLoader(dataset, batch_size=args.batch_size, num_workers=args.workers)
    c, h, w = dataset[0][0].shape
    if len(dataset) * c * h * w * 4 > _CACHE_BYTES:
        return loader
    batches = [(x.to(args.device), y.to(args.device))  # decoded once, used by every method
               for x, y in progress(loader, desc="decoding images", unit="batch")]
    logger.info("cached %d evaluation images in memory", len(dataset))
    return batches


# ---- the runs -----------------------------------------------------------------------------
def run(args) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.visualize:
        return visualize(args)
    dense, trained, finetuned = load_models(args)
    reference = trained if trained is not None else dense
    input_size = tuple(data_config(reference)["input_size"])
    mode = args.mode or ("threshold" if trained is not None else "topk")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    loader, images, calib = None, None, None
    if args.data and not args.flops_only:
        if trained is None and "dynvit" in methods:
            logger.warning("no trained predictors (dense checkpoint or --model): no dynvit row in an accuracy run")
            methods.remove("dynvit")
        calibrating = trained is not None and (args.budget or args.sweep) and mode != "topk"
        dataset, _, held_out = load_data(args, reference, args.limit,
                                         args.calib_images if calibrating and not args.calib_split else 0)
        loader = make_loader(dataset, args)
        calib = calibration_images(args, trained, held_out) if calibrating else None
        n = min(len(dataset), max(args.flops_images, args.speed_batch))
        images = torch.stack([dataset[i][0] for i in bench.spread_indices(len(dataset), n)]).to(args.device)
    elif mode == "threshold" and trained is not None:
        raise ConfigError("threshold mode keeps a different number of tokens per image: give --data.path, or use --mode "
                          "topk")
    flops_images = images[bench.spread_indices(len(images), args.flops_images)] if images is not None else None
    common = dict(input_size=input_size, dynvit_model=trained, finetuned=finetuned, methods=methods, mode=mode,
                  prune_loc=args.prune_loc, tome_r=args.tome_r, loader=loader, seed=args.seed)
    batch_sizes = () if args.flops_only or args.no_speed or args.sweep else (1, args.speed_batch)
    result = {"command": "python eval.py " + " ".join(shlex.quote(a) for a in args.argv),
              "machine": bench.machine_info(args.device), "input_size": list(input_size), "mode": mode}
    if args.sweep:
        result["sweep"] = []
        for r in args.sweep:
            rows = bench.compare(dense, keep_ratio=_ratio(r), images=flops_images, **{**common, "mode": "topk"})[0]
            if calib is not None:  # dynvit in calibrated threshold mode at the same budget, beside top-k
                rows.insert(2, _calibrated_row(trained, calib, _ratio(r), dense, flops_images, common))
            for row in rows:
                row["sweep_keep_ratio"] = r
                if row["method"] == "dynvit":
                    row["curve"] = "dynvit threshold (calibrated)" if row["mode"] == "threshold" else "dynvit top-k"
            result["sweep"].append({"keep_ratio": r, "rows": rows})
            print(f"\n### keep ratio {r}\n\n{bench.results_table(rows)}", flush=True)
        if args.plot:
            result["plot"] = save_accuracy_vs_gmacs(args.plot, [row for s in result["sweep"] for row in s["rows"]],
                                                    title=f"{_name(reference)}, {rows[0].get('images', 0)} images")
    else:
        if args.budget and calib is not None:
            thresholds = dynvit.calibrate(trained, calib, keep_ratio=_ratio(args.budget))
            result["calibration"] = {"budget": args.budget, "images": len(calib), "thresholds": thresholds.tolist(),
                                     "keep_ratio": list(trained.keep_ratio)}
        keep = _ratio(args.keep_ratio) if args.keep_ratio else None
        rows, _ = bench.compare(dense, keep_ratio=keep, images=flops_images, speed_images=images,
                                batch_sizes=batch_sizes, repeats=args.repeats, **common)
        result["rows"] = rows
        print(_header(result, reference) + "\n\n" + bench.results_table(rows), flush=True)
    if args.hist and trained is not None:
        kept = bench.evaluate(trained, loader, mode=None if mode == "none" else mode, device=args.device).kept_tokens
        result["hist"] = save_kept_histogram(args.hist, kept, trained.patch_embed.num_patches,
                                             title=f"{_name(trained)}, {mode} mode, {len(kept)} images")
        print(f"wrote {result['hist']}")
    result["json"] = bench.write_json(args.json, result)
    print(f"\nwrote {result['json']}")
    return result


def _calibrated_row(model, calib, keep_ratio, dense, flops_images, common) -> dict:
    """dynvit's row in threshold mode with thresholds calibrated to ``keep_ratio`` on ``calib``."""
    thresholds = dynvit.calibrate(model, calib, keep_ratio=keep_ratio)
    options = {**common, "methods": ("dense", "dynvit"), "mode": "threshold"}
    row = bench.compare(dense, images=flops_images, **options)[0][1]
    row.update(setting=f"threshold calibrated to {_fmt(model.keep_ratio)} on {len(calib)} images, {row['setting']}",
               thresholds=thresholds.tolist())
    return row


def _fmt(values) -> str:
    return "/".join(f"{v:.2f}" for v in values)


def _ratio(values):
    if values is None:
        return None
    if isinstance(values, (int, float)):
        return float(values)
    return values[0] if len(values) == 1 else tuple(values)


def _name(model) -> str:
    return (getattr(model, "dynvit_meta", None) or {}).get("model_name", type(model).__name__)


def _header(result: dict, model) -> str:
    m = result["machine"]
    where = m.get("gpu") or m["processor"]
    text = (f"## {_name(model)} at {result['input_size'][1]}x{result['input_size'][2]}, dynvit {result['mode']} mode\n\n"
            f"Device {m['device']} ({where}), {m['threads']} threads, torch {m['torch']}, timm {m['timm']}")
    if dynvit.is_patched(model) and result["mode"] == "threshold":
        cal = result.get("calibration")
        how = f"calibrated to {_fmt(cal['keep_ratio'])} on {cal['images']} held-out images" if cal else "as saved"
        text += f"\n\nThreshold-mode logit thresholds per stage ({how}): {_fmt(model.keep_threshold.tolist())}"
    speed = result["rows"][0].get("speed", {})
    other = [f"{100 * s['other_cpu_share']:.0f}% at batch {bs}" for bs, s in speed.items() if s["other_cpu_share"] is not None]
    return text + (f"; CPU taken by other processes while timing: {', '.join(other)}" if other else "")


def visualize(args) -> dict:
    """Only the keep-mask grid of ``args.visualize`` images (class-balanced) of a dynvit checkpoint."""
    model = load_pretrained(args.checkpoint, device=args.device) if args.checkpoint else None
    if model is None or not dynvit.is_patched(model):
        raise ConfigError("--visualize needs the --checkpoint of a trained dynvit model")
    dataset, classes, _ = load_data(args, model, args.visualize)
    images = torch.stack([dataset[i][0] for i in range(len(dataset))]).to(args.device)
    labels = [target for _, target in dataset.samples]
    path = save_keep_mask_grid(args.out, model, images, labels=labels, class_names=classes, mode=args.mode or "threshold")
    print(f"wrote {path}")
    return {"png": path}


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parse_args(argv, parser)
    args.argv = argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in ("dynvit.baselines", "dynvit.patch"):  # one line per model patched (ToMe's r search patches many)
        logging.getLogger(name).setLevel(logging.WARNING)
    if args.no_progress:
        disable_progress_bars()
    with user_errors(parser), logging_redirect_tqdm():  # log lines above the bars, not through them
        return run(args)


if __name__ == "__main__":
    main(sys.argv[1:])
