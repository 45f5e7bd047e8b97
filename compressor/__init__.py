"""compress-and-export, compressor half: pruning masks, schedules and block pruning."""

from .blocks import BlockShape, block_scores, group_lasso
from .masking import WeightMask
from .pruner import MagnitudePruner, PruneGroup, quantile_threshold
from .report import LayerSparsity, format_report, sparsity_report
from .schedules import CubicSchedule, OneShot, PruningSchedule, ThresholdSchedule, q_for_final_sparsity
from .taylor import PruneTarget, TaylorPruner  # structured pruning, Molchanov et al. 2019 (docs/taylor.md)
from .selection import CONV_TYPES, DEFAULT_TYPES, LINEAR_TYPES, RECURRENT_TYPES, iter_prunable_weights

__all__ = [
    "BlockShape",
    "CONV_TYPES",
    "CubicSchedule",
    "DEFAULT_TYPES",
    "LINEAR_TYPES",
    "LayerSparsity",
    "MagnitudePruner",
    "OneShot",
    "PruneGroup",
    "PruningSchedule",
    "RECURRENT_TYPES",
    "ThresholdSchedule",
    "WeightMask",
    "block_scores",
    "format_report",
    "group_lasso",
    "iter_prunable_weights",
    "q_for_final_sparsity",
    "PruneTarget",
    "TaylorPruner",
    "quantile_threshold",
    "sparsity_report",
]
