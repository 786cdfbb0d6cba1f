"""GMACs against DynamicViT's published table, and monotone in the keep ratio."""
from __future__ import annotations

import pytest
import timm
import torch

import dynvit


@pytest.mark.parametrize(
    "name, dense_ref, pruned_ref",
    [("deit_small_patch16_224", 4.6, 2.9), ("deit_base_patch16_224", 17.6, 11.4)],
)
def test_dynamicvit_table(name, dense_ref, pruned_ref):
    model = dynvit.build_model(name, prune_loc=(3, 6, 9), keep_ratio=0.7)
    dense = dynvit.count_flops(model, mode="none")
    pruned = dynvit.count_flops(model, mode="topk")
    assert dense == pytest.approx(dense_ref, rel=0.04)
    assert pruned == pytest.approx(pruned_ref, rel=0.04)
    # the dense count equals that of the unpatched timm model (attention included)
    assert dense == pytest.approx(dynvit.count_flops(timm.create_model(name).eval()), rel=1e-9)


def test_attention_is_counted():
    # fvcore alone counts nothing for scaled_dot_product_attention; our handle adds q@k^T and attn@v.
    model = timm.create_model("vit_tiny_patch16_224", img_size=64, depth=2).eval()
    n, c = 17, 192
    with_attn = dynvit.count_flops(model, (3, 64, 64)) * 1e9
    from fvcore.nn import FlopCountAnalysis

    plain = FlopCountAnalysis(model, torch.randn(1, 3, 64, 64)).unsupported_ops_warnings(False).total()
    assert with_attn - plain == pytest.approx(2 * 2 * n * n * c)


def test_gmacs_fall_with_keep_ratio():
    model = dynvit.build_model("deit_tiny_patch16_224", prune_loc=(3, 6, 9), keep_ratio=1.0, img_size=96)
    gmacs = []
    for r in (1.0, 0.9, 0.8, 0.7, 0.5, 0.3):
        model.keep_ratio = r
        gmacs.append(dynvit.count_flops(model, (3, 96, 96), mode="topk"))
    assert all(b < a for a, b in zip(gmacs, gmacs[1:])), gmacs


def test_threshold_mode_needs_images_and_averages_them():
    model = dynvit.build_model("deit_tiny_patch16_224", prune_loc=(3,), keep_ratio=0.5, img_size=64)
    with pytest.raises(ValueError, match="images"):
        dynvit.count_flops(model, (3, 64, 64), mode="threshold")
    with torch.no_grad():
        model.predictors[0].out_mlp[-1].bias.fill_(-50.0)  # keep one token only
        model.predictors[0].out_mlp[-1].weight.zero_()
    one_token = dynvit.count_flops(model, (3, 64, 64), mode="threshold", images=torch.randn(3, 3, 64, 64))
    model.keep_ratio = 1 / 16
    assert one_token == pytest.approx(dynvit.count_flops(model, (3, 64, 64), mode="topk"))


def test_threshold_gmacs_are_the_mean_over_every_image():
    """Grouping images by their kept counts gives the mean of tracing every image on its own."""
    from conftest import make_decisive_

    torch.manual_seed(0)
    model = dynvit.build_model("deit_tiny_patch16_224", prune_loc=(1, 3), keep_ratio=0.6, img_size=64, depth=4,
                               dropped_tokens="merge").eval()
    make_decisive_(model)
    images = torch.randn(8, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    images = torch.cat([images, images[:3]])  # some images alike, so some groups hold several
    with torch.no_grad():
        counts = {tuple(int(m[i].sum()) for m in model.forward_pruned(images, "threshold").keep_masks) for i in range(11)}
    assert 1 < len(counts) < 11, "test needs images that keep different counts"
    each = [dynvit.count_flops(model, (3, 64, 64), mode="threshold", images=img[None]) for img in images]
    grouped = dynvit.count_flops(model, (3, 64, 64), mode="threshold", images=images.split(4))
    assert grouped == pytest.approx(sum(each) / len(each), rel=1e-9)
