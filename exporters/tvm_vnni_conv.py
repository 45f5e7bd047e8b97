"""Direct convolution with int8 activations for int8 weights stored dense (x86 AVX-512 VNNI).

The fp32 direct convolution (:mod:`exporters.tvm_direct_conv`) is bound by its fp32 FMAs: 16
multiply-adds an instruction.  This kernel quantizes the zero-padded input once per call (per
tensor, uint8 with zero point 128, as :mod:`exporters.tvm_vnni_kernel` does for matmuls) and
multiplies integers with ``vpdpbusd``, 64 multiply-adds an instruction::

    s_x = max|xp| / 127,   u = ⌊xp / s_x + ½⌉ + 128
    out[n, co, oh, ow] = s_x · scales[co] · (Σ_(c,i,j) q[co, c, i, j] · u[n·Cin + c, oh·sh + i·dh, ow·sw + j]
                                              − 128 · Σ_(c,i,j) q[co, c, i, j])

The int32 sums are exact; the only error besides the int8 weights' is the rounding of ``xp``:
at most ``s_x / 2 · Σ |w[co]|`` per output.

It needs a unit dilation along the width (``dw = 1``), so that the 4 taps ``j … j + 3`` an
instruction adds into one int32 lane are 4 consecutive bytes of ``u`` (any width stride), read as
one 32-bit word and broadcast to the 16 lanes (16 output channels).  The weight is re-laid out
as ``Wq[g, (c, i, jq), v, t] = q[16 g + v, c, i, 4 jq + t]`` (zeros past ``kw`` and past
``Cout``): one 64-byte load per ``(c, i, jq)``, multiplied into ``P`` neighbouring output
positions (``P × 16`` int32 accumulators).  Parallel over ``(g, n, oh)``; along ``ow`` in tiles of
``P`` as in the fp32 kernel.  The padded input's ``VW`` extra zero columns
(:func:`~exporters.tvm_conv.pad_kernel`) keep the last window's padding taps inside its row.

Measured, DS2's second convolution (32 → 32 channels, 21×11, stride 2×1), batch 16, one core:
see ``docs/tvm.md`` (int8 activations).
"""

from __future__ import annotations

import math

import numpy as np
import tvm
from tvm.script import tirx as T

from compressor.packing import PackedWeight

from .tvm_conv import ConvShape, _padded_extent
from .tvm_direct_conv import takes_direct, tile_width
from .tvm_vnni_kernel import GROUP, ROWS, quantize_u8

#: The narrowest kernel width taken: 4 taps fill one int32 lane; narrower kernels would multiply
#: mostly padding.
MIN_KERNEL_WIDTH = 4
_ZERO_POINT = 128


@T.macro
def tensor_scale(flat, scale, total):
    """``scale[0] = max|flat[0 : total]| / 127`` (1 for all zeros), the per-tensor scale
    :func:`~exporters.tvm_vnni_kernel.quantize_u8` divides by, 16 lanes at a time (``total`` an
    int or a run-time size).  Shared by the VNNI and the AMX convolutions."""
    lanes = T.decl_buffer((ROWS,), "float32")
    for lane in T.vectorized(ROWS):
        lanes[lane] = T.float32(0)
    for o in range(total // ROWS):
        for lane in T.vectorized(ROWS):
            lanes[lane] = T.max(lanes[lane], T.fabs(flat[o * ROWS + lane]))
    for e in range(total // ROWS * ROWS, total):
        lanes[0] = T.max(lanes[0], T.fabs(flat[e]))
    scale[0] = T.float32(0)
    for lane in range(ROWS):
        scale[0] = T.max(scale[0], lanes[lane])
    scale[0] = T.if_then_else(scale[0] > T.float32(0), scale[0] / T.float32(127), T.float32(1))


def takes_vnni_conv(shape: ConvShape, weight: PackedWeight) -> bool:
    """Whether :func:`vnni_conv_kernel` takes this convolution: an int8 weight stored at least
    half dense (:func:`~exporters.tvm_direct_conv.takes_direct`), static sizes, ``dw = 1`` and
    ``kw >= 4``."""
    return (weight.dtype == "int8" and takes_direct(weight) and not shape.symbolic
            and shape.dilation[1] == 1 and shape.kernel[1] >= MIN_KERNEL_WIDTH)


def vnni_conv_layout(shape: ConvShape, weight: PackedWeight) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(Wq[G, Cin·kh·JQ, 64] int8, correction[G·16] int32 = 128 · Σ q[co], scales[G·16] fp32)``
    with ``JQ = ⌈kw / 4⌉`` (see the module docstring)."""
    C, CO = shape.channels, shape.out_channels
    KH, KW = shape.kernel
    G, JQ = math.ceil(CO / ROWS), math.ceil(KW / GROUP)
    codes = np.zeros((G * ROWS, C, KH, JQ * GROUP), np.int8)
    codes[:CO, :, :, :KW] = weight.stored_matrix().reshape(CO, C, KH, KW)
    wq = codes.reshape(G, ROWS, C * KH * JQ, GROUP).transpose(0, 2, 1, 3).reshape(G, C * KH * JQ, ROWS * GROUP)
    return (np.ascontiguousarray(wq), *zero_point_constants(codes, weight))


def zero_point_constants(codes: np.ndarray, weight: PackedWeight) -> tuple[np.ndarray, np.ndarray]:
    """``(correction[G·16] int32 = 128 · Σ q[co], scales[G·16] fp32, ones past Cout)`` for the
    int8 codes laid out with their ``G·16`` (padded) output channels first.  Shared by the VNNI
    and the AMX convolutions."""
    rows = codes.shape[0]
    correction = (_ZERO_POINT * codes.reshape(rows, -1).astype(np.int64).sum(1)).astype(np.int32)
    scales = np.ones(rows, np.float32)
    scales[:weight.matrix_shape[0]] = weight.arrays["scales"]
    return correction, scales


def vnni_conv_kernel(shape: ConvShape, weight: PackedWeight) -> tuple[tvm.tirx.PrimFunc, str, tuple[np.ndarray, ...]]:
    """The kernel, its name and its constants (:func:`vnni_conv_layout`).  The function takes
    ``(xp, *constants, out)``: ``xp[N·Cin, Hp, Wp + VW]`` from :func:`~exporters.tvm_conv.pad_kernel`
    and ``out[N, Cout, Hout·Wout]``, as :func:`~exporters.tvm_direct_conv.direct_conv_kernel`."""
    if not takes_vnni_conv(shape, weight):
        raise ValueError(f"the int8-activation convolution takes int8 weights stored dense, static sizes, width "
                         f"dilation 1 and kw >= {MIN_KERNEL_WIDTH}; got {weight.dtype} {shape.tag}")
    N, C, CO = shape.batch, shape.channels, shape.out_channels
    (KH, KW), (SH, SW), (DH, _) = shape.kernel, shape.stride, shape.dilation
    HP, WP, VW = _padded_extent(shape)
    WX, HO, WO = WP + VW, shape.out_height, shape.out_width
    G, JQ = math.ceil(CO / ROWS), math.ceil(KW / GROUP)
    KQ, P, total = C * KH * JQ, tile_width(WO), N * C * HP * WX
    whole = total // ROWS * ROWS
    dpbusd = T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpbusd.512")

    @T.prim_func
    def kernel(xp: T.Buffer((N * C, HP, WX), "float32"), wq: T.Buffer((G, KQ, ROWS * GROUP), "int8"),
               correction: T.Buffer((G * ROWS,), "int32"), scales: T.Buffer((G * ROWS,), "float32"),
               out: T.Buffer((N, CO, HO * WO), "float32")):
        T.func_attr({"tirx.noalias": True})
        flat = T.decl_buffer((total,), "float32", data=xp.data)
        u = T.alloc_buffer((total,), "uint8")
        scale = T.decl_buffer((1,), "float32")
        tensor_scale(flat, scale, total)
        scale_x = T.bind(scale[0])
        inv_scale = T.bind(T.float32(1) / scale_x)
        for o in T.parallel(total // ROWS):
            for lane in T.vectorized(ROWS):
                u[o * ROWS + lane] = quantize_u8(flat[o * ROWS + lane], inv_scale)
        for e in range(whole, total):
            u[e] = quantize_u8(flat[e], inv_scale)
        for task in T.parallel(G * N * HO):
            g = T.bind(task // (N * HO))
            n = T.bind(task // HO % N)
            oh = T.bind(task % HO)
            for wt in range((WO + P - 1) // P):
                ow0 = T.bind(T.min(wt * P, WO - P))
                acc = T.decl_buffer((P, ROWS), "int32")
                for p in T.unroll(P):
                    for v in T.vectorized(ROWS):
                        acc[p, v] = 0
                for c in range(C):
                    for i in range(KH):
                        row = T.bind(((n * C + c) * HP + oh * SH + i * DH) * WX + ow0 * SW)
                        for jq in T.unroll(JQ):
                            w = T.bind(wq.vload([g, (c * KH + i) * JQ + jq, 0], "int8x64"))
                            for p in T.unroll(P):
                                taps = T.bind(T.reinterpret("int32", u.vload([row + p * SW + jq * GROUP], "uint8x4")))
                                acc[p, T.ramp(0, 1, ROWS)] = T.call_llvm_pure_intrin(
                                    dpbusd, acc[p, T.ramp(0, 1, ROWS)], T.reinterpret("int8x64", T.broadcast(taps, ROWS)),
                                    w, dtype="int32x16")
                for v in T.serial(ROWS):
                    if g * ROWS + v < CO:
                        for p in T.unroll(P):
                            out[n, g * ROWS + v, oh * WO + ow0 + p] = T.Cast(
                                "float32", acc[p, v] - correction[g * ROWS + v]) * (scales[g * ROWS + v] * scale_x)

    name = f"direct_conv_int8_u8_{shape.tag}_o{CO}_vnni"
    return kernel.with_attr("global_symbol", name), name, vnni_conv_layout(shape, weight)
