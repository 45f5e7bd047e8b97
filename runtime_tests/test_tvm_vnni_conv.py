"""The int8-activation direct convolution (exporters.tvm_vnni_conv) and its use by
``export_tvm(activations="int8")``: exact on exactly quantized inputs, within the rounding bound
on others (runtime_tests/conv_check.py)."""

import pytest
import torch
import tvm

from compressor.packed_model import PackingConfig, pack_model
from exporters.tvm_conv import ConvShape
from exporters.tvm_rewrite import to_relax
from exporters.tvm_targets import host_cpu, host_target
from exporters.tvm_vnni_conv import takes_vnni_conv, vnni_conv_kernel
from exporters.tvm_vnni_kernel import target_has_vnni
from runtime_tests.conv_check import (
    SHAPES,
    ConvFront,
    assert_exact,
    assert_takes_only,
    assert_within_rounding_bound,
)
from runtime_tests.tvm_check import compare_with_torch

needs_vnni = pytest.mark.skipif(not target_has_vnni(host_target()), reason="this CPU has no AVX-512 VNNI")


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s.tag)
@needs_vnni
def test_kernel_is_exact_on_exactly_quantized_inputs(shape):
    assert_exact(vnni_conv_kernel, shape)


@needs_vnni
def test_kernel_stays_within_the_rounding_bound():
    assert_within_rounding_bound(vnni_conv_kernel, SHAPES[0])


def test_only_int8_weights_with_consecutive_width_taps_are_taken():
    dilated = ConvShape(2, 3, 9, 13, 20, (3, 5), (1, 1), (1, 2, 1, 2), (1, 2))
    narrow = ConvShape(2, 3, 9, 13, 20, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1))
    assert_takes_only(takes_vnni_conv, vnni_conv_kernel, [dilated, narrow], "width dilation 1")


@needs_vnni
def test_export_with_int8_activations_runs_the_integer_convolution(tmp_path):
    """On a target without AMX (which would take all three: runtime_tests/test_tvm_amx_conv.py)."""
    torch.manual_seed(0)
    packed = pack_model(ConvFront().eval(), PackingConfig(format="dense", dtype="int8"))
    example = torch.randn(2, 1, 40, 24)
    target = tvm.target.Target({"kind": "llvm", "mcpu": host_cpu(), "mattr": ["-amx-tile", "-amx-int8"]})
    relax_model = to_relax(packed, (example,), activations="int8", target=target)
    kernels = {use.weight: use.kernel for use in relax_model.kernels}
    assert kernels["conv1.weight"].endswith("_vnni") and kernels["conv2.weight"].endswith("_vnni")
    assert not kernels["conv3.weight"].endswith("_vnni")
    path = tmp_path / "front.so"
    tvm.compile(relax_model.mod, target=target).export_library(str(path))
    assert 0 < compare_with_torch(packed.dequantized(), path, (example,)).worst < 2e-2
