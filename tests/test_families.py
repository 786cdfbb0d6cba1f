"""The timm families beyond the plain ViT: RoPE ViTs and the rest of timm's ``Eva`` class,
attention pooling, parallel and differential-attention blocks, post-norm blocks, hybrid CNN
stems. The same properties as tests/test_model.py, on a small member of each."""
from __future__ import annotations

import copy
import functools

import pytest
import timm
import torch

import dynvit
from conftest import make_decisive_, randomize_

pytestmark = pytest.mark.usefixtures("one_thread")

PRUNE_LOC = (1, 3)
SMALL = dict(embed_dim=64, depth=4, num_heads=2, num_classes=5)
# family: (timm name, kwargs, image size); each image has 16 patch tokens.
FAMILIES = {
    "rope": ("vit_small_patch16_rope_224", {}, 64),  # AttentionRope, cat RoPE, class token
    "rope_mixed": ("vit_small_patch16_rope_mixed_224", {}, 64),  # learned per-block, per-head RoPE
    "rope_reg_gap": ("vit_betwixt_patch16_rope_reg4_gap_256", {}, 64),  # EvaAttention, registers, avg pool
    "eva02": ("eva02_tiny_patch14_224", {}, 56),  # SwiGLU with norm, q/v bias, no k bias
    "dinov3": ("vit_small_patch16_dinov3", {}, 64),  # DINOv3 RoPE, registers, LayerScale
    "sapiens2_gqa": ("vit_base_patch16_sapiens2", {"num_heads": 4, "num_kv_heads": (4, 2, 2, 4)}, 64),  # grouped-query
    "eva_post_norm": ("eva02_enormous_patch14_clip_224", {"use_rot_pos_emb": True}, 56),  # EvaBlockPostNorm
    "pe_map": ("vit_pe_core_tiny_patch16_384", {}, 64),  # Eva with attention pooling over all tokens
    "siglip_map": ("vit_base_patch16_siglip_224", {}, 64),  # ViT attention pooling
    "parallel_scaling": ("vit_base_patch16_xp_224", {}, 64),  # ParallelScalingBlock
    "parallel_things": ("vit_small_patch16_18x2_224", {}, 64),  # ParallelThingsBlock
    "diff_parallel": ("vit_dpwee_patch16_reg1_gap_256", {}, 64),  # DiffParallelScalingBlock
    "diff_attention": ("vit_dwee_patch16_reg1_gap_256", {}, 64),  # Block with DiffAttention
    "res_post": ("vit_base_patch16_rpn_224", {}, 64),  # ResPostBlock
    "hybrid": ("vit_tiny_r_s16_p8_224", {}, 128),  # ResNet stem + 8x8 patches of its features
}


def timm_kwargs(family: str) -> dict:
    _, kwargs, size = FAMILIES[family]
    return {**SMALL, "img_size": size, **kwargs}


@functools.cache
def _models(family: str):
    name, _, size = FAMILIES[family]
    dense = randomize_(timm.create_model(name, pretrained=False, **timm_kwargs(family))).eval()
    model = dynvit.patch(copy.deepcopy(dense), prune_loc=PRUNE_LOC, keep_ratio=0.6).eval()
    make_decisive_(model, image_size=size)
    return dense, model


def models(family: str):
    """The dense timm model and a patched copy whose predictors keep about half the tokens with
    logits of order 1 (so threshold decisions differ between images); fresh copies."""
    return tuple(copy.deepcopy(m) for m in _models(family))


def images(family: str, n: int = 4) -> torch.Tensor:
    size = FAMILIES[family][2]
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("family", ["rope", "pe_map", "parallel_scaling"])
def test_regrouped_threshold_batch_equals_whole_batch(family, monkeypatch):
    from test_model import assert_regrouping_changes_nothing
    _, model = models(family)
    model.dropped_tokens = "merge"
    assert_regrouping_changes_nothing(model, images(family, 16), monkeypatch)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_parity_with_timm_at_keep_ratio_one(family):
    dense, model = models(family)
    x = images(family)
    model.keep_ratio = 1.0
    ones = [torch.ones(len(x), 16)] * len(PRUNE_LOC)
    with torch.no_grad():
        expected = dense(x)
        model.prune_mode = "none"
        torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=0)
        for dropped in ("discard", "merge"):
            model.dropped_tokens = dropped
            torch.testing.assert_close(model.forward_pruned(x, "topk").logits, expected, atol=1e-5, rtol=0)
            torch.testing.assert_close(model.forward_train(x, masks=ones).logits, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_masked_path_equals_pruned_path(family):
    _, model = models(family)
    x = images(family)
    for mode in ("topk", "threshold"):
        for dropped in ("discard", "merge"):
            model.dropped_tokens = dropped
            with torch.no_grad():
                pruned = model.forward_pruned(x, mode)
                masked = model.forward_train(x, masks=[m.float() for m in pruned.keep_masks])
            kept = torch.stack([m.sum(1) for m in pruned.keep_masks])
            assert (kept[-1] < 16).all() and (kept[1:] <= kept[:-1]).all()
            torch.testing.assert_close(masked.logits, pruned.logits, atol=1e-5, rtol=1e-5, msg=f"{mode}, {dropped}")


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_threshold_batch_equals_single_images(family):
    _, model = models(family)
    x = images(family)
    for dropped in ("discard", "merge"):
        model.dropped_tokens = dropped
        with torch.no_grad():
            batch = model.forward_pruned(x, "threshold")
            counts = torch.stack([m.sum(1) for m in batch.keep_masks])
            assert (counts != counts[:, :1]).any(), "test needs images with different kept counts"
            for i in range(len(x)):
                single = model.forward_pruned(x[i : i + 1], "threshold")
                torch.testing.assert_close(batch.logits[i : i + 1], single.logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_parameter_gets_a_gradient(family):
    _, model = models(family)
    model.train()
    model.dropped_tokens = "merge" if family in ("rope", "pe_map", "siglip_map") else "discard"
    out = dynvit.TrainingModel(model)(images(family), tau=0.5)
    loss = out.logits.logsumexp(-1).mean() + sum(m.mean() for m in out.keep_masks) + out.tokens.pow(2).mean()
    loss.backward()
    # Differential attention's lambda_q2/k2 only enter as exp(q2 . k2), which has a gradient;
    # the k bias of EVA attention is a buffer. So every parameter must get one.
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient for {name}"


def test_kept_tokens_carry_their_rotary_angles():
    """The gathered table holds, for each image and kept slot, the row of the token's original
    position (per block and head for mixed RoPE)."""
    for family in ("rope", "rope_mixed"):
        _, model = models(family)
        with torch.no_grad():
            _, rope = model._embed(images(family, 2))
        position = torch.tensor([[0, 3, 5, 15], [2, 3, 9, 10]])
        gathered = model._gather_rope(rope, position)
        for b in range(2):
            for k in range(4):
                if model.rope_mixed:  # (depth, H, N, 2D) -> (depth, B, H, K, 2D)
                    assert torch.equal(gathered[:, b, :, k], rope[:, :, position[b, k]])
                else:  # (N, 2D) -> (B, 1, K, 2D)
                    assert torch.equal(gathered[b, 0, k], rope[position[b, k]])


@pytest.mark.parametrize("family", ["rope", "rope_mixed", "pe_map", "siglip_map", "parallel_scaling", "hybrid"])
def test_gmacs_fall_with_the_keep_ratio(family):
    _, model = models(family)
    size = FAMILIES[family][2]
    flops = []
    for ratio in (1.0, 0.7, 0.4):
        model.keep_ratio = ratio
        flops.append(dynvit.count_flops(model, (3, size, size), mode="topk"))
    dense = dynvit.count_flops(model, (3, size, size), mode="none")
    assert flops[0] > flops[1] > flops[2] and dense > flops[2]
    assert dynvit.count_flops(model, images=images(family), mode="threshold") < dense


@pytest.mark.parametrize("family", ["rope", "rope_mixed", "dinov3", "pe_map", "siglip_map", "parallel_scaling", "hybrid"])
def test_save_load_round_trip(family, tmp_path):
    name, _, size = FAMILIES[family]
    model = dynvit.build_model(name, prune_loc=PRUNE_LOC, keep_ratio=0.6, dropped_tokens="merge", **timm_kwargs(family))
    randomize_(model).eval()
    make_decisive_(model, image_size=size)
    dynvit.save_pretrained(model, tmp_path / "ckpt")
    loaded = dynvit.load_pretrained(tmp_path / "ckpt")
    assert loaded.dynvit_config() == model.dynvit_config()
    assert loaded.pretrained_cfg["input_size"] == (3, size, size)
    mine, theirs = model.state_dict(), loaded.state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    x = images(family)
    with torch.no_grad():
        for mode in ("topk", "threshold"):
            assert torch.equal(loaded.forward_pruned(x, mode).logits, model.forward_pruned(x, mode).logits)


def test_hybrid_stem_checks_the_image_channels():
    _, model = models("hybrid")
    with torch.no_grad():
        assert model(images("hybrid", 1)).shape == (1, 5)
    with pytest.raises(ValueError, match="expected 3 input channels, got 1"):
        model(torch.randn(1, 1, 128, 128))
    with pytest.raises(ValueError, match="does not match the model's 128x128"):
        model(torch.randn(1, 3, 96, 96))


def test_what_is_still_refused_is_named():
    small = dict(embed_dim=64, depth=4, num_heads=2, img_size=64)
    cases = [
        ("vit_small_patch16_rope_224", {"patch_drop_rate": 0.5}, "PatchDropout"),
        ("vit_small_patch16_rope_224", {"global_pool": "max"}, "global_pool='max'"),
        ("vit_small_patch16_rope_224", {"global_pool": ""}, "global_pool=''"),
        ("vit_tiny_patch16_224", {"global_pool": "prr"}, "global_pool='prr'"),
        ("vit_relpos_small_patch16_224", {}, "got VisionTransformerRelPos"),
    ]
    for name, kwargs, match in cases:
        with pytest.raises(NotImplementedError, match=match):
            dynvit.patch(timm.create_model(name, **{**small, **kwargs}), prune_loc=(1,))


# ---- ONNX export of a RoPE ViT -------------------------------------------------------------
@pytest.fixture(scope="module")
def rope_exports(tmp_path_factory):
    pytest.importorskip("onnxruntime")
    model = copy.deepcopy(_models("rope")[1])
    out = tmp_path_factory.mktemp("rope_onnx")
    x = images("rope", 8)
    results = {mode: dynvit.export_model(model, out / f"{mode}.onnx", mode=mode, inputs=x[:4]) for mode in ("topk", "threshold")}
    return model, x, results


@pytest.mark.parametrize("mode", ["topk", "threshold"])
def test_onnx_export_of_a_rope_vit_matches_pytorch(rope_exports, mode):
    import onnxruntime as ort
    from test_export import qkv_token_counts

    model, x, results = rope_exports
    path = str(results[mode].path)
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    batches = [x[:1], x[:3], x] + ([] if mode == "topk" else list(x.split(1)))  # threshold: padded batches too
    kept = set()
    with torch.no_grad():
        for b in batches:
            out = model.forward_pruned(b, mode)
            got = torch.from_numpy(session.run(None, {"images": b.numpy()})[0])
            torch.testing.assert_close(got, out.logits, atol=1e-4, rtol=0)
            kept.add(tuple(int(m[0].sum()) for m in out.keep_masks))
    if mode == "threshold":
        assert len(kept) > 1, "test needs images with different kept counts"
    # The graph really runs the kept tokens: blocks 0..3, stages before blocks 1 and 3.
    k1, k2 = (int(m.sum()) for m in model.forward_pruned(x[:1], mode).keep_masks)
    if mode == "threshold":
        k1, k2 = max(k1, 2), max(k2, 2)  # a graph of any batch size pads a lone kept token to two slots
    assert qkv_token_counts(path, x[:1], model.embed_dim) == [17, 1 + k1, 1 + k1, 1 + k2]


def test_masked_softmax_is_the_softmax_over_kept_keys():
    from dynvit.families.masked import masked_softmax

    g = torch.Generator().manual_seed(0)
    scores = torch.randn(2, 3, 5, 5, generator=g)
    mask = torch.tensor([[1.0, 0, 1, 1, 0], [0, 1, 1, 0, 1]])
    probs = masked_softmax(scores, mask)
    kept = mask.bool()[:, None, None, :]
    for b in range(2):
        for i in range(5):
            allowed = kept[b, 0, 0].clone()
            allowed[i] = True  # a token always attends to itself
            expected = torch.zeros(3, 5)
            expected[:, allowed] = scores[b, :, i, allowed].softmax(-1)
            torch.testing.assert_close(probs[b, :, i], expected)
    # A latent query (attention pooling) with token sizes as weights: softmax(s + log w).
    sizes = torch.tensor([[2.0, 0, 1, 3, 0], [1, 1, 4, 0, 1]])
    pooled = masked_softmax(scores[:, :, :1], sizes, self_attention=False)
    torch.testing.assert_close(pooled, (scores[:, :, :1] + sizes.log()[:, None, None, :]).softmax(-1))


@pytest.mark.parametrize("family", ["rope", "rope_mixed", "dinov3", "pe_map", "siglip_map", "parallel_scaling"])
def test_training_that_drops_tokens_equals_the_masked_path(family):
    """forward_train(drop=True) gathers kept tokens (and their rotary angles) after each stage's
    first block: the same outputs as the masked path for the same decisions."""
    _, model = models(family)
    model.dropped_tokens = "merge"
    x = images(family)
    with torch.no_grad():
        masks = [m.float() for m in model.forward_pruned(x, "threshold").keep_masks]
        masked = model.forward_train(x, masks=masks)
        dropped = model.forward_train(x, masks=masks, drop=True)
    torch.testing.assert_close(dropped.logits, masked.logits, atol=1e-5, rtol=1e-5)
