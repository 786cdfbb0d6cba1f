"""What a predictor may read besides a token's own features: the signals. Pure tensor functions.

A keep decision is better informed when it knows more than the token's features:

* ``attention``: how much attention the class token pays the token in the block the stage
  feeds (EViT's criterion), as ``log(N * a)``: 0 for a token that gets the uniform share, one
  unit more for each factor ``e`` above it. The model computes the probabilities
  (:meth:`dynvit.model.DynViTMixin._class_attention`); this module only turns them into a
  logit term.
* ``redundancy``: how closely the token repeats a token ranked ahead of it, the cosine
  similarity to its closest such token (non-maximum suppression in one pass, as "Fast NMS"):
  the ranking is the predictor's own score, so which of two near-duplicates survives is
  decided by content, and there is no fixed spatial split (ToMe's alternate split, the
  ``match`` prior, keeps a fixed half of the tokens while a stage keeps half or more).
* ``size``: how many input patches the token already stands for (merging), as ``log(size)``.

Every term is centred on the mean over the alive tokens of each image, so that adding it
leaves the image's mean logit (and so, at initialisation, the kept fraction) where it was.
All read their inputs without gradient: the predictor learns how much each signal weighs.
Dead tokens (``alive`` False: dropped earlier, or padding) neither contribute nor count; a
token's terms depend only on the alive tokens, so the masked path (dead tokens in place) and
the pruned path (dead tokens removed or padded) give the same values.

Shapes: ``B`` batch, ``N`` patch tokens, ``C`` channels.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["SIGNALS", "SIGNAL_INIT", "alive_mean", "centered", "attention_term", "size_term", "redundancy"]

#: the signals a predictor can read, in the order of its ``signal_weight`` entries
SIGNALS = ("attention", "redundancy", "size")
#: each signal's initial weight in the keep logit (redundancy enters with a minus sign)
SIGNAL_INIT = {"attention": 1.0, "redundancy": 4.0, "size": 1.0}


def alive_mean(values: torch.Tensor, alive: torch.Tensor) -> torch.Tensor:
    """``(B, 1)`` mean of ``values`` ``(B, N)`` over the alive tokens (bool ``(B, N)``)."""
    w = alive.to(values.dtype)
    return (values * w).sum(dim=1, keepdim=True) / w.sum(dim=1, keepdim=True).clamp_min(1.0)


def centered(values: torch.Tensor, alive: torch.Tensor) -> torch.Tensor:
    """``values`` minus their mean over the alive tokens; 0 on dead tokens."""
    return torch.where(alive, values - alive_mean(values, alive), torch.zeros_like(values))


def attention_term(attention: torch.Tensor, alive: torch.Tensor) -> torch.Tensor:
    """``log(N_alive * a)``, centred: the class token's attention ``a`` ``(B, N)`` (probabilities
    over the alive patch tokens, up to the prefix tokens' share) as a logit term."""
    count = alive.sum(dim=1, keepdim=True).clamp_min(1).to(torch.float32)
    share = attention.detach().float().clamp_min(1e-12) * count
    return centered(torch.log(share), alive)


def size_term(size: torch.Tensor | None, alive: torch.Tensor) -> torch.Tensor:
    """``log(size)``, centred (0 everywhere while every token is one patch)."""
    if size is None:
        return torch.zeros(alive.shape, device=alive.device)
    return centered(torch.log(size.detach().float().clamp_min(1e-6)), alive)


def redundancy(x: torch.Tensor, score: torch.Tensor, alive: torch.Tensor) -> torch.Tensor:
    """``(B, N)`` each token's highest cosine similarity to an alive token ranked ahead of it.

    Token ``j`` is ahead of token ``i`` when ``score[j] > score[i]``, or the scores are equal
    and ``j`` comes first (ties in patch order, which gathering preserves). The token ranked
    first, and a dead token, get -1 (nothing to repeat).

    Args:
        x: ``(B, N, C)`` patch tokens.
        score: ``(B, N)`` the ranking score (read without gradient).
        alive: ``(B, N)`` bool.
    """
    z = F.normalize(x.detach().float(), dim=-1)
    sim = z @ z.transpose(1, 2)  # (B, N, N): sim[b, i, j]
    s = score.detach().float()
    n = s.shape[1]
    order = torch.arange(n, device=s.device)
    earlier = order[None, :] < order[:, None]  # (N, N): j before i
    ahead = (s[:, None, :] > s[:, :, None]) | ((s[:, None, :] == s[:, :, None]) & earlier)
    ahead = ahead & alive[:, None, :]
    best = sim.masked_fill(~ahead, -1.0).amax(dim=-1)
    return best.masked_fill(~alive, -1.0)
