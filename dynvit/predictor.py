"""The keep-logit predictor that sits before a pruning block."""
from __future__ import annotations

import math

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .signals import SIGNAL_INIT, SIGNALS, attention_term, centered, redundancy, size_term

__all__ = ["TokenPredictor", "PREDICTOR_PRIORS", "MATCH_KEEP_OFFSET", "match_prior", "check_signals"]

#: what a predictor adds to its learned logit: nothing, or the ``match`` prior (see TokenPredictor)
PREDICTOR_PRIORS = ("none", "match")
#: logit added to the tokens the ``match`` prior keeps ahead of the others (far above the logistic noise)
MATCH_KEEP_OFFSET = 10.0


def check_signals(signals: Sequence[str]) -> tuple[str, ...]:
    """The signals a predictor reads, checked and in canonical order (see :mod:`dynvit.signals`)."""
    if isinstance(signals, str):
        signals = [signals]
    unknown = [s for s in signals if s not in SIGNALS]
    if unknown:
        raise ValueError(f"unknown predictor signals {unknown}; choose from {list(SIGNALS)}")
    return tuple(s for s in SIGNALS if s in signals)


class TokenPredictor(nn.Module):
    """Scores each patch token from its own features and a summary of the kept tokens.

    As in DynamicViT: a LayerNorm + Linear + GELU embeds each token; half of the channels
    stay per-token (local), the other half is averaged over the currently kept tokens
    (global) and broadcast back; an MLP maps the concatenation to one keep logit per token.

    The MLP's first layer is applied in two halves, ``W_local @ local + (W_global @ global + b)``,
    which equals it on the concatenation; the global half is computed once per image instead
    of once per token, and nothing is concatenated. The parameters (and state-dict keys) are
    those of the plain MLP.

    With ``prior="match"`` the logit also says how much a token repeats another, the criterion
    of ToMe's bipartite matching: the tokens alive at the stage are split alternately (by rank in
    patch order) into candidates and destinations; a destination gets ``MATCH_KEEP_OFFSET``
    added (kept ahead of every candidate while the stage keeps half or more), a candidate gets
    ``-match_scale * s``, where ``s`` is its highest cosine similarity to a destination. So a
    candidate that nearly duplicates a kept token is dropped first, and merging
    (``dropped_tokens="merge"``) folds it into a token that carries the same content. The MLP's
    logit and the learned ``match_scale`` decide between the two criteria; the similarity is
    read without gradient (it is a matching, as ToMe's). Measured on CIFAR-10 with merging
    (docs/BENCHMARKS.md, "Which tokens"): DynamicViT's learned logit picks barely better than a
    random choice, and this criterion better than both.

    With ``signals`` the predictor also reads what the token's features do not say (see
    :mod:`dynvit.signals`): the class token's ``attention`` to it in the block the stage feeds,
    its ``redundancy`` (similarity to the closest token ranked ahead of it by the rest of the
    logit) and its ``size`` (patches merged into it). Each enters the keep logit centred per
    image and with a learned weight (``signal_weight``, one per signal, in the order of
    :data:`dynvit.signals.SIGNALS`):
    ``logit = mlp + w_a * attention + w_s * size - w_r * redundancy(ranked by the rest)``.

    Args:
        embed_dim: token width of the backbone.
        hidden_ratio: width of the embedding as a multiple of ``embed_dim``.
        init_keep_prob: keep probability the predictor outputs at initialisation (through
            the last bias), so fine-tuning starts near the target ratio, not at 0.5.
        prior: ``none`` (DynamicViT's predictor) or ``match`` (above).
        match_scale: initial ``match_scale`` (logit units per unit of cosine similarity).
        signals: what else the logit reads: any of ``attention``, ``redundancy``, ``size``.
    """

    def __init__(self, embed_dim: int, *, hidden_ratio: float = 1.0, init_keep_prob: float = 0.5, prior: str = "none",
                 match_scale: float = 8.0, signals: Sequence[str] = ()):
        super().__init__()
        if prior not in PREDICTOR_PRIORS:
            raise ValueError(f"predictor prior must be one of {PREDICTOR_PRIORS}, got {prior!r}")
        self.prior = prior
        self.match_scale = nn.Parameter(torch.tensor(float(match_scale))) if prior == "match" else None
        self.signals = check_signals(signals)
        self.signal_weight = (nn.Parameter(torch.tensor([SIGNAL_INIT[s] for s in self.signals]))
                              if self.signals else None)
        hidden = max(4, int(embed_dim * hidden_ratio) // 4 * 4)
        self.local_dim = hidden // 2
        self.in_proj = nn.Sequential(nn.LayerNorm(embed_dim), nn.Linear(embed_dim, hidden), nn.GELU())
        self.out_mlp = nn.Sequential(
            nn.Linear(hidden, hidden // 2),
            nn.GELU(),
            nn.Linear(hidden // 2, hidden // 4),
            nn.GELU(),
            nn.Linear(hidden // 4, 1),
        )
        self.init_keep_prob = init_keep_prob
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        p = min(max(self.init_keep_prob, 1e-3), 1 - 1e-3)
        nn.init.constant_(self.out_mlp[-1].bias, math.log(p / (1 - p)))
        if self.signal_weight is not None:
            with torch.no_grad():
                self.signal_weight.copy_(torch.tensor([SIGNAL_INIT[s] for s in self.signals]))

    @property
    def needs_attention(self) -> bool:
        """Whether :meth:`forward` wants the class token's attention (``attention=``)."""
        return "attention" in self.signals

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, *, attention: torch.Tensor | None = None,
                size: torch.Tensor | None = None) -> torch.Tensor:
        """Keep logits ``(B, N)`` for patch tokens ``x`` ``(B, N, C)``.

        ``mask`` ``(B, N)`` (0/1 or soft, may carry gradient) weights the global average;
        tokens with weight 0 (dropped or padding) do not contribute. ``None`` means all kept.
        ``attention`` ``(B, N)``: the class token's attention probabilities (needed with the
        ``attention`` signal); ``size`` ``(B, N)``: patches per token (None: one each).
        """
        local, glob = self.in_proj(x).split([self.local_dim, self.local_dim], dim=-1)
        if mask is None:
            glob = glob.mean(dim=1, keepdim=True)
        else:
            w = mask.to(glob.dtype).unsqueeze(1)  # (B, 1, N)
            glob = (w @ glob) / w.sum(dim=-1, keepdim=True).clamp_min(1e-6)
        first = self.out_mlp[0]
        d = self.local_dim
        h = F.linear(local, first.weight[:, :d]) + F.linear(glob, first.weight[:, d:], first.bias)
        for layer in self.out_mlp[1:]:
            h = layer(h)
        logits = h.squeeze(-1)
        if self.prior == "match":
            logits = logits + self.match_prior(x, mask)
        if self.signals:
            logits = self.add_signals(logits, x, mask, attention, size)
        return logits

    def add_signals(self, logits: torch.Tensor, x: torch.Tensor, mask: torch.Tensor | None,
                    attention: torch.Tensor | None, size: torch.Tensor | None) -> torch.Tensor:
        """``logits`` plus the weighted signal terms (see the class docstring)."""
        alive = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device) if mask is None else mask.detach() > 0.5
        weight = dict(zip(self.signals, self.signal_weight.to(torch.float32).unbind(0)))
        logits = logits.float()
        if "attention" in weight:
            if attention is None:
                raise ValueError("this predictor reads the class token's attention: pass attention=")
            logits = logits + weight["attention"] * attention_term(attention, alive)
        if "size" in weight:
            logits = logits + weight["size"] * size_term(size, alive)
        if "redundancy" in weight:
            logits = logits - weight["redundancy"] * centered(redundancy(x, logits, alive), alive)
        return logits

    def match_prior(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, N)`` the ``match`` prior's logit term (see the class docstring)."""
        return match_prior(x, mask, self.match_scale)


def match_prior(x: torch.Tensor, mask: torch.Tensor | None, scale: torch.Tensor | float) -> torch.Tensor:
    """``(B, N)`` keep-logit prior of ToMe's bipartite criterion for tokens ``x`` ``(B, N, C)``.

    The tokens alive under ``mask`` (``> 0.5``; ``None``: all) are split alternately by their
    rank in patch order: ranks 1, 3, 5 ... are destinations and get ``MATCH_KEEP_OFFSET``; the
    others get ``-scale * s``, ``s`` their highest cosine similarity to a destination. The rank
    among alive tokens (not the position) makes the split the same whether dead tokens stay in
    place (masked path) or were removed (pruned path). No gradient reaches ``x``.
    """
    alive = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device) if mask is None else mask.detach() > 0.5
    destination = alive & (alive.long().cumsum(dim=1) % 2 == 0)  # 0-based alive rank odd
    z = F.normalize(x.detach(), dim=-1)
    sim = (z @ z.transpose(1, 2)).masked_fill(~destination[:, None, :], -1.0)
    best = sim.amax(dim=-1)  # (B, N) highest similarity to a destination
    scale = scale.to(best.dtype) if isinstance(scale, torch.Tensor) else scale
    return torch.where(destination, torch.full_like(best, MATCH_KEEP_OFFSET), -scale * best)
