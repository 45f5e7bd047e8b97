"""Convolutions through the project's kernels (exporters.tvm_conv): im2col + matmul_kernel over the
packed weight, against PyTorch within 1e-4 relative (int8: against the dequantized model,
``PackedModel.dequantized()``, whose weights the kernels compute with).  Geometry: strides,
padding, dilation, odd sizes, bias, a 1-D convolution, batch 1 (one chunk) and 3 (many chunks
with a remainder); dense fp32 and int8 and BSR 4x4 fp32 at 30 % (the direct convolution of
exporters.tvm_direct_conv), pruned CSR fp32 and BSR 4x4 int8 at 90 % (im2col); ResNet-8 and ds2-mini end to end;
grouped convolutions left to TVM.  Symbolic input height / width (``dynamic_axes``): one library
for every size, in pieces (thousands of them without overflowing the VM's stack), and ds2-mini
with a run-time time axis through ``export_tvm``."""

import itertools

import numpy as np
import pytest
import torch
import tvm
from torch import nn

from compressor.blocks import BlockShape
from compressor.packed_model import PackingConfig, pack_model
from compressor.zoo import build_model
from exporters import tvm_conv
from exporters.tvm import export_tvm
from exporters.tvm_kernels import compile_host
from exporters.tvm_rewrite import to_relax
from runtime_tests.models import pruned
from runtime_tests.tvm_check import compare_with_torch

RTOL = 1e-4
# kind: None (the model as it is), or (block, packing, sparsity); weights stored at least
# DIRECT_MIN_DENSITY dense run the direct convolution, sparser ones im2col + a sparse matmul
KINDS = {
    "dense-fp32": None,
    "dense-int8": (None, PackingConfig(format="dense", dtype="int8"), 0.0),
    "csr-fp32": (BlockShape(), PackingConfig(format="csr", dtype="fp32"), 0.9),
    "bsr4x4-int8": (BlockShape(4, 4), PackingConfig(format="bsr", block=BlockShape(4, 4), dtype="int8"), 0.9),
    "bsr4x4-fp32": (BlockShape(4, 4), PackingConfig(format="bsr", block=BlockShape(4, 4), dtype="fp32"), 0.3),
}
DIRECT_KINDS = {"dense-fp32", "dense-int8", "bsr4x4-fp32"}


class Convs(nn.Module):
    """Convolutions of every geometry the lowering handles, one after the other, plus a 1-D one."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, (3, 5), stride=(2, 1), padding=(1, 3), dilation=(1, 2))  # bias
        self.b = nn.Conv2d(8, 12, 3, stride=2, padding=2, dilation=2, bias=False)
        self.c = nn.Conv2d(12, 20, 1)  # 1x1, nothing padded
        self.d = nn.Conv2d(20, 7, (4, 2), stride=(1, 3), padding=(0, 1))  # even kernel, odd channels
        self.e = nn.Conv1d(3, 6, 5, stride=2, padding=3, dilation=3)

    def forward(self, image: torch.Tensor, signal: torch.Tensor):
        x = torch.relu(self.a(image))
        return self.d(self.c(torch.relu(self.b(x)))), self.e(signal)


class Grouped(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1)
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
        self.out = nn.Conv2d(8, 5, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.depthwise(torch.relu(self.grouped(self.conv(x)))))


def build(model: nn.Module, kind: str):
    """``(exported, reference)``: the model (pruned and packed for a sparse kind), and the
    PyTorch module the library must equal."""
    model = model.eval()
    if KINDS[kind] is None:
        return model, model
    block, config, sparsity = KINDS[kind]
    packed = pack_model(pruned(model, block, sparsity).eval() if sparsity else model, config)
    return packed, packed.dequantized().eval()


def run(exported, reference: nn.Module, inputs: tuple[torch.Tensor, ...]):
    """The rewritten module's kernels uses and left weights, after checking its outputs."""
    relax_model = to_relax(exported, inputs)
    vm = compile_host(relax_model.mod)
    result = vm["main"](*(tvm.runtime.tensor(x.numpy()) for x in inputs))
    outputs = [result.numpy()] if hasattr(result, "numpy") else [r.numpy() for r in result]
    with torch.no_grad():
        expected = reference(*inputs)
    expected = expected if isinstance(expected, tuple) else (expected,)
    for out, ref in zip(outputs, expected, strict=True):
        assert out.shape == tuple(ref.shape)
        assert np.abs(out - ref.numpy()).max() / np.abs(ref.numpy()).max() < RTOL
    return relax_model


def conv_weights(model: nn.Module, grouped: bool = False) -> set[str]:
    return {f"{name}.weight" for name, m in model.named_modules()
            if isinstance(m, (nn.Conv1d, nn.Conv2d)) and (m.groups > 1) == grouped}


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_conv_geometries_match_pytorch(kind, batch, monkeypatch):
    if batch > 1:  # many chunks of cols, the last one shorter
        monkeypatch.setattr(tvm_conv, "CHUNK_BYTES", 3000)
    torch.manual_seed(batch)
    model = Convs()
    exported, reference = build(model, kind)
    inputs = (torch.randn(batch, 3, 17, 13), torch.randn(batch, 3, 17))
    relax_model = run(exported, reference, inputs)
    assert {use.weight for use in relax_model.kernels} == conv_weights(model)
    assert relax_model.left_dense == []
    tag = kind.split("-")[0]
    assert all(use.format == tag and use.dtype == kind.split("-")[1] for use in relax_model.kernels)
    assert all(use.bytes_moved > 0 for use in relax_model.kernels)
    direct = [use.kernel.startswith("direct_conv_") for use in relax_model.kernels]
    assert all(direct) if kind in DIRECT_KINDS else not any(direct)


def test_chunks_cover_the_rows_once(monkeypatch):
    monkeypatch.setattr(tvm_conv, "CHUNK_BYTES", 3000)
    shape = tvm_conv.ConvShape(3, 12, 6, 7, 20, (1, 1), (1, 1), (0, 0, 0, 0), (1, 1))  # 126 rows of 48 bytes
    pieces = tvm_conv.chunks(shape)
    assert pieces == [(0, 48), (48, 48), (96, 30)]
    assert all(a + n == b for (a, n), (b, _) in itertools.pairwise(pieces))


def test_resnet8_end_to_end_every_conv_replaced():
    torch.manual_seed(0)
    model = build_model("resnet8")
    exported, reference = build(model, "csr-fp32")
    relax_model = run(exported, reference, (torch.randn(2, 1, 28, 28),))
    used = {use.weight for use in relax_model.kernels}
    assert conv_weights(model) <= used and "fc.weight" in used
    assert relax_model.left_dense == []


def test_ds2_mini_end_to_end_every_conv_replaced():
    torch.manual_seed(0)
    model = build_model("ds2-mini", hidden=64)
    exported, reference = build(model, "bsr4x4-int8")
    relax_model = run(exported, reference, (torch.randn(1, 1, 64, 40),))
    assert conv_weights(model) <= {use.weight for use in relax_model.kernels}
    assert relax_model.left_dense == []


def test_grouped_convs_are_left_to_tvm_and_correct():
    torch.manual_seed(0)
    model = Grouped()
    exported, reference = build(model, "csr-fp32")
    relax_model = run(exported, reference, (torch.randn(2, 4, 9, 10),))
    used = {use.weight for use in relax_model.kernels}
    assert used == conv_weights(model)
    assert set(relax_model.left_dense) == conv_weights(model, grouped=True) == {"grouped.weight", "depthwise.weight"}


def test_symbolic_sizes_one_library_for_every_size(monkeypatch):
    """Image height and width and signal length as run-time sizes: every convolution runs our
    kernels (none is left to TVM).  Sparse weights: im2col in pieces of 16 rows here (5,000 and
    more for the largest image, which a chain of calls one inside the other would overflow the
    VM's stack with) and the matmul kernels of any row count; dense ones: the direct convolution,
    also on rows narrower than its tile (outputs 2 to 6 wide)."""
    monkeypatch.setattr(tvm_conv, "CHUNK_BYTES", 3000)
    torch.manual_seed(0)
    model = Convs()
    for kind in ("dense-fp32", "dense-int8", "bsr4x4-int8"):
        exported, reference = build(model, kind)
        relax_model = to_relax(exported, (torch.randn(2, 3, 17, 13), torch.randn(2, 3, 17)), {0: [2, 3], 1: [2]})
        assert "R.nn.conv" not in relax_model.mod["main"].script()  # no convolution left to TVM
        assert {use.weight for use in relax_model.kernels} == conv_weights(model) and relax_model.left_dense == []
        expected_kernel = "direct_conv_" if kind in DIRECT_KINDS else "_bdyn_"
        assert all(expected_kernel in use.kernel for use in relax_model.kernels)
        vm = compile_host(relax_model.mod)
        for (h, w), length in (((17, 13), 17), ((14, 30), 11), ((25, 8), 40), ((300, 300), 9)):
            inputs = (torch.randn(2, 3, h, w), torch.randn(2, 3, length))
            result = vm["main"](*(tvm.runtime.tensor(x.numpy()) for x in inputs))
            with torch.no_grad():
                expected = reference(*inputs)
            for out, ref in zip(result, expected, strict=True):
                assert out.numpy().shape == tuple(ref.shape)
                assert np.abs(out.numpy() - ref.numpy()).max() / np.abs(ref.numpy()).max() < RTOL


def test_ds2_mini_run_time_time_axis_convs_replaced(tmp_path):
    torch.manual_seed(0)
    model = build_model("ds2-mini", hidden=64).eval()
    packed = pack_model(pruned(model), PackingConfig(dtype="int8"))
    artifact = export_tvm(packed, (torch.randn(1, 1, 64, 40),), tmp_path / "dyn.so", dynamic_axes={0: [3]})
    assert conv_weights(model) <= {use.weight for use in artifact.kernels}
    assert artifact.left_dense == ()
    reference = packed.dequantized()
    for frames in (17, 40, 123):
        assert compare_with_torch(reference, artifact.path, (torch.randn(1, 1, 64, frames),)).worst < RTOL
