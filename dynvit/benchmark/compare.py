"""Token-reduction methods side by side on one dense model: accuracy, GMACs, kept tokens,
parameters, speed.

Every method is built from one dense timm model (a deep copy, then patched), and measured on
the same images, in the same process, on the same machine, so the rows of a table differ only
by the method. :func:`compare` does a whole table; :func:`make_method` builds ``dense``,
``dynvit``, ``evit``, ``tome`` or ``random`` on a copy and :func:`match_tome_r` picks ToMe's
``r`` whose GMACs is closest to a target.
"""
from __future__ import annotations

import copy
import logging
from collections.abc import Iterable, Sequence

import timm
import torch
from torch import nn

from ..baselines import patch_evit, patch_random, patch_tome
from ..calibrate import calibrate
from ..export import tile_images
from ..flops import count_flops
from ..patch import is_patched, patch
from ..progress import progress
from ..ratios import normalize_keep_ratio, normalize_prune_loc
from .accuracy import evaluate, num_patches
from .speed import measure_speed, paired_speedup

__all__ = ["METHODS", "dense_backbone", "default_prune_loc", "make_method", "match_tome_r",
           "compare"]

_log = logging.getLogger(__name__)

METHODS = ("dense", "dynvit", "evit", "tome", "random")


# ---- models -------------------------------------------------------------------------------
def dense_backbone(model: nn.Module) -> nn.Module:
    """A plain timm model (eval mode) with the backbone weights of ``model``.

    ``model`` is a timm model (copied) or a patched one carrying ``dynvit_meta`` (set by
    :func:`dynvit.build_model` and :func:`dynvit.load_pretrained`), rebuilt without its
    predictors.
    """
    if not is_patched(model) and getattr(model, "token_reduction", None) is None:
        return copy.deepcopy(model).eval()
    meta = getattr(model, "dynvit_meta", None)
    if not meta:
        raise ValueError("cannot rebuild the dense backbone of a patched model without model.dynvit_meta "
                         "(dynvit.build_model and dynvit.load_pretrained set it)")
    dense = timm.create_model(meta["model_name"], **meta["timm_kwargs"])
    own = model.state_dict()
    dense.load_state_dict({k: own[k] for k in dense.state_dict()})
    dense.pretrained_cfg = dict(getattr(model, "pretrained_cfg", {}) or {})
    dense.dynvit_meta = dict(meta)
    ref = next(model.parameters())
    return dense.to(device=ref.device, dtype=ref.dtype).eval()


def default_prune_loc(depth: int) -> tuple[int, ...]:
    """DynamicViT's stages for a model of ``depth`` blocks: before 1/4, 1/2 and 3/4 of the depth."""
    return normalize_prune_loc(sorted({max(1, depth * k // 4) for k in (1, 2, 3)}), depth)


def make_method(
    dense: nn.Module,
    method: str,
    *,
    prune_loc: Sequence[int] = (3, 6, 9),
    keep_ratio: float | Sequence[float] = 0.7,
    tome_r: int = 0,
    prune_mode: str = "topk",
    seed: int = 0,
    predictor_hidden_ratio: float = 1.0,
    predictor_prior: str = "none",
    dropped_tokens: str = "discard",
) -> nn.Module:
    """``method`` applied to a deep copy of the dense timm model, in eval mode.

    ``dynvit`` here gets fresh, untrained predictors (``predictor_hidden_ratio`` wide, with
    ``predictor_prior``, dropping or merging per ``dropped_tokens``; see :func:`dynvit.patch`):
    use it for GMACs and speed only (a trained dynvit model comes from its checkpoint). ``evit``
    and ``random`` use ``prune_loc``/``keep_ratio``, ``tome`` uses ``tome_r``.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    model = copy.deepcopy(dense).eval()
    if method == "dynvit":
        _log.warning("dynvit with untrained predictors: its GMACs and speed mean something, its accuracy does not")
        patch(model, prune_loc=prune_loc, keep_ratio=keep_ratio, prune_mode=prune_mode,
              predictor_hidden_ratio=predictor_hidden_ratio, predictor_prior=predictor_prior,
              dropped_tokens=dropped_tokens)
        model.dynvit_meta = getattr(dense, "dynvit_meta", None)
    elif method == "evit":
        patch_evit(model, prune_loc=prune_loc, keep_ratio=keep_ratio)
    elif method == "tome":
        patch_tome(model, r=tome_r)
    elif method == "random":
        patch_random(model, prune_loc=prune_loc, keep_ratio=keep_ratio, seed=seed)
    return model.eval()


# ---- GMACs --------------------------------------------------------------------------------
def match_tome_r(dense: nn.Module, target_gmacs: float, input_size: Sequence[int]) -> tuple[int, float]:
    """ToMe's ``r`` (the same in every block) whose GMACs is closest to ``target_gmacs``.

    GMACs fall monotonically with ``r``, so a bisection over ``[0, N // 2]`` needs about
    ``log2(N)`` fvcore counts.
    """
    cache: dict[int, float] = {}

    def gmacs(r: int) -> float:
        if r not in cache:
            cache[r] = count_flops(make_method(dense, "tome", tome_r=r), tuple(input_size))
        return cache[r]

    lo, hi = 0, num_patches(dense, input_size[-2:]) // 2
    if gmacs(hi) > target_gmacs:
        return hi, gmacs(hi)
    while lo < hi:  # smallest r with gmacs(r) <= target
        mid = (lo + hi) // 2
        lo, hi = (mid + 1, hi) if gmacs(mid) > target_gmacs else (lo, mid)
    best = min((r for r in (lo - 1, lo) if r >= 0), key=lambda r: abs(gmacs(r) - target_gmacs))
    return best, gmacs(best)


def _gmacs(model: nn.Module, input_size: Sequence[int], images: torch.Tensor | None) -> float:
    if is_patched(model) and model.prune_mode == "threshold":
        return count_flops(model, tuple(input_size), images=images)
    return count_flops(model, tuple(input_size))



# ---- a whole comparison -------------------------------------------------------------------
def _params_m(model: nn.Module) -> float:
    return sum(p.numel() for p in model.parameters()) / 1e6


def _fmt_ratios(ratios: Sequence[float]) -> str:
    return "/".join(f"{r:.2f}" for r in ratios)


def _measured_fractions(tokens_per_block: Sequence[float], prune_loc: Sequence[int], n0: int) -> tuple[float, ...]:
    """Cumulative kept fractions at each stage from measured tokens, as a valid keep_ratio."""
    fractions, last = [], 1.0
    for b in prune_loc:
        last = min(last, max(tokens_per_block[b] / n0, 1.0 / n0))
        fractions.append(last)
    return tuple(fractions)


def compare(
    dense: nn.Module,
    *,
    input_size: Sequence[int],
    dynvit_model: nn.Module | None = None,
    finetuned: dict[str, nn.Module] | None = None,
    methods: Sequence[str] = METHODS,
    prune_loc: Sequence[int] | None = None,
    keep_ratio: float | Sequence[float] | None = None,
    mode: str = "topk",
    tome_r: int | None = None,
    loader: Iterable | None = None,
    images: torch.Tensor | None = None,
    speed_images: torch.Tensor | None = None,
    batch_sizes: Sequence[int] = (),
    repeats: int = 5,
    seed: int = 0,
) -> tuple[list[dict], dict[str, nn.Module]]:
    """Measure every method on the same dense model; one result row per method.

    Args:
        dense: the dense timm model every baseline is built from (eval mode, on its device).
        input_size: ``(C, H, W)`` of the inputs.
        dynvit_model: a trained dynvit model; ``None`` builds one with untrained predictors
            (GMACs and speed only; threshold mode is then calibrated on ``images``).
        finetuned: fine-tuned baselines by method (``evit``, ``tome``, ``random``); each is
            rebuilt on its own weights with the same settings as the off-the-shelf row and
            reported as ``<method>+ft``.
        methods: rows to produce, from :data:`METHODS`.
        prune_loc, keep_ratio: stages and cumulative kept fractions; default the dynvit
            model's. In threshold mode EViT and random dropping keep, per stage, the mean
            fraction dynvit really kept (measured on ``loader``, else on ``images``).
        mode: dynvit's pruning mode.
        tome_r: ToMe's tokens merged per block; ``None`` matches dynvit's GMACs.
        loader: ``(images, targets)`` batches for accuracy; ``None`` skips accuracy.
        images: real images ``(B, C, H, W)``: threshold-mode GMACs are their mean (each is
            traced, so a few dozen suffice); random images when ``None``.
        speed_images: images that fill the timed batches; default ``images``.
        batch_sizes: batch sizes to time; empty skips timing.
        repeats: timed repeats per model and batch size (the median is reported).
        seed: seed of the random-dropping baseline.

    Returns:
        The rows (dicts, see ``results_table``) and the models by row name.
    """
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise ValueError(f"unknown methods {unknown}; choose from {METHODS}")
    device = next(dense.parameters()).device
    if images is None:
        images = torch.randn(8, *input_size, generator=torch.Generator().manual_seed(seed)).to(device)
    dynvit_model, loc, ratios = _setup_dynvit(dense, dynvit_model, "dynvit" in methods, prune_loc, keep_ratio, mode, images)
    finetuned = finetuned or {}
    count = 1 + (dynvit_model is not None and "dynvit" in methods) + sum(
        1 + (m in finetuned) for m in ("evit", "random", "tome") if m in methods)
    rows = _Rows(input_size, images, loader, progress(desc="methods", total=count, unit="model", leave=True))
    rows.measure("dense", dense, setting="-")
    if dynvit_model is not None and "dynvit" in methods:
        row = rows.measure("dynvit", dynvit_model, setting=f"{mode}, keep {_fmt_ratios(ratios)}", mode=mode,
                           prune_loc=list(loc), keep_ratio=list(ratios))
        if mode == "threshold":  # the baselines keep what dynvit really kept
            ratios = _measured_fractions(row["tokens_per_block"], loc, num_patches(dense, input_size[-2:]))
            row.update(setting=f"threshold, kept {_fmt_ratios(ratios)}", kept_fraction=list(ratios))
        elif mode == "none":
            ratios = (1.0,) * len(loc)
            row["setting"] = "none (dense path)"
    for name in ("evit", "random"):
        for label, source in ((name, dense), (f"{name}+ft", finetuned.get(name))):
            if name in methods and source is not None:
                model = make_method(dense_backbone(source), name, prune_loc=loc, keep_ratio=ratios, seed=seed)
                rows.measure(label, model, setting=f"keep {_fmt_ratios(ratios)}", prune_loc=list(loc), keep_ratio=list(ratios))
    if "tome" in methods:
        if tome_r is None:
            target = next((rows.rows[m]["gmacs"] for m in ("dynvit", "random", "evit") if m in rows.rows), None)
            if target is None:
                target = _gmacs(make_method(dense, "random", prune_loc=loc, keep_ratio=ratios), input_size, None)
            tome_r, _ = match_tome_r(dense, target, input_size)
        for label, source in (("tome", dense), ("tome+ft", finetuned.get("tome"))):
            if source is not None:
                rows.measure(label, make_method(dense_backbone(source), "tome", tome_r=tome_r), setting=f"r={tome_r}",
                             tome_r=tome_r)
    rows.bar.close()
    if batch_sizes:
        speed_images = images if speed_images is None else speed_images
        speed = measure_speed(rows.models, tile_images(speed_images, max(batch_sizes)), batch_sizes, repeats=repeats)
        for name, row in rows.rows.items():
            row["speed"] = {str(bs): v for bs, v in speed[name].items()}
    _derive(rows.rows)
    return list(rows.rows.values()), rows.models


def _setup_dynvit(dense, model, wanted, prune_loc, keep_ratio, mode, images):
    """The dynvit model set to ``mode`` and ``keep_ratio`` (built untrained when none is given
    and a dynvit row is wanted), the stages and the cumulative kept fractions."""
    depth = len(dense.blocks)
    default = model.prune_loc if model is not None else default_prune_loc(depth)
    loc = normalize_prune_loc(tuple(prune_loc) if prune_loc else default, depth)
    if model is None and wanted:
        model = make_method(dense, "dynvit", prune_loc=loc, keep_ratio=0.7 if keep_ratio is None else keep_ratio)
        if mode == "threshold":
            calibrate(model, images)  # untrained predictors: thresholds for the target fraction
    elif model is not None and keep_ratio is not None:
        model.keep_ratio = keep_ratio
    if model is None:
        return None, loc, normalize_keep_ratio(0.7 if keep_ratio is None else keep_ratio, len(loc))
    if tuple(model.prune_loc) != loc:
        raise ValueError(f"prune_loc {loc} differs from the dynvit model's {model.prune_loc}")
    model.prune_mode = mode
    return model, loc, tuple(model.keep_ratio)


class _Rows:
    """Result rows and their models, measured alike: parameters, GMACs, accuracy and tokens."""

    def __init__(self, input_size: Sequence[int], images: torch.Tensor, loader: Iterable | None, bar):
        self.input_size, self.images, self.loader, self.bar = input_size, images, loader, bar
        self.rows: dict[str, dict] = {}
        self.models: dict[str, nn.Module] = {}

    def measure(self, name: str, model: nn.Module, **info) -> dict:
        self.bar.set_postfix_str(name)
        model.eval()
        device = self.images.device
        row = {"method": name, **info, "params_m": _params_m(model), "gmacs": _gmacs(model, self.input_size, self.images)}
        if self.loader is not None:
            row.update(evaluate(model, self.loader, device=device).summary())
        else:  # tokens only, on the given images
            batch = [(self.images, torch.zeros(len(self.images), dtype=torch.long))]
            row["tokens_per_block"] = evaluate(model, batch, device=device).tokens_per_block
        _log.info("%s: %s", name, {k: v for k, v in row.items() if k != "tokens_per_block"})
        self.models[name], self.rows[name] = model, row
        self.bar.update()
        return row


def _derive(rows: dict[str, dict]) -> None:
    """Ratios to the dense row: GMACs ratio, its limit on the speed-up, the speed-ups."""
    base = rows["dense"]
    for row in rows.values():
        row["gmacs_ratio"] = row["gmacs"] / base["gmacs"]
        row["speedup_limit"] = base["gmacs"] / row["gmacs"]
        for bs, s in row.get("speed", {}).items():
            s["speedup"] = paired_speedup(s["repeats"], base["speed"][bs]["repeats"])
            s["speedup_over_limit"] = s["speedup"] / row["speedup_limit"]
