"""Block-shape auto-selection: the fastest block shape on the target within an accuracy budget.

For each candidate r×c (1×1 = unstructured CSR): prune a copy of the model to ``sparsity`` in
r×c blocks (one-shot magnitude, then the user's optional ``finetune``), score it with the
user's ``evaluate`` (higher is better: accuracy, −CER, −loss …), pack it, compile it for the
target and time the whole library there (this machine, or a device over RPC).  The choice is
the fastest candidate whose score is at least ``reference − budget``, where ``reference`` is
the best score of any candidate (so unstructured pruning, usually the most accurate, sets the
bar).  Narang et al. (2017, block-sparse follow-up) trade a little accuracy for block kernels'
speed in the same way.
"""

from __future__ import annotations

import copy
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import tvm
from torch import nn

from compressor import MagnitudePruner, OneShot, PruneGroup
from compressor.blocks import BlockShape
from compressor.packed_model import PackingConfig, pack_model
from runtime_tests.tvm_check import latency_ms, load_vm

from .tvm import export_tvm
from .tvm_rpc import connect

DEFAULT_CANDIDATES: tuple[BlockShape, ...] = (BlockShape(1, 1), BlockShape(4, 4), BlockShape(8, 8), BlockShape(16, 1),
                                              BlockShape(1, 16))


@dataclass(frozen=True)
class BlockTrial:
    """One candidate: its score, the library's latency on the target and its size."""

    block: BlockShape
    score: float
    latency_ms: float
    size_bytes: int


@dataclass(frozen=True)
class BlockSelection:
    """Every trial and the chosen one (the fastest within ``budget`` of the best score)."""

    trials: tuple[BlockTrial, ...]
    chosen: BlockTrial
    budget: float


def _prune(model: nn.Module, block: BlockShape, sparsity: float, groups: Sequence[PruneGroup] | None) -> nn.Module:
    model = copy.deepcopy(model)
    pruner = MagnitudePruner([PruneGroup(OneShot(sparsity), block=block)] if groups is None else
                             [PruneGroup(OneShot(sparsity), types=g.types, include=g.include, exclude=g.exclude, block=block)
                              for g in groups])
    pruner.prepare(model)
    pruner.step()
    return pruner.finalize()


def _time_library(path: Path, inputs: list[np.ndarray], device: str | None) -> float:
    if device is None:
        return latency_ms(load_vm(path), inputs, tvm.cpu())
    session = connect(device)
    return latency_ms(session.load_vm(path), inputs, session.device)


def select_block_shape(model: nn.Module, example_inputs: Sequence[torch.Tensor], evaluate: Callable[[nn.Module], float],
                       sparsity: float, budget: float, candidates: Sequence[BlockShape] = DEFAULT_CANDIDATES,
                       dtype: str = "int8", target: str = "host", device: str | None = None,
                       finetune: Callable[[nn.Module], nn.Module] | None = None,
                       groups: Sequence[PruneGroup] | None = None) -> BlockSelection:
    """Try every candidate block shape (see the module docstring) and choose one.

    ``target``/``device``: compile for ``target`` and time on this machine (``device=None``,
    host targets only) or on the RPC device at ``device`` (``rpc://host:port``).  ``groups``
    restricts which weights are pruned (their types/include/exclude; schedule and block are
    replaced)."""
    if not candidates:
        raise ValueError("no candidate block shapes given")
    if device is None and target != "host":
        raise ValueError(f"timing a {target} library needs its device: give device='rpc://HOST:PORT'")
    inputs = [x.numpy() for x in example_inputs]
    trials = []
    with tempfile.TemporaryDirectory() as directory:
        for block in candidates:
            pruned = _prune(model, block, sparsity, groups)
            if finetune is not None:
                pruned = finetune(pruned)
            score = float(evaluate(pruned.eval()))
            config = (PackingConfig(format="csr", dtype=dtype) if block.is_unstructured else
                      PackingConfig(format="bsr", block=block, dtype=dtype))
            artifact = export_tvm(pack_model(pruned, config), example_inputs,
                                  Path(directory) / f"{block.rows}x{block.cols}.so", target=target)
            trials.append(BlockTrial(block, score, _time_library(artifact.path, inputs, device), artifact.size_bytes))
    best = max(trial.score for trial in trials)
    eligible = [trial for trial in trials if trial.score >= best - budget]
    return BlockSelection(tuple(trials), min(eligible, key=lambda trial: trial.latency_ms), budget)
