"""The keep-logit predictor: the split first layer equals DynamicViT's concatenation."""
from __future__ import annotations

import pytest
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


def match_predictor(seed: int = 0) -> TokenPredictor:
    torch.manual_seed(seed)
    return TokenPredictor(32, init_keep_prob=0.6, prior="match", match_scale=5.0)


def test_match_prior_ranks_duplicates_of_a_destination_last():
    """Alternate tokens are destinations (offset), the others get -scale * their best cosine
    similarity to a destination: a near-copy of a destination is the first to go."""
    pred = match_predictor()
    x = torch.randn(2, 8, 32)
    x[:, 2] = x[:, 5] + 0.01 * torch.randn(2, 32)  # candidate 2 nearly repeats destination 5
    prior = pred.match_prior(x).detach()
    z = torch.nn.functional.normalize(x, dim=-1)
    for b in range(2):
        for i in range(8):
            if i % 2:  # ranks 1, 3, 5, 7: destinations
                assert prior[b, i] == 10.0
            else:
                best = max(float(z[b, i] @ z[b, j]) for j in (1, 3, 5, 7))
                assert abs(float(prior[b, i]) + 5.0 * best) < 1e-5
        candidates = prior[b, ::2]
        assert int(candidates.argmin()) == 1, "the duplicate (token 2) should have the lowest keep logit"


def test_match_prior_splits_the_alive_tokens_as_if_gathered():
    """The masked path (dead tokens in place) and the pruned path (alive tokens gathered)
    must split the tokens the same way: by rank among the alive ones."""
    pred = match_predictor()
    x = torch.randn(1, 10, 32)
    mask = torch.tensor([[1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 1.0]])
    alive = mask[0] > 0
    torch.testing.assert_close(pred(x, mask)[0, alive], pred(x[:, alive])[0], atol=1e-6, rtol=1e-6)
    # Dead tokens are never destinations: changing them moves no alive token's logit.
    y = x.clone()
    y[:, ~alive] = torch.randn(1, int((~alive).sum()), 32)
    torch.testing.assert_close(pred(y, mask)[0, alive], pred(x, mask)[0, alive])


def test_match_prior_learns_its_scale_and_leaves_the_features_alone():
    pred = match_predictor()
    x = torch.randn(2, 8, 32, requires_grad=True)
    pred.match_prior(x).sum().backward()
    assert pred.match_scale.grad is not None and pred.match_scale.grad != 0
    assert x.grad is None, "the similarity is a matching: no gradient to the tokens through it"
    assert "match_scale" in pred.state_dict()
    assert "match_scale" not in predictor().state_dict()


def test_unknown_prior_is_named():
    with pytest.raises(ValueError, match="predictor prior must be one of .*'none', 'match'.*got 'tome'"):
        TokenPredictor(32, prior="tome")
