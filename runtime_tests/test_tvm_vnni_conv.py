"""The int8-activation direct convolution (exporters.tvm_vnni_conv) and its use by
``export_tvm(activations="int8")``.

Exactness as for the matmul kernel (runtime_tests/test_tvm_vnni.py): inputs that are integer
multiples of 2⁻⁵ with one at 127 of them quantize exactly, so the kernel must give the
convolution with the stored int8 codes up to the fp32 rounding of the final scaling.  On normal
inputs each output stays within the rounding bound ``s_x / 2 · Σ |w[co]|``."""

import numpy as np
import pytest
import torch
import tvm
from torch import nn

from compressor.packed_model import PackingConfig, pack_model
from compressor.packing import pack
from exporters.tvm import export_tvm
from exporters.tvm_conv import ConvShape, _padded_extent
from exporters.tvm_kernels import host_target
from exporters.tvm_vnni_conv import takes_vnni_conv, vnni_conv_kernel
from exporters.tvm_vnni_kernel import target_has_vnni
from runtime_tests.tvm_check import compare_with_torch

needs_vnni = pytest.mark.skipif(not target_has_vnni(host_target()), reason="this CPU has no AVX-512 VNNI")

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


def run_conv(shape: ConvShape, weight, x: np.ndarray) -> np.ndarray:
    func, name, constants = vnni_conv_kernel(shape, weight)
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


def int8_weight(shape: ConvShape, seed: int):
    w = np.random.default_rng(seed).standard_normal((shape.out_channels, shape.cols)).astype(np.float32)
    return pack(w, "dense", dtype="int8")


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s.tag)
@needs_vnni
def test_kernel_is_exact_on_exactly_quantized_inputs(shape):
    weight = int8_weight(shape, seed=1)
    codes = np.random.default_rng(2).integers(-127, 128, size=(shape.batch, shape.channels, shape.height, shape.width))
    codes.flat[0] = 127
    x = (codes * 2.0**-5).astype(np.float32)
    y, expected = run_conv(shape, weight, x), reference(shape, weight.to_dense(), x)
    assert np.abs(y - expected).max() <= 1e-6 * np.abs(expected).max()


@needs_vnni
def test_kernel_stays_within_the_rounding_bound():
    shape = SHAPES[0]
    weight = int8_weight(shape, seed=3)
    x = (np.random.default_rng(4).standard_normal((shape.batch, shape.channels, shape.height, shape.width)) * 3
         ).astype(np.float32)
    w = weight.to_dense()
    error = np.abs(run_conv(shape, weight, x) - reference(shape, w, x))
    bound = np.abs(w).sum(1) * (np.abs(x).max() / 127) / 2
    assert (error <= bound[None, :, None, None] * (1 + 1e-4) + 1e-5).all()
    assert error.max() > 0


def test_only_int8_weights_with_consecutive_width_taps_are_taken():
    shape = SHAPES[0]
    assert takes_vnni_conv(shape, int8_weight(shape, 5))
    fp32 = pack(np.ones((shape.out_channels, shape.cols), np.float32), "dense")
    dilated = ConvShape(2, 3, 9, 13, 20, (3, 5), (1, 1), (1, 2, 1, 2), (1, 2))
    narrow = ConvShape(2, 3, 9, 13, 20, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1))
    assert not takes_vnni_conv(shape, fp32)
    assert not takes_vnni_conv(dilated, int8_weight(dilated, 5))
    assert not takes_vnni_conv(narrow, int8_weight(narrow, 5))
    with pytest.raises(ValueError, match="width dilation 1"):
        vnni_conv_kernel(dilated, int8_weight(dilated, 5))


class Front(nn.Module):
    """DS2's convolution front end, smaller, and a 3×3 convolution (too narrow: stays fp32)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, (11, 5), stride=(2, 2), padding=(5, 2))
        self.conv2 = nn.Conv2d(8, 16, (7, 5), stride=(2, 1), padding=(3, 2))
        self.conv3 = nn.Conv2d(16, 16, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv3(self.conv2(torch.clamp(self.conv1(x), 0, 20)))


@needs_vnni
def test_export_with_int8_activations_runs_the_integer_convolution(tmp_path):
    torch.manual_seed(0)
    packed = pack_model(Front().eval(), PackingConfig(format="dense", dtype="int8"))
    example = torch.randn(2, 1, 40, 24)
    artifact = export_tvm(packed, (example,), tmp_path / "front.so", activations="int8")
    kernels = {use.weight: use.kernel for use in artifact.kernels}
    assert kernels["conv1.weight"].endswith("_vnni") and kernels["conv2.weight"].endswith("_vnni")
    assert not kernels["conv3.weight"].endswith("_vnni")
    assert 0 < compare_with_torch(packed.dequantized(), artifact.path, (example,)).worst < 2e-2
