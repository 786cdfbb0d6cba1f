"""The same models timed where users deploy them: eager PyTorch, ``torch.compile`` and ONNX
Runtime, in one interleaved run.

:func:`deployment_speed` takes eval-mode models (a dense one among them), compiles each with
:func:`dynvit.compile` and exports each to ONNX with :func:`dynvit.export_model` (checked
against PyTorch), then times every (model, runtime) pair with
:func:`~dynvit.benchmark.speed.measure_speed`: repeats interleaved, so a change in machine load
hits all alike, and each speed-up is paired with the dense model *in the same runtime*
(:func:`~dynvit.benchmark.speed.paired_speedup`). What compiling cost (the first call at each
batch size) and what exporting cost are reported beside the speeds.
"""
from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Sequence

import torch
from torch import nn

from ..compiled import compile as dynvit_compile
from ..export import export_model, tile_images
from ..patch import is_patched
from .speed import measure_speed, paired_speedup

__all__ = ["RUNTIMES", "OrtModule", "deployment_speed"]

_log = logging.getLogger(__name__)

RUNTIMES = ("eager", "compiled", "onnxruntime")


class OrtModule(nn.Module):
    """An ONNX file run by onnxruntime's CPU provider, called like the model it came from.

    A file exported for single images (``batch_size=1``) runs a batch as that many calls; with
    ``single_image``, a second file for single images, a batch of one runs that one (threshold
    mode: a graph without padding). Spinning of onnxruntime's idle threads is off, so that between
    its calls it leaves the cores to the models timed beside it.
    """

    def __init__(self, path: str, *, single_image: str | None = None, threads: int | None = None):
        super().__init__()
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        self.single = (ort.InferenceSession(single_image, options, providers=["CPUExecutionProvider"])
                       if single_image else None)
        self.per_image = self.session.get_inputs()[0].shape[0] == 1  # a graph for single images only

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if len(x) == 1 and self.single is not None:
            return torch.from_numpy(self.single.run(["logits"], {"images": x.numpy()})[0])
        arrays = [b.numpy() for b in (x.split(1) if self.per_image else [x])]
        return torch.cat([torch.from_numpy(self.session.run(["logits"], {"images": a})[0]) for a in arrays])


def _compiled(models: dict[str, nn.Module], images: torch.Tensor, batch_sizes: Sequence[int]) -> tuple[dict, dict]:
    """Each model under :func:`dynvit.compile`, and the seconds its first call took per batch size
    (tracing and code generation)."""
    compiled, seconds = {}, {}
    for name, model in models.items():
        compiled[name] = dynvit_compile(model)
        seconds[name] = {}
        for bs in batch_sizes:
            start = time.perf_counter()
            with torch.no_grad():
                compiled[name](tile_images(images, bs))
            seconds[name][bs] = time.perf_counter() - start
            _log.info("compiled %s at batch %d in %.1f s", name, bs, seconds[name][bs])
    return compiled, seconds


def _onnx(models: dict[str, nn.Module], images: torch.Tensor, folder: str, given: dict[str, str]) -> tuple[dict, dict]:
    """Each model exported to ONNX (or the file ``given`` for it) in onnxruntime, and what the
    export took and how close it came to PyTorch. A threshold-mode model also gets a graph for
    single images (no padding), which its batch-1 calls run."""
    sessions, info = {}, {}
    for name, model in models.items():
        mode = model.prune_mode if is_patched(model) else "none"
        stem = os.path.join(folder, name.replace(" ", "_").replace("/", "_"))
        path = given.get(name)
        if path is None:
            path = f"{stem}.onnx"
            start = time.perf_counter()
            result = export_model(model, path, mode=mode, inputs=images[:4])
            info[name] = {"path": path, "mode": mode, "export_seconds": time.perf_counter() - start,
                          "max_abs_diff": result.max_abs_diff}
        else:
            info[name] = {"path": path, "mode": mode}
        single = None
        if mode == "threshold":
            single = f"{stem}_batch1.onnx"
            start = time.perf_counter()
            result = export_model(model, single, mode=mode, batch_size=1, inputs=images[:4])
            info[name].update(single_image_path=single, single_image_export_seconds=time.perf_counter() - start,
                              single_image_max_abs_diff=result.max_abs_diff)
        sessions[name] = OrtModule(path, single_image=single)
    return sessions, info


def deployment_speed(
    models: dict[str, nn.Module],
    images: torch.Tensor,
    batch_sizes: Sequence[int] = (1, 64),
    *,
    dense: str = "dense",
    runtimes: Sequence[str] = RUNTIMES,
    repeats: int = 5,
    min_seconds: float = 1.0,
    onnx_files: dict[str, str] | None = None,
) -> dict:
    """Images/s of every model in every runtime, and speed-ups over ``models[dense]`` in the same runtime.

    Args:
        models: eval-mode models by name; a dynvit model runs in its ``prune_mode``.
        images: inputs that fill the timed batches (consecutive batches differ, so a threshold-mode
            figure is a mean over images); the first four also check the ONNX exports.
        batch_sizes: batch sizes to time.
        dense: the name of the dense model the speed-ups are paired with.
        runtimes: from :data:`RUNTIMES`.
        repeats, min_seconds: see :func:`~dynvit.benchmark.speed.measure_speed`.
        onnx_files: already exported ONNX files by model name (the others are exported here).

    Returns:
        ``{"speed": {name: {runtime: {batch_size: {"images_per_s", "speedup", "repeats", ...}}}},
        "compile_seconds": {name: {batch_size: s}}, "onnx": {name: {...}}, "other_cpu_share": float}``.
    """
    unknown = sorted(set(runtimes) - set(RUNTIMES))
    if unknown or dense not in models:
        raise ValueError(f"runtimes must be among {RUNTIMES} (got {unknown}) and models must hold {dense!r}")
    timed: dict[tuple[str, str], nn.Module] = {}
    result: dict = {"compile_seconds": {}, "onnx": {}}
    for name, model in models.items():
        model.eval()
        if "eager" in runtimes:
            timed[(name, "eager")] = model
    if "compiled" in runtimes:
        compiled, result["compile_seconds"] = _compiled(models, images, batch_sizes)
        timed.update({(name, "compiled"): m for name, m in compiled.items()})
    with tempfile.TemporaryDirectory(prefix="dynvit_onnx_") as folder:
        if "onnxruntime" in runtimes:
            sessions, result["onnx"] = _onnx(models, images, folder, onnx_files or {})
            timed.update({(name, "onnxruntime"): m for name, m in sessions.items()})
        labels = {f"{name} | {runtime}": (name, runtime) for name, runtime in timed}
        pool = images if len(images) >= max(batch_sizes) else tile_images(images, max(batch_sizes))
        speed = measure_speed({label: timed[key] for label, key in labels.items()}, pool, batch_sizes, repeats=repeats,
                              min_seconds=min_seconds)
    table: dict = {name: {} for name in models}
    for label, (name, runtime) in labels.items():
        base = speed[f"{dense} | {runtime}"]
        table[name][runtime] = {bs: {**s, "speedup": paired_speedup(s["repeats"], base[bs]["repeats"])}
                                for bs, s in speed[label].items()}
    result["speed"] = table
    result["other_cpu_share"] = max((s["other_cpu_share"] or 0.0) for v in speed.values() for s in v.values())
    return result
