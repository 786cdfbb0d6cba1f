"""Config as data: presets load, flags override with the field's type, mistakes are named."""
from __future__ import annotations

import sys

import pytest
import yaml

from conftest import REPO
from dynvit.config import Config, ConfigError, load_config, save_config, to_dict

PRESETS = sorted((REPO / "configs").glob("*.yaml"))


def test_every_preset_loads():
    assert {p.name for p in PRESETS} >= {
        "deit_tiny_dynamicvit.yaml", "deit_small_dynamicvit.yaml", "deit_base_dynamicvit.yaml",
        "cifar10_dense.yaml", "cifar10_dynvit.yaml", "smoke.yaml",
    }
    for path in PRESETS:
        assert isinstance(load_config(path), Config), path


@pytest.mark.parametrize("arch, ratio_weight, drop_path", [("tiny", 2.0, 0.0), ("small", 2.0, 0.0), ("base", 5.0, 0.2)])
def test_deit_presets_mirror_dynamicvit(arch, ratio_weight, drop_path):
    cfg = load_config(REPO / "configs" / f"deit_{arch}_dynamicvit.yaml")
    assert cfg.model.name == f"deit_{arch}_patch16_224" and cfg.model.pretrained
    assert cfg.model.prune_loc == [3, 6, 9] and cfg.model.keep_ratio == 0.7
    assert (cfg.train.epochs, cfg.data.batch_size, cfg.optim.lr, cfg.optim.min_lr) == (30, 1024, 1e-3, 1e-6)
    assert (cfg.optim.warmup_epochs, cfg.optim.backbone_freeze_epochs, cfg.optim.backbone_lr_scale) == (5, 5, 0.01)
    assert (cfg.loss.cls_weight, cfg.loss.distill_logits_weight, cfg.loss.distill_tokens_weight) == (1.0, 0.5, 0.5)
    assert cfg.loss.ratio_weight == ratio_weight and cfg.model.drop_path_rate == drop_path
    assert (cfg.aug.mixup, cfg.aug.cutmix, cfg.aug.smoothing, cfg.aug.re_prob) == (0.8, 1.0, 0.1, 0.25)
    assert cfg.optim.ema and cfg.optim.ema_decay == 0.9999
    # unlike DynamicViT, the noise goes to 0 over 70% of the run: the end trains threshold mode's decisions
    assert (cfg.noise.kind, cfg.noise.scale_start, cfg.noise.scale_end, cfg.noise.anneal_epochs) == ("linear", 1.0, 0.0, 21)
    assert cfg.optim.grad_accum_steps is None and cfg.train.calibrate_images == 1000  # the launcher's; calibrated


def test_the_paper_variant_is_dynamicvit_exactly():
    ours = load_config(REPO / "configs" / "deit_small_dynamicvit.yaml")
    paper = load_config(REPO / "configs" / "deit_small_dynamicvit_paper.yaml")
    assert paper.noise == type(paper.noise)()  # Bernoulli masks (noise scale 1) throughout
    assert paper.train.mixed_precision == "no" and paper.train.eval_modes[0] == "topk"  # fp32; top-k, as measured
    assert not paper.model.drop_tokens and ours.model.drop_tokens  # DynamicViT's masked path; ours drops (cheaper)
    same = {**to_dict(paper), "noise": to_dict(ours)["noise"]}
    same["model"] = {**same["model"], "drop_tokens": True}
    same["train"] = {**same["train"], **{k: to_dict(ours)["train"][k] for k in ("output_dir", "mixed_precision",
                                                                                  "eval_modes")}}
    assert same == to_dict(ours)


def test_cifar_fine_tune_matches_its_dense_model():
    dense = load_config(REPO / "configs" / "cifar10_dense.yaml")
    prune = load_config(REPO / "configs" / "cifar10_dynvit.yaml")
    assert dense.model.prune_loc == [] and prune.model.prune_loc
    assert (dense.model.name, dense.model.kwargs) == (prune.model.name, prune.model.kwargs)
    assert prune.model.pretrained_path == f"{dense.train.output_dir}/final"


def test_overrides_are_typed():
    cfg = load_config(REPO / "configs" / "smoke.yaml", [
        "--optim.lr", "3e-4", "--model.prune_loc", "1,3", "--model.keep_ratio=[0.8, 0.5]",
        "--model.kwargs.depth", "5", "--optim.ema", "true", "--model.pretrained_path", "null",
        "--train.epochs=4", "--optim.clip_grad", "2", "--data.path", "123",
    ])
    assert cfg.optim.lr == 3e-4 and isinstance(cfg.optim.lr, float)
    assert cfg.model.prune_loc == [1, 3] and cfg.model.keep_ratio == [0.8, 0.5]
    assert cfg.model.kwargs["depth"] == 5 and cfg.model.kwargs["embed_dim"] == 48  # one entry changed, rest kept
    assert cfg.optim.ema is True and cfg.model.pretrained_path is None
    assert cfg.train.epochs == 4 and cfg.optim.clip_grad == 2.0
    assert cfg.data.path == "123"  # a str field keeps the text


@pytest.mark.parametrize("args, words", [
    (["--optim.lrr", "1"], ["optim.lrr", "Did you mean 'optim.lr'", "min_lr", "backbone_lr_scale"]),
    (["--modell.name", "x"], ["modell.name", "Did you mean 'model'", "optim.*"]),
    (["--lr", "1"], ["'lr'", "model.*"]),
    (["--optim.lr", "abc"], ["optim.lr", "expected float", "'abc'"]),
    (["--train.epochs", "1.5"], ["train.epochs", "expected int", "1.5"]),
    (["--train.epochs", "0"], ["train.epochs", "> 0"]),
    (["--optim.weight_decay", "-1"], ["optim.weight_decay", ">= 0"]),
    (["--train.mixed_precision", "fp8"], ["train.mixed_precision", "'fp8'", "bf16"]),
    (["--model.prune_loc", "[a, b]"], ["model.prune_loc[0]", "expected int"]),
    (["--optim.ema", "maybe"], ["optim.ema", "expected bool"]),
    (["--model.kwargs", "3"], ["model.kwargs", "mapping"]),
    (["--optim.lr"], ["--optim.lr needs a value"]),
    (["--aug.scale", "[0.9, 0.1]"], ["aug.scale"]),
    (["--model.predictor_prior", "tome"], ["model.predictor_prior", "'tome'", "match"]),
])
def test_bad_flags_are_named(args, words):
    with pytest.raises(ConfigError) as e:
        load_config(REPO / "configs" / "smoke.yaml", args)
    for word in words:
        assert word in str(e.value), (word, str(e.value))


def test_bad_yaml_keys_are_named(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"optim": {"lr": 1e-3, "warmup_epoch": 2}}))
    with pytest.raises(ConfigError, match=r"optim\.warmup_epoch.*Did you mean 'optim\.warmup_epochs'.*Valid keys"):
        load_config(path)
    path.write_text(yaml.safe_dump({"optim": 3}))
    with pytest.raises(ConfigError, match="optim: expected a mapping"):
        load_config(path)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(REPO / "configs" / "cifar10_dynvit.yaml", ["--optim.lr", "5e-4", "--model.kwargs.depth", "4"])
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg
    assert yaml.safe_load((tmp_path / "config.yaml").read_text()) == to_dict(cfg)
    assert [p.name for p in tmp_path.iterdir()] == ["config.yaml"]  # no temp file left behind


def test_train_script_reports_config_errors(capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO))
    monkeypatch.setattr(sys, "argv", ["train.py"])
    import train

    with pytest.raises(SystemExit) as e:
        train.main(["--config", str(REPO / "configs" / "smoke.yaml"), "--optim.lrr", "1"])
    assert e.value.code == 2
    assert "unknown config key 'optim.lrr'" in capsys.readouterr().err
