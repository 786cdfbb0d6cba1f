"""The pruning forward passes that :func:`dynvit.patch` grafts onto a timm VisionTransformer.

:class:`DynViTMixin` is placed in front of the model's own class (ToMe style), so every timm
method and the pretrained weights keep working; only ``forward`` changes, and the two extra
passes have their own names:

* :meth:`DynViTMixin.forward_train`: the masked path. Every token is computed; predictors
  sample keep masks, a dropped token stays dropped, and the mask gates attention.
* :meth:`DynViTMixin.forward_pruned`: the real pruning path. Kept tokens are gathered and
  the later blocks run on them alone.
* :meth:`DynViTMixin.forward_train_dropping`: the masked path until the first block of each
  stage, then gathered like the pruning path (a cheaper training step).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .attention import masked_block
from .gumbel import SAMPLERS, sample_keep_mask
from .ratios import check_prune_mode, normalize_keep_ratio
from .tokens import batch_gather, compact_indices, gather_tokens, num_kept, threshold_indices, topk_indices

__all__ = ["PruningOutput", "DynViTMixin", "TrainingModel"]


@dataclass
class PruningOutput:
    """What a pruning forward pass produces besides the logits.

    ``N0`` is the number of patch tokens of the input; masks are indexed by original patch
    position, whatever the path.
    """

    logits: torch.Tensor  # (B, num_classes)
    keep_masks: list[torch.Tensor] = field(default_factory=list)  # per stage, (B, N0) cumulative keep mask
    keep_logits: list[torch.Tensor] = field(default_factory=list)  # per stage, (B, N0) predictor logits (training path)
    tokens: torch.Tensor | None = None  # (B, P + N0, C) final normed tokens (training path)
    token_mask: torch.Tensor | None = None  # (B, N0) final cumulative keep mask (training path)


class DynViTMixin:
    """Modifications to a timm ``VisionTransformer``:

    - ``forward`` returns logits; in eval mode it prunes tokens per ``prune_mode``
      (``threshold``, ``topk`` or ``none``), in train mode it runs the masked path at tau 1.
    - adds ``forward_train`` (masked path, :class:`PruningOutput`), ``forward_pruned``
      (gathering path, :class:`PruningOutput`) and ``forward_train_dropping`` (masked, then
      gathering after each stage's first block, :class:`PruningOutput`).
    - adds ``predictors`` (one :class:`~dynvit.predictor.TokenPredictor` per stage) and the
      settings ``prune_loc``, ``keep_ratio``, ``prune_mode``, ``sampler``.
    """

    # ---- settings ---------------------------------------------------------------------
    @property
    def keep_ratio(self) -> tuple[float, ...]:
        """Cumulative kept fraction of the patch tokens after each stage."""
        return self._keep_ratio

    @keep_ratio.setter
    def keep_ratio(self, value) -> None:
        self._keep_ratio = normalize_keep_ratio(value, len(self.prune_loc))

    @property
    def prune_mode(self) -> str:
        """How an eval-mode model prunes: ``threshold``, ``topk`` or ``none`` (dense)."""
        return self._prune_mode

    @prune_mode.setter
    def prune_mode(self, value: str) -> None:
        self._prune_mode = check_prune_mode(value)

    @property
    def sampler(self) -> str:
        """Training-time mask sampler: ``gumbel``, ``deterministic`` or ``soft``."""
        return self._sampler

    @sampler.setter
    def sampler(self, value: str) -> None:
        if value not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {value!r}")
        self._sampler = value

    def dynvit_config(self) -> dict:
        """The dynvit settings, enough to patch the same timm model again."""
        return {
            "prune_loc": list(self.prune_loc),
            "keep_ratio": list(self.keep_ratio),
            "prune_mode": self.prune_mode,
            "sampler": self.sampler,
            "predictor_hidden_ratio": self.predictor_hidden_ratio,
        }

    # ---- shared pieces ------------------------------------------------------------------
    def check_input(self, x: torch.Tensor) -> None:
        """Raise a clear error for an image batch this model cannot take."""
        if x.dim() != 4:
            raise ValueError(f"expected an image batch (B, C, H, W), got shape {tuple(x.shape)}")
        pe = self.patch_embed
        in_chans = pe.proj.in_channels
        if x.shape[1] != in_chans:
            raise ValueError(f"expected {in_chans} input channels, got {x.shape[1]} (input shape {tuple(x.shape)})")
        h, w = x.shape[-2:]
        if pe.strict_img_size and not self.dynamic_img_size and (h, w) != tuple(pe.img_size):
            raise ValueError(
                f"input size {h}x{w} does not match the model's {pe.img_size[0]}x{pe.img_size[1]}; resize the images, "
                f"or build the model with img_size=({h}, {w}) (position embeddings are resampled) or dynamic_img_size=True"
            )
        ph, pw = pe.patch_size
        if not getattr(pe, "dynamic_img_pad", False) and (h % ph or w % pw):
            raise ValueError(f"input size {h}x{w} is not divisible by the patch size {ph}x{pw}; resize or pad the images")

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        x = self.patch_embed(x)
        x = self._pos_embed(x)
        x = self.patch_drop(x)
        return self.norm_pre(x)

    def _head(self, x: torch.Tensor, patch_weight: torch.Tensor | None) -> torch.Tensor:
        """Logits from final tokens; ``patch_weight`` ``(B, N)`` excludes dropped or padded
        patch tokens from average pooling (token pooling reads prefix tokens only)."""
        if patch_weight is None or self.global_pool == "token":
            return self.forward_head(x)
        p = self.num_prefix_tokens
        prefix_w = float(self.pool_include_prefix)
        w = torch.cat([patch_weight.new_full((x.shape[0], p), prefix_w), patch_weight.to(x.dtype)], dim=1).unsqueeze(-1)
        pooled = (x * w).sum(dim=1) / w.sum(dim=1).clamp_min(1e-6)
        return self.head(self.head_drop(self.fc_norm(pooled)))

    def _stage_of_block(self) -> dict[int, int]:
        return {b: s for s, b in enumerate(self.prune_loc)}

    # ---- passes -----------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits. Eval mode prunes per ``prune_mode``; train mode runs the masked path (tau 1)."""
        if self.training:
            return self.forward_train(x).logits
        if self.prune_mode == "none":
            self.check_input(x)
            return super().forward(x)
        return self.forward_pruned(x, masks=False).logits

    def forward_train(self, x: torch.Tensor, tau: float = 1.0, masks: list[torch.Tensor] | None = None) -> PruningOutput:
        """Masked path: all tokens are computed, dropped ones are hidden from attention.

        Args:
            x: images ``(B, C, H, W)``.
            tau: temperature of the mask relaxation (see :mod:`dynvit.schedule`).
            masks: optional fixed per-stage keep masks ``(B, N0)`` (0/1) to use instead of
                sampling, e.g. to replay the decisions of :meth:`forward_pruned`.
        """
        if masks is not None and len(masks) != len(self.prune_loc):
            raise ValueError(f"got {len(masks)} masks for {len(self.prune_loc)} stages")
        x = self._embed(x)
        p = self.num_prefix_tokens
        stage_of = self._stage_of_block()
        mask = None  # (B, N0) cumulative patch keep mask, None before the first stage
        keep_masks, keep_logits = [], []
        for i, blk in enumerate(self.blocks):
            s = stage_of.get(i)
            if s is not None:
                logits = self.predictors[s](x[:, p:], mask)
                decision = sample_keep_mask(logits, tau, self.sampler) if masks is None else masks[s].to(logits.dtype)
                mask = decision if mask is None else decision * mask
                keep_masks.append(mask)
                keep_logits.append(logits)
            if mask is None:
                x = self._run_block(blk, x)
            else:
                x = self._run_block(masked_block, blk, x, torch.cat([mask.new_ones(mask.shape[0], p), mask], dim=1))
        x = self.norm(x)
        return PruningOutput(self._head(x, mask), keep_masks, keep_logits, x, mask)

    def forward_train_dropping(
        self, x: torch.Tensor, tau: float = 1.0, masks: list[torch.Tensor] | None = None
    ) -> PruningOutput:
        """Masked path that really drops: after the first block of each stage, the tokens it
        dropped are removed, and later blocks run on the kept ones (a batch padded to its
        largest count, the padding masked out of attention).

        Same arguments and output as :meth:`forward_train` (masks, logits and tokens indexed
        by original patch position; logits of tokens dropped at an earlier stage are -inf).
        For the same decisions the logits, the loss and the backbone's gradients are those of
        :meth:`forward_train`: dropped tokens are hidden from kept ones in both. The keep mask
        of a kept token still gets gradient from every later block (it stays in their
        attention as a bias); that of a dropped token only from the first block of its stage.
        """
        if masks is not None and len(masks) != len(self.prune_loc):
            raise ValueError(f"got {len(masks)} masks for {len(self.prune_loc)} stages")
        x = self._embed(x)
        B, p = x.shape[0], self.num_prefix_tokens
        n0 = x.shape[1] - p
        stage_of = self._stage_of_block()
        position = torch.arange(n0, device=x.device).expand(B, n0)  # original index of each current patch token
        mask = None  # (B, N) cumulative keep mask of the current patch tokens; 0 for dropped and padding
        keep_masks, keep_logits = [], []

        def full(values: torch.Tensor, fill: float) -> torch.Tensor:  # (B, N) current -> (B, N0) original order
            return values.new_full((B, n0), fill).scatter(1, position, values)

        for i, blk in enumerate(self.blocks):
            s = stage_of.get(i)
            if s is not None:
                logits = self.predictors[s](x[:, p:], mask)
                if masks is None:
                    decision = sample_keep_mask(logits, tau, self.sampler)
                else:
                    decision = batch_gather(masks[s].to(logits.dtype), position)
                mask = decision if mask is None else decision * mask
                keep_masks.append(full(mask, 0.0))
                keep_logits.append(full(logits, float("-inf")))
            if mask is None:
                x = self._run_block(blk, x)
                continue
            x = self._run_block(masked_block, blk, x, torch.cat([mask.new_ones(B, p), mask], dim=1))
            if s is not None:  # drop for real after the stage's first block
                keep = mask.detach() > 0
                keep[:, :1] |= ~keep.any(dim=1, keepdim=True)  # at least one slot per image
                index, valid = compact_indices(keep)
                x = gather_tokens(x, index, p)
                mask = torch.where(valid, batch_gather(mask, index), 0.0)  # padding: 0, no gradient
                position = batch_gather(position, index)
        x = self.norm(x)
        logits = self._head(x, mask)
        tokens = x.new_zeros(B, n0, x.shape[-1]).scatter(1, position.unsqueeze(-1).expand(-1, -1, x.shape[-1]), x[:, p:])
        return PruningOutput(logits, keep_masks, keep_logits, torch.cat([x[:, :p], tokens], dim=1), full(mask, 0.0))

    def _run_block(self, fn, *args):
        # Honour timm's set_grad_checkpointing() in the training path.
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)

    def forward_pruned(self, x: torch.Tensor, mode: str | None = None, *, masks: bool = True) -> PruningOutput:
        """Real pruning: kept tokens are gathered and later blocks run on them alone.

        ``topk`` keeps ``round(keep_ratio[s] * N0)`` tokens at stage ``s`` for every image.
        ``threshold`` keeps the tokens whose keep probability is > 0.5 (at least one); a
        batch is padded to its largest count and the padding is masked out of attention and
        pooling, so each image gets the logits it would get alone. ``masks=False`` skips the
        ``keep_masks`` bookkeeping (``forward`` needs the logits only).
        """
        mode = check_prune_mode(mode or self.prune_mode)
        x = self._embed(x)
        B, p = x.shape[0], self.num_prefix_tokens
        n0 = x.shape[1] - p
        if mode == "none":
            x = self.norm(self.blocks(x))
            return PruningOutput(self.forward_head(x))
        stage_of = self._stage_of_block()
        position = torch.arange(n0, device=x.device).expand(B, n0) if masks else None  # original patch index
        valid = None  # (B, N) False for padding; None when there is none
        keep_masks = []
        for i, blk in enumerate(self.blocks):
            s = stage_of.get(i)
            if s is not None:
                logits = self.predictors[s](x[:, p:], valid)
                if mode == "topk":
                    index = topk_indices(logits, min(num_kept(self.keep_ratio[s], n0), logits.shape[1]))
                else:
                    index, valid = threshold_indices(logits, valid)
                    if B == 1:
                        valid = None  # a single image is never padded
                x = gather_tokens(x, index, p)
                if masks:
                    position = batch_gather(position, index)
                    kept = torch.zeros(B, n0, dtype=torch.bool, device=x.device)
                    src = torch.ones_like(position, dtype=torch.bool) if valid is None else valid
                    keep_masks.append(kept.scatter(1, position, src))
            if valid is None:
                x = blk(x)
            else:
                attn_mask = torch.cat([valid.new_ones(B, p), valid], dim=1)[:, None, None, :]
                x = blk(x, attn_mask=attn_mask)
        x = self.norm(x)
        return PruningOutput(self._head(x, valid), keep_masks)


class TrainingModel(nn.Module):
    """Wraps a patched model so that the masked training pass is its ``forward``.

    Hand this to ``accelerator.prepare``: DDP synchronises gradients only for work done
    through the wrapped module's ``forward``.

    Args:
        model: a model patched by :func:`dynvit.patch` or built by :func:`dynvit.build_model`.
        drop_tokens: run :meth:`DynViTMixin.forward_train_dropping` (dropped tokens are
            removed after the first block of each stage: a cheaper step) instead of
            :meth:`DynViTMixin.forward_train`.
    """

    def __init__(self, model: nn.Module, *, drop_tokens: bool = False):
        super().__init__()
        if not isinstance(model, DynViTMixin):
            raise TypeError("TrainingModel needs a model patched by dynvit.patch or built by dynvit.build_model")
        self.model = model
        self.drop_tokens = drop_tokens

    def forward(self, x: torch.Tensor, tau: float = 1.0, masks: list[torch.Tensor] | None = None) -> PruningOutput:
        if self.drop_tokens:
            return self.model.forward_train_dropping(x, tau=tau, masks=masks)
        return self.model.forward_train(x, tau=tau, masks=masks)
