"""The project's TIR matmul kernels (exporters.tvm_kernels), compiled for the host CPU, against
``x @ packed.to_dense().T``: dense, CSR and BSR of several blocks (including edges no block
divides and empty block rows), fp32 and int8, batch 1, 4 and 16, and the kernels of any row count
(``batch=None``) compiled once and run on several row counts; the error relative to the largest
output stays under 1e-5 (int8 kernels compute with the dequantized weight exactly, up to the
order of the fp32 additions)."""

import numpy as np
import pytest
import tvm

from compressor.blocks import BlockShape
from compressor.packing import pack
from exporters.tvm_kernels import KernelCall, compile_host, host_target, matmul_kernel, relax_matmul_module

RTOL = 1e-5
SHAPE = (50, 71)  # no block below divides both sides: 50 % 3, 50 % 16, 71 % 4, 71 % 5, 71 % 16 are all non-zero
LAYOUTS = [("dense", BlockShape()), ("csr", BlockShape()), ("bsr", BlockShape(16, 1)), ("bsr", BlockShape(1, 16)),
           ("bsr", BlockShape(4, 4)), ("bsr", BlockShape(8, 8)), ("bsr", BlockShape(3, 5))]


def pruned_weight(shape: tuple[int, int], block: BlockShape, seed: int, zeros: float = 0.85) -> np.ndarray:
    """Normal weight with about ``zeros`` of its ``block``s pruned, and its first block row empty."""
    rng = np.random.default_rng(seed)
    n_br, n_bc = block.grid(shape)
    keep = rng.random((n_br, n_bc)) >= zeros
    keep[0] = False
    mask = np.repeat(np.repeat(keep, block.rows, 0), block.cols, 1)[: shape[0], : shape[1]]
    return (rng.standard_normal(shape) * mask).astype(np.float32)


#: Row counts a kernel of any row count runs on: one row, a tile less / exactly / more than one, several tiles.
DYN_ROWS = (1, 15, 16, 17, 40)


def run_kernel(call: KernelCall, x: np.ndarray, module=None) -> np.ndarray:
    """Run ``call.func`` on ``x`` in ``module`` (by default, compile it alone for the host)."""
    module = module if module is not None else tvm.compile(call.func, target=host_target())
    y = tvm.runtime.tensor(np.full((x.shape[0], call.out_shape[1]), np.nan, np.float32))
    module[call.name](tvm.runtime.tensor(x), *(tvm.runtime.tensor(c) for c in call.constants), y)
    return y.numpy()


def relative_error(y: np.ndarray, reference: np.ndarray) -> float:
    return float(np.abs(y - reference).max() / max(np.abs(reference).max(), 1e-30))


@pytest.mark.parametrize("batch", [1, 4, 16])
@pytest.mark.parametrize("dtype", ["fp32", "int8"])
@pytest.mark.parametrize("fmt,block", LAYOUTS, ids=[f"{f}{b}" for f, b in LAYOUTS])
def test_kernel_matches_dense_reference(fmt, block, dtype, batch):
    weight = pruned_weight(SHAPE, block, seed=batch)
    packed = pack(weight, fmt, block, dtype)
    call = matmul_kernel(packed, batch)
    x = np.random.default_rng(1).standard_normal((batch, SHAPE[1])).astype(np.float32)
    y = run_kernel(call, x)
    assert y.shape == call.out_shape == (batch, SHAPE[0])
    assert relative_error(y, x @ packed.to_dense().T) < RTOL
    assert call.bytes_moved == sum(c.nbytes for c in call.constants) + x.nbytes + y.nbytes


@pytest.mark.parametrize("dtype", ["fp32", "int8"])
@pytest.mark.parametrize("fmt,block", LAYOUTS, ids=[f"{f}{b}" for f, b in LAYOUTS])
def test_any_row_count_kernel_matches_dense_reference(fmt, block, dtype):
    """``batch=None``: one compiled kernel for every row count, partial last tile included."""
    packed = pack(pruned_weight(SHAPE, block, seed=11), fmt, block, dtype)
    call = matmul_kernel(packed, None)
    assert call.out_shape == (None, SHAPE[0]) and "_bdyn_" in call.name
    module = tvm.compile(call.func, target=host_target())
    reference = packed.to_dense().T
    for rows in DYN_ROWS:
        x = np.random.default_rng(rows).standard_normal((rows, SHAPE[1])).astype(np.float32)
        y = run_kernel(call, x, module)
        assert y.shape == (rows, SHAPE[0])
        assert relative_error(y, x @ reference) < RTOL, rows
        assert call.bytes_moved_for(rows) == sum(c.nbytes for c in call.constants) + x.nbytes + y.nbytes
    with pytest.raises(ValueError, match="bytes_moved_for"):
        _ = call.bytes_moved


@pytest.mark.parametrize("fmt,block", [("csr", BlockShape()), ("bsr", BlockShape(3, 5)), ("bsr", BlockShape(16, 1))],
                         ids=["csr", "bsr3x5", "bsr16x1"])
def test_any_row_count_sparse_kernel_in_several_passes(fmt, block):
    """At K = 4100 one tile of transposed ``x`` fills DYN_X_BYTES: 40 rows take three passes."""
    packed = pack(pruned_weight((20, 4100), block, seed=12), fmt, block, "int8")
    call = matmul_kernel(packed, None)
    module = tvm.compile(call.func, target=host_target())
    for rows in (17, 40):
        x = np.random.default_rng(rows).standard_normal((rows, 4100)).astype(np.float32)
        assert relative_error(run_kernel(call, x, module), x @ packed.to_dense().T) < RTOL


@pytest.mark.parametrize("fmt,block,batch", [("dense", BlockShape(), 17), ("dense", BlockShape(), 20),
                                             ("bsr", BlockShape(16, 1), 20), ("csr", BlockShape(), 17)])
def test_batches_above_one_vector(fmt, block, batch):
    """Dense batch passes of unequal size, batch vectors over 16 lanes, block rows split in passes."""
    packed = pack(pruned_weight(SHAPE, block, seed=8), fmt, block, "int8")
    x = np.random.default_rng(9).standard_normal((batch, SHAPE[1])).astype(np.float32)
    assert relative_error(run_kernel(matmul_kernel(packed, batch), x), x @ packed.to_dense().T) < RTOL


@pytest.mark.parametrize("dtype", ["fp32", "int8"])
@pytest.mark.parametrize("block,batch", [(BlockShape(16, 1), 13), (BlockShape(8, 8), 6)],
                         ids=["bsr16x1-b13", "bsr8x8-b6"])
def test_rows_kernel_at_uneven_batches(block, batch, dtype):
    """Vectorized over a block's rows with ``x`` transposed: accumulators split 7 + 6 batch rows
    (16×1 at 13, ``x`` transposed in 1×1 tiles) or one buffer with 2×2 tiles (8×8 at 6)."""
    packed = pack(pruned_weight(SHAPE, block, seed=10), "bsr", block, dtype)
    call = matmul_kernel(packed, batch)
    assert "_rows_" in call.name
    x = np.random.default_rng(11).standard_normal((batch, SHAPE[1])).astype(np.float32)
    assert relative_error(run_kernel(call, x), x @ packed.to_dense().T) < RTOL


@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("fmt,block", LAYOUTS[1:], ids=[f"{f}{b}" for f, b in LAYOUTS[1:]])
def test_all_zero_weight_gives_zeros(fmt, block, batch):
    packed = pack(np.zeros(SHAPE, np.float32), fmt, block, "int8")
    assert packed.nnz == 0
    x = np.ones((batch, SHAPE[1]), np.float32)
    assert np.array_equal(run_kernel(matmul_kernel(packed, batch), x), np.zeros((batch, SHAPE[0]), np.float32))


@pytest.mark.parametrize("fmt,block", LAYOUTS[1:], ids=[f"{f}{b}" for f, b in LAYOUTS[1:]])
def test_all_zero_weight_gives_zeros_at_any_row_count(fmt, block):
    packed = pack(np.zeros(SHAPE, np.float32), fmt, block, "fp32")
    assert packed.nnz == 0
    call = matmul_kernel(packed, None)
    module = tvm.compile(call.func, target=host_target())
    for rows in (1, 17):
        x = np.ones((rows, SHAPE[1]), np.float32)
        assert np.array_equal(run_kernel(call, x, module), np.zeros((rows, SHAPE[0]), np.float32))


@pytest.mark.parametrize("fmt,block,dtype,batch", [("bsr", BlockShape(16, 1), "int8", 1),
                                                   ("csr", BlockShape(), "fp32", 4),
                                                   ("dense", BlockShape(), "int8", 4)])
def test_relax_module_runs_in_the_vm(fmt, block, dtype, batch):
    packed = pack(pruned_weight(SHAPE, block, seed=3), fmt, block, dtype)
    call = matmul_kernel(packed, batch)
    vm = compile_host(relax_matmul_module(call))
    x = np.random.default_rng(2).standard_normal((batch, SHAPE[1])).astype(np.float32)
    assert relative_error(vm["main"](tvm.runtime.tensor(x)).numpy(), x @ packed.to_dense().T) < RTOL


@pytest.mark.parametrize("fmt,block,dtype", [("bsr", BlockShape(16, 1), "int8"), ("dense", BlockShape(), "fp32")])
def test_relax_module_of_any_row_count_runs_in_the_vm(fmt, block, dtype):
    packed = pack(pruned_weight(SHAPE, block, seed=3), fmt, block, dtype)
    mod = relax_matmul_module(matmul_kernel(packed, None))
    assert isinstance(mod["main"].params[0].ty.shape.values[0], tvm.tirx.Var)
    vm = compile_host(mod)
    for rows in (3, 40):
        x = np.random.default_rng(rows).standard_normal((rows, SHAPE[1])).astype(np.float32)
        y = vm["main"](tvm.runtime.tensor(x)).numpy()
        assert y.shape == (rows, SHAPE[0]) and relative_error(y, x @ packed.to_dense().T) < RTOL


def test_index_arrays_keep_their_stored_types():
    """300×3000 CSR at 90 % zeros: uint16 column indices and int32 row pointers, both as stored."""
    packed = pack(pruned_weight((300, 3000), BlockShape(), seed=4, zeros=0.9), "csr")
    assert (packed.arrays["indices"].dtype, packed.arrays["indptr"].dtype) == (np.uint16, np.int32)
    call = matmul_kernel(packed, 1)
    assert call.constants[1] is packed.arrays["indices"] and call.constants[2] is packed.arrays["indptr"]
    assert call.name.endswith("_iu16_pi32")
    x = np.random.default_rng(5).standard_normal((1, 3000)).astype(np.float32)
    assert relative_error(run_kernel(call, x), x @ packed.to_dense().T) < RTOL


def test_names_tell_kernels_apart():
    weight = pruned_weight(SHAPE, BlockShape(4, 4), seed=6)
    names = {matmul_kernel(pack(weight, "bsr", BlockShape(4, 4), dtype), batch).name
             for dtype in ("fp32", "int8") for batch in (1, 4, 16, None)}
    names.add(matmul_kernel(pack(weight, "csr"), 1).name)
    names.add(matmul_kernel(pack(weight, "dense"), 16).name)
    names.add(matmul_kernel(pack(weight, "dense"), None).name)
    assert len(names) == 11


def test_unsupported_inputs_are_refused():
    packed = pack(pruned_weight(SHAPE, BlockShape(), seed=7), "coo")
    with pytest.raises(ValueError, match="coo"):
        matmul_kernel(packed, 1)
    with pytest.raises(ValueError, match="batch"):
        matmul_kernel(pack(np.eye(4, dtype=np.float32), "dense"), 0)
    with pytest.raises(ValueError, match="4 rows"):
        matmul_kernel(pack(np.eye(4, dtype=np.float32), "dense"), 4).bytes_moved_for(5)
