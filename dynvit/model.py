"""The pruning forward passes that :func:`dynvit.patch` grafts onto a timm ViT.

:class:`DynViTMixin` is placed in front of the model's own class (ToMe style), so every timm
method and the pretrained weights keep working; only ``forward`` changes, and the two extra
passes have their own names:

* :meth:`DynViTMixin.forward_train`: the masked path. Every token is computed; predictors
  sample keep masks, a dropped token stays dropped, and the mask gates attention.
* :meth:`DynViTMixin.forward_pruned`: the real pruning path. Kept tokens are gathered and
  the later blocks run on them alone.

Both passes are written once for every supported timm family. What differs between families
goes through a few methods (the *family seam*, below) that :class:`DynViTMixin` implements for
``VisionTransformer`` and a family mixin overrides (:class:`dynvit.families.eva.EvaMixin` for
timm's ``Eva``: RoPE ViTs, EVA-02, Perception Encoder, DINOv3).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from timm.layers import Attention
from timm.models.vision_transformer import Block
from torch import nn
from torch.utils.checkpoint import checkpoint

from .attention import PackedLayout, packed_block
from .families.pool import weighted_pool
from .families.vit import check_class_attention, vit_class_attention, vit_masked_block
from .gumbel import SAMPLERS, sample_keep_mask
from .merge import merge_gathered, merge_masked, size_bias
from .ratios import DROPPED_TOKENS, check_prune_mode, normalize_keep_ratio
from .tracing import compiling, tracing
from .tokens import (batch_gather, compact_indices, gather_tokens, keep_at_least_one, largest_count, num_kept,
                     threshold_indices, topk_indices)

__all__ = ["PruningOutput", "DynViTMixin", "TrainingModel"]


@dataclass
class PruningOutput:
    """What a pruning forward pass produces besides the logits.

    ``N0`` is the number of patch tokens of the input; masks are indexed by original patch
    position, whatever the path.
    """

    logits: torch.Tensor  # (B, num_classes)
    keep_masks: list[torch.Tensor] = field(default_factory=list)  # per stage, (B, N0) cumulative keep mask
    keep_logits: list[torch.Tensor] = field(default_factory=list)  # per stage, (B, N0) predictor logits; -inf where absent (pruned path)
    tokens: torch.Tensor | None = None  # (B, P + N0, C) final normed tokens (training path)
    token_mask: torch.Tensor | None = None  # (B, N0) final cumulative keep mask (training path)
    keep_thresholds: torch.Tensor | None = None  # (stages,) logit thresholds the decisions used (training path)


@dataclass
class _PrunedRun:
    """What stays the same over the blocks (and the groups) of one :meth:`forward_pruned` call."""

    mode: str
    thresholds: torch.Tensor
    stage_of: dict[int, int]
    full_rope: torch.Tensor | None
    details: bool
    n0: int
    regroup: bool | str
    pack: bool = False  # run the blocks after a threshold-mode stage on packed tokens (see _pack_plan)


# A threshold-mode batch is padded to its largest kept count. Regrouping sorts the images by
# count and runs the rest of the network on groups, each padded to its own largest count; a
# further group must save this fraction of the batch's padded work to be worth its overhead.
REGROUP_MIN_GROUP = 8
REGROUP_MIN_SAVING = 0.05
REGROUP_MIN_WORK = 3e8  # images x padded tokens x width**2 from which "auto" regroups
# Inside torch.compile the number of groups cannot depend on the counts: a batch whose work (every
# token counted) reaches REGROUP_MIN_WORK is split into groups of REGROUP_COMPILED_GROUP images
# sorted by count, at most REGROUP_COMPILED_MAX_GROUPS of them. Each group adds a copy of the later
# blocks to the graph: measured on DeiT-S at batch 64 (1 thread, paired with compiled dense), one
# padded batch 1.39x, two groups 1.52x (compiled in 152 s), four 1.56x (186 s).
REGROUP_COMPILED_GROUP = 16
REGROUP_COMPILED_MAX_GROUPS = 2


def regroup_by_count(counts: torch.Tensor) -> list[torch.Tensor] | None:
    """Split a batch into 2, 4, 8 ... groups of images with similar kept counts (``counts``:
    ``(B,)``) when that cuts the padded tokens enough; None to keep it whole.

    The cost of ``k`` equal groups of the sorted counts is the sum of group size times group
    maximum (the padded tokens every later block computes), plus ``REGROUP_MIN_SAVING`` of the
    whole batch's padded tokens for each group beyond the first.
    """
    B = counts.shape[0]
    order = counts.argsort(stable=True)
    ranked = counts[order].tolist()
    whole = B * ranked[-1]
    best_cost, best_k = float(whole), 1
    k = 2
    while B // k >= REGROUP_MIN_GROUP:
        size = -(-B // k)
        padded = sum(len(ranked[j:j + size]) * ranked[min(j + size, B) - 1] for j in range(0, B, size))
        cost = padded + (k - 1) * REGROUP_MIN_SAVING * whole
        if cost < best_cost:
            best_cost, best_k = cost, k
        k *= 2
    if best_k == 1:
        return None
    size = -(-B // best_k)
    return list(order.split(size))


def compiled_groups(counts: torch.Tensor, num_tokens: int, width: int, always: bool) -> list[torch.Tensor] | None:
    """:func:`regroup_by_count` inside torch.compile, where the number of groups may depend on
    static sizes only: the images sorted by count (``counts`` ``(B,)``) in groups of
    ``REGROUP_COMPILED_GROUP``, at most ``REGROUP_COMPILED_MAX_GROUPS``, when the batch's work
    with ``num_tokens`` tokens of ``width`` reaches ``REGROUP_MIN_WORK`` (or ``always``); else None."""
    B = counts.shape[0]
    groups = min(REGROUP_COMPILED_MAX_GROUPS, B // REGROUP_COMPILED_GROUP)
    if groups < 2 or not (always or B * num_tokens * width**2 >= REGROUP_MIN_WORK):
        return None
    return list(counts.argsort(stable=True).split(-(-B // groups)))


class DynViTMixin:
    """Modifications to a timm ``VisionTransformer``:

    - ``forward`` returns logits; in eval mode it prunes tokens per ``prune_mode``
      (``threshold``, ``topk`` or ``none``), in train mode it runs the masked path at tau 1.
    - adds ``forward_train`` (masked path, :class:`PruningOutput`) and ``forward_pruned``
      (gathering path, :class:`PruningOutput`).
    - adds ``predictors`` (one :class:`~dynvit.predictor.TokenPredictor` per stage), the
      buffer ``keep_threshold`` (one logit threshold per stage: threshold mode keeps a token
      where its logit is above it; 0 means keep probability > 0.5, :func:`dynvit.calibrate`
      sets it for a budget) and the settings ``prune_loc``, ``keep_ratio``, ``prune_mode``,
      ``sampler``, ``dropped_tokens``.
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

    @property
    def dropped_tokens(self) -> str:
        """What happens to a token a stage drops: ``discard`` or ``merge`` (into the kept token
        most like it, see :mod:`dynvit.merge`)."""
        return self._dropped_tokens

    @dropped_tokens.setter
    def dropped_tokens(self, value: str) -> None:
        if value not in DROPPED_TOKENS:
            raise ValueError(f"dropped_tokens must be one of {DROPPED_TOKENS}, got {value!r}")
        self._dropped_tokens = value

    def dynvit_config(self) -> dict:
        """The dynvit settings, enough to patch the same timm model again."""
        return {
            "prune_loc": list(self.prune_loc),
            "keep_ratio": list(self.keep_ratio),
            "prune_mode": self.prune_mode,
            "sampler": self.sampler,
            "predictor_hidden_ratio": self.predictor_hidden_ratio,
            "dropped_tokens": self.dropped_tokens,
            "predictor_prior": self.predictor_prior,
            "predictor_signals": list(self.predictor_signals),
        }

    # ---- shared pieces ------------------------------------------------------------------
    def check_input(self, x: torch.Tensor) -> None:
        """Raise a clear error for an image batch this model cannot take."""
        if x.dim() != 4:
            raise ValueError(f"expected an image batch (B, C, H, W), got shape {tuple(x.shape)}")
        pe = self.patch_embed
        in_chans = self.in_chans  # the image's channels (a hybrid stem's projection reads its CNN's)
        if x.shape[1] != in_chans:
            raise ValueError(f"expected {in_chans} input channels, got {x.shape[1]} (input shape {tuple(x.shape)})")
        h, w = x.shape[-2:]
        if pe.strict_img_size and not self.dynamic_img_size and (h, w) != tuple(pe.img_size):
            raise ValueError(
                f"input size {h}x{w} does not match the model's {pe.img_size[0]}x{pe.img_size[1]}; resize the images, "
                f"or build the model with img_size=({h}, {w}) (position embeddings are resampled) or dynamic_img_size=True"
            )
        # A hybrid embedding's patches are taken from its CNN's feature map (stride feature_ratio).
        ratio = getattr(pe, "feature_ratio", (1, 1))
        ph, pw = pe.patch_size[0] * ratio[0], pe.patch_size[1] * ratio[1]
        if not getattr(pe, "dynamic_img_pad", False) and (h % ph or w % pw):
            raise ValueError(f"input size {h}x{w} is not divisible by the patch size {ph}x{pw}; resize or pad the images")

    def _head(self, x: torch.Tensor, patch_weight: torch.Tensor | None) -> torch.Tensor:
        """Logits from final tokens; ``patch_weight`` ``(B, N)`` weights patch tokens in average
        and attention pooling: 0 for dropped or padded ones, the size of merged ones (token
        pooling reads prefix tokens only)."""
        if patch_weight is None or self.global_pool == "token":
            return self.forward_head(x)
        pooled = weighted_pool(x, patch_weight, self.num_prefix_tokens, include_prefix=self._pool_includes_prefix(),
                               attn_pool=self.attn_pool)
        return self.head(self.head_drop(self.fc_norm(pooled)))

    def _stage_of_block(self) -> dict[int, int]:
        return {b: s for s, b in enumerate(self.prune_loc)}

    def _keep_logits(self, s: int, i: int, x: torch.Tensor, rope, mask: torch.Tensor | None,
                     size: torch.Tensor | None) -> torch.Tensor:
        """Stage ``s``'s keep logits ``(B, N)`` for the patch tokens of ``x`` ``(B, P + N, C)``
        entering block ``i``; ``mask`` ``(B, N)`` marks the alive ones (None: all), ``size`` the
        patches each stands for (None: one each)."""
        predictor = self.predictors[s]
        p = self.num_prefix_tokens
        if not getattr(predictor, "signals", ()):
            return predictor(x[:, p:], mask)
        attention = None
        if predictor.needs_attention:
            alive = torch.ones(x.shape[0], x.shape[1] - p, dtype=torch.bool, device=x.device) if mask is None \
                else mask.detach() > 0.5
            with torch.no_grad():
                attention = self._class_attention(i, self.blocks[i], x.detach(), rope, alive, size)
        return predictor(x[:, p:], mask, attention=attention, size=size)

    # ---- family seam: VisionTransformer here, other families override ------------------------
    def _embed(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Tokens ``(B, P + N0, C)`` and the rotary embedding of the ``N0`` patch tokens, in the
        layout the family's blocks take (None: a ViT adds its position embedding once here)."""
        self.check_input(x)
        x = self.patch_embed(x)
        x = self._pos_embed(x)
        x = self.patch_drop(x)
        return self.norm_pre(x), None

    def _gather_rope(self, rope: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        """The rotary embedding of the kept tokens, per image: ``position`` ``(B, K)`` holds
        their original patch indices. Called only when :meth:`_embed` returned one."""
        raise NotImplementedError(f"{type(self).__name__} has no rotary position embedding to gather")

    def _call_block(self, index: int, block: nn.Module, x: torch.Tensor, rope, attn_mask: torch.Tensor | None) -> torch.Tensor:
        """Block ``index`` as timm calls it (pruned path); ``attn_mask`` ``(B, 1, 1, N)`` hides
        padding or adds ``log(size)``."""
        return block(x) if attn_mask is None else block(x, attn_mask=attn_mask)

    def _masked_block(self, index: int, block: nn.Module, x: torch.Tensor, rope, token_mask: torch.Tensor,
                      key_bias: torch.Tensor | None) -> torch.Tensor:
        """Block ``index`` with the keep mask ``token_mask`` ``(B, N)`` in its softmax (masked path)."""
        return vit_masked_block(block, x, token_mask, key_bias)

    @staticmethod
    def check_class_attention(model: nn.Module, prune_loc) -> None:
        """Raise ``NotImplementedError`` where :meth:`_class_attention` cannot read a block of
        ``prune_loc`` (called by :func:`dynvit.patch` before it changes anything)."""
        for b in prune_loc:
            check_class_attention(model.blocks[b], b)

    def _class_attention(self, index: int, block: nn.Module, x: torch.Tensor, rope, alive: torch.Tensor,
                         size: torch.Tensor | None) -> torch.Tensor:
        """``(B, N)`` the class token's attention to each alive patch token in block ``index``
        (the predictors' ``attention`` signal), from its input ``x`` ``(B, P + N, C)``."""
        return vit_class_attention(block, x, self.num_prefix_tokens, self.cls_token is not None, alive, size)

    def _pool_includes_prefix(self) -> bool:
        """Whether average or attention pooling reads the prefix tokens."""
        return self.pool_include_prefix

    # ---- passes -----------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits. Eval mode prunes per ``prune_mode``; train mode runs the masked path (tau 1)."""
        if self.training:
            return self.forward_train(x).logits
        if self.prune_mode == "none":
            self.check_input(x)
            return super().forward(x)
        return self.forward_pruned(x, details=False).logits

    def forward_train(
        self,
        x: torch.Tensor,
        tau: float = 1.0,
        masks: list[torch.Tensor] | None = None,
        noise_scale: float = 1.0,
        drop: bool = False,
    ) -> PruningOutput:
        """Masked path: dropped tokens are hidden from attention.

        A token is kept where ``logit - keep_threshold + noise_scale * noise > 0`` (Logistic
        noise): at ``noise_scale=0`` the training masks are exactly threshold mode's decisions.

        Args:
            x: images ``(B, C, H, W)``.
            tau: temperature of the mask relaxation (see :mod:`dynvit.schedule`).
            masks: optional fixed per-stage keep masks ``(B, N0)`` (0/1) to use instead of
                sampling, e.g. to replay the decisions of :meth:`forward_pruned`.
            noise_scale: factor on the sampler's noise, in [0, 1] (``gumbel`` and ``soft``
                samplers; see :class:`dynvit.schedule.NoiseSchedule`).
            drop: remove the dropped tokens after the first block of each stage (a batch is
                padded to its largest count, the padding masked out), so later blocks compute
                only kept tokens: a cheaper step with the same outputs and backbone gradients
                for the same decisions. A dropped token's decision then gets gradient from its
                stage's first block (and, with merging, from the merge) only; with
                ``drop=False`` every later block contributes.

        Returns:
            :class:`PruningOutput` with masks, logits and final tokens indexed by original
            patch position.
        """
        if masks is not None and len(masks) != len(self.prune_loc):
            raise ValueError(f"got {len(masks)} masks for {len(self.prune_loc)} stages")
        x, rope = self._embed(x)
        full_rope = rope
        B, p = x.shape[0], self.num_prefix_tokens
        n0 = x.shape[1] - p
        stage_of = self._stage_of_block()
        merge = self.dropped_tokens == "merge"
        mask = None  # (B, N) cumulative keep mask of the current patch tokens, None before the first stage
        size = None  # (B, N) patches each token stands for (merging), None while all are 1
        position = None  # (B, N) original index of each current patch token, None until tokens are removed
        present = None  # (B, N) False for the padding of a batch whose images kept different counts
        keep_masks, keep_logits = [], []
        for i, blk in enumerate(self.blocks):
            s = stage_of.get(i)
            if s is not None:
                logits = self._keep_logits(s, i, x, rope, mask, size)
                if masks is None:
                    decision = sample_keep_mask(logits - self.keep_threshold[s].to(logits.dtype), tau, self.sampler,
                                                noise_scale)
                    decision = keep_at_least_one(decision, logits, mask)  # as threshold mode does
                else:
                    decision = masks[s].to(logits.dtype)
                    decision = decision if position is None else batch_gather(decision, position)
                alive = mask
                mask = decision if mask is None else decision * mask
                if merge:
                    ones = torch.ones_like(mask)
                    patches, size = merge_masked(x[:, p:], ones if size is None else size, ones if alive is None else alive,
                                                 mask)
                    x = torch.cat([x[:, :p], patches], dim=1)
                keep_masks.append(_in_place(mask, position, n0, 0.0))
                shown = logits if present is None else logits.masked_fill(~present, float("-inf"))
                keep_logits.append(_in_place(shown, position, n0, float("-inf")))
            if mask is None:
                x = self._run_block(self._call_block, i, blk, x, rope, None)
                continue
            token_mask = torch.cat([mask.new_ones(B, p), mask], dim=1)
            bias = None if size is None else size_bias(size, p)
            x = self._run_block(self._masked_block, i, blk, x, rope, token_mask, bias)
            if drop and s is not None:  # the stage's first block is done: remove what it dropped
                index, present = compact_indices(mask.detach() > 0.5)
                x = gather_tokens(x, index, p)
                mask = torch.where(present, batch_gather(mask, index), torch.zeros_like(mask[:, :1]))  # padding: 0
                size = None if size is None else torch.where(present, batch_gather(size, index), torch.ones_like(size[:, :1]))
                position = batch_gather(torch.arange(n0, device=x.device).expand(B, n0) if position is None else position,
                                        index)
                if full_rope is not None:
                    rope = self._gather_rope(full_rope, position)
        x = self.norm(x)
        weight = mask if size is None else mask * size
        logits = self._head(x, weight)
        if position is not None:  # back to original patch positions (dropped tokens: zeros, mask 0)
            patches = x.new_zeros(B, n0, x.shape[-1]).scatter(1, position.unsqueeze(-1).expand(-1, -1, x.shape[-1]),
                                                               x[:, p:])
            x = torch.cat([x[:, :p], patches], dim=1)
        return PruningOutput(logits, keep_masks, keep_logits, x, _in_place(mask, position, n0, 0.0),
                             self.keep_threshold.detach())

    #: whether threshold mode regroups a batch by kept count (see :func:`regroup_by_count`); the
    #: logits do not change, only how much padding is computed. ``"auto"`` regroups a batch whose
    #: padded work (images x tokens x width squared) is at least ``REGROUP_MIN_WORK``: measured,
    #: regrouping made DeiT-S at batch 64 1.12x faster (1.3e9) and the small CIFAR-10 ViT at batch
    #: 64 1.12x slower (5e7), where each group's per-operation overhead outweighs the padding it
    #: saves (docs/BENCHMARKS.md, sections 2 and 5). Never used while exporting; inside
    #: torch.compile a fixed number of groups (:func:`compiled_groups`), used when True or when
    #: ``threshold_pack`` is off (packing does as well there).
    threshold_regroup: bool | str = "auto"

    #: whether threshold mode runs a batch's blocks after the first stage on *packed* tokens (the
    #: real tokens of the padded batch, one row each; :func:`dynvit.attention.packed_block`): the
    #: per-token layers then skip the padding, and only attention sees the padded layout. The logits
    #: do not change. Used for batches of two or more images whose blocks are timm ``Block`` with
    #: ``Attention`` (other block types: padding, or regrouping), unless the batch is regrouped
    #: (eager: ``threshold_regroup`` True, or "auto" and a large batch; compiled: True); never
    #: while exporting.
    threshold_pack: bool = True

    def _packable(self) -> bool:
        """Whether every block after the first stage can run on packed tokens."""
        first = min(self.prune_loc)
        return all(type(b) is Block and type(b.attn) is Attention for b in list(self.blocks)[first:])

    def _run_block(self, fn, *args):
        # Honour timm's set_grad_checkpointing() in the training path.
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)

    def forward_pruned(
        self,
        x: torch.Tensor,
        mode: str | None = None,
        *,
        thresholds: torch.Tensor | None = None,
        details: bool = True,
    ) -> PruningOutput:
        """Real pruning: kept tokens are gathered and later blocks run on them alone.

        ``topk`` keeps ``round(keep_ratio[s] * N0)`` tokens at stage ``s`` for every image.
        ``threshold`` keeps the tokens whose logit is above the stage's ``keep_threshold``
        (at least one); a batch is padded to its largest count and the padding is masked out
        of attention and pooling, so each image gets the logits it would get alone. With
        ``dropped_tokens="merge"`` the other tokens are merged into the kept ones.

        Args:
            x: images ``(B, C, H, W)``.
            mode: ``threshold``, ``topk`` or ``none``; default ``self.prune_mode``.
            thresholds: per-stage logit thresholds to use instead of ``keep_threshold``.
            details: also return the per-stage keep masks and logits (indexed by original
                patch position); ``forward`` skips them.
        """
        mode = check_prune_mode(mode or self.prune_mode)
        x, rope = self._embed(x)
        B, p = x.shape[0], self.num_prefix_tokens
        n0 = x.shape[1] - p
        if mode == "none":
            for i, blk in enumerate(self.blocks):
                x = self._call_block(i, blk, x, rope, None)
            return PruningOutput(self.forward_head(self.norm(x)))
        regroup = False
        if mode == "threshold" and self.threshold_regroup:
            regroup = "compiled" if compiling() else False if tracing() else self.threshold_regroup
        pack = (mode == "threshold" and (compiling() or not tracing()) and B > 1 and bool(self.threshold_pack)
                and self._packable())
        run = _PrunedRun(mode=mode, thresholds=self.keep_threshold if thresholds is None else thresholds,
                         stage_of=self._stage_of_block(), full_rope=rope, details=details, n0=n0, regroup=regroup,
                         pack=pack)
        # Original index of each patch token: for the per-stage masks and logits, and the rotary angles.
        position = torch.arange(n0, device=x.device).expand(B, n0) if details or rope is not None else None
        logits, keep_masks, keep_logits = self._pruned_blocks(0, x, rope, position, None, None, run)
        return PruningOutput(logits, keep_masks, keep_logits)

    def _pruned_blocks(self, start: int, x: torch.Tensor, rope, position: torch.Tensor | None,
                       valid: torch.Tensor | None, size: torch.Tensor | None, run: _PrunedRun, decided: tuple | None = None):
        """Blocks ``start``.. of :meth:`forward_pruned` on a batch or a group of it, then the
        head: ``(logits, keep_masks, keep_logits)`` of the stages met from here.

        ``position`` is ``(B, N)`` the original index of each patch token (None when neither
        details nor rotary angles need it), ``valid`` ``(B, N)`` False for padding (None: none),
        ``size`` the patches each token stands for (merging; None: one each). ``decided`` is
        ``(index, index_valid)`` of the stage at ``start`` when the caller already made its
        decisions (a regrouped batch).
        """
        B, p, n0 = x.shape[0], self.num_prefix_tokens, run.n0
        merge = self.dropped_tokens == "merge"
        keep_masks, keep_logits = [], []
        attn_mask = None if valid is None and size is None else self._attn_mask(valid, size)
        packed = None  # a PackedLayout while the blocks run on packed tokens (see _pack_plan)
        for i in range(start, len(self.blocks)):
            s = run.stage_of.get(i)
            if s is not None:
                if packed is not None:
                    x, packed = _unpack(x, packed), None
                if decided is not None:
                    (index, index_valid), decided = decided, None
                else:
                    logits = self._keep_logits(s, i, x, rope, valid, size)
                    if run.details:
                        shown = logits if valid is None else logits.masked_fill(~valid, float("-inf"))
                        keep_logits.append(logits.new_full((B, n0), float("-inf")).scatter(1, position, shown))
                    if run.mode == "topk":
                        k = min(num_kept(self.keep_ratio[s], n0), logits.shape[1])
                        index, index_valid = topk_indices(logits, k), None
                    else:
                        index, index_valid = threshold_indices(logits - run.thresholds[s].to(logits.dtype), valid)
                        groups = None
                        if type(B) is int and B == 1 and not compiling():
                            # A single image is never padded (compiled, or exported with a symbolic
                            # batch: a lone kept token is, see largest_count).
                            index_valid = None
                        elif run.regroup is True or (run.regroup == "auto"
                                                     and B * index.shape[1] * x.shape[-1] ** 2 >= REGROUP_MIN_WORK):
                            # Eager, a large batch: groups of cache-sized tensors beat one packed batch
                            # (DeiT-S at batch 64: 1.63x dense regrouped, 1.48x packed). If no grouping
                            # saves enough, the batch is packed below.
                            if bool(index_valid.all()):
                                index_valid = None  # every image kept as many: nothing padded
                            else:
                                groups = regroup_by_count(index_valid.sum(1))
                        elif run.regroup == "compiled" and (self.threshold_regroup is True or not run.pack):
                            # Compiled, packing does as well as groups (DeiT-S at batch 64: 1.71x and
                            # 1.74x compiled dense) at a fraction of the compile time: groups when asked for.
                            groups = compiled_groups(index_valid.sum(1), n0, x.shape[-1],
                                                     self.threshold_regroup is True)
                        if groups is not None:
                            head, masks, more_logits = self._pruned_groups(groups, i, x, position, valid, size, index,
                                                                           index_valid, run)
                            return head, keep_masks + masks, keep_logits + more_logits
                if merge:
                    patches, size = merge_gathered(x[:, p:], size, index, index_valid, valid)
                    x = torch.cat([x[:, :p], patches], dim=1)
                else:
                    x = gather_tokens(x, index, p)
                valid = index_valid
                attn_mask = None if valid is None and size is None else self._attn_mask(valid, size)  # for the stage
                if position is not None:
                    position = batch_gather(position, index)
                if run.full_rope is not None:
                    rope = self._gather_rope(run.full_rope, position)  # kept tokens keep their angles
                if run.details:
                    src = torch.ones_like(position, dtype=torch.bool) if valid is None else valid
                    keep_masks.append(torch.zeros(B, n0, dtype=torch.bool, device=x.device).scatter(1, position, src))
                if run.pack and valid is not None:
                    packed = _pack_plan(valid, p)
                    x = x.flatten(0, 1).index_select(0, packed.flat)
            if packed is None:
                x = self._call_block(i, self.blocks[i], x, rope, attn_mask)
            else:
                x = packed_block(self.blocks[i], x, packed, attn_mask)
        if packed is not None:
            x = _unpack(x, packed)
        x = self.norm(x)
        if size is None:
            weight = valid
        else:
            weight = size if valid is None else size * valid
        return self._head(x, weight), keep_masks, keep_logits

    def _pruned_groups(self, groups: list[torch.Tensor], i: int, x, position, valid, size, index, index_valid,
                       run: _PrunedRun):
        """The rest of a threshold-mode batch as groups of images with similar kept counts, each
        padded to its own largest count instead of the batch's; the results in batch order."""
        parts = []
        run = replace(run, pack=False)  # measured as groups of padded batches; their padding is small
        for g in groups:
            g_valid = index_valid[g]
            k = largest_count(g_valid.sum(1), g_valid.shape[1])
            g_valid = g_valid[:, :k]  # kept positions come first in every row
            padded = compiling() or not bool(g_valid.all())  # no data-dependent branch in a graph
            parts.append(self._pruned_blocks(
                i, x[g], None, None if position is None else position[g], None if valid is None else valid[g],
                None if size is None else size[g], run, decided=(index[g, :k], g_valid if padded else None)))
        order = torch.cat(groups).argsort()
        def join(tensors):
            return torch.cat(tensors)[order]
        return (join([h for h, _, _ in parts]), [join(m) for m in zip(*(m for _, m, _ in parts))],
                [join(lg) for lg in zip(*(lg for _, _, lg in parts))])

    def _attn_mask(self, valid: torch.Tensor | None, size: torch.Tensor | None) -> torch.Tensor:
        """``attn_mask`` for timm's blocks ``(B, 1, 1, P + N)``: a bool mask hiding padding, or
        with merged tokens an additive ``log(size)`` bias with ``-inf`` on padding."""
        p = self.num_prefix_tokens
        if size is None:
            return torch.cat([valid.new_ones(valid.shape[0], p), valid], dim=1)[:, None, None, :]
        bias = size_bias(size, p)
        if valid is not None:
            bias = bias.masked_fill(~torch.cat([valid.new_ones(valid.shape[0], p), valid], dim=1), float("-inf"))
        return bias[:, None, None, :]


def _in_place(values: torch.Tensor | None, position: torch.Tensor | None, n0: int, fill: float) -> torch.Tensor | None:
    """``(B, N)`` values of the current patch tokens at their original positions ``(B, N0)``
    (``fill`` where no current token sits); unchanged while no token was removed."""
    if values is None or position is None:
        return values
    return values.new_full((values.shape[0], n0), fill).scatter(1, position, values)


def _pack_plan(valid: torch.Tensor, num_prefix_tokens: int) -> PackedLayout:
    """Where the real tokens of a padded batch sit: the prefix tokens and the patch tokens
    ``valid`` ``(B, N)`` marks, in the batch flattened to ``B * (P + N)`` rows, in order."""
    B = valid.shape[0]
    full = torch.cat([valid.new_ones(B, num_prefix_tokens), valid], dim=1).flatten()
    total = largest_count(full.sum().unsqueeze(0), full.shape[0])
    flat = torch.argsort((~full).to(torch.uint8), stable=True)[:total]  # real rows first, in order
    spread = (full.cumsum(0) - 1).clamp(min=0) * full  # a real row's place among the real rows; padding: 0
    return PackedLayout(flat, spread, B, valid.shape[1] + num_prefix_tokens)


def _unpack(x: torch.Tensor, layout: PackedLayout) -> torch.Tensor:
    """Packed tokens ``(T, C)`` back in the padded layout ``(B, L, C)``, zeros in the padding."""
    padded = x.new_zeros(layout.batch * layout.length, x.shape[-1]).index_copy(0, layout.flat, x)
    return padded.view(layout.batch, layout.length, -1)


class TrainingModel(nn.Module):
    """Wraps a patched model so that the masked training pass is its ``forward``.

    Hand this to ``accelerator.prepare``: DDP synchronises gradients only for work done
    through the wrapped module's ``forward``.
    """

    def __init__(self, model: nn.Module, *, drop_tokens: bool = False):
        """``drop_tokens``: remove dropped tokens after each stage's first block (see
        :meth:`DynViTMixin.forward_train`'s ``drop``)."""
        super().__init__()
        if not isinstance(model, DynViTMixin):
            raise TypeError("TrainingModel needs a model patched by dynvit.patch or built by dynvit.build_model")
        self.model = model
        self.drop_tokens = drop_tokens

    def forward(
        self, x: torch.Tensor, tau: float = 1.0, masks: list[torch.Tensor] | None = None, noise_scale: float = 1.0
    ) -> PruningOutput:
        return self.model.forward_train(x, tau=tau, masks=masks, noise_scale=noise_scale, drop=self.drop_tokens)
