"""GRU operators lowered to MatMul + Scan (exporters.onnx_gru): the same outputs as ONNX Runtime's
GRU operator (within 1e-5 relative) at any batch size and sequence length, and after dynamic
quantization the recurrent MatMuls inside the Scan body run in int8, within 3e-2 of PyTorch fp32."""

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from compressor import MagnitudePruner, OneShot, PruneGroup
from compressor.zoo import build_model
from exporters.onnx import export_onnx
from exporters.onnx_compress import compress_initializers
from exporters.onnx_gru import lower_gru, lower_gru_file
from exporters.onnx_quantize import quantize_int8
from runtime_tests.onnxruntime_check import compare_with_torch, run_onnx

LOWERED_RTOL = 1e-5  # lowered fp32 graph vs the GRU operator, relative to the largest output
INT8_RTOL = 3e-2  # lowered + dynamic int8 vs PyTorch fp32, relative to the largest output
INT8_MATMULS = {"MatMulInteger", "DynamicQuantizeMatMul"}


def relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    assert actual.shape == expected.shape
    return float(np.abs(actual - expected).max() / max(np.abs(expected).max(), 1e-12))


def scan_bodies(model: onnx.ModelProto) -> list[onnx.GraphProto]:
    return [a.g for n in model.graph.node if n.op_type == "Scan" for a in n.attribute if a.name == "body"]


# --- a bare ONNX GRU operator, every variant of its attributes and optional inputs --------------

def gru_operator(direction: str, linear_before_reset: int, bias: bool, lens: bool, h0: bool,
                 inputs: int = 5, hidden: int = 7) -> onnx.ModelProto:
    rng = np.random.default_rng(1)
    d = 2 if direction == "bidirectional" else 1
    weights = {"W": (d, 3 * hidden, inputs), "R": (d, 3 * hidden, hidden), "B": (d, 6 * hidden)}
    if not bias:
        del weights["B"]
    initializers = [numpy_helper.from_array((0.4 * rng.standard_normal(s)).astype(np.float32), n)
                    for n, s in weights.items()]
    graph_inputs = [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["T", "N", inputs])]
    names = ["X", "W", "R", "B" if bias else "", "L" if lens else "", "H0" if h0 else ""]
    if lens:
        graph_inputs.append(helper.make_tensor_value_info("L", TensorProto.INT32, ["N"]))
    if h0:
        graph_inputs.append(helper.make_tensor_value_info("H0", TensorProto.FLOAT, [d, "N", hidden]))
    while not names[-1]:
        names.pop()
    node = helper.make_node("GRU", names, ["Y", "Y_h"], hidden_size=hidden, direction=direction,
                            linear_before_reset=linear_before_reset)
    outputs = [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["T", d, "N", hidden]),
               helper.make_tensor_value_info("Y_h", TensorProto.FLOAT, [d, "N", hidden])]
    graph = helper.make_graph([node], "gru", graph_inputs, outputs, initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def run_model(model: onnx.ModelProto, feeds: dict[str, np.ndarray], tmp_path, name: str) -> list[np.ndarray]:
    path = tmp_path / f"{name}.onnx"
    onnx.save(model, str(path))
    wanted = [i.name for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
    return run_onnx(path, [feeds[n] for n in wanted])


@pytest.mark.parametrize("direction", ["forward", "reverse", "bidirectional"])
@pytest.mark.parametrize("linear_before_reset", [1, 0])
@pytest.mark.parametrize("optional", ["none", "bias+h0", "bias+lens+h0"])
def test_lowered_equals_gru_operator(direction, linear_before_reset, optional, tmp_path):
    bias, lens, h0 = "bias" in optional, "lens" in optional, "h0" in optional
    model = gru_operator(direction, linear_before_reset, bias, lens, h0)
    lowered = lower_gru(model)
    onnx.checker.check_model(lowered, full_check=True)
    assert "GRU" not in {n.op_type for n in lowered.graph.node} and len(scan_bodies(lowered)) == 1
    rng = np.random.default_rng(2)
    d = 2 if direction == "bidirectional" else 1
    for steps, batch in [(1, 1), (6, 3), (11, 2)]:
        feeds = {"X": rng.standard_normal((steps, batch, 5)).astype(np.float32),
                 "L": rng.integers(1, steps + 1, batch).astype(np.int32),
                 "H0": rng.standard_normal((d, batch, 7)).astype(np.float32)}
        expected = run_model(model, feeds, tmp_path, "gru")
        actual = run_model(lowered, feeds, tmp_path, "lowered")
        for a, e in zip(actual, expected, strict=True):
            assert relative_error(a, e) < LOWERED_RTOL, (steps, batch)


def test_models_without_gru_are_unchanged():
    model = gru_operator("forward", 1, True, False, False)
    model.graph.node[0].op_type = "RNN"  # any other operator
    assert lower_gru(model).SerializeToString() == model.SerializeToString()


# --- the zoo's GRU models exported by export_onnx -------------------------------------------------

# name: (factory, example, other inputs (batch sizes and lengths incl. T = 1), dynamic axes)
MODELS = {
    # ds2-mini: convolutions, 2 bidirectional nn.GRU layers (directions summed), FC, output
    "ds2-mini": (lambda: build_model("ds2-mini", hidden=64), torch.randn(2, 1, 64, 30),
                 [torch.randn(1, 1, 64, 30), torch.randn(3, 1, 64, 1), torch.randn(5, 1, 64, 47)],
                 {"input": {0: "batch", 3: "time"}, "output": {0: "batch", 1: "time"}}),
    # char LM: embedding, 2-layer unidirectional nn.GRU, output layer
    "charlm": (lambda: build_model("charlm", hidden=64, layers=2), torch.randint(0, 63, (2, 20)),
               [torch.randint(0, 63, (1, 1)), torch.randint(0, 63, (4, 33)), torch.randint(0, 63, (16, 7))],
               {"input": {0: "batch", 1: "time"}, "output": {0: "batch", 1: "time"}}),
}


def pruned(model: torch.nn.Module) -> torch.nn.Module:
    pruner = MagnitudePruner([PruneGroup(OneShot(0.9))])
    pruner.prepare(model)
    pruner.step()
    return pruner.finalize()


def exported(name: str, tmp_path, prune: bool = False):
    torch.manual_seed(0)
    factory, example, others, axes = MODELS[name]
    model = factory().eval()
    if prune:
        model = pruned(model).eval()
    artifact = export_onnx(model, (example,), tmp_path / f"{name}.onnx", dynamic_axes=axes)
    return model, artifact.path, [example, *others]


@pytest.mark.parametrize("name", list(MODELS))
def test_lowered_zoo_model_equals_gru_operator(name, tmp_path):
    model, path, inputs = exported(name, tmp_path)
    n_gru = sum(n.op_type == "GRU" for n in onnx.load(str(path)).graph.node)
    assert n_gru == 2
    lowered_path = lower_gru_file(path, tmp_path / f"{name}.lowered.onnx")
    lowered = onnx.load(str(lowered_path))
    onnx.checker.check_model(lowered, full_check=True)
    assert "GRU" not in {n.op_type for n in lowered.graph.node} and len(scan_bodies(lowered)) == n_gru
    for x in inputs:
        expected = run_onnx(path, [x.numpy()])[0]
        assert relative_error(run_onnx(lowered_path, [x.numpy()])[0], expected) < LOWERED_RTOL, tuple(x.shape)
        assert compare_with_torch(model, lowered_path, (x,)).worst < 1e-4


@pytest.mark.parametrize("name", list(MODELS))
def test_lowered_int8_recurrent_matmuls(name, tmp_path):
    model, path, inputs = exported(name, tmp_path, prune=True)
    lowered_path = lower_gru_file(path, tmp_path / f"{name}.lowered.onnx")
    int8_path = quantize_int8(lowered_path, tmp_path / f"{name}.int8.onnx")
    int8 = onnx.load(str(int8_path))
    onnx.checker.check_model(int8)
    bodies = scan_bodies(int8)
    assert bodies and all(INT8_MATMULS & {n.op_type for n in body.node} for body in bodies)
    assert not any(n.op_type == "MatMul" for body in bodies for n in body.node)  # none left in fp32
    assert not any(n.op_type == "MatMul" for n in int8.graph.node)  # input projections too
    recurrent = {t.name: numpy_helper.to_array(t) for t in int8.graph.initializer
                 if "__lowered" in t.name and "/R_T_" in t.name and t.name.endswith("_quantized")}
    projections = [t for t in int8.graph.initializer if "__lowered" in t.name and t.name.endswith("/W_T_quantized")]
    directions = {"ds2-mini": 2, "charlm": 1}[name]
    assert len(recurrent) == 2 * directions and len(projections) == 2  # two GRU layers each
    for array in recurrent.values():  # QInt8, zero point 0: the pruned zeros stay zeros
        assert array.dtype == np.int8 and (array == 0).mean() >= 0.9 - 1e-3
    for x in inputs:
        assert compare_with_torch(model, int8_path, (x,)).worst < INT8_RTOL, tuple(x.shape)

    compressed, report = compress_initializers(int8)
    assert {r.name for r in report} >= set(recurrent)  # the recurrent weights are top-level initializers
    compressed_path = tmp_path / f"{name}.int8.compressed.onnx"
    onnx.save(compressed, str(compressed_path))
    x = inputs[0].numpy()
    assert np.array_equal(run_onnx(compressed_path, [x])[0], run_onnx(int8_path, [x])[0])
