"""dynvit.calibrate: thresholds that hit a compute budget on images they never saw."""
from __future__ import annotations

import copy

import pytest
import torch

import dynvit
from conftest import make_decisive_, make_timm

PRUNE_LOC = (1, 3)


def calibrated_model(**kw):
    with torch.random.fork_rng():  # the predictors' initialisation: not whatever ran before
        torch.manual_seed(0)
        model = dynvit.patch(make_timm("deit_tiny"), prune_loc=PRUNE_LOC, keep_ratio=0.7, **kw).eval()
    return make_decisive_(model)


def image_sets(n: int = 96, seed: int = 5):
    """Calibration and held-out images from one distribution (smooth random fields, so patches
    differ in a structured way and predictors give spread-out logits)."""
    g = torch.Generator().manual_seed(seed)
    low = torch.randn(2 * n, 3, 8, 8, generator=g)
    images = torch.nn.functional.interpolate(low, size=64, mode="bilinear", align_corners=False)
    images = images + 0.3 * torch.randn(images.shape, generator=g)
    return images[:n], images[n:]


def kept_fractions(model, images) -> torch.Tensor:
    with torch.no_grad():
        out = model.forward_pruned(images, "threshold")
    return torch.stack([m.float().mean() for m in out.keep_masks])


@pytest.mark.parametrize("budget", [0.9, 0.7, 0.5])
def test_calibration_hits_the_budget_on_held_out_images(budget, one_thread):
    model = calibrated_model()
    calib, held_out = image_sets()
    thresholds = dynvit.calibrate(model, calib, keep_ratio=budget)
    target = torch.tensor([budget, budget**2])
    assert torch.equal(thresholds, model.keep_threshold) and model.keep_ratio == pytest.approx(tuple(target.tolist()))
    # On the calibration images the budget is met to a token or so per stage.
    assert (kept_fractions(model, calib) - target).abs().max() < 2 / (16 * len(calib))
    # On images it never saw, to within a sampling error (96 images of 16 tokens on each side:
    # over predictor initialisations the largest error was 0.037; a quantile taken from the
    # wrong end would keep 1 - budget: at 0.7 that is 0.3, far outside).
    assert (kept_fractions(model, held_out) - target).abs().max() < 0.045
    # and the count still varies per image: the budget is a mean, not a per-image cap
    with torch.no_grad():
        counts = model.forward_pruned(held_out, "threshold").keep_masks[0].sum(1)
    assert counts.min() < counts.max()


def test_calibration_accepts_a_loader_and_stops_at_max_images(one_thread):
    calib, _ = image_sets(48)
    loader = [(calib[i : i + 16], torch.zeros(16, dtype=torch.long)) for i in range(0, 48, 16)]
    a = calibrated_model()
    b = copy.deepcopy(a)
    torch.testing.assert_close(dynvit.calibrate(a, loader, 0.6, max_images=32), dynvit.calibrate(b, calib[:32], 0.6))


def test_calibrated_batch_equals_single_images(one_thread):
    model = calibrated_model(dropped_tokens="merge")
    calib, held_out = image_sets(32)
    dynvit.calibrate(model, calib, keep_ratio=0.6)
    x = held_out[:4]
    with torch.no_grad():
        batch = model.forward_pruned(x, "threshold")
        for i in range(len(x)):
            single = model.forward_pruned(x[i : i + 1], "threshold")
            torch.testing.assert_close(batch.logits[i : i + 1], single.logits, atol=1e-5, rtol=1e-5)


def test_thresholds_survive_save_and_load(tmp_path, one_thread):
    model = calibrated_model()
    model.dynvit_meta = {"model_name": "deit_tiny_patch16_224", "timm_kwargs": {"img_size": 64, "depth": 6, "num_classes": 7}}
    calib, held_out = image_sets(32)
    dynvit.calibrate(model, calib, keep_ratio=0.5)
    loaded = dynvit.load_pretrained(dynvit.save_pretrained(model, tmp_path / "m"))
    assert torch.equal(loaded.keep_threshold, model.keep_threshold) and loaded.keep_ratio == model.keep_ratio
    with torch.no_grad():
        torch.testing.assert_close(loaded(held_out[:4]), model(held_out[:4]))


def test_bad_calibration_input_is_a_clear_error():
    model = calibrated_model()
    calib, _ = image_sets(8)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        dynvit.calibrate(model, calib, keep_ratio=1.2)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        dynvit.calibrate(model, calib, keep_ratio=0.0)
    with pytest.raises(ValueError, match="at least one image"):
        dynvit.calibrate(model, calib[:0], keep_ratio=0.5)
    with pytest.raises(ValueError, match="at least one image"):
        dynvit.calibrate(model, [], keep_ratio=0.5)
    with pytest.raises(TypeError, match="patched by dynvit"):
        dynvit.calibrate(make_timm("deit_tiny"), calib, keep_ratio=0.5)
    with pytest.raises(TypeError, match="image batches"):
        dynvit.calibrate(model, [torch.zeros(3, 64, 64)], keep_ratio=0.5)
    assert torch.equal(model.keep_threshold, torch.zeros(2))  # a failed call changes nothing


def test_unpatched_copy_is_untouched():
    model = calibrated_model()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError):
        dynvit.calibrate(model, image_sets(8)[0], keep_ratio=(0.5, 0.7))  # increasing: rejected
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
