"""Shared fixtures: small timm ViTs with weights perturbed so every parameter matters."""
from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest
import timm
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))

REPO = Path(__file__).resolve().parents[1]
CIFAR10 = Path(os.environ.get("DYNVIT_CIFAR10", REPO.parent / "shared" / "data" / "cifar10"))

# Small members of every supported family: (timm name, kwargs). depth 6 keeps them fast.
SMALL = dict(img_size=64, depth=6, num_classes=7)
FAMILIES = {
    "deit_tiny": ("deit_tiny_patch16_224", {}),
    "deit_distilled": ("deit_tiny_distilled_patch16_224", {}),
    "registers": ("vit_tiny_patch16_224", {"reg_tokens": 4}),
    "deit3_layerscale": ("deit3_small_patch16_224", {"embed_dim": 192, "num_heads": 3}),
    "qk_norm": ("vit_tiny_patch16_224", {"qk_norm": True}),
    "avg_pool": ("vit_tiny_patch16_224", {"global_pool": "avg", "class_token": False}),
}


def randomize_(model: torch.nn.Module, seed: int = 0, scale: float = 0.05) -> torch.nn.Module:
    """Add noise to every parameter so that norms, LayerScale, prefix tokens and heads all matter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return model


def make_timm(family: str, seed: int = 0, **overrides) -> torch.nn.Module:
    name, kwargs = FAMILIES[family]
    model = timm.create_model(name, pretrained=False, **{**SMALL, **kwargs, **overrides})
    return randomize_(model, seed).eval()


def make_decisive_(model: torch.nn.Module, image_size: int = 64, seed: int = 2) -> torch.nn.Module:
    """Perturb a patched model's predictors so they keep about half the tokens with logits of
    order 1 (each last bias shifted by the median logit on random probes), so that threshold
    decisions differ between images."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pred in model.predictors:
            for p in pred.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.15)
        probe = torch.randn(8, 3, image_size, image_size, generator=g)
        n = model.patch_embed.num_patches
        ones = [torch.ones(8, n)] * len(model.prune_loc)
        for pred, logits in zip(model.predictors, model.forward_train(probe, masks=ones).keep_logits):
            pred.out_mlp[-1].bias.sub_(logits.median())
    return model


@pytest.fixture
def one_thread():
    """Tiny models gain nothing from a second thread and lose a lot when the cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def images():
    g = torch.Generator().manual_seed(1)
    return torch.randn(4, 3, 64, 64, generator=g)


def cifar_dir(split: str = "test") -> Path:
    path = CIFAR10 / split
    if not path.is_dir():
        pytest.skip(f"shared CIFAR-10 copy not found at {path}")
    return path


def populate_hf_cache(cache: Path, repo_id: str, folder: Path, commit: str = "0123456789abcdef" * 2 + "01234567") -> None:
    """Lay ``folder`` out as huggingface_hub caches a downloaded model repo: blobs named by
    content hash, a snapshot of symlinks per commit, ``refs/main`` naming the commit."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "blobs").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for path in folder.iterdir():
        blob = repo / "blobs" / hashlib.sha256(path.read_bytes()).hexdigest()
        shutil.copyfile(path, blob)
        (snapshot / path.name).symlink_to(os.path.relpath(blob, snapshot))


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """An empty Hugging Face cache in a tmp dir, the Hub switched off (HF_HUB_OFFLINE=1)."""
    from huggingface_hub import constants

    cache = tmp_path / "hf_cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))  # read at import; the library reads these now
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache
