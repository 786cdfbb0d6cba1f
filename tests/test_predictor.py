"""The keep-logit predictor: the split first layer equals DynamicViT's concatenation."""
from __future__ import annotations

import torch

from dynvit.predictor import TokenPredictor


def concatenated(pred: TokenPredictor, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """DynamicViT's form: local and (masked) mean global features concatenated per token."""
    h = pred.in_proj(x)
    local, glob = h[..., : pred.local_dim], h[..., pred.local_dim :]
    w = torch.ones(x.shape[:2]) if mask is None else mask
    glob = (glob * w[..., None]).sum(1, keepdim=True) / w.sum(1, keepdim=True)[..., None].clamp_min(1e-6)
    return pred.out_mlp(torch.cat([local, glob.expand_as(local)], dim=-1)).squeeze(-1)


def predictor(seed: int = 0) -> TokenPredictor:
    torch.manual_seed(seed)
    pred = TokenPredictor(32, init_keep_prob=0.7)
    with torch.no_grad():
        for p in pred.parameters():
            p.add_(torch.randn_like(p) * 0.2)  # so that every weight column matters
    return pred


def test_split_first_layer_equals_the_concatenation():
    pred = predictor()
    x = torch.randn(3, 10, 32)
    mask = (torch.rand(3, 10) > 0.5).float()
    soft = torch.rand(3, 10, requires_grad=True)
    for m in (None, mask, soft):
        torch.testing.assert_close(pred(x, m), concatenated(pred, x, m), atol=1e-6, rtol=1e-5)
    # Gradients reach the same places with the same values, the soft mask's included.
    pred(x, soft).sum().backward()
    got = [p.grad.clone() for p in pred.parameters()] + [soft.grad.clone()]
    pred.zero_grad()
    soft.grad = None
    concatenated(pred, x, soft).sum().backward()
    for a, b in zip(got, [p.grad for p in pred.parameters()] + [soft.grad]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_state_dict_keys_are_dynamicvits():
    # Checkpoints written before the split still load.
    keys = set(predictor().state_dict())
    assert keys == {"in_proj.0.weight", "in_proj.0.bias", "in_proj.1.weight", "in_proj.1.bias",
                    *(f"out_mlp.{i}.{p}" for i in (0, 2, 4) for p in ("weight", "bias"))}


def test_dropped_tokens_do_not_move_the_global_feature():
    pred = predictor()
    x = torch.randn(1, 6, 32)
    mask = torch.tensor([[1.0, 1.0, 0.0, 1.0, 0.0, 0.0]])
    y = x.clone()
    y[:, mask[0] == 0] = torch.randn(1, 3, 32) * 10
    torch.testing.assert_close(pred(x, mask)[mask > 0], pred(y, mask)[mask > 0])
