"""Writers: Markdown tables and JSON files of benchmark results."""
from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence

__all__ = ["markdown_table", "results_table", "write_json", "write_text"]


def markdown_table(header: Sequence[str], body: Iterable[Sequence[object]]) -> str:
    """A Markdown table; numbers in ``body`` should already be strings."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in line) + " |" for line in body]
    return "\n".join(lines)


def results_table(rows: Sequence[dict], prune_loc: Sequence[int] | None = None) -> str:
    """The Markdown table of :func:`compare`'s rows; columns appear when the rows have them."""
    has_acc = any("top1" in r for r in rows)
    batch_sizes = sorted({int(bs) for r in rows for bs in r.get("speed", {})})
    loc = list(prune_loc) if prune_loc else next((r["prune_loc"] for r in rows if "prune_loc" in r), [])
    header = ["method", "setting"] + (["top-1", "top-5"] if has_acc else [])
    header += ["GMACs", "GMACs ratio", "speed-up limit", f"tokens @ blocks {','.join(map(str, loc))}", "params (M)"]
    spread = any(r.get("kept_tokens") for r in rows)
    if spread:
        header.append("kept per image, mean [p5-p95]")
    for bs in batch_sizes:
        header += [f"img/s b{bs}", f"speed-up b{bs}"]
    if batch_sizes:
        header.append(f"speed-up / limit b{batch_sizes[-1]}")
    body = []
    for r in rows:
        line = [r["method"], r.get("setting", "")]
        if has_acc:
            line += [f"{r['top1']:.2f}", f"{r['top5']:.2f}"] if "top1" in r else ["", ""]
        tokens = "/".join(f"{r['tokens_per_block'][b]:.1f}" for b in loc) if "tokens_per_block" in r else ""
        line += [f"{r['gmacs']:.4g}", f"{r['gmacs_ratio']:.3f}", f"{r['speedup_limit']:.2f}x", tokens, f"{r['params_m']:.2f}"]
        if spread:
            line.append(" / ".join(f"{k['mean']:.1f} [{k['p5']:.0f}-{k['p95']:.0f}]" for k in r.get("kept_tokens") or []))
        for bs in batch_sizes:
            s = r.get("speed", {}).get(str(bs))
            line += [f"{s['images_per_s']:.1f}", f"{s['speedup']:.2f}x"] if s else ["", ""]
        if batch_sizes:
            s = r.get("speed", {}).get(str(batch_sizes[-1]))
            line.append(f"{s['speedup_over_limit']:.2f}" if s else "")
        body.append(line)
    return markdown_table(header, body)


def write_text(path: str | os.PathLike, text: str) -> str:
    """Write ``text`` atomically (a temporary file renamed over the target), creating the folder;
    return the path. A run killed mid-write leaves the previous file whole."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)
    return path


def write_json(path: str | os.PathLike, obj) -> str:
    """Write ``obj`` as indented JSON, atomically (see :func:`write_text`); return the path."""
    return write_text(path, json.dumps(obj, indent=2, default=str))
