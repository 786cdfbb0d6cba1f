"""Pieces of a fine-tuning recipe: parameter groups and learning rates, the dense control run."""
from __future__ import annotations

import torch

from dynvit.config import load_config
from dynvit.training import create_model, param_groups

TINY = ["--model.name", "vit_tiny_patch16_224", "--model.kwargs", "{img_size: 32, patch_size: 8, depth: 3}",
        "--model.prune_loc", "[1, 2]", "--model.keep_ratio", "0.6"]


def groups(overrides: list[str]) -> dict[str, dict]:
    cfg = load_config(overrides=TINY + overrides)
    model = create_model(cfg, num_classes=4)
    return {g["name"]: g for g in param_groups(model, cfg)}, model


def test_signal_weights_and_match_scale_learn_at_their_own_rate():
    found, model = groups(["--model.predictor_signals", "[attention,redundancy,size]", "--model.predictor_prior", "match",
                           "--optim.signal_lr_scale", "30", "--optim.backbone_lr_scale", "0.1"])
    scalars = found["predictor_scalars_no_decay"]
    assert scalars["lr_scale"] == 30 and scalars["weight_decay"] == 0
    assert {id(p) for p in scalars["params"]} == {id(p) for pred in model.predictors
                                                   for p in (pred.signal_weight, pred.match_scale)}
    assert found["predictors_decay"]["lr_scale"] == 1.0 and found["backbone_decay"]["lr_scale"] == 0.1
    every = [p for g in found.values() for p in g["params"]]
    assert len(every) == len({id(p) for p in every}) == sum(1 for p in model.parameters() if p.requires_grad)


def test_dense_method_is_the_same_fine_tune_without_pruning():
    """``model.method: dense`` (the dense+ft control of the accuracy table) is the plain timm model,
    its backbone at the pruning recipe's backbone learning rate."""
    found, model = groups(["--model.method", "dense", "--optim.backbone_lr_scale", "0.1"])
    assert not hasattr(model, "predictors") and not hasattr(model, "forward_train")
    assert set(found) == {"backbone_decay", "backbone_no_decay"}
    assert all(g["lr_scale"] == 0.1 for g in found.values())
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 4)
