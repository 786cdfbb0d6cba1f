"""What ``train.py`` tells a person: a compact line every ``log_every`` steps, validation as a
short table, and the evaluation rows its model card is built from."""
from __future__ import annotations

import math

__all__ = ["duration", "step_line", "validation_table", "evaluation_rows"]


def duration(seconds: float) -> str:
    """``1:02:03`` or ``2:03``."""
    if not math.isfinite(seconds):
        return "?"
    minutes, s = divmod(int(round(seconds)), 60)
    h, m = divmod(minutes, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def step_line(record: dict, *, step: int, total_steps: int, epoch: int, images_per_s: float, eta_s: float) -> str:
    """``step 40/390 (epoch 0) loss 2.3145 lr 1.0e-03 (backbone 1.0e-04) 512 img/s kept 0.70/0.49
    tau 1.00 noise 0.83 eta 3:12`` from a metrics record of ``train.py``."""
    predictors = [v for k, v in record.items() if k.startswith("lr/predictors")]
    backbone = [v for k, v in record.items() if k.startswith("lr/backbone")]
    text = f"step {step}/{total_steps} (epoch {epoch}) loss {record['train/total']:.4f} lr {max(predictors or backbone):.1e}"
    if predictors and backbone and max(backbone) != max(predictors):
        text += f" (backbone {max(backbone):.1e})"
    text += f" {images_per_s:.0f} img/s"
    kept = [record[k] for k in sorted(k for k in record if k.startswith("train/kept_frac_stage"))]
    if kept:
        text += " kept " + "/".join(f"{v:.2f}" for v in kept)
        text += f" tau {record['train/tau']:.2f} noise {record['train/noise_scale']:.2f}"
    return text + f" eta {duration(eta_s)}"


def _modes(metrics: dict, prefix: str = "") -> list[str]:
    return [k[len(prefix) + len("top1_"):] for k in metrics if k.startswith(f"{prefix}top1_")]


def _kept(metrics: dict, name: str) -> str:
    stages, s = [], 0
    while f"{name}_stage{s}" in metrics:
        key = f"{name}_stage{s}"
        stages.append(f"{metrics[key]:.1f} [{metrics[key + '_p5']:.0f}-{metrics[key + '_p95']:.0f}]")
        s += 1
    return " / ".join(stages)


def validation_table(metrics: dict, title: str) -> str:
    """The validation metrics of ``train.py`` as a few aligned lines, one per pruning mode (and EMA)."""
    lines = [title, f"  {'mode':<16}{'top-1':>7}{'top-5':>8}{'GMACs':>9}   kept patch tokens per stage, mean [p5-p95]"]
    for prefix in ("", "ema_"):
        for mode in _modes(metrics, prefix):
            gmacs = metrics.get(f"gmacs_{mode}") if not prefix else None
            lines.append(f"  {prefix.replace('_', ' ') + mode:<16}{metrics[f'{prefix}top1_{mode}']:>7.2f}"
                         f"{metrics[f'{prefix}top5_{mode}']:>8.2f}{'' if gmacs is None else f'{gmacs:.4f}':>9}   "
                         f"{_kept(metrics, f'{prefix}kept_tokens_{mode}')}")
    return "\n".join(lines)


def evaluation_rows(metrics: dict, *, method: str, settings: dict[str, str] | None = None) -> list[dict]:
    """``train.py``'s last validation as rows of :func:`dynvit.benchmark.compare`'s shape (the
    evaluation JSON a model card is built from): one per pruning mode."""
    rows = []
    for mode in _modes(metrics):
        row = {"method": f"{method}, dense path" if mode == "none" and method == "dynvit" else method, "mode": mode,
               "setting": (settings or {}).get(mode, mode), "top1": metrics[f"top1_{mode}"],
               "top5": metrics[f"top5_{mode}"]}
        if f"gmacs_{mode}" in metrics:
            row["gmacs"] = metrics[f"gmacs_{mode}"]
        kept, s = [], 0
        while f"kept_tokens_{mode}_stage{s}" in metrics:
            key = f"kept_tokens_{mode}_stage{s}"
            kept.append({"mean": metrics[key], "p5": metrics[f"{key}_p5"], "p95": metrics[f"{key}_p95"]})
            s += 1
        if kept:
            row["kept_tokens"] = kept
        rows.append(row)
    return rows
