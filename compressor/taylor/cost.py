"""What a model costs after unit removal: parameters and FLOPs, without building it.

A *plan* says, for every analysed module, which output rows and input columns stay:
``{"out": kept output channels, "in": kept input columns, "units": [[kept units of layer l,
direction d]]}`` (index arrays).  :func:`count_params` and :func:`count_flops` apply the plan to
the module's hyper-parameters; :func:`~compressor.taylor.shrink.shrink` applies it to the weights.

FLOPs are multiply–accumulate operations (one multiply-add = one FLOP, the convention of
He et al. 2016 and of most pruning papers) of Conv, Linear and recurrent layers — the rest
(BatchNorm, activations, pooling, additions) is left out — for the example inputs given to
``prepare`` (every call of every module, so a module run once per time step counts every step).
"""

from __future__ import annotations

import math

import numpy as np
from torch import nn

from .graph import CONV_TYPES, RNN_TYPES, Analysis, FlopRecord

Plan = dict[str, dict]


def make_plan(analysis: Analysis, keep_atom: np.ndarray) -> Plan:
    """Kept indices per module for the boolean keep-mask over atoms (``keep_atom[0]`` is True)."""
    plan: Plan = {}
    for path, consumer in analysis.consumers.items():
        plan.setdefault(path, {})["in"] = np.flatnonzero(keep_atom[consumer.ids])
    for space in analysis.spaces:
        if space.kind in ("conv", "linear"):
            plan.setdefault(space.module, {})["out"] = np.flatnonzero(keep_atom[space.atoms])
    for path, info in analysis.rnns.items():
        plan.setdefault(path, {})["units"] = [[np.flatnonzero(keep_atom[analysis.spaces[s].atoms]) for s in layer]
                                              for layer in info.spaces]
    return plan


def _conv_sizes(m: nn.Module, p: dict) -> tuple[int, int, int]:
    """(kept out channels, kept in channels per group, groups) of a convolution."""
    out = len(p["out"]) if "out" in p else m.out_channels
    kept_in = len(p["in"]) if "in" in p else m.in_channels
    if m.groups == 1:
        return out, kept_in, 1
    if m.groups == m.in_channels:  # depthwise: one input per group, groups = kept inputs
        return out, 1, kept_in
    n_in = m.in_channels // m.groups
    per_group = int(np.sum(p["in"] < n_in)) if "in" in p else n_in
    return out, per_group, m.groups


def _rnn_sizes(m: nn.RNNBase, p: dict) -> tuple[list[int], list[list[int]]]:
    """(input width of each layer, hidden sizes [layer][direction])."""
    directions = 2 if m.bidirectional else 1
    hidden = [[len(u) for u in layer] for layer in p["units"]] if "units" in p else \
        [[m.hidden_size] * directions for _ in range(m.num_layers)]
    inputs = [len(p["in"]) if "in" in p else m.input_size] + [sum(h) for h in hidden[:-1]]
    return inputs, hidden


def _gates(m: nn.RNNBase) -> int:
    return {"GRU": 3, "LSTM": 4}.get(m.mode, 1)


def module_params(m: nn.Module, p: dict) -> int:
    """Parameters of module ``m`` (its own, not its children's) under plan entry ``p``."""
    if isinstance(m, CONV_TYPES):
        out, per_group, _ = _conv_sizes(m, p)
        return out * per_group * math.prod(m.kernel_size) + (out if m.bias is not None else 0)
    if isinstance(m, nn.Linear):
        out = len(p["out"]) if "out" in p else m.out_features
        kept_in = len(p["in"]) if "in" in p else m.in_features
        return out * kept_in + (out if m.bias is not None else 0)
    if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
        return 2 * len(p["in"]) if m.affine else 0
    if isinstance(m, RNN_TYPES):
        inputs, hidden = _rnn_sizes(m, p)
        g = _gates(m)
        return sum(g * h * (inputs[layer] + h) + (2 * g * h if m.bias else 0)
                   for layer, sizes in enumerate(hidden) for h in sizes)
    raise TypeError(f"no parameter formula for {type(m).__name__}")


def count_params(model: nn.Module, analysis: Analysis, plan: Plan) -> int:
    """Parameters of the model the plan describes (modules outside the plan: unchanged)."""
    total = 0
    for path, numel in analysis.param_numel.items():
        if path in plan:
            total += module_params(model.get_submodule(path), plan[path])
        else:
            total += numel
    return total


def record_flops(m: nn.Module, record: FlopRecord, p: dict) -> int:
    """Multiply–accumulates of one recorded call of ``m`` under plan entry ``p``."""
    if record.kind == "conv":
        out, per_group, _ = _conv_sizes(m, p)
        positions = math.prod(record.out_shape) // m.out_channels
        return positions * out * per_group * math.prod(m.kernel_size)
    if record.kind == "linear":
        out = len(p["out"]) if "out" in p else m.out_features
        kept_in = len(p["in"]) if "in" in p else m.in_features
        rows = math.prod(record.out_shape) // m.out_features
        return rows * out * kept_in
    inputs, hidden = _rnn_sizes(m, p)
    steps = math.prod(record.in_shape) // m.input_size
    g = _gates(m)
    return sum(steps * g * h * (inputs[layer] + h) for layer, sizes in enumerate(hidden) for h in sizes)


def count_flops(model: nn.Module, analysis: Analysis, plan: Plan) -> int:
    """Multiply–accumulates of Conv/Linear/RNN calls on the example inputs under the plan."""
    return sum(record_flops(model.get_submodule(r.module), r, plan.get(r.module, {})) for r in analysis.flops)
