"""Convolutions as im2col + the project's matmul kernels (TVM 0.27, TVMScript ``tirx``).

A ``relax.nn.conv2d`` (or ``conv1d``: height 1) over a weight ``W [Cout, Cin, kh, kw]`` with
static shapes, ``groups == 1`` and NCHW / OIHW layouts becomes, for ``x [N, Cin, H, W]``::

    cols[(n, oh, ow), (c, i, j)] = x[n, c, oh·sh − pt + i·dh, ow·sw − pl + j·dw]   (0 outside x)
    y[(n, oh, ow), co] = Σ_(c,i,j) cols[(n, oh, ow), (c, i, j)] · W[co, c, i, j]  (matmul_kernel)
    out[n, co, oh, ow] = y[(n, oh, ow), co]

``cols`` is ``[N·Hout·Wout, Cin·kh·kw]`` row-major over ``(c, i, j)``: exactly the matrix view
``[Cout, Cin·kh·kw]`` of the packed weight (:func:`compressor.packing.matrix_shape`), so the
matmul kernel takes the packed weight (dense, CSR or BSR; fp32 or int8) unchanged.

Four TIR kernels of ours, all parallel over rows:

1. :func:`pad_kernel` copies ``x`` once into a zero-padded ``xp`` (so that im2col needs no
   bounds test);
2. per chunk of about :data:`CHUNK_BYTES` of ``cols`` (:func:`chunks`): :func:`im2col_kernel`
   writes the chunk's rows (each run of ``kw`` values one vector copy when ``dw == 1``), then
   the matmul kernel multiplies them while they are still in the cache — ``cols`` as a whole
   is never stored (121 MB for DS2's second convolution: writing it alone would take as long as
   the matmul), and :func:`scatter_kernel` writes the chunk's ``y`` rows transposed into the
   NCHW output (the first chunk allocates it, the others write into it with
   ``call_tir_inplace``).

The matmul of a chunk: a dense weight takes the static-batch kernel of the chunk's rows (passes
of 16 rows), a sparse one over more than :data:`~exporters.tvm_kernels.ROW_TILE` rows the
kernel of any row count (``batch=None``, tiles of 16 rows): the static sparse kernels vectorize
over the whole batch, which takes about a minute to compile at 784 rows.  Each kernel is built
once per row count (two at most per convolution) and the weight's constants are shared by the
chunks (a sparse weight's kernel of any row count is one function for every chunk).

Symbolic input height / width (``export_tvm(..., dynamic_axes=...)``; :func:`conv_shape` with
``symbolic=True``; batch, channels and weight static): :func:`emit_conv_dyn`.  The pad, im2col
and scatter kernels (``*_dyn``) take the run-time sizes as int64 scalars and compute every extent
from them with the formulas of :class:`ConvShape` (static sizes stay constants in their code);
the matmul is the kernel of any row count for every format.  The pieces are the same
:func:`chunk_rows` rows, but their number is a run-time value: the first piece is emitted in the
calling function (its scatter allocates the output), the others run in three private Relax
functions that split the remaining rows in halves until one piece is left (:func:`_pieces`;
``log2(pieces)`` calls deep: thousands of pieces called one inside the other overflow the VM's
stack).  Measured, ds2-mini (hidden 256) at 120 frames, one thread, whole library (median of 5):
14.2 ms dense fp32 and 11.4 ms 90 % int8, against 13.6 and 11.0 ms compiled for 120 frames
(TVM's default convolution: 250 ms); one piece of all the rows instead: 15.7 and 11.8 ms,
and at 20,000 frames 16.8 s and 5.8 GB of memory against 2.8 s and 0.8 GB in pieces.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np
import tvm
from tvm import relax
from tvm.script import tirx as T
from tvm.sym import Analyzer

from compressor.packing import PackedWeight

from .tvm_kernels import ROW_TILE, KernelCall, matmul_kernel

#: The Relax convolution operators lowered here, with their (data, kernel) layouts.
CONV_LAYOUTS = {"relax.nn.conv2d": ("NCHW", "OIHW"), "relax.nn.conv1d": ("NCW", "OIW")}
#: Longest ``kw`` run that :func:`im2col_kernel` copies as one vector (``dw == 1``; else value by value).
WIDE_KW = 64
#: Bytes of ``cols`` built and multiplied at a time (the rows of a piece: a multiple of 16): a
#: piece is still in a 2 MiB L2 with the weight's column panel when the matmul reads it.
CHUNK_BYTES = 1 << 20


@dataclass(frozen=True)
class ConvShape:
    """A convolution's geometry (a 1-D convolution is a 2-D one of height 1, ``kh = 1``).  The
    input height and width may be symbolic (int64 ``PrimExpr``; :func:`conv_shape` with
    ``symbolic=True``): the derived sizes are then ``PrimExpr`` too."""

    batch: int
    channels: int
    height: int | tvm.ir.Expr
    width: int | tvm.ir.Expr
    out_channels: int
    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int, int, int]  # top, left, bottom, right
    dilation: tuple[int, int]
    one_d: bool = False

    @property
    def out_height(self) -> int:
        return (self.height + self.padding[0] + self.padding[2] - self.dilation[0] * (self.kernel[0] - 1) - 1) \
            // self.stride[0] + 1

    @property
    def out_width(self) -> int:
        return (self.width + self.padding[1] + self.padding[3] - self.dilation[1] * (self.kernel[1] - 1) - 1) \
            // self.stride[1] + 1

    @property
    def symbolic(self) -> bool:
        """Whether the input height or width is a run-time value."""
        return not (isinstance(self.height, int) and isinstance(self.width, int))

    @property
    def rows(self) -> int:
        """Rows of ``cols`` and of the matmul: ``N·Hout·Wout``."""
        return self.batch * self.out_height * self.out_width

    @property
    def cols(self) -> int:
        """Columns of ``cols``: ``Cin·kh·kw``."""
        return self.channels * self.kernel[0] * self.kernel[1]

    @property
    def weight_shape(self) -> tuple[int, ...]:
        if self.one_d:
            return (self.out_channels, self.channels, self.kernel[1])
        return (self.out_channels, self.channels, *self.kernel)

    @property
    def out_shape(self) -> tuple[int, ...]:
        if self.one_d:
            return (self.batch, self.out_channels, self.out_width)
        return (self.batch, self.out_channels, self.out_height, self.out_width)

    @property
    def tag(self) -> str:
        """The geometry in a kernel name."""
        height = self.height if isinstance(self.height, int) else "dyn"
        width = self.width if isinstance(self.width, int) else "dyn"
        return (f"n{self.batch}_c{self.channels}_h{height}_w{width}_k{self.kernel[0]}x{self.kernel[1]}"
                f"_s{self.stride[0]}x{self.stride[1]}_p{'x'.join(map(str, self.padding))}"
                f"_d{self.dilation[0]}x{self.dilation[1]}")


def _ints(values) -> list[int]:
    return [int(v) for v in values]


def _static(expr: relax.Expr) -> list[int] | None:
    shape = expr.ty.shape
    if shape is None or not all(isinstance(v, tvm.tirx.IntImm) for v in shape.values):
        return None
    return [int(v) for v in shape.values]


def _dims(expr: relax.Expr) -> list[int | tvm.ir.Expr] | None:
    """The shape with static dimensions as ints and symbolic ones as PrimExprs, or None."""
    shape = expr.ty.shape
    if shape is None:
        return None
    return [int(v) if isinstance(v, tvm.tirx.IntImm) else v for v in shape.values]


def _same_dims(a: Sequence[int | tvm.ir.Expr], b: Sequence[int | tvm.ir.Expr] | None) -> bool:
    if b is None or len(a) != len(b):
        return False
    if all(isinstance(v, int) for v in (*a, *b)):
        return list(a) == list(b)
    analyzer = Analyzer()
    return all(analyzer.can_prove_equal(tvm.tirx.IntImm("int64", x) if isinstance(x, int) else x,
                                        tvm.tirx.IntImm("int64", y) if isinstance(y, int) else y) for x, y in zip(a, b))


def conv_shape(call: relax.Call, symbolic: bool = False) -> ConvShape | None:
    """The geometry of a ``conv1d`` / ``conv2d`` call this module lowers, or None (other ops,
    groups > 1, other layouts, non-float32 data, symbolic shapes).  With ``symbolic`` the input
    height and width may be run-time values (the batch, channels and weight stay static)."""
    if not isinstance(call.op, tvm.ir.Op) or call.op.name not in CONV_LAYOUTS:
        return None
    attrs = call.attrs
    data_layout, kernel_layout = CONV_LAYOUTS[call.op.name]
    if (int(attrs.groups) != 1 or attrs.data_layout != data_layout or attrs.kernel_layout != kernel_layout
            or (attrs.out_layout or data_layout) != data_layout):
        return None
    x, w = call.args
    x_shape, w_shape = (_dims(x) if symbolic else _static(x)), _static(w)
    if x_shape is None or w_shape is None or x.ty.dtype != "float32" or call.ty.dtype != "float32":
        return None
    if len(x_shape) < 2 or not all(isinstance(v, int) for v in x_shape[:2]):
        return None  # batch and channels static
    stride, padding, dilation = _ints(attrs.strides), _ints(attrs.padding), _ints(attrs.dilation)
    if call.op.name == "relax.nn.conv1d":
        (n, c, width), (cout, _, kw) = x_shape, w_shape
        left, right = padding if len(padding) == 2 else padding * 2
        shape = ConvShape(n, c, 1, width, cout, (1, kw), (1, stride[0]), (0, left, 0, right), (1, dilation[0]), True)
    else:
        (n, c, height, width), (cout, _, kh, kw) = x_shape, w_shape
        if len(padding) == 2:
            padding = padding * 2
        shape = ConvShape(n, c, height, width, cout, (kh, kw), tuple(stride), tuple(padding), tuple(dilation))
    if list(shape.weight_shape) != w_shape:
        return None
    if not (_same_dims(shape.out_shape, _dims(call)) if symbolic else list(shape.out_shape) == _static(call)):
        return None
    return shape


def _wide_lanes(kw: int) -> int:
    """Lanes of the store that writes one run of ``kw`` values: the power of two at or above it."""
    return 1 << (kw - 1).bit_length()


def _padded_extent(shape: ConvShape) -> tuple[int, int, int]:
    """``(Hp, Wp, VW)``: the rows and columns of the zero-padded input that the windows read and
    the lanes of one run's vector copy (1 for ``dw > 1``)."""
    (KH, KW), (SH, SW), (DH, DW) = shape.kernel, shape.stride, shape.dilation
    hp = (shape.out_height - 1) * SH + (KH - 1) * DH + 1
    wp = (shape.out_width - 1) * SW + (KW - 1) * DW + 1
    return hp, wp, (_wide_lanes(KW) if DW == 1 and KW <= WIDE_KW else 1)


def pad_kernel(shape: ConvShape) -> tuple[tvm.tirx.PrimFunc, str]:
    """``xp[N·Cin, Hp, Wp + VW]``: ``x[N·Cin, H, W]`` zero-padded (see :func:`_padded_extent`;
    the ``VW`` extra zero columns keep the widest load of the last window inside its row).
    The function takes ``x``, then ``xp``; parallel over the rows of ``xp``."""
    NC, H, W = shape.batch * shape.channels, shape.height, shape.width
    PT, PL = shape.padding[:2]
    HP, WP, VW = _padded_extent(shape)
    WX = WP + VW
    LEFT = min(PL, WP)  # zero columns, copied columns, zero columns of a row of xp
    COPY = max(0, min(W, WP - PL))
    RIGHT = WX - LEFT - COPY

    @T.prim_func(s_tir=True)
    def kernel(x: T.Buffer((NC, H, W), "float32"), xp: T.Buffer((NC, HP, WX), "float32")):
        T.func_attr({"tirx.noalias": True})
        # one opaque block: Relax analyses of one-input functions (reshape detection) expect a block body
        with T.sblock("pad"):
            for p in T.parallel(NC * HP):
                if PT <= p % HP and p % HP < PT + H:
                    for w in range(LEFT):
                        xp[p // HP, p % HP, w] = T.float32(0)
                    for w in range(COPY):
                        xp[p // HP, p % HP, LEFT + w] = x[p // HP, p % HP - PT, w]
                    for w in range(RIGHT):
                        xp[p // HP, p % HP, LEFT + COPY + w] = T.float32(0)
                else:
                    for w in range(WX):
                        xp[p // HP, p % HP, w] = T.float32(0)

    name = f"conv_pad_{shape.tag}"
    return kernel.with_attr("global_symbol", name), name


def im2col_kernel(shape: ConvShape, rows: int) -> tuple[tvm.tirx.PrimFunc, str]:
    """Rows ``r0 … r0 + rows − 1`` of ``cols[N·Hout·Wout, Cin·kh·kw]`` from the padded input of
    :func:`pad_kernel`: the function (taking ``xp``, then the int64 ``r0``, then
    ``cols[rows, K]``) and its name.  Parallel over the rows.

    With ``dw == 1`` a run of ``kw`` values of a row is one vector load and store of ``VW`` ≥
    ``kw`` lanes (the next power of two), whose ``VW − kw`` extra values the following runs of the
    row overwrite; the runs that would spill past the end of the row (into another thread's row)
    are stored exactly.  With ``dw > 1`` the runs are strided gathers, written value by value."""
    NC, C = shape.batch * shape.channels, shape.channels
    (KH, KW), (SH, SW), (DH, DW) = shape.kernel, shape.stride, shape.dilation
    HO, WO, K = shape.out_height, shape.out_width, shape.cols
    HP, WP, VW = _padded_extent(shape)
    WX = WP + VW
    R = rows
    wide = VW > 1

    @T.prim_func(s_tir=True)
    def kernel(xp: T.Buffer((NC, HP, WX), "float32"), r0: T.int64, cols: T.Buffer((R, K), "float32")):
        T.func_attr({"tirx.noalias": True})
        with T.sblock("im2col"):
            for q in T.parallel(R):
                r = T.bind(T.Cast("int32", r0) + q)
                plane = T.bind(r // (HO * WO) * C)  # n·C
                top = T.bind(r // WO % HO * SH)  # oh·sh
                left = T.bind(r % WO * SW)  # ow·sw
                for c in range(C):
                    for i in range(KH):
                        if wide:
                            if (c * KH + i) * KW + VW <= K:
                                for j in T.vectorized(VW):
                                    cols[q, (c * KH + i) * KW + j] = xp[plane + c, top + i * DH, left + j]
                            else:
                                for j in range(KW):
                                    cols[q, (c * KH + i) * KW + j] = xp[plane + c, top + i * DH, left + j]
                        else:
                            for j in range(KW):
                                cols[q, (c * KH + i) * KW + j] = xp[plane + c, top + i * DH, left + j * DW]

    name = f"im2col_{shape.tag}_r{rows}"
    return kernel.with_attr("global_symbol", name), name


def scatter_kernel(shape: ConvShape, rows: int, inplace: bool) -> tuple[tvm.tirx.PrimFunc, str]:
    """``out[n, co, oh·Wout + ow] = y[q, co]`` for the rows ``r = r0 + q = (n, oh, ow)`` of one
    chunk: the matmul's ``y[rows, Cout]`` transposed into the convolution's output
    ``out[N, Cout, Hout·Wout]``.  The function takes ``(y, r0, out)``, or with ``inplace``
    ``(out, y, r0)`` and writes into the ``out`` it is given (``call_tir_inplace``: the chunks
    fill one output).  Parallel over the rows."""
    N, CO, P = shape.batch, shape.out_channels, shape.out_height * shape.out_width
    R = rows

    @T.prim_func(s_tir=True)
    def first(y: T.Buffer((R, CO), "float32"), r0: T.int64, out: T.Buffer((N, CO, P), "float32")):
        T.func_attr({"tirx.noalias": True})
        with T.sblock("scatter"):
            for q in T.parallel(R):
                r = T.bind(T.Cast("int32", r0) + q)
                for co in range(CO):
                    out[r // P, co, r % P] = y[q, co]

    @T.prim_func(s_tir=True)
    def into(out: T.Buffer((N, CO, P), "float32"), y: T.Buffer((R, CO), "float32"), r0: T.int64):
        T.func_attr({"tirx.noalias": True})
        with T.sblock("scatter"):
            for q in T.parallel(R):
                r = T.bind(T.Cast("int32", r0) + q)
                for co in range(CO):
                    out[r // P, co, r % P] = y[q, co]

    name = f"conv_scatter{'_into' if inplace else ''}_n{N}_c{CO}_p{P}_r{R}"
    return (into if inplace else first).with_attr("global_symbol", name), name


def chunks(shape: ConvShape) -> list[tuple[int, int]]:
    """``(first row, rows)`` of the pieces the im2col matrix is built and multiplied in: about
    :data:`CHUNK_BYTES` of ``cols`` each (a multiple of 16 rows), so that a piece is still in
    the cache when the matmul reads it."""
    step = chunk_rows(shape)
    return [(start, min(step, shape.rows - start)) for start in range(0, shape.rows, step)]


def chunk_rows(shape: ConvShape) -> int:
    """Rows of a piece: about :data:`CHUNK_BYTES` of ``cols``, a multiple of 16."""
    return max(16, CHUNK_BYTES // (4 * shape.cols) // 16 * 16)


def conv_matmul_kernel(weight: PackedWeight, shape: ConvShape, rows: int) -> KernelCall:
    """The matmul kernel of a chunk of ``rows`` im2col rows: static for a dense weight or a
    convolution of few rows, else (sparse) of any row count, the same for every chunk."""
    sparse_many = weight.format != "dense" and shape.rows > ROW_TILE
    return matmul_kernel(weight, None if sparse_many else rows)


def _same_arrays(a: tuple[np.ndarray, ...], b: tuple[np.ndarray, ...]) -> bool:
    return len(a) == len(b) and all(x.dtype == y.dtype and np.array_equal(x, y) for x, y in zip(a, b))


AddFunc = Callable[[tvm.tirx.PrimFunc, str], relax.GlobalVar]


def emit_conv(builder: relax.BlockBuilder, add_func: AddFunc, x: relax.Expr, shape: ConvShape,
              weight: PackedWeight) -> tuple[relax.Expr, list[tuple[KernelCall, int]]]:
    """Emit the padding, then per chunk (:func:`chunks`) im2col, the matmul and the scatter of
    its rows into the output (the first chunk allocates it, the others write into it in place),
    and the reshape to ``[N, Cout, (Hout,) Wout]``.  ``add_func(func, name)`` adds a PrimFunc to
    the module once per name.  Returns the last expression (not emitted) and the matmul calls
    with their row counts."""
    n_out, K = shape.out_channels, shape.cols
    flat = builder.emit(relax.op.reshape(x, (shape.batch * shape.channels, shape.height, shape.width)))
    hp, wp, vw = _padded_extent(shape)
    pad = add_func(*pad_kernel(shape))
    xp = builder.emit(relax.call_tir(pad, [flat], relax.TensorType((flat.ty.shape[0], hp, wp + vw), "float32")))
    out_ty = relax.TensorType((shape.batch, n_out, shape.out_height * shape.out_width), "float32")
    kernels: dict[tuple[str, int, bool], relax.GlobalVar] = {}  # built (parsed) once per chunk row count
    matmuls: dict[int, KernelCall] = {}
    constants: dict[int, list[relax.Constant]] = {}  # per row count; one object per array where equal

    def func(kind: str, rows: int, inplace: bool = False) -> relax.GlobalVar:
        if (kind, rows, inplace) not in kernels:
            if kind == "im2col":
                kernels[kind, rows, inplace] = add_func(*im2col_kernel(shape, rows))
            elif kind == "scatter":
                kernels[kind, rows, inplace] = add_func(*scatter_kernel(shape, rows, inplace))
            else:
                call = matmuls[rows] = conv_matmul_kernel(weight, shape, rows)
                kernels[kind, rows, inplace] = add_func(call.func, call.name)
                shared = next((r for r in constants if _same_arrays(matmuls[r].constants, call.constants)), None)
                constants[rows] = constants[shared] if shared is not None else [relax.const(c) for c in call.constants]
        return kernels[kind, rows, inplace]

    calls, out = [], None
    for start, rows in chunks(shape):
        first = relax.prim_value(start, "int64")
        cols = builder.emit(relax.call_tir(func("im2col", rows), [xp, first], relax.TensorType((rows, K), "float32")))
        matmul = func("matmul", rows)
        y = builder.emit(relax.call_tir(matmul, [cols, *constants[rows]], relax.TensorType((rows, n_out), "float32")))
        calls.append((matmuls[rows], rows))
        if out is None:
            out = builder.emit(relax.call_tir(func("scatter", rows), [y, first], out_ty))
        else:  # out is used by nothing else: the chunks fill it one after the other
            out = builder.emit(relax.call_tir_inplace(func("scatter", rows, True), [out, y, first], 0, out_ty))
    return relax.op.reshape(out, shape.out_shape), calls


# ------------------------------------------------------------------ symbolic height / width


def _sized(shape: ConvShape, height: tvm.ir.Expr, width: tvm.ir.Expr) -> ConvShape:
    """``shape`` with its symbolic input height / width replaced by a kernel's own size parameters."""
    return replace(shape, height=shape.height if isinstance(shape.height, int) else height,
                   width=shape.width if isinstance(shape.width, int) else width)


def _symbolic_sizes(shape: ConvShape) -> list[tvm.ir.Expr]:
    """The symbolic ones of the input height and width (in this order)."""
    return [v for v in (shape.height, shape.width) if not isinstance(v, int)]


def _without_static_sizes(func: tvm.tirx.PrimFunc, shape: ConvShape, name: str) -> tuple[tvm.tirx.PrimFunc, str]:
    """``func`` (with int64 parameters ``H`` and ``W``) without the parameters of static sizes,
    whose values :func:`_sized` already made constants in its code; named ``name``."""
    params = {param.name: param for param in func.params if isinstance(param, tvm.tirx.Var)}
    static = {params[key]: tvm.tirx.IntImm("int64", value)
              for key, value in (("H", shape.height), ("W", shape.width)) if isinstance(value, int)}
    func = func.specialize(static) if static else func
    return func.with_attr("global_symbol", name), name


def pad_kernel_dyn(shape: ConvShape) -> tuple[tvm.tirx.PrimFunc, str]:
    """:func:`pad_kernel` for a symbolic input height / width: takes ``(x, H, W, xp)`` (``H``,
    ``W`` only where symbolic)."""
    NC = shape.batch * shape.channels
    PT, PL = shape.padding[:2]

    def dim(H, W, index):
        sized = _sized(shape, H, W)
        hp, wp, vw = _padded_extent(sized)
        return (sized.height, sized.width, hp, wp, wp + vw)[index]

    @T.prim_func(s_tir=True)
    def kernel(x_h: T.handle, H: T.int64, W: T.int64, xp_h: T.handle):
        T.func_attr({"tirx.noalias": True})
        x = T.match_buffer(x_h, (NC, dim(H, W, 0), dim(H, W, 1)), "float32")
        xp = T.match_buffer(xp_h, (NC, dim(H, W, 2), dim(H, W, 4)), "float32")
        with T.sblock("pad"):
            h = T.bind(T.Cast("int32", dim(H, W, 0)))
            w = T.bind(T.Cast("int32", dim(H, W, 1)))
            hp = T.bind(T.Cast("int32", dim(H, W, 2)))
            wp = T.bind(T.Cast("int32", dim(H, W, 3)))
            wx = T.bind(T.Cast("int32", dim(H, W, 4)))
            left = T.bind(T.min(PL, wp))  # zero columns, copied columns, zero columns of a row of xp
            copy = T.bind(T.max(0, T.min(w, wp - PL)))
            for p in T.parallel(NC * hp):
                if PT <= p % hp and p % hp < PT + h:
                    for j in range(left):
                        xp[p // hp, p % hp, j] = T.float32(0)
                    for j in range(copy):
                        xp[p // hp, p % hp, left + j] = x[p // hp, p % hp - PT, j]
                    for j in range(wx - left - copy):
                        xp[p // hp, p % hp, left + copy + j] = T.float32(0)
                else:
                    for j in range(wx):
                        xp[p // hp, p % hp, j] = T.float32(0)

    return _without_static_sizes(kernel, shape, f"conv_pad_dyn_{shape.tag}")


def im2col_kernel_dyn(shape: ConvShape) -> tuple[tvm.tirx.PrimFunc, str]:
    """:func:`im2col_kernel` for a symbolic input height / width and a run-time row count:
    takes ``(xp, r0, H, W, cols[R, K])`` and writes rows ``r0 … r0 + R − 1``."""
    NC, C = shape.batch * shape.channels, shape.channels
    (KH, KW), (SH, SW), (DH, DW) = shape.kernel, shape.stride, shape.dilation
    K = shape.cols
    VW = _padded_extent(shape)[2]
    wide = VW > 1

    def dim(H, W, index):
        sized = _sized(shape, H, W)
        hp, wp, vw = _padded_extent(sized)
        return (hp, wp + vw, sized.out_height, sized.out_width)[index]

    @T.prim_func(s_tir=True)
    def kernel(xp_h: T.handle, r0: T.int64, H: T.int64, W: T.int64, cols_h: T.handle):
        T.func_attr({"tirx.noalias": True})
        R = T.int64()
        xp = T.match_buffer(xp_h, (NC, dim(H, W, 0), dim(H, W, 1)), "float32")
        cols = T.match_buffer(cols_h, (R, K), "float32")
        with T.sblock("im2col"):
            ho = T.bind(T.Cast("int32", dim(H, W, 2)))
            wo = T.bind(T.Cast("int32", dim(H, W, 3)))
            for q in T.parallel(T.Cast("int32", R)):
                r = T.bind(T.Cast("int32", r0) + q)
                plane = T.bind(r // (ho * wo) * C)  # n·C
                top = T.bind(r // wo % ho * SH)  # oh·sh
                left = T.bind(r % wo * SW)  # ow·sw
                for c in range(C):
                    for i in range(KH):
                        if wide:
                            if (c * KH + i) * KW + VW <= K:
                                for j in T.vectorized(VW):
                                    cols[q, (c * KH + i) * KW + j] = xp[plane + c, top + i * DH, left + j]
                            else:
                                for j in range(KW):
                                    cols[q, (c * KH + i) * KW + j] = xp[plane + c, top + i * DH, left + j]
                        else:
                            for j in range(KW):
                                cols[q, (c * KH + i) * KW + j] = xp[plane + c, top + i * DH, left + j * DW]

    return _without_static_sizes(kernel, shape, f"im2col_dyn_{shape.tag}")


def scatter_kernel_dyn(shape: ConvShape, inplace: bool) -> tuple[tvm.tirx.PrimFunc, str]:
    """:func:`scatter_kernel` for a symbolic input height / width and a run-time row count:
    ``(y[R, Cout], r0, H, W, out)``, or with ``inplace`` ``(out, y, r0, H, W)``;
    ``out[N, Cout, Hout·Wout]``."""
    N, CO = shape.batch, shape.out_channels

    def positions(H, W):
        sized = _sized(shape, H, W)
        return sized.out_height * sized.out_width

    @T.prim_func(s_tir=True)
    def first(y_h: T.handle, r0: T.int64, H: T.int64, W: T.int64, out_h: T.handle):
        T.func_attr({"tirx.noalias": True})
        R = T.int64()
        y = T.match_buffer(y_h, (R, CO), "float32")
        out = T.match_buffer(out_h, (N, CO, positions(H, W)), "float32")
        with T.sblock("scatter"):
            p = T.bind(T.Cast("int32", positions(H, W)))
            for q in T.parallel(T.Cast("int32", R)):
                r = T.bind(T.Cast("int32", r0) + q)
                for co in range(CO):
                    out[r // p, co, r % p] = y[q, co]

    @T.prim_func(s_tir=True)
    def into(out_h: T.handle, y_h: T.handle, r0: T.int64, H: T.int64, W: T.int64):
        T.func_attr({"tirx.noalias": True})
        R = T.int64()
        out = T.match_buffer(out_h, (N, CO, positions(H, W)), "float32")
        y = T.match_buffer(y_h, (R, CO), "float32")
        with T.sblock("scatter"):
            p = T.bind(T.Cast("int32", positions(H, W)))
            for q in T.parallel(T.Cast("int32", R)):
                r = T.bind(T.Cast("int32", r0) + q)
                for co in range(CO):
                    out[r // p, co, r % p] = y[q, co]

    name = f"conv_scatter_dyn{'_into' if inplace else ''}_{shape.tag}_o{CO}"
    return _without_static_sizes(into if inplace else first, shape, name)


def emit_conv_dyn(builder: relax.BlockBuilder, add_func: AddFunc, x: relax.Expr, shape: ConvShape,
                  weight: PackedWeight, out_ty: relax.TensorType, name: str) -> tuple[relax.Expr, KernelCall]:
    """Emit a convolution of symbolic input height / width (``shape`` in Relax expressions of
    ``x``'s shape; ``out_ty`` the convolution call's type, whose sizes the output takes): the
    padding, the first piece of at most :func:`chunk_rows` rows (its scatter allocates the
    output), then the call of the Relax functions that do the other pieces (:func:`_pieces`),
    all with the matmul kernel of any row count, and the reshape to ``out_ty``.  ``name``
    prefixes those functions' names (unique per convolution).  Returns the last expression (not
    emitted) and the matmul call."""
    n, n_out, K = shape.batch, shape.out_channels, shape.cols
    step = chunk_rows(shape)
    sizes = [relax.prim_value(v) for v in _symbolic_sizes(shape)]
    flat = builder.emit(relax.op.reshape(x, (n * shape.channels, shape.height, shape.width)))
    hp, wp, vw = _padded_extent(shape)
    xp = builder.emit(relax.call_tir(add_func(*pad_kernel_dyn(shape)), [flat, *sizes],
                                     relax.TensorType((n * shape.channels, hp, wp + vw), "float32")))
    out_dims = list(out_ty.shape.values)
    ho, wo = (1, out_dims[2]) if shape.one_d else (out_dims[2], out_dims[3])
    rows = n * ho * wo
    matmul = matmul_kernel(weight, None)
    constants = [relax.const(c) for c in matmul.constants]
    first_rows = tvm.tirx.min(tvm.tirx.IntImm("int64", step), rows)
    zero = relax.prim_value(tvm.tirx.IntImm("int64", 0))
    cols = builder.emit(relax.call_tir(add_func(*im2col_kernel_dyn(shape)), [xp, zero, *sizes],
                                       relax.TensorType((first_rows, K), "float32")))
    y = builder.emit(relax.call_tir(add_func(matmul.func, matmul.name), [cols, *constants],
                                    relax.TensorType((first_rows, n_out), "float32")))
    out = builder.emit(relax.call_tir(add_func(*scatter_kernel_dyn(shape, False)), [y, zero, *sizes],
                                      relax.TensorType((n, n_out, ho * wo), "float32")))
    pieces = _pieces(builder, add_func, shape, matmul, [c.ty for c in constants], name)
    out = builder.emit(relax.Call(pieces, [relax.ShapeExpr(_symbolic_sizes(shape)), relax.ShapeExpr([step, rows]),
                                           xp, out, *constants]))
    return relax.op.reshape(out, out_ty.shape), matmul


def _pieces(builder: relax.BlockBuilder, add_func: AddFunc, shape: ConvShape, matmul: KernelCall,
            constant_types: list[relax.TensorType], name: str) -> relax.GlobalVar:
    """Three private Relax functions of ``(sizes, rows, xp, out, *constants)`` that compute rows
    ``lo … hi − 1`` of a convolution into ``out`` (``sizes``: the shape of the symbolic input
    sizes; ``rows``: the shape ``[lo, hi]``; ``lo`` a multiple of :func:`chunk_rows`):
    ``{name}_rows`` calls ``{name}_piece`` when ``hi − lo`` ≤ :func:`chunk_rows`, which builds,
    multiplies and scatters (in place) those rows, else ``{name}_halves``, which calls
    ``{name}_rows`` on the first half of the pieces, then on the rest.  Divide and conquer: the
    calls nest ``log2(pieces)`` deep (one after the other, thousands of pieces overflow the
    VM's stack).  Returns the global variable of ``{name}_rows``."""
    n, n_out, nc, K = shape.batch, shape.out_channels, shape.batch * shape.channels, shape.cols
    step = chunk_rows(shape)
    im2col = add_func(*im2col_kernel_dyn(shape))
    kernel = add_func(matmul.func, matmul.name)
    scatter = add_func(*scatter_kernel_dyn(shape, True))

    def signature(tag: str):
        """Fresh parameters of a function, with their symbolic sizes: ``(params, sizes, lo, hi, p)``."""
        sizes = [tvm.tirx.Var(f"{s}_{tag}", "int64") for s, v in (("h", shape.height), ("w", shape.width))
                 if not isinstance(v, int)]
        lo, hi, a, b, p = (tvm.tirx.Var(f"{s}_{tag}", "int64") for s in ("lo", "hi", "a", "b", "p"))
        params = [relax.Var("sizes", relax.ShapeType(sizes)), relax.Var("rows", relax.ShapeType([lo, hi])),
                  relax.Var("xp", relax.TensorType((nc, a, b), "float32")),
                  relax.Var("out", relax.TensorType((n, n_out, p), "float32")),
                  *(relax.Var(f"c{i}", ty) for i, ty in enumerate(constant_types))]
        return params, sizes, lo, hi, p

    def out_type(p: tvm.ir.Expr) -> relax.TensorType:
        return relax.TensorType((n, n_out, p), "float32")

    gvs = {}
    for part in ("rows", "piece", "halves"):  # declared (as stubs returning out) before the bodies that call each other
        params, _, _, _, p = signature(part)
        stub = relax.Function(params, params[3], out_type(p), attrs=tvm.ir.DictAttrs({"conv_stub": f"{name}_{part}"}))
        gvs[part] = builder.add_func(stub, f"{name}_{part}")

    local = relax.BlockBuilder()
    params, sizes, lo, hi, p = signature("rows")
    with local.function(f"{name}_rows", params, private=True):
        result = local.emit(relax.If(relax.prim_value(hi - lo <= step), relax.Call(gvs["piece"], params),
                                     relax.Call(gvs["halves"], params)))
        local.emit_func_output(result)

    params, sizes, lo, hi, p = signature("piece")
    with local.function(f"{name}_piece", params, private=True):
        xp, out, constants = params[2], params[3], params[4:]
        rows = tvm.tirx.max(hi - lo, tvm.tirx.IntImm("int64", 0))
        args = [relax.prim_value(lo), *(relax.prim_value(v) for v in sizes)]
        cols = local.emit(relax.call_tir(im2col, [xp, *args], relax.TensorType((rows, K), "float32")))
        y = local.emit(relax.call_tir(kernel, [cols, *constants], relax.TensorType((rows, n_out), "float32")))
        local.emit_func_output(local.emit(relax.call_tir_inplace(scatter, [out, y, *args], 0, out_type(p))))

    params, sizes, lo, hi, p = signature("halves")
    with local.function(f"{name}_halves", params, private=True):
        mid = lo + (hi - lo + step - 1) // step // 2 * step
        rest = params[4:]
        out = local.emit(relax.Call(gvs["rows"], [params[0], relax.ShapeExpr([lo, mid]), params[2], params[3], *rest]))
        local.emit_func_output(local.emit(
            relax.Call(gvs["rows"], [params[0], relax.ShapeExpr([mid, hi]), params[2], out, *rest])))

    built = local.get()
    for part, gv in gvs.items():
        builder.update_func(gv, built[f"{name}_{part}"])
    return gvs["rows"]
