"""EViT, ToMe and random dropping: parity with timm, token counts, pure functions, gradients, FLOPs."""
from __future__ import annotations

import copy

import pytest
import timm
import torch
from fvcore.nn import FlopCountAnalysis
from fvcore.nn.jit_handles import get_shape

from dynvit.baselines import BASELINES, patch_evit, patch_random, patch_tome
from dynvit.baselines.evit import evit_block, fuse_inattentive
from dynvit.baselines.random_drop import keep_random
from dynvit.baselines.tome import bipartite_soft_matching, merge_tokens, merge_wavg, normalize_tome_r, tome_block
from dynvit.tokens import num_kept

DEPTH = 6
CONFIGS = {
    "cls": ("vit_tiny_patch16_224", {}),
    "distilled": ("deit_tiny_distilled_patch16_224", {}),
    "registers": ("vit_tiny_patch16_224", {"reg_tokens": 4}),
    "layerscale_qknorm": ("vit_tiny_patch16_224", {"init_values": 0.1, "qk_norm": True}),
    "avg": ("vit_tiny_patch16_224", {"global_pool": "avg"}),
    "avg_no_cls": ("vit_tiny_patch16_224", {"global_pool": "avg", "class_token": False, "fc_norm": False}),
}
# Keep-everything settings: each must be the dense model.
IDENTITY = {
    "evit": {"prune_loc": (1, 3), "keep_ratio": 1.0},
    "tome": {"r": 0},
    "random": {"prune_loc": (1, 3), "keep_ratio": 1.0},
}
REDUCED = {
    "evit": {"prune_loc": (1, 3, 4), "keep_ratio": 0.7},
    "tome": {"r": 4},
    "random": {"prune_loc": (1, 3, 4), "keep_ratio": 0.7},
}


pytestmark = pytest.mark.usefixtures("one_thread")


def make_model(config: str, img_size: int = 64) -> torch.nn.Module:
    name, kwargs = CONFIGS[config]
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, img_size=img_size, num_classes=10, depth=DEPTH, **kwargs)


def images(img_size: int = 64, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, img_size, img_size, generator=torch.Generator().manual_seed(1))


def supported(method: str, config: str) -> bool:
    return not (method == "evit" and config == "avg_no_cls")


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("method", BASELINES)
def test_keep_everything_equals_timm(method, config):
    if not supported(method, config):
        pytest.skip("EViT needs a class token")
    dense = make_model(config).eval()
    x = images()
    with torch.no_grad():
        expected = dense(x)
        # A reduced model must differ, or the parity check proves nothing.
        reduced = BASELINES[method](copy.deepcopy(dense), **REDUCED[method])(x)
        got = BASELINES[method](copy.deepcopy(dense), **IDENTITY[method])(x)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(reduced, expected, atol=1e-4)


def count_tokens(model: torch.nn.Module, x: torch.Tensor) -> tuple[list[int], list[int]]:
    """Tokens seen by each block's attention (norm1) and MLP (norm2)."""
    attn, mlp = [], []
    hooks = []
    for block in model.blocks:
        hooks.append(block.norm1.register_forward_pre_hook(lambda m, a: attn.append(a[0].shape[1])))
        hooks.append(block.norm2.register_forward_pre_hook(lambda m, a: mlp.append(a[0].shape[1])))
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return attn, mlp


@pytest.mark.parametrize("config", ["cls", "registers"])
def test_token_counts(config):
    img = 96  # 36 patch tokens
    x = images(img)
    p = make_model(config, img).num_prefix_tokens
    k = [num_kept(0.7 ** (s + 1), 36) for s in range(3)]
    assert k == [25, 18, 12]

    attn, mlp = count_tokens(patch_evit(make_model(config, img), prune_loc=(1, 3, 4), keep_ratio=0.7).eval(), x)
    # Blocks 1, 3, 4 reduce after their attention; the fused token comes on top of k.
    assert attn == [p + 36, p + 36, p + k[0] + 1, p + k[0] + 1, p + k[1] + 1, p + k[2] + 1]
    assert mlp == [p + 36, p + k[0] + 1, p + k[0] + 1, p + k[1] + 1, p + k[2] + 1, p + k[2] + 1]

    attn, mlp = count_tokens(patch_random(make_model(config, img), prune_loc=(1, 3, 4), keep_ratio=0.7).eval(), x)
    assert attn == mlp == [p + 36, p + k[0], p + k[0], p + k[1], p + k[2], p + k[2]]

    attn, mlp = count_tokens(patch_tome(make_model(config, img), r=[0, 8, 8, 8, 8, 8]).eval(), x)
    # Each block merges min(r, N // 2) patch tokens between its attention and its MLP.
    merged = [p + n for n in (36, 28, 20, 12, 6, 3)]
    assert (attn, mlp) == ([p + 36] + merged[:-1], merged)


def test_bipartite_matching_merges_most_similar_pairs():
    # A = positions 0, 2, 4; B = 1, 3, 5. A0 is a copy of B2 (position 5), A2 of B0 (position 1).
    g = torch.Generator().manual_seed(0)
    metric = torch.randn(1, 6, 8, generator=g)
    metric[0, 0] = metric[0, 5]
    metric[0, 4] = 2 * metric[0, 1]  # cosine similarity ignores the norm
    m = bipartite_soft_matching(metric, 2)
    assert sorted(zip(m.src[0].tolist(), m.dst[0].tolist())) == [(0, 2), (2, 0)]
    assert m.unmerged[0].tolist() == [1]
    with pytest.raises(ValueError, match="r must be in"):
        bipartite_soft_matching(metric, 4)


@pytest.mark.parametrize("n,r", [(16, 5), (15, 7), (9, 1), (8, 0)])
def test_merge_preserves_size_weighted_sum(n, r):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(3, n, 5, generator=g, dtype=torch.float64)
    size = torch.randint(1, 4, (3, n), generator=g).double()
    m = bipartite_soft_matching(torch.randn(3, n, 4, generator=g), r)
    merged, new_size = merge_wavg(x, size, m)
    assert merged.shape == (3, n - r, 5) and new_size.shape == (3, n - r)
    torch.testing.assert_close(new_size.sum(1), size.sum(1))
    torch.testing.assert_close((merged * new_size[..., None]).sum(1), (x * size[..., None]).sum(1))
    # Every merged token is a convex combination: its size is at least 1 and the sizes add up.
    assert (new_size >= 1).all()


def test_merge_tokens_leaves_prefix_untouched():
    g = torch.Generator().manual_seed(0)
    p, n = 3, 12
    x = torch.randn(2, p + n, 6, generator=g)
    x[:, p:] = x[:, :1]  # patches identical to the class token: the most tempting merge
    size = torch.ones(2, n)
    metric = torch.randn(2, n, 4, generator=g)
    out, new_size = merge_tokens(x, size, metric, 6, p)
    assert out.shape == (2, p + n - 6, 6)
    assert torch.equal(out[:, :p], x[:, :p])
    assert new_size.sum().item() == 2 * n


def test_proportional_attention_makes_merging_duplicates_lossless():
    # Patch tokens come in identical pairs (A_i == B_i): merging each pair into one token of
    # size 2 and adding log(2) to its attention logit must leave every output unchanged.
    blocks = make_model("layerscale_qknorm").blocks.eval()
    p, pairs = 2, 5
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, p + pairs, 192, generator=g)
    x = torch.cat([x[:, :p], x[:, p:].repeat_interleave(2, dim=1)], dim=1)
    with torch.no_grad():
        dense = blocks[1](blocks[0](x))
        merged, size = tome_block(blocks[0], x, None, pairs, p)
        merged, size = tome_block(blocks[1], merged, size, 0, p)
    assert merged.shape[1] == p + pairs and torch.equal(size, torch.full((1, pairs), 2.0))
    torch.testing.assert_close(merged[:, :p], dense[:, :p], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(merged[:, p:], dense[:, p + 1 :: 2], atol=1e-5, rtol=1e-5)


def test_tome_merging_duplicate_patches_equals_dense():
    # Without position embeddings, equal image patches give equal tokens. Make columns 0 and 1
    # of the 4 x 4 patch grid equal: block 0 merges those 4 pairs (A positions 0, 4, 8, 12 into
    # B positions 1, 5, 9, 13), and with proportional attention and size-weighted average
    # pooling the logits must be exactly the dense model's.
    dense = make_model("avg").eval()
    with torch.no_grad():
        dense.pos_embed.zero_()
    x = images()
    x[..., 16:32] = x[..., :16]
    tome = patch_tome(copy.deepcopy(dense), r=[4, 0, 0, 0, 0, 0])
    with torch.no_grad():
        _, size = tome.forward_tokens(x)
        expected, got = dense(x), tome(x)
    assert size.shape == (2, 12) and (size == 2).sum().item() == 2 * 4
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_evit_block_equals_dense_block_on_kept_tokens():
    # Attention arranged so that every query's logit for key j is 2 * x_j[1]: the prefix tokens
    # get x[1] = -20, the least attended of all, and must still be kept.
    block = copy.deepcopy(make_model("registers").blocks[0]).eval()
    block.norm1 = torch.nn.Identity()
    C, H = 192, block.attn.num_heads
    D = C // H
    with torch.no_grad():
        block.attn.qkv.weight[: 2 * C] = 0
        block.attn.qkv.bias[: 2 * C] = 0
        for h in range(H):
            block.attn.qkv.weight[h * D, 0] = 1.0  # q = x[0] = 1
            block.attn.qkv.weight[C + h * D, 1] = 2.0 * D**0.5  # k = 2 * sqrt(D) * x[1]
    p, n, k = 5, 12, 4
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, p + n, C, generator=g)
    x[..., 0] = 1.0
    x[:, :p, 1] = -20.0
    with torch.no_grad():
        dense = block(x)
        out = evit_block(block, x, k, p)
    keep = x[:, p:, 1].argsort(dim=1, descending=True)[:, :k].sort(dim=1).values + p
    assert out.shape == (2, p + k + 1, C)
    torch.testing.assert_close(out[:, :p], dense[:, :p])
    torch.testing.assert_close(out[:, p : p + k], torch.stack([dense[b, keep[b]] for b in range(2)]))


def test_evit_fused_token_is_attention_weighted_average():
    g = torch.Generator().manual_seed(0)
    patches = torch.randn(2, 7, 4, generator=g, dtype=torch.float64)
    attn = torch.rand(2, 7, generator=g, dtype=torch.float64)
    out = fuse_inattentive(patches, attn, 3)
    assert out.shape == (2, 4, 4)
    for b in range(2):
        order = attn[b].argsort(descending=True)
        keep, drop = order[:3].sort().values, order[3:]
        torch.testing.assert_close(out[b, :3], patches[b, keep])
        w = attn[b, drop]
        torch.testing.assert_close(out[b, 3], (w[:, None] * patches[b, drop]).sum(0) / w.sum())


def test_random_keep_is_a_uniform_subset_and_reproducible():
    x = torch.arange(2 * 11).float().view(1, 22, 1).expand(4000, -1, -1)
    out = keep_random(x, 5, 2, torch.Generator().manual_seed(0))
    assert torch.equal(out[:, :2], x[:, :2])
    kept = out[:, 2:, 0]
    assert (kept.diff(dim=1) > 0).all()  # distinct, in order
    freq = torch.stack([(kept == v).any(1).float().mean() for v in x[0, 2:, 0]])
    assert (freq - 5 / 20).abs().max() < 0.04  # each token kept with probability k / N

    model = patch_random(make_model("cls"), prune_loc=(1, 3), keep_ratio=0.5, seed=3).eval()
    x = images()
    with torch.no_grad():
        a, b = model(x), model(x)
        model.random_seed = 4
        c = model(x)
    assert torch.equal(a, b) and not torch.allclose(a, c)


@pytest.mark.parametrize("config", ["cls", "distilled", "registers", "layerscale_qknorm", "avg_no_cls"])
@pytest.mark.parametrize("method", BASELINES)
def test_gradients_reach_every_parameter(method, config):
    if not supported(method, config):
        pytest.skip("EViT needs a class token")
    model = BASELINES[method](make_model(config), **REDUCED[method]).train()
    model(images()).square().sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, f"no gradient for {missing}"


def sdpa_flops(inputs, outputs) -> int:
    q, k, v = (get_shape(t) for t in inputs[:3])
    return int(torch.tensor(q[:-1]).prod()) * k[-2] * (q[-1] + v[-1])


def flops(model: torch.nn.Module, x: torch.Tensor) -> int:
    analysis = FlopCountAnalysis(model, x)
    analysis.set_op_handle("aten::scaled_dot_product_attention", sdpa_flops)  # timm's fused attention
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    return analysis.total()


@pytest.mark.parametrize("method", BASELINES)
def test_patched_models_trace_with_fewer_flops(method):
    dense = make_model("registers").eval()
    x = images(batch=1)
    dense_flops = flops(dense, x)
    assert flops(BASELINES[method](copy.deepcopy(dense), **IDENTITY[method]), x) == pytest.approx(dense_flops, rel=0.02)
    assert flops(BASELINES[method](copy.deepcopy(dense), **REDUCED[method]), x) < 0.8 * dense_flops


def test_patch_refuses_what_it_cannot_do():
    model = patch_tome(make_model("cls"), r=2)
    with pytest.raises(RuntimeError, match="already patched"):
        patch_evit(model)
    with pytest.raises(NotImplementedError, match="class token"):
        patch_evit(make_model("avg_no_cls"), prune_loc=(1,))
    with pytest.raises(NotImplementedError, match="global_pool"):
        patch_random(timm.create_model("vit_tiny_patch16_224", img_size=64, depth=2, global_pool="max"), prune_loc=(1,))
    with pytest.raises(ValueError, match="prune_loc"):
        patch_evit(make_model("cls"), prune_loc=(3, 9))
    with pytest.raises(ValueError, match="6 blocks"):
        normalize_tome_r([1, 2], DEPTH)
    assert normalize_tome_r(3, 2) == (3, 3)


def test_settings_are_stored_on_the_model():
    evit = patch_evit(make_model("cls"), prune_loc=(1, 3), keep_ratio=0.5)
    tome = patch_tome(make_model("cls"), r=2)
    rand = patch_random(make_model("cls"), prune_loc=2, keep_ratio=[0.6], seed=7)
    assert (evit.token_reduction, evit.prune_loc, evit.keep_ratio) == ("evit", (1, 3), (0.5, 0.25))
    assert (tome.token_reduction, tome.tome_r) == ("tome", (2,) * DEPTH)
    assert (rand.token_reduction, rand.prune_loc, rand.keep_ratio, rand.random_seed) == ("random", (2,), (0.6,), 7)
    assert type(evit) is type(patch_evit(make_model("cls"), prune_loc=1))  # one subclass per base class
    assert isinstance(evit, timm.models.VisionTransformer)
