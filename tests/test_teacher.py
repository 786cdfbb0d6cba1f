"""The frozen teacher: stored in the student's training dtype, run without autograd."""
from __future__ import annotations

import torch

import dynvit
from dynvit.losses import PruningLoss, classification_criterion
from dynvit.training import create_teacher

TINY = dict(img_size=32, patch_size=8, embed_dim=48, depth=4, num_heads=2, mlp_ratio=2.0, num_classes=10)


def test_bf16_teacher_matches_the_float32_one_under_autocast():
    torch.manual_seed(0)
    model = dynvit.build_model("vit_tiny_patch16_224", prune_loc=(1, 2), keep_ratio=0.7, **TINY)
    x = torch.randn(4, 3, 32, 32)
    fp32, bf16 = create_teacher(model), create_teacher(model, torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in bf16.parameters())
    assert not bf16.training
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected, got = fp32(x).float(), bf16(x).float()
    torch.testing.assert_close(got, expected, atol=0.05, rtol=0.05)


def test_inference_mode_targets_feed_the_loss():
    # Outputs made under inference_mode are used by a loss that is back-propagated.
    torch.manual_seed(0)
    model = dynvit.build_model("vit_tiny_patch16_224", prune_loc=(1, 2), keep_ratio=0.7, **TINY).train()
    teacher = create_teacher(model)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    out = dynvit.TrainingModel(model)(x, tau=1.0)
    with torch.inference_mode():
        tokens = teacher.forward_features(x)
        logits = teacher.forward_head(tokens)
    criterion = PruningLoss(classification_criterion(mixup=False, smoothing=0.0), model.keep_ratio)
    criterion(out, y, logits, tokens, model.num_prefix_tokens).total.backward()
    assert all(p.grad is not None for p in model.predictors.parameters())
