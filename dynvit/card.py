"""The model card (``README.md``) of a saved model, built from its ``config.json`` and, when
there is one, the evaluation JSON: what the model is, what it scores in each pruning mode at
what cost, how to load it, and the config it was trained with.

The evaluation JSON is ``eval.py --json``'s output or the one ``train.py`` writes next to its
final model; both hold ``rows`` of :func:`dynvit.benchmark.compare`'s shape (``method``,
``setting``, ``top1``, ``top5``, ``gmacs``, ``kept_tokens``, ...).
"""
from __future__ import annotations

import json

import yaml

__all__ = ["model_card"]

_PAPER = "DynamicViT: Efficient Vision Transformers with Dynamic Token Sparsification (Rao et al., NeurIPS 2021)"


def _front_matter(config: dict, pruned: bool) -> str:
    tags = ["image-classification", "timm", "dynvit"] + (["token-pruning"] if pruned else [])
    meta = {"tags": tags, "library_name": "timm", "pipeline_tag": "image-classification"}
    license_ = (config.get("pretrained_cfg") or {}).get("license")
    if license_:
        meta["license"] = license_
    return "---\n" + yaml.safe_dump(meta, sort_keys=False) + "---\n"


def _summary(config: dict) -> str:
    args = config.get("model_args") or {}
    size = args.get("img_size")
    size = f"{size[0]}x{size[1]}" if isinstance(size, (list, tuple)) else f"{size}x{size}" if size else "its default size"
    classes = config.get("label_names") or []
    what = f"`{config['architecture']}` (timm) at {size}, {config.get('num_classes')} classes"
    if classes:
        what += f" ({', '.join(map(str, classes[:10]))}{', ...' if len(classes) > 10 else ''})"
    pruning = (config.get("dynvit") or {}).get("pruning")
    if not pruning:
        return f"A dense {what}, saved by dynvit."
    keep = "/".join(f"{r:.2f}" for r in pruning["keep_ratio"])
    dropped = {"merge": "merged into the kept tokens most like them"}.get(pruning.get("dropped_tokens"), "discarded")
    return (f"A token-pruning {what}: learned predictors before blocks {', '.join(map(str, pruning['prune_loc']))} keep "
            f"{keep} of the patch tokens (cumulative), dropped tokens are {dropped}, and the kept ones run through "
            f"timm's own blocks. Fine-tuned with dynvit, after {_PAPER}. `model(x)` returns logits; the default "
            f"`prune_mode` is `{pruning.get('prune_mode', 'threshold')}`.")


def _kept(row: dict) -> str:
    return " / ".join(f"{k['mean']:.1f} [{k['p5']:.0f}-{k['p95']:.0f}]" for k in row.get("kept_tokens") or [])


def _evaluation(evaluation: dict) -> str:
    rows = evaluation.get("rows") or []
    if not rows:
        return ""
    lines = ["| method | setting | top-1 | top-5 | GMACs | kept patch tokens per stage, mean [p5-p95] |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        top = [f"{r[k]:.2f}" if k in r else "" for k in ("top1", "top5")]
        gmacs = f"{r['gmacs']:.4g}" if "gmacs" in r else ""
        lines.append(f"| {r.get('method', '')} | {r.get('setting', '')} | {top[0]} | {top[1]} | {gmacs} | {_kept(r)} |")
    where = [f"{evaluation['images']} images" if evaluation.get("images") else "",
             f"of `{evaluation['data']}`" if evaluation.get("data") else ""]
    source = " ".join(w for w in where if w)
    text = "\n## Evaluation\n\n" + (f"On {source}" if source else "Measured")
    if evaluation.get("command"):
        text += f", by `{evaluation['command']}`"
    return text + ":\n\n" + "\n".join(lines) + "\n"


def _usage(config: dict, source: str) -> str:
    pruned = bool((config.get("dynvit") or {}).get("pruning"))
    text = ("\n## How to load\n\n```python\nimport dynvit\n\n"
            f"model = dynvit.load_pretrained(\"{source}\")  # in eval mode")
    if pruned:
        text += ("\nmodel.prune_mode = \"topk\"  # fixed token counts (batching, export); \"threshold\" (default) lets each "
                 "image keep its own count\ndynvit.calibrate(model, images, keep_ratio=0.5)  # another budget for threshold "
                 "mode")
    text += ("\n```\n\ntimm alone reads the same folder: "
             + ("the dense backbone (predictors left out) " if pruned else "the model ")
             + f"with `timm.create_model(\"{source}\", pretrained=True)`; the preprocessing is "
             "`timm.data.resolve_model_data_config(model)`.\n")
    return text


def _config(config: dict, training_config: dict | None) -> str:
    if training_config:
        return ("\n## Config\n\nThe resolved training config (`training_config.yaml`; `python train.py --config "
                "training_config.yaml` runs it again):\n\n"
                "```yaml\n" + yaml.safe_dump(training_config, sort_keys=False) + "```\n")
    shown = {k: config[k] for k in ("architecture", "model_args", "dynvit") if k in config}
    return "\n## Config\n\n```json\n" + json.dumps(shown, indent=2) + "\n```\n"


def model_card(config: dict, *, evaluation: dict | None = None, training_config: dict | None = None,
               source: str = "local-dir:path/to/this/folder") -> str:
    """The ``README.md`` text of a saved model.

    Args:
        config: the model's ``config.json`` (timm's keys and the ``dynvit`` block).
        evaluation: the evaluation JSON (``rows``, optionally ``images``, ``data``, ``command``).
        training_config: the resolved training config (a dict), shown in full.
        source: how the model is named when loaded: ``hf-hub:org/name`` or ``local-dir:DIR``.
    """
    pruned = bool((config.get("dynvit") or {}).get("pruning"))
    name = source.split(":", 1)[-1].split("@")[0] if source.startswith("hf-hub:") else config["architecture"]
    name += " (dynvit)" if pruned and not source.startswith("hf-hub:") else ""
    text = _front_matter(config, pruned) + f"# Model card for {name}\n\n" + _summary(config) + "\n"
    if evaluation:
        text += _evaluation(evaluation)
    return text + _usage(config, source) + _config(config, training_config)
