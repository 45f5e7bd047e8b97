"""Compressed-at-rest ONNX artifacts (element and block bit-masks, COO sparse initializers):
smaller on disk, bit-exact in ONNX Runtime, bytes as the project counts them."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from compressor import BlockShape, MagnitudePruner, OneShot, PruneGroup
from compressor.packing import pack
from compressor.zoo import build_model
from exporters.onnx import export_onnx
from exporters.onnx_compress import CANDIDATE_BLOCKS, compress_file, compress_initializers
from runtime_tests.onnxruntime_check import folded_op_types, run_onnx, session_creation_seconds


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


# ---------------------------------------------------------------- block bit-mask, COO, accounting

class BiGRU(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gru = nn.GRU(32, 64, bidirectional=True, batch_first=True)

    def forward(self, x):
        return self.gru(x)[0]


def block_pruned(model: nn.Module, sparsity: float, block: BlockShape | None = None) -> nn.Module:
    torch.manual_seed(0)
    pruner = MagnitudePruner([PruneGroup(OneShot(sparsity), block=block or BlockShape())])
    pruner.prepare(model)
    pruner.step()
    return pruner.finalize().eval()


def linear_stack() -> nn.Module:
    return nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 16))


def same_outputs(a, b, example: torch.Tensor) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(run_onnx(a, [example.numpy()]), run_onnx(b, [example.numpy()])))


@pytest.mark.parametrize("name", ["linear-stack", "bigru"])
def test_block_bitmask_is_bit_exact_and_smaller_than_element_bitmask(name, tmp_path):
    torch.manual_seed(0)
    if name == "linear-stack":
        model, example = linear_stack(), torch.randn(3, 256)
    else:
        model, example = BiGRU(), torch.randn(2, 7, 32)
    model = block_pruned(model, 0.9, BlockShape(16, 1))
    plain = export_onnx(model, (example,), tmp_path / "plain.onnx").path
    element = compress_file(plain, tmp_path / "element.onnx", block="1x1")
    auto = compress_file(plain, tmp_path / "auto.onnx")
    forced = compress_file(plain, tmp_path / "forced.onnx", block=BlockShape(16, 1))
    big = [r.name for r in auto if r.shape[0] % 16 == 0 or len(r.shape) == 3]  # 16 divides the rows
    assert big and all(r.encoding == "bitmask" and r.block == BlockShape(16, 1) for r in auto if r.name in big)
    if name == "bigru":  # ONNX GRU weights [2, 3·64, in]: blocks tile the rows of both directions
        assert {r.matrix for r in auto} == {(384, 32), (384, 64)}
    assert all(r.block == BlockShape(16, 1) for r in forced)
    assert sum(r.stored_bytes for r in auto) < 0.8 * sum(r.stored_bytes for r in element)
    assert (tmp_path / "auto.onnx").stat().st_size < (tmp_path / "element.onnx").stat().st_size
    for path in ("element.onnx", "auto.onnx", "forced.onnx"):
        assert same_outputs(plain, tmp_path / path, example), path
        assert set(folded_op_types(tmp_path / path)) == set(folded_op_types(plain))  # decoders folded away


def test_coo_is_chosen_at_99_percent_and_bit_exact(tmp_path):
    example = torch.randn(3, 256)
    model = block_pruned(linear_stack(), 0.99)
    plain = export_onnx(model, (example,), tmp_path / "plain.onnx").path
    report = compress_file(plain, tmp_path / "coo.onnx")
    assert [r.encoding for r in report] == ["coo"] * 3
    compressed = onnx.load(str(tmp_path / "coo.onnx"))
    onnx.checker.check_model(compressed)  # full_check=False: strict shape inference rejects sparse initializers
    with pytest.raises(onnx.shape_inference.InferenceError):
        onnx.checker.check_model(compressed, full_check=True)
    assert {s.values.name for s in compressed.graph.sparse_initializer} == {r.name for r in report}
    assert all(s.indices.data_type == onnx.TensorProto.INT64 for s in compressed.graph.sparse_initializer)
    assert same_outputs(plain, tmp_path / "coo.onnx", example)
    without_coo = compress_initializers(onnx.load(str(plain)), coo=False)[1]
    assert {r.encoding for r in without_coo} == {"bitmask"}
    assert sum(r.stored_bytes for r in report) < sum(r.stored_bytes for r in without_coo)


def test_stored_bytes_follow_the_project_accounting(tmp_path):
    """Bit-mask: ``pack(W as the matrix, "bitmask", block).nbytes``; COO: ``nnz·(8 + 4)``; and the
    arrays written to the file are exactly those bytes."""
    example = torch.randn(3, 256)
    model = block_pruned(linear_stack(), 0.9, BlockShape(4, 4))
    weight = model[2].weight.data
    weight[weight.abs() < weight.abs().flatten().topk(100).values[-1]] = 0  # 100 of 262,144 left: COO
    plain = export_onnx(model, (example,), tmp_path / "plain.onnx").path
    weights = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(str(plain)).graph.initializer}
    report = compress_file(plain, tmp_path / "c.onnx")
    assert {r.encoding for r in report} == {"bitmask", "coo"}
    graph = onnx.load(str(tmp_path / "c.onnx")).graph
    stored = {t.name: onnx.numpy_helper.to_array(t).nbytes for t in graph.initializer}
    for r in report:
        weight = weights[r.name]
        assert r.dense_bytes == weight.nbytes and r.sparsity == pytest.approx(float((weight == 0).mean()))
        if r.encoding == "bitmask":
            assert r.stored_bytes == pack(weight.reshape(r.matrix), "bitmask", r.block).nbytes
            assert r.stored_bytes == stored[f"{r.name}__mask"] + stored[f"{r.name}__values"]
        else:
            assert r.stored_bytes == int((weight != 0).sum()) * (8 + 4)
            (sparse,) = [s for s in graph.sparse_initializer if s.values.name == r.name]
            assert r.stored_bytes == sum(onnx.numpy_helper.to_array(t).nbytes for t in (sparse.values, sparse.indices))
    assert same_outputs(plain, tmp_path / "c.onnx", example)


def _identity_model(array: np.ndarray) -> onnx.ModelProto:
    elem = onnx.helper.np_dtype_to_tensor_dtype(array.dtype)
    graph = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["w"], ["y"])], "g", [],
                                   [onnx.helper.make_tensor_value_info("y", elem, list(array.shape))],
                                   [onnx.numpy_helper.from_array(array, "w")])
    return onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])


@settings(max_examples=25, deadline=None)
@given(shape=st.lists(st.integers(1, 24), min_size=1, max_size=4), density=st.floats(0.0, 0.5),
       block=st.sampled_from([None, *CANDIDATE_BLOCKS[:8], BlockShape(3, 5)]), int8=st.booleans(),
       seed=st.integers(0, 2**16))
def test_any_tensor_round_trips_bit_exactly_in_onnx_runtime(shape, density, block, int8, seed):
    rng = np.random.default_rng(seed)
    array = rng.standard_normal(shape).astype(np.float32) * 40
    array[rng.random(shape) >= density] = 0
    array = array.astype(np.int8) if int8 else array
    compressed, report = compress_initializers(_identity_model(array), min_sparsity=0.0, min_numel=1, block=block)
    onnx.checker.check_model(compressed)
    assert len(report) == int(bool((array != 0).any()))  # all-zero tensors stay as they are
    sess = ort.InferenceSession(compressed.SerializeToString(), providers=["CPUExecutionProvider"])
    (actual,) = sess.run(None, {})
    assert actual.dtype == array.dtype and np.array_equal(actual, array)


def test_session_creation_time_of_plain_and_compressed(tmp_path):
    example = torch.randn(1, 256)
    plain = export_onnx(block_pruned(linear_stack(), 0.9), (example,), tmp_path / "plain.onnx").path
    compress_file(plain, tmp_path / "c.onnx")
    times = [session_creation_seconds(path, repeats=3, threads=1) for path in (plain, tmp_path / "c.onnx")]
    assert all(0 < t < 10 for t in times)
    with pytest.raises(ValueError, match="at least one"):
        session_creation_seconds(plain, repeats=0)
