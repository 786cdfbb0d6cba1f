"""Table 1 of docs/BENCHMARKS.md: GMACs of DeiT-Ti/S/B at 224, dense and pruned.

    python benchmarks/flops_table.py [--models deit_tiny_patch16_224,...] [--ratios 0.9,0.8,0.7] [--json out/flops_table.json]

No data and no weights: GMACs depend on shapes only (dynvit in top-k mode keeps
``round(r**s * N)`` tokens at stage ``s``). Every method uses the same stages (blocks 3, 6, 9)
and kept fractions; ToMe's ``r`` is chosen so its GMACs is closest to dynvit's. A few
minutes on a CPU (fvcore traces each model once per row; DeiT-B takes the longest).
"""
from __future__ import annotations

import argparse
import logging
import shlex
import sys
from pathlib import Path

import timm
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dynvit import benchmark as bench  # noqa: E402

# DynamicViT (Rao et al. 2021), Table 1 / README: GFLOPs at keep ratio 0.7.
PAPER = {("deit_small_patch16_224", 0.7): 2.9, ("deit_base_patch16_224", 0.7): 11.4,
         ("deit_small_patch16_224", 1.0): 4.6, ("deit_base_patch16_224", 1.0): 17.6, ("deit_tiny_patch16_224", 1.0): 1.3}
HEADER = ["model", "params (M)", "dense GMACs", "keep ratio", "patch tokens @ blocks 3,6,9", "dynvit GMACs", "dynvit / dense",
          "EViT GMACs", "random GMACs", "ToMe GMACs (r)", "DynamicViT paper, dense / pruned"]


def rows_for(name: str, ratios: list[float]) -> tuple[list[list[str]], list[dict]]:
    dense = timm.create_model(name, pretrained=False).eval()
    lines, records = [], []
    for r in ratios:
        rows, _ = bench.compare(dense, input_size=(3, 224, 224), prune_loc=(3, 6, 9), keep_ratio=r, mode="topk")
        by = {row["method"]: row for row in rows}
        d, dyn = by["dense"], by["dynvit"]
        tokens = "/".join(f"{dyn['tokens_per_block'][b]:.0f}" for b in (3, 6, 9))
        paper = " / ".join(str(PAPER[k]) for k in ((name, 1.0), (name, r)) if k in PAPER)
        lines.append([name.removesuffix("_patch16_224"), f"{d['params_m']:.1f} (+{dyn['params_m'] - d['params_m']:.2f})",
                      f"{d['gmacs']:.2f}", f"{r}", tokens, f"{dyn['gmacs']:.2f}", f"{dyn['gmacs_ratio']:.3f}",
                      f"{by['evit']['gmacs']:.2f}", f"{by['random']['gmacs']:.2f}",
                      f"{by['tome']['gmacs']:.2f} ({by['tome']['tome_r']})", paper])
        records.append({"model": name, "keep_ratio": r, "rows": rows})
    return lines, records


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="deit_tiny_patch16_224,deit_small_patch16_224,deit_base_patch16_224")
    p.add_argument("--ratios", default="0.9,0.8,0.7")
    p.add_argument("--json", default="out/flops_table.json")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("dynvit.benchmark").setLevel(logging.ERROR)  # "untrained predictors" is expected here
    torch.manual_seed(0)
    ratios = [float(v) for v in args.ratios.split(",")]
    lines, records = [], []
    for name in args.models.split(","):
        more, recs = rows_for(name, ratios)
        lines += more
        records += recs
        print(f"done {name}", file=sys.stderr, flush=True)
    command = "python benchmarks/flops_table.py " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    print(f"<!-- {command} -->\n{bench.markdown_table(HEADER, lines)}")
    bench.write_json(args.json, {"command": command, "machine": bench.machine_info(), "tables": records})


if __name__ == "__main__":
    main()
