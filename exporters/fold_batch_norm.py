"""Batch normalization folded into the convolution before it, for inference.

A ``BatchNorm`` in eval mode is an affine map per channel, so after a convolution it can be
folded into that convolution's weight and bias (as ONNX Runtime does at load, and as
``torch.nn.utils.fusion.fuse_conv_bn_eval`` does)::

    f = γ / √(σ² + ε),    W'[co] = f[co] · W[co],    b'[co] = f[co] · (b[co] − μ[co]) + β[co]

A packed weight is rescaled row by row (:meth:`~compressor.packing.PackedWeight.scaled_rows`):
an int8 weight keeps its codes and multiplies its per-channel scales, so folding re-quantizes
nothing and the result equals the unfolded model up to fp32 rounding.  The pair must be
adjacent in an ``nn.Sequential`` (DS2's convolution front end: conv, BN, clipped ReLU, twice); a
BatchNorm anywhere else is left to the compiler.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from compressor.packing import PackedWeight

_CONVS = (nn.Conv1d, nn.Conv2d)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)


def _foldable(conv: nn.Module, norm: nn.Module) -> bool:
    return (isinstance(conv, _CONVS) and isinstance(norm, _NORMS) and norm.track_running_stats
            and norm.num_features == conv.out_channels)


def fold_batch_norms(module: nn.Module, packed: dict[str, PackedWeight]) -> tuple[nn.Module, dict[str, PackedWeight]]:
    """A copy of ``module`` (in eval mode) with every BatchNorm that follows a convolution in an
    ``nn.Sequential`` folded into it and replaced by ``nn.Identity``, and ``packed`` with those
    convolutions' weights rescaled (other entries unchanged)."""
    module = copy.deepcopy(module).eval()
    packed = dict(packed)
    for prefix, sequential in module.named_modules():
        if not isinstance(sequential, nn.Sequential):
            continue
        children = list(sequential.named_children())
        for (conv_name, conv), (norm_name, norm) in zip(children, children[1:]):
            if not _foldable(conv, norm):
                continue
            with torch.no_grad():
                factor = (norm.weight if norm.affine else torch.ones_like(norm.running_var)) \
                    / torch.sqrt(norm.running_var + norm.eps)
                shift = norm.bias if norm.affine else torch.zeros_like(norm.running_mean)
                bias = conv.bias if conv.bias is not None else torch.zeros_like(norm.running_mean)
                conv.weight.mul_(factor.reshape(-1, *([1] * (conv.weight.dim() - 1))))
                conv.bias = nn.Parameter(factor * (bias - norm.running_mean) + shift)
            setattr(sequential, norm_name, nn.Identity())
            weight_name = f"{prefix}.{conv_name}.weight" if prefix else f"{conv_name}.weight"
            if weight_name in packed:
                packed[weight_name] = packed[weight_name].scaled_rows(factor.cpu().numpy())
    return module, packed
