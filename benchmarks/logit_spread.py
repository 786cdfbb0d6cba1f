"""How decisive a trained model's keep logits are: their spread around each stage's threshold.

    python benchmarks/logit_spread.py --checkpoint runs/bench_cifar10/dynvit/final [--data ../shared/data/cifar10/test]

Runs threshold mode on ``--images`` images spread over the classes and prints, per stage, the
share of the keep logits (of the tokens that reached the stage) within 0.01, 0.1 and 1 of the
stage's threshold, the fraction kept and the 5/25/50/75/95th percentiles of ``logit -
threshold``. Logits piled up at the threshold mean that the decision at that threshold is sharp
but that a calibrated threshold elsewhere ranks tokens by small differences.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import dynvit  # noqa: E402
from dynvit.benchmark import spread_indices  # noqa: E402
from dynvit.data import SeededImageDataset, build_transform, scan_image_folder  # noqa: E402


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="a trained dynvit save_pretrained directory")
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "cifar10" / "test"), help="an ImageFolder split")
    p.add_argument("--images", type=int, default=1000)
    args = p.parse_args(argv)

    model = dynvit.load_pretrained(args.checkpoint).eval()
    folder = scan_image_folder(Path(args.data), what="evaluation")
    dataset = SeededImageDataset(folder, build_transform(dict(model.pretrained_cfg), is_training=False))
    images = torch.stack([dataset[i][0] for i in spread_indices(len(dataset), args.images)])
    with torch.inference_mode():
        out = torch.cat([torch.stack(model.forward_pruned(b, "threshold").keep_logits, 1) for b in images.split(250)])
    rows = []
    for s in range(out.shape[1]):
        logits = out[:, s]
        margin = logits[torch.isfinite(logits)] - model.keep_threshold[s]
        q = margin.quantile(torch.tensor([0.05, 0.25, 0.5, 0.75, 0.95])).tolist()
        row = {"stage": s, "logits": margin.numel(), "kept": (margin > 0).float().mean().item(),
               **{f"within_{w}": (margin.abs() < w).float().mean().item() for w in (0.01, 0.1, 1.0)}, "quantiles": q}
        rows.append(row)
        print(f"stage {s}: {row['logits']} logits; within 0.01 / 0.1 / 1 of the threshold: "
              f"{row['within_0.01']:.3f} / {row['within_0.1']:.3f} / {row['within_1.0']:.3f}; kept {row['kept']:.3f}; "
              f"logit - threshold at 5/25/50/75/95%: {', '.join(f'{v:.3f}' for v in q)}")
    return rows


if __name__ == "__main__":
    main()
