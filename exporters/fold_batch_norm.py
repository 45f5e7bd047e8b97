"""Batch normalization folded into the convolution before it, for inference.

A ``BatchNorm`` in eval mode is an affine map per channel, so after a convolution it can be
folded into that convolution's weight and bias (as ONNX Runtime does at load, and as
``torch.nn.utils.fusion.fuse_conv_bn_eval`` does)::

    f = γ / √(σ² + ε),    W'[co] = f[co] · W[co],    b'[co] = f[co] · (b[co] − μ[co]) + β[co]

A packed weight is rescaled row by row (:meth:`~compressor.packing.PackedWeight.scaled_rows`):
an int8 weight keeps its codes and multiplies its per-channel scales, so folding re-quantizes
nothing and the result equals the unfolded model up to fp32 rounding.

The pairs come from a ``torch.fx`` trace of the model (the Taylor analysis' tracer, which makes a
submodule whose forward does not trace a leaf): a BatchNorm whose input is a convolution's
output, where that output has no other use and each module is called once — DS2's front end
(conv, BN, clipped ReLU, twice) and ResNet blocks (``bn1(conv1(x))``) alike.  A model whose own
forward cannot be traced gets the pairs adjacent in an ``nn.Sequential``; a BatchNorm anywhere
else is left to the compiler.
"""

from __future__ import annotations

import copy
import itertools
from collections import Counter

import torch
import torch.fx
from torch import nn

from compressor.packing import PackedWeight
from compressor.taylor.graph import RegionUntraceable, trace_with_opaque

_CONVS = (nn.Conv1d, nn.Conv2d)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)


def _foldable(conv: nn.Module, norm: nn.Module) -> bool:
    return (isinstance(conv, _CONVS) and isinstance(norm, _NORMS) and norm.track_running_stats
            and norm.num_features == conv.out_channels)


def _traced_pairs(module: nn.Module) -> list[tuple[str, str]]:
    """``(conv name, norm name)`` for each BatchNorm applied to nothing but a convolution's output."""
    graph = trace_with_opaque(module)[0].graph
    calls = Counter(node.target for node in graph.nodes if node.op == "call_module")
    pairs = []
    for node in graph.nodes:
        source = node.args[0] if node.op == "call_module" and len(node.args) == 1 and not node.kwargs else None
        if (isinstance(source, torch.fx.Node) and source.op == "call_module" and len(source.users) == 1
                and calls[source.target] == calls[node.target] == 1
                and _foldable(module.get_submodule(source.target), module.get_submodule(node.target))):
            pairs.append((source.target, node.target))
    return pairs


def _sequential_pairs(module: nn.Module) -> list[tuple[str, str]]:
    """``(conv name, norm name)`` for each BatchNorm right after a convolution in an ``nn.Sequential``."""
    pairs = []
    for prefix, sequential in module.named_modules():
        if isinstance(sequential, nn.Sequential):
            names = [f"{prefix}.{name}" if prefix else name for name, _ in sequential.named_children()]
            pairs += [(conv, norm) for conv, norm in itertools.pairwise(names)
                      if _foldable(module.get_submodule(conv), module.get_submodule(norm))]
    return pairs


def conv_norm_pairs(module: nn.Module) -> list[tuple[str, str]]:
    """The ``(convolution, BatchNorm)`` module names that :func:`fold_batch_norms` folds."""
    try:
        return _traced_pairs(module)
    except RegionUntraceable:
        return _sequential_pairs(module)


def fold_batch_norms(module: nn.Module, packed: dict[str, PackedWeight]) -> tuple[nn.Module, dict[str, PackedWeight]]:
    """A copy of ``module`` (in eval mode) with every BatchNorm of :func:`conv_norm_pairs` folded
    into its convolution and replaced by ``nn.Identity``, and ``packed`` with those convolutions'
    weights rescaled (other entries unchanged)."""
    module = copy.deepcopy(module).eval()
    packed = dict(packed)
    for conv_name, norm_name in conv_norm_pairs(module):
        conv, norm = module.get_submodule(conv_name), module.get_submodule(norm_name)
        with torch.no_grad():
            factor = (norm.weight if norm.affine else torch.ones_like(norm.running_var)) \
                / torch.sqrt(norm.running_var + norm.eps)
            shift = norm.bias if norm.affine else torch.zeros_like(norm.running_mean)
            bias = conv.bias if conv.bias is not None else torch.zeros_like(norm.running_mean)
            conv.weight.mul_(factor.reshape(-1, *([1] * (conv.weight.dim() - 1))))
            conv.bias = nn.Parameter(factor * (bias - norm.running_mean) + shift)
        parent, _, attribute = norm_name.rpartition(".")
        setattr(module.get_submodule(parent), attribute, nn.Identity())
        if f"{conv_name}.weight" in packed:
            packed[f"{conv_name}.weight"] = packed[f"{conv_name}.weight"].scaled_rows(factor.cpu().numpy())
    return module, packed
