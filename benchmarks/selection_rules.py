"""Which tokens to keep, with everything else fixed: one model, one budget, different rules.

    python benchmarks/selection_rules.py --checkpoint runs/bench_cifar10/dynvit/final
    python benchmarks/selection_rules.py --checkpoint ../shared/checkpoints/cifar10_vit_dense --prune-loc 2,4

Every rule replaces the model's predictors by a function of the same tokens and keeps the same
number of tokens per stage (top-k at the model's keep ratio), so the backbone, the merging of
dropped tokens and the GMACs stay as they are and only the choice of tokens differs:

- ``learned``: the model's own predictors (a fine-tuned dynvit checkpoint only);
- ``learned_mlp``: their MLP alone, without the match prior (checkpoints trained with it);
- ``inverted``: the opposite of ``learned`` (keeps what it would drop);
- ``random``: a uniform random choice (seeded);
- ``similarity``: :func:`dynvit.predictor.match_prior`, ToMe's bipartite criterion (every other
  token kept, the rest ranked by how little they repeat a kept one).

A dense checkpoint is patched first (``--prune-loc``, ``--keep-ratio``, ``--dropped-tokens``);
it has no learned rules. Top-1 is over the test split (all of it by default).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import dynvit  # noqa: E402
from dynvit import benchmark as bench  # noqa: E402
from dynvit.data import SeededImageDataset, balanced_subset, build_transform, scan_image_folder  # noqa: E402
from dynvit.hub import load_pretrained  # noqa: E402
from dynvit.patch import is_patched  # noqa: E402
from dynvit.predictor import match_prior  # noqa: E402


class Rule(nn.Module):
    """Keep logits ``fn(tokens, mask)`` in place of a stage's predictor."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.fn(x, mask)


def rules(model: nn.Module, trained: bool, seed: int) -> dict:
    """name -> one keep-logit function per stage."""
    learned = list(model.predictors)
    gen = torch.Generator().manual_seed(seed)
    out = {
        "random": [lambda x, m: torch.rand(x.shape[:2], generator=gen).to(x.device)] * len(learned),
        "similarity": [lambda x, m: match_prior(x, m, 1.0)] * len(learned),
    }
    if trained:
        out["learned"] = [p.forward for p in learned]
        out["inverted"] = [lambda x, m, p=p: -p(x, m) for p in learned]
        if getattr(model, "predictor_prior", "none") == "match":
            out["learned_mlp"] = [lambda x, m, p=p: p(x, m) - p.match_prior(x, m) for p in learned]
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="a save_pretrained directory (pruning or dense)")
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "cifar10"))
    p.add_argument("--split", default="test")
    p.add_argument("--images", type=int, default=0, help="class-balanced test images (0 = all)")
    p.add_argument("--prune-loc", default="2,4", help="for a dense checkpoint: the stages")
    p.add_argument("--keep-ratio", type=float, default=0.55, help="for a dense checkpoint: r (cumulative r, r**2, ...)")
    p.add_argument("--dropped-tokens", default="merge", help="for a dense checkpoint: discard or merge")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    model = load_pretrained(args.checkpoint).eval()
    trained = is_patched(model)
    if not trained:
        model = dynvit.patch(model, prune_loc=[int(a) for a in args.prune_loc.split(",")], keep_ratio=args.keep_ratio,
                             dropped_tokens=args.dropped_tokens).eval()
    model.prune_mode = "topk"
    folder = scan_image_folder(Path(args.data) / args.split, what=args.split)
    indices = balanced_subset(folder.targets, args.images, seed=0) if args.images else None
    data = SeededImageDataset(folder, build_transform(dict(model.pretrained_cfg), is_training=False), indices=indices)
    loader = [(x, y) for x, y in torch.utils.data.DataLoader(data, batch_size=500, num_workers=1)]
    predictors = model.predictors
    rows = []
    for name, fns in rules(model, trained, args.seed).items():
        model.predictors = nn.ModuleList(Rule(fn) for fn in fns)
        result = bench.evaluate(model, loader)
        rows.append([name, f"{result.top1:.2f}", " / ".join(f"{result.tokens_per_block[b]:.0f}" for b in model.prune_loc)])
        print(f"{name}: top-1 {result.top1:.2f}", flush=True)
    model.predictors = predictors
    print(f"\n{args.checkpoint} ({'fine-tuned' if trained else 'dense, patched'}; prune_loc {list(model.prune_loc)}, "
          f"keep {[round(r, 3) for r in model.keep_ratio]}, {model.dropped_tokens}), {len(data)} {args.split} images, top-k:\n")
    print(bench.markdown_table(["rule", "top-1", "tokens at the stages"], rows))


if __name__ == "__main__":
    main()
