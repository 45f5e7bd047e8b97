"""TIR kernel for :func:`exporters.recurrence.recurrence`: a whole recurrent direction in one call.

The time loop runs inside the kernel, so the library does not grow with the sequence length and
the number of steps is a run-time value.  Each step is one parallel region over blocks of hidden
units; the task of block ``ib`` computes the rows of that block in *every* gate of
``gh = h · W_hhᵀ`` (rows ``g·H + ib·R … g·H + ib·R + R − 1``), then the cell equations for those
units, so gates never wait for each other; a large batch is taken a few samples at a time so
that the accumulators stay in registers.  The cell's ``tanh`` and ``sigmoid`` are inlined rational
functions (:func:`fast_tanh`), not calls of ``expf``.  ``h`` is double-buffered (read ``h_t``, write
``h_{t+1}``); an LSTM's ``c`` belongs to one task and is updated in place.

``W_hh`` comes packed (:mod:`compressor.packing`):

- BSR r×c or CSR (1×1): values transposed to ``[nnz_blocks, c, r]`` and vectorized over ``r``;
  ``r`` must divide ``H`` (so that a block never straddles two gates) and ``c`` must divide ``H``.
- dense: rows dotted with ``h`` using ``V`` vector lanes.
- int8: values int8 and one fp32 scale per row, applied once per row after the sum:
  ``gh[row] = scale[row] · Σ q[row, k] · h[k] + b_hh[row]``.
- int8 with int8 activations (``activations="int8"``: 16×1 blocks, ``H`` a multiple of 16, batch
  at least :data:`~exporters.tvm_vnni_kernel.MIN_ROWS`, x86 with AVX-512 VNNI): after every step
  ``h`` is also quantized as the matmul kernel quantizes its input (per tensor, over the batch:
  ``s_h = max|h| / 127``, ``u = ⌊h / s_h + ½⌉ + 128``, uint8, transposed, 16 samples a tile: one
  serial vectorized pass), and ``h · W_hhᵀ`` is the integer block row of
  :func:`~exporters.tvm_vnni_kernel.vnni_block_row`.  The rounding of ``h`` adds at most
  ``s_h / 2 · Σ_k |w[row, k]|`` to each ``gh[row]`` per step; the cell itself stays fp32.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tvm
from tvm.script import tirx as T

from compressor.packing import PackedWeight, pack

from .recurrence import GATES
from .tvm_kernels import ROW_TILE, rows_block_row
from .tvm_vnni_kernel import MIN_ROWS, ROWS, quantize_u8, takes_int8_activations, vnni_block_row, vnni_layout

FP32 = "float32"


@dataclass(frozen=True)
class RecurrenceKernel:
    """A compiled-to-be TIR function plus the constant arrays it takes after ``gi`` and ``state``
    (then ``b_hh``); outputs ``y [T, B, H]`` and the final state ``[S, B, H]``."""

    func: tvm.tirx.PrimFunc
    name: str
    constants: tuple[np.ndarray, ...]


#: Accumulators stay below this many floats: TVM 0.27 keeps a global-scope ``decl_buffer`` under
#: 1 KiB on the stack (in registers) but gives larger ones — and any ``scope="local"`` buffer — a
#: heap allocation in every parallel task, several times slower (see exporters/tvm_kernels.py).
MAX_ACCUMULATORS = 192


def _batch_chunk(batch: int, per_sample: int) -> int:
    """The largest divisor of ``batch`` whose accumulators (``per_sample`` floats each) fit."""
    return max(d for d in range(1, batch + 1) if batch % d == 0 and (d == 1 or d * per_sample <= MAX_ACCUMULATORS))


def _lanes(size: int) -> int:
    return next(v for v in (16, 8, 4, 2, 1) if size % v == 0)


# Eigen's rational approximation of tanh for float32 (as TVM's topi.fast_tanh): odd numerator of
# degree 13, even denominator of degree 6, on x clamped to [-9, 9] (tanh(9) = 1 - 3e-8)
_TANH_P = (4.89352455891786e-03, 6.37261928875436e-04, 1.48572235717979e-05, 5.12229709037114e-08,
           -8.60467152213735e-11, 2.00018790482477e-13, -2.76076847742355e-16)
_TANH_Q = (4.89352518554385e-03, 2.26843463243900e-03, 1.18534705686654e-04, 1.19825839466702e-06)


def _polynomial(coefficients: tuple[float, ...], x2):
    """``Σ_k c_k · x2^k`` by Horner's rule."""
    value = T.float32(coefficients[-1])
    for c in reversed(coefficients[:-1]):
        value = value * x2 + T.float32(c)
    return value


def fast_tanh(x):
    """``tanh(x)`` inlined as a rational function (within 2.4e-7 of ``tanh``): the cell equations
    of a step are dominated by their ``tanh`` / ``sigmoid``, which TVM lowers to a call of
    ``expf`` each (measured: a 256-unit tanh RNN step at 10 % CSR took 8.0 µs, a ReLU one 3.9 µs)."""
    clamped = T.max(T.min(x, T.float32(9)), T.float32(-9))
    x2 = clamped * clamped
    return clamped * _polynomial(_TANH_P, x2) / _polynomial(_TANH_Q, x2)


def fast_sigmoid(x):
    """``σ(x) = (1 + tanh(x / 2)) / 2`` through :func:`fast_tanh`."""
    return T.float32(0.5) + T.float32(0.5) * fast_tanh(x * T.float32(0.5))


def _cell_update(cell: str, transposed: bool, summed: bool):
    """A TIR macro computing the new state of one unit from its gate pre-activations ``gate``;
    ``h_buf`` is ``[2, B, H]``, or ``[2, H, B]`` with ``transposed``; ``summed`` adds ``h`` to
    what ``y`` holds (the other direction's output) instead of storing it."""

    @T.macro
    def update(gi, gate, h_buf, c_buf, cur, nxt, y, tt, b, unit, hidden):
        h = T.decl_buffer((2,), FP32)  # the unit's state before and after the step
        if transposed:
            h[0] = h_buf[cur, unit, b]
        else:
            h[0] = h_buf[cur, b, unit]
        # T.bind: let-bound values (a plain assignment would be a mutable scalar: a heap
        # workspace allocation in every parallel task)
        if cell == "gru":
            r = T.bind(fast_sigmoid(gi[tt, b, unit] + gate[0]))
            z = T.bind(fast_sigmoid(gi[tt, b, hidden + unit] + gate[1]))
            n = T.bind(fast_tanh(gi[tt, b, 2 * hidden + unit] + r * gate[2]))
            h[1] = (T.float32(1) - z) * n + z * h[0]
        elif cell == "lstm":
            i = T.bind(fast_sigmoid(gi[tt, b, unit] + gate[0]))
            f = T.bind(fast_sigmoid(gi[tt, b, hidden + unit] + gate[1]))
            g = T.bind(fast_tanh(gi[tt, b, 2 * hidden + unit] + gate[2]))
            o = T.bind(fast_sigmoid(gi[tt, b, 3 * hidden + unit] + gate[3]))
            c_buf[b, unit] = f * c_buf[b, unit] + i * g
            h[1] = o * fast_tanh(c_buf[b, unit])
        elif cell == "rnn_tanh":
            h[1] = fast_tanh(gi[tt, b, unit] + gate[0])
        elif cell == "rnn_relu":
            h[1] = T.max(gi[tt, b, unit] + gate[0], T.float32(0))
        else:
            h[1] = T.min(T.max(gi[tt, b, unit] + gate[0], T.float32(0)), T.float32(20))
        if transposed:
            h_buf[nxt, unit, b] = h[1]
        else:
            h_buf[nxt, b, unit] = h[1]
        if summed:
            y[tt, b, unit] = y[tt, b, unit] + h[1]
        else:
            y[tt, b, unit] = h[1]

    return update


def _sparse_kernel(cell: str, hidden: int, batch: int, rows: int, cols: int, wdtype: str, ptr_dtype: str,
                   idx_dtype: str, reverse: bool, int8: bool, summed: bool):
    gates, states = GATES[cell], 2 if cell == "lstm" else 1
    blocks = hidden // rows
    block_row = rows_block_row(gates * hidden, rows, cols, batch, wdtype, int8)
    update = _cell_update(cell, transposed=True, summed=summed)

    @T.prim_func
    def kernel(gi_h: T.handle, state: T.Buffer((states, batch, hidden), FP32), data_h: T.handle, indices_h: T.handle,
               indptr: T.Buffer((gates * blocks + 1,), ptr_dtype), scales: T.Buffer((gates * hidden,), FP32),
               bias: T.Buffer((gates * hidden,), FP32), y_h: T.handle, final: T.Buffer((states, batch, hidden), FP32)):
        T.func_attr({"tirx.noalias": True})
        steps = T.int32()
        nnzb = T.int32()
        gi = T.match_buffer(gi_h, (steps, batch, gates * hidden), FP32)
        data = T.match_buffer(data_h, (nnzb, cols, rows), wdtype)
        indices = T.match_buffer(indices_h, (nnzb,), idx_dtype)
        y = T.match_buffer(y_h, (steps, batch, hidden), FP32)
        h_buf = T.alloc_buffer((2, hidden, batch), FP32)  # h transposed: a block column's batch values together
        c_buf = T.alloc_buffer((batch, hidden), FP32)
        gh = T.alloc_buffer((batch, gates * hidden), FP32)  # h · W_hhᵀ, without b_hh
        for b, k in T.grid(batch, hidden):
            h_buf[0, k, b] = state[0, b, k]
            c_buf[b, k] = state[states - 1, b, k]
        for t in range(steps):
            for ib in T.parallel(blocks):
                h_t = T.decl_buffer((hidden, batch), FP32, data=h_buf.data, elem_offset=t % 2 * (hidden * batch))
                for g in T.unroll(gates):
                    block_row(data, indices, indptr, nnzb, h_t, gh, scales, g * blocks + ib, 0, batch)
                for b in T.serial(batch):
                    for r in T.serial(rows):
                        gate = T.decl_buffer((gates,), FP32)
                        for g in T.unroll(gates):
                            gate[g] = gh[b, g * hidden + ib * rows + r] + bias[g * hidden + ib * rows + r]
                        update(gi, gate, h_buf, c_buf, t % 2, (t + 1) % 2, y,
                               steps - 1 - t if reverse else t, b, ib * rows + r, hidden)
        for b, k in T.grid(batch, hidden):
            final[0, b, k] = h_buf[steps % 2, k, b]
            if states == 2:
                final[1, b, k] = c_buf[b, k]

    return kernel


def _quantize_state(hidden: int, batch: int, tiles_n: int):
    """A TIR macro quantizing ``h_buf[slot]`` (``[hidden, batch]``) into ``u_buf[slot]``
    (``[tiles_n, hidden, 16]``, lanes past the batch repeat its last sample) with the scale
    ``max|h| / 127`` (1 when ``h`` is 0), stored in ``scale_buf[slot]``."""
    last = batch - 1

    @T.macro
    def quantize(h_buf, u_buf, scale_buf, slot):
        lanes = T.decl_buffer((ROW_TILE,), FP32)
        for lane in T.vectorized(ROW_TILE):
            lanes[lane] = T.float32(0)
        for tile, k in T.grid(tiles_n, hidden):
            for lane in T.vectorized(ROW_TILE):
                lanes[lane] = T.max(lanes[lane], T.fabs(h_buf[slot, k, T.min(tile * ROW_TILE + lane, last)]))
        amax = T.decl_buffer((1,), FP32)
        amax[0] = T.float32(0)
        for lane in range(ROW_TILE):
            amax[0] = T.max(amax[0], lanes[lane])
        scale_buf[slot] = T.if_then_else(amax[0] > T.float32(0), amax[0] / T.float32(127), T.float32(1))
        inv_scale = T.bind(T.float32(1) / scale_buf[slot])
        for tile, k in T.grid(tiles_n, hidden):
            for lane in T.vectorized(ROW_TILE):
                u_buf[slot, tile, k, lane] = quantize_u8(h_buf[slot, k, T.min(tile * ROW_TILE + lane, last)],
                                                         inv_scale)

    return quantize


def _vnni_kernel(cell: str, hidden: int, batch: int, itype: str, reverse: bool, summed: bool):
    gates, states = GATES[cell], 2 if cell == "lstm" else 1
    blocks, rows_total = hidden // ROWS, gates * hidden
    tiles_n = -(-batch // ROW_TILE)
    block_row = vnni_block_row(rows_total)
    quantize = _quantize_state(hidden, batch, tiles_n)
    update = _cell_update(cell, transposed=True, summed=summed)

    @T.prim_func
    def kernel(gi_h: T.handle, state: T.Buffer((states, batch, hidden), FP32), tiles_h: T.handle,
               columns_h: T.handle, group_ptr: T.Buffer((gates * blocks + 1,), "int32"),
               correction: T.Buffer((rows_total,), "int32"), scales: T.Buffer((rows_total,), FP32),
               bias: T.Buffer((rows_total,), FP32), y_h: T.handle, final: T.Buffer((states, batch, hidden), FP32)):
        T.func_attr({"tirx.noalias": True})
        steps = T.int32()
        groups = T.int32()
        gi = T.match_buffer(gi_h, (steps, batch, rows_total), FP32)
        tiles = T.match_buffer(tiles_h, (groups, 64), "int8")
        columns = T.match_buffer(columns_h, (groups, 4), itype)
        y = T.match_buffer(y_h, (steps, batch, hidden), FP32)
        h_buf = T.alloc_buffer((2, hidden, batch), FP32)
        c_buf = T.alloc_buffer((batch, hidden), FP32)
        u_buf = T.alloc_buffer((2, tiles_n, hidden, ROW_TILE), "uint8")  # h quantized, 16 samples a tile
        scale_buf = T.alloc_buffer((2,), FP32)  # s_h of each u_buf slot
        gh = T.alloc_buffer((batch, rows_total), FP32)
        for b, k in T.grid(batch, hidden):
            h_buf[0, k, b] = state[0, b, k]
            c_buf[b, k] = state[states - 1, b, k]
        quantize(h_buf, u_buf, scale_buf, 0)
        for t in range(steps):
            for ib in T.parallel(blocks):
                u_t = T.decl_buffer((tiles_n, hidden, ROW_TILE), "uint8", data=u_buf.data,
                                    elem_offset=t % 2 * (tiles_n * hidden * ROW_TILE))
                for tile in range(tiles_n):
                    for g in T.unroll(gates):
                        block_row(tiles, columns, group_ptr, correction, scales, u_t, tile, scale_buf[t % 2], gh,
                                  tile * ROW_TILE, batch, g * blocks + ib, groups)
                for b in T.serial(batch):
                    for r in T.serial(ROWS):
                        gate = T.decl_buffer((gates,), FP32)
                        for g in T.unroll(gates):
                            gate[g] = gh[b, g * hidden + ib * ROWS + r] + bias[g * hidden + ib * ROWS + r]
                        update(gi, gate, h_buf, c_buf, t % 2, (t + 1) % 2, y,
                               steps - 1 - t if reverse else t, b, ib * ROWS + r, hidden)
            quantize(h_buf, u_buf, scale_buf, (t + 1) % 2)
        for b, k in T.grid(batch, hidden):
            final[0, b, k] = h_buf[steps % 2, k, b]
            if states == 2:
                final[1, b, k] = c_buf[b, k]

    return kernel


def takes_int8_recurrence(cell: str, weight: PackedWeight, batch: int) -> bool:
    """Whether the recurrence over ``W_hh = weight`` can run with int8 activations (on a VNNI CPU)."""
    return takes_int8_activations(weight) and batch >= MIN_ROWS and weight.matrix_shape[1] % ROWS == 0


def _dense_kernel(cell: str, hidden: int, batch: int, wdtype: str, reverse: bool, int8: bool, summed: bool):
    gates, states = GATES[cell], 2 if cell == "lstm" else 1
    lanes = _lanes(hidden)
    chunk = _batch_chunk(batch, gates * lanes)
    update = _cell_update(cell, transposed=False, summed=summed)

    @T.prim_func
    def kernel(gi_h: T.handle, state: T.Buffer((states, batch, hidden), FP32),
               weight: T.Buffer((gates * hidden, hidden), wdtype), scales: T.Buffer((gates * hidden,), FP32),
               bias: T.Buffer((gates * hidden,), FP32), y_h: T.handle, final: T.Buffer((states, batch, hidden), FP32)):
        T.func_attr({"tirx.noalias": True})
        steps = T.int32()
        gi = T.match_buffer(gi_h, (steps, batch, gates * hidden), FP32)
        y = T.match_buffer(y_h, (steps, batch, hidden), FP32)
        h_buf = T.alloc_buffer((2, batch, hidden), FP32)
        c_buf = T.alloc_buffer((batch, hidden), FP32)
        for b, k in T.grid(batch, hidden):
            h_buf[0, b, k] = state[0, b, k]
            c_buf[b, k] = state[states - 1, b, k]
        for t in range(steps):
            for unit in T.parallel(hidden):
                for bo in range(batch // chunk):
                    acc = T.decl_buffer((gates, chunk, lanes), FP32)
                    gate = T.decl_buffer((gates,), FP32)
                    for g in T.unroll(gates):
                        for b in T.unroll(chunk):
                            for v in T.vectorized(lanes):
                                acc[g, b, v] = T.float32(0)
                        for ko in range(hidden // lanes):
                            for b in T.unroll(chunk):
                                for v in T.vectorized(lanes):
                                    acc[g, b, v] = acc[g, b, v] + T.Cast(FP32, weight[g * hidden + unit, ko * lanes + v]) * h_buf[
                                        t % 2, bo * chunk + b, ko * lanes + v]
                    for b in T.serial(chunk):
                        for g in T.unroll(gates):
                            gate[g] = T.float32(0)
                            for v in T.serial(lanes):
                                gate[g] = gate[g] + acc[g, b, v]
                            if int8:
                                gate[g] = gate[g] * scales[g * hidden + unit] + bias[g * hidden + unit]
                            else:
                                gate[g] = gate[g] + bias[g * hidden + unit]
                        update(gi, gate, h_buf, c_buf, t % 2, (t + 1) % 2, y, steps - 1 - t if reverse else t,
                               bo * chunk + b, unit, hidden)
        for b, k in T.grid(batch, hidden):
            final[0, b, k] = h_buf[steps % 2, b, k]
            if states == 2:
                final[1, b, k] = c_buf[b, k]

    return kernel


def recurrence_kernel(cell: str, weight: PackedWeight, batch: int, reverse: bool,
                      activations: str = "fp32", summed: bool = False) -> RecurrenceKernel:
    """The kernel for one direction of a ``cell`` layer whose ``W_hh`` is ``weight``.

    ``summed`` gives the kernel of a direction whose output is added to the other's (the
    ``addend`` of :func:`~exporters.recurrence.recurrence`): it adds ``h`` into ``y``, which then
    holds that output on entry (``call_tir_inplace``).

    ``activations="int8"`` quantizes ``h`` when :func:`takes_int8_recurrence` (compile for a target
    with AVX-512 VNNI); otherwise, and with ``"fp32"``, ``h`` stays fp32.  A BSR block that does not fit the gate layout (``r`` or ``c`` not dividing ``H``) is
    repacked as CSR with the same value type; COO and bit-mask weights are repacked as CSR."""
    if cell not in GATES:
        raise ValueError(f"cell={cell!r}: use one of {', '.join(GATES)}")
    if activations not in ("fp32", "int8"):
        raise ValueError(f"unknown activations {activations!r}: use fp32 or int8")
    rows_total, hidden = weight.matrix_shape
    if rows_total != GATES[cell] * hidden:
        raise ValueError(f"W_hh of shape {weight.shape} does not fit a {cell} layer of {hidden} units")
    int8 = weight.dtype == "int8"
    wdtype = "int8" if int8 else FP32
    scales = weight.arrays["scales"] if int8 else np.ones(rows_total, np.float32)
    direction = ("reverse" if reverse else "forward") + ("_summed" if summed else "")
    if activations == "int8" and takes_int8_recurrence(cell, weight, batch):
        constants = vnni_layout(weight)
        func = _vnni_kernel(cell, hidden, batch, constants[1].dtype.name, reverse, summed)
        name = f"recurrence_{cell}_bsr16x1_int8_u8_b{batch}_h{hidden}_{direction}_vnni"
        return RecurrenceKernel(func.with_attr("global_symbol", name), name, constants)
    if weight.format == "dense":
        func = _dense_kernel(cell, hidden, batch, wdtype, reverse, int8, summed)
        name = f"recurrence_{cell}_dense_{weight.dtype}_b{batch}_h{hidden}_{direction}"
        return RecurrenceKernel(func.with_attr("global_symbol", name), name,
                                (weight.arrays["values"].reshape(rows_total, hidden), scales))
    rows, cols = weight.block.rows, weight.block.cols
    if weight.format not in ("csr", "bsr") or hidden % rows or hidden % cols:
        weight = pack(weight.to_dense(), "csr", dtype=weight.dtype)
        rows = cols = 1
    values = weight.arrays["values"].reshape(-1, rows, cols).transpose(0, 2, 1)
    indptr, indices = weight.arrays["indptr"], weight.arrays["indices"]
    func = _sparse_kernel(cell, hidden, batch, rows, cols, wdtype, str(indptr.dtype), str(indices.dtype), reverse, int8,
                          summed)
    name = f"recurrence_{cell}_bsr{rows}x{cols}_{weight.dtype}_b{batch}_h{hidden}_{direction}"
    return RecurrenceKernel(func.with_attr("global_symbol", name), name,
                            (np.ascontiguousarray(values), indices, indptr, weight.arrays["scales"] if int8 else scales))
