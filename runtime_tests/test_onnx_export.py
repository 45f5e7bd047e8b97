"""fp32 ONNX artifacts (dense and pruned) in stock ONNX Runtime against PyTorch: within 1e-4
relative, at the exported shapes and at other batch sizes and sequence lengths (dynamic axes)."""

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from compressor import MagnitudePruner, OneShot, PruneGroup
from exporters.onnx import export_onnx
from runtime_tests.models import CASES, SEQ, BiLSTMModel, pruned
from runtime_tests.onnxruntime_check import compare_with_torch, run_onnx

FP32_RTOL = 1e-4


@pytest.mark.parametrize("kind", ["dense", "pruned"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_onnx_runtime_matches_pytorch(name, kind, tmp_path):
    torch.manual_seed(0)
    factory, example, other, axes = CASES[name]
    model = factory().eval()
    if kind == "pruned":
        model = pruned(model).eval()
    artifact = export_onnx(model, (example,), tmp_path / f"{name}.onnx", dynamic_axes=axes)
    onnx.checker.check_model(str(artifact.path))
    assert {n.op_type for n in onnx.load(str(artifact.path)).graph.node}.isdisjoint({"NonZero"})
    assert compare_with_torch(model, artifact.path, (example,)).worst < FP32_RTOL
    assert compare_with_torch(model, artifact.path, (other,)).worst < FP32_RTOL  # dynamic axes
    if kind == "pruned":  # zeros are baked into the initializers
        weights = [onnx.numpy_helper.to_array(t) for t in onnx.load(str(artifact.path)).graph.initializer]
        assert max(float((w == 0).mean()) for w in weights if w.size > 100) > 0.85


def test_recurrent_layers_become_single_onnx_operators(tmp_path):
    artifact = export_onnx(BiLSTMModel().eval(), (torch.randn(1, 5, 12),), tmp_path / "m.onnx", dynamic_axes=SEQ)
    ops = [n.op_type for n in onnx.load(str(artifact.path)).graph.node]
    assert ops.count("LSTM") == 2 and "Loop" not in ops


def test_export_refuses_attached_masks_and_leaves_no_file(tmp_path):
    model = nn.Linear(4, 4)
    MagnitudePruner([PruneGroup(OneShot(0.5))]).prepare(model)
    with pytest.raises(ValueError, match="finalize"):
        export_onnx(model, (torch.randn(1, 4),), tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []


def test_run_onnx_checks_the_input_count(tmp_path):
    artifact = export_onnx(nn.Linear(4, 2).eval(), (torch.randn(1, 4),), tmp_path / "m.onnx")
    with pytest.raises(ValueError, match="takes 1 inputs"):
        run_onnx(artifact.path, [np.zeros((1, 4), np.float32)] * 2)
