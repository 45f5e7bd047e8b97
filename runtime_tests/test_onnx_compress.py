"""Bit-mask-compressed ONNX artifacts: smaller on disk, bit-exact in ONNX Runtime."""

import numpy as np
import onnx
import pytest
import torch

from compressor import MagnitudePruner, OneShot, PruneGroup
from compressor.zoo import build_model
from exporters.onnx import export_onnx
from exporters.onnx_compress import compress_initializers
from runtime_tests.onnxruntime_check import run_onnx


@pytest.mark.parametrize("name,example", [("ds2-mini", torch.randn(2, 1, 64, 30)),
                                          ("charlm", torch.randint(0, 63, (2, 16)))])
def test_bitmask_compressed_model_is_bit_exact_and_smaller(name, example, tmp_path):
    torch.manual_seed(0)
    model = build_model(name, hidden=64)
    pruner = MagnitudePruner([PruneGroup(OneShot(0.9))])
    pruner.prepare(model)
    pruner.step()
    model = pruner.finalize().eval()
    artifact = export_onnx(model, (example,), tmp_path / "plain.onnx")
    compressed, report = compress_initializers(onnx.load(str(artifact.path)))
    onnx.checker.check_model(compressed)
    path = tmp_path / "compressed.onnx"
    onnx.save(compressed, str(path))
    assert report and all(r.sparsity >= 0.5 and r.stored_bytes < r.dense_bytes / 4 for r in report)
    assert path.stat().st_size < artifact.size_bytes / 3
    assert "NonZero" not in {n.op_type for n in compressed.graph.node}
    (expected,) = run_onnx(artifact.path, [example.numpy()])
    (actual,) = run_onnx(path, [example.numpy()])
    assert np.array_equal(actual, expected)


def test_dense_and_small_tensors_are_left_alone():
    model = onnx.helper.make_model(onnx.helper.make_graph(
        [onnx.helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 64])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 64])],
        [onnx.numpy_helper.from_array(np.ones((64, 64), np.float32), "w")]))
    compressed, report = compress_initializers(model)
    assert report == [] and [t.name for t in compressed.graph.initializer] == ["w"]
