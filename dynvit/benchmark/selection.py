"""Selection rules: what a stage keeps when its predictor is replaced by a fixed rule.

The learned selection has to earn its place against rules that need no training. Holding a
model fixed (its backbone, the merging of dropped tokens, the budget: top-k at its keep ratio)
and swapping only the rule that scores the tokens measures what the learned part adds:

- ``learned``: the model's own predictors;
- ``learned_mlp``: their MLP alone, without the match prior or the signals;
- ``learned_signals``: their signals with the learned weights, the MLP's output replaced by its
  last bias (what the MLP adds on top of the weighted signals);
- ``inverted``: the opposite of ``learned`` (keeps what it would drop);
- ``random``: a uniform random choice (seeded);
- ``similarity``: ToMe's bipartite criterion (:func:`dynvit.predictor.match_prior`: every other
  alive token, by rank in patch order, is kept ahead of the others, which are dropped in order
  of their highest cosine similarity to a kept one); where a stage keeps less than half, the
  kept half is ranked the same way among itself;
- ``attention``: EViT's criterion, the class token's attention to each token in the block the
  stage feeds (the ``attention`` signal of :mod:`dynvit.signals` alone).
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..predictor import MATCH_KEEP_OFFSET, match_prior
from ..signals import attention_term

__all__ = ["RULES", "Rule", "selection_rules", "similarity_rule", "swap_predictors", "evaluate_rules"]

RULES = ("learned", "learned_mlp", "learned_signals", "inverted", "random", "similarity", "attention")


class Rule(nn.Module):
    """Keep logits ``fn(tokens, mask, attention, size)`` in place of a stage's predictor (the
    model hands it the class token's attention when ``needs_attention``). ``predictor``: the
    module ``fn`` calls, if any (registered, so that tracing and FLOP counting see its weights)."""

    def __init__(self, fn: Callable, needs_attention: bool = False, predictor: nn.Module | None = None):
        super().__init__()
        self.fn = fn
        self.needs_attention = needs_attention
        self.predictor = predictor
        self.signals = ("rule",)  # the model then passes attention= and size=

    def forward(self, x, mask=None, *, attention=None, size=None):
        return self.fn(x, mask, attention, size)


def _alive(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return torch.ones(x.shape[:2], dtype=torch.bool, device=x.device) if mask is None else mask.detach() > 0.5


def similarity_rule(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """ToMe's bipartite criterion, the kept half ranked among itself the same way."""
    prior = match_prior(x, mask, 1.0)
    kept_half = prior >= MATCH_KEEP_OFFSET
    inner = match_prior(x, _alive(x, mask) & kept_half, 1.0) - MATCH_KEEP_OFFSET
    return torch.where(kept_half, prior + inner, prior)


def _mlp_only(predictor: nn.Module, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """A predictor's MLP logit, without the match prior and the signals."""
    prior, signals = predictor.prior, predictor.signals
    predictor.prior, predictor.signals = "none", ()
    try:
        return predictor(x, mask)
    finally:
        predictor.prior, predictor.signals = prior, signals


def _signals_only(predictor: nn.Module, x, mask, attention, size) -> torch.Tensor:
    """A predictor's weighted signals on top of its MLP's last bias (a constant)."""
    bias = predictor.out_mlp[-1].bias.expand(x.shape[:2])
    return predictor.add_signals(bias, x, mask, attention, size)


def selection_rules(model: nn.Module, trained: bool, seed: int = 0) -> dict[str, list[Rule]]:
    """``{rule name: one Rule per stage}`` for ``model``'s stages; the learned ones only when
    ``trained`` (the predictors were fine-tuned)."""
    stages = list(model.predictors)
    gen = torch.Generator().manual_seed(seed)
    out = {
        "random": [Rule(lambda x, m, a, s: torch.rand(x.shape[:2], generator=gen).to(x.device)) for _ in stages],
        "similarity": [Rule(lambda x, m, a, s: similarity_rule(x, m)) for _ in stages],
        "attention": [Rule(lambda x, m, a, s: attention_term(a, _alive(x, m)), needs_attention=True) for _ in stages],
    }
    if trained:
        def call(p):
            return (lambda x, m, a, s: p(x, m, attention=a, size=s)) if p.signals else (lambda x, m, a, s: p(x, m))
        out["learned"] = [Rule(call(p), p.needs_attention, p) for p in stages]
        out["inverted"] = [Rule(lambda x, m, a, s, f=call(p): -f(x, m, a, s), p.needs_attention, p) for p in stages]
        if any(p.prior != "none" or p.signals for p in stages):
            out["learned_mlp"] = [Rule(lambda x, m, a, s, p=p: _mlp_only(p, x, m), predictor=p) for p in stages]
        if any(p.signals for p in stages):
            out["learned_signals"] = [Rule(lambda x, m, a, s, p=p: _signals_only(p, x, m, a, s), p.needs_attention, p)
                                      for p in stages]
    return {name: out[name] for name in RULES if name in out}


class swap_predictors:
    """Context manager: ``model.predictors`` replaced by ``rules`` inside the block."""

    def __init__(self, model: nn.Module, rules: list[nn.Module]):
        self.model, self.rules = model, rules

    def __enter__(self):
        self.saved = self.model.predictors
        self.model.predictors = nn.ModuleList(self.rules)
        return self.model

    def __exit__(self, *exc):
        self.model.predictors = self.saved


def evaluate_rules(model: nn.Module, loader, *, trained: bool, seed: int = 0, rules: tuple[str, ...] = RULES,
                   dense_gmacs: float | None = None) -> list[dict]:
    """Top-1 of ``model`` in top-k mode with each rule in place of its predictors.

    Returns one row per rule: ``rule``, ``keep_ratio``, ``gmacs`` (and ``gmacs_ratio`` given
    ``dense_gmacs``), ``top1``, ``seed``, ``tokens`` (patch tokens after each stage).
    """
    from ..flops import count_flops
    from .accuracy import evaluate

    size = (3, *model.patch_embed.img_size)
    mode, model.prune_mode = model.prune_mode, "topk"
    rows = []
    try:
        for name, stage_rules in selection_rules(model, trained, seed).items():
            if name not in rules:
                continue
            with swap_predictors(model, stage_rules):
                result = evaluate(model, loader)
                gmacs = count_flops(model, size)
            row = {"rule": name, "keep_ratio": list(model.keep_ratio), "prune_loc": list(model.prune_loc), "gmacs": gmacs,
                   "top1": result.top1, "seed": seed, "images": result.images,
                   "tokens": [result.tokens_per_block[b] for b in model.prune_loc]}
            if dense_gmacs:
                row["gmacs_ratio"] = gmacs / dense_gmacs
            rows.append(row)
    finally:
        model.prune_mode = mode
    return rows
