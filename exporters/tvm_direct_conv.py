"""Direct convolution for dense (or nearly dense) weights: no im2col matrix (TVM 0.27, ``tirx``).

For a convolution of static shape (:class:`~exporters.tvm_conv.ConvShape`) whose weight is
stored mostly dense, building the im2col matrix costs about a third of the time of the matmul
that reads it (DS2's second convolution at batch 1, one core: 2.0 ms of im2col beside 5.7 ms of
matmul).  This kernel reads the zero-padded input ``xp`` (:func:`~exporters.tvm_conv.pad_kernel`)
in place::

    out[n, co, oh, ow] = Σ_(c,i,j) Wd[co, (c, i, j)] · xp[n·Cin + c, oh·sh + i·dh, ow·sw + j·dw]

with the weight re-laid out as ``Wd[g, k, v] = W[g·V + v, k]`` (``V`` = :data:`LANES` output
channels of group ``g``, zeros past ``Cout``): for each ``k`` one vector load of ``V`` weights,
multiplied by the input value of each of ``P`` neighbouring output positions (broadcast from
memory) into ``P`` independent accumulators — a ``P × V`` register tile, as a GEMM micro-kernel
over ``(output channel, output position)``.  Parallel over ``(g, n, oh)``; along ``ow`` in tiles
of ``P`` (:func:`tile_width`; the last tile of a row that ``P`` does not divide starts at
``Wout − P`` and recomputes a few outputs).  An int8 weight is dequantized once per call into an
fp32 copy of ``Wd`` (``codes · scales[co]``: the same products as the matmul kernels), which the
tiles then read.

Measured, DS2's second convolution (32 → 32 channels, 21×11, 41 × 30 outputs), batch 1, one
core: see :data:`DIRECT_MIN_DENSITY` and ``docs/tvm.md``.
"""

from __future__ import annotations

import math

import numpy as np
import tvm
from tvm import relax
from tvm.script import tirx as T

from compressor.packing import PackedWeight

from .tvm_conv import AddFunc, ConvShape, _padded_extent, pad_kernel
from .tvm_kernels import LANES, TILE_FLOATS

#: A weight with at least this fraction of its matrix stored (dense, or BSR / CSR of blocks
#: nearly all kept) is multiplied dense by :func:`direct_conv_kernel`; sparser ones keep im2col +
#: the sparse matmul kernels, which skip the zeros.
DIRECT_MIN_DENSITY = 0.5


def stored_fraction(weight: PackedWeight) -> float:
    """The fraction of the weight's matrix that its stored values (with the zeros inside stored
    blocks) cover: 1 for a dense packing."""
    return weight.arrays["values"].size / math.prod(weight.matrix_shape)


def takes_direct(shape: ConvShape, weight: PackedWeight) -> bool:
    """Whether a convolution runs :func:`direct_conv_kernel`: static shape and a weight stored at
    least :data:`DIRECT_MIN_DENSITY` dense."""
    return not shape.symbolic and stored_fraction(weight) >= DIRECT_MIN_DENSITY


def tile_width(out_width: int) -> int:
    """``P``, the output positions of one register tile (``P`` vectors of :data:`LANES`, at most
    :data:`TILE_FLOATS` floats): the one computing the fewest outputs over a row of ``out_width``
    (tiles overlap where ``P`` does not divide it), the widest among those."""
    widest = min(out_width, TILE_FLOATS // LANES)
    return min(range(1, widest + 1), key=lambda p: (math.ceil(out_width / p) * p, -p))


def direct_conv_kernel(shape: ConvShape, weight: PackedWeight) -> tuple[tvm.tirx.PrimFunc, str, tuple[np.ndarray, ...]]:
    """The kernel, its name and its constants (``Wd``, and the scales of an int8 weight).  The
    function takes ``(xp, *constants, out)``: ``xp`` from :func:`~exporters.tvm_conv.pad_kernel`,
    ``out[N, Cout, Hout·Wout]``."""
    N, C, CO = shape.batch, shape.channels, shape.out_channels
    (KH, KW), (SH, SW), (DH, DW) = shape.kernel, shape.stride, shape.dilation
    HO, WO, K = shape.out_height, shape.out_width, shape.cols
    HP, WP, VW = _padded_extent(shape)
    WX = WP + VW
    V = LANES
    G = math.ceil(CO / V)
    P = tile_width(WO)
    WT = math.ceil(WO / P)
    int8 = weight.dtype == "int8"
    codes = np.zeros((G * V, K), np.int8 if int8 else np.float32)
    codes[:CO] = weight.stored_matrix()
    wd = np.ascontiguousarray(codes.reshape(G, V, K).transpose(0, 2, 1))
    scales = np.ones(G * V, np.float32)
    if int8:
        scales[:CO] = weight.arrays["scales"]

    @T.macro
    def tiles(xp, w, out):
        for task in T.parallel(G * N * HO):
            g = T.bind(task // (N * HO))
            n = T.bind(task // HO % N)
            oh = T.bind(task % HO)
            for wt in range(WT):
                ow0 = T.bind(T.min(wt * P, WO - P))
                acc = T.decl_buffer((P, V), "float32")
                for p in T.unroll(P):
                    for v in T.vectorized(V):
                        acc[p, v] = T.float32(0)
                for c in range(C):
                    for i in range(KH):
                        for j in range(KW):
                            for p in T.unroll(P):
                                for v in T.vectorized(V):
                                    acc[p, v] = acc[p, v] + w[g, (c * KH + i) * KW + j, v] * xp[
                                        n * C + c, oh * SH + i * DH, (ow0 + p) * SW + j * DW]
                for v in T.serial(V):
                    if g * V + v < CO:
                        for p in T.unroll(P):
                            out[n, g * V + v, oh * WO + ow0 + p] = acc[p, v]

    @T.prim_func
    def fp32_kernel(xp: T.Buffer((N * C, HP, WX), "float32"), w: T.Buffer((G, K, V), "float32"),
                    out: T.Buffer((N, CO, HO * WO), "float32")):
        T.func_attr({"tirx.noalias": True})
        tiles(xp, w, out)

    @T.prim_func
    def int8_kernel(xp: T.Buffer((N * C, HP, WX), "float32"), q: T.Buffer((G, K, V), "int8"),
                    scale: T.Buffer((G * V,), "float32"), out: T.Buffer((N, CO, HO * WO), "float32")):
        T.func_attr({"tirx.noalias": True})
        w = T.alloc_buffer((G, K, V), "float32")
        for gk in T.parallel(G * K):
            for v in T.vectorized(V):
                w[gk // K, gk % K, v] = T.Cast("float32", q[gk // K, gk % K, v]) * scale[gk // K * V + v]
        tiles(xp, w, out)

    name = f"direct_conv_{weight.dtype}_{shape.tag}_o{CO}"
    func = (int8_kernel if int8 else fp32_kernel).with_attr("global_symbol", name)
    return func, name, (wd, scales) if int8 else (wd,)


def emit_direct_conv(builder: relax.BlockBuilder, add_func: AddFunc, x: relax.Expr, shape: ConvShape,
                     weight: PackedWeight) -> tuple[relax.Expr, str, int]:
    """Emit the padding and the direct convolution, then the reshape to ``[N, Cout, (Hout,) Wout]``.
    Returns the last expression (not emitted), the kernel's name and the bytes one call must move
    (the constants, the padded input and the output)."""
    flat = builder.emit(relax.op.reshape(x, (shape.batch * shape.channels, shape.height, shape.width)))
    hp, wp, vw = _padded_extent(shape)
    xp_type = relax.TensorType((shape.batch * shape.channels, hp, wp + vw), "float32")
    xp = builder.emit(relax.call_tir(add_func(*pad_kernel(shape)), [flat], xp_type))
    func, name, constants = direct_conv_kernel(shape, weight)
    positions = shape.out_height * shape.out_width
    out_type = relax.TensorType((shape.batch, shape.out_channels, positions), "float32")
    out = builder.emit(relax.call_tir(add_func(func, name), [xp, *(relax.const(c) for c in constants)], out_type))
    moved = sum(int(c.nbytes) for c in constants) + 4 * (shape.batch * shape.channels * hp * (wp + vw)
                                                         + shape.batch * shape.out_channels * positions)
    return relax.op.reshape(out, shape.out_shape), name, moved
