"""From a PyTorch model to a Relax module whose matmuls run the project's own TIR kernels.

1. :func:`~exporters.fold_batch_norm.fold_batch_norms` folds each BatchNorm that follows a
   convolution into it; :func:`~exporters.recurrence.scan_recurrent_layers` turns every
   GRU/LSTM/RNN into an input matmul plus one ``recurrence`` time-loop operator (parameter
   names unchanged).
2. ``torch.export`` + ``from_exported_program(keep_params_as_input=True)``: parameters stay
   named function inputs, so each weight is found by its PyTorch name.  The ``recurrence``
   operator is converted straight to ``call_tir`` of :func:`recurrence_kernel` over the packed
   ``W_hh``.
3. :class:`MatmulRewriter` replaces every ``matmul(x, permute_dims(W))`` whose ``W`` is a
   parameter by ``call_tir`` of :func:`~exporters.tvm_kernels.matmul_kernel` over the packed
   ``W`` (the ``PackedModel`` entry, or the dense weight in the scheduled dense kernel):
   ``x [..., K]`` is reshaped to ``[M, K]`` and the result back to ``[..., N]``.  Every
   ``conv1d`` / ``conv2d`` over a parameter with ``groups == 1`` becomes im2col + the same
   matmul kernels (:mod:`exporters.tvm_conv`); grouped convolutions stay with TVM.
4. The remaining parameters are bound as constants; unused ones are dropped.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import tvm
from torch import nn
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator
from tvm.relax.frontend.torch import from_exported_program

from compressor.packed_model import PackedModel
from compressor.packing import PackedWeight, pack

from .fold_batch_norm import fold_batch_norms
from .recurrence import scan_recurrent_layers
from .tvm_amx_conv import amx_conv_kernel, takes_amx_conv, target_has_amx
from .tvm_conv import ConvShape, conv_shape, emit_conv, emit_conv_dyn
from .tvm_direct_conv import emit_direct_conv, takes_direct
from .tvm_vnni_conv import takes_vnni_conv, vnni_conv_kernel
from .tvm_kernels import matmul_kernel
from .tvm_recurrence_kernel import recurrence_kernel
from .tvm_vnni_kernel import MIN_ROWS, takes_int8_activations, vnni_matmul_call

#: Up to this many rows a matmul gets a kernel specialized on its row count (batch-vectorized
#: matrix-vector products); more rows — the input projection of every time step at once — get the
#: kernel whose row count is a run-time value, so the library does not grow with the sequence.
MAX_STATIC_ROWS = 16


@dataclass
class KernelUse:
    """One replaced operator: the weight's name, the kernel and the bytes it moves per call (a
    convolution: its matmul kernel, and the bytes of all its chunks' matmul calls)."""

    weight: str
    kernel: str
    format: str
    dtype: str
    bytes_moved: int


@dataclass
class RelaxModel:
    """The rewritten Relax module and what was replaced."""

    mod: tvm.IRModule
    kernels: list[KernelUse] = field(default_factory=list)
    #: packed weights that no kernel took (grouped / depthwise convolutions, embeddings): compiled
    #: by TVM's default pipeline from their stored values, so they are dense in the library
    left_dense: list[str] = field(default_factory=list)

    @property
    def replaced(self) -> int:
        return len(self.kernels)


def _format_tag(weight: PackedWeight) -> str:
    if weight.format == "bsr":
        return f"bsr{weight.block.rows}x{weight.block.cols}"
    return weight.format


class _Weights:
    """Weights by PyTorch name: the packed ones from the ``PackedModel``, the rest dense fp32."""

    def __init__(self, module: nn.Module, packed: dict[str, PackedWeight]) -> None:
        self.state = {name: t.detach().cpu() for name, t in module.state_dict().items()}
        self.packed = packed

    def get(self, name: str) -> PackedWeight:
        if name in self.packed:
            weight = self.packed[name]
            if weight.format in ("dense", "csr", "bsr"):
                return weight
            return pack(weight.to_dense(), "csr", dtype=weight.dtype)
        return pack(self.state[name].float().numpy(), "dense")


def _static_shape(expr: relax.Expr) -> list[int] | None:
    shape = expr.ty.shape
    if shape is None or not all(isinstance(v, tvm.tirx.IntImm) for v in shape.values):
        return None
    return [int(v) for v in shape.values]


@mutator
class MatmulRewriter(PyExprMutator):
    """Replaces ``matmul(x, permute_dims(W_param))`` (possibly through ``broadcast_to``) and
    ``conv1d`` / ``conv2d`` over a parameter (groups 1) by our kernels."""

    def __init__(self, mod: tvm.IRModule, param_names: dict[str, str], weights: _Weights, uses: list[KernelUse],
                 kernels: dict[str, relax.GlobalVar], activations: str = "fp32", amx: bool = False) -> None:
        super().__init__(mod)
        self.param_names, self.weights, self.uses, self.kernels = param_names, weights, uses, kernels
        self.activations, self.amx = activations, amx
        self.bindings: dict[relax.Var, relax.Expr] = {}

    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        self.bindings[binding.var] = binding.value
        super().visit_var_binding_(binding)

    def _resolve(self, expr: relax.Expr) -> relax.Expr:
        while isinstance(expr, relax.Var) and expr in self.bindings:
            expr = self.bindings[expr]
        return expr

    def _weight_param(self, expr: relax.Expr) -> str | None:
        """The parameter name if ``expr`` is ``permute_dims(W)`` of a 2-D parameter (maybe broadcast)."""
        expr = self._resolve(expr)
        if isinstance(expr, relax.Call) and expr.op == tvm.ir.Op.get("relax.broadcast_to"):
            expr = self._resolve(expr.args[0])
        if not (isinstance(expr, relax.Call) and expr.op == tvm.ir.Op.get("relax.permute_dims")):
            return None
        source = expr.args[0]
        if not isinstance(source, relax.Var) or source.name not in self.param_names:
            return None
        axes = expr.attrs.axes
        if len(_static_shape(source) or []) != 2 or (axes is not None and [int(a) for a in axes] != [1, 0]):
            return None
        return self.param_names[source.name]

    def _add_kernel(self, func: tvm.tirx.PrimFunc, name: str) -> relax.GlobalVar:
        if name not in self.kernels:
            self.kernels[name] = self.builder_.add_func(func, name)
        return self.kernels[name]

    def _int8_conv(self, shape: ConvShape, weight: PackedWeight) -> Callable | None:
        """The int8-activation direct convolution for this one, if any: AMX tiles where the target
        has them, else AVX-512 VNNI."""
        if self.activations != "int8":
            return None
        if self.amx and takes_amx_conv(shape, weight):
            return amx_conv_kernel
        return vnni_conv_kernel if takes_vnni_conv(shape, weight) else None

    def _conv(self, call: relax.Call) -> relax.Expr:
        """``conv1d`` / ``conv2d`` over a parameter weight (groups 1) as im2col + our matmul
        kernel (:mod:`exporters.tvm_conv`) in cache-sized pieces; a symbolic input height / width
        (batch and channels static) through the matmul kernel of any row count and a run-time
        number of pieces.  Anything else is left to TVM."""
        shape = conv_shape(call, symbolic=True)
        weight_var = call.args[1]
        if shape is None or not isinstance(weight_var, relax.Var) or weight_var.name not in self.param_names:
            return call
        name = self.param_names[weight_var.name]
        weight = self.weights.get(name)
        if tuple(weight.shape) != shape.weight_shape:
            return call
        if takes_direct(weight):
            out, kernel_name, moved = emit_direct_conv(self.builder_, self._add_kernel, call.args[0], shape, weight,
                                                       call.ty, self._int8_conv(shape, weight))
            self.uses.append(KernelUse(name, kernel_name, _format_tag(weight), weight.dtype, moved))
            return out
        if shape.symbolic:  # bytes of one row, as for the matmuls of a run-time row count
            out, kernel = emit_conv_dyn(self.builder_, self._add_kernel, call.args[0], shape, weight, call.ty,
                                        "conv_pieces_" + re.sub(r"\W", "_", name))
            self.uses.append(KernelUse(name, kernel.name, _format_tag(weight), weight.dtype, kernel.bytes_moved_for(1)))
            return out
        out, calls = emit_conv(self.builder_, self._add_kernel, call.args[0], shape, weight)
        self.uses.append(KernelUse(name, calls[0][0].name, _format_tag(weight), weight.dtype,
                                   sum(kernel.bytes_moved_for(rows) for kernel, rows in calls)))
        return out

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        if isinstance(call.op, tvm.ir.Op) and call.op.name in ("relax.nn.conv1d", "relax.nn.conv2d"):
            return self._conv(call)
        if not (isinstance(call.op, tvm.ir.Op) and call.op.name == "relax.matmul"):
            return call
        name = self._weight_param(call.args[1])
        x = self._resolve(call.args[0])
        if isinstance(x, relax.Call) and x.op == tvm.ir.Op.get("relax.broadcast_to"):
            x = x.args[0]
        x_dims, out_dims = _dims(x), _dims(call)
        if name is None or x_dims is None or out_dims is None or x.ty.dtype != "float32":
            return call
        weight = self.weights.get(name)
        n, k = weight.matrix_shape
        if not (_is_int(x_dims[-1], k) and _is_int(out_dims[-1], n)):
            return call
        rows = _product(x_dims[:-1])
        static_rows = int(rows) if isinstance(rows, tvm.tirx.IntImm) else None
        batch = static_rows if static_rows is not None and static_rows <= MAX_STATIC_ROWS else None
        if self.activations == "int8" and takes_int8_activations(weight) and (batch is None or batch >= MIN_ROWS):
            kernel = vnni_matmul_call(weight, batch)
        else:
            kernel = matmul_kernel(weight, batch)
        if kernel.name not in self.kernels:
            self.kernels[kernel.name] = self.builder_.add_func(kernel.func, kernel.name)
        self.uses.append(KernelUse(name, kernel.name, _format_tag(weight), weight.dtype,
                                   kernel.bytes_moved_for(static_rows) if static_rows is not None else
                                   kernel.bytes_moved_for(1)))
        flat = self.builder_.emit(relax.op.reshape(x, (rows, k))) if len(x_dims) != 2 else x
        y = relax.call_tir(self.kernels[kernel.name], [flat, *(relax.const(c) for c in kernel.constants)],
                           relax.TensorType((rows, n), "float32"))
        return relax.op.reshape(self.builder_.emit(y), out_dims) if len(out_dims) != 2 else y


def _dims(expr: relax.Expr) -> list | None:
    """The shape of a tensor expression as PrimExprs (symbolic dimensions allowed), or None."""
    shape = expr.ty.shape
    return None if shape is None else list(shape.values)


def _is_int(dim, value: int) -> bool:
    return isinstance(dim, tvm.tirx.IntImm) and int(dim) == value


def _product(dims: list):
    """The product of shape dimensions: an ``IntImm`` when all are static."""
    constant = math.prod(int(d) for d in dims if isinstance(d, tvm.tirx.IntImm))
    total = tvm.tirx.IntImm("int64", constant)
    for dim in dims:
        if not isinstance(dim, tvm.tirx.IntImm):
            total = total * dim
    return total


def _dynamic_shapes(inputs: Sequence[torch.Tensor], axes: dict[int, Sequence[int]] | None):
    if not axes:
        return None
    for index, dims in axes.items():
        if index >= len(inputs) or any(not 0 <= d < inputs[index].dim() for d in dims):
            raise ValueError(f"dynamic axes {dims} of input {index} do not exist: inputs have shapes "
                             f"{[tuple(x.shape) for x in inputs]}")
    return tuple({d: torch.export.Dim.AUTO for d in axes.get(i, ())} or None for i in range(len(inputs)))


def _recurrence_converter(param_names: dict[str, str], weights: _Weights, uses: list[KernelUse],
                          activations: str = "fp32"):
    """A ``custom_convert_map`` entry for ``compress_and_export::recurrence``."""
    kernels: dict[str, relax.GlobalVar] = {}

    def convert(node: torch.fx.Node, importer) -> relax.Var:
        gi, state, _, b_hh = (importer.env[a] for a in node.args[:4])
        cell, reverse = node.args[4], bool(node.args[5])
        addend = node.args[6] if len(node.args) > 6 else node.kwargs.get("addend")
        name = param_names.get(node.args[2].name)
        if name is None:
            raise ValueError(f"the recurrent weight {node.args[2].name} is not a parameter of the model")
        weight = weights.get(name)
        steps, batch, _ = gi.ty.shape.values
        states, _, hidden = (int(v) for v in state.ty.shape.values)
        kernel = recurrence_kernel(cell, weight, int(batch), reverse, activations, summed=addend is not None)
        builder = importer.block_builder
        if kernel.name not in kernels:
            kernels[kernel.name] = builder.add_func(kernel.func, kernel.name)
        uses.append(KernelUse(name, kernel.name, _format_tag(weight), weight.dtype,
                              sum(int(c.nbytes) for c in kernel.constants)))
        args = [gi, state, *(relax.const(c) for c in kernel.constants), b_hh]
        y_type = relax.TensorType((steps, batch, hidden), "float32")
        final_type = relax.TensorType((states, batch, hidden), "float32")
        if addend is None:
            return builder.emit(relax.call_tir(kernels[kernel.name], args, [y_type, final_type]))
        # y is written into the addend (the other direction's output, used by nothing else)
        return builder.emit(relax.call_tir_inplace(kernels[kernel.name], [*args, importer.env[addend]],
                                                   [len(args), -1], [y_type, final_type]))

    return convert


def to_relax(model: nn.Module | PackedModel, example_inputs: Sequence[torch.Tensor],
             dynamic_axes: dict[int, Sequence[int]] | None = None, activations: str = "fp32",
             target: tvm.target.Target | None = None) -> RelaxModel:
    """The model as a Relax module with every matmul over a weight and every recurrent loop
    running our kernels over the packed weights (see the module docstring).

    ``dynamic_axes`` (``{input index: [axes]}``, e.g. ``{0: [3]}`` for the time axis of a
    spectrogram) makes those axes run-time sizes (``torch.export`` with ``Dim.AUTO``); the
    batch axis of recurrent layers stays static.  Matmuls then use the kernels whose row count is
    a run-time value; convolutions with symbolic spatial sizes loop over their pieces at run time.

    ``activations="int8"`` gives the matmuls over 16×1-block int8 weights (linear layers and the
    input projections of recurrent layers) with at least ``MIN_ROWS`` rows (8), or a run-time row
    count, the integer kernel of :mod:`exporters.tvm_vnni_kernel`,
    which quantizes its input at every call (x86 with AVX-512 VNNI only), and recurrences over
    such a ``W_hh`` at a batch of at least ``MIN_ROWS`` quantize ``h`` after every step
    (:mod:`exporters.tvm_recurrence_kernel`); convolutions over int8 weights stored dense, with
    static sizes, width stride and dilation 1 and ``kw >= 4``, run the integer direct convolution
    of :mod:`exporters.tvm_vnni_conv`, or, for a ``target`` with AMX (``amx-tile``, ``amx-int8``),
    those with a unit dilation along an axis of static size (a run-time width included) the tile
    convolution of :mod:`exporters.tvm_amx_conv`; every other operator keeps fp32 activations."""
    if activations not in ("fp32", "int8"):
        raise ValueError(f"unknown activations {activations!r}: use fp32 or int8")
    module, packed = (model.module, model.weights) if isinstance(model, PackedModel) else (model, {})
    if any(hasattr(m, "parametrizations") for m in module.modules()):
        raise ValueError("the model still has pruning masks attached: call pruner.finalize() before exporting")
    if isinstance(model, PackedModel):
        module = model.dequantized()  # layers left to TVM compute with the stored values too
    module, packed = fold_batch_norms(module, packed)
    scanned = scan_recurrent_layers(module).eval()
    with torch.no_grad():
        program = torch.export.export(scanned, tuple(example_inputs), dynamic_shapes=_dynamic_shapes(
            example_inputs, dynamic_axes))
    signature = program.graph_signature
    param_names = {**signature.inputs_to_parameters, **signature.inputs_to_buffers}
    weights = _Weights(module, packed)
    uses: list[KernelUse] = []
    mod = from_exported_program(program, keep_params_as_input=True, unwrap_unit_return_tuple=True,
                                custom_convert_map={"recurrence.default": _recurrence_converter(param_names, weights, uses,
                                                                                              activations)})
    mod, params = relax.frontend.detach_params(mod)
    rewriter = MatmulRewriter(mod, param_names, weights, uses, {}, activations,
                              amx=target is not None and target_has_amx(target))
    for global_var, func in mod.functions_items():
        if isinstance(func, relax.Function):
            rewriter.builder_.update_func(global_var, rewriter.visit_expr(func))
    mod = rewriter.builder_.get()
    main = mod["main"]
    num_inputs = int(main.attrs["num_input"])
    values = params.get("main", [])
    bound = {var.name: tvm.runtime.tensor(value.numpy()) for var, value in zip(main.params[num_inputs:], values)}
    mod = relax.transform.BindParams("main", bound)(mod)
    mod = relax.transform.DeadCodeElimination()(mod)
    replaced = {use.weight for use in uses}
    return RelaxModel(mod, uses, [name for name in packed if name not in replaced])
