"""Saved models: dynvit rebuilds them exactly, timm and the Hugging Face Hub read them, folders
of the earlier format keep loading, push_to_hub uploads a folder with its model card."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

import dynvit
from conftest import REPO, populate_hf_cache, randomize_
from dynvit.benchmark import dense_backbone
from dynvit.hub import load_pretrained, push_to_hub, save_pretrained

TINY = dict(img_size=32, patch_size=8, embed_dim=48, depth=4, num_heads=2, num_classes=5)
CLASSES = ["a", "b", "c", "d", "e"]
DATA_CFG = {"input_size": (3, 32, 32), "interpolation": "bilinear", "mean": (0.1, 0.2, 0.3), "std": (1.0, 2.0, 3.0),
            "crop_pct": 1.0}
SHARED = REPO.parent / "shared" / "checkpoints"
EVALUATION = {"command": "python eval.py --checkpoint x", "images": 200, "data": "cifar10/test", "rows": [
    {"method": "dense", "setting": "-", "top1": 71.25, "top5": 97.5, "gmacs": 0.0713},
    {"method": "dynvit", "setting": "threshold, kept 0.58/0.34", "top1": 70.75, "top5": 97.0, "gmacs": 0.0468,
     "kept_tokens": [{"mean": 37.2, "p5": 33.0, "p95": 43.0}, {"mean": 23.2, "p5": 17.0, "p95": 32.0}]},
    {"method": "dynvit", "setting": "topk, keep 0.58/0.34", "top1": 70.5, "top5": 96.5, "gmacs": 0.0466,
     "kept_tokens": [{"mean": 37.0, "p5": 37.0, "p95": 37.0}, {"mean": 22.0, "p5": 22.0, "p95": 22.0}]},
]}


pytestmark = pytest.mark.usefixtures("one_thread")


def _pruning_model():
    model = dynvit.build_model("vit_tiny_patch16_224", prune_loc=(1, 3), keep_ratio=[0.6, 0.3], **TINY)
    randomize_(model, scale=0.5)  # predictor logits spread around 0, so threshold mode keeps different counts
    model.prune_mode = "topk"
    return model.eval()


def _dense_model():
    model = randomize_(timm.create_model("vit_tiny_patch16_224", **TINY)).eval()
    model.dynvit_meta = {"model_name": "vit_tiny_patch16_224", "timm_kwargs": TINY}
    return model


X = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))


# ---- dynvit's own round trip ------------------------------------------------------------------
def test_round_trip_gives_identical_logits(tmp_path):
    model = _pruning_model()
    save_pretrained(model, tmp_path / "m", classes=CLASSES, data_config=DATA_CFG)
    loaded = load_pretrained(tmp_path / "m")

    assert type(loaded) is type(model) and not loaded.training
    assert loaded.prune_loc == (1, 3) and loaded.keep_ratio == (0.6, 0.3) and loaded.prune_mode == "topk"
    with torch.no_grad():
        for mode in ("threshold", "topk", "none"):
            a, b = model.forward_pruned(X, mode=mode), loaded.forward_pruned(X, mode=mode)
            assert torch.equal(a.logits, b.logits), mode
            assert all(torch.equal(p, q) for p, q in zip(a.keep_masks, b.keep_masks))
        masks = model.forward_pruned(X, mode="threshold").keep_masks
        assert torch.equal(model.forward_train(X, masks=masks).logits, loaded.forward_train(X, masks=masks).logits)
        assert torch.equal(model(X), loaded(X))
    assert loaded.dynvit_meta["classes"] == CLASSES
    resolved = timm.data.resolve_model_data_config(loaded)
    assert resolved["mean"] == (0.1, 0.2, 0.3) and resolved["input_size"] == (3, 32, 32)
    # pretrained_cfg describes the saved model, not the hub weights the architecture names
    cfg = loaded.pretrained_cfg
    assert cfg["label_names"] == tuple(CLASSES) and cfg["num_classes"] == 5 and cfg["source"] == "local-dir"
    assert cfg.get("hf_hub_id") is None and cfg.get("url") is None and cfg.get("tag") is None
    assert "augreg" not in json.dumps(cfg)


def test_config_json_has_timm_keys_and_a_dynvit_block(tmp_path):
    save_pretrained(_pruning_model(), tmp_path, classes=CLASSES, data_config=DATA_CFG)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architecture"] == "vit_tiny_patch16_224" and config["num_classes"] == 5
    assert config["label_names"] == CLASSES and config["global_pool"] == "token" and config["num_features"] == 48
    assert {**TINY, "img_size": [32, 32]}.items() <= config["model_args"].items()
    assert config["pretrained_cfg"]["input_size"] == [3, 32, 32] and config["pretrained_cfg"]["mean"] == [0.1, 0.2, 0.3]
    assert config["dynvit"]["format"] == "dynvit.pretrained/2" and config["dynvit"]["weights"] == "dynvit.safetensors"
    assert config["dynvit"]["pruning"]["prune_loc"] == [1, 3] and config["dynvit"]["pruning"]["keep_ratio"] == [0.6, 0.3]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md", "config.json", "dynvit.safetensors",
                                                         "model.safetensors"]  # no temp files
    backbone, extra = load_file(tmp_path / "model.safetensors"), load_file(tmp_path / "dynvit.safetensors")
    assert set(backbone) == set(timm.create_model("vit_tiny_patch16_224", **TINY).state_dict())
    assert set(extra) == {"keep_threshold"} | {k for k in _pruning_model().state_dict() if k.startswith("predictors.")}


# ---- timm reads the folders ------------------------------------------------------------------
def test_timm_loads_a_saved_dense_model_exactly(tmp_path):
    model = _dense_model()
    save_pretrained(model, tmp_path, classes=CLASSES, data_config=DATA_CFG)
    loaded = timm.create_model(f"local-dir:{tmp_path}", pretrained=True).eval()
    with torch.no_grad():
        assert (loaded(X) - model(X)).abs().max().item() == 0
    assert list(loaded.pretrained_cfg["label_names"]) == CLASSES
    assert tuple(timm.data.resolve_model_data_config(loaded)["std"]) == (1.0, 2.0, 3.0)


def test_timm_loads_a_pruned_model_as_its_dense_backbone(tmp_path):
    model = _pruning_model()
    save_pretrained(model, tmp_path, classes=CLASSES)
    loaded = timm.create_model(f"local-dir:{tmp_path}", pretrained=True).eval()
    assert not dynvit.is_patched(loaded)
    with torch.no_grad():
        assert (loaded(X) - dense_backbone(model)(X)).abs().max().item() == 0
        assert torch.equal(loaded(X), model.forward_pruned(X, mode="none").logits)


# ---- the Hugging Face Hub, offline ------------------------------------------------------------
def test_hf_hub_round_trip_through_the_cache(tmp_path, offline_hub):
    model = _pruning_model()
    save_pretrained(model, tmp_path / "m", classes=CLASSES, data_config=DATA_CFG)
    populate_hf_cache(offline_hub, "someone/tiny-dynvit", tmp_path / "m")

    loaded = load_pretrained("hf-hub:someone/tiny-dynvit")
    with torch.no_grad():
        for mode in ("threshold", "topk"):
            assert torch.equal(model.forward_pruned(X, mode).logits, loaded.forward_pruned(X, mode).logits), mode
    assert loaded.pretrained_cfg["hf_hub_id"] == "someone/tiny-dynvit" and loaded.pretrained_cfg["source"] == "hf-hub"
    backbone = timm.create_model("hf-hub:someone/tiny-dynvit", pretrained=True).eval()  # timm, same cache
    with torch.no_grad():
        assert torch.equal(backbone(X), model.forward_pruned(X, mode="none").logits)
    # the same folder as local-dir:, and as a pretrained_path to fine-tune from
    assert torch.equal(load_pretrained(f"local-dir:{tmp_path / 'm'}")(X), loaded(X))
    student = dynvit.build_model("vit_tiny_patch16_224", prune_loc=(1, 3), keep_ratio=[0.6, 0.3],
                                 pretrained_path="hf-hub:someone/tiny-dynvit", **TINY).eval()
    assert all(torch.equal(a, b) for a, b in zip(student.state_dict().values(), model.state_dict().values()))


def test_hf_hub_repo_missing_from_an_offline_cache(offline_hub):
    with pytest.raises(FileNotFoundError, match=r"hf-hub:someone/absent: not in the Hugging Face cache and the Hub "
                                                r"cannot be reached .*unset HF_HUB_OFFLINE"):
        load_pretrained("hf-hub:someone/absent")


# ---- folders of the earlier format ----------------------------------------------------------------
@pytest.mark.parametrize("name", ["cifar10_vit_dense", "cifar10_clutter_vit_dense"])
def test_shared_teachers_in_the_earlier_format_keep_loading(name, tmp_path):
    folder = SHARED / name
    if not folder.is_dir():
        pytest.skip(f"{folder} not found")
    old = json.loads((folder / "config.json").read_text())
    assert old["format"] == "dynvit.pretrained/1"
    reference = timm.create_model(old["model_name"], **old["timm_kwargs"]).eval()
    reference.load_state_dict(load_file(folder / "model.safetensors"))
    loaded = load_pretrained(folder)
    x = torch.randn(2, *old["input_size"])
    with torch.no_grad():
        assert torch.equal(loaded(x), reference(x))
    assert loaded.dynvit_meta["classes"] == old["classes"] and loaded.pretrained_cfg["label_names"] == tuple(old["classes"])
    assert loaded.pretrained_cfg["input_size"] == tuple(old["input_size"]) and loaded.pretrained_cfg.get("hf_hub_id") is None
    save_pretrained(loaded, tmp_path)  # saved again: the current format, which timm reads
    with torch.no_grad():
        assert torch.equal(timm.create_model(f"local-dir:{tmp_path}", pretrained=True).eval()(x), reference(x))


# ---- push_to_hub and the model card -------------------------------------------------------------
def test_push_to_hub_uploads_the_folder_with_its_card(monkeypatch):
    from huggingface_hub import HfApi

    calls = {}

    def create_repo(self, repo_id, **kwargs):
        calls["create_repo"] = (repo_id, kwargs)
        return type("RepoUrl", (), {"repo_id": repo_id})()

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        calls["upload"] = {"repo_id": repo_id, **kwargs,
                           "files": {p.name: p.read_bytes() for p in Path(folder_path).iterdir()}}
        return "commit-info"

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    model = _pruning_model()
    model.dynvit_meta["classes"] = CLASSES
    assert push_to_hub(model, "someone/tiny-dynvit", evaluation=EVALUATION, private=True) == "commit-info"
    assert calls["create_repo"] == ("someone/tiny-dynvit", {"private": True, "exist_ok": True})
    files = calls["upload"]["files"]
    assert sorted(files) == ["README.md", "config.json", "dynvit.safetensors", "eval.json", "model.safetensors"]
    assert json.loads(files["config.json"])["label_names"] == CLASSES
    card = files["README.md"].decode()
    assert 'dynvit.load_pretrained("hf-hub:someone/tiny-dynvit")' in card
    assert 'timm.create_model("hf-hub:someone/tiny-dynvit", pretrained=True)' in card


def test_model_card_is_built_from_the_evaluation_json(tmp_path):
    training = {"model": {"name": "vit_tiny_patch16_224", "keep_ratio": 0.6}, "optim": {"lr": 0.001}}
    save_pretrained(_pruning_model(), tmp_path, classes=CLASSES, evaluation=EVALUATION, training_config=training)
    card = (tmp_path / "README.md").read_text()
    assert card.startswith("---\ntags:\n- image-classification\n- timm\n- dynvit\n- token-pruning\nlibrary_name: timm\n")
    lines = card.splitlines()
    assert "| dynvit | threshold, kept 0.58/0.34 | 70.75 | 97.00 | 0.0468 | 37.2 [33-43] / 23.2 [17-32] |" in lines
    assert "| dynvit | topk, keep 0.58/0.34 | 70.50 | 96.50 | 0.0466 | 37.0 [37-37] / 22.0 [22-22] |" in lines
    assert "| dense | - | 71.25 | 97.50 | 0.0713 |  |" in lines
    assert "On 200 images of `cifar10/test`, by `python eval.py --checkpoint x`:" in card
    assert "predictors before blocks 1, 3 keep 0.60/0.30 of the patch tokens" in card
    assert f'dynvit.load_pretrained("local-dir:{tmp_path}")' in card
    assert "```yaml\nmodel:\n  name: vit_tiny_patch16_224\n  keep_ratio: 0.6\noptim:\n  lr: 0.001\n```" in card
    assert json.loads((tmp_path / "eval.json").read_text()) == EVALUATION


# ---- errors and the rest -------------------------------------------------------------------------
def test_dense_timm_model_round_trip(tmp_path):
    model = randomize_(timm.create_model("vit_tiny_patch16_224", **TINY)).eval()
    with pytest.raises(ValueError, match="dynvit_meta"):
        save_pretrained(model, tmp_path / "x")
    model.dynvit_meta = {"model_name": "vit_tiny_patch16_224", "timm_kwargs": TINY}
    save_pretrained(model, tmp_path / "dense")
    assert not (tmp_path / "dense" / "dynvit.safetensors").exists()
    loaded = load_pretrained(tmp_path / "dense")
    assert not dynvit.is_patched(loaded)
    with torch.no_grad():
        assert torch.equal(model(X), loaded(X))


def test_saving_again_overwrites(tmp_path):
    first, second = _pruning_model(), randomize_(_pruning_model(), seed=3)
    save_pretrained(first, tmp_path)
    save_pretrained(second, tmp_path)
    with torch.no_grad():
        assert torch.equal(load_pretrained(tmp_path)(X), second(X))


def test_weights_that_do_not_fit_name_the_keys(tmp_path):
    save_pretrained(_pruning_model(), tmp_path)
    extra = load_file(tmp_path / "dynvit.safetensors")
    del extra["predictors.1.in_proj.1.weight"]
    extra["extra.bias"] = torch.zeros(3)
    save_file(extra, tmp_path / "dynvit.safetensors")
    weights = load_file(tmp_path / "model.safetensors")
    weights["head.weight"] = torch.zeros(7, 48)
    save_file(weights, tmp_path / "model.safetensors")
    with pytest.raises(dynvit.WeightMismatchError) as e:
        load_pretrained(tmp_path)
    for key in ("predictors.1.in_proj.1.weight", "extra.bias", "head.weight (file (7, 48), model (5, 48))"):
        assert key in str(e.value)


def test_not_a_pretrained_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="save_pretrained"):
        load_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        load_pretrained(tmp_path / "missing")
    (tmp_path / "config.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(ValueError, match="neither a timm nor a dynvit config"):
        load_pretrained(tmp_path)


def test_dense_export_seeds_a_pruning_model(tmp_path):
    """A dense model saved by our own dense recipe is a valid pretrained_path for fine-tuning,
    as its folder or its weight file."""
    dense = _dense_model()
    save_pretrained(dense, tmp_path)
    for path in (tmp_path, tmp_path / "model.safetensors"):
        student = dynvit.build_model("vit_tiny_patch16_224", prune_loc=(1,), keep_ratio=1.0, pretrained_path=str(path),
                                     **TINY).eval()
        student.prune_mode = "none"
        with torch.no_grad():
            assert torch.allclose(student(X), dense(X), atol=1e-6)


def test_match_prior_round_trip(tmp_path):
    """The predictor prior and its learned scale are saved and rebuilt."""
    model = dynvit.build_model("vit_tiny_patch16_224", prune_loc=(1, 3), keep_ratio=[0.6, 0.36],
                               dropped_tokens="merge", predictor_prior="match", **TINY)
    randomize_(model, scale=0.5).eval()
    with torch.no_grad():
        model.predictors[1].match_scale.fill_(3.25)
    save_pretrained(model, tmp_path / "m", classes=CLASSES)
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["dynvit"]["pruning"]["predictor_prior"] == "match"
    loaded = load_pretrained(tmp_path / "m")
    assert loaded.predictor_prior == "match" and loaded.predictors[1].match_scale.item() == 3.25
    with torch.no_grad():
        for mode in ("threshold", "topk"):
            assert torch.equal(model.forward_pruned(X, mode).logits, loaded.forward_pruned(X, mode).logits), mode
