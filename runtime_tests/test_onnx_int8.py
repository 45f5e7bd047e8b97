"""int8 ONNX artifacts (ONNX Runtime dynamic quantization, QInt8 weights): pruned zeros stay
zero, outputs within a stated tolerance of PyTorch, and bit-mask compression stays bit-exact."""

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from compressor import MagnitudePruner, OneShot, PruneGroup
from exporters.onnx import export_onnx
from compressor.blocks import BlockShape
from exporters.onnx_compress import compress_file, compress_initializers
from exporters.onnx_gru import lower_gru_file
from exporters.onnx_quantize import quantize_int8
from runtime_tests.onnxruntime_check import compare_with_torch, run_onnx

from runtime_tests.models import CASES, BiLSTMModel, pruned

INT8_RTOL = 2e-2  # dynamic int8 vs fp32 PyTorch, relative to the largest output


@pytest.mark.parametrize("name", ["linear-stack", "bilstm"])
def test_int8_pruned_artifact(name, tmp_path):
    torch.manual_seed(0)
    if name == "linear-stack":
        model, example = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(),
                                       nn.Linear(512, 10)), torch.randn(4, 256)
    else:
        model, example = BiLSTMModel(), torch.randn(2, 9, 12)
    pruner = MagnitudePruner([PruneGroup(OneShot(0.9))])
    pruner.prepare(model)
    pruner.step()
    model = pruner.finalize().eval()
    plain = export_onnx(model, (example,), tmp_path / "fp32.onnx")
    int8 = quantize_int8(plain.path, tmp_path / "int8.onnx")
    graph = onnx.load(str(int8)).graph
    ops = {n.op_type for n in graph.node}
    assert ops & {"DynamicQuantizeLSTM", "MatMulInteger", "DynamicQuantizeMatMul"}
    quantized = [onnx.numpy_helper.to_array(t) for t in graph.initializer if t.name.endswith("_quantized")]
    assert quantized and all(q.dtype == np.int8 and (q == 0).mean() >= 0.9 - 1e-3 for q in quantized)
    assert compare_with_torch(model, int8, (example,)).worst < INT8_RTOL

    compressed, _ = compress_initializers(onnx.load(str(int8)))
    assert {np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type)) for t in compressed.graph.initializer
            if t.name.endswith("__values")} == {np.dtype(np.int8)}
    path = tmp_path / "int8-compressed.onnx"
    onnx.save(compressed, str(path))
    assert np.array_equal(run_onnx(path, [example.numpy()])[0], run_onnx(int8, [example.numpy()])[0])
    if name == "linear-stack":  # 90 % sparse int8 + bit-mask against the fp32 dense artifact
        assert plain.size_bytes / path.stat().st_size > 12


INT8_MODEL_RTOL = 6e-2  # whole models: activations are quantized at run time in every layer


@pytest.mark.parametrize("block", [BlockShape(), BlockShape(16, 1)], ids=["unstructured", "block16x1"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_pruned_int8_compressed_artifact_of_every_model(name, block, tmp_path):
    """Every model kind, 90 % pruned (elementwise or in 16×1 blocks), GRUs lowered so their
    matmuls are int8 too, quantized and compressed: close to PyTorch fp32, compression bit-exact."""
    torch.manual_seed(0)
    factory, example, other, axes = CASES[name]
    model = pruned(factory().eval(), block).eval()
    plain = export_onnx(model, (example,), tmp_path / "fp32.onnx", dynamic_axes=axes)
    lowered = lower_gru_file(plain.path, tmp_path / "lowered.onnx")
    int8 = quantize_int8(lowered, tmp_path / "int8.onnx")
    compressed = tmp_path / "int8.compressed.onnx"
    report = compress_file(int8, compressed)
    ops = {n.op_type for n in onnx.load(str(int8)).graph.node}
    assert "GRU" not in ops
    for inputs in ((example,), (other,)):
        assert compare_with_torch(model, int8, inputs).worst < INT8_MODEL_RTOL
        for a, b in zip(run_onnx(int8, [t.numpy() for t in inputs]), run_onnx(compressed, [t.numpy() for t in inputs])):
            np.testing.assert_array_equal(a, b)
    assert all(t.stored_bytes < t.dense_bytes for t in report)
