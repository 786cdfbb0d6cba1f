"""Compiled pruned inference: no graph break in top-k mode, one graph for every kept count in
threshold mode, and compiled logits equal to eager ones.

Graph counting uses torch's ``CompileCounter`` backend (it traces exactly as inductor would be
handed the graph, then runs it eagerly: fast); one test compiles with inductor itself.
"""
from __future__ import annotations

import copy

import pytest
import timm
import torch
import torch._dynamo
from torch._dynamo.testing import CompileCounter

import dynvit
from conftest import make_decisive_, randomize_

RECIPES = {"discard": {}, "merge+match": {"dropped_tokens": "merge", "predictor_prior": "match"},
           "merge+signals": {"dropped_tokens": "merge", "predictor_signals": ("attention", "redundancy", "size")}}


def tiny(recipe: str, mode: str, seed: int = 0) -> torch.nn.Module:
    """A 3-block ViT of width 64 on 32x32 images (64 patch tokens), two stages keeping 70% then
    49%, decisive predictors calibrated to that budget."""
    base = timm.create_model("deit_tiny_patch16_224", img_size=32, patch_size=4, depth=3, embed_dim=64, num_heads=2,
                             num_classes=5)
    randomize_(base, seed)
    model = dynvit.patch(base.eval(), prune_loc=(1, 2), keep_ratio=0.7, prune_mode=mode, **RECIPES[recipe])
    make_decisive_(model, image_size=32)
    dynvit.calibrate(model.eval(), inputs(32, seed=seed + 10))
    return model


def inputs(n: int, seed: int = 3) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def kept_counts(model, x: torch.Tensor) -> set[tuple[int, ...]]:
    with torch.no_grad():
        return {tuple(int(m.sum()) for m in model.forward_pruned(x[i:i + 1], mode="threshold").keep_masks)
                for i in range(len(x))}


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("recipe", ["merge+match", "merge+signals"])
def test_topk_has_no_graph_break(recipe):
    explained = torch._dynamo.explain(tiny(recipe, "topk"))(inputs(2))
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
    assert explained.graph_count == 1


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_threshold_compiles_one_graph_per_batch_size_for_every_kept_count(recipe):
    model, x = tiny(recipe, "threshold"), inputs(16)
    assert len(kept_counts(model, x)) >= 8  # the images really keep different counts
    counter = CompileCounter()
    compiled = dynvit.compile(model, backend=counter)  # fullgraph: a graph break would raise
    with torch.no_grad():
        for i in range(len(x)):
            torch.testing.assert_close(compiled(x[i:i + 1]), model(x[i:i + 1]), rtol=1e-5, atol=1e-5)
        for i in range(0, len(x), 8):
            torch.testing.assert_close(compiled(x[i:i + 8]), model(x[i:i + 8]), rtol=1e-5, atol=1e-5)
    assert counter.frame_count == 2  # batch 1 and batch 8, whatever the counts


def test_compiled_threshold_regroups_large_batches_in_one_graph(monkeypatch):
    # Inside a graph a large batch is split into a fixed number of groups sorted by count, each
    # padded to its own largest count; the logits stay those of the whole batch in eager mode.
    monkeypatch.setattr(dynvit.model, "REGROUP_COMPILED_GROUP", 4)  # 2 groups of a batch of 8
    model, x = tiny("merge+match", "threshold"), inputs(24)
    model.threshold_regroup, model.threshold_pack = True, False
    assert dynvit.model.compiled_groups(torch.tensor([5, 1, 4, 4, 2, 8, 3, 3]), 64, 64, True)[0].tolist() == [1, 4, 6, 7]
    counter = CompileCounter()
    compiled = dynvit.compile(model, backend=counter)
    with torch.no_grad():
        for i in range(0, len(x), 8):
            torch.testing.assert_close(compiled(x[i:i + 8]), model(x[i:i + 8]), rtol=1e-5, atol=1e-5)
    assert counter.frame_count == 1


def test_compiled_threshold_pads_a_lone_kept_token():
    # A compiled graph pads a stage that keeps one token to two slots (inductor cannot take a
    # data-dependent size of 1); the padding must be masked out exactly as in eager mode.
    model, x = tiny("merge+match", "threshold"), inputs(3)
    model.keep_threshold.fill_(1e4)  # every stage keeps only its most likely token
    assert kept_counts(model, x) == {(1, 1)}
    compiled = dynvit.compile(model, backend=CompileCounter())
    with torch.no_grad():
        for i in range(len(x)):
            torch.testing.assert_close(compiled(x[i:i + 1]), model(x[i:i + 1]), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)


def test_plain_torch_compile_stops_compiling_after_warm_up():
    # Without fullgraph the kept count breaks the graph; torch's automatic dynamic shapes then
    # make it symbolic, so new counts compile nothing once a few have been seen.
    model, x = tiny("discard", "threshold"), inputs(32)
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter)
    with torch.no_grad():
        for i in range(16):
            compiled(x[i:i + 1])
        warm = counter.frame_count
        assert len(kept_counts(model, x[16:]) - kept_counts(model, x[:16])) >= 5  # counts not seen yet
        for i in range(16, 32):
            torch.testing.assert_close(compiled(x[i:i + 1]), model(x[i:i + 1]), rtol=1e-5, atol=1e-5)
    assert counter.frame_count == warm


def check_inductor(model, batches):
    compiled = dynvit.compile(copy.deepcopy(model))
    with torch.no_grad():
        for batch in batches:
            torch.testing.assert_close(compiled(batch), model(batch), rtol=1e-4, atol=1e-4)


def test_inductor_logits_equal_eager(one_thread):
    # One inductor compile (tens of seconds): a padded threshold-mode batch with merging and the
    # match prior, the path with the most data-dependent parts, run packed (threshold_pack).
    x = inputs(6)
    model = tiny("merge+match", "threshold")
    assert model.threshold_pack and model._packable()
    check_inductor(model, [x[:3], x[3:]])


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["topk", "threshold"])
def test_inductor_logits_equal_eager_at_batch_one(mode, one_thread):
    x = inputs(4)
    check_inductor(tiny("merge+match", mode), [x[i:i + 1] for i in range(4)])


def test_compile_defaults():
    model = tiny("discard", "topk")
    compiled = dynvit.compile(model, backend=CompileCounter())
    assert compiled._orig_mod is model
    with pytest.raises(TypeError, match="takes an nn.Module"):
        dynvit.compile(lambda x: x)
