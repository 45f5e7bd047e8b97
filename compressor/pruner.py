"""Magnitude pruning driven like an optimizer: ``prepare`` → ``step`` (after every optimizer
step) → ``finalize``.

Usage inside an ordinary training loop::

    pruner = MagnitudePruner([PruneGroup(ThresholdSchedule(1000, 5000, 10000), final_sparsity=0.9)])
    pruner.prepare(model)                     # before wrapping in DistributedDataParallel
    for batch in data:
        loss = criterion(model(batch.x), batch.y)
        loss.backward(); optimizer.step(); optimizer.zero_grad()
        pruner.step()
    model = pruner.finalize()                 # plain nn.Module, original state_dict keys

Masks are buffers of the model (so in ``model.state_dict()``); the pruner's own state — the
iteration counter and the calibrated ``q`` of threshold schedules — is in
``pruner.state_dict()``.  Saving both and loading them into a freshly prepared model resumes
bit-exactly.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import nn

from .blocks import BlockScore, BlockShape, as_matrix, block_mask_of, block_scores, expand_block_mask, group_lasso
from .masking import attach_mask, bake_mask, find_mask
from .report import LayerSparsity, sparsity_report
from .schedules import PruningSchedule, ThresholdSchedule, count_to_prune, q_for_final_sparsity
from .selection import DEFAULT_TYPES, PRUNABLE_TYPES, WeightRef, iter_prunable_weights

Ranking = Literal["layer", "global"]


@dataclass(frozen=True)
class PruneGroup:
    """Layers pruned with one set of hyper-parameters (the paper uses one set for recurrent and
    one for fully connected layers).

    Selection: module ``types`` and regular expressions ``include`` / ``exclude`` searched in the
    fully qualified weight name (``"rnn.weight_hh_l0_reverse"``).  A weight belongs to the first
    group that selects it.

    ``block``/``block_score``: prune whole r×c blocks scored by max |w| or L2 norm (edge blocks
    are cropped; a block larger than a whole weight in both dimensions is refused by ``prepare``).
    ``ranking``: ``"layer"`` ranks each tensor on its own; ``"global"`` ranks all tensors of the
    group together (one threshold, or one sparsity over the group).

    Threshold schedules only: ``q`` as in Narang et al. (2017).  If ``q`` is None it is
    calibrated from the weights at the first mask update: with ``final_sparsity`` set, so that
    the schedule ends at that sparsity (on unchanged weights, exactly); otherwise as the
    ``q_percentile``-th percentile of the scores (the paper: 90).
    """

    schedule: PruningSchedule
    types: tuple[type[nn.Module], ...] = DEFAULT_TYPES
    include: str | None = None
    exclude: str | None = None
    block: BlockShape = field(default_factory=BlockShape)
    block_score: BlockScore = "max"
    ranking: Ranking = "layer"
    q: float | None = None
    final_sparsity: float | None = None
    q_percentile: float = 90.0
    name: str = ""

    def __post_init__(self) -> None:
        if self.ranking not in ("layer", "global"):
            raise ValueError(f"ranking={self.ranking!r}: use 'layer' or 'global'")
        if self.final_sparsity is not None and not 0.0 <= self.final_sparsity < 1.0:
            raise ValueError(f"final_sparsity={self.final_sparsity} is outside [0, 1)")
        if self.schedule.kind != "threshold" and (self.q is not None or self.final_sparsity is not None):
            raise ValueError("q and final_sparsity apply to threshold schedules only; "
                             f"{type(self.schedule).__name__} already sets the sparsity")


@dataclass
class _Unit:
    """Tensors ranked together: one tensor (layer ranking) or a whole group (global ranking)."""

    key: str
    group: PruneGroup
    refs: list[WeightRef]


def quantile_threshold(scores: torch.Tensor, sparsity: float) -> float:
    """A threshold with exactly ``round(sparsity·n)`` scores strictly below it (for distinct
    scores): the midpoint between the k-th and (k+1)-th smallest score."""
    ordered = scores.flatten().double().sort().values
    k = count_to_prune(sparsity, ordered.numel())
    if k == 0:
        return float(ordered[0]) * 0.5
    if k >= ordered.numel():
        return float(ordered[-1]) * 2.0 + 1.0
    return float(ordered[k - 1] + ordered[k]) * 0.5


_MAX_LISTED = 6


def _no_match_error(model: nn.Module, group: PruneGroup, index: int) -> ValueError:
    """What the group looked for, what the model has and how to select it."""
    label = f"pruning group {group.name!r}" if group.name else f"pruning group {index}"
    criteria = "types " + ", ".join(t.__name__ for t in group.types)
    criteria += f", include {group.include!r}" if group.include else ""
    criteria += f", exclude {group.exclude!r}" if group.exclude else ""
    present = list(iter_prunable_weights(model, PRUNABLE_TYPES))
    if not present:
        modules = ", ".join(sorted({type(m).__name__ for m in model.modules()}))
        return ValueError(f"no prunable weight matches {label} ({criteria}); the model ({modules}) has no "
                          f"{', '.join(t.__name__ for t in PRUNABLE_TYPES)} layer: skip pruning "
                          "(--method none), or register its layers (nn.ModuleList, not a Python list)")
    listed = ", ".join(f"{ref.name} ({type(ref.module).__name__})" for ref in present[:_MAX_LISTED])
    more = f" and {len(present) - _MAX_LISTED} more" if len(present) > _MAX_LISTED else ""
    return ValueError(f"no prunable weight matches {label} ({criteria}); the model has {listed}{more}: "
                      "select them with the group's types or include pattern (recipe: [prune] include), "
                      "or use another pruning method")


def _check_block(ref: WeightRef, block: BlockShape) -> None:
    """Refuse a block larger than the whole weight (one block would keep or prune it all).

    A block larger in one dimension only is legal: its edge blocks are cropped."""
    weight = getattr(ref.module, ref.attr)
    rows, cols = as_matrix(weight).shape
    if block.rows > rows and block.cols > cols:
        view = "" if weight.dim() == 2 else f" viewed as {rows}x{cols}"
        raise ValueError(f"block {block} is larger than {ref.name} {tuple(weight.shape)}{view} in both dimensions: "
                         f"use a block with at most {rows} rows or {cols} columns (e.g. 16x1), or exclude the layer "
                         f"(exclude='^{re.escape(ref.name)}$')")


class MagnitudePruner:
    """Gradual, one-shot and block magnitude pruning of Linear, Conv and RNN/GRU/LSTM weights."""

    def __init__(self, groups: Sequence[PruneGroup]) -> None:
        if not groups:
            raise ValueError("MagnitudePruner needs at least one PruneGroup")
        self.groups = list(groups)
        self.itr = 0
        self.q: dict[str, float] = {}
        self._units: list[_Unit] = []
        self._parameter_order: dict[str, list[str]] = {}
        self._model: nn.Module | None = None

    # ------------------------------------------------------------------ set-up
    def prepare(self, model: nn.Module) -> nn.Module:
        """Attach an all-ones mask to every selected weight; returns ``model`` (changed in place)."""
        if isinstance(model, nn.parallel.DistributedDataParallel):
            raise TypeError("prepare() got a DistributedDataParallel model: call prepare() on the "
                            "plain model first, then wrap it in DistributedDataParallel")
        if self._model is not None:
            raise RuntimeError("this pruner is already prepared; create a new one for another model")
        selected = self._select(model)
        self._parameter_order = {name: list(module._parameters) for name, module in model.named_modules()}
        for index, (group, refs) in enumerate(zip(self.groups, selected)):
            for ref in refs:
                attach_mask(ref.module, ref.attr)
            if group.ranking == "global" and refs:
                self._units.append(_Unit(f"group{index}:{group.name}", group, refs))
            else:
                self._units.extend(_Unit(ref.name, group, [ref]) for ref in refs)
        self._model = model
        return model

    def _select(self, model: nn.Module) -> list[list[WeightRef]]:
        """The weights of each group (a weight goes to the first group that selects it), checked
        before any mask is attached: every group matches a weight and its block fits them."""
        taken: set[str] = set()
        selected = []
        for index, group in enumerate(self.groups):
            matches = list(iter_prunable_weights(model, group.types, group.include, group.exclude))
            if not matches:
                raise _no_match_error(model, group, index)
            refs = [ref for ref in matches if ref.name not in taken]
            taken.update(ref.name for ref in refs)
            for ref in refs:
                _check_block(ref, group.block)
            selected.append(refs)
        return selected

    @property
    def weights(self) -> list[WeightRef]:
        """All masked weights, in model order."""
        return [ref for unit in self._units for ref in unit.refs]

    # ------------------------------------------------------------------ stepping
    def step(self) -> bool:
        """Advance the iteration counter by one and update the masks the schedules say to update.

        Returns True if any mask changed."""
        self._require_prepared()
        self.itr += 1
        due = [unit for unit in self._units if unit.group.schedule.is_update_step(self.itr)]
        changed = False
        for unit in due:
            changed |= self._update_unit(unit)
        if due:  # decided by itr alone, so every rank takes part in the broadcast
            self._broadcast_masks()
        return changed

    @torch.no_grad()
    def _update_unit(self, unit: _Unit) -> bool:
        group = unit.group
        masks = [find_mask(ref.module, ref.attr).mask for ref in unit.refs]
        weights = [getattr(ref.module, ref.attr) for ref in unit.refs]
        scores = [block_scores(w, group.block, group.block_score).flatten() for w in weights]
        kept = [block_mask_of(m, group.block).flatten() for m in masks]
        all_scores, all_kept = torch.cat(scores), torch.cat(kept)

        schedule = group.schedule
        if schedule.kind == "threshold":
            if unit.key not in self.q:
                self.q[unit.key] = self._calibrate_q(group, all_scores)
            threshold = schedule.target(self.itr, q=self.q[unit.key])
            new_kept = all_kept & (all_scores >= threshold)
        else:
            n_prune = count_to_prune(schedule.target(self.itr), all_scores.numel())
            ranked = torch.where(all_kept, all_scores.double(), float("-inf"))
            order = torch.argsort(ranked, stable=True)
            new_kept = torch.ones_like(all_kept)
            new_kept[order[:n_prune]] = False
            new_kept &= all_kept

        changed = bool((new_kept != all_kept).any())
        for mask, chunk in zip(masks, new_kept.split([s.numel() for s in scores])):
            grid = group.block.grid(tuple(as_matrix(mask).shape))
            mask.copy_(expand_block_mask(chunk.reshape(grid), group.block, mask.shape))
        return changed

    def _calibrate_q(self, group: PruneGroup, scores: torch.Tensor) -> float:
        schedule = group.schedule
        if group.q is not None:
            return group.q
        if group.final_sparsity is not None:
            if not isinstance(schedule, ThresholdSchedule):
                raise TypeError("final_sparsity calibration needs a ThresholdSchedule; give q instead")
            return q_for_final_sparsity(schedule, quantile_threshold(scores, group.final_sparsity))
        return float(torch.quantile(scores.double(), group.q_percentile / 100.0))

    def _broadcast_masks(self) -> None:
        """Under torch.distributed, make every rank use rank 0's masks."""
        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return
        for ref in self.weights:
            mask = find_mask(ref.module, ref.attr).mask
            as_bytes = mask.to(torch.uint8)
            dist.broadcast(as_bytes, src=0)
            mask.copy_(as_bytes.bool())

    # ------------------------------------------------------------------ extras
    def group_lasso(self, weight: float = 1.0) -> torch.Tensor:
        """``weight · Σ_tensors Σ_blocks ‖w_block‖₂`` over the masked weights, with each group's
        block shape — add it to the loss to push whole blocks towards zero."""
        self._require_prepared()
        terms = [group_lasso(getattr(ref.module, ref.attr), unit.group.block)
                 for unit in self._units for ref in unit.refs]
        return weight * torch.stack(terms).sum()

    def report(self) -> list[LayerSparsity]:
        """Per-layer sparsity of the masked weights (with each group's block shape)."""
        self._require_prepared()
        blocks = {ref.name: unit.group.block for unit in self._units for ref in unit.refs}
        return sparsity_report(self._model, blocks=blocks, only=set(blocks))

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict[str, Any]:
        """The iteration counter and calibrated ``q`` values (masks are in the model's state_dict)."""
        return {"itr": self.itr, "q": dict(self.q)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.itr = int(state["itr"])
        self.q = {str(k): float(v) for k, v in state["q"].items()}

    # ------------------------------------------------------------------ the end
    def finalize(self) -> nn.Module:
        """Bake the masks into the weights and remove every wrapper.

        The result is a plain ``nn.Module`` with the original ``state_dict`` keys whose outputs
        equal the masked model's."""
        model = self._require_prepared()
        for ref in self.weights:
            bake_mask(ref.module, ref.attr, self._parameter_order[ref.module_name])
        self._units, self._model = [], None
        return model

    def _require_prepared(self) -> nn.Module:
        if self._model is None:
            raise RuntimeError("call pruner.prepare(model) first (or it was finalized already)")
        return self._model
