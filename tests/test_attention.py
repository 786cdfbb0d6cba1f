"""The fused masked attention against the explicit softmax it replaces, and against timm."""
from __future__ import annotations

import functools
import sys

import pytest
import torch
from safetensors.torch import load_file
from timm.layers import Attention
from timm.models.vision_transformer import Block

import dynvit.attention as attention
import dynvit.model
from conftest import CIFAR10, REPO, cifar_dir
from dynvit.attention import attention_forward, explicit_attention, masked_attention, masked_block
from dynvit.config import load_config

B, H, N, D = 3, 2, 13, 16


def inputs(seed: int = 0, soft: bool = False):
    """q, k, v (logits spread over tens, so a wrong mask shows), a keep mask whose first
    token (a prefix token) is always kept, and a key bias."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, N, D, generator=g) * 2 for _ in range(3))
    mask = torch.rand(B, N, generator=g) if soft else (torch.rand(B, N, generator=g) > 0.5).float()
    mask[:, 0] = 1.0
    bias = torch.randn(B, N, generator=g)
    grad_out = torch.randn(B, H, N, D, generator=g)
    return (q, k, v), mask, bias, grad_out


def run(fn, qkv, mask, bias, grad_out, dtype=torch.float32, **kw):
    """Output and gradients w.r.t. q, k, v, the mask and the bias, all float32. The loss
    reads kept queries only (weighted by the mask when it is soft): a dropped token's own
    output is dead."""
    q, k, v = (t.to(dtype).clone().requires_grad_() for t in qkv)
    m = None if mask is None else mask.clone().requires_grad_()
    b = None if bias is None else bias.clone().requires_grad_()
    out = fn(q, k, v, scale=D**-0.5, key_mask=m, key_bias=b, **kw)
    out = out[0] if isinstance(out, tuple) else out
    live = 1.0 if mask is None else mask[:, None, :, None]
    (out.float() * live * grad_out).sum().backward()
    grads = [t.grad.float() for t in (q, k, v)]
    if m is not None:  # kept and dropped keys apart: their gradients differ by orders of magnitude
        grads += [m.grad[mask > 0.5], m.grad[mask <= 0.5]]
    return [(out.float() * live).detach()] + grads + ([b.grad] if b is not None else [])


NAMES = ["out", "dq", "dk", "dv", "dmask_kept", "dmask_dropped", "dbias"]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative error of ``a`` against ``b``; exact equality is 0 (also for all-zero tensors)."""
    diff = float((a - b).detach().norm())
    return 0.0 if diff == 0 else diff / float(b.detach().norm())


@pytest.mark.parametrize("soft", [False, True], ids=["hard", "soft"])
@pytest.mark.parametrize("with_bias", [False, True], ids=["mask", "mask+bias"])
def test_fused_equals_explicit_in_float32(soft, with_bias):
    qkv, mask, bias, g = inputs(soft=soft)
    bias = bias if with_bias else None
    expected = run(explicit_attention, qkv, mask, bias, g)
    got = run(masked_attention, qkv, mask, bias, g)
    for name, a, b in zip(NAMES, got, expected):
        assert rel_err(a, b) < 1e-5, name


def test_key_bias_alone_carries_gradient():
    qkv, _, bias, g = inputs()
    expected = run(explicit_attention, qkv, None, bias, g)
    got = run(masked_attention, qkv, None, bias, g)
    for name, a, b in zip(["out", "dq", "dk", "dv", "dbias"], got, expected):
        assert rel_err(a, b) < 1e-5, name


@pytest.mark.parametrize("soft", [False, True], ids=["hard", "soft"])
def test_fused_is_as_close_to_float32_as_explicit_in_bfloat16(soft):
    qkv, mask, bias, g = inputs(soft=soft)
    truth = run(explicit_attention, qkv, mask, bias, g)
    old = run(explicit_attention, qkv, mask, bias, g, dtype=torch.bfloat16)
    new = run(masked_attention, qkv, mask, bias, g, dtype=torch.bfloat16)
    for name, o, n, t in zip(NAMES, old, new, truth):
        # bfloat16 keeps 8 bits: both paths are off by about 0.5%; a wrong formulation by far more.
        assert rel_err(n, t) < max(2 * rel_err(o, t), 0.02), name


def test_a_wrong_mask_gradient_would_be_caught():
    # The tolerances above separate the right mask gradient from plausible wrong ones: the
    # mask also on a token's own (always allowed) logit, or a -inf mask without the eps
    # compensation (no gradient for dropped keys).
    qkv, mask, bias, g = inputs()
    _, _, _, _, kept, dropped, _ = run(explicit_attention, qkv, mask, bias, g)
    q, k, v = (t.clone().requires_grad_() for t in qkv)
    m = mask.clone().requires_grad_()
    scores = (q * D**-0.5) @ k.transpose(-2, -1) + (bias + attention.mask_log_weight(m))[:, None, None, :]
    (scores.softmax(-1) @ v * mask[:, None, :, None] * g).sum().backward()
    assert rel_err(m.grad[mask > 0.5], kept) > 0.05
    assert dropped.norm() > 0.05 * kept.norm()


def test_fallback_without_the_cpu_kernel_is_equal(monkeypatch):
    # Where the custom CPU backward is unavailable, SDPA differentiates the bias itself.
    monkeypatch.setattr(attention, "_CPU_FLASH_BACKWARD", None)
    qkv, mask, bias, g = inputs()
    expected = run(explicit_attention, qkv, mask, bias, g)
    got = run(masked_attention, qkv, mask, bias, g)
    for name, a, b in zip(NAMES, got, expected):
        assert rel_err(a, b) < 1e-5, name


def test_no_kept_token_and_no_prefix_token_stays_finite():
    qkv, _, _, g = inputs()
    mask = torch.zeros(B, N)
    out = run(masked_attention, qkv, mask, None, torch.ones_like(g))
    assert all(torch.isfinite(t).all() for t in out)
    # With every key dropped, each token attends to itself alone (as the explicit path).
    q, k, v = qkv
    torch.testing.assert_close(masked_attention(q, k, v, scale=D**-0.5, key_mask=mask), v, atol=1e-5, rtol=0)


def block(**kw) -> Block:
    torch.manual_seed(0)
    blk = Block(32, num_heads=2, qkv_bias=True, **kw)
    with torch.no_grad():
        for p in blk.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return blk.eval()


OPTIONS = {
    "plain": {},
    "layerscale": {"init_values": 0.5},
    "qk_norm": {"qk_norm": True},
    "scale_norm": {"scale_attn_norm": True},
}


@pytest.mark.parametrize("option", OPTIONS)
def test_masked_block_equals_timm_on_the_kept_tokens(option):
    blk = block(**OPTIONS[option])
    x = torch.randn(2, 9, 32)
    keep = torch.tensor([[1, 1, 0, 1, 0, 0, 1, 1, 0], [1, 0, 1, 1, 1, 0, 0, 1, 1]], dtype=torch.float32)
    with torch.no_grad():
        out = masked_block(blk, x, keep)
        for b in range(2):
            idx = keep[b].nonzero().squeeze(1)
            torch.testing.assert_close(out[b, idx], blk(x[b : b + 1, idx])[0], atol=1e-5, rtol=1e-5)


def test_gated_attention_equals_timm():
    torch.manual_seed(0)
    attn = Attention(32, num_heads=2, gated=True, qkv_bias=True).eval()
    x = torch.randn(2, 9, 32)
    with torch.no_grad():
        torch.testing.assert_close(attention_forward(attn, x, key_mask=torch.ones(2, 9)).out, attn(x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("option", ["layerscale", "qk_norm"])
def test_masked_block_gradients_equal_the_explicit_path(option):
    blk = block(**OPTIONS[option]).train()
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(2, 9, 32, generator=g)
    mask0 = (torch.rand(2, 9, generator=g) > 0.4).float()
    mask0[:, 0] = 1
    size = torch.rand(2, 9, generator=g) + 1  # ToMe-like sizes
    results = []
    for explicit in (True, False):
        blk.zero_grad()
        x, mask, bias = x0.clone().requires_grad_(), mask0.clone().requires_grad_(), size.log().requires_grad_()
        out = masked_block(blk, x, mask, bias, explicit=explicit)
        (out * mask0[..., None]).square().sum().backward()
        kept = mask0 > 0
        results.append([out * mask0[..., None], x.grad, mask.grad[kept], mask.grad[~kept], bias.grad,
                        blk.attn.qkv.weight.grad.clone()])
    for name, a, b in zip(["out", "dx", "dmask_kept", "dmask_dropped", "dbias", "dW"], results[1], results[0]):
        assert rel_err(a, b) < 1e-5, name


def test_attention_dropout_is_applied_in_training_only():
    blk = block(attn_drop=0.5)
    x, keep = torch.randn(2, 9, 32), torch.ones(2, 9)
    with torch.no_grad():
        torch.testing.assert_close(masked_block(blk, x, keep), blk(x), atol=1e-5, rtol=0)
        blk.train()
        assert not torch.allclose(masked_block(blk, x, keep), masked_block(blk, x, keep))


def test_a_short_training_run_matches_the_explicit_path(monkeypatch, tmp_path):
    """A few steps of train.py (distillation, keep-ratio loss, AdamW) end at the same weights."""
    cifar_dir("train")
    sys.path.insert(0, str(REPO))
    from train import train

    def run_smoke(name):
        cfg = load_config(REPO / "configs" / "smoke.yaml", [
            "--data.path", str(CIFAR10), "--train.output_dir", str(tmp_path / name),
            "--train.epochs", "1", "--train.eval_modes", "[topk]", "--train.flops_images", "0",
            "--train.calibrate_images", "0"])  # no hold-out: the training images the tolerance below was set on
        train(cfg)
        return load_file(tmp_path / name / "final" / "model.safetensors")

    fused = run_smoke("fused")
    from dynvit.families import vit as vit_family

    explicit_block = functools.partial(masked_block, explicit=True)
    monkeypatch.setitem(vit_family._MASKED_BLOCKS, (Block, Attention), explicit_block)
    explicit = run_smoke("explicit")
    for key in fused:
        a, b = fused[key], explicit[key]
        if key.endswith("attn.qkv.bias"):
            # The key bias shifts every logit of a query alike: its true gradient is 0, so AdamW
            # turns rounding noise into full steps of +-lr. Compare the query and value parts.
            c = a.shape[0] // 3
            a, b = torch.cat([a[:c], a[2 * c :]]), torch.cat([b[:c], b[2 * c :]])
        # Per tensor, not per element: AdamW also magnifies noise in a few near-zero gradients.
        # A wrong mask gradient moves the predictors by about lr / |w| = 5e-2.
        assert rel_err(a, b) < 1e-5, key


def test_masked_block_under_bf16_autocast_follows_float32():
    blk = block(**OPTIONS["qk_norm"]).train()  # q/k-norm gives float32 q, k next to bfloat16 v
    g = torch.Generator().manual_seed(4)
    x0, mask0 = torch.randn(2, 9, 32, generator=g), torch.tensor([[1.0, 1, 0, 1, 0, 1, 1, 0, 1]] * 2)
    results = {}
    for name, explicit, dtype in (("truth", True, None), ("explicit", True, torch.bfloat16), ("fused", False, torch.bfloat16)):
        blk.zero_grad()
        mask = mask0.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype is not None):
            out = masked_block(blk, x0, mask, explicit=explicit)
        (out.float() * mask0[..., None]).square().sum().backward()
        results[name] = [out.float() * mask0[..., None], mask.grad, blk.attn.qkv.weight.grad.clone()]
    for i, what in enumerate(["out", "dmask", "dW"]):
        old, new = rel_err(results["explicit"][i], results["truth"][i]), rel_err(results["fused"][i], results["truth"][i])
        assert new < max(2 * old, 0.03), what
