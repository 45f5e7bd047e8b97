"""The int8-activation direct convolution on AMX tiles (exporters.tvm_amx_conv) and its use by
``export_tvm(activations="int8")`` on a CPU with AMX: exact on exactly quantized inputs, within
the rounding bound on others (runtime_tests/conv_check.py), in both orientations."""

import pytest
import torch
import tvm

from compressor.packed_model import PackingConfig, pack_model
from exporters.tvm import export_tvm
from exporters.tvm_amx_conv import amx_conv_kernel, amx_plan, amx_plans, takes_amx_conv, target_has_amx
from exporters.tvm_conv import ConvShape
from exporters.tvm_targets import host_target
from runtime_tests.conv_check import (
    SHAPES,
    ConvFront,
    assert_exact,
    assert_takes_only,
    assert_within_rounding_bound,
    int8_weight,
)
from runtime_tests.tvm_check import compare_with_torch

needs_amx = pytest.mark.skipif(not target_has_amx(host_target()), reason="this CPU has no AMX (amx-tile, amx-int8)")

# beyond the VNNI kernel's: kw < 4 with a height dilation, and a width dilation (runs along the height)
AMX_SHAPES = SHAPES + [ConvShape(3, 20, 7, 37, 40, (3, 3), (1, 2), (1, 1, 1, 1), (2, 1)),
                       ConvShape(2, 4, 20, 11, 24, (5, 3), (1, 1), (2, 1, 2, 1), (1, 2))]


@pytest.mark.parametrize("shape", AMX_SHAPES, ids=lambda s: f"{s.tag}_{amx_plan(s).along}")
@needs_amx
def test_kernel_is_exact_on_exactly_quantized_inputs(shape):
    assert_exact(amx_conv_kernel, shape)


@pytest.mark.parametrize("shape", [SHAPES[0], AMX_SHAPES[-1]], ids=lambda s: amx_plan(s).along)
@needs_amx
def test_kernel_stays_within_the_rounding_bound(shape):
    assert_within_rounding_bound(amx_conv_kernel, shape)


def test_the_orientation_with_fewer_tile_products_is_chosen():
    ds2_conv1 = ConvShape(16, 1, 161, 100, 32, (41, 11), (2, 2), (20, 5, 20, 5), (1, 1))
    ds2_conv2 = ConvShape(16, 32, 81, 50, 32, (21, 11), (2, 1), (10, 5, 10, 5), (1, 1))
    # conv1: 50 columns × 6 tiles (81 rows) × 11 runs of 41 bytes (1 chunk) against
    # 81 rows × 4 tiles (50 columns) × 41 runs of 11 bytes (1 chunk)
    assert {p.along: p.cost for p in amx_plans(ds2_conv1)} == {"width": 81 * 4 * 41, "height": 50 * 6 * 11}
    assert amx_plan(ds2_conv1).along == "height"
    # conv2: 41 × 4 × 21 runs of 352 bytes (6 chunks) against 50 × 4 × 11 runs of 672 bytes (11 chunks)
    assert {p.along: p.cost for p in amx_plans(ds2_conv2)} == {"width": 41 * 4 * 21 * 6, "height": 50 * 4 * 11 * 11}
    assert amx_plan(ds2_conv2).along == "width"
    assert [p.along for p in amx_plans(AMX_SHAPES[-1])] == ["height"]
    # a run-time time axis (the width): the runs go along the static frequencies
    streaming = ConvShape(1, 32, 81, tvm.tirx.Var("W", "int64"), 32, (21, 11), (2, 1), (10, 5, 10, 5), (1, 1))
    assert [p.along for p in amx_plans(streaming)] == ["height"]
    both = ConvShape(1, 32, tvm.tirx.Var("H", "int64"), tvm.tirx.Var("W", "int64"), 32, (3, 3), (1, 1),
                     (1, 1, 1, 1), (1, 1))
    assert amx_plans(both) == [] and not takes_amx_conv(both, int8_weight(SHAPES[0], 5))


def test_only_int8_weights_with_a_unit_dilation_are_taken():
    dilated = ConvShape(2, 3, 9, 13, 20, (3, 5), (1, 1), (2, 2, 2, 2), (2, 2))
    assert_takes_only(takes_amx_conv, amx_conv_kernel, [dilated], "unit dilation")


@needs_amx
def test_export_with_int8_activations_runs_every_convolution_on_tiles(tmp_path):
    torch.manual_seed(0)
    packed = pack_model(ConvFront().eval(), PackingConfig(format="dense", dtype="int8"))
    example = torch.randn(2, 1, 40, 24)
    artifact = export_tvm(packed, (example,), tmp_path / "front.so", activations="int8")
    kernels = {use.weight: use.kernel for use in artifact.kernels}
    assert all("_amx_" in kernels[f"conv{i}.weight"] for i in (1, 2, 3)), kernels
    assert 0 < compare_with_torch(packed.dequantized(), artifact.path, (example,)).worst < 2e-2


@needs_amx
def test_export_with_a_run_time_width_runs_along_the_height(tmp_path):
    """A spectrogram's time axis as a run-time size (``dynamic_axes``): one library for every
    length, its convolutions on tiles along the static frequencies."""
    torch.manual_seed(0)
    packed = pack_model(ConvFront().eval(), PackingConfig(format="dense", dtype="int8"))
    artifact = export_tvm(packed, (torch.randn(2, 1, 40, 24),), tmp_path / "front.so", dynamic_axes={0: [3]},
                          activations="int8")
    kernels = [use.kernel for use in artifact.kernels if use.weight.startswith("conv")]
    assert len(kernels) == 3 and all("_wdyn_" in k and k.endswith("_amx_h") for k in kernels), kernels
    for frames in (5, 24, 100):  # fewer than one tile of 16 positions, and several
        assert 0 < compare_with_torch(packed.dequantized(), artifact.path, (torch.randn(2, 1, 40, frames),)).worst < 2e-2
