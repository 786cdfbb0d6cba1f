"""Which timm ViTs dynvit patches: every ``vit_*``, ``deit*`` and ``eva*`` model, built small.

    python benchmarks/timm_sweep.py [--json out/timm_sweep.json] [--filter rope] [--verbose]

Each model is built with ``pretrained=False``, ``embed_dim=64, depth=4, num_heads=2`` (a wider
``embed_dim`` where 64 does not build, noted) and a small image (4x4 patches, or 2x2 for the
stride-32 hybrid stems), patched with predictors before blocks 1 and 3 at keep ratio 1.0, and
checked against its dense self on two random images within 1e-5: the pruned path in top-k mode
(discarding and merging) and the masked training path with every token kept. Models are
counted as patched with parity, refused by ``dynvit.patch`` (grouped by its message), failing
parity, or skipped (the small configuration does not build; the error is shown).
A few minutes on 2 CPU cores.
"""
from __future__ import annotations

import argparse
import collections
import copy
import json
import re
import sys
import time
import warnings
from pathlib import Path

import timm
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import dynvit  # noqa: E402

PATTERNS = ("vit_*", "deit*", "eva*")
SMALL = dict(embed_dim=64, depth=4, num_heads=2, num_classes=5)
WIDER = (96, 128)  # embed_dim tried when 64 does not build (e.g. SwiGLU widths that must be even)
# Per-model fixes, each with its reason.
FIXES = {
    # Sapiens2 gives one key/value head count per block of its full depth; keep its pattern
    # (full attention in the first and last blocks, grouped-query in between) at depth 4.
    "sapiens2": dict(num_kv_heads=(2, 1, 1, 2)),
    # MobileCLIP's MCi stem has no projection: its 768 feature channels are the token width.
    "vit_base_mci": dict(embed_dim=768, num_heads=12),
}
ATOL = 1e-5


def build(name: str) -> tuple[torch.nn.Module, dict, int]:
    """The model, the kwargs it was built with and its image size; raises what timm raises."""
    fixes = next((v for k, v in FIXES.items() if k in name), {})
    error = None
    for dim in (SMALL["embed_dim"], *WIDER):
        kwargs = {**SMALL, "embed_dim": dim, **fixes}
        if dim != SMALL["embed_dim"] and "embed_dim" in fixes:
            break
        try:
            model = timm.create_model(name, pretrained=False, img_size=64, **kwargs)
        except Exception as e:  # timm asserts on incompatible sizes
            error = error or e
            continue
        pe = model.patch_embed
        stride = pe.patch_size[0] * getattr(pe, "feature_ratio", (1, 1))[0]
        size = 64 if 64 % stride == 0 and 64 // stride >= 2 else 4 * stride
        if size != 64:
            model = timm.create_model(name, pretrained=False, img_size=size, **kwargs)
        return model.eval(), kwargs, size
    raise error


def parity(dense: torch.nn.Module, size: int) -> float:
    """Largest logit difference between ``dense`` and its patched copy at keep ratio 1.0."""
    model = dynvit.patch(copy.deepcopy(dense), prune_loc=(1, 3), keep_ratio=1.0).eval()
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    worst = 0.0
    with torch.no_grad():
        expected = dense(x)
        ones = [torch.ones(2, model.patch_embed.num_patches)] * 2
        for dropped in ("discard", "merge"):
            model.dropped_tokens = dropped
            for out in (model.forward_pruned(x, "topk").logits, model.forward_train(x, masks=ones).logits):
                worst = max(worst, (out - expected).abs().max().item())
    return worst


def reason(e: BaseException) -> str:
    """The refusal message with the parts that name one model made generic."""
    text = re.sub(r"blocks\[\d+\]", "blocks[i]", str(e).split("\n")[0])
    return f"{type(e).__name__}: {text}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", help="write every model's outcome here")
    p.add_argument("--filter", default="", help="only names containing this")
    p.add_argument("--verbose", action="store_true", help="one line per model")
    args = p.parse_args()
    torch.set_num_threads(1)  # tiny models: a second thread only adds overhead on a shared machine
    warnings.filterwarnings("ignore")
    names = sorted({n for pattern in PATTERNS for n in timm.list_models(pattern) if args.filter in n})
    rows, start = [], time.time()
    for name in names:
        row = {"model": name}
        try:
            dense, kwargs, size = build(name)
        except Exception as e:
            row.update(outcome="skipped", reason=reason(e))
        else:
            row.update(timm_class=type(dense).__name__, image_size=size,
                       built_with={k: v for k, v in kwargs.items() if SMALL.get(k) != v})
            try:
                diff = parity(dense, size)
            except NotImplementedError as e:
                row.update(outcome="refused", reason=reason(e))
            except Exception as e:  # a bug: report it, do not stop the sweep
                row.update(outcome="error", reason=reason(e))
            else:
                row.update(outcome="parity" if diff <= ATOL else "parity failed", max_abs_diff=diff)
        rows.append(row)
        if args.verbose:
            print(f"{name:48s} {row['outcome']:8s} {row.get('max_abs_diff', row.get('reason', ''))}", flush=True)

    counts = collections.Counter(r["outcome"] for r in rows)
    print(f"\n{len(rows)} models ({', '.join(PATTERNS)}) in timm {timm.__version__}, {time.time() - start:.0f} s")
    for outcome in ("parity", "refused", "parity failed", "error", "skipped"):
        group = [r for r in rows if r["outcome"] == outcome]
        if not group:
            continue
        print(f"\n{outcome}: {len(group)}")
        if outcome == "parity":
            by_class = collections.Counter(r["timm_class"] for r in group)
            print("  by timm class: " + ", ".join(f"{c} {n}" for c, n in by_class.most_common()))
            print(f"  largest |patched - timm| logit difference: {max(r['max_abs_diff'] for r in group):.2e} (limit {ATOL:g})")
            wider = [f"{r['model']} ({r['built_with']})" for r in group if r["built_with"]]
            if wider:
                print("  built with other settings: " + "; ".join(wider))
            continue
        by_reason = collections.defaultdict(list)
        for r in group:
            by_reason[r.get("reason", f"max abs diff {r.get('max_abs_diff', 0):.2e}")].append(r["model"])
        for why, models in sorted(by_reason.items(), key=lambda kv: -len(kv[1])):
            print(f"  {len(models):3d}  {why}\n       {', '.join(models)}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(rows, indent=1))
        print(f"\nwrote {args.json}")
    print("\nsummary: " + ", ".join(f"{k} {v}" for k, v in counts.most_common()))


if __name__ == "__main__":
    main()
