"""The project's own TIR matmul kernels for TVM 0.27 (TVMScript ``tirx``), one per packed weight.

Every kernel computes, for a packed weight ``W`` viewed as the matrix ``[N, K]``
(:func:`compressor.packing.matrix_shape`) and an input ``x[B, K]``::

    y[b, n] = Σ_k x[b, k] · W[n, k]                        (fp32 weights)
    y[b, n] = scales[n] · Σ_k x[b, k] · q[n, k]             (int8 codes q; dequantized w = q · scales[row])

accumulating in fp32, so an int8 kernel computes with the dequantized weight up to the order of
the fp32 additions.  The stock Relax pipeline leaves a matmul unscheduled (about 10× slower than
OpenBLAS); these kernels are scheduled by hand, each parallel over (groups of) output rows:

dense
    The weight is re-laid out as ``Wp[⌈N/V⌉, K, V]`` (``Wp[o, k, v] = W[o·V + v, k]``, zero rows
    past ``N``; ``V`` = :data:`LANES`) and ``y[b, o·V : o·V+V] += Wp[o, k, :] · x[b, k]`` is
    vectorized over the ``V`` rows with ``x[b, k]`` broadcast and several independent
    accumulators over ``k``.  Measured on one core at 1760×1760 it matches OpenBLAS at batch 1 and
    beats the row-dot-product schedule (vectorized over ``k``) at every batch, so it is the only one.
csr and bsr r×c (CSR is BSR with a 1×1 block)
    Parallel over block rows ``i``; the data-dependent loop over the stored blocks
    ``j ∈ [indptr[i], indptr[i+1])`` is split over several independent accumulators, for
    ``y[b, i·r + ρ] = Σ_j Σ_γ values[j, ρ, γ] · x[b, indices[j]·c + γ]``.  The vector lanes run
    over the ``r`` rows of a block (values stored ``[nnzb, c, r]``; from batch 2 ``x`` is
    transposed inside the kernel, so that a block column's batch values share a cache line), its
    ``c`` columns (values ``[nnzb, r, c]``, lanes summed at the end) or the batch (values
    ``[nnzb, r·c]``, ``x`` transposed inside the kernel): whichever gives the most lanes with the
    accumulators within :data:`TILE_FLOATS` (twice that for the rows, in two buffers, from batch
    2; ties: columns, then rows), see :func:`_sparse_vector_axis`.  The stored values are read
    once, as a stream, which one core's hardware prefetchers do not keep up with: every kernel
    prefetches them :data:`PREFETCH_BYTES` ahead (:func:`_prefetch_values`).

any row count (``batch=None``)
    One kernel for ``x[M, K]`` with a symbolic ``M`` (an int64 shape variable), so its code, compile
    time and size do not depend on ``M``: the rows are taken in tiles of :data:`ROW_TILE` by the
    batch-16 schedules (dense: one batch pass; sparse: vectorized over a block's rows where the
    static batch-16 kernel is, as for r×1 blocks, else over the tile's rows), parallel over
    (tile, row group) pairs; a partial last tile repeats row ``M - 1`` and stores only rows
    below ``M`` (dense and the tile's rows: full tiles take unguarded code).  The sparse kernels
    transpose ``x`` a few tiles at a time (:data:`DYN_X_BYTES`).  At M = 800, 1760², one core, a
    row costs what it costs in the static batch-16 kernel to within about 10 % (dense fp32,
    bsr16×1 int8: 4.3 against 3.9 µs) or less (bsr16×1 fp32: 4.7 against 6.9 µs, the weight
    staying in cache from tile to tile).

Edges a block does not divide are zeros inside stored blocks: ``x`` is zero-padded to
``⌈K/c⌉·c`` columns inside the kernel when ``K % c != 0``, and the last block row stores only
its rows below ``N``.  Index arrays keep their stored type (uint8 / uint16 / int32) and are cast
to int32 only in index arithmetic.

TVM 0.27 lowering facts the kernels rely on: a ``T.decl_buffer`` of global scope under 1 KiB
becomes a stack array (which LLVM keeps in registers), while ``scope="local"`` buffers, larger
buffers and mutable scalars (``lo: T.int32 = ...``) become a heap workspace allocation in every
iteration of a parallel loop — so accumulators are small global buffers and loop bounds are
``T.bind`` values.

:func:`matmul_kernel` returns a :class:`KernelCall`: the ``PrimFunc``, the constant arrays it
takes after ``x`` (the output ``y`` comes last), its output shape (``(None, N)`` for any row
count) and the bytes one call on a given number of rows must move.
:func:`relax_matmul_module` wraps one call in a Relax ``main(x)``; :func:`compile_host` builds a
module for :func:`host_target`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import tvm
from tvm import relax
from tvm.script import tirx as T

from compressor.packing import PackedWeight

from .tvm_targets import host_target

#: fp32 lanes of one vector step (one AVX-512 register, two AVX2 or four NEON registers).
LANES = 16
#: Most fp32 accumulators one iteration of a parallel loop keeps (all independent sets together):
#: under the 1 KiB that TVM 0.27 puts on the stack, and few enough registers not to spill.
TILE_FLOATS = 128
#: Vector FMAs (of :data:`LANES` lanes) kept in flight by independent accumulators.
FMAS_IN_FLIGHT = 8

#: Most batch rows one pass of the dense kernel over a row group of the weight computes.  At 16
#: the accumulators (16 × 16 floats = 1 KiB) get a heap workspace per row group, which measured
#: faster (650 against 1150 µs at batch 16, 1760²) than two passes of 8 over the row group.
DENSE_BATCH_PASS = 16
#: Rows of ``x`` one tile of a kernel of any row count (``batch=None``) takes: the batch-16
#: schedules (dense: one pass of :data:`DENSE_BATCH_PASS`; sparse: vectorized over a block's rows
#: or over the tile's rows).
ROW_TILE = 16
#: Bytes of one cache line (x86-64, and the aarch64 cores this project targets).
CACHE_LINE = 64
#: How far ahead of the stored blocks being multiplied a sparse kernel prefetches the stored
#: values, into L2 (the hardware prefetchers alone do not keep one core's stream going).  Measured
#: at 1760², 90 %, bsr16×1, batch 1, one core, cold: 0.077 → 0.062 ms fp32, 0.030 → 0.023 int8
#: (the same from 2 to 16 KiB ahead; 1 KiB: 0.069 / 0.026); a cold read of the 1.2 MB of fp32
#: values alone takes 0.069 ms, 0.052 with these prefetches.
PREFETCH_BYTES = 4096
#: How many stored blocks ahead a sparse kernel vectorized over a block's rows prefetches, into
#: L1, the transposed ``x`` row of a block at batch ≥ 2.  Measured at 1760², bsr16×1, batch 16,
#: cold: 0.128 → 0.114 ms fp32, 0.077 → 0.070 int8 (4 blocks ahead: 0.119 / 0.071).
X_PREFETCH_BLOCKS = 16
#: Bytes of transposed ``x`` a sparse kernel of any row count keeps: it takes the tiles in passes
#: of as many as fit (4 at K = 1760), each pass parallel over (tile, block row) pairs.  Measured at
#: M = 800, 1760², bsr16×1 vectorized over the tile's rows: passes of 1, 4 and all tiles cost 4.6,
#: 4.8 and 5.0 µs a row on one core, 3.4, 2.4 and 3.0 on two (the static batch-16 kernel: 4.3
#: and 4.5); vectorized over a block's rows, one core: 4.9, 4.5, 4.8 fp32 and 4.3, 4.3, 4.8 int8.
DYN_X_BYTES = 512 * 1024

_INDEX_TAG = {"uint8": "u8", "uint16": "u16", "int32": "i32", "int64": "i64"}
#: A built kernel: the function, its constants in argument order, its name.
_Built = tuple[tvm.tirx.PrimFunc, tuple[np.ndarray, ...], str]


@dataclass(frozen=True)
class KernelCall:
    """One matmul ``y[rows, N] = x[rows, K] @ W^T`` as a TIR kernel and its constant arguments.

    ``func`` takes ``(x, *constants, y)``; ``name`` is unique per generated code (format, block,
    value type, batch, shape and index types), so equal names mean interchangeable functions.
    ``out_shape`` is ``(batch, N)``, or ``(None, N)`` for a kernel of any row count (``batch=None``
    in :func:`matmul_kernel`: ``x`` and ``y`` have a symbolic first extent)."""

    func: tvm.tirx.PrimFunc
    name: str
    constants: tuple[np.ndarray, ...]
    out_shape: tuple[int | None, int]

    @property
    def dynamic(self) -> bool:
        """Whether the kernel takes any row count."""
        return self.out_shape[0] is None

    def bytes_moved_for(self, rows: int) -> int:
        """The least one call on ``rows`` rows must read and write: every constant, ``x`` and ``y``."""
        if not self.dynamic and rows != self.out_shape[0]:
            raise ValueError(f"kernel {self.name} computes {self.out_shape[0]} rows, not {rows}")
        return sum(int(c.nbytes) for c in self.constants) + 4 * rows * (_input_width(self.func) + self.out_shape[1])

    @property
    def bytes_moved(self) -> int:
        """:meth:`bytes_moved_for` the kernel's batch (a kernel of any row count has none: ask that)."""
        if self.dynamic:
            raise ValueError(f"kernel {self.name} takes any row count: use bytes_moved_for(rows)")
        return self.bytes_moved_for(self.out_shape[0])


def matmul_kernel(weight: PackedWeight, batch: int | None) -> KernelCall:
    """The hand-scheduled kernel of ``y[batch, N] = x[batch, K] @ W^T`` for a dense, csr or bsr weight.

    ``batch=None`` gives one kernel for any row count ``M`` (``x[M, K]``, ``y[M, N]``, ``M``
    symbolic), whose code and compile time do not depend on ``M``: the rows are taken in tiles of
    :data:`ROW_TILE` by the batch-16 schedules (the last tile repeats row ``M - 1`` and stores only
    rows below ``M``), parallel over (tile, row group) pairs."""
    if batch is not None and batch < 1:
        raise ValueError(f"batch must be >= 1 or None, got {batch}")
    if weight.dtype not in ("fp32", "int8"):
        raise ValueError(f"unknown value type {weight.dtype!r}: use fp32 or int8")
    n, k = weight.matrix_shape
    if weight.format == "dense":
        func, constants, name = _dense_call(weight, n, k, batch)
    elif weight.format in ("csr", "bsr"):
        func, constants, name = _sparse_call(weight, n, k, batch)
    else:
        raise ValueError(f"no TVM kernel for format {weight.format!r}: use dense, csr or bsr")
    return KernelCall(func.with_attr("global_symbol", name), name, constants, (batch, n))


def relax_matmul_module(call: KernelCall, dtype: str = "float32") -> tvm.IRModule:
    """Relax module ``main(x: [batch, K] dtype) = call_tir(call.func, [x, *constants])``, output
    ``[batch, N]`` float32; for a kernel of any row count ``x`` is ``[m, K]`` and the output
    ``[m, N]`` with a symbolic int64 ``m``.  The kernels read float32 ``x`` only."""
    if dtype != "float32":
        raise ValueError(f"the kernels take float32 inputs, not {dtype}")
    batch, n = call.out_shape
    rows = tvm.tirx.Var("m", "int64") if batch is None else batch
    k = _input_width(call.func)
    builder = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((rows, k), dtype))
    with builder.function("main", [x]):
        kernel = builder.add_func(call.func, call.name)
        with builder.dataflow():
            args = [x, *(relax.const(c) for c in call.constants)]
            y = builder.emit(relax.call_tir(kernel, args, relax.TensorType((rows, n), "float32")))
            out = builder.emit_output(y)
        builder.emit_func_output(out)
    return builder.get()


def compile_host(mod: tvm.IRModule) -> relax.VirtualMachine:
    """Compile a Relax module for :func:`host_target` and load it in a VM on the CPU."""
    return relax.VirtualMachine(tvm.compile(mod, target=host_target()), tvm.cpu())


# ------------------------------------------------------------------------------------- helpers


def _index_tag(array: np.ndarray) -> str:
    if array.dtype.name not in _INDEX_TAG:
        raise ValueError(f"index arrays must be uint8, uint16, int32 or int64, not {array.dtype}")
    return _INDEX_TAG[array.dtype.name]


def _input_width(func: tvm.tirx.PrimFunc) -> int:
    """``K`` of a kernel: the second extent of its first parameter ``x[B, K]``."""
    return int(func.params[0].ty.shape[1])


def _without_param(func: tvm.tirx.PrimFunc, name: str) -> tvm.tirx.PrimFunc:
    """``func`` without parameter ``name`` (one its body does not read)."""
    return tvm.tirx.PrimFunc([p for p in func.params if p.name != name], func.body, func.ret_type, func.attrs)


def _padded_scales(weight: PackedWeight, rows: int) -> np.ndarray:
    """Per-row int8 scales padded with ones to ``rows`` (the rows a kernel computes)."""
    scales = weight.arrays["scales"].astype(np.float32)
    return np.concatenate([scales, np.ones(rows - scales.size, np.float32)])


def _accumulators(vectors: int, floats: int, fmas: int = FMAS_IN_FLIGHT) -> int:
    """Independent accumulator sets of ``vectors`` vectors (``floats`` floats) each: about
    ``fmas`` vector FMAs in flight, all sets within :data:`TILE_FLOATS`."""
    return max(1, min(fmas // vectors, TILE_FLOATS // floats))


def _batch_tag(batch: int | None) -> str:
    """``b<batch>`` in a kernel's name, ``bdyn`` for any row count."""
    return "bdyn" if batch is None else f"b{batch}"


def _largest_divisor(n: int, limit: int) -> int:
    """The largest divisor of ``n`` not above ``limit`` (at least 1)."""
    return max(d for d in range(1, n + 1) if n % d == 0 and (d <= limit or d == 1))


def _prefetch(load: tvm.tirx.BufferLoad, locality: int) -> tvm.tirx.PrimExpr:
    """Software prefetch, for reading, of the cache line holding ``load``'s element
    (``tirx.prefetch``: ``prefetcht0`` / ``prefetcht1`` on x86 for locality 3 / 2, ``prfm`` on
    aarch64); it never faults, but its index is kept in bounds all the same."""
    return tvm.tirx.call_intrin("void", "tirx.prefetch", tvm.tirx.address_of(load), 0, locality, 1)


def _itemsize(dtype: str) -> int:
    """Bytes of one element of type ``dtype``."""
    return tvm.DataType(dtype).bits // 8


@T.macro
def _prefetch_values(values, start, count, total):
    """Prefetch into L2 the elements of ``values`` (flat, ``total`` long) :data:`PREFETCH_BYTES`
    ahead of the ``count`` from ``start`` about to be multiplied, one prefetch a cache line.
    Called once per group of stored blocks, consecutive groups prefetch consecutive lines."""
    for line in T.unroll(math.ceil(count * _itemsize(values.dtype) / CACHE_LINE)):
        T.evaluate(_prefetch(values[T.min(start + (PREFETCH_BYTES + line * CACHE_LINE) // _itemsize(values.dtype),
                                          total - 1)], 2))


@T.macro
def _transpose_x(x, xt, B, K, KP, t):
    """``xt[k, b] = x[b, k]`` for ``x[B, K]``, zero rows of ``xt[KP, B]`` from ``K``: square tiles
    of ``t`` (a divisor of ``B``; 4: four 4-float loads and stores, about a dozen shuffles),
    parallel over column tiles, the last columns one by one.  At B = 16, K = 1760, 4 × 4 tiles:
    4 µs against 7.5 for one vector of ``B`` gathered per column (tiles of 8 × 8 or 16 × 16 are
    worse: LLVM lowers 8- and 16-way transposes to element inserts).  :func:`_sparse_batch_kernel`
    keeps the gathered columns: with this transpose LLVM vectorizes its int8 CSR loop
    differently, 0.23 → 0.32 ms at batch 16."""
    for ko in T.parallel(K // t):
        for bo in T.unroll(B // t):
            tile = T.decl_buffer((t, t), "float32")
            for b in T.unroll(t):
                for kk in T.vectorized(t):
                    tile[b, kk] = x[bo * t + b, ko * t + kk]
            for kk in T.unroll(t):
                for b in T.vectorized(t):
                    xt[ko * t + kk, bo * t + b] = tile[b, kk]
    for kk in range(K // t * t, KP):
        for b in T.vectorized(B):
            xt[kk, b] = T.if_then_else(kk < K, x[b, T.min(kk, K - 1)], T.float32(0))


@T.macro
def _transpose_row_tiles(x, xt, m, tile0, count, K, KP):
    """``xt[g, k, b] = x[(tile0 + g)·BT + b, k]`` for the ``count`` tiles of ``BT`` =
    :data:`ROW_TILE` rows of ``x[m, K]`` from tile ``tile0``, parallel over (tile, column)
    pairs; rows from ``m`` repeat row ``m - 1``, columns from ``K`` (to ``KP``) are zeros."""
    for gk in T.parallel(count * KP):
        row0 = T.bind((tile0 + gk // KP) * ROW_TILE)
        if row0 + ROW_TILE <= m:
            for b in T.vectorized(ROW_TILE):
                xt[gk // KP, gk % KP, b] = T.if_then_else(
                    gk % KP < K, x[row0 + b, T.min(gk % KP, K - 1)], T.float32(0))
        else:
            for b in T.vectorized(ROW_TILE):
                xt[gk // KP, gk % KP, b] = T.if_then_else(
                    gk % KP < K, x[T.min(row0 + b, m - 1), T.min(gk % KP, K - 1)], T.float32(0))

# --------------------------------------------------------------------------------------- dense


def _dense_call(weight: PackedWeight, n: int, k: int, batch: int | None) -> _Built:
    values = weight.arrays["values"].reshape(n, k)
    groups = math.ceil(n / LANES)
    padded = np.zeros((groups * LANES, k), values.dtype)
    padded[:n] = values
    packed = np.ascontiguousarray(padded.reshape(groups, LANES, k).transpose(0, 2, 1))
    scaled = weight.dtype == "int8"
    if batch is None:
        func = _dense_dyn_kernel(n, k, str(values.dtype), scaled)
    else:
        func = _dense_kernel(n, k, batch, str(values.dtype), scaled)
    constants = (packed,) + ((_padded_scales(weight, groups * LANES),) if scaled else ())
    return func, constants, f"dense_{weight.dtype}_{_batch_tag(batch)}_n{n}_k{k}"


def _dense_kernel(N: int, K: int, B: int, wdtype: str, scaled: bool) -> tvm.tirx.PrimFunc:
    """``y[b, o·V + v] = (scales[o·V + v] ·) Σ_k Wp[o, k, v] · x[b, k]``: parallel over row groups
    ``o``, vectorized over ``v``, ``U`` accumulators over ``k``.  The batch is taken in ``P``
    passes of ``BS`` rows over ``Wp[o]`` (the last pass repeats row ``B - 1`` where ``P·BS > B``
    and stores only rows below ``B``); rows past ``N`` are not stored."""
    V = LANES
    NO = math.ceil(N / V)
    P = math.ceil(B / DENSE_BATCH_PASS)
    BS = math.ceil(B / P)
    U = max(1, FMAS_IN_FLIGHT // BS)

    @T.prim_func
    def kernel(x: T.Buffer((B, K), "float32"), wp: T.Buffer((NO, K, V), wdtype), scale: T.Buffer((NO * V,), "float32"),
               y: T.Buffer((B, N), "float32")):
        T.func_attr({"tirx.noalias": True})
        for o in T.parallel(NO):
            for bo in range(P):
                acc = T.decl_buffer((U, BS, V), "float32")
                for u in T.unroll(U):
                    for b in T.unroll(BS):
                        for v in T.vectorized(V):
                            acc[u, b, v] = T.float32(0)
                for ko in range(K // U):
                    for u in T.unroll(U):
                        for b in T.unroll(BS):
                            for v in T.vectorized(V):
                                acc[u, b, v] = acc[u, b, v] + T.Cast("float32", wp[o, ko * U + u, v]) * x[
                                    T.min(bo * BS + b, B - 1), ko * U + u]
                for kr in range(K % U):
                    for b in T.unroll(BS):
                        for v in T.vectorized(V):
                            acc[0, b, v] = acc[0, b, v] + T.Cast("float32", wp[o, K // U * U + kr, v]) * x[
                                T.min(bo * BS + b, B - 1), K // U * U + kr]
                for u in T.unroll(U - 1):
                    for b in T.unroll(BS):
                        for v in T.vectorized(V):
                            acc[0, b, v] = acc[0, b, v] + acc[u + 1, b, v]
                if scaled:
                    for b in T.unroll(BS):
                        for v in T.vectorized(V):
                            acc[0, b, v] = acc[0, b, v] * scale[o * V + v]
                for b in T.unroll(BS):
                    if bo * BS + b < B:
                        if o * V + V <= N:
                            for v in T.vectorized(V):
                                y[bo * BS + b, o * V + v] = acc[0, b, v]
                        else:
                            for v in T.serial(V):
                                if o * V + v < N:
                                    y[bo * BS + b, o * V + v] = acc[0, b, v]

    return kernel if scaled else _without_param(kernel, "scale")


def _dense_dyn_kernel(N: int, K: int, wdtype: str, scaled: bool) -> tvm.tirx.PrimFunc:
    """:func:`_dense_kernel` for any row count ``M``: one pass of ``BT`` = :data:`ROW_TILE` rows
    per (tile ``t``, row group ``o``) pair, parallel over the pairs (tiles outer: at M = 800,
    1760², one core, 41.7 against 43.7 µs a row with the row groups outer; 6.1 against 9.8 for
    bsr16×1); full tiles read ``x`` unguarded, the last tile repeats row ``M - 1`` and stores
    only rows below ``M``."""
    V, BT = LANES, ROW_TILE
    NO = math.ceil(N / V)
    U = max(1, FMAS_IN_FLIGHT // BT)

    @T.prim_func
    def kernel(x_h: T.handle, wp: T.Buffer((NO, K, V), wdtype), scale: T.Buffer((NO * V,), "float32"),
               y_h: T.handle):
        T.func_attr({"tirx.noalias": True})
        M = T.int64()
        x = T.match_buffer(x_h, (M, K), "float32")
        y = T.match_buffer(y_h, (M, N), "float32")
        m = T.bind(T.Cast("int32", M))
        tiles = T.bind((m + BT - 1) // BT)
        for p in T.parallel(tiles * NO):
            t = T.bind(p // NO)
            o = T.bind(p % NO)
            acc = T.decl_buffer((U, BT, V), "float32")
            for u in T.unroll(U):
                for b in T.unroll(BT):
                    for v in T.vectorized(V):
                        acc[u, b, v] = T.float32(0)
            if t * BT + BT <= m:
                for ko in range(K // U):
                    for u in T.unroll(U):
                        for b in T.unroll(BT):
                            for v in T.vectorized(V):
                                acc[u, b, v] = acc[u, b, v] + T.Cast("float32", wp[o, ko * U + u, v]) * x[
                                    t * BT + b, ko * U + u]
                for kr in range(K % U):
                    for b in T.unroll(BT):
                        for v in T.vectorized(V):
                            acc[0, b, v] = acc[0, b, v] + T.Cast("float32", wp[o, K // U * U + kr, v]) * x[
                                t * BT + b, K // U * U + kr]
            else:
                for ko in range(K // U):
                    for u in T.unroll(U):
                        for b in T.unroll(BT):
                            for v in T.vectorized(V):
                                acc[u, b, v] = acc[u, b, v] + T.Cast("float32", wp[o, ko * U + u, v]) * x[
                                    T.min(t * BT + b, m - 1), ko * U + u]
                for kr in range(K % U):
                    for b in T.unroll(BT):
                        for v in T.vectorized(V):
                            acc[0, b, v] = acc[0, b, v] + T.Cast("float32", wp[o, K // U * U + kr, v]) * x[
                                T.min(t * BT + b, m - 1), K // U * U + kr]
            for u in T.unroll(U - 1):
                for b in T.unroll(BT):
                    for v in T.vectorized(V):
                        acc[0, b, v] = acc[0, b, v] + acc[u + 1, b, v]
            if scaled:
                for b in T.unroll(BT):
                    for v in T.vectorized(V):
                        acc[0, b, v] = acc[0, b, v] * scale[o * V + v]
            for b in T.unroll(BT):
                if t * BT + b < m:
                    if o * V + V <= N:
                        for v in T.vectorized(V):
                            y[t * BT + b, o * V + v] = acc[0, b, v]
                    else:
                        for v in T.serial(V):
                            if o * V + v < N:
                                y[t * BT + b, o * V + v] = acc[0, b, v]

    return kernel if scaled else _without_param(kernel, "scale")


# -------------------------------------------------------------------------------------- sparse


def _sparse_call(weight: PackedWeight, n: int, k: int, batch: int | None) -> _Built:
    r, c = weight.block.rows, weight.block.cols
    indices, indptr = weight.arrays["indices"], weight.arrays["indptr"]
    values = weight.arrays["values"].reshape(-1, r, c)
    scaled = weight.dtype == "int8"
    types = (str(values.dtype), indices.dtype.name, indptr.dtype.name, scaled)
    if batch is None:
        axis = "rows" if _sparse_vector_axis(r, c, ROW_TILE) == "rows" else "batch"
        func = {"rows": _sparse_rows_dyn_kernel, "batch": _sparse_batch_dyn_kernel}[axis](n, k, r, c, *types)
    else:
        axis = _sparse_vector_axis(r, c, batch)
        build = {"rows": _sparse_rows_kernel, "cols": _sparse_cols_kernel, "batch": _sparse_batch_kernel}[axis]
        func = build(n, k, r, c, batch, *types)
    if axis == "rows":
        values = values.transpose(0, 2, 1)
    elif axis == "batch":
        values = values.reshape(-1, r * c)
    scales = (_padded_scales(weight, math.ceil(n / r) * r),) if scaled else ()
    tag = "csr" if weight.format == "csr" else f"bsr{r}x{c}"
    name = f"{tag}_{weight.dtype}_{_batch_tag(batch)}_n{n}_k{k}_{axis}_i{_index_tag(indices)}_p{_index_tag(indptr)}"
    return func, (np.ascontiguousarray(values), indices, indptr, *scales), name


def _sparse_vector_axis(r: int, c: int, batch: int) -> str:
    """The axis a sparse kernel vectorizes: ``"rows"`` (the ``r`` rows of a block), ``"cols"``
    (its ``c`` columns) or ``"batch"`` (``batch >= 2``): the most lanes (up to :data:`LANES`)
    among the kernels whose accumulators fit :data:`TILE_FLOATS` (the rows kernel's twice that
    from batch 2, in two buffers; the batch kernel takes a block's rows a few at a time to fit);
    ties prefer columns (when ``c > 1``), then rows, then the batch.  Measured at 1760×1760, one
    core: 16×1 → rows at batch 1, 4 and 16; 1×16 → cols, batch at 16; 4×4 → cols, batch at 16;
    8×8 → cols at batch 1, rows at 4, batch at 16; CSR → batch from batch 2."""
    rows_floats = TILE_FLOATS if batch == 1 else 2 * TILE_FLOATS
    # (lanes, tie preference, axis, whether its accumulators fit)
    candidates = [(min(c, LANES), 2 if c > 1 else 0, "cols", batch * r * c <= TILE_FLOATS),
                  (min(r, LANES), 1, "rows", batch * r <= rows_floats)]
    if batch >= 2:
        candidates.append((min(batch, LANES), -1, "batch", True))
    fitting = [(lanes, preference, axis) for lanes, preference, axis, fits in candidates if fits]
    return max(fitting)[2] if fitting else "rows"


def _sparse_rows_kernel(N: int, K: int, R: int, C: int, B: int, wdtype: str, itype: str, ptype: str,
                        scaled: bool) -> tvm.tirx.PrimFunc:
    """Vectorized over the ``R`` rows of a block (values ``[nnzb, C, R]``, each converted to fp32
    once), ``C`` and ``B`` unrolled, ``U`` accumulators over the stored blocks:
    ``acc[u, b, 0:R] += values[j, γ, 0:R] · xt[indices[j]·C + γ, b]`` with ``xt[k, b] = x[b, k]``
    (zero-padded to ``⌈K/C⌉·C``) broadcast from memory.  The blocks are taken ``G`` at a time (a
    multiple of ``U`` whose values span a cache line: 4 blocks for int8 16×1 at ``U = 1``, 64 for
    int8 CSR at ``U = 8``), each step prefetching its values :data:`PREFETCH_BYTES` ahead; the
    blocks left over are taken ``U`` at a time, still into ``U`` accumulators (a short row —
    28 values in a GRU of 256 at 90 % — would otherwise be one dependency chain).  At batch 1 ``xt`` is ``x`` itself
    (copied only to pad); a larger batch is transposed once per call (:func:`_transpose_x`), so
    that the ``B`` values of a block column share a cache line where ``x[:, k]`` spans ``B``, and
    the ``xt`` line of the block :data:`X_PREFETCH_BLOCKS` ahead is prefetched into L1 (``xt``
    outgrows L1: 110 KiB at 16 × 1760).  Accumulators over :data:`TILE_FLOATS` (up to twice that,
    with ``U = 1``: 16 × 16 floats for bsr16×1 at batch 16, 16 AVX-512 registers) are two stack
    buffers, for the batch rows below and from ``B0``.  Measured at 1760², 90 %, bsr16×1, batch
    16, one core, cold: 0.11 / 0.063 ms fp32 / int8 against 0.17 / 0.125 for
    :func:`_sparse_batch_kernel` (two passes of 8 rows; its int8 values take one shuffle per row
    to broadcast) and 0.13 / 0.079 with the batch in two passes of 8 here."""
    NB, KP = math.ceil(N / R), math.ceil(K / C) * C
    block_row = rows_block_row(N, R, C, B, wdtype, scaled)

    @T.prim_func
    def kernel(x: T.Buffer((B, K), "float32"), data_h: T.handle, indices_h: T.handle,
               indptr: T.Buffer((NB + 1,), ptype), scale: T.Buffer((NB * R,), "float32"),
               y: T.Buffer((B, N), "float32")):
        T.func_attr({"tirx.noalias": True})
        nnzb = T.int32()
        data = T.match_buffer(data_h, (nnzb, C, R), wdtype)
        indices = T.match_buffer(indices_h, (nnzb,), itype)
        if B > 1 or KP != K:
            xt = T.decl_buffer((KP, B), "float32")
            _transpose_x(x, xt, B, K, KP, math.gcd(B, 4))
        else:
            xt = T.decl_buffer((KP, B), "float32", data=x.data)
        for i in T.parallel(NB):
            block_row(data, indices, indptr, nnzb, xt, y, scale, i, 0, B)

    return kernel if scaled else _without_param(kernel, "scale")


def rows_block_row(N: int, R: int, C: int, B: int, wdtype: str, scaled: bool) -> Callable:
    """The macro ``block_row(data, indices, indptr, nnzb, xt, y, scale, i, row0, rows)`` of
    :func:`_sparse_rows_kernel`: block row ``i`` against the ``B`` columns of ``xt[KP, B]``
    (``x`` rows ``row0 …``), storing ``y[row0 + b, i·R …]`` for ``b < rows`` only (``rows`` a
    Python int: ``B`` stores all, unguarded)."""
    U = _accumulators(B * math.ceil(R / LANES), B * R)
    B0 = B if U * B * R <= TILE_FLOATS else math.ceil(B / 2)
    B1 = B - B0
    G = U * max(1, CACHE_LINE // (U * R * C * _itemsize(wdtype)))
    x_lines = math.ceil(C * B * 4 / CACHE_LINE)

    @T.macro
    def on_halves(stmt, acc0, acc1, *args):  # stmt(acc, first batch row, batch rows, *args)
        stmt(acc0, 0, B0, *args)
        if B1 > 0:
            stmt(acc1, B0, B1, *args)

    @T.macro
    def zero(acc, b0, nb):
        for u in T.unroll(U):
            for b in T.unroll(nb):
                for rr in T.vectorized(R):
                    acc[u, b, rr] = T.float32(0)

    @T.macro
    def multiply_add(acc, b0, nb, u, w, xt, k):
        for b in T.unroll(nb):
            for rr in T.vectorized(R):
                acc[u, b, rr] = acc[u, b, rr] + w[rr] * xt[k, b0 + b]

    @T.macro
    def store(acc, b0, nb, y, scale, i, row0, rows):
        for u in T.unroll(U - 1):
            for b in T.unroll(nb):
                for rr in T.vectorized(R):
                    acc[0, b, rr] = acc[0, b, rr] + acc[u + 1, b, rr]
        if scaled:
            for b in T.unroll(nb):
                for rr in T.vectorized(R):
                    acc[0, b, rr] = acc[0, b, rr] * scale[i * R + rr]
        for b in T.unroll(nb):
            if b0 + b < rows:
                if i * R + R <= N:
                    for rr in T.vectorized(R):
                        y[row0 + b0 + b, i * R + rr] = acc[0, b, rr]
                else:
                    for rr in T.serial(R):
                        if i * R + rr < N:
                            y[row0 + b0 + b, i * R + rr] = acc[0, b, rr]

    @T.macro
    def prefetch_x(xt_flat, indices, j, nnzb):
        for line in T.unroll(x_lines):
            T.evaluate(_prefetch(xt_flat[T.Cast("int32", indices[T.min(j + X_PREFETCH_BLOCKS, nnzb - 1)]) * (C * B)
                                         + line * (CACHE_LINE // 4)], 3))

    @T.macro
    def block(acc0, acc1, u, j, data, indices, xt):
        for cc in T.unroll(C):
            w = T.decl_buffer((R,), "float32")
            for rr in T.vectorized(R):
                w[rr] = T.Cast("float32", data[j, cc, rr])
            on_halves(multiply_add, acc0, acc1, u, w, xt, T.Cast("int32", indices[j]) * C + cc)

    @T.macro
    def block_row(data, indices, indptr, nnzb, xt, y, scale, i, row0, rows):
        lo = T.bind(T.Cast("int32", indptr[i]))
        hi = T.bind(T.Cast("int32", indptr[i + 1]))
        values = T.decl_buffer((nnzb * C * R,), wdtype, data=data.data)
        xt_flat = T.decl_buffer((xt.shape[0] * B,), "float32", data=xt.data, elem_offset=xt.elem_offset)
        acc0 = T.decl_buffer((U, B0, R), "float32")
        if B1 > 0:
            acc1 = T.decl_buffer((U, B1, R), "float32")
        else:
            acc1 = acc0  # not used
        on_halves(zero, acc0, acc1)
        for jo in range((hi - lo) // G):
            _prefetch_values(values, (lo + jo * G) * (C * R), G * C * R, nnzb * C * R)
            for g in T.unroll(G):
                if B > 1:
                    prefetch_x(xt_flat, indices, lo + jo * G + g, nnzb)
                block(acc0, acc1, g % U, lo + jo * G + g, data, indices, xt)
        rest = T.bind(lo + (hi - lo) // G * G)  # fewer than G blocks left: U at a time, then one by one
        for jo in range((hi - rest) // U):
            for u in T.unroll(U):
                block(acc0, acc1, u, rest + jo * U + u, data, indices, xt)
        for jr in range(rest + (hi - rest) // U * U, hi):
            block(acc0, acc1, 0, jr, data, indices, xt)
        on_halves(store, acc0, acc1, y, scale, i, row0, rows)

    return block_row


def _sparse_cols_kernel(N: int, K: int, R: int, C: int, B: int, wdtype: str, itype: str, ptype: str,
                        scaled: bool) -> tvm.tirx.PrimFunc:
    """Vectorized over the ``C`` columns of a block (values ``[nnzb, R, C]``) against the
    contiguous ``x[b, indices[j]·C : +C]``, ``R`` and ``B`` unrolled, ``U`` accumulators over the
    stored blocks (values prefetched, :func:`_prefetch_values`); the ``C`` lanes of each row are
    summed at the end."""
    NB, KP = math.ceil(N / R), math.ceil(K / C) * C
    U = _accumulators(B * R * math.ceil(C / LANES), B * R * C)

    @T.prim_func
    def kernel(x: T.Buffer((B, K), "float32"), data_h: T.handle, indices_h: T.handle,
               indptr: T.Buffer((NB + 1,), ptype), scale: T.Buffer((NB * R,), "float32"),
               y: T.Buffer((B, N), "float32")):
        T.func_attr({"tirx.noalias": True})
        nnzb = T.int32()
        data = T.match_buffer(data_h, (nnzb, R, C), wdtype)
        indices = T.match_buffer(indices_h, (nnzb,), itype)
        values = T.decl_buffer((nnzb * R * C,), wdtype, data=data.data)
        if KP != K:
            xs = T.decl_buffer((B, KP), "float32")
            for b in range(B):
                for kk in range(K):
                    xs[b, kk] = x[b, kk]
                for kk in range(K, KP):
                    xs[b, kk] = T.float32(0)
        else:
            xs = x
        for i in T.parallel(NB):
            lo = T.bind(T.Cast("int32", indptr[i]))
            hi = T.bind(T.Cast("int32", indptr[i + 1]))
            acc = T.decl_buffer((U, B, R, C), "float32")
            for u in T.unroll(U):
                for b in T.unroll(B):
                    for rr in T.unroll(R):
                        for cc in T.vectorized(C):
                            acc[u, b, rr, cc] = T.float32(0)
            for jo in range((hi - lo) // U):
                _prefetch_values(values, (lo + jo * U) * (R * C), U * R * C, nnzb * R * C)
                for u in T.unroll(U):
                    for b in T.unroll(B):
                        for rr in T.unroll(R):
                            for cc in T.vectorized(C):
                                acc[u, b, rr, cc] = acc[u, b, rr, cc] + T.Cast(
                                    "float32", data[lo + jo * U + u, rr, cc]) * xs[
                                    b, T.Cast("int32", indices[lo + jo * U + u]) * C + cc]
            for jr in range(lo + (hi - lo) // U * U, hi):
                for b in T.unroll(B):
                    for rr in T.unroll(R):
                        for cc in T.vectorized(C):
                            acc[0, b, rr, cc] = acc[0, b, rr, cc] + T.Cast("float32", data[jr, rr, cc]) * xs[
                                b, T.Cast("int32", indices[jr]) * C + cc]
            for u in T.unroll(U - 1):
                for b in T.unroll(B):
                    for rr in T.unroll(R):
                        for cc in T.vectorized(C):
                            acc[0, b, rr, cc] = acc[0, b, rr, cc] + acc[u + 1, b, rr, cc]
            for b in T.unroll(B):
                for rr in T.unroll(R):
                    for cc in T.unroll(C - 1):
                        acc[0, b, rr, 0] = acc[0, b, rr, 0] + acc[0, b, rr, cc + 1]
                    if i * R + rr < N:
                        if scaled:
                            y[b, i * R + rr] = acc[0, b, rr, 0] * scale[i * R + rr]
                        else:
                            y[b, i * R + rr] = acc[0, b, rr, 0]

    return kernel if scaled else _without_param(kernel, "scale")


def _sparse_batch_kernel(N: int, K: int, R: int, C: int, B: int, wdtype: str, itype: str, ptype: str,
                         scaled: bool) -> tvm.tirx.PrimFunc:
    """Vectorized over the batch: ``x`` is transposed (and zero-padded to ``⌈K/C⌉·C``) into
    ``xt[k, b]`` once per call, then ``acc[ρ, 0:B] += values[j, ρ·C + γ] · xt[indices[j]·C + γ, 0:B]``
    with ``C`` unrolled and ``U`` accumulators over the stored blocks.  A block's ``R`` rows are
    taken ``RS`` at a time (one pass over the stored blocks each) to keep the accumulators within
    :data:`TILE_FLOATS`; the ``RS·C`` values of a step are converted to fp32 as one vector, and
    the first pass prefetches the values (:func:`_prefetch_values`)."""
    NB, KP = math.ceil(N / R), math.ceil(K / C) * C
    RS = _largest_divisor(R, TILE_FLOATS // B)
    U = _accumulators(RS * math.ceil(B / LANES), RS * B)

    @T.prim_func
    def kernel(x: T.Buffer((B, K), "float32"), data_h: T.handle, indices_h: T.handle,
               indptr: T.Buffer((NB + 1,), ptype), scale: T.Buffer((NB * R,), "float32"),
               y: T.Buffer((B, N), "float32")):
        T.func_attr({"tirx.noalias": True})
        nnzb = T.int32()
        data = T.match_buffer(data_h, (nnzb, R * C), wdtype)
        indices = T.match_buffer(indices_h, (nnzb,), itype)
        values = T.decl_buffer((nnzb * R * C,), wdtype, data=data.data)
        xt = T.decl_buffer((KP, B), "float32")
        for kk in T.parallel(KP):
            for b in T.vectorized(B):
                xt[kk, b] = T.if_then_else(kk < K, x[b, T.min(kk, K - 1)], T.float32(0))
        for i in T.parallel(NB):
            lo = T.bind(T.Cast("int32", indptr[i]))
            hi = T.bind(T.Cast("int32", indptr[i + 1]))
            for h in range(R // RS):
                acc = T.decl_buffer((U, RS, B), "float32")
                for u in T.unroll(U):
                    for rr in T.unroll(RS):
                        for b in T.vectorized(B):
                            acc[u, rr, b] = T.float32(0)
                for jo in range((hi - lo) // U):
                    if h == 0:
                        _prefetch_values(values, (lo + jo * U) * (R * C), U * R * C, nnzb * R * C)
                    for u in T.unroll(U):
                        w = T.decl_buffer((RS * C,), "float32")
                        for t in T.vectorized(RS * C):
                            w[t] = T.Cast("float32", data[lo + jo * U + u, h * RS * C + t])
                        for rr in T.unroll(RS):
                            for cc in T.unroll(C):
                                for b in T.vectorized(B):
                                    acc[u, rr, b] = acc[u, rr, b] + w[rr * C + cc] * xt[
                                        T.Cast("int32", indices[lo + jo * U + u]) * C + cc, b]
                for jr in range(lo + (hi - lo) // U * U, hi):
                    for rr in T.unroll(RS):
                        for cc in T.unroll(C):
                            for b in T.vectorized(B):
                                acc[0, rr, b] = acc[0, rr, b] + T.Cast(
                                    "float32", data[jr, (h * RS + rr) * C + cc]) * xt[
                                    T.Cast("int32", indices[jr]) * C + cc, b]
                for u in T.unroll(U - 1):
                    for rr in T.unroll(RS):
                        for b in T.vectorized(B):
                            acc[0, rr, b] = acc[0, rr, b] + acc[u + 1, rr, b]
                for rr in T.unroll(RS):
                    if i * R + h * RS + rr < N:
                        for b in T.serial(B):
                            if scaled:
                                y[b, i * R + h * RS + rr] = acc[0, rr, b] * scale[i * R + h * RS + rr]
                            else:
                                y[b, i * R + h * RS + rr] = acc[0, rr, b]

    return kernel if scaled else _without_param(kernel, "scale")


def _sparse_batch_dyn_kernel(N: int, K: int, R: int, C: int, wdtype: str, itype: str, ptype: str,
                             scaled: bool) -> tvm.tirx.PrimFunc:
    """:func:`_sparse_batch_kernel` for any row count ``M``, vectorized over tiles of ``BT`` =
    :data:`ROW_TILE` rows, ``G`` tiles a pass (:data:`DYN_X_BYTES`): each pass transposes its
    tiles of ``x`` into ``xt[g, k, 0:BT]`` (the last tile repeats row ``M - 1``), then runs
    parallel over (tile, block row) pairs, storing only rows below ``M``."""
    BT = ROW_TILE
    NB, KP = math.ceil(N / R), math.ceil(K / C) * C
    RS = _largest_divisor(R, TILE_FLOATS // BT)
    U = _accumulators(RS * math.ceil(BT / LANES), RS * BT)
    G = max(1, DYN_X_BYTES // (KP * BT * 4))

    @T.prim_func
    def kernel(x_h: T.handle, data_h: T.handle, indices_h: T.handle,
               indptr: T.Buffer((NB + 1,), ptype), scale: T.Buffer((NB * R,), "float32"), y_h: T.handle):
        T.func_attr({"tirx.noalias": True})
        M = T.int64()
        nnzb = T.int32()
        x = T.match_buffer(x_h, (M, K), "float32")
        y = T.match_buffer(y_h, (M, N), "float32")
        data = T.match_buffer(data_h, (nnzb, R * C), wdtype)
        indices = T.match_buffer(indices_h, (nnzb,), itype)
        values = T.decl_buffer((nnzb * R * C,), wdtype, data=data.data)
        m = T.bind(T.Cast("int32", M))
        tiles = T.bind((m + BT - 1) // BT)
        xt = T.decl_buffer((G, KP, BT), "float32")
        for ps in range((tiles + G - 1) // G):
            count = T.bind(T.min(G, tiles - ps * G))
            _transpose_row_tiles(x, xt, m, ps * G, count, K, KP)
            for p in T.parallel(count * NB):
                g = T.bind(p // NB)
                i = T.bind(p % NB)
                row0 = T.bind((ps * G + g) * BT)
                lo = T.bind(T.Cast("int32", indptr[i]))
                hi = T.bind(T.Cast("int32", indptr[i + 1]))
                for h in range(R // RS):
                    acc = T.decl_buffer((U, RS, BT), "float32")
                    for u in T.unroll(U):
                        for rr in T.unroll(RS):
                            for b in T.vectorized(BT):
                                acc[u, rr, b] = T.float32(0)
                    for jo in range((hi - lo) // U):
                        if h == 0:
                            _prefetch_values(values, (lo + jo * U) * (R * C), U * R * C, nnzb * R * C)
                        for u in T.unroll(U):
                            w = T.decl_buffer((RS * C,), "float32")
                            for q in T.vectorized(RS * C):
                                w[q] = T.Cast("float32", data[lo + jo * U + u, h * RS * C + q])
                            for rr in T.unroll(RS):
                                for cc in T.unroll(C):
                                    for b in T.vectorized(BT):
                                        acc[u, rr, b] = acc[u, rr, b] + w[rr * C + cc] * xt[
                                            g, T.Cast("int32", indices[lo + jo * U + u]) * C + cc, b]
                    for jr in range(lo + (hi - lo) // U * U, hi):
                        for rr in T.unroll(RS):
                            for cc in T.unroll(C):
                                for b in T.vectorized(BT):
                                    acc[0, rr, b] = acc[0, rr, b] + T.Cast(
                                        "float32", data[jr, (h * RS + rr) * C + cc]) * xt[
                                        g, T.Cast("int32", indices[jr]) * C + cc, b]
                    for u in T.unroll(U - 1):
                        for rr in T.unroll(RS):
                            for b in T.vectorized(BT):
                                acc[0, rr, b] = acc[0, rr, b] + acc[u + 1, rr, b]
                    if scaled:
                        for rr in T.unroll(RS):
                            for b in T.vectorized(BT):
                                acc[0, rr, b] = acc[0, rr, b] * scale[i * R + h * RS + rr]
                    for rr in T.unroll(RS):
                        if i * R + h * RS + rr < N:
                            if row0 + BT <= m:
                                for b in T.serial(BT):
                                    y[row0 + b, i * R + h * RS + rr] = acc[0, rr, b]
                            else:
                                for b in T.serial(BT):
                                    if row0 + b < m:
                                        y[row0 + b, i * R + h * RS + rr] = acc[0, rr, b]

    return kernel if scaled else _without_param(kernel, "scale")


def _sparse_rows_dyn_kernel(N: int, K: int, R: int, C: int, wdtype: str, itype: str, ptype: str,
                            scaled: bool) -> tvm.tirx.PrimFunc:
    """:func:`_sparse_rows_kernel` for any row count ``M``: the tiles of ``BT`` = :data:`ROW_TILE`
    rows are transposed ``G`` a pass as in :func:`_sparse_batch_dyn_kernel`, then each (tile,
    block row) pair, in parallel, is a block row of the batch-``BT`` schedule storing only rows
    below ``M``.  Measured at M = 800, 1760², 90 %, bsr16×1, one core, cold: 4.7 / 4.3 µs a row
    fp32 / int8, against 5.5 / 7.6 vectorized over the tile's rows
    (:func:`_sparse_batch_dyn_kernel`)."""
    BT = ROW_TILE
    NB, KP = math.ceil(N / R), math.ceil(K / C) * C
    G = max(1, DYN_X_BYTES // (KP * BT * 4))
    block_row = rows_block_row(N, R, C, BT, wdtype, scaled)

    @T.prim_func
    def kernel(x_h: T.handle, data_h: T.handle, indices_h: T.handle,
               indptr: T.Buffer((NB + 1,), ptype), scale: T.Buffer((NB * R,), "float32"), y_h: T.handle):
        T.func_attr({"tirx.noalias": True})
        M = T.int64()
        nnzb = T.int32()
        x = T.match_buffer(x_h, (M, K), "float32")
        y = T.match_buffer(y_h, (M, N), "float32")
        data = T.match_buffer(data_h, (nnzb, C, R), wdtype)
        indices = T.match_buffer(indices_h, (nnzb,), itype)
        m = T.bind(T.Cast("int32", M))
        tiles = T.bind((m + BT - 1) // BT)
        xt = T.decl_buffer((G, KP, BT), "float32")
        for ps in range((tiles + G - 1) // G):
            count = T.bind(T.min(G, tiles - ps * G))
            _transpose_row_tiles(x, xt, m, ps * G, count, K, KP)
            for p in T.parallel(count * NB):
                g = T.bind(p // NB)
                row0 = T.bind((ps * G + g) * BT)
                xg = T.decl_buffer((KP, BT), "float32", data=xt.data, elem_offset=g * (KP * BT))
                block_row(data, indices, indptr, nnzb, xg, y, scale, p % NB, row0, T.min(BT, m - row0))

    return kernel if scaled else _without_param(kernel, "scale")
