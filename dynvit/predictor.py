"""The keep-logit predictor that sits before a pruning block."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["TokenPredictor"]


class TokenPredictor(nn.Module):
    """Scores each patch token from its own features and a summary of the kept tokens.

    As in DynamicViT: a LayerNorm + Linear + GELU embeds each token; half of the channels
    stay per-token (local), the other half is averaged over the currently kept tokens
    (global) and broadcast back; an MLP maps the concatenation to one keep logit per token.

    The MLP's first layer is applied in two halves, ``W_local @ local + (W_global @ global + b)``,
    which equals it on the concatenation; the global half is computed once per image instead
    of once per token, and nothing is concatenated. The parameters (and state-dict keys) are
    those of the plain MLP.

    Args:
        embed_dim: token width of the backbone.
        hidden_ratio: width of the embedding as a multiple of ``embed_dim``.
        init_keep_prob: keep probability the predictor outputs at initialisation (through
            the last bias), so fine-tuning starts near the target ratio, not at 0.5.
    """

    def __init__(self, embed_dim: int, *, hidden_ratio: float = 1.0, init_keep_prob: float = 0.5):
        super().__init__()
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

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Keep logits ``(B, N)`` for patch tokens ``x`` ``(B, N, C)``.

        ``mask`` ``(B, N)`` (0/1 or soft, may carry gradient) weights the global average;
        tokens with weight 0 (dropped or padding) do not contribute. ``None`` means all kept.
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
        return h.squeeze(-1)
