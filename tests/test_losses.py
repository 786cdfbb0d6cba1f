"""Loss terms on hand-made masks and logits: what each one pulls towards."""
from __future__ import annotations

import pytest
import torch

from dynvit.losses import decision_margin_loss, keep_ratio_loss


def test_ratio_per_image_and_per_batch():
    # two images keeping 1/4 and 3/4 of four tokens: on average the 0.5 target, each 0.25 away
    masks = [torch.tensor([[1.0, 0, 0, 0], [1, 1, 1, 0]])]
    assert keep_ratio_loss(masks, [0.5], per="image") == pytest.approx(0.0625)
    assert keep_ratio_loss(masks, [0.5], per="batch") == pytest.approx(0.0)
    with pytest.raises(ValueError, match="per"):
        keep_ratio_loss(masks, [0.5], per="token")


def test_margin_hinge_counts_only_the_tokens_a_stage_decides_on():
    logits = [torch.tensor([[0.0, 2.0, -0.5, -3.0]]), torch.tensor([[0.25, 5.0, 0.0, 0.0]])]
    masks = [torch.tensor([[1.0, 1.0, 0.0, 0.0]]), torch.tensor([[1.0, 1.0, 0.0, 0.0]])]
    # stage 0 decides on every token: hinge 1, 0, 0.5, 0; stage 1 only on the two stage 0 kept: 0.75, 0
    expected = ((1 + 0 + 0.5 + 0) / 4 + (0.75 + 0) / 2) / 2
    assert decision_margin_loss(logits, masks, margin=1.0) == pytest.approx(expected)
    # measured from the thresholds the decisions used
    shifted = [lg + 1.0 for lg in logits]
    assert decision_margin_loss(shifted, masks, torch.tensor([1.0, 1.0])) == pytest.approx(expected)


def test_margin_gradient_pushes_logits_away_from_the_threshold():
    logits = torch.tensor([[0.3, -0.2, 4.0]], requires_grad=True)
    decision_margin_loss([logits], [torch.ones(1, 3)]).backward()
    assert logits.grad[0, 0] < 0 < logits.grad[0, 1] and logits.grad[0, 2] == 0  # descent moves them apart


def test_margin_phases_in_as_the_noise_goes():
    from dynvit.losses import PruningLoss
    from dynvit.model import PruningOutput

    out = PruningOutput(torch.zeros(2, 3), [torch.ones(2, 4)], [torch.full((2, 4), 0.25)])
    loss = PruningLoss(torch.nn.CrossEntropyLoss(), (1.0,), ratio_weight=0.0, distill_logits_weight=0.0,
                       distill_tokens_weight=0.0, margin_weight=2.0)
    target = torch.zeros(2, dtype=torch.long)
    cls = loss(out, target, noise_scale=1.0).total
    assert loss(out, target, noise_scale=1.0).margin == 0  # with full noise the term is off
    assert loss(out, target, noise_scale=0.5).total - cls == pytest.approx(2.0 * 0.5 * 0.75)
    assert loss(out, target).total - cls == pytest.approx(2.0 * 0.75)  # callers without annealing: full weight
