"""Packed formats: exact round trips, smallest index types, int8 that keeps zeros, exact bytes."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

from compressor import BlockShape, MagnitudePruner, OneShot, PruneGroup
from compressor.packed_model import PackingConfig, choose_packing, pack_model
from compressor.packing import FORMATS, index_dtype, pack

from .models import Mixed

def sparse_weight(shape, sparsity, seed, block=BlockShape(1, 1)):
    """Random weight with whole ``block``s zeroed at roughly ``sparsity``."""
    rng = np.random.default_rng(seed)
    weight = rng.standard_normal(shape).astype(np.float32)
    matrix = weight.reshape(shape[0], -1)
    n_br, n_bc = block.grid(matrix.shape)
    keep = rng.random((n_br, n_bc)) >= sparsity
    full = np.repeat(np.repeat(keep, block.rows, 0), block.cols, 1)[: matrix.shape[0], : matrix.shape[1]]
    return (matrix * full).reshape(shape)


shapes = st.one_of(
    st.tuples(st.integers(1, 70), st.integers(1, 70)),
    st.tuples(st.integers(1, 12), st.integers(1, 6), st.integers(1, 5), st.integers(1, 5)),  # conv weights
)
blocks = st.builds(BlockShape, st.integers(1, 16), st.integers(1, 16))


@settings(max_examples=200, deadline=None)
@given(shape=shapes, sparsity=st.floats(0.0, 0.99), block=blocks, prune_block=blocks,
       fmt=st.sampled_from(FORMATS), seed=st.integers(0, 2**32 - 1))
def test_fp32_round_trip_is_exact(shape, sparsity, block, prune_block, fmt, seed):
    weight = sparse_weight(shape, sparsity, seed, prune_block)
    packed = pack(weight, fmt, block)
    assert np.array_equal(packed.to_dense(), weight)
    assert np.array_equal(packed.stored_matrix(), weight.reshape(packed.matrix_shape))
    assert packed.to_dense().dtype == np.float32 and packed.to_dense().shape == weight.shape
    assert packed.nbytes == sum(a.nbytes for a in packed.arrays.values())
    rows, cols = packed.matrix_shape
    n_br, n_bc = packed.block.grid((rows, cols))
    largest = {"indptr": packed.nnz // (packed.block.rows * packed.block.cols), "indices": n_bc - 1,
               "row": rows - 1, "col": cols - 1}  # the largest value each index array must hold
    for key, value in largest.items():
        if key in packed.arrays:
            assert packed.arrays[key].dtype == index_dtype(value), key


@settings(max_examples=150, deadline=None)
@given(shape=shapes, sparsity=st.floats(0.0, 0.99), block=blocks, fmt=st.sampled_from(FORMATS),
       seed=st.integers(0, 2**32 - 1))
def test_int8_keeps_zeros_and_error_is_half_a_step(shape, sparsity, block, fmt, seed):
    weight = sparse_weight(shape, sparsity, seed, block)
    packed = pack(weight, fmt, block, dtype="int8")
    back = packed.to_dense()
    assert np.all(back[weight == 0] == 0)  # a pruned zero stays exactly zero
    assert packed.arrays["values"].dtype == np.int8 and packed.arrays["values"].min(initial=0) >= -127
    matrix, restored = weight.reshape(shape[0], -1), back.reshape(shape[0], -1)
    step = packed.arrays["scales"][:, None]
    assert np.all(np.abs(matrix - restored) <= step / 2 * (1 + 1e-4) + 1e-7)  # float32 rounding at exact halves
    codes = packed.stored_matrix()
    assert codes.dtype == np.int8 and np.array_equal(codes.astype(np.float32) * step, restored)  # the codes in place
    assert packed.arrays["values"].size == pack(weight, fmt, block).arrays["values"].size  # only stored values
    assert packed.nbytes == sum(a.nbytes for a in packed.arrays.values())


@pytest.mark.parametrize("block", [BlockShape(1, 1), BlockShape(2, 2), BlockShape(4, 1), BlockShape(1, 4)])
def test_csr_and_bsr_layout_match_torch_sparse(block):
    weight = sparse_weight((16, 24), 0.7, seed=3, block=block)
    fmt = "csr" if block.is_unstructured else "bsr"
    packed = pack(weight, fmt, block)
    dense = torch.from_numpy(weight)
    reference = dense.to_sparse_csr() if fmt == "csr" else dense.to_sparse_bsr((block.rows, block.cols))
    assert np.array_equal(packed.arrays["indptr"], reference.crow_indices().numpy())
    assert np.array_equal(packed.arrays["indices"], reference.col_indices().numpy())
    assert np.array_equal(packed.arrays["values"], reference.values().numpy())


def test_index_dtype_boundaries():
    assert index_dtype(255) == np.uint8 and index_dtype(256) == np.uint16
    assert index_dtype(65535) == np.uint16 and index_dtype(65536) == np.int32
    with pytest.raises(ValueError):
        index_dtype(2**31)


def test_bsr_index_arrays_use_uint16_for_1760_columns():
    packed = pack(sparse_weight((1760, 1760), 0.9, seed=0, block=BlockShape(16, 1)), "bsr", BlockShape(16, 1))
    assert packed.arrays["indices"].dtype == np.uint16  # block columns < 1760
    assert packed.arrays["indptr"].dtype in (np.uint16, np.int32)
    nnz_blocks = packed.arrays["indices"].size
    assert packed.nbytes == nnz_blocks * 16 * 4 + nnz_blocks * 2 + packed.arrays["indptr"].nbytes


def test_chooser_picks_the_smallest_and_honours_forcing_and_cost():
    config = PackingConfig()
    assert choose_packing("w", sparse_weight((64, 64), 0.0, 1), config).format == "dense"
    assert choose_packing("w", sparse_weight((64, 64), 0.9, 1), config).format == "csr"
    blocked = choose_packing("w", sparse_weight((64, 64), 0.9, 1, BlockShape(16, 1)), config)
    assert (blocked.format, blocked.block) == ("bsr", BlockShape(16, 1))
    forced = choose_packing("w", sparse_weight((64, 64), 0.0, 1), PackingConfig(format="bsr", block=BlockShape(3, 3)))
    assert (forced.format, forced.block) == ("bsr", BlockShape(3, 3))
    largest = PackingConfig(cost=lambda name, packed: -packed.nbytes)
    assert choose_packing("w", sparse_weight((64, 64), 0.9, 1), largest).format != "csr"


def test_size_report_counts_every_array_and_every_other_tensor():
    torch.manual_seed(0)
    model = Mixed()
    pruner = MagnitudePruner([PruneGroup(OneShot(0.9))])
    pruner.prepare(model)
    pruner.step()
    model = pruner.finalize()
    packed = pack_model(model, PackingConfig(dtype="int8"))
    report = packed.size_report()
    assert [layer.name for layer in report.layers] == list(packed.weights)
    for layer in report.layers:
        arrays = packed.weights[layer.name].arrays
        assert layer.stored_bytes == sum(a.nbytes for a in arrays.values()) == sum(layer.array_bytes.values())
    state = model.state_dict()
    assert report.other_bytes == sum(t.numel() * t.element_size() for k, t in state.items() if k not in packed.weights)
    assert report.dense_fp32_bytes == sum(4 * t.numel() if t.is_floating_point() else 8 * t.numel()
                                          for t in state.values())
    assert report.total_bytes == report.packed_bytes + report.other_bytes
    assert report.compression > 4  # 90 % sparse int8
    errors = {e.name: e for e in packed.quant_errors()}
    assert errors.keys() == packed.weights.keys()
    for name, weight in packed.weights.items():
        reference = model.get_parameter(name).detach().numpy()
        diff = np.abs(reference - weight.to_dense())
        assert errors[name].max_abs == pytest.approx(float(diff.max()))
        assert errors[name].relative == pytest.approx(float(np.linalg.norm(diff) / np.linalg.norm(reference)), rel=1e-6)
        assert 0 < errors[name].relative < 0.02
    assert report.as_dict()["total_bytes"] == report.total_bytes


def test_pack_model_errors():
    model = nn.Linear(4, 4)
    pruner = MagnitudePruner([PruneGroup(OneShot(0.5))])
    pruner.prepare(model)
    with pytest.raises(ValueError, match="finalize"):
        pack_model(model)
    with pytest.raises(ValueError, match="block"):
        PackingConfig(format="bsr")
    with pytest.raises(ValueError, match="format"):
        pack(np.zeros((2, 2), np.float32), "ell")


def test_save_and_load_packed_round_trip(tmp_path):
    from compressor.packed_model import PackingConfig, load_packed, pack_model, save_packed
    from tests.models import Mixed

    torch.manual_seed(0)
    model = Mixed().eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(torch.rand_like(p) > 0.8)
    packed = pack_model(model, PackingConfig(dtype="int8"))
    path = save_packed(packed, tmp_path / "packed.npz")
    loaded = load_packed(path, Mixed())
    assert set(loaded.weights) == set(packed.weights)
    for name, weight in packed.weights.items():
        other = loaded.weights[name]
        assert (other.format, other.dtype, other.block, other.shape) == (weight.format, weight.dtype, weight.block, weight.shape)
        assert all(np.array_equal(other.arrays[k], v) and other.arrays[k].dtype == v.dtype for k, v in weight.arrays.items())
    x = torch.randn(2, 1, 8, 7)
    with torch.no_grad():
        assert torch.equal(loaded.module.eval()(x), packed.dequantized().eval()(x))
