"""Integer matmul kernel with int8 activations for 16×1-block int8 weights (x86 AVX-512 VNNI).

The int8 kernels of :mod:`exporters.tvm_kernels` convert each stored code to fp32 and multiply
it with fp32 activations: at batch 16 they are bound by the 16 fp32 FMAs of every stored
weight.  This kernel quantizes the input instead, at every call (dynamic, per-tensor, as ONNX
Runtime's ``quantize_dynamic`` does for its integer matmuls), and multiplies integers::

    s_x = max|x| / 127,    x̂[m, k] = ⌊x[m, k] / s_x + ½⌉ ∈ [-127, 127],    u = x̂ + 128 ∈ [1, 255]
    y[m, n] = s_x · scales[n] · (Σ_k q[n, k] · u[m, k]  −  128 · Σ_k q[n, k])

with the int32 sums exact (|Σ| ≤ K · 255 · 127 < 2³¹ for K < 66 000), so the only error besides
the int8 weights' is the rounding of ``x``: ``|y − y_w| ≤ s_x / 2 · Σ_k |w[n, k]|`` against
the product with the dequantized weight ``w = q · scales`` (plus fp32 rounding).

Layout: the stored 16×1 blocks of each block row are taken 4 at a time; a group is one
``[16 rows × 4 columns]`` int8 tile (64 bytes, padded with zero blocks) and its 4 column
indices.  The input is quantized into ``u[tile, k, 0:16]`` (rows in tiles of :data:`ROW_TILE`,
the last tile repeating row ``M − 1``), a few tiles a pass (:data:`DYN_X_BYTES`), through 4 × 4
fp32 transposes.  For each group, one byte shuffle (``vpermt2b``) interleaves its 4 rows of
``u`` into 16 int32 lanes, one per input row; then ``vpdpbusd`` (``llvm.x86.avx512.vpdpbusd.512``),
once per output row, multiplies them with that row's 4 weight bytes, read from the tile with an
embedded broadcast (``m32bcst``), and adds the 4 products into each lane: 64 multiply-adds an
instruction, against 16 for an fp32 FMA, and 16 a group.  Each (tile, block row) pair, in
parallel, keeps its 16 × 16 int32 accumulators in two 512-byte stack buffers (one of 1 KiB
becomes a heap workspace in every task), prefetches the tiles :data:`PREFETCH_BYTES` ahead, and
scales and stores the sums through a transposing stack buffer at the end.

Measured at 1760², 90 %, batch 16, one core, cold cache: 47 µs against 68 µs for the fp32-FMA
int8 kernel; 2560²: 89 against 141 µs.  Two schedules lost: the activations as the broadcast
operand (LLVM keeps them in a register and broadcasts each lane with a ``vpermd``, 16 shuffles a
group: 53 µs), and no prefetch (82 µs).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import tvm
from tvm.script import tirx as T

from compressor.packing import PackedWeight

from .tvm_kernels import DYN_X_BYTES, PREFETCH_BYTES, ROW_TILE, KernelCall, _batch_tag, _index_tag, _prefetch

#: The one block shape this kernel takes: 16 output rows fill one int32x16 register.
ROWS = 16
#: Stored blocks per group: the 4 bytes ``vpdpbusd`` adds into each int32 lane.
GROUP = 4
#: The fewest rows (static batch) the kernel takes over the fp32-activation one: one input row fills
#: one of 16 int32 lanes, so small batches waste the integer instruction.  Measured at 1760², 90 %,
#: one core, cold: batch 1 34 against 23 µs, 4: 40 against 31, 8: 41 against 44, 16: 47 against 68.
MIN_ROWS = 8
#: The CPU feature the kernel needs (LLVM's name).
FEATURE = "avx512vnni"
_ZERO_POINT = 128


def takes_int8_activations(weight: PackedWeight) -> bool:
    """Whether :func:`vnni_matmul_call` takes ``weight``: BSR with 16×1 blocks, int8 values."""
    return (weight.format == "bsr" and weight.dtype == "int8"
            and (weight.block.rows, weight.block.cols) == (ROWS, 1))


def target_has_vnni(target: tvm.target.Target) -> bool:
    """Whether ``target`` (an LLVM target) has AVX-512 VNNI."""
    return bool(tvm.target.codegen.target_has_features(FEATURE, target))


def vnni_layout(weight: PackedWeight) -> tuple[np.ndarray, ...]:
    """The kernel's constants for a :func:`takes_int8_activations` weight, in argument order:
    ``tiles[groups, 64]`` int8 (``tiles[g, 4ρ + t]``: row ρ of the group's block ``t``),
    ``columns[groups, 4]`` (the blocks' columns, the stored index type; 0 for padding blocks),
    ``group_ptr[NB + 1]`` int32, ``correction[NB·16]`` int32 (``128 · Σ_k q[n, k]``) and
    ``scales[NB·16]`` fp32 (ones past ``N``)."""
    if not takes_int8_activations(weight):
        raise ValueError(f"int8 activations take bsr 16x1 int8 weights, not {weight.format} "
                         f"{weight.block.rows}x{weight.block.cols} {weight.dtype}: pack with block 16x1 and dtype int8")
    n, _ = weight.matrix_shape
    block_rows = math.ceil(n / ROWS)
    values = weight.arrays["values"].reshape(-1, ROWS)
    indices, indptr = weight.arrays["indices"], weight.arrays["indptr"].astype(np.int64)
    counts = np.diff(indptr)
    group_ptr = np.concatenate([[0], np.cumsum(-(-counts // GROUP))]).astype(np.int32)
    block_row = np.repeat(np.arange(block_rows), counts)
    local = np.arange(values.shape[0]) - indptr[block_row]
    group, slot = group_ptr[block_row] + local // GROUP, local % GROUP
    tiles = np.zeros((int(group_ptr[-1]), ROWS, GROUP), np.int8)
    tiles[group[:, None], np.arange(ROWS)[None, :], slot[:, None]] = values
    columns = np.zeros((int(group_ptr[-1]), GROUP), indices.dtype)
    columns[group, slot] = indices
    code_sums = np.zeros((block_rows, ROWS), np.int64)
    np.add.at(code_sums, block_row, values.astype(np.int64))
    scales = np.ones(block_rows * ROWS, np.float32)
    scales[:n] = weight.arrays["scales"]
    return (tiles.reshape(-1, ROWS * GROUP), columns, group_ptr,
            (_ZERO_POINT * code_sums).reshape(-1).astype(np.int32), scales)


def vnni_matmul_call(weight: PackedWeight, batch: int | None) -> KernelCall:
    """:func:`~exporters.tvm_kernels.matmul_kernel` with int8 activations: the kernel of
    ``y[batch, N] = x[batch, K] @ W^T`` for a :func:`takes_int8_activations` weight (``batch=None``:
    any row count).  Compile it for a target with AVX-512 VNNI (:func:`target_has_vnni`)."""
    constants = vnni_layout(weight)
    n, k = weight.matrix_shape
    itype = constants[1].dtype.name
    name = f"bsr16x1_int8_u8_{_batch_tag(batch)}_n{n}_k{k}_vnni_i{_index_tag(constants[1])}"
    return KernelCall(vnni_kernel(n, k, batch, itype).with_attr("global_symbol", name), name, constants, (batch, n))


def quantize_u8(value, inv_scale):
    """``⌊value / s_x + ½⌋ + 128`` as uint8."""
    return T.Cast("uint8", T.Cast("int32", T.floor(value * inv_scale + T.float32(0.5))) + _ZERO_POINT)


def vnni_block_row(N: int) -> Callable:
    """A TIR macro ``(tiles, columns, group_ptr, correction, scales, u, tile, scale_x, y, row0, m, i,
    groups)``: rows ``16 i … 16 i + 15`` of ``y[row0 : min(row0 + 16, m), :N]`` from the quantized
    rows ``u[tile, K, 16]`` (``s_x = scale_x``), block row ``i`` of the :func:`vnni_layout`
    constants (``groups`` tiles in all); 16 × 16 int32 accumulators, one ``vpdpbusd`` per row and
    group.  Shared by :func:`vnni_kernel` and the recurrence kernel."""
    H, BT = ROWS // 2, ROW_TILE
    ahead = PREFETCH_BYTES // (ROWS * GROUP)
    interleave = [BT * t + b for b in range(BT) for t in range(GROUP)]
    dpbusd = T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpbusd.512")

    @T.macro
    def block_row(tiles, columns, group_ptr, correction, scales, u, tile, scale_x, y, row0, m, i, groups):
        lo = T.bind(group_ptr[i])
        hi = T.bind(group_ptr[i + 1])
        words = T.decl_buffer((groups * ROWS,), "int32", data=tiles.data)
        acc_lo = T.decl_buffer((H, BT), "int32")
        acc_hi = T.decl_buffer((H, BT), "int32")
        for r in T.unroll(H):
            for b in T.vectorized(BT):
                acc_lo[r, b] = 0
                acc_hi[r, b] = 0
        for j in range(lo, hi):
            T.evaluate(_prefetch(tiles[T.min(j + ahead, groups - 1), 0], 2))
            activations = T.bind(T.Shuffle(
                [u.vload([tile, T.Cast("int32", columns[j, 0]), 0], "uint8x16"),
                 u.vload([tile, T.Cast("int32", columns[j, 1]), 0], "uint8x16"),
                 u.vload([tile, T.Cast("int32", columns[j, 2]), 0], "uint8x16"),
                 u.vload([tile, T.Cast("int32", columns[j, 3]), 0], "uint8x16")], interleave))
            for r in T.unroll(H):
                acc_lo[r, T.ramp(0, 1, BT)] = T.call_llvm_pure_intrin(
                    dpbusd, acc_lo[r, T.ramp(0, 1, BT)], T.reinterpret("int8x64", activations),
                    T.reinterpret("int8x64", T.broadcast(words[j * ROWS + r], BT)), dtype="int32x16")
                acc_hi[r, T.ramp(0, 1, BT)] = T.call_llvm_pure_intrin(
                    dpbusd, acc_hi[r, T.ramp(0, 1, BT)], T.reinterpret("int8x64", activations),
                    T.reinterpret("int8x64", T.broadcast(words[j * ROWS + H + r], BT)), dtype="int32x16")
        out_lo = T.decl_buffer((H, BT), "float32")
        out_hi = T.decl_buffer((H, BT), "float32")
        for r in T.unroll(H):
            for b in T.vectorized(BT):
                out_lo[r, b] = T.Cast("float32", acc_lo[r, b] - correction[i * ROWS + r]) * (
                    scales[i * ROWS + r] * scale_x)
                out_hi[r, b] = T.Cast("float32", acc_hi[r, b] - correction[i * ROWS + H + r]) * (
                    scales[i * ROWS + H + r] * scale_x)
        for b in range(BT):
            if row0 + b < m:
                if i * ROWS + ROWS <= N:
                    for r in T.vectorized(H):
                        y[row0 + b, i * ROWS + r] = out_lo[r, b]
                    for r in T.vectorized(H):
                        y[row0 + b, i * ROWS + H + r] = out_hi[r, b]
                else:
                    for r in T.serial(H):
                        if i * ROWS + r < N:
                            y[row0 + b, i * ROWS + r] = out_lo[r, b]
                        if i * ROWS + H + r < N:
                            y[row0 + b, i * ROWS + H + r] = out_hi[r, b]

    return block_row


def vnni_kernel(N: int, K: int, batch: int | None, itype: str) -> tvm.tirx.PrimFunc:
    """The kernel ``(x[M, K], tiles, columns, group_ptr, correction, scales, y[M, N])`` for a
    static row count ``batch`` or any (``None``: ``M`` symbolic)."""
    NB, BT = math.ceil(N / ROWS), ROW_TILE
    KT = K // 4 * 4
    G = max(1, DYN_X_BYTES // (K * BT))
    block_row = vnni_block_row(N)

    @T.macro
    def body(x, tiles, columns, group_ptr, correction, scales, y, m, groups):
        # s_x from max |x|: 16 lanes over the columns, the last K % 16 one by one
        lanes = T.decl_buffer((16,), "float32")
        for lane in T.vectorized(16):
            lanes[lane] = T.float32(0)
        for r in range(m):
            for ko in range(K // 16):
                for lane in T.vectorized(16):
                    lanes[lane] = T.max(lanes[lane], T.fabs(x[r, ko * 16 + lane]))
            for k in range(K // 16 * 16, K):
                lanes[0] = T.max(lanes[0], T.fabs(x[r, k]))
        amax = T.decl_buffer((1,), "float32")
        amax[0] = T.float32(0)
        for lane in range(16):
            amax[0] = T.max(amax[0], lanes[lane])
        scale_x = T.bind(T.if_then_else(amax[0] > T.float32(0), amax[0] / T.float32(127), T.float32(1)))
        inv_scale = T.bind(T.float32(1) / scale_x)
        row_tiles = T.bind((m + BT - 1) // BT)
        u = T.decl_buffer((G, K, BT), "uint8")
        for ps in range((row_tiles + G - 1) // G):
            count = T.bind(T.min(G, row_tiles - ps * G))
            for p in T.parallel(count * (K // 4)):
                g = T.bind(p // max(1, K // 4))
                ko = T.bind(p % max(1, K // 4))
                for bo in T.unroll(BT // 4):
                    square = T.decl_buffer((4, 4), "float32")
                    for bb in T.unroll(4):
                        for kk in T.vectorized(4):
                            square[bb, kk] = x[T.min((ps * G + g) * BT + bo * 4 + bb, m - 1), ko * 4 + kk]
                    for kk in T.unroll(4):
                        for bb in T.vectorized(4):
                            u[g, ko * 4 + kk, bo * 4 + bb] = quantize_u8(square[bb, kk], inv_scale)
            for g in range(count):
                for k in range(KT, K):
                    for b in T.vectorized(BT):
                        u[g, k, b] = quantize_u8(x[T.min((ps * G + g) * BT + b, m - 1), k], inv_scale)
            for p in T.parallel(count * NB):
                block_row(tiles, columns, group_ptr, correction, scales, u, p // NB, scale_x, y,
                          (ps * G + p // NB) * BT, m, p % NB, groups)

    if batch is not None:
        @T.prim_func
        def static(x: T.Buffer((batch, K), "float32"), tiles_h: T.handle, columns_h: T.handle,
                   group_ptr: T.Buffer((NB + 1,), "int32"), correction: T.Buffer((NB * ROWS,), "int32"),
                   scales: T.Buffer((NB * ROWS,), "float32"), y: T.Buffer((batch, N), "float32")):
            T.func_attr({"tirx.noalias": True})
            groups = T.int32()
            tiles = T.match_buffer(tiles_h, (groups, ROWS * GROUP), "int8")
            columns = T.match_buffer(columns_h, (groups, GROUP), itype)
            body(x, tiles, columns, group_ptr, correction, scales, y, batch, groups)

        return static

    @T.prim_func
    def dynamic(x_h: T.handle, tiles_h: T.handle, columns_h: T.handle, group_ptr: T.Buffer((NB + 1,), "int32"),
                correction: T.Buffer((NB * ROWS,), "int32"), scales: T.Buffer((NB * ROWS,), "float32"),
                y_h: T.handle):
        T.func_attr({"tirx.noalias": True})
        M = T.int64()
        groups = T.int32()
        x = T.match_buffer(x_h, (M, K), "float32")
        y = T.match_buffer(y_h, (M, N), "float32")
        tiles = T.match_buffer(tiles_h, (groups, ROWS * GROUP), "int8")
        columns = T.match_buffer(columns_h, (groups, GROUP), itype)
        body(x, tiles, columns, group_ptr, correction, scales, y, T.Cast("int32", M), groups)

    return dynamic
