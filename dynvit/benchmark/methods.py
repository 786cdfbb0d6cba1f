"""``python -m dynvit.benchmark methods``: token-reduction methods side by side on DeiT-S at 224
(docs/BENCHMARKS.md, section 2).

    python -m dynvit.benchmark methods [--model deit_small_patch16_224] [--keep-ratio 0.7] [--batch 64] [--repeats 15]

All models are built from one randomly initialised dense model (speed does not depend on the
weights) and timed in one process, repeats interleaved across models, warm-up discarded,
median reported: dense, dynvit in top-k and in threshold mode (with DynamicViT's predictors, as
wide as the tokens, and with predictors ``--narrow`` as wide, the CIFAR-10 preset's quarter by
default), top-k with the whole of the CIFAR-10 preset's recipe (narrow predictors, the match
prior, dropped tokens merged), EViT and random dropping at the same stages and kept fractions,
ToMe with ``r`` matched to dynvit's top-k GMACs. Untrained predictors get thresholds from
dynvit.calibrate so that threshold mode keeps the target fraction on the timed images.

``dynvit topk, free score`` is top-k with each predictor replaced by a score that costs nothing:
what dynvit's pruned path costs besides its predictors. Two more rows say what this machine
allows. ``ceiling`` runs timm's own blocks at top-k's kept token counts and does nothing else
(it keeps the first tokens: a slice, no scoring, no gather): a pruning method runs the same
blocks and adds work of its own, so the ceiling's share of its GMACs limit is about the most a
method can reach of its own. ``1 token`` runs the dense model's blocks on one patch token: its
time is the part of a forward pass that does not shrink with the tokens (the weights read from
memory, the per-operation overhead), printed below the table as a share of the dense time.
"""
from __future__ import annotations

import argparse

import timm
import torch
from torch import nn

from ..baselines.common import embed
from ..calibrate import calibrate
from ..flops import count_flops
from ..tokens import num_kept
from .cli import Run, add_timing_options
from .compare import default_prune_loc, make_method, match_tome_r
from .report import markdown_table
from .speed import measure_speed, paired_speedup

__all__ = ["KeptTokens", "FreeScore", "main"]

HEADER = ["method", "setting", "GMACs", "speed-up limit (dense / GMACs)"]


class KeptTokens(nn.Module):
    """A dense timm ViT that keeps its first ``kept[i]`` patch tokens from block ``i`` on: timm's
    blocks at given token counts with no scoring and no gather (a slice), for timing only.

    Args:
        dense: the timm model (shared, not copied).
        kept: block index -> patch tokens kept from that block on.
    """

    def __init__(self, dense: nn.Module, kept: dict[int, int]):
        super().__init__()
        self.dense, self.kept = dense, kept

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = embed(self.dense, x)
        p = self.dense.num_prefix_tokens
        for i, block in enumerate(self.dense.blocks):
            if i in self.kept:
                x = x[:, : p + self.kept[i]]
            x = block(x)
        return self.dense.forward_head(self.dense.norm(x))


class FreeScore(nn.Module):
    """A keep score that costs nothing (each token's first channel), in place of a predictor: dynvit's
    pruned path without the predictors' work, for timing only."""

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return x[..., 0]


def build(args) -> tuple[dict, dict, torch.Tensor]:
    """The timed models, their settings and GMACs, and the images that fill the batches."""
    torch.manual_seed(args.seed)
    dense = timm.create_model(args.model, pretrained=False).eval()
    size = (3, *dense.patch_embed.img_size)
    images = torch.randn(args.batch, *size, generator=torch.Generator().manual_seed(args.seed))
    loc = default_prune_loc(len(dense.blocks))
    kw = dict(prune_loc=loc, keep_ratio=args.keep_ratio)
    topk = make_method(dense, "dynvit", prune_mode="topk", **kw)
    threshold = make_method(dense, "dynvit", prune_mode="threshold", **kw)
    narrow = make_method(dense, "dynvit", prune_mode="topk", predictor_hidden_ratio=args.narrow, **kw)
    narrow_threshold = make_method(dense, "dynvit", prune_mode="threshold", predictor_hidden_ratio=args.narrow, **kw)
    for m in (threshold, narrow_threshold):
        calibrate(m, images)  # thresholds that keep the target fraction of these images
    preset = make_method(dense, "dynvit", prune_mode="topk", predictor_hidden_ratio=args.narrow,
                         predictor_prior="match", dropped_tokens="merge", **kw)
    free = make_method(dense, "dynvit", prune_mode="topk", **kw)
    free.predictors = nn.ModuleList(FreeScore() for _ in free.predictors)
    models = {"dense": dense, "dynvit topk": topk, "dynvit threshold": threshold,
              f"dynvit topk, predictors x{args.narrow:g}": narrow,
              f"dynvit threshold, predictors x{args.narrow:g}": narrow_threshold,
              f"dynvit topk, predictors x{args.narrow:g} + match prior + merge": preset, "dynvit topk, free score": free,
              "evit": make_method(dense, "evit", **kw), "random": make_method(dense, "random", **kw)}

    def gmacs_of(m: nn.Module) -> float:  # threshold mode: the mean over real images
        if getattr(m, "prune_mode", None) == "threshold":
            return count_flops(m, size, images=images[: args.flops_images])
        return count_flops(m, size)

    info = {name: {"gmacs": gmacs_of(m)} for name, m in models.items()}
    r, gmacs = match_tome_r(dense, info["dynvit topk"]["gmacs"], size)
    models["tome"], info["tome"] = make_method(dense, "tome", tome_r=r), {"gmacs": gmacs, "tome_r": r}
    n0 = dense.patch_embed.num_patches
    models["ceiling"] = KeptTokens(dense, {i: num_kept(f, n0) for i, f in zip(loc, topk.keep_ratio)})
    models["1 token"] = KeptTokens(dense, {0: 1})
    for name in ("ceiling", "1 token"):
        info[name] = {"gmacs": gmacs_of(models[name])}
    ratios = "/".join(f"{v:.2f}" for v in topk.keep_ratio)
    for name in models:
        info[name]["setting"] = {"dense": "-", "tome": f"r={r}", "1 token": "blocks on 1 patch token",
                                 "ceiling": "timm's blocks at top-k's counts, nothing else"}.get(
            name, f"keep {ratios} @ blocks {','.join(map(str, loc))}")
    return models, info, images


def main(argv: list[str], extra: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m dynvit.benchmark methods", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="deit_small_patch16_224")
    p.add_argument("--keep-ratio", type=float, default=0.7)
    p.add_argument("--batch", type=int, default=64, help="the large batch (batch 1 is always timed)")
    p.add_argument("--narrow", type=float, default=0.25,
                   help="predictor width (x the embedding width) of the narrow-predictor rows; the others are 1.0 wide")
    p.add_argument("--flops-images", type=int, default=16, help="images averaged for threshold-mode GMACs")
    p.add_argument("--seed", type=int, default=0)
    add_timing_options(p, json="out/methods.json", repeats=15, min_seconds=0.5)
    args = p.parse_args(argv)
    run = Run("methods", args, argv)
    models, info, images = build(args)
    speed = measure_speed(models, images, (1, args.batch), repeats=args.repeats, min_seconds=args.min_seconds)
    dense_gmacs = info["dense"]["gmacs"]
    header = HEADER + [h for bs in (1, args.batch) for h in (f"img/s b{bs}", f"speed-up b{bs}", f"speed-up / limit b{bs}")]
    lines = []
    for name, m in models.items():
        limit = dense_gmacs / info[name]["gmacs"]
        line = [name, info[name]["setting"], f"{info[name]['gmacs']:.2f}", f"{limit:.2f}x"]
        for bs in (1, args.batch):
            ips = speed[name][bs]["images_per_s"]
            up = paired_speedup(speed[name][bs]["repeats"], speed["dense"][bs]["repeats"])
            info[name][f"b{bs}"] = {**speed[name][bs], "speedup": up, "speedup_over_limit": up / limit}
            line += [f"{ips:.1f}", f"{up:.2f}x", "-" if name == "1 token" else f"{up / limit:.2f}"]
        lines.append(line)
    fixed = {bs: speed["dense"][bs]["images_per_s"] / speed["1 token"][bs]["images_per_s"] for bs in (1, args.batch)}
    info["token_independent_share"] = fixed
    other = max(speed["dense"][bs]["other_cpu_share"] or 0 for bs in (1, args.batch))
    run.report(f"<!-- {run.command} -->\n{args.model}; {args.repeats} rounds of repeats of at least {args.min_seconds:g} s, "
               f"img/s their median, speed-ups the median of the ratios within a round.\n{run.load_line(other)}\n")
    run.report(markdown_table(header, lines))
    run.report(f"\nThe part of a dense forward that does not shrink with the tokens (`1 token` / dense time): "
               f"{100 * fixed[1]:.0f}% at batch 1, {100 * fixed[args.batch]:.0f}% at batch {args.batch}.")
    run.write({"model": args.model, "rows": info})
    return info
