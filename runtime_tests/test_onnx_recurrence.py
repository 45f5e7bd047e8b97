"""DS2's SharedInputBiRecurrent exported as MatMul + Scan (exporters.onnx_recurrence) with a dynamic
time axis: ONNX Runtime equals PyTorch (1e-4) at any length and batch, the shared input weight is
stored once, int8 + compression work; and export_onnx's dynamic-axis guard refuses a model whose
forward is traced at a fixed length."""

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from compressor.zoo import SharedInputBiRecurrent, build_model
from exporters.onnx import export_onnx
from exporters.onnx_compress import compress_file
from exporters.onnx_quantize import quantize_int8
from exporters.onnx_recurrence import DOMAIN
from runtime_tests.models import pruned
from runtime_tests.onnxruntime_check import compare_with_torch, run_onnx

FP32_RTOL = 1e-4
INT8_RTOL = 6e-2
AXES = {"input": {0: "batch", 3: "time"}, "output": {0: "batch", 1: "time"}}
LAYERS, HIDDEN, N_FREQ = 2, 32, 32
EXAMPLE = (2, 1, N_FREQ, 30)
OTHERS = [(2, 1, N_FREQ, 7), (2, 1, N_FREQ, 51), (3, 1, N_FREQ, 30), (1, 1, N_FREQ, 1)]  # lengths, batch, T = 1


def small(name: str) -> nn.Module:
    torch.manual_seed(0)
    return build_model(name, hidden=HIDDEN, layers=LAYERS, n_freq=N_FREQ).eval()


def scan_bodies(model: onnx.ModelProto) -> list[onnx.GraphProto]:
    return [a.g for n in model.graph.node if n.op_type == "Scan" for a in n.attribute if a.name == "body"]


@pytest.mark.parametrize("name", ["ds2", "ds2-gru"])
def test_shared_input_layers_export_with_dynamic_time(name, tmp_path):
    model = small(name)
    artifact = export_onnx(model, (torch.randn(*EXAMPLE),), tmp_path / "m.onnx", dynamic_axes=AXES)
    proto = onnx.load(str(artifact.path))
    onnx.checker.check_model(proto, full_check=True)
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("Scan") == LAYERS and "Loop" not in ops
    assert not any(n.domain == DOMAIN for n in proto.graph.node)
    assert all(o.domain != DOMAIN for o in proto.opset_import)
    torch.manual_seed(1)
    for shape in [EXAMPLE, *OTHERS]:
        assert compare_with_torch(model, artifact.path, (torch.randn(*shape),)).worst < FP32_RTOL, shape

    # every weight stored once: the shared input weight (transposed) once per layer, nothing duplicated
    initializers = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    for i, layer in enumerate(model.rnns):
        assert isinstance(layer, SharedInputBiRecurrent)  # the model itself is not modified by the export
        for part in ("input", "forward_hh", "backward_hh"):
            stored = [n for n in initializers if n.startswith(f"rnns.{i}.{part}.weight")]
            assert stored == [f"rnns.{i}.{part}.weight_T"]
            weight = getattr(layer, part).weight.detach().numpy()
            assert np.array_equal(initializers[stored[0]], weight.T)
    matrices = sum(a.size for a in initializers.values() if a.ndim >= 2)
    assert matrices == sum(p.numel() for p in model.parameters() if p.dim() >= 2)


@pytest.mark.parametrize("name", ["ds2", "ds2-gru"])
def test_pruned_int8_and_compressed(name, tmp_path):
    model = pruned(small(name)).eval()
    artifact = export_onnx(model, (torch.randn(*EXAMPLE),), tmp_path / "m.onnx", dynamic_axes=AXES)
    x = np.random.default_rng(0).standard_normal(OTHERS[1]).astype(np.float32)

    # fp32, pruned: compressed at rest, bit-identical
    report = compress_file(artifact.path, tmp_path / "m.compressed.onnx")
    recurrent = {f"rnns.{i}.{part}.weight_T" for i in range(LAYERS) for part in ("input", "forward_hh", "backward_hh")}
    assert {r.name for r in report} >= recurrent
    assert (tmp_path / "m.compressed.onnx").stat().st_size < artifact.size_bytes / 3
    assert np.array_equal(run_onnx(tmp_path / "m.compressed.onnx", [x])[0], run_onnx(artifact.path, [x])[0])

    # int8: the recurrent MatMul inside each Scan body is quantized, the weights are top-level int8 initializers
    int8_path = quantize_int8(artifact.path, tmp_path / "m.int8.onnx")
    int8 = onnx.load(str(int8_path))
    bodies = scan_bodies(int8)
    assert len(bodies) == LAYERS
    assert all("MatMulInteger" in {n.op_type for n in body.node} for body in bodies)
    assert not any(n.op_type == "MatMul" for body in bodies for n in body.node)
    quantized = {t.name: numpy_helper.to_array(t) for t in int8.graph.initializer if t.name.endswith("_quantized")}
    for name_ in recurrent:
        array = quantized[f"{name_}_quantized"]
        assert array.dtype == np.int8 and (array == 0).mean() >= 0.9 - 1e-3
    torch.manual_seed(2)
    for shape in [EXAMPLE, OTHERS[1], OTHERS[2]]:
        assert compare_with_torch(model, int8_path, (torch.randn(*shape),)).worst < INT8_RTOL, shape

    report = compress_file(int8_path, tmp_path / "m.int8.compressed.onnx")
    assert {r.name for r in report} >= {f"{n}_quantized" for n in recurrent}
    assert np.array_equal(run_onnx(tmp_path / "m.int8.compressed.onnx", [x])[0], run_onnx(int8_path, [x])[0])
    assert compare_with_torch(model, tmp_path / "m.int8.compressed.onnx", (torch.from_numpy(x),)).worst < INT8_RTOL


def test_a_bare_shared_input_layer_exports_too(tmp_path):
    torch.manual_seed(0)
    layer = SharedInputBiRecurrent(5, 6, "gru").eval()
    axes = {"input": {0: "time", 1: "batch"}, "output": {0: "time", 1: "batch"}}
    artifact = export_onnx(layer, (torch.randn(4, 2, 5),), tmp_path / "layer.onnx", dynamic_axes=axes)
    for shape in [(4, 2, 5), (9, 3, 5), (1, 1, 5)]:
        assert compare_with_torch(layer, artifact.path, (torch.randn(*shape),)).worst < FP32_RTOL


class LoopOverTime(nn.Module):
    """A recurrence written as a Python loop over time (not SharedInputBiRecurrent): traced, it is
    unrolled to the example's length.  ``summed``: the output has no time axis (same shape at any
    length, only the values are wrong)."""

    def __init__(self, summed: bool = False) -> None:
        super().__init__()
        self.cell, self.summed = nn.RNNCell(4, 8), summed

    def forward(self, x):  # [batch, time, 4]
        h = x.new_zeros(x.shape[0], 8)
        outputs = []
        for t in range(x.shape[1]):
            h = self.cell(x[:, t], h)
            outputs.append(h)
        return h if self.summed else torch.stack(outputs, dim=1)


@pytest.mark.parametrize("summed", [False, True])
def test_guard_refuses_a_forward_traced_at_a_fixed_length(summed, tmp_path):
    model = LoopOverTime(summed).eval()
    axes = {"input": {0: "batch", 1: "time"}, "output": {0: "batch"} if summed else {0: "batch", 1: "time"}}
    with pytest.raises(ValueError, match=r"dynamic axis 'time'.*traced at a fixed size") as info:
        export_onnx(model, (torch.randn(2, 6, 4),), tmp_path / "loop.onnx", dynamic_axes=axes)
    assert "\n" not in str(info.value)
    assert ("shape" if not summed else "differs") in str(info.value)
    assert list(tmp_path.iterdir()) == []  # nothing written
    # with the batch axis only dynamic there is nothing to guard: the export goes through
    artifact = export_onnx(model, (torch.randn(2, 6, 4),), tmp_path / "loop.onnx")
    assert compare_with_torch(model, artifact.path, (torch.randn(3, 6, 4),)).worst < FP32_RTOL
