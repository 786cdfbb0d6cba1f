"""Properties of the patched model: parity with timm, masked == pruned, gradients, errors."""
from __future__ import annotations

import copy

import pytest
import timm
import torch

import dynvit
from conftest import FAMILIES, make_decisive_, make_timm

PRUNE_LOC = (1, 3, 4)


def patched(family: str, keep_ratio=0.6, **kw):
    """A dense model and a patched copy whose predictors keep about half the tokens with
    logits of order 1, so threshold decisions differ between images."""
    dense = make_timm(family)
    model = dynvit.patch(copy.deepcopy(dense), prune_loc=PRUNE_LOC, keep_ratio=keep_ratio, **kw).eval()
    make_decisive_(model)
    return dense, model


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("dropped", ["discard", "merge"])
def test_parity_with_timm_at_keep_ratio_one(family, dropped, images):
    dense, model = patched(family, keep_ratio=1.0, prune_mode="none", dropped_tokens=dropped)
    with torch.no_grad():
        expected = dense(images)
        torch.testing.assert_close(model(images), expected, atol=1e-5, rtol=0)
        # Top-k at keep ratio 1.0 keeps everything, so it is dense too (token order is kept).
        torch.testing.assert_close(model.forward_pruned(images, "topk").logits, expected, atol=1e-5, rtol=0)
        # The masked path with every token kept is dense as well.
        ones = [torch.ones(images.shape[0], 16)] * len(PRUNE_LOC)
        torch.testing.assert_close(model.forward_train(images, masks=ones).logits, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("mode", ["topk", "threshold"])
@pytest.mark.parametrize("dropped", ["discard", "merge"])
def test_masked_path_equals_pruned_path(family, mode, dropped, images):
    _, model = patched(family, dropped_tokens=dropped)
    with torch.no_grad():
        pruned = model.forward_pruned(images, mode)
        masks = [m.float() for m in pruned.keep_masks]
        masked = model.forward_train(images, masks=masks)
    kept = torch.stack([m.sum(1) for m in pruned.keep_masks])
    assert (kept[1:] <= kept[:-1]).all(), "a dropped token came back"
    if mode == "topk":
        assert kept.tolist() == [[10] * 4, [6] * 4, [3] * 4]  # round(16 * 0.6**s)
    torch.testing.assert_close(masked.logits, pruned.logits, atol=1e-5, rtol=1e-5)


def assert_masked_path_equals_pruned_path(model, images, drop: bool, logit_tol: float = 1e-5, varied: bool = True):
    """The masked path (in place, or with dropped tokens removed) given the pruned path's masks
    gives its logits and keep logits, in both modes, and a threshold batch gives each image what
    it gets alone (with images that keep different counts, if ``varied``)."""
    with torch.no_grad():
        for mode in ("topk", "threshold"):
            pruned = model.forward_pruned(images, mode)
            masks = [m.float() for m in pruned.keep_masks]
            masked = model.forward_train(images, masks=masks, drop=drop)
            torch.testing.assert_close(masked.logits, pruned.logits, atol=1e-5, rtol=1e-5)
            for a, b in zip(masked.keep_logits, pruned.keep_logits, strict=True):
                shown = torch.isfinite(b)
                torch.testing.assert_close(a[shown], b[shown], atol=logit_tol, rtol=logit_tol)
        batch = model.forward_pruned(images, "threshold")
        counts = torch.stack([m.sum(1) for m in batch.keep_masks])
        assert not varied or (counts != counts[:, :1]).any(), "test needs images with different kept counts"
        alone = torch.cat([model.forward_pruned(images[i : i + 1], "threshold").logits for i in range(len(images))])
        torch.testing.assert_close(batch.logits, alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["deit_tiny", "registers", "avg_pool"])
@pytest.mark.parametrize("drop", [False, True])
def test_match_prior_masked_path_equals_pruned_path(family, drop, images):
    """With the match prior the keep logits depend on which tokens are alive (its +10 on every
    other token keeps the same half on every image here: the counts do not vary)."""
    _, model = patched(family, dropped_tokens="merge", predictor_prior="match")
    assert_masked_path_equals_pruned_path(model, images, drop, varied=False)


@pytest.mark.parametrize("family", ["deit_tiny", "deit_distilled", "registers", "avg_pool", "qk_norm"])
@pytest.mark.parametrize("drop", [False, True])
def test_signals_masked_path_equals_pruned_path(family, drop, images):
    """With every predictor signal (the class token's attention, redundancy ranked by the
    logit, size) the keep logits depend on which tokens are alive and how big they are."""
    _, model = patched(family, dropped_tokens="merge", predictor_signals=("attention", "redundancy", "size"))
    assert_masked_path_equals_pruned_path(model, images, drop, logit_tol=1e-4)


@pytest.mark.parametrize("family", ["deit_tiny", "registers", "avg_pool"])
@pytest.mark.parametrize("dropped", ["discard", "merge"])
def test_threshold_batch_equals_single_images(family, dropped, images):
    _, model = patched(family, dropped_tokens=dropped)
    with torch.no_grad():
        batch = model.forward_pruned(images, "threshold")
        counts = torch.stack([m.sum(1) for m in batch.keep_masks])  # (stages, B)
        assert (counts != counts[:, :1]).any(), "test needs images with different kept counts"
        for i in range(images.shape[0]):
            single = model.forward_pruned(images[i : i + 1], "threshold")
            torch.testing.assert_close(batch.logits[i : i + 1], single.logits, atol=1e-5, rtol=1e-5)
            for b, s in zip(batch.keep_masks, single.keep_masks):
                assert torch.equal(b[i : i + 1], s)


def assert_regrouping_changes_nothing(model, x, monkeypatch):
    """A threshold batch run as groups of similar kept counts gives the whole batch's results."""
    monkeypatch.setattr(dynvit.model, "REGROUP_MIN_GROUP", 2)  # regroup small test batches too
    splits = []
    def spy(counts):
        groups = regroup(counts)
        splits.append(groups is not None)
        return groups
    regroup = dynvit.model.regroup_by_count
    monkeypatch.setattr(dynvit.model, "regroup_by_count", spy)
    model.threshold_pack = False  # packing leaves no padding to regroup
    with torch.no_grad():
        model.threshold_regroup = True
        grouped = model.forward_pruned(x, "threshold")
        assert any(splits), "test needs a batch that regroups"
        model.threshold_regroup = False
        whole = model.forward_pruned(x, "threshold")
    torch.testing.assert_close(grouped.logits, whole.logits, atol=1e-5, rtol=1e-5)
    for g, w in zip(grouped.keep_masks, whole.keep_masks, strict=True):
        assert torch.equal(g, w)
    for g, w in zip(grouped.keep_logits, whole.keep_logits, strict=True):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)  # -inf where absent, in both


@pytest.mark.parametrize("family", ["deit_tiny", "registers", "avg_pool"])
@pytest.mark.parametrize("dropped", ["discard", "merge"])
def test_regrouped_threshold_batch_equals_whole_batch(family, dropped, images, monkeypatch):
    _, model = patched(family, dropped_tokens=dropped)
    x = torch.cat([images, images.flip(-1), 0.5 * images, images.flip(-2)])  # 16 images
    assert_regrouping_changes_nothing(model, x, monkeypatch)


@pytest.mark.parametrize("family", ["deit_tiny", "registers", "qk_norm", "deit3_layerscale", "avg_pool"])
@pytest.mark.parametrize("dropped", ["discard", "merge"])
def test_packed_threshold_batch_equals_padded_batch(family, dropped, images, monkeypatch):
    # After a threshold-mode stage the per-token layers run on the real tokens alone (packed);
    # only attention sees the padded layout. Results: those of the padded batch.
    _, model = patched(family, dropped_tokens=dropped)
    x = torch.cat([images, images.flip(-1), 0.5 * images, images.flip(-2)])  # 16 images
    rows = []
    pack = dynvit.model.packed_block
    monkeypatch.setattr(dynvit.model, "packed_block", lambda b, t, *a: rows.append(t.shape[0]) or pack(b, t, *a))
    model.threshold_regroup = False
    with torch.no_grad():
        model.threshold_pack = True
        packed = model.forward_pruned(x, "threshold")
        model.threshold_pack = False
        padded = model.forward_pruned(x, "threshold")
    counts = [m.sum(1) for m in packed.keep_masks]
    assert any((c != c.max()).any() for c in counts), "test needs padding"
    p = model.num_prefix_tokens
    blocks = [b - a for a, b in zip(PRUNE_LOC, PRUNE_LOC[1:] + (len(model.blocks),))]
    assert rows == [int((c + p).sum()) for c, n in zip(counts, blocks) for _ in range(n)]  # real tokens only
    torch.testing.assert_close(packed.logits, padded.logits, atol=1e-5, rtol=1e-5)
    for a, b in zip(packed.keep_masks, padded.keep_masks, strict=True):
        assert torch.equal(a, b)
    for a, b in zip(packed.keep_logits, padded.keep_logits, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_packing_is_left_to_single_images_and_other_blocks(images, monkeypatch):
    _, model = patched("deit_tiny")
    monkeypatch.setattr(dynvit.model, "packed_block", lambda *a: pytest.fail("packed a batch it should not"))
    with torch.no_grad():
        model.forward_pruned(images[:1], "threshold")  # one image: no padding
        model.forward_pruned(images, "topk")  # top-k: no padding
        model.threshold_pack = False
        model.forward_pruned(images, "threshold")


def test_eager_regrouping_comes_before_packing(images, monkeypatch):
    # Eager, a batch large enough to regroup is regrouped (cache-sized groups beat one packed
    # batch there); one that no grouping helps is packed; a small one is packed straight away.
    _, model = patched("deit_tiny")
    x = torch.cat([images, images.flip(-1), 0.5 * images, images.flip(-2)])  # 16 images
    events = []
    pack, regroup = dynvit.model.packed_block, dynvit.model.regroup_by_count
    monkeypatch.setattr(dynvit.model, "packed_block", lambda *a: events.append("pack") or pack(*a))
    monkeypatch.setattr(dynvit.model, "REGROUP_MIN_GROUP", 2)
    model.threshold_regroup, model.threshold_pack = "auto", True
    with torch.no_grad():
        model.forward_pruned(x, "threshold")  # far below REGROUP_MIN_WORK
        assert events and set(events) == {"pack"}
        events.clear()
        monkeypatch.setattr(dynvit.model, "REGROUP_MIN_WORK", 1)
        monkeypatch.setattr(dynvit.model, "regroup_by_count", lambda c: events.append("regroup") or regroup(c))
        grouped = model.forward_pruned(x, "threshold")
        assert events[0] == "regroup" and "pack" not in events  # groups are small padded batches
        events.clear()
        monkeypatch.setattr(dynvit.model, "regroup_by_count", lambda c: events.append("regroup") and None)
        fallback = model.forward_pruned(x, "threshold")  # no grouping pays: packed
        assert events[0] == "regroup" and "pack" in events
        model.threshold_pack, model.threshold_regroup = False, False
        padded = model.forward_pruned(x, "threshold")
    torch.testing.assert_close(grouped.logits, padded.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fallback.logits, padded.logits, atol=1e-5, rtol=1e-5)


def test_regroup_by_count_sorts_and_splits_only_when_it_pays():
    from dynvit.model import regroup_by_count
    counts = torch.tensor([40, 5, 38, 6, 41, 7, 39, 5] * 4)  # two clusters: padding to 41 wastes half
    groups = regroup_by_count(counts)
    assert groups is not None and sorted(torch.cat(groups).tolist()) == list(range(32))
    assert all(counts[g].max() < counts[h].min() or counts[g].max() == counts[h].min()
               for g, h in zip(groups, groups[1:]))  # sorted by count
    assert max(counts[groups[0]].tolist()) <= 7  # the small counts are no longer padded to 41
    assert regroup_by_count(torch.full((32,), 20)) is None  # nothing to gain
    assert regroup_by_count(torch.tensor([40, 5] * 4)) is None  # groups would be under 8 images


def test_auto_regroups_only_batches_with_enough_work(images, monkeypatch):
    _, model = patched("deit_tiny")
    x = torch.cat([images, images.flip(-1), 0.5 * images, images.flip(-2)])  # 16 images
    calls = []
    monkeypatch.setattr(dynvit.model, "REGROUP_MIN_GROUP", 2)
    monkeypatch.setattr(dynvit.model, "regroup_by_count", lambda counts: calls.append(len(counts)))
    model.threshold_regroup, model.threshold_pack = "auto", False
    with torch.no_grad():
        model.forward_pruned(x, "threshold")  # 16 images x <= 16 tokens x 192**2: far below the bar
        assert calls == []
        monkeypatch.setattr(dynvit.model, "REGROUP_MIN_WORK", 1)
        model.forward_pruned(x, "threshold")
        assert calls and calls[0] == 16


def test_threshold_keeps_probability_above_half_and_at_least_one(images):
    _, model = patched("deit_tiny")
    with torch.no_grad():
        model.predictors[0].out_mlp[-1].weight.zero_()
        model.predictors[0].out_mlp[-1].bias.fill_(-100.0)  # stage 0 would drop everything
        out = model.forward_pruned(images, "threshold")
    assert (out.keep_masks[0].sum(1) == 1).all()
    assert torch.isfinite(out.logits).all()


@pytest.mark.parametrize("family", ["deit_distilled", "registers", "deit3_layerscale"])
@pytest.mark.parametrize("dropped", ["discard", "merge"])
def test_every_parameter_gets_a_gradient(family, dropped, images):
    _, model = patched(family, dropped_tokens=dropped)
    model.train()
    out = dynvit.TrainingModel(model)(images, tau=0.5)
    loss = out.logits.logsumexp(-1).mean() + sum(m.mean() for m in out.keep_masks) + out.tokens.pow(2).mean()
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient for {name}"


def test_predictors_learn_from_the_task_loss_alone(images):
    _, model = patched("deit_tiny")
    model.train()
    model.forward_train(images, tau=1.0).logits.logsumexp(-1).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.predictors.parameters())


def test_train_mode_forward_returns_logits(images):
    _, model = patched("deit_tiny")
    assert model.train()(images).shape == (4, 7)
    assert model.eval()(images).shape == (4, 7)


def test_state_dict_keys_are_timms_plus_predictors_and_thresholds():
    dense, model = patched("deit_tiny")
    extra = set(model.state_dict()) - set(dense.state_dict())
    assert set(dense.state_dict()) <= set(model.state_dict())
    assert "keep_threshold" in extra and model.keep_threshold.shape == (len(PRUNE_LOC),)
    assert all(k.startswith("predictors.") for k in extra - {"keep_threshold"})


def test_patching_twice_is_an_error():
    _, model = patched("deit_tiny")
    with pytest.raises(RuntimeError, match="already patched"):
        dynvit.patch(model, prune_loc=PRUNE_LOC, keep_ratio=0.7)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"keep_ratio": 0.0}, r"\(0, 1\]"),
        ({"keep_ratio": 1.5}, r"\(0, 1\]"),
        ({"keep_ratio": (0.5, 0.7, 0.4)}, "must not increase"),
        ({"keep_ratio": (0.5, 0.4)}, "one cumulative fraction per stage"),
        ({"prune_loc": (3, 2)}, "strictly increasing"),
        ({"prune_loc": (1, 6)}, "out of range"),
        ({"prune_mode": "fast"}, "prune_mode"),
        ({"sampler": "bernoulli"}, "sampler"),
        ({"dropped_tokens": "fuse"}, "dropped_tokens"),
    ],
)
def test_bad_options_are_rejected(kwargs, match):
    args = {"prune_loc": PRUNE_LOC, "keep_ratio": 0.7, **kwargs}
    with pytest.raises(ValueError, match=match):
        dynvit.patch(make_timm("deit_tiny"), **args)


def test_unsupported_models_are_refused():
    small = dict(img_size=64, depth=4, embed_dim=64, num_heads=2)
    with pytest.raises(NotImplementedError, match="global_pool='max'"):
        dynvit.patch(timm.create_model("vit_tiny_patch16_224", global_pool="max", **small), prune_loc=(1,))
    with pytest.raises(NotImplementedError, match=r"blocks\[1\] is .*Block with Identity"):
        model = timm.create_model("vit_tiny_patch16_224", **small)
        model.blocks[1].attn = torch.nn.Identity()
        dynvit.patch(model, prune_loc=(1,))
    with pytest.raises(NotImplementedError, match="got VisionTransformerRelPos"):
        dynvit.patch(timm.create_model("vit_relpos_small_patch16_224", **small), prune_loc=(1,))
    with pytest.raises(NotImplementedError, match="got ResNet"):
        dynvit.patch(timm.create_model("resnet18"), prune_loc=(1,))


def test_wrong_image_size_is_a_clear_error(images):
    _, model = patched("deit_tiny")
    with pytest.raises(ValueError, match="does not match the model's 64x64"):
        model(torch.randn(1, 3, 96, 96))
    with pytest.raises(ValueError, match="input channels"):
        model(torch.randn(1, 1, 64, 64))


def test_dynamic_img_size_prunes_any_grid():
    dense = make_timm("deit_tiny", dynamic_img_size=True)
    model = dynvit.patch(copy.deepcopy(dense), prune_loc=PRUNE_LOC, keep_ratio=1.0, prune_mode="topk").eval()
    x = torch.randn(2, 3, 96, 80)
    with torch.no_grad():
        torch.testing.assert_close(model(x), dense(x), atol=1e-5, rtol=0)
        model.keep_ratio = 0.5
        out = model.forward_pruned(x)
    assert out.keep_masks[0].shape == (2, 30) and int(out.keep_masks[0][0].sum()) == 15


def test_keep_ratio_can_be_reassigned():
    _, model = patched("deit_tiny")
    model.keep_ratio = 0.5
    assert model.keep_ratio == (0.5, 0.25, 0.125)
    with pytest.raises(ValueError):
        model.keep_ratio = 2.0


def test_grad_checkpointing_gives_the_same_gradients(images):
    _, model = patched("deit_tiny")
    model.train()
    masks = [torch.ones(4, 16)] * 3
    grads = []
    for enable in (False, True):
        model.set_grad_checkpointing(enable)
        model.zero_grad()
        model.forward_train(images, masks=masks).logits.sum().backward()
        grads.append(model.blocks[4].attn.qkv.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


def test_merging_keeps_every_patch_accounted_for(images):
    """Merged tokens carry the patches they absorbed: sizes sum to the patch count, and a
    merged token is the size-weighted mean of what went into it."""
    from dynvit.merge import merge_gathered, merge_masked

    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 16, 8, generator=g)
    keep = (torch.rand(3, 16, generator=g) > 0.6).float()
    keep[:, 0] = 1.0
    merged, size = merge_masked(x, torch.ones(3, 16), torch.ones(3, 16), keep)
    torch.testing.assert_close((size * keep).sum(1), torch.full((3,), 16.0))
    dead = keep == 0
    torch.testing.assert_close(merged[dead], x[dead])  # dropped tokens are left as they were (and are dead)
    # the gathering form gives the kept tokens the same features and sizes
    index = torch.stack([row.nonzero().squeeze(1)[:4] for row in keep])  # four kept tokens per image
    keep4 = torch.zeros(3, 16).scatter(1, index, 1.0)
    m_masked, s_masked = merge_masked(x, torch.ones(3, 16), torch.ones(3, 16), keep4)
    m_gathered, s_gathered = merge_gathered(x, torch.ones(3, 16), index)
    torch.testing.assert_close(m_gathered, batch_gather_rows(m_masked, index))
    torch.testing.assert_close(s_gathered, torch.gather(s_masked, 1, index))
    assert (s_gathered.sum(1) == 16).all()


def batch_gather_rows(x, index):
    return torch.gather(x, 1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def test_merging_gives_the_keep_decisions_a_gradient(images):
    """With merging, a dropped token still changes the output through the token it joins, so the
    decision to drop it gets a gradient even from a fixed (replayed) mask."""
    _, model = patched("deit_tiny", dropped_tokens="merge")
    model.train()
    with torch.no_grad():
        masks = [m.float() for m in model.eval().forward_pruned(images, "topk").keep_masks]
    model.train()
    masks = [m.requires_grad_() for m in masks]
    model.forward_train(images, masks=masks).logits.logsumexp(-1).sum().backward()
    assert masks[0].grad is not None and masks[0].grad[masks[0] == 0].abs().sum() > 0


def test_noise_scale_zero_trains_on_threshold_decisions(images):
    """At noise scale 0 the training masks are threshold mode's decisions, also with a
    non-zero threshold."""
    _, model = patched("deit_tiny")
    model.keep_threshold.copy_(torch.tensor([0.3, -0.2, 0.1]))
    with torch.no_grad():
        pruned = model.eval().forward_pruned(images, "threshold")
        trained = model.train().forward_train(images, tau=0.3, noise_scale=0.0)
    for a, b in zip(pruned.keep_masks, trained.keep_masks):
        assert torch.equal(a.float(), b)
    torch.testing.assert_close(trained.logits, model.forward_train(images, masks=[m.float() for m in pruned.keep_masks]).logits)
