"""Direct convolution for dense (or nearly dense) weights: no im2col matrix (TVM 0.27, ``tirx``).

For a convolution whose weight is stored mostly dense (:func:`takes_direct`), building the
im2col matrix costs about a third of the time of the matmul that reads it (DS2's second
convolution at batch 1, one core: 2.0 ms of im2col beside 5.7 ms of matmul).  This kernel reads
the zero-padded input ``xp`` (:func:`~exporters.tvm_conv.pad_kernel`) in place::

    out[n, co, oh, ow] = Σ_(c,i,j) Wd[co, (c, i, j)] · xp[n·Cin + c, oh·sh + i·dh, ow·sw + j·dw]

with the weight re-laid out as ``Wd[g, k, v] = W[g·V + v, k]`` (``V`` = :data:`LANES` output
channels of group ``g``, zeros past ``Cout``): for each ``k`` one vector load of ``V`` weights,
multiplied by the input value of each of ``P`` neighbouring output positions (broadcast from
memory) into ``P`` independent accumulators — a ``P × V`` register tile, as a GEMM micro-kernel
over ``(output channel, output position)``.  Parallel over ``(g, n, oh)``; along ``ow`` in tiles
of ``P`` (:func:`tile_width`; the last tile of a row that ``P`` does not divide starts at
``Wout − P`` and recomputes a few outputs).  An int8 weight is dequantized once per call into an
fp32 copy of ``Wd`` (``codes · scales[co]``: the same products as the matmul kernels), which the
tiles then read.  The input height and width may be run-time values (``export_tvm(...,
dynamic_axes=...)``): one kernel then serves every size, with no pieces to loop over.

Measured, DS2's second convolution (32 → 32 channels, 21×11, 41 × 30 outputs, 291 M
multiply-adds), batch 1, one core, int8 weight: 3.6 ms against 7.7 ms for im2col + matmul (and
about 4.4 ms for ONNX Runtime's whole convolution front end); batch 16: 58 ms.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import tvm
from tvm import relax
from tvm.script import tirx as T

from compressor.packing import PackedWeight

from .tvm_conv import (AddFunc, ConvShape, _padded_extent, _sized, _symbolic_sizes, _without_static_sizes, pad_kernel,
                       pad_kernel_dyn)
from .tvm_kernels import LANES, TILE_FLOATS

#: A weight with at least this fraction of its matrix stored (dense, or BSR / CSR of blocks
#: nearly all kept) is multiplied dense by :func:`direct_conv_kernel`; sparser ones keep im2col +
#: the sparse matmul kernels, which skip the zeros.
DIRECT_MIN_DENSITY = 0.5


def stored_fraction(weight: PackedWeight) -> float:
    """The fraction of the weight's matrix that its stored values (with the zeros inside stored
    blocks) cover: 1 for a dense packing."""
    return weight.arrays["values"].size / math.prod(weight.matrix_shape)


def takes_direct(weight: PackedWeight) -> bool:
    """Whether a convolution with this weight runs :func:`direct_conv_kernel`: one stored at least
    :data:`DIRECT_MIN_DENSITY` dense."""
    return stored_fraction(weight) >= DIRECT_MIN_DENSITY


def tile_width(out_width: int | tvm.ir.Expr) -> int:
    """``P``, the output positions of one register tile (``P`` vectors of :data:`LANES`, at most
    :data:`TILE_FLOATS` floats): the one computing the fewest outputs over a row of ``out_width``
    (tiles overlap where ``P`` does not divide it), the widest among those; the widest for a
    run-time width."""
    widest = TILE_FLOATS // LANES
    if not isinstance(out_width, int):
        return widest
    return min(range(1, min(out_width, widest) + 1), key=lambda p: (math.ceil(out_width / p) * p, -p))


def _tiles(shape: ConvShape, P: int, G: int):
    """The macro ``tiles(xp, w, out, ho, wo)``: every output in ``P``-wide tiles (``wo >= P``)."""
    N, C, CO = shape.batch, shape.channels, shape.out_channels
    (KH, KW), (SH, SW), (DH, DW) = shape.kernel, shape.stride, shape.dilation
    V = LANES

    @T.macro
    def tiles(xp, w, out, ho, wo):
        for task in T.parallel(G * N * ho):
            g = T.bind(task // (N * ho))
            n = T.bind(task // ho % N)
            oh = T.bind(task % ho)
            for wt in range((wo + P - 1) // P):
                ow0 = T.bind(T.min(wt * P, wo - P))
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
                            out[n, g * V + v, oh * wo + ow0 + p] = acc[p, v]

    return tiles


def direct_conv_kernel(shape: ConvShape, weight: PackedWeight) -> tuple[tvm.tirx.PrimFunc, str, tuple[np.ndarray, ...]]:
    """The kernel, its name and its constants (``Wd``, and the scales of an int8 weight).  The
    function takes ``(xp, H, W, *constants, out)``: ``xp`` from :func:`~exporters.tvm_conv.pad_kernel`
    (or ``pad_kernel_dyn``), the input height and width only where they are run-time values,
    ``out[N, Cout, Hout·Wout]``.  Rows narrower than a tile (only possible at run time) take tiles
    of one position."""
    N, C, CO, K = shape.batch, shape.channels, shape.out_channels, shape.cols
    V = LANES
    G = math.ceil(CO / V)
    P = tile_width(shape.out_width)
    wide, narrow = _tiles(shape, P, G), _tiles(shape, 1, G)
    int8 = weight.dtype == "int8"
    codes = np.zeros((G * V, K), np.int8 if int8 else np.float32)
    codes[:CO] = weight.stored_matrix()
    wd = np.ascontiguousarray(codes.reshape(G, V, K).transpose(0, 2, 1))
    scales = np.ones(G * V, np.float32)
    if int8:
        scales[:CO] = weight.arrays["scales"]

    def dim(H, W, index):
        sized = _sized(shape, H, W)
        hp, wp, vw = _padded_extent(sized)
        return (hp, wp + vw, sized.out_height, sized.out_width)[index]

    @T.macro
    def convolve(xp_h, H, W, w, out_h):
        xp = T.match_buffer(xp_h, (N * C, dim(H, W, 0), dim(H, W, 1)), "float32")
        out = T.match_buffer(out_h, (N, CO, dim(H, W, 2) * dim(H, W, 3)), "float32")
        ho = T.bind(T.Cast("int32", dim(H, W, 2)))
        wo = T.bind(T.Cast("int32", dim(H, W, 3)))
        if wo >= P:
            wide(xp, w, out, ho, wo)
        else:
            narrow(xp, w, out, ho, wo)

    @T.prim_func
    def fp32_kernel(xp_h: T.handle, H: T.int64, W: T.int64, w: T.Buffer((G, K, V), "float32"), out_h: T.handle):
        T.func_attr({"tirx.noalias": True})
        convolve(xp_h, H, W, w, out_h)

    @T.prim_func
    def int8_kernel(xp_h: T.handle, H: T.int64, W: T.int64, q: T.Buffer((G, K, V), "int8"),
                    scale: T.Buffer((G * V,), "float32"), out_h: T.handle):
        T.func_attr({"tirx.noalias": True})
        w = T.alloc_buffer((G, K, V), "float32")
        for gk in T.parallel(G * K):
            for v in T.vectorized(V):
                w[gk // K, gk % K, v] = T.Cast("float32", q[gk // K, gk % K, v]) * scale[gk // K * V + v]
        convolve(xp_h, H, W, w, out_h)

    func, name = _without_static_sizes(int8_kernel if int8 else fp32_kernel, shape,
                                       f"direct_conv_{weight.dtype}_{shape.tag}_o{CO}")
    return func, name, (wd, scales) if int8 else (wd,)


def emit_direct_conv(builder: relax.BlockBuilder, add_func: AddFunc, x: relax.Expr, shape: ConvShape,
                     weight: PackedWeight, out_ty: relax.TensorType,
                     kernel: Callable[[ConvShape, PackedWeight], tuple] | None = None) -> tuple[relax.Expr, str, int]:
    """Emit the padding and the direct convolution (``kernel``, by default
    :func:`direct_conv_kernel`; or another with its arguments and result, such as
    :func:`~exporters.tvm_vnni_conv.vnni_conv_kernel`), then the reshape to ``out_ty`` (the
    convolution call's type, whose sizes the output takes).  Returns the last expression (not
    emitted), the kernel's name and the bytes one call must move: the constants, the padded
    input and the output (for run-time sizes: the constants only)."""
    sizes = [relax.prim_value(v) for v in _symbolic_sizes(shape)]
    nc = shape.batch * shape.channels
    flat = builder.emit(relax.op.reshape(x, (nc, shape.height, shape.width)))
    hp, wp, vw = _padded_extent(shape)
    pad = pad_kernel_dyn(shape) if shape.symbolic else pad_kernel(shape)
    xp = builder.emit(relax.call_tir(add_func(*pad), [flat, *sizes], relax.TensorType((nc, hp, wp + vw), "float32")))
    func, name, constants = (kernel or direct_conv_kernel)(shape, weight)
    out_dims = list(out_ty.shape.values)
    positions = out_dims[2] if shape.one_d else out_dims[2] * out_dims[3]
    out = builder.emit(relax.call_tir(add_func(func, name), [xp, *sizes, *(relax.const(c) for c in constants)],
                                      relax.TensorType((shape.batch, shape.out_channels, positions), "float32")))
    moved = sum(int(c.nbytes) for c in constants)
    if not shape.symbolic:
        moved += 4 * (nc * hp * (wp + vw) + shape.batch * shape.out_channels * shape.out_height * shape.out_width)
    return relax.op.reshape(out, out_ty.shape), name, moved
