"""The predictors' signals: class-token attention, redundancy ranked by the logit, size."""
from __future__ import annotations

import copy

import pytest
import timm
import torch

import dynvit
from conftest import make_timm
from dynvit.attention import attention_forward
from dynvit.benchmark.masks import column_balance, spearman
from dynvit.families.vit import vit_class_attention
from dynvit.predictor import TokenPredictor
from dynvit.signals import attention_term, centered, redundancy, size_term

ALL = ("attention", "redundancy", "size")


def test_redundancy_is_similarity_to_the_closest_token_ranked_ahead():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 5, 16, generator=g)
    x[0, 3] = x[0, 1] * 2.0  # a duplicate (cosine 1) of token 1
    score = torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0]])
    alive = torch.ones(1, 5, dtype=torch.bool)
    r = redundancy(x, score, alive)
    assert r[0, 0] == -1.0  # ranked first: nothing ahead of it
    torch.testing.assert_close(r[0, 3], torch.tensor(1.0))  # its twin is ahead of it
    z = torch.nn.functional.normalize(x[0], dim=-1)
    torch.testing.assert_close(r[0, 2], (z[2] @ z[:2].T).max())
    # Ranked the other way round, the twin ranked later is the one that repeats.
    r = redundancy(x, -score, alive)
    torch.testing.assert_close(r[0, 1], torch.tensor(1.0))
    assert r[0, 4] == -1.0


def test_redundancy_ignores_dead_tokens_and_follows_a_permutation():
    g = torch.Generator().manual_seed(1)
    x, score = torch.randn(2, 9, 8, generator=g), torch.randn(2, 9, generator=g)
    alive = torch.rand(2, 9, generator=g) > 0.3
    r = redundancy(x, score, alive)
    assert (r[~alive] == -1).all()
    # Moving dead tokens around (or changing them) changes nothing for the alive ones.
    y = x.clone()
    y[~alive] = torch.randn(int((~alive).sum()), 8)
    torch.testing.assert_close(redundancy(y, score, alive), r)
    perm = torch.randperm(9, generator=g)
    torch.testing.assert_close(redundancy(x[:, perm], score[:, perm], alive[:, perm]), r[:, perm])


def test_terms_are_centred_on_the_alive_tokens():
    alive = torch.tensor([[True, True, False, True]])
    uniform = torch.tensor([[1 / 3, 1 / 3, 0.0, 1 / 3]])
    torch.testing.assert_close(attention_term(uniform, alive), torch.zeros(1, 4))
    twice = torch.tensor([[0.5, 0.25, 0.0, 0.25]])
    t = attention_term(twice, alive)
    torch.testing.assert_close(t[0, 0] - t[0, 1], torch.log(torch.tensor(2.0)))
    assert t[0, 2] == 0 and abs(float(t[alive].sum())) < 1e-6
    assert (size_term(None, alive) == 0).all()
    c = centered(torch.tensor([[1.0, 2.0, 50.0, 3.0]]), alive)
    torch.testing.assert_close(c, torch.tensor([[-1.0, 0.0, 0.0, 1.0]]))


@pytest.mark.parametrize("family", ["deit_tiny", "deit_distilled", "qk_norm", "deit3_layerscale"])
def test_class_attention_is_the_blocks_own(family):
    """The signal equals the class token's row of the block's attention (weights computed the
    reference way), with dead keys left out and merged keys weighed by log(size)."""
    model = make_timm(family)
    p = model.num_prefix_tokens
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, p + 16, model.embed_dim, generator=g)
    block = model.blocks[2]
    alive = torch.rand(3, 16, generator=g) > 0.4
    size = torch.randint(1, 4, (3, 16), generator=g).float()
    with torch.no_grad():
        got = vit_class_attention(block, x, p, True, alive, size)
        bias = torch.cat([torch.zeros(3, p), torch.log(size)], dim=1)
        keep = torch.cat([torch.ones(3, p), alive.float()], dim=1)
        ref = attention_forward(block.attn, block.norm1(x), key_mask=keep, key_bias=bias, need_weights=True).weights
    expected = ref[:, :, 0, p:].mean(dim=1)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    assert (got[~alive] < 1e-12).all()


def test_predictor_learns_signal_weights_not_features():
    torch.manual_seed(0)
    pred = TokenPredictor(16, signals=["size", "attention", "redundancy"])
    assert pred.signals == ALL  # canonical order
    assert "signal_weight" in pred.state_dict()
    x = torch.randn(2, 6, 16, requires_grad=True)
    attn = torch.softmax(torch.randn(2, 6), dim=-1)
    size = torch.randint(1, 3, (2, 6)).float()
    pred(x, None, attention=attn, size=size).sum().backward()
    assert pred.signal_weight.grad is not None and pred.signal_weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="attention="):
        pred(x, None, size=size)
    with pytest.raises(ValueError, match="unknown predictor signals"):
        TokenPredictor(16, signals=["saliency"])


def test_signals_change_what_is_kept_and_survive_save_and_load(tmp_path):
    dense = make_timm("deit_tiny")
    model = dynvit.patch(copy.deepcopy(dense), prune_loc=(1, 3), keep_ratio=0.6, dropped_tokens="merge",
                         predictor_signals=ALL, prune_mode="topk").eval()
    plain = dynvit.patch(copy.deepcopy(dense), prune_loc=(1, 3), keep_ratio=0.6, dropped_tokens="merge",
                         prune_mode="topk").eval()
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if "signal_weight" not in k})
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        a, b = model.forward_pruned(images), plain.forward_pruned(images)
    assert not torch.equal(a.keep_masks[0], b.keep_masks[0])
    model.dynvit_meta = {"model_name": "deit_tiny_patch16_224", "timm_kwargs": {"img_size": 64, "depth": 6, "num_classes": 7}}
    dynvit.save_pretrained(model, tmp_path / "m")
    loaded = dynvit.load_pretrained(tmp_path / "m")
    assert loaded.predictor_signals == ALL
    with torch.no_grad():
        torch.testing.assert_close(loaded.forward_pruned(images).logits, a.logits)


def test_attention_signal_is_refused_where_it_cannot_be_read():
    eva = timm.create_model("vit_small_patch16_rope_224", img_size=64, depth=4, num_classes=5)
    with pytest.raises(NotImplementedError, match="without 'attention'"):
        dynvit.patch(eva, prune_loc=(1,), keep_ratio=0.5, predictor_signals=["attention"])
    assert not dynvit.is_patched(eva)  # refused before anything changed
    dynvit.patch(eva, prune_loc=(1,), keep_ratio=0.5, predictor_signals=["redundancy", "size"])


def test_column_balance_and_spearman():
    stripes = torch.zeros(2, 4, 4)
    stripes[:, :, 1::2] = 1.0
    stripes[1, :, 0::2] = 0.5
    assert [c["gap"] for c in column_balance(stripes)] == [1.0, 0.5]
    torch.testing.assert_close(torch.tensor(spearman(torch.arange(10.0), torch.arange(10.0) ** 3)), torch.tensor(1.0))
    torch.testing.assert_close(torch.tensor(spearman(torch.arange(10.0), -torch.arange(10.0))), torch.tensor(-1.0))


def test_fit_signals_chooses_the_weights_closest_to_the_teacher():
    """Coordinate descent over the grid: after the fit, each stage's weights are the grid point
    with the lowest KL to the teacher given the other stage's (checked by brute force), and
    nothing but the signal weights changed."""
    import itertools

    import torch.nn.functional as F

    dense = make_timm("deit_tiny")
    model = dynvit.patch(copy.deepcopy(dense), prune_loc=(1, 3), keep_ratio=0.5, dropped_tokens="merge",
                         predictor_signals=ALL).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    images = torch.randn(6, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    grid = {"attention": (0.0, 3.0), "redundancy": (0.0, 6.0)}
    history = dynvit.fit_signals(model, images, teacher=dense, grid=grid, passes=1)
    assert [h["stage"] for h in history] == [0, 1] and not model.training

    def kl():
        with torch.no_grad():
            student = F.log_softmax(model.forward_pruned(images, "topk").logits, -1)
            return float(F.kl_div(student, F.log_softmax(dense(images), -1), reduction="sum", log_target=True)) / 6

    last = model.predictors[1]
    chosen = last.signal_weight.clone()
    scores = {}
    for wa, wr in itertools.product(grid["attention"], grid["redundancy"]):
        with torch.no_grad():
            last.signal_weight.copy_(torch.tensor([wa, wr, chosen[2]]))
        scores[(wa, wr)] = kl()
    best = min(scores, key=lambda w: (scores[w], list(scores).index(w)))
    assert tuple(chosen[:2].tolist()) == best
    torch.testing.assert_close(torch.tensor(history[1]["kl"]), torch.tensor(scores[best]), rtol=1e-4, atol=1e-6)
    assert len(set(scores.values())) > 1, "test needs weights that change what is kept"
    for k, v in model.state_dict().items():
        if not k.endswith("signal_weight"):
            assert torch.equal(v, before[k]), k
    with pytest.raises(ValueError, match="read signals"):
        dynvit.fit_signals(dynvit.patch(make_timm("deit_tiny"), prune_loc=(1,), keep_ratio=0.5), images)
