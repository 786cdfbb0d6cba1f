"""Training that really drops tokens after the first block of each stage."""
from __future__ import annotations

import copy

import pytest
import torch

import dynvit
from conftest import make_decisive_, make_timm

PRUNE_LOC = (1, 3, 4)


def patched(family: str = "deit_tiny", dropped_tokens: str = "discard") -> torch.nn.Module:
    model = dynvit.patch(copy.deepcopy(make_timm(family)), prune_loc=PRUNE_LOC, keep_ratio=0.6,
                         dropped_tokens=dropped_tokens).eval()
    return make_decisive_(model)


@pytest.mark.parametrize("family", ["deit_tiny", "registers", "avg_pool"])
@pytest.mark.parametrize("dropped_tokens", ["discard", "merge"])
def test_same_decisions_give_the_masked_paths_outputs(family, dropped_tokens, images):
    model = patched(family, dropped_tokens)
    with torch.no_grad():
        pruned = model.forward_pruned(images, "threshold")  # different counts per image: padding
        masks = [m.float() for m in pruned.keep_masks]
        masked = model.forward_train(images, masks=masks)
        dropped = model.forward_train(images, masks=masks, drop=True)
    torch.testing.assert_close(dropped.logits, masked.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dropped.logits, pruned.logits, atol=1e-5, rtol=1e-5)
    for a, b in zip(dropped.keep_masks, masked.keep_masks):
        assert torch.equal(a, b)
    kept = masked.token_mask > 0.5
    p = model.num_prefix_tokens
    torch.testing.assert_close(dropped.tokens[:, p:][kept], masked.tokens[:, p:][kept], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dropped.tokens[:, :p], masked.tokens[:, :p], atol=1e-5, rtol=1e-5)
    assert torch.equal(dropped.token_mask, masked.token_mask)


@pytest.mark.parametrize("dropped_tokens", ["discard", "merge"])
def test_same_decisions_give_the_masked_paths_backbone_gradients(dropped_tokens, images):
    model = patched(dropped_tokens=dropped_tokens).train()
    with torch.no_grad():
        masks = [m.float() for m in model.forward_pruned(images, "threshold").keep_masks]
    grads = []
    for drop in (False, True):
        model.zero_grad()
        out = model.forward_train(images, masks=masks, drop=drop)
        (out.logits.logsumexp(-1).sum() + (out.tokens[:, 1:] * out.token_mask[..., None]).square().mean()).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-5, rtol=1e-4, msg=name)


def test_training_model_option_trains_every_parameter(images):
    model = patched("registers").train()
    out = dynvit.TrainingModel(model, drop_tokens=True)(images, tau=0.5)
    assert out.tokens.shape == (4, model.num_prefix_tokens + 16, model.embed_dim)
    loss = out.logits.logsumexp(-1).mean() + sum(m.mean() for m in out.keep_masks) + out.tokens.pow(2).mean()
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_an_image_that_drops_every_token_still_runs(images):
    model = patched("avg_pool").train()  # no prefix token: nothing else would be left
    masks = [torch.zeros(4, 16)] * len(PRUNE_LOC)
    out = model.forward_train(images, masks=masks, drop=True)
    assert torch.isfinite(out.logits).all()


def test_sampled_decisions_match_between_the_paths(images):
    """Sampling with noise scale 0 (threshold decisions): dropping changes nothing the loss sees."""
    model = patched("registers", "merge").train()
    a = model.forward_train(images, noise_scale=0.0)
    b = model.forward_train(images, noise_scale=0.0, drop=True)
    for x, y in zip(a.keep_masks + a.keep_logits, b.keep_masks + b.keep_logits):
        alive = torch.isfinite(y)
        torch.testing.assert_close(x[alive], y[alive], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a.logits, b.logits, atol=1e-5, rtol=1e-5)
