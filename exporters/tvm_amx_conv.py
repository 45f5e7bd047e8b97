"""Direct convolution with int8 activations on AMX tiles (x86 ``amx-tile`` + ``amx-int8``).

The VNNI convolution (:mod:`exporters.tvm_vnni_conv`) multiplies 64 bytes an instruction; an AMX
``tdpbusd`` multiplies a ``16 × 64`` uint8 tile by a ``64 × 16`` int8 tile into ``16 × 16`` int32
sums, 16 384 multiply-adds an instruction (Intel's Advanced Matrix Extensions, Sapphire Rapids
and later).  The quantization is the VNNI convolution's (per tensor, uint8 with zero point 128)::

    s_x = max|xp| / 127,   u = ⌊xp / s_x + ½⌉ + 128
    out[n, co, oh, ow] = s_x · scales[co] · (Σ_(i, j, c) q[co, c, i, j] · u[n, oh·sh + i·dh, ow·sw + j, c]
                                              − 128 · Σ_(c,i,j) q[co, c, i, j])

The padded input is quantized once per call into ``u[N, Hp, Wx, Cin]`` (channels last), so that
for one input row ``(n, h)`` the ``kw · Cin`` values one window reads along the width, ``(j, c)``,
are consecutive bytes (width dilation 1).  That run, cut in 64-byte chunks, is the reduction:
an A tile holds one chunk for 16 neighbouring output positions (its rows ``sw · Cin`` bytes
apart: tiles read overlapping rows in place, no im2col), a B tile the matching 64 weights of 16
output channels in the VNNI order ``Wb[g, i, ch, r, 4 v + t] = q[16 g + v, k = 64 ch + 4 r + t]``
with ``k = j · Cin + c`` (zero past ``kw · Cin`` and past ``Cout``: the bytes a last chunk reads
past its run are multiplied by zeros).  The roles of width and height can be swapped
(:class:`AmxPlan`: ``u[N, Wx, Hp, Cin]``, runs of ``kh · Cin`` bytes, height dilation 1), and
:func:`amx_plan` takes the orientation with fewer tile products.  Each task takes two tiles of
positions along the runs' axis, for up to 16 neighbouring output rows of the other axis one after
the other (their stores share cache lines), and for each row and pair of channel groups keeps
2 × 2 accumulator tiles (32 positions × 32 channels), adds ``kq · ⌈kp · Cin / 64⌉`` chunks into
them (two A and two B tile loads, four ``tdpbusd``), stores them and scales them into ``out``.
The last tiles of a row start at ``Pout − 16`` (overlapping the one before: same sums); with
fewer than 16 positions the extra rows read the slack past ``u`` and are not stored.

Linux hands out the AMX tile state on request only: every call first asks for it
(``arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)``, a no-op after the first) and fails with
a message if the kernel refuses.  The tiles are configured (``ldtilecfg``) and released
(``tilerelease``) in every parallel task, since the tile state belongs to a thread.

Measured, DS2's second convolution (32 → 32 channels, 21×11, stride 2×1), batch 16, one core:
see ``docs/tvm.md`` (int8 activations).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import tvm
from tvm.script import tirx as T

from compressor.packing import PackedWeight

from .tvm_conv import ConvShape, _padded_extent, _sized, _without_static_sizes
from .tvm_direct_conv import takes_direct
from .tvm_vnni_conv import tensor_scale, zero_point_constants
from .tvm_vnni_kernel import ROWS, quantize_u8

#: The CPU features the kernel needs (LLVM's names).
FEATURES = ("amx-tile", "amx-int8")
#: Bytes of one tile row: the reduction one ``tdpbusd`` covers.
CHUNK = 64
_SYS_ARCH_PRCTL, _ARCH_REQ_XCOMP_PERM, _XFEATURE_XTILEDATA = 158, 0x1023, 18


def target_has_amx(target: tvm.target.Target) -> bool:
    """Whether ``target`` (an LLVM target) has AMX with int8 (``amx-tile`` and ``amx-int8``)."""
    return all(bool(tvm.target.codegen.target_has_features(f, target)) for f in FEATURES)


def takes_amx_conv(shape: ConvShape, weight: PackedWeight) -> bool:
    """Whether :func:`amx_conv_kernel` takes this convolution: an int8 weight stored at least half
    dense (:func:`~exporters.tvm_direct_conv.takes_direct`) and an orientation (:func:`amx_plans`):
    a unit dilation along the width or the height, that axis of a static size."""
    return weight.dtype == "int8" and takes_direct(weight) and bool(amx_plans(shape))


@dataclass(frozen=True)
class AmxPlan:
    """The kernel's geometry along the axis of the runs (``along``: "width" or "height"), ``p``,
    and the other one, ``q``: the window's ``kp`` taps along ``p`` (dilation 1, input stride
    ``sp``) make the run of ``kp · Cin`` bytes, its ``kq`` taps along ``q`` (stride ``sq``,
    dilation ``dq``) the loop over runs; ``pn``, ``qn`` are the padded input's extents and ``po``,
    ``qo`` the output's (``qn``, ``qo`` may be run-time sizes)."""

    along: str
    kp: int
    sp: int
    pn: int
    po: int
    kq: int
    sq: int
    dq: int
    qn: int | tvm.ir.Expr
    qo: int | tvm.ir.Expr
    channels: int

    @property
    def chunks(self) -> int:
        """64-byte chunks of one run."""
        return math.ceil(self.kp * self.channels / CHUNK)

    @property
    def tiles(self) -> int:
        """16-position tiles along ``p``, computed in pairs."""
        return 2 * math.ceil(math.ceil(self.po / ROWS) / 2)

    @property
    def cost(self) -> int:
        """``tdpbusd`` per output row ``q`` and pair of 16-channel groups, over 4."""
        return self.qo * self.tiles * self.kq * self.chunks


def amx_plans(shape: ConvShape) -> list[AmxPlan]:
    """The orientations the kernel can take for ``shape``: runs along the width (``dw = 1``) and
    along the height (``dh = 1``), where that axis has a static size (a spectrogram with a run-time
    time axis runs along its frequencies)."""
    HP, WP, VW = _padded_extent(shape)
    (KH, KW), (SH, SW), (DH, DW) = shape.kernel, shape.stride, shape.dilation
    C, HO, WO = shape.channels, shape.out_height, shape.out_width
    plans = []
    if DW == 1:
        plans.append(AmxPlan("width", KW, SW, WP + VW, WO, KH, SH, DH, HP, HO, C))
    if DH == 1:
        plans.append(AmxPlan("height", KH, SH, HP, HO, KW, SW, DW, WP + VW, WO, C))
    return [plan for plan in plans if isinstance(plan.pn, int) and isinstance(plan.po, int)]


def amx_plan(shape: ConvShape) -> AmxPlan:
    """The orientation with the fewest tile multiplications (the width on a tie).  DS2's first
    convolution (one input channel, 41×11) runs along the height: 11 runs of 41 bytes, one chunk
    each, rather than 41 runs of 11."""
    plans = amx_plans(shape)
    if not plans:
        raise ValueError(f"the AMX convolution needs a unit dilation along the width or the height, that axis of "
                         f"static size; got {shape.tag}")
    return plans[0] if len(plans) == 1 else min(plans, key=lambda plan: plan.cost)


def amx_conv_layout(shape: ConvShape, weight: PackedWeight) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(Wb[G, kq, NCH, 16, 64] int8, correction[G·16] int32 = 128 · Σ q[co], scales[G·16] fp32)``
    with ``G = ⌈Cout / 16⌉`` and ``NCH`` 64-byte chunks of a run (see the module docstring and
    :func:`amx_plan`)."""
    plan = amx_plan(shape)
    C, CO = shape.channels, shape.out_channels
    G, NCH = math.ceil(CO / ROWS), plan.chunks
    codes = np.zeros((G * ROWS, plan.kq, NCH * CHUNK), np.int8)  # [co, i, k = j·C + c]
    q = weight.stored_matrix().reshape(CO, C, *shape.kernel)
    runs = q.transpose(0, 2, 3, 1) if plan.along == "width" else q.transpose(0, 3, 2, 1)
    codes[:CO, :, :plan.kp * C] = runs.reshape(CO, plan.kq, plan.kp * C)
    # [g, v, i, ch, r, t] -> [g, i, ch, r, v, t]
    wb = codes.reshape(G, ROWS, plan.kq, NCH, CHUNK // 4, 4).transpose(0, 2, 3, 4, 1, 5)
    return (np.ascontiguousarray(wb.reshape(G, plan.kq, NCH, ROWS, CHUNK)), *zero_point_constants(codes, weight))


def amx_conv_kernel(shape: ConvShape, weight: PackedWeight) -> tuple[tvm.tirx.PrimFunc, str, tuple[np.ndarray, ...]]:
    """The kernel, its name and its constants (:func:`amx_conv_layout`).  The function takes
    ``(xp, H, W, *constants, out)``, as :func:`~exporters.tvm_direct_conv.direct_conv_kernel`:
    ``xp[N·Cin, Hp, Wp + VW]`` from :func:`~exporters.tvm_conv.pad_kernel` (or ``pad_kernel_dyn``),
    the input height and width only where they are run-time values, ``out[N, Cout, Hout·Wout]``."""
    if not takes_amx_conv(shape, weight):
        raise ValueError(f"the AMX convolution takes int8 weights stored dense and a unit dilation along the width "
                         f"or the height, that axis of static size; got {weight.dtype} {shape.tag}")
    plan = amx_plan(shape)
    N, C, CO = shape.batch, shape.channels, shape.out_channels
    KQ, SQ, DQ, SP, PN, PO = plan.kq, plan.sq, plan.dq, plan.sp, plan.pn, plan.po
    WIDTH = plan.along == "width"
    G, NCH = math.ceil(CO / ROWS), plan.chunks
    MP, GP = plan.tiles // 2, math.ceil(G / 2)
    R = min(ROWS, PO)                   # rows of a tile that are stored
    step = SP * C                       # bytes between the rows of an A tile
    slack = ROWS * step + NCH * CHUNK   # what the last tile's rows and chunks read past u
    last = max(PO - ROWS, 0)

    def dims(H, W) -> dict:
        """The sizes that depend on the input's (``H``, ``W``: the kernel's parameters)."""
        sized = _sized(shape, H, W)
        hp, wp, vw = _padded_extent(sized)
        ho, wo = sized.out_height, sized.out_width
        return {"hp": hp, "wx": wp + vw, "out": ho * wo, "wo": wo, "qn": hp if WIDTH else wp + vw,
                "qo": ho if WIDTH else wo, "total": N * C * hp * (wp + vw)}

    @T.prim_func
    def kernel(xp_h: T.handle, H: T.int64, W: T.int64, wb: T.Buffer((G, KQ, NCH, ROWS, CHUNK), "int8"),
               correction: T.Buffer((G * ROWS,), "int32"), scales: T.Buffer((G * ROWS,), "float32"), out_h: T.handle):
        T.func_attr({"tirx.noalias": True})
        xp = T.match_buffer(xp_h, (N * C, dims(H, W)["hp"], dims(H, W)["wx"]), "float32")
        out = T.match_buffer(out_h, (N, CO, dims(H, W)["out"]), "float32")
        WO = T.bind(T.Cast("int32", dims(H, W)["wo"]))
        QN = T.bind(T.Cast("int32", dims(H, W)["qn"]))
        QO = T.bind(T.Cast("int32", dims(H, W)["qo"]))
        total = T.bind(T.Cast("int32", dims(H, W)["total"]))
        QB = T.bind((QO + ROWS - 1) // ROWS)  # blocks of 16 output rows q, one a task: its stores share cache lines
        granted = T.call_extern("int64", "syscall", T.int64(_SYS_ARCH_PRCTL), T.int64(_ARCH_REQ_XCOMP_PERM),
                                T.int64(_XFEATURE_XTILEDATA))
        assert granted == T.int64(0), "this CPU or its OS refused the AMX tile state (arch_prctl " \
            "ARCH_REQ_XCOMP_PERM): the library was compiled for a CPU with AMX; export it on the machine that runs it"
        flat = T.decl_buffer((total,), "float32", data=xp.data)
        u = T.alloc_buffer((total + slack,), "uint8")
        scale = T.decl_buffer((1,), "float32")
        tensor_scale(flat, scale, total)
        scale_x = T.bind(scale[0])
        inv_scale = T.bind(T.float32(1) / scale_x)
        for nq in T.parallel(N * QN):  # u[n, q, p, c]: channels last, runs along p
            for p in range(PN):
                for c in T.vectorized(C):
                    if WIDTH:
                        u[(nq * PN + p) * C + c] = quantize_u8(xp[nq // QN * C + c, nq % QN, p], inv_scale)
                    else:
                        u[(nq * PN + p) * C + c] = quantize_u8(xp[nq // QN * C + c, p, nq % QN], inv_scale)
        for e in range(slack):
            u[total + e] = T.uint8(128)  # the zero point: padding that quantizes to 0
        for task in T.parallel(N * QB * MP):
            n = T.bind(task // (QB * MP))
            qb = T.bind(task // MP % QB)
            op_a = T.bind(T.min(task % MP * 2 * ROWS, last))
            op_b = T.bind(T.min((task % MP * 2 + 1) * ROWS, last))
            config = T.decl_buffer((64,), "uint8")
            for b in range(64):
                config[b] = T.uint8(0)
            config[0] = T.uint8(1)  # palette 1: 8 tiles, each 16 rows of 64 bytes here
            for t in range(8):
                config[16 + 2 * t] = T.uint8(CHUNK)
                config[48 + t] = T.uint8(ROWS)
            T.evaluate(T.call_llvm_intrin("void", "llvm.x86.ldtilecfg", T.address_of(config[0])))
            for oq in range(qb * ROWS, T.min(qb * ROWS + ROWS, QO)):
                acc = T.decl_buffer((4, ROWS, ROWS), "int32")
                for gp in range(GP):
                    g_a = T.bind(gp * 2)
                    g_b = T.bind(T.min(gp * 2 + 1, G - 1))
                    for t in T.unroll(4):
                        T.evaluate(T.call_llvm_intrin("void", "llvm.x86.tilezero", T.int8(t)))
                    for i in range(KQ):
                        run = T.bind((n * QN + oq * SQ + i * DQ) * PN * C)
                        for ch in range(NCH):
                            T.evaluate(T.call_llvm_intrin("void", "llvm.x86.tileloadd64", T.int8(4),
                                                          T.address_of(u[run + op_a * step + ch * CHUNK]), T.int64(step)))
                            T.evaluate(T.call_llvm_intrin("void", "llvm.x86.tileloadd64", T.int8(5),
                                                          T.address_of(u[run + op_b * step + ch * CHUNK]), T.int64(step)))
                            T.evaluate(T.call_llvm_intrin("void", "llvm.x86.tileloadd64", T.int8(6),
                                                          T.address_of(wb[g_a, i, ch, 0, 0]), T.int64(CHUNK)))
                            T.evaluate(T.call_llvm_intrin("void", "llvm.x86.tileloadd64", T.int8(7),
                                                          T.address_of(wb[g_b, i, ch, 0, 0]), T.int64(CHUNK)))
                            T.evaluate(T.call_llvm_intrin("void", "llvm.x86.tdpbusd", T.int8(0), T.int8(4), T.int8(6)))
                            T.evaluate(T.call_llvm_intrin("void", "llvm.x86.tdpbusd", T.int8(1), T.int8(4), T.int8(7)))
                            T.evaluate(T.call_llvm_intrin("void", "llvm.x86.tdpbusd", T.int8(2), T.int8(5), T.int8(6)))
                            T.evaluate(T.call_llvm_intrin("void", "llvm.x86.tdpbusd", T.int8(3), T.int8(5), T.int8(7)))
                    for t in T.unroll(4):
                        T.evaluate(T.call_llvm_intrin("void", "llvm.x86.tilestored64", T.int8(t),
                                                      T.address_of(acc[t, 0, 0]), T.int64(ROWS * 4)))
                    for t in range(4):
                        g = T.bind(T.if_then_else(t % 2 == 0, g_a, g_b))
                        op0 = T.bind(T.if_then_else(t < 2, op_a, op_b))
                        for v in range(ROWS):
                            if g * ROWS + v < CO:
                                for r in T.vectorized(R):
                                    if WIDTH:
                                        out[n, g * ROWS + v, oq * WO + op0 + r] = T.Cast(
                                            "float32", acc[t, r, v] - correction[g * ROWS + v]) * (scales[g * ROWS + v] * scale_x)
                                    else:
                                        out[n, g * ROWS + v, (op0 + r) * WO + oq] = T.Cast(
                                            "float32", acc[t, r, v] - correction[g * ROWS + v]) * (scales[g * ROWS + v] * scale_x)
            T.evaluate(T.call_llvm_intrin("void", "llvm.x86.tilerelease"))

    func, name = _without_static_sizes(kernel, shape, f"direct_conv_int8_u8_{shape.tag}_o{CO}_amx_{plan.along[0]}")
    return func, name, amx_conv_layout(shape, weight)
