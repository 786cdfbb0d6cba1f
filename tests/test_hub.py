"""save_pretrained / load_pretrained: the rebuilt model is the same model."""
from __future__ import annotations

import json

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

import dynvit
from conftest import randomize_
from dynvit.hub import load_pretrained, save_pretrained

TINY = dict(img_size=32, patch_size=8, embed_dim=48, depth=4, num_heads=2, num_classes=5)
CLASSES = ["a", "b", "c", "d", "e"]


pytestmark = pytest.mark.usefixtures("one_thread")


def _pruning_model():
    model = dynvit.build_model("vit_tiny_patch16_224", prune_loc=(1, 3), keep_ratio=[0.6, 0.3], **TINY)
    randomize_(model, scale=0.5)  # predictor logits spread around 0, so threshold mode keeps different counts
    model.prune_mode = "topk"
    return model.eval()


def test_round_trip_gives_identical_logits(tmp_path):
    model = _pruning_model()
    data_config = {"input_size": (3, 32, 32), "interpolation": "bilinear", "mean": (0.1, 0.2, 0.3), "std": (1.0, 2.0, 3.0),
                   "crop_pct": 1.0}
    save_pretrained(model, tmp_path / "m", classes=CLASSES, data_config=data_config)
    loaded = load_pretrained(tmp_path / "m")

    assert type(loaded) is type(model) and not loaded.training
    assert loaded.prune_loc == (1, 3) and loaded.keep_ratio == (0.6, 0.3) and loaded.prune_mode == "topk"
    x = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for mode in ("threshold", "topk", "none"):
            a, b = model.forward_pruned(x, mode=mode), loaded.forward_pruned(x, mode=mode)
            assert torch.equal(a.logits, b.logits), mode
            assert all(torch.equal(p, q) for p, q in zip(a.keep_masks, b.keep_masks))
        masks = model.forward_pruned(x, mode="threshold").keep_masks
        assert torch.equal(model.forward_train(x, masks=masks).logits, loaded.forward_train(x, masks=masks).logits)
        assert torch.equal(model(x), loaded(x))
    assert loaded.dynvit_meta["classes"] == CLASSES
    resolved = timm.data.resolve_model_data_config(loaded)
    assert resolved["mean"] == (0.1, 0.2, 0.3) and resolved["input_size"] == (3, 32, 32)


def test_config_json_says_how_to_rebuild(tmp_path):
    save_pretrained(_pruning_model(), tmp_path, classes=CLASSES)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_name"] == "vit_tiny_patch16_224"
    assert config["timm_kwargs"] == TINY
    assert config["dynvit"]["prune_loc"] == [1, 3] and config["dynvit"]["keep_ratio"] == [0.6, 0.3]
    assert config["classes"] == CLASSES
    assert {"input_size", "mean", "std", "interpolation"} <= set(config)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]  # no temp files


def test_dense_timm_model_round_trip(tmp_path):
    model = randomize_(timm.create_model("vit_tiny_patch16_224", **TINY)).eval()
    with pytest.raises(ValueError, match="dynvit_meta"):
        save_pretrained(model, tmp_path / "x")
    model.dynvit_meta = {"model_name": "vit_tiny_patch16_224", "timm_kwargs": TINY}
    save_pretrained(model, tmp_path / "dense")
    loaded = load_pretrained(tmp_path / "dense")
    assert not dynvit.is_patched(loaded)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))


def test_saving_again_overwrites(tmp_path):
    first, second = _pruning_model(), randomize_(_pruning_model(), seed=3)
    save_pretrained(first, tmp_path)
    save_pretrained(second, tmp_path)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(load_pretrained(tmp_path)(x), second(x))


def test_weights_that_do_not_fit_name_the_keys(tmp_path):
    save_pretrained(_pruning_model(), tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    del weights["predictors.1.in_proj.1.weight"]
    weights["head.weight"] = torch.zeros(7, 48)
    weights["extra.bias"] = torch.zeros(3)
    save_file(weights, tmp_path / "model.safetensors")
    with pytest.raises(dynvit.WeightMismatchError) as e:
        load_pretrained(tmp_path)
    for key in ("predictors.1.in_proj.1.weight", "extra.bias", "head.weight (file (7, 48), model (5, 48))"):
        assert key in str(e.value)


def test_not_a_pretrained_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="save_pretrained"):
        load_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"architecture": "vit"}))
    with pytest.raises(ValueError, match="not a dynvit config"):
        load_pretrained(tmp_path)


def test_dense_export_seeds_a_pruning_model(tmp_path):
    """A dense model saved by our own dense recipe is a valid pretrained_path for fine-tuning."""
    dense = randomize_(timm.create_model("vit_tiny_patch16_224", **TINY)).eval()
    dense.dynvit_meta = {"model_name": "vit_tiny_patch16_224", "timm_kwargs": TINY}
    save_pretrained(dense, tmp_path)
    student = dynvit.build_model("vit_tiny_patch16_224", prune_loc=(1,), keep_ratio=1.0,
                                 pretrained_path=str(tmp_path / "model.safetensors"), **TINY).eval()
    student.prune_mode = "none"
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(student(x), dense(x), atol=1e-6)


def test_match_prior_round_trip(tmp_path):
    """The predictor prior and its learned scale are saved and rebuilt."""
    model = dynvit.build_model("vit_tiny_patch16_224", prune_loc=(1, 3), keep_ratio=[0.6, 0.36],
                               dropped_tokens="merge", predictor_prior="match", **TINY)
    randomize_(model, scale=0.5).eval()
    with torch.no_grad():
        model.predictors[1].match_scale.fill_(3.25)
    save_pretrained(model, tmp_path / "m", classes=CLASSES)
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["dynvit"]["predictor_prior"] == "match"
    loaded = load_pretrained(tmp_path / "m")
    assert loaded.predictor_prior == "match" and loaded.predictors[1].match_scale.item() == 3.25
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for mode in ("threshold", "topk"):
            assert torch.equal(model.forward_pruned(x, mode).logits, loaded.forward_pruned(x, mode).logits), mode
