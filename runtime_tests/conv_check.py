"""Shared by the tests of the int8-activation direct convolutions (VNNI and AMX): geometries,
weights, the padded input the kernels read, the float64 reference and a runner.

Exactness: inputs that are integer multiples of 2⁻⁵ with one at 127 of them quantize exactly,
so a kernel must give the convolution with the stored int8 codes up to the fp32 rounding of the
final scaling.  On normal inputs each output stays within the rounding bound
``s_x / 2 · Σ |w[co]|``."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch
import tvm
from torch import nn

from compressor.packing import PackedWeight, pack
from exporters.tvm_conv import ConvShape, _padded_extent
from exporters.tvm_targets import host_target

# (batch, Cin, H, W, Cout, kernel, stride, padding, dilation): odd sizes, Cout not a multiple of 16,
# kw not a multiple of 4, a height dilation, width strides 1 to 3, DS2's two convolutions
SHAPES = [ConvShape(2, 3, 9, 13, 20, (3, 5), (2, 1), (1, 2, 1, 2), (1, 1)),
          ConvShape(1, 5, 12, 9, 7, (2, 4), (1, 1), (0, 0, 0, 0), (2, 1)),
          ConvShape(2, 2, 10, 23, 17, (3, 6), (1, 3), (1, 2, 1, 2), (1, 1)),
          ConvShape(1, 1, 61, 40, 32, (41, 11), (2, 2), (20, 5, 20, 5), (1, 1)),
          ConvShape(1, 32, 41, 30, 32, (21, 11), (2, 1), (10, 5, 10, 5), (1, 1))]


def padded(x: np.ndarray, shape: ConvShape) -> np.ndarray:
    """``xp`` as :func:`~exporters.tvm_conv.pad_kernel` builds it."""
    hp, wp, vw = _padded_extent(shape)
    top, left = shape.padding[:2]
    flat = x.reshape(-1, shape.height, shape.width)
    xp = np.zeros((flat.shape[0], hp, wp + vw), np.float32)
    rows, cols = min(shape.height, hp - top), min(shape.width, wp - left)
    xp[:, top:top + rows, left:left + cols] = flat[:, :rows, :cols]
    return xp


def run_conv(kernel: Callable[[ConvShape, PackedWeight], tuple], shape: ConvShape, weight: PackedWeight,
             x: np.ndarray) -> np.ndarray:
    """``kernel``'s convolution of ``x[N, Cin, H, W]``, compiled for the host."""
    func, name, constants = kernel(shape, weight)
    module = tvm.compile(func, target=host_target())
    out = np.zeros((shape.batch, shape.out_channels, shape.out_height * shape.out_width), np.float32)
    tensors = [tvm.runtime.tensor(a, tvm.cpu()) for a in (padded(x, shape), *constants, out)]
    module[name](*tensors)
    return tensors[-1].numpy().reshape(shape.out_shape)


def reference(shape: ConvShape, w: np.ndarray, x: np.ndarray) -> np.ndarray:
    top, left = shape.padding[:2]
    return torch.nn.functional.conv2d(torch.tensor(x, dtype=torch.float64),
                                      torch.tensor(w.reshape(shape.weight_shape), dtype=torch.float64),
                                      stride=shape.stride, padding=(top, left), dilation=shape.dilation).numpy()


def int8_weight(shape: ConvShape, seed: int) -> PackedWeight:
    w = np.random.default_rng(seed).standard_normal((shape.out_channels, shape.cols)).astype(np.float32)
    return pack(w, "dense", dtype="int8")


def exactly_quantized_input(shape: ConvShape, seed: int) -> np.ndarray:
    """Integer multiples of 2⁻⁵ up to 127 of them, one at 127: quantized without rounding."""
    codes = np.random.default_rng(seed).integers(-127, 128, size=(shape.batch, shape.channels, shape.height,
                                                                  shape.width))
    codes.flat[0] = 127
    return (codes * 2.0**-5).astype(np.float32)


def assert_exact(kernel: Callable[[ConvShape, PackedWeight], tuple], shape: ConvShape) -> None:
    weight = int8_weight(shape, seed=1)
    x = exactly_quantized_input(shape, seed=2)
    y, expected = run_conv(kernel, shape, weight, x), reference(shape, weight.to_dense(), x)
    assert np.abs(y - expected).max() <= 1e-6 * np.abs(expected).max()


def assert_within_rounding_bound(kernel: Callable[[ConvShape, PackedWeight], tuple], shape: ConvShape) -> None:
    weight = int8_weight(shape, seed=3)
    x = (np.random.default_rng(4).standard_normal((shape.batch, shape.channels, shape.height, shape.width)) * 3
         ).astype(np.float32)
    w = weight.to_dense()
    error = np.abs(run_conv(kernel, shape, weight, x) - reference(shape, w, x))
    bound = np.abs(w).sum(1) * (np.abs(x).max() / 127) / 2
    assert (error <= bound[None, :, None, None] * (1 + 1e-4) + 1e-5).all()
    assert error.max() > 0


def assert_takes_only(takes: Callable[[ConvShape, PackedWeight], bool], kernel: Callable[[ConvShape, PackedWeight], tuple],
                      refused: list[ConvShape], message: str) -> None:
    """``takes`` accepts an int8 weight of ``SHAPES[0]`` but not an fp32 one, nor an int8 weight of
    any ``refused`` shape, and ``kernel`` refuses the first of those with ``message``."""
    shape = SHAPES[0]
    assert takes(shape, int8_weight(shape, 5))
    assert not takes(shape, pack(np.ones((shape.out_channels, shape.cols), np.float32), "dense"))
    assert not any(takes(other, int8_weight(other, 5)) for other in refused)
    with pytest.raises(ValueError, match=message):
        kernel(refused[0], int8_weight(refused[0], 5))


class ConvFront(nn.Module):
    """DS2's convolution front end, smaller, and a 3×3 convolution (too narrow for the VNNI kernel)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, (11, 5), stride=(2, 2), padding=(5, 2))
        self.conv2 = nn.Conv2d(8, 16, (7, 5), stride=(2, 1), padding=(3, 2))
        self.conv3 = nn.Conv2d(16, 16, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv3(self.conv2(torch.clamp(self.conv1(x), 0, 20)))
