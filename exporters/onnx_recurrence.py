"""DS2's :class:`~compressor.zoo.ds2.SharedInputBiRecurrent` in ONNX: one MatMul + one ``Scan``.

The legacy ONNX exporter traces the layer's Python loop over time and unrolls it: the file then
computes the example's number of steps whatever the input length.  :func:`export_form` returns a
copy of a model (sharing its parameters) in which every such layer emits ONE placeholder node
``compress_and_export::SharedInputBiRecurrent(x, W, b, U_f, c_f, U_b, c_b; cell)`` (an
``autograd.Function`` with a ``symbolic``; parameter names are kept), and
:func:`lower_shared_input_recurrences` replaces each placeholder by standard operators::

    gi       = x[T, B, I] @ W^T[I, G·H] + b                 one MatMul over all steps, shared
    Scan over time, two states h_f, h_b, scanning gi twice (scan_input_directions 0 and 1):
      rnn:   h' = Clip(gi_t + (h @ U^T + c), 0, 20)                     DS2's clipped ReLU
      gru:   gh = h @ U^T + c,  r, z = σ(gi_r + gh_r), σ(gi_z + gh_z)    PyTorch's order r, z, n
             n = tanh(gi_n + r ⊙ gh_n),  h' = n + z ⊙ (h − n)
    y        = y_f + y_b                                   (scan_output_directions 0 and 1)

T and B stay dynamic.  The weights stay top-level initializers, transposed for MatMul and named
after the parameter (``rnns.0.input.weight_T``, ``rnns.0.forward_hh.weight_T``, …; the shared
input weight once), so ``quantize_int8`` (``EnableSubgraph``: the recurrent MatMul inside the
body becomes int8 too) and ``compress_file`` handle them as any other weight; the recurrent biases
``c`` (and the split sizes, clip bounds) are constants local to the body, as in
:func:`exporters.onnx_gru.lower_gru` (``quantize_dynamic`` runs shape inference on the body
alone).  The Scan is built by :class:`exporters.onnx_gru.ScanBuilder` / :func:`~exporters.onnx_gru.gru_step`.
"""

from __future__ import annotations

import copy
import itertools

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import Tensor, nn

from compressor.zoo.ds2 import SharedInputBiRecurrent
from exporters.onnx_gru import ScanBuilder, _all_names, gru_step, replace_nodes, unique_prefix
from exporters.recurrence import cell_step

DOMAIN = "compress_and_export"
OP_TYPE = "SharedInputBiRecurrent"
CLIP = (0.0, 20.0)  # DS2's clipped ReLU min(max(x, 0), 20)


class _Placeholder(torch.autograd.Function):
    """Eager: the layer's own equations (so that tracing goes on with the right values); ONNX: one
    placeholder node that :func:`lower_shared_input_recurrences` replaces."""

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, b: Tensor, u_f: Tensor, c_f: Tensor, u_b: Tensor, c_b: Tensor,
                cell: str) -> Tensor:
        gi = nn.functional.linear(x, w, b)
        kind = "gru" if cell == "gru" else "rnn_clipped_relu"
        steps = gi.shape[0]
        out = gi.new_zeros(steps, gi.shape[1], u_f.shape[1])
        for u, c, order in ((u_f, c_f, range(steps)), (u_b, c_b, range(steps - 1, -1, -1))):
            h = gi.new_zeros(gi.shape[1], u.shape[1])
            for t in order:
                h, _ = cell_step(kind, gi[t], nn.functional.linear(h, u, c), h, h)
                out[t] += h
        return out

    @staticmethod
    def symbolic(g, x, w, b, u_f, c_f, u_b, c_b, cell: str):
        from torch.onnx import symbolic_helper

        out = g.op(f"{DOMAIN}::{OP_TYPE}", x, w, b, u_f, c_f, u_b, c_b, cell_s=cell)
        sizes = symbolic_helper._get_tensor_sizes(x)
        weight = symbolic_helper._get_tensor_sizes(u_f)
        if sizes is not None and len(sizes) == 3:  # [T, B, H]: later symbolics (transpose) need the rank
            out.setType(x.type().with_sizes([sizes[0], sizes[1], weight[1] if weight else None]))
        return out


class _ExportSharedInputBiRecurrent(nn.Module):
    """A :class:`SharedInputBiRecurrent` that exports as one placeholder node; the very same
    submodules under the same names (``input``, ``forward_hh``, ``backward_hh``)."""

    def __init__(self, layer: SharedInputBiRecurrent) -> None:
        super().__init__()
        self.cell, self.hidden_size = layer.cell, layer.hidden_size
        self.input, self.forward_hh, self.backward_hh = layer.input, layer.forward_hh, layer.backward_hh

    @staticmethod
    def _bias(linear: nn.Linear) -> Tensor:
        return linear.bias if linear.bias is not None else linear.weight.new_zeros(linear.weight.shape[0])

    def forward(self, x: Tensor) -> Tensor:
        return _Placeholder.apply(x, self.input.weight, self._bias(self.input), self.forward_hh.weight,
                                  self._bias(self.forward_hh), self.backward_hh.weight, self._bias(self.backward_hh),
                                  self.cell)


def has_shared_input_recurrences(module: nn.Module) -> bool:
    return any(isinstance(m, SharedInputBiRecurrent) for m in module.modules())


def export_form(module: nn.Module) -> nn.Module:
    """A copy of ``module`` whose :class:`SharedInputBiRecurrent` layers export as placeholders
    (see the module docstring).  Parameters and buffers are shared, not copied; the state-dict
    names are unchanged and ``module`` itself is not modified."""
    memo = {id(t): t for t in itertools.chain(module.parameters(), module.buffers())}
    module = copy.deepcopy(module, memo)
    if isinstance(module, SharedInputBiRecurrent):
        return _ExportSharedInputBiRecurrent(module)
    for name, child in list(module.named_modules()):
        if isinstance(child, SharedInputBiRecurrent):
            parent_name, _, attr = name.rpartition(".")
            setattr(module.get_submodule(parent_name), attr, _ExportSharedInputBiRecurrent(child))
    return module


def _fresh(name: str, taken: set[str]) -> str:
    candidate, k = name, 0
    while candidate in taken:
        k += 1
        candidate = f"{name}{k}"
    taken.add(candidate)
    return candidate


class _Lowering(ScanBuilder):
    """The replacement of one placeholder node (see the module docstring)."""

    def __init__(self, node: onnx.NodeProto, constants: dict[str, onnx.TensorProto], prefix: str,
                 taken: set[str]) -> None:
        super().__init__(prefix)
        self.node, self.taken, self.constants = node, taken, constants
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        cell = attrs.get("cell", b"rnn")
        self.cell = cell.decode() if isinstance(cell, bytes) else cell
        if self.cell not in ("rnn", "gru"):
            raise NotImplementedError(f"{OP_TYPE} {node.name!r}: cell {self.cell!r} (only 'rnn', 'gru')")
        if len(node.input) != 7:
            raise ValueError(f"{OP_TYPE} {node.name!r}: {len(node.input)} inputs, expected 7")
        self.x, self.w, self.b, self.u_f, self.c_f, self.u_b, self.c_b = node.input
        self.gates = 3 if self.cell == "gru" else 1

    def array(self, name: str) -> np.ndarray:
        if name not in self.constants:
            raise NotImplementedError(f"{OP_TYPE} {self.node.name!r}: {name!r} is not an initializer")
        return numpy_helper.to_array(self.constants[name]).astype(np.float32)

    def transposed(self, name: str) -> str:
        """A top-level initializer ``<name>_T``: the weight transposed to ``[K, N]`` for MatMul."""
        fresh = _fresh(f"{name}_T", self.taken)
        self.tensors.append(numpy_helper.from_array(np.ascontiguousarray(self.array(name).T), fresh))
        return fresh

    def build(self) -> list[onnx.NodeProto]:
        p, gates = self.p, self.gates
        u_f = self.array(self.u_f)
        hidden = u_f.shape[1]
        width = gates * hidden
        w = self.array(self.w)
        for name, shape in ((self.w, (width, w.shape[1])), (self.b, (width,)), (self.u_f, (width, hidden)),
                            (self.c_f, (width,)), (self.u_b, (width, hidden)), (self.c_b, (width,))):
            if self.array(name).shape != shape:
                raise ValueError(f"{OP_TYPE} {self.node.name!r}: {name!r} has shape {self.array(name).shape}, "
                                 f"expected {shape} ({self.cell} cell, hidden {hidden})")
        (proj,) = self.add("MatMul", [self.x, self.transposed(self.w)], "input_projection")
        (gi,) = self.add("Add", [proj, self.b], "input_projection_bias")
        zeros = self.zero_state(self.x, hidden)
        if self.cell == "gru":
            split_zr_h = self.const("split_zr_h", np.array([2 * hidden, hidden], np.int64), local=True)
        else:
            low = self.const("clip_min", np.array(CLIP[0], np.float32), local=True)
            high = self.const("clip_max", np.array(CLIP[1], np.float32), local=True)
        states, inputs, new_states, outputs = [], [], [], []
        for direction, (u, c, reverse) in {"forward": (self.u_f, self.c_f, 0),
                                           "backward": (self.u_b, self.c_b, 1)}.items():
            h, gi_t = f"{p}h_{direction}", f"{p}gi_t_{direction}"
            states.append((zeros, h, hidden))
            inputs.append((gi, gi_t, TensorProto.FLOAT, width, reverse))
            u_t = self.transposed(u)
            bias = self.const(f"{direction}_hh_bias", self.array(c), local=True)
            if self.cell == "gru":
                h_new = gru_step(self, direction, h, gi_t, split_zr_h, order="rz", recurrent=u_t, gh_bias=bias)
            else:
                (gh,) = self.body("MatMul", [h, u_t], f"gh_{direction}")
                (gh,) = self.body("Add", [gh, bias], f"gh_bias_{direction}")
                (pre,) = self.body("Add", [gi_t, gh], f"pre_{direction}")
                (h_new,) = self.body("Clip", [pre, low, high], f"h_new_{direction}")
            (y,) = self.body("Identity", [h_new], f"y_{direction}")
            new_states.append(h_new)
            outputs.append((y, hidden, reverse))
        _, (y_f, y_b) = self.scan(states, inputs, new_states, outputs)
        self.nodes.append(helper.make_node("Add", [y_f, y_b], [self.node.output[0]], name=p + "sum"))
        return self.nodes


def lower_shared_input_recurrences(model: onnx.ModelProto, check: bool = True) -> onnx.ModelProto:
    """Replace, in place, every ``compress_and_export::SharedInputBiRecurrent`` placeholder of
    ``model`` (written by the export form of :func:`export_form`) by its MatMul + Scan; returns
    ``model``.  The weights it replaced by transposed copies are dropped when nothing else
    reads them."""
    graph = model.graph
    constants = {t.name: t for t in graph.initializer}
    taken = _all_names(graph, set())
    new_nodes, new_tensors, replaced = [], [], set()
    for i, node in enumerate(graph.node):
        if node.domain != DOMAIN or node.op_type != OP_TYPE:
            new_nodes.append(node)
            continue
        prefix = unique_prefix(node.name or f"{OP_TYPE}_{i}", "scan", taken)
        lowering = _Lowering(node, constants, prefix, taken)
        new_nodes += lowering.build()
        new_tensors += lowering.tensors
        replaced.update(node.input[1:])
    if not replaced:
        return model
    replace_nodes(graph, new_nodes, new_tensors, replaced)
    if not any(n.domain == DOMAIN for n in graph.node):
        kept_opsets = [o for o in model.opset_import if o.domain != DOMAIN]
        del model.opset_import[:]
        model.opset_import.extend(kept_opsets)
    if check:
        onnx.checker.check_model(model)
    return model
