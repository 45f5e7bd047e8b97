"""The recurrence kernels (:mod:`exporters.tvm_recurrence_kernel`) against PyTorch's own layers.

Every cell and every packed format of ``W_hh`` the kernel takes (CSR, BSR 16×1, 4×4 and 8×8 —
vector lanes over the block's rows, from 1 to 16 — and dense): int8 at batch 16 (two accumulator
buffers in the sparse kernel), fp32 at batch 1 and at an uneven batch; both directions.  The
reference is the PyTorch layer carrying the stored weights (``PackedModel.dequantized``): the
kernels compute exactly with them, so the tolerance is that of fp32 sums in another order."""

import pytest
import torch
from torch import nn

from compressor.blocks import BlockShape
from compressor.packed_model import PackingConfig, pack_model
from exporters.tvm import export_tvm
from runtime_tests.models import pruned
from runtime_tests.tvm_check import compare_with_torch

HIDDEN = 32
FP32_RTOL = 1e-4


class Recurrent(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        layer = {"gru": nn.GRU, "lstm": nn.LSTM, "rnn_tanh": nn.RNN,
                 "rnn_relu": lambda *a, **k: nn.RNN(*a, nonlinearity="relu", **k)}[kind]
        self.rnn = layer(8, HIDDEN, bidirectional=True, batch_first=True)

    def forward(self, x):
        return self.rnn(x)[0]


# name: (packing options, the kernel's tag: CSR runs as BSR 1×1)
PACKINGS = {
    "csr": (dict(format="csr"), "bsr1x1"),
    "bsr16x1": (dict(format="bsr", block=BlockShape(16, 1)), "bsr16x1"),
    "bsr4x4": (dict(format="bsr", block=BlockShape(4, 4)), "bsr4x4"),
    "bsr8x8": (dict(format="bsr", block=BlockShape(8, 8)), "bsr8x8"),
    "dense": (dict(format="dense"), "dense"),
}


CASES = ([("gru", packing, "int8", 16) for packing in sorted(PACKINGS)]
         + [(cell, packing, "int8", 16) for cell in ("lstm", "rnn_tanh", "rnn_relu") for packing in ("bsr16x1", "csr")]
         + [(cell, packing, "fp32", batch) for cell in ("gru", "lstm") for packing in ("bsr16x1", "bsr8x8")
            for batch in (1, 3)])


@pytest.mark.parametrize(("cell", "packing", "dtype", "batch"), CASES)
def test_recurrence_kernel_matches_pytorch(cell, packing, dtype, batch, tmp_path):
    torch.manual_seed(0)
    options, tag = PACKINGS[packing]
    model = pruned(Recurrent(cell).eval(), options.get("block", BlockShape()))
    packed = pack_model(model, PackingConfig(dtype=dtype, **options))
    example = torch.randn(batch, 11, 8)
    artifact = export_tvm(packed, (example,), tmp_path / "rnn.so")
    recurrent = [use for use in artifact.kernels if "weight_hh" in use.weight]
    assert sorted(use.kernel for use in recurrent) == [
        f"recurrence_{cell}_{tag}_{dtype}_b{batch}_h{HIDDEN}_{direction}" for direction in ("forward", "reverse")]
    assert compare_with_torch(packed.dequantized(), artifact.path, (example,)).worst < FP32_RTOL


def test_clipped_relu_cell_of_the_ds2_layer(tmp_path):
    """DS2's min(max(·, 0), 20) cell, with inputs large enough to reach the clip (through the input
    bias, which the export adds inside the recurrence: exporters.recurrence.joins_recurrent_bias)."""
    from compressor.zoo import build_model

    torch.manual_seed(0)
    model = pruned(build_model("ds2", n_freq=32, hidden=48, layers=1).eval(), BlockShape(16, 1))
    with torch.no_grad():
        bias = model.rnns[0].input.bias
        bias.copy_(torch.linspace(-30, 30, bias.numel()))  # pre-activations below 0 and beyond 20
    packed = pack_model(model, PackingConfig(format="bsr", block=BlockShape(16, 1), dtype="int8"))
    example = torch.randn(2, 1, 32, 24)
    with torch.no_grad():
        reference = packed.dequantized()
        hidden = reference.rnns[0](reference.conv(example).flatten(1, 2).permute(2, 0, 1))
    assert float(hidden.max()) == 40.0 and float(hidden.min()) == 0.0  # both directions clipped at 20 and at 0
    artifact = export_tvm(packed, (example,), tmp_path / "ds2.so")
    # the backward loop adds its output into the forward one's (no pass of its own sums them)
    assert sorted(u.kernel.split("_h48_")[1] for u in artifact.kernels if u.kernel.startswith("recurrence")) == [
        "forward", "reverse_summed"]
    assert compare_with_torch(reference, artifact.path, (example,)).worst < FP32_RTOL


def test_inlined_tanh_and_sigmoid_are_within_5e_7_of_numpy():
    """The cell equations' rational tanh (exporters.tvm_recurrence_kernel.fast_tanh) and the
    sigmoid through it, over [-20, 20] (clamped beyond ±9)."""
    import numpy as np
    import tvm
    from tvm.script import tirx as T

    from exporters.tvm_recurrence_kernel import fast_sigmoid, fast_tanh
    from exporters.tvm_targets import host_target

    n = 40001

    @T.prim_func
    def both(x: T.Buffer((n,), "float32"), tanh: T.Buffer((n,), "float32"), sigmoid: T.Buffer((n,), "float32")):
        T.func_attr({"global_symbol": "both"})
        for i in range(n):
            tanh[i] = fast_tanh(x[i])
            sigmoid[i] = fast_sigmoid(x[i])

    x = np.linspace(-20, 20, n, dtype=np.float32)
    tensors = [tvm.runtime.tensor(a) for a in (x, np.zeros(n, np.float32), np.zeros(n, np.float32))]
    tvm.compile(both, target=host_target())["both"](*tensors)
    exact = np.tanh(x.astype(np.float64))
    assert np.abs(tensors[1].numpy() - exact).max() < 5e-7
    assert np.abs(tensors[2].numpy() - 1 / (1 + np.exp(-x.astype(np.float64)))).max() < 5e-7
