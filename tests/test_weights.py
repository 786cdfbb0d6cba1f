"""Local weight files: timm keys, head reset, position-embedding resize, named mismatches."""
from __future__ import annotations

import pytest
import timm
import torch
from safetensors.torch import save_file

import dynvit
from conftest import randomize_


@pytest.fixture
def dense_file(tmp_path):
    dense = randomize_(timm.create_model("deit_tiny_patch16_224", img_size=64, depth=4, num_classes=10)).eval()
    path = tmp_path / "dense.pth"
    torch.save({"model": dense.state_dict(), "epoch": 3}, path)  # a timm/DeiT-style training checkpoint
    return dense, path


def test_dense_checkpoint_loads_into_patched_model(dense_file, tmp_path):
    dense, path = dense_file
    model = dynvit.build_model(
        "deit_tiny_patch16_224", prune_loc=(1, 2), keep_ratio=1.0, prune_mode="none", pretrained_path=str(path),
        img_size=64, depth=4, num_classes=10,
    ).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), dense(x), atol=1e-5, rtol=0)
    # the same through safetensors
    st = tmp_path / "dense.safetensors"
    save_file(dense.state_dict(), st)
    model2 = dynvit.build_model(
        "deit_tiny_patch16_224", prune_loc=(1, 2), keep_ratio=1.0, prune_mode="none", pretrained_path=str(st),
        img_size=64, depth=4, num_classes=10,
    ).eval()
    with torch.no_grad():
        torch.testing.assert_close(model2(x), dense(x), atol=1e-5, rtol=0)


def test_head_reset_and_pos_embed_resized(dense_file):
    dense, path = dense_file
    model = dynvit.build_model(
        "deit_tiny_patch16_224", prune_loc=(1, 2), keep_ratio=0.7, pretrained_path=str(path),
        img_size=96, depth=4, num_classes=3,
    )
    assert model.head.weight.shape == (3, 192)
    assert model.pos_embed.shape == (1, 1 + 36, 192)
    torch.testing.assert_close(model.blocks[2].mlp.fc1.weight, dense.blocks[2].mlp.fc1.weight)
    torch.testing.assert_close(model.pos_embed[:, 0], dense.pos_embed[:, 0])  # class position untouched


def test_mismatched_checkpoint_names_the_keys(dense_file):
    _, path = dense_file
    with pytest.raises(dynvit.WeightMismatchError, match=r"not in the model: blocks\.3\."):
        dynvit.build_model("deit_tiny_patch16_224", prune_loc=(1,), pretrained_path=str(path), img_size=64, depth=3, num_classes=10)
    with pytest.raises(dynvit.WeightMismatchError, match=r"shape mismatch: .*blocks\.0\.attn\.qkv\.weight"):
        dynvit.build_model("deit_small_patch16_224", prune_loc=(1,), pretrained_path=str(path), img_size=64, depth=4, num_classes=10)


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        dynvit.build_model("deit_tiny_patch16_224", prune_loc=(1,), pretrained_path=str(tmp_path / "nope.pth"), depth=2)


def test_dynvit_checkpoint_restores_predictors(tmp_path):
    model = dynvit.build_model("deit_tiny_patch16_224", prune_loc=(1, 2), keep_ratio=0.5, img_size=64, depth=4, num_classes=5)
    randomize_(model, seed=4).eval()
    save_file(model.state_dict(), tmp_path / "m.safetensors")
    again = dynvit.build_model(
        "deit_tiny_patch16_224", prune_loc=(1, 2), keep_ratio=0.5, img_size=64, depth=4, num_classes=5,
        pretrained_path=str(tmp_path / "m.safetensors"),
    ).eval()
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(again(x), model(x), atol=0, rtol=0)


def test_autocast_bf16_training_pass_is_finite():
    model = dynvit.build_model("deit_tiny_patch16_224", prune_loc=(1, 2), keep_ratio=0.5, img_size=64, depth=4, num_classes=5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.train().forward_train(torch.randn(2, 3, 64, 64), tau=0.1)
    assert torch.isfinite(out.logits.float()).all()
    out.logits.float().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.predictors.parameters() if p.grad is not None)
