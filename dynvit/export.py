"""Ship a pruned model as ONNX, torch.export (``.pt2``) or safetensors, checked against PyTorch.

The exported graphs really run fewer tokens: kept tokens are gathered, as in
:meth:`~dynvit.DynViTMixin.forward_pruned`, and the blocks after a pruning stage see the
shorter sequence. Exports keep a dynamic batch size by default. Top-k keeps the same count
for every image; threshold mode computes each image's kept count inside the graph (a
data-dependent size), pads a batch to its largest count and masks the padding out of attention
and pooling, as :meth:`~dynvit.DynViTMixin.forward_pruned` does. ``batch_size=1`` exports a
graph for single images, which needs no padding: the fastest for threshold mode at batch 1.

ONNX goes through ``torch.onnx.export(..., dynamo=True)``, the torch.export-based exporter.
The legacy TorchScript exporter traces with concrete values: it freezes the threshold-mode
kept count of the example image into the graph, so every other image would silently run
with the wrong number of tokens. torch.export keeps that count symbolic. Its ONNX
translations start at opset 18 (:data:`MIN_OPSET`); timm's fused attention
(``scaled_dot_product_attention``) becomes MatMul + Softmax there and the ONNX ``Attention``
operator from opset 23 on.

Run ``python -m dynvit.export --help`` (or ``dynvit-export``) for the command line.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .patch import is_patched
from .ratios import check_prune_mode

__all__ = ["export_model", "verify_export", "ort_speed", "load_checkpoint", "load_images", "tile_images", "ExportError",
           "ParityError", "ExportResult", "SpeedResult", "FORMATS", "MIN_OPSET", "main"]

_log = logging.getLogger(__name__)
FORMATS = ("onnx", "pt2", "safetensors")
MIN_OPSET = 18  # torch's ONNX exporter translates from opset 18 on; below it only tries a lossy converter
ATOL = 1e-4
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


class ExportError(RuntimeError):
    """A model, format, mode or opset that cannot be exported; the message says which and why."""


class ParityError(ExportError):
    """The exported file does not reproduce the PyTorch model."""


@dataclass
class ExportResult:
    path: str  # the file (onnx, pt2) or directory (safetensors) written
    format: str
    mode: str  # prune mode the export runs: topk, threshold or none
    opset: int | None = None  # ONNX only
    max_abs_diff: float | None = None  # largest |exported - PyTorch| logit difference; None if not verified
    batch_size: int | None = None  # the batch size the graph takes; None: any (a dynamic batch dimension)
    batch_sizes: list[int] = field(default_factory=list)  # batch sizes checked
    kept_counts: list[list[int]] = field(default_factory=list)  # per checked image, patch tokens kept after each stage
    num_patches: int = 0  # patch tokens before the first stage


@dataclass
class SpeedResult:
    batch_size: int
    dense: float  # images/s, onnxruntime, prune mode "none"
    pruned: float  # images/s, onnxruntime, the pruned export

    @property
    def speedup(self) -> float:
        return self.pruned / self.dense


# ---- inputs and settings ------------------------------------------------------------------
def _input_shape(model: nn.Module) -> tuple[int, int, int]:
    pe = model.patch_embed
    return (model.in_chans, *pe.img_size)  # the image's channels (a hybrid stem's projection reads its CNN's)


def random_images(model: nn.Module, num: int = 4, seed: int = 0) -> torch.Tensor:
    """``num`` normalised-image-like inputs (standard normal) of the model's input size."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(num, *_input_shape(model), generator=g)


def load_images(directory: str | os.PathLike, model: nn.Module, num: int = 8) -> torch.Tensor:
    """Up to ``num`` images spread over the (sorted, recursive) files of ``directory``,
    preprocessed with the model's timm eval transform at its input size."""
    import timm.data
    from PIL import Image

    files = sorted(p for p in Path(directory).rglob("*") if p.suffix.lower() in _IMAGE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(_IMAGE_SUFFIXES)}) under {os.fspath(directory)!r}")
    files = files[:: max(1, len(files) // num)][:num]
    config = {**timm.data.resolve_model_data_config(model), "input_size": _input_shape(model)}
    transform = timm.data.create_transform(**config, is_training=False)
    return torch.stack([transform(Image.open(f).convert("RGB")) for f in files])


def tile_images(images: torch.Tensor, n: int) -> torch.Tensor:
    """``n`` images: ``images`` repeated as often as needed (a batch of any size from a few)."""
    return images.repeat(-(-n // len(images)), 1, 1, 1)[:n]


def _check_request(model: nn.Module, path: str, format: str, mode: str, keep_ratio, opset: int | None,
                   batch_size: int | None = None) -> None:
    if format not in FORMATS:
        raise ExportError(f"format {format!r} cannot be exported: choose one of {', '.join(FORMATS)}")
    if format == "safetensors" and path.endswith((".safetensors", ".json")):
        raise ExportError(f"safetensors export writes a directory (model.safetensors + config.json); got the file name {path!r}")
    check_prune_mode(mode)
    if not is_patched(model) and mode != "none":
        raise ExportError(f"mode {mode!r} needs a dynvit model with token predictors, got a plain {type(model).__name__}; "
                          "build it with dynvit.build_model or export mode 'none'")
    if keep_ratio is not None and mode != "topk":
        raise ExportError(f"keep_ratio applies to mode 'topk' only; mode {mode!r} "
                          + ("keeps each token whose keep probability is > 0.5" if mode == "threshold" else "keeps every token")
                          + ", so the ratio would be silently ignored")
    if opset is not None and format != "onnx":
        raise ExportError(f"opset applies to ONNX only, not to format {format!r}")
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise ExportError(f"batch_size must be a positive int (a graph for that batch size) or None (any batch size), "
                          f"got {batch_size!r}")
    if batch_size is not None and format == "safetensors":
        raise ExportError("batch_size applies to graph exports (onnx, pt2), not to safetensors weights")


@contextlib.contextmanager
def _export_settings(model: nn.Module, mode: str, keep_ratio):
    """Eval mode with ``mode`` (and ``keep_ratio``) for the duration; the model's own settings are restored."""
    was_training, device = model.training, next(model.parameters()).device
    saved = (model.prune_mode, model.keep_ratio) if is_patched(model) else None
    model.eval().cpu()  # onnxruntime and the checks run on the CPU
    try:
        if saved:
            model.prune_mode = mode
            if keep_ratio is not None:
                model.keep_ratio = keep_ratio  # validated and normalised by the setter
        yield
    finally:
        model.train(was_training).to(device)
        if saved:
            model.prune_mode, model.keep_ratio = saved


# ---- writers ------------------------------------------------------------------------------
def _dynamic_batch(batch_size: int | None):
    return None if batch_size else ({0: torch.export.Dim("batch", min=1, max=65536)},)


def _too_new_ops(model_proto, opset: int) -> list[str]:
    """Operators of ``model_proto`` that opset ``opset`` lacks or defines differently."""
    import onnx

    have = next(o.version for o in model_proto.opset_import if o.domain in ("", "ai.onnx"))
    problems = []
    for op in sorted({n.op_type for n in model_proto.graph.node if n.domain in ("", "ai.onnx")}):
        since = onnx.defs.get_schema(op, have).since_version
        try:
            old = onnx.defs.get_schema(op, opset).since_version
        except onnx.defs.SchemaError:
            old = None
        if old != since:
            problems.append(f"{op} (needs opset {since}" + (")" if old is None else f"; opset {opset} has an older form)"))
    return problems


def _export_onnx(model: nn.Module, path: str, example: torch.Tensor, batch_size: int | None, opset: int | None) -> int:
    import onnx

    if opset is not None and opset > onnx.defs.onnx_opset_version():
        raise ExportError(f"opset {opset} is newer than the installed onnx {onnx.__version__} knows "
                          f"(up to {onnx.defs.onnx_opset_version()})")
    target = max(opset, MIN_OPSET) if opset is not None else None
    program = torch.onnx.export(model, (example,), dynamo=True, opset_version=target, dynamic_shapes=_dynamic_batch(batch_size),
                                input_names=["images"], output_names=["logits"], verbose=False)
    written = next(o.version for o in program.model_proto.opset_import if o.domain in ("", "ai.onnx"))
    if opset is not None and opset < MIN_OPSET:
        ops = _too_new_ops(program.model_proto, opset)
        raise ExportError(f"opset {opset} is too old: the minimum is {MIN_OPSET} (torch's ONNX exporter translates from opset "
                          f"{MIN_OPSET} on){'; this model uses ' + ', '.join(ops) if ops else ''}. Export with opset {MIN_OPSET} or newer")
    if opset is not None and written != opset:
        raise ExportError(f"torch {torch.__version__}'s ONNX exporter could not convert this model to opset {opset} (its result "
                          f"is stamped opset {written}); export with a lower opset, at least {MIN_OPSET}")
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    program.save(path, external_data=params > 1.5 * 2**30)  # a protobuf file holds at most 2 GiB
    return written


def _export_pt2(model: nn.Module, path: str, example: torch.Tensor, batch_size: int | None) -> None:
    program = torch.export.export(model, (example,), dynamic_shapes=_dynamic_batch(batch_size), strict=False)
    torch.export.save(program, path)


def _export_safetensors(model: nn.Module, path: str) -> None:
    import timm.data

    from .hub import save_pretrained

    # Keep the class names of a loaded checkpoint, and record the input size the model really takes.
    data_config = {**timm.data.resolve_model_data_config(model), "input_size": _input_shape(model)}
    save_pretrained(model, path, classes=getattr(model, "dynvit_meta", {}).get("classes"), data_config=data_config)


def export_model(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    format: str = "onnx",
    mode: str | None = None,
    keep_ratio: float | list[float] | None = None,
    opset: int | None = None,
    batch_size: int | None = None,
    inputs: torch.Tensor | None = None,
    verify: bool = True,
    atol: float = ATOL,
) -> ExportResult:
    """Export ``model`` (a dynvit model, or a plain timm ViT in mode ``none``) and check it.

    Args:
        model: the model; it runs in eval mode with ``mode``/``keep_ratio`` during the export
            and gets its own settings back afterwards.
        path: output file (``onnx``, ``pt2``) or directory (``safetensors``: ``model.safetensors``
            and ``config.json`` via :func:`dynvit.hub.save_pretrained`).
        format: ``onnx``, ``pt2`` or ``safetensors``.
        mode: ``topk``, ``threshold`` (the kept counts computed in the graph, per image) or
            ``none`` (dense); default the model's ``prune_mode``.
        keep_ratio: top-k keep ratio to export with (see :func:`dynvit.patch`).
        opset: ONNX opset, at least :data:`MIN_OPSET`; from 23 on attention is ONNX ``Attention``.
        batch_size: ``None`` (default): any batch size, a dynamic batch dimension (threshold
            mode pads a batch to its largest kept count and masks the padding); an int: a graph
            for that batch size only (``1``: single images, no padding; the fastest threshold
            graph at batch 1).
        inputs: images ``(B, C, H, W)`` to check the export on; default 4 random ones.
        verify: run :func:`verify_export` and raise :class:`ParityError` above ``atol``.

    Raises:
        ExportError: a format, mode, keep ratio or opset that cannot be exported; the file
            does not match PyTorch (:class:`ParityError`).
    """
    path = os.fspath(path)
    mode = mode or getattr(model, "prune_mode", "none")
    _check_request(model, path, format, mode, keep_ratio, opset, batch_size)
    inputs = random_images(model) if inputs is None else inputs.detach().cpu()
    # A dynamic batch is traced with two images: torch.export specialises a dimension of size 1.
    example = tile_images(inputs, batch_size or 2)
    result = ExportResult(path, format, mode, batch_size=batch_size)
    with _export_settings(model, mode, keep_ratio), torch.no_grad():
        if os.path.dirname(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
        _log.info("exporting %s (mode %s) to %s", format, mode, path)
        if format == "onnx":
            result.opset = _export_onnx(model, path, example, batch_size, opset)
        elif format == "pt2":
            _export_pt2(model, path, example, batch_size)
        else:
            _export_safetensors(model, path)
        if verify:
            verify_export(model, result, inputs, atol=atol)
    return result


# ---- checks -------------------------------------------------------------------------------
def _runner(path: str, format: str):
    if format == "onnx":
        import onnxruntime as ort

        try:
            session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own exception types
            raise ExportError(f"onnxruntime {ort.__version__} cannot load {path!r}: {e}") from e
        return lambda x: torch.from_numpy(session.run(["logits"], {"images": x.numpy()})[0])
    if format == "pt2":
        module = torch.export.load(path).module()
        return lambda x: module(x)
    from .hub import load_pretrained

    return load_pretrained(path)


def _check_state_dict(model: nn.Module, loaded: nn.Module, path: str) -> None:
    mine, theirs = model.state_dict(), loaded.state_dict()
    differ = sorted(k for k in mine if k not in theirs or not torch.equal(mine[k].cpu(), theirs[k]))
    extra = sorted(set(theirs) - set(mine))
    if differ or extra:
        raise ParityError(f"{path!r} does not restore the model: differing {differ[:8]}, unexpected {extra[:8]}")
    if getattr(loaded, "prune_mode", None) != getattr(model, "prune_mode", None):
        raise ParityError(f"{path!r} restores prune_mode {loaded.prune_mode!r}, expected {model.prune_mode!r}")


def verify_export(model: nn.Module, result: ExportResult, inputs: torch.Tensor, *, atol: float = ATOL) -> ExportResult:
    """Run ``inputs`` through the exported file and through ``model`` (already in the
    exported mode) and fill ``result.max_abs_diff``, ``batch_sizes`` and ``kept_counts``.

    A graph of any batch size is checked on each image alone, then on the first two and on all
    of ``inputs`` (threshold mode: batches whose images keep different counts); a graph of a
    fixed batch size on ``inputs`` in batches of that size (repeated to fill the last).
    Safetensors must also restore an equal state dict.

    Raises:
        ParityError: the largest logit difference is above ``atol``.
    """
    run = _runner(result.path, result.format)
    if result.format == "safetensors":
        _check_state_dict(model, run, result.path)
    n = len(inputs)
    if result.batch_size:
        batches = [tile_images(inputs[i:], result.batch_size) for i in range(0, n, result.batch_size)]
    else:
        batches = list(inputs.split(1)) + [inputs[:2], inputs][: 2 if n > 2 else 1 if n == 2 else 0]
    sizes = [len(x) for x in batches]
    worst, kept = 0.0, []
    with torch.no_grad():
        for x in batches:
            if is_patched(model) and result.mode != "none":
                out = model.forward_pruned(x)
                expected = out.logits
                if len(kept) < n:
                    kept.extend(torch.stack([m.sum(1) for m in out.keep_masks], 1).tolist()[: n - len(kept)])
            else:
                expected = model(x)
            worst = max(worst, (run(x) - expected).abs().max().item())
    result.max_abs_diff, result.batch_sizes = worst, sizes
    result.kept_counts = kept if result.mode == "threshold" else kept[:1]
    result.num_patches = model.patch_embed.num_patches
    _log.info("%s export matches PyTorch: max abs diff %.3g over batch sizes %s", result.format, worst, sizes)
    if not worst <= atol:
        raise ParityError(f"{result.format} export {result.path!r} differs from PyTorch by {worst:.3g} (> {atol:g}) "
                          f"in mode {result.mode!r}")
    return result


def ort_speed(dense_path: str, pruned_path: str, batches: list[torch.Tensor], *, repeats: int = 20, warmup: int = 3,
              threads: int | None = None) -> SpeedResult:
    """Images/s of two ONNX files in onnxruntime, measured in one run.

    Each repeat times the dense file, then the pruned one, on the same ``batches`` (of the
    batch size a fixed-batch export takes), so load changes on a shared machine hit both alike;
    ``warmup`` repeats are discarded and the median time of the rest is reported.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    sessions = [ort.InferenceSession(p, options, providers=["CPUExecutionProvider"]) for p in (dense_path, pruned_path)]
    arrays = [b.numpy() for b in batches]
    times = [[], []]
    for r in range(warmup + repeats):
        for s, session in enumerate(sessions):
            start = time.perf_counter()
            for a in arrays:
                session.run(["logits"], {"images": a})
            if r >= warmup:
                times[s].append(time.perf_counter() - start)
    images = sum(len(a) for a in arrays)
    dense, pruned = (images / statistics.median(t) for t in times)
    return SpeedResult(len(arrays[0]), dense, pruned)


def load_checkpoint(path: str | os.PathLike) -> nn.Module:
    """The model saved by :func:`dynvit.hub.save_pretrained` in directory ``path`` (or ``hf-hub:org/name``)."""
    from .hub import CONFIG_NAME, WEIGHTS_NAME, load_pretrained

    path = os.fspath(path)
    if path.startswith(("hf-hub:", "local-dir:")):
        return load_pretrained(path)
    if not os.path.isdir(path):
        what = "is a file" if os.path.isfile(path) else "does not exist"
        raise FileNotFoundError(f"checkpoint {path!r} {what}: pass a directory written by dynvit.save_pretrained "
                                f"({WEIGHTS_NAME} + {CONFIG_NAME}), e.g. the 'final' folder of a training run")
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not os.path.isfile(os.path.join(path, name)):
            raise FileNotFoundError(f"checkpoint {path!r} has no {name}; is it a directory written by dynvit.save_pretrained?")
    return load_pretrained(path)


# ---- command line -------------------------------------------------------------------------
def _keep_ratio(text: str) -> float | list[float]:
    values = [float(v) for v in text.split(",")]
    return values[0] if len(values) == 1 else values


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dynvit-export", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="directory written by dynvit.save_pretrained")
    p.add_argument("--format", required=True, choices=FORMATS)
    p.add_argument("--out", required=True, help="output file (onnx, pt2) or directory (safetensors)")
    p.add_argument("--mode", choices=("topk", "threshold", "none"), help="prune mode to export (default: the checkpoint's)")
    p.add_argument("--keep-ratio", type=_keep_ratio, help="top-k keep ratio: R, or one cumulative value per stage R1,R2,...")
    p.add_argument("--opset", type=int, help=f"ONNX opset (at least {MIN_OPSET}; default torch's)")
    p.add_argument("--images", help="folder of images to check the export on (default: random inputs)")
    p.add_argument("--num-images", type=int, default=8)
    p.add_argument("--atol", type=float, default=ATOL, help="largest allowed logit difference")
    p.add_argument("--no-bench", action="store_true", help="skip the onnxruntime dense vs pruned speed comparison")
    p.add_argument("--batch-size", type=int, help="export a graph for this batch size only (1: single images, the fastest "
                   "threshold graph at batch 1; default: any batch size)")
    p.add_argument("--bench-batch", type=int, default=8, help="batch size of the speed comparison (default 8; the "
                   "export's own batch size if it has one)")
    p.add_argument("--bench-repeats", type=int, default=20)
    return p


def _report(result: ExportResult) -> None:
    print(f"wrote {result.format} ({result.mode}{f', opset {result.opset}' if result.opset else ''}): {result.path}")
    checked = f"batch sizes {', '.join(map(str, sorted(set(result.batch_sizes))))}"
    print(f"max |{result.format} - pytorch| = {result.max_abs_diff:.3g} ({checked})")
    if result.mode == "threshold":
        kept = torch.tensor(result.kept_counts, dtype=torch.float)
        stages = ", ".join(f"{m:.1f} [{lo:.0f}-{hi:.0f}]" for m, lo, hi in zip(kept.mean(0), kept.amin(0), kept.amax(0)))
        print(f"patch tokens kept after each stage, mean [min-max]: {stages} of {result.num_patches}")
    elif result.kept_counts:
        print(f"patch tokens kept after each stage: {', '.join(map(str, result.kept_counts[0]))} of {result.num_patches}")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        model = load_checkpoint(args.checkpoint)
        inputs = load_images(args.images, model, args.num_images) if args.images else random_images(model, args.num_images)
        result = export_model(model, args.out, format=args.format, mode=args.mode, keep_ratio=args.keep_ratio,
                              opset=args.opset, batch_size=args.batch_size, inputs=inputs, atol=args.atol)
        _report(result)
        if args.format == "onnx" and not args.no_bench:
            with tempfile.TemporaryDirectory() as tmp:
                dense = export_model(model, os.path.join(tmp, "dense.onnx"), mode="none", opset=result.opset, inputs=inputs)
                batches = [tile_images(inputs, result.batch_size or args.bench_batch)]
                speed = ort_speed(dense.path, result.path, batches, repeats=args.bench_repeats)
            print(f"onnxruntime images/s at batch {speed.batch_size}: dense {speed.dense:.1f}, "
                  f"pruned {speed.pruned:.1f} ({speed.speedup:.2f}x)")
    except (ExportError, OSError, ValueError, NotImplementedError) as e:
        print(f"dynvit-export: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
