"""Structured pruning by Taylor importance (Molchanov et al. 2019): criteria, coupled
structures, prune/fine-tune loop, physical shrinking and export.  See docs/taylor.md."""

from .cost import count_flops, count_params, make_plan
from .criteria import ACCUMULATED, CRITERIA, GATE_POSITIONS
from .graph import Analysis
from .io import load_shrunk, save_shrunk
from .modules import PrunedRNN
from .oracle import criterion_scores, oracle_importance, oracle_scores, rank_correlation
from .procedure import prune_finetune
from .pruner import MASK_BUFFER, PruneTarget, TaylorPruner, Unit
from .shrink import max_relative_difference, shrink

__all__ = [
    "ACCUMULATED",
    "CRITERIA",
    "GATE_POSITIONS",
    "MASK_BUFFER",
    "Analysis",
    "PruneTarget",
    "PrunedRNN",
    "TaylorPruner",
    "Unit",
    "count_flops",
    "count_params",
    "criterion_scores",
    "load_shrunk",
    "make_plan",
    "max_relative_difference",
    "oracle_importance",
    "oracle_scores",
    "prune_finetune",
    "rank_correlation",
    "save_shrunk",
    "shrink",
]
