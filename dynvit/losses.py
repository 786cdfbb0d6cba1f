"""DynamicViT's training objective, as named terms.

``total = cls_weight * cls + ratio_weight * ratio + distill_logits_weight * distill_logits
+ distill_tokens_weight * distill_tokens``, where

* ``cls``: cross-entropy with the labels (soft targets under Mixup, smoothed otherwise);
* ``ratio``: per image and stage, the squared gap between the kept fraction of patch tokens
  and the stage's target fraction, averaged over images and stages;
* ``distill_logits``: ``KL(teacher || student)`` of the class distributions (temperature 1,
  batch mean), as DynamicViT;
* ``distill_tokens``: mean squared error between the student's and the teacher's final
  (normed) patch tokens, over the tokens the student kept;
* ``margin``: how far decisions sit from their threshold, ``relu(margin - |logit - threshold|)``
  averaged over the tokens a stage decides on. Once training masks are the deterministic
  threshold decisions (noise scale 0), nothing else keeps logits away from the threshold, and
  a step of the ratio term then flips many decisions at once; this term keeps them decisive.

Nothing here synchronises with the device: no ``.item()``, no boolean indexing.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from torch import nn

__all__ = ["LossTerms", "PruningLoss", "classification_criterion", "keep_ratio_loss", "distill_logits_loss",
           "distill_tokens_loss", "decision_margin_loss"]


@dataclass
class LossTerms:
    total: torch.Tensor  # the weighted sum that is back-propagated
    cls: torch.Tensor  # classification
    ratio: torch.Tensor  # keep-ratio regulariser (unweighted)
    distill_logits: torch.Tensor  # KL to the teacher's logits (unweighted)
    distill_tokens: torch.Tensor  # MSE to the teacher's kept tokens (unweighted)
    margin: torch.Tensor  # decision margin hinge (unweighted)

    def as_dict(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def classification_criterion(*, mixup: bool, smoothing: float) -> nn.Module:
    """timm's soft-target cross-entropy under Mixup (which smooths the targets itself),
    label-smoothing cross-entropy otherwise."""
    if mixup:
        return SoftTargetCrossEntropy()
    if smoothing > 0:
        return LabelSmoothingCrossEntropy(smoothing=smoothing)
    return nn.CrossEntropyLoss()


def keep_ratio_loss(keep_masks: Sequence[torch.Tensor], targets: Sequence[float], per: str = "image") -> torch.Tensor:
    """Squared gap between kept fraction and target, averaged over stages.

    Args:
        keep_masks: per stage ``(B, N0)`` cumulative masks.
        targets: cumulative fraction per stage.
        per: ``image`` (each image's fraction is pulled to the target, then the gaps are
            averaged: DynamicViT) or ``batch`` (only the batch's mean fraction is, so images may
            keep different counts).
    """
    if len(keep_masks) != len(targets):
        raise ValueError(f"{len(keep_masks)} keep masks for {len(targets)} target ratios")
    if per not in ("image", "batch"):
        raise ValueError(f"per must be 'image' or 'batch', got {per!r}")
    fractions = [m.float().mean(dim=1) for m in keep_masks]
    if per == "batch":
        fractions = [f.mean(dim=0, keepdim=True) for f in fractions]
    return torch.stack([((f - t) ** 2).mean() for f, t in zip(fractions, targets)]).mean()


def distill_logits_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """``KL(softmax(teacher) || softmax(student))``, batch mean, computed in float32."""
    return F.kl_div(
        F.log_softmax(student.float(), dim=-1), F.log_softmax(teacher.float(), dim=-1), reduction="batchmean", log_target=True
    )


def distill_tokens_loss(student: torch.Tensor, teacher: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """Squared error per channel, averaged over the kept patch tokens.

    Args:
        student, teacher: ``(B, N0, C)`` final patch tokens.
        keep: ``(B, N0)`` keep mask (tokens with weight > 0.5 count); None = all tokens.
    """
    per_token = (student.float() - teacher.float()).pow(2).mean(dim=-1)  # (B, N0)
    if keep is None:
        return per_token.mean()
    w = (keep.detach() > 0.5).to(per_token.dtype)
    return (per_token * w).sum() / w.sum().clamp_min(1.0)


def decision_margin_loss(
    keep_logits: Sequence[torch.Tensor],
    keep_masks: Sequence[torch.Tensor],
    thresholds: torch.Tensor | None = None,
    margin: float = 1.0,
) -> torch.Tensor:
    """Mean over stages of ``relu(margin - |logit - threshold|)`` over the tokens each stage
    decides on (those kept by the stage before).

    Args:
        keep_logits: per stage ``(B, N0)`` predictor logits.
        keep_masks: per stage ``(B, N0)`` cumulative keep masks (the previous stage's mask
            selects the tokens stage ``s`` decides on).
        thresholds: ``(stages,)`` logit thresholds; None = 0 (keep probability 0.5).
        margin: the distance from the threshold below which a decision is penalised.
    """
    terms = []
    for s, logits in enumerate(keep_logits):
        gap = logits.float() - (thresholds[s].float() if thresholds is not None else 0.0)
        hinge = torch.relu(margin - gap.abs())
        if s == 0:
            terms.append(hinge.mean())
        else:
            alive = (keep_masks[s - 1].detach() > 0.5).float()
            terms.append((hinge * alive).sum() / alive.sum().clamp_min(1.0))
    return torch.stack(terms).mean()


class PruningLoss(nn.Module):
    """DynamicViT's loss with named terms; DynamicViT's DeiT weights are the defaults.

    Args:
        criterion: classification criterion (see :func:`classification_criterion`).
        keep_ratio: cumulative target fraction per stage (``model.keep_ratio``); empty for a
            dense model (the ratio term is then 0).
        cls_weight, ratio_weight, distill_logits_weight, distill_tokens_weight: term weights.
        ratio_per: ``image`` or ``batch``, see :func:`keep_ratio_loss`.
        margin_weight, margin: weight and width of :func:`decision_margin_loss` (0: off).
    """

    def __init__(
        self,
        criterion: nn.Module,
        keep_ratio: Sequence[float] = (),
        *,
        cls_weight: float = 1.0,
        ratio_weight: float = 2.0,
        distill_logits_weight: float = 0.5,
        distill_tokens_weight: float = 0.5,
        ratio_per: str = "image",
        margin_weight: float = 0.0,
        margin: float = 1.0,
    ):
        super().__init__()
        self.ratio_per = ratio_per
        self.margin_weight, self.margin = margin_weight, margin
        self.criterion = criterion
        self.keep_ratio = tuple(float(r) for r in keep_ratio)
        self.cls_weight = cls_weight
        self.ratio_weight = ratio_weight
        self.distill_logits_weight = distill_logits_weight
        self.distill_tokens_weight = distill_tokens_weight

    @property
    def needs_teacher(self) -> bool:
        return self.distill_logits_weight > 0 or self.distill_tokens_weight > 0

    def forward(
        self,
        output,
        target: torch.Tensor,
        teacher_logits: torch.Tensor | None = None,
        teacher_tokens: torch.Tensor | None = None,
        num_prefix_tokens: int = 0,
        noise_scale: float = 0.0,
    ) -> LossTerms:
        """Loss terms for a :class:`dynvit.PruningOutput` of the training pass.

        Args:
            output: student output (``logits``, ``keep_masks``, ``tokens``, ``token_mask``).
            target: class indices ``(B,)`` or soft targets ``(B, K)``.
            teacher_logits: ``(B, K)``; required when ``distill_logits_weight > 0``.
            teacher_tokens: ``(B, P + N0, C)`` teacher's final normed tokens; required when
                ``distill_tokens_weight > 0``.
            num_prefix_tokens: ``P``, tokens before the patch tokens in both token tensors.
            noise_scale: the sampler's noise scale at this step; the margin term is weighted by
                ``1 - noise_scale``, so it phases in as the masks become deterministic (with
                noise, the samples are decisive already; a margin from the start would lock each
                stage's decisions on the side of the threshold where initialisation put them).
        """
        zero = output.logits.new_zeros((), dtype=torch.float32)
        cls = self.criterion(output.logits.float(), target)
        ratio = keep_ratio_loss(output.keep_masks, self.keep_ratio, self.ratio_per) if self.keep_ratio else zero
        distill_logits = distill_tokens = zero
        if self.distill_logits_weight > 0:
            if teacher_logits is None:
                raise ValueError("distill_logits_weight > 0 needs teacher_logits")
            distill_logits = distill_logits_loss(output.logits, teacher_logits)
        if self.distill_tokens_weight > 0:
            if teacher_tokens is None or output.tokens is None:
                raise ValueError("distill_tokens_weight > 0 needs teacher_tokens and a training output with tokens")
            p = num_prefix_tokens
            distill_tokens = distill_tokens_loss(output.tokens[:, p:], teacher_tokens[:, p:], output.token_mask)
        margin = zero
        if self.margin_weight > 0 and output.keep_logits and noise_scale < 1:
            margin = decision_margin_loss(output.keep_logits, output.keep_masks, output.keep_thresholds, self.margin)
        total = (
            self.cls_weight * cls
            + self.ratio_weight * ratio
            + self.distill_logits_weight * distill_logits
            + self.distill_tokens_weight * distill_tokens
            + self.margin_weight * (1.0 - noise_scale) * margin
        )
        return LossTerms(total, cls, ratio, distill_logits, distill_tokens, margin)
