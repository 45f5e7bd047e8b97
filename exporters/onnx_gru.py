"""Lower ONNX ``GRU`` operators to standard operators so that their matmuls can run in int8.

ONNX Runtime has no int8 GRU kernel: ``quantize_dynamic`` leaves a GRU operator in fp32.
:func:`lower_gru` replaces every top-level ``GRU`` node (forward, reverse or bidirectional,
``linear_before_reset`` 0 or 1, with or without ``B``, ``sequence_lens`` and ``initial_h``) by

* the input projection of all time steps as ONE MatMul — ``X[T, B, I] @ W^T[I, D·3H]`` (both
  directions side by side), plus a bias in which the z and r parts of ``Rb`` are folded — and
* one ``Scan`` over time whose body, for each direction ``d`` (ONNX gate order z, r, h)::

      gh      = H @ R_d^T                                     MatMul (the recurrent weight)
      z, r    = σ(gx[:2H] + gh[:2H])                           Add, Sigmoid, Split
      h~      = tanh(gx[2H:] + r ⊙ (gh[2H:] + Rb_h))           linear_before_reset = 1
              = tanh(gx[2H:] + (r ⊙ H) @ R_h^T + Rb_h)         linear_before_reset = 0
      H'      = h~ + z ⊙ (H − h~)                              (1 − z) ⊙ h~ + z ⊙ H

  The reverse direction uses ``scan_input_directions`` / ``scan_output_directions`` = 1.  With
  ``sequence_lens`` a boolean mask ``t < len[b]`` is scanned along: padded steps keep the state
  and output zeros, exactly as the GRU operator does (both directions).

Outputs ``Y [T, D, B, H]`` and ``Y_h [D, B, H]`` are those of the GRU operator; T and B stay
dynamic.  The weights stay top-level initializers (the Scan body reads them from the outer
scope), transposed to ``[K, N]`` as MatMul wants them, so :func:`compress_initializers` still
sees them.

int8: ``quantize_dynamic`` does not recurse into subgraphs by default (``Scan``/``Loop``/``If``
bodies are skipped unless ``extra_options={"EnableSubgraph": True}``).  :func:`quantize_lowered_int8`
passes that option (otherwise the same as :func:`exporters.onnx_quantize.quantize_int8`): the
input projection and the recurrent MatMul inside the Scan body both become
``DynamicQuantizeMatMul`` / ``MatMulInteger`` with QInt8 weights (zero point 0, pruned zeros stay
zero).  Order: prune → finalize → export → :func:`lower_gru` → quantize → compress.

:class:`ScanBuilder` (nodes, initializers, the Scan node and its body) and :func:`gru_step` are
shared with :mod:`exporters.onnx_recurrence` (DS2's shared-input layers).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

MIN_OPSET = 13  # Split / Unsqueeze / Squeeze with their axes and sizes as inputs


def _opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def _names_used(graph: onnx.GraphProto, used: set[str]) -> set[str]:
    """Every value name read by a node of ``graph`` or of its subgraphs, and its outputs."""
    for node in graph.node:
        used.update(node.input)
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                _names_used(attr.g, used)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    _names_used(sub, used)
    used.update(o.name for o in graph.output)
    return used


def _all_names(graph: onnx.GraphProto, names: set[str]) -> set[str]:
    names.update(t.name for t in graph.initializer)
    names.update(i.name for i in graph.input)
    for node in graph.node:
        names.update(node.output)
        names.add(node.name)
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                _all_names(attr.g, names)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    _all_names(sub, names)
    return names


def replace_nodes(graph: onnx.GraphProto, nodes: list, tensors: list, replaced: set[str]) -> None:
    """Give ``graph`` the node list ``nodes`` and the extra initializers ``tensors``; drop the
    initializers (and graph inputs) named in ``replaced`` that nothing reads any more."""
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(tensors)
    used = _names_used(graph, set())
    unused = {name for name in replaced if name not in used}
    for field in (graph.initializer, graph.input):
        kept = [t for t in field if t.name not in unused]
        del field[:]
        field.extend(kept)


def unique_prefix(base: str, tag: str, taken: set[str]) -> str:
    """``"<base>__<tag>/"`` (``/`` in ``base`` made ``_``), numbered if a name in ``taken`` already
    starts with it: the namespace of the nodes and tensors that replace one node."""
    base = base.strip("/").replace("/", "_")
    prefix, k = f"{base}__{tag}/", 0
    while any(name.startswith(prefix) for name in taken):
        k += 1
        prefix = f"{base}__{tag}{k}/"
    return prefix


class ScanBuilder:
    """The nodes and initializers that replace one recurrent node: top-level ones (``nodes``,
    ``tensors``) and the body of its ``Scan`` (``body_nodes``, ``body_tensors``); every name
    starts with ``prefix``.  Shared by :func:`lower_gru` and
    :func:`exporters.onnx_recurrence.lower_shared_input_recurrences`."""

    def __init__(self, prefix: str) -> None:
        self.p = prefix
        self.nodes: list[onnx.NodeProto] = []
        self.tensors: list[onnx.TensorProto] = []
        self.body_nodes: list[onnx.NodeProto] = []
        self.body_tensors: list[onnx.TensorProto] = []
        self._shapes: dict[str, str] = {}

    def const(self, key: str, value: np.ndarray, local: bool = False) -> str:
        """A new initializer: top-level, or ``local`` to the Scan body (small constants that shape
        inference of the body alone must see, as ``quantize_dynamic`` infers the body on its own)."""
        name = self.p + key
        (self.body_tensors if local else self.tensors).append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def add(self, op: str, inputs: list[str], key: str, n_out: int = 1, nodes=None, **attrs) -> list[str]:
        """A top-level node (or one appended to ``nodes``); returns its output names."""
        outputs = [self.p + key] if n_out == 1 else [f"{self.p}{key}_{i}" for i in range(n_out)]
        (self.nodes if nodes is None else nodes).append(
            helper.make_node(op, inputs, outputs, name=self.p + key + "_node", **attrs))
        return outputs

    def body(self, op: str, inputs: list[str], key: str, n_out: int = 1, **attrs) -> list[str]:
        """A node of the Scan body."""
        return self.add(op, inputs, f"body_{key}", n_out, self.body_nodes, **attrs)

    def shape_of(self, x: str) -> str:
        """``Shape(x)``, built once per value."""
        if x not in self._shapes:
            self._shapes[x] = self.add("Shape", [x], f"shape_{len(self._shapes)}" if self._shapes else "shape_x")[0]
        return self._shapes[x]

    def zero_state(self, x: str, hidden: int) -> str:
        """Zeros ``[B, hidden]``, ``B`` the (dynamic) axis 1 of the time-major ``x``."""
        (batch,) = self.add("Gather", [self.shape_of(x), self.const("one_index", np.array([1], np.int64))], "batch",
                            axis=0)
        (shape_h,) = self.add("Concat", [batch, self.const("hidden", np.array([hidden], np.int64))], "shape_h", axis=0)
        zero = numpy_helper.from_array(np.zeros(1, np.float32))
        return self.add("ConstantOfShape", [shape_h], "h_zeros", value=zero)[0]

    def scan(self, states: list[tuple[str, str, int]], inputs: list[tuple[str, str, int, int, int]],
             new_states: list[str], outputs: list[tuple[str, int, int]]) -> tuple[list[str], list[str]]:
        """Append the ``Scan`` node whose body is ``body_nodes`` (built beforehand) and return the
        names of its final states and of its stacked outputs ``[T, B, width]``.

        * ``states``: ``(initial value, name in the body, width)``, float ``[B, width]``;
        * ``inputs``: ``(scanned value [T, B, width], one step's name in the body, element type,
          width, direction)``, direction 1 = from the last step to the first (the same value may
          be scanned twice, in both directions);
        * ``new_states``: the body values that become the next states (in the order of ``states``);
        * ``outputs``: ``(body value, width, direction)``, stacked along time."""
        p = self.p
        b_in = [helper.make_tensor_value_info(inner, TensorProto.FLOAT, [None, w]) for _, inner, w in states]
        b_in += [helper.make_tensor_value_info(inner, elem, [None, w]) for _, inner, elem, w, _ in inputs]
        b_out = [helper.make_tensor_value_info(name, TensorProto.FLOAT, [None, w])
                 for name, (_, _, w) in zip(new_states, states, strict=True)]
        b_out += [helper.make_tensor_value_info(name, TensorProto.FLOAT, [None, w]) for name, w, _ in outputs]
        body = helper.make_graph(self.body_nodes, f"{p}body", b_in, b_out, self.body_tensors)
        finals = [f"{p}h_last_{i}" for i in range(len(states))]
        ys = [f"{p}y_{i}" for i in range(len(outputs))]
        self.nodes.append(helper.make_node(
            "Scan", [s[0] for s in states] + [i[0] for i in inputs], finals + ys, name=p + "scan", body=body,
            num_scan_inputs=len(inputs), scan_input_directions=[i[4] for i in inputs],
            scan_output_directions=[o[2] for o in outputs]))
        return finals, ys


def gru_step(b: ScanBuilder, key: str, h: str, gx: str, split_zr_h: str, *, order: str,
             recurrent: str | tuple[str, str], gh_bias: str | None = None, rb_h: str | None = None) -> str:
    """Nodes of one GRU step in the Scan body of ``b``; returns the new state's name.

    ``gx [B, 3H]``: the input projection of the step, gates ``order`` ``"zr"`` (ONNX: z, r, h)
    or ``"rz"`` (PyTorch: r, z, n), candidate last.  ``recurrent``: the transposed recurrent
    weight ``[H, 3H]`` (one MatMul, ``h~ = tanh(gx_h + r ⊙ (gh_h + rb_h))``: PyTorch's equations,
    ONNX's ``linear_before_reset = 1``), its bias ``gh_bias [3H]`` added right after the MatMul
    if given; or the pair ``(R_zr^T [H, 2H], R_h^T [H, H])`` for ``linear_before_reset = 0``
    (``h~ = tanh(gx_h + (r ⊙ H) @ R_h^T)``).  ``split_zr_h``: the split sizes ``[2H, H]``
    (a body-local constant).  Then ``H' = h~ + z ⊙ (H − h~)``."""
    def add(op, ins, k, n_out=1, **kw):
        return b.body(op, ins, f"{k}_{key}", n_out, **kw)

    gx_zr, gx_h = add("Split", [gx, split_zr_h], "gx_split", 2, axis=1)
    if isinstance(recurrent, str):  # one MatMul with R^T [H, 3H]
        (gh,) = add("MatMul", [h, recurrent], "gh")
        if gh_bias:
            (gh,) = add("Add", [gh, gh_bias], "gh_bias")
        gh_zr, gh_h = add("Split", [gh, split_zr_h], "gh_split", 2, axis=1)
    else:  # z and r from H R_zr^T; the candidate from (r ⊙ H) R_h^T
        (gh_zr,) = add("MatMul", [h, recurrent[0]], "gh_zr")
    (zr,) = add("Add", [gx_zr, gh_zr], "zr_pre")
    (zr,) = add("Sigmoid", [zr], "zr")
    first, second = add("Split", [zr], "z_r", 2, axis=1)
    z, r = (first, second) if order == "zr" else (second, first)
    if isinstance(recurrent, str):
        if rb_h:
            (gh_h,) = add("Add", [gh_h, rb_h], "gh_h_bias")
        (cand,) = add("Mul", [r, gh_h], "r_gh")
    else:
        (rh,) = add("Mul", [r, h], "r_h")
        (cand,) = add("MatMul", [rh, recurrent[1]], "rh_R")
    (cand,) = add("Add", [gx_h, cand], "cand_pre")
    (cand,) = add("Tanh", [cand], "cand")
    (diff,) = add("Sub", [h, cand], "h_minus_cand")
    (zd,) = add("Mul", [z, diff], "z_diff")
    return add("Add", [cand, zd], "h_new")[0]


class _Lowering(ScanBuilder):
    """Builds the replacement of one GRU node: top-level nodes and initializers, and the Scan body."""

    def __init__(self, node: onnx.NodeProto, initializers: dict[str, np.ndarray], prefix: str) -> None:
        super().__init__(prefix)
        self.node = node
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        for name, value in attrs.items():
            if name == "activations" and [v.decode() if isinstance(v, bytes) else v for v in value] not in (
                    ["Sigmoid", "Tanh"], ["Sigmoid", "Tanh"] * 2):
                raise NotImplementedError(f"GRU {node.name!r}: activations {value} (only Sigmoid, Tanh)")
            if name in ("clip", "activation_alpha", "activation_beta"):
                raise NotImplementedError(f"GRU {node.name!r}: attribute {name} is not supported")
            if name == "layout" and value != 0:
                raise NotImplementedError(f"GRU {node.name!r}: layout={value} (only 0, time-major)")
        direction = attrs.get("direction", b"forward")
        self.direction = direction.decode() if isinstance(direction, bytes) else direction
        self.linear_before_reset = int(attrs.get("linear_before_reset", 0))
        inputs = list(node.input) + [""] * (6 - len(node.input))
        self.x, w, r, b, self.lens, self.h0 = inputs[:6]
        for role, name in (("W", w), ("R", r), ("B", b)):
            if name and name not in initializers:
                raise NotImplementedError(f"GRU {node.name!r}: {role} ({name!r}) is not an initializer")
        self.W = initializers[w].astype(np.float32)  # [D, 3H, I]
        self.R = initializers[r].astype(np.float32)  # [D, 3H, H]
        self.D, three_h, _ = self.W.shape
        self.H = three_h // 3
        if "hidden_size" in attrs and attrs["hidden_size"] != self.H:
            raise ValueError(f"GRU {node.name!r}: hidden_size {attrs['hidden_size']} but W has {three_h} rows")
        self.Bias = (initializers[b].astype(np.float32) if b else np.zeros((self.D, 6 * self.H), np.float32))
        self.directions = {"forward": [0], "reverse": [1], "bidirectional": [0, 1]}[self.direction]
        if len(self.directions) != self.D:
            raise ValueError(f"GRU {node.name!r}: direction {self.direction} with {self.D} weight sets")

    # the rewrite --------------------------------------------------------------------------------
    def build(self) -> list[onnx.NodeProto]:
        H, D, p = self.H, self.D, self.p
        # input projection of every step, both directions side by side: [T, B, D·3H]
        w_t = np.concatenate([self.W[d].T for d in range(D)], axis=1)
        bias = []
        for d in range(D):
            wb, rb = self.Bias[d, :3 * H], self.Bias[d, 3 * H:]
            folded = wb.copy()
            folded[:2 * H] += rb[:2 * H]  # z and r: both biases simply add; h: Rb_h stays with R
            if not self.linear_before_reset:
                folded[2 * H:] += rb[2 * H:]  # h~ = tanh(x W_h + Wb_h + (r⊙H) R_h + Rb_h)
            bias.append(folded)
        (proj,) = self.add("MatMul", [self.x, self.const("W_T", np.ascontiguousarray(w_t))], "input_projection")
        (proj,) = self.add("Add", [proj, self.const("input_bias", np.concatenate(bias))], "input_projection_bias")
        gx = self.add("Split", [proj], "gx", n_out=D, axis=2) if D == 2 else [proj]

        if self.h0:
            h0 = [self.add("Gather", [self.h0, self.const(f"dir{d}", np.array(d, np.int64))], f"h0_{d}", axis=0)[0]
                  for d in range(D)]
        else:
            h0 = [self.zero_state(self.x, H)] * D
        scan_inputs = [(gx[d], f"{p}gx_t_{d}", TensorProto.FLOAT, 3 * H, self.directions[d]) for d in range(D)]
        if self.lens:  # mask[t, b] = t < len[b]
            shape_x = self.shape_of(self.x)
            (steps,) = self.add("Gather", [shape_x, self.const("zero_scalar", np.array(0, np.int64))], "steps", axis=0)
            (t,) = self.add("Range", [self.const("range_start", np.array(0, np.int64)), steps,
                                      self.const("range_step", np.array(1, np.int64))], "time_index")
            (t,) = self.add("Unsqueeze", [t, self.const("axis1", np.array([1], np.int64))], "time_column")
            (lens,) = self.add("Cast", [self.lens], "lens64", to=TensorProto.INT64)
            (mask,) = self.add("Less", [t, lens], "mask2d")
            (mask,) = self.add("Unsqueeze", [mask, self.const("axis2", np.array([2], np.int64))], "mask")
            scan_inputs += [(mask, f"{p}mask_t_{d}", TensorProto.BOOL, 1, self.directions[d]) for d in range(D)]
            zero = self.const("zero_float", np.array(0, np.float32), local=True)

        # the Scan body: states h_d, scan inputs gx_d (and mask_d), outputs h_d', y_d
        split_zr_h = self.const("split_zr_h", np.array([2 * H, H], np.int64), local=True)
        new_states, ys = [], []
        for d in range(D):
            h = f"{p}h_{d}"
            if self.linear_before_reset:
                recurrent: str | tuple[str, str] = self.const(f"R_T_{d}", np.ascontiguousarray(self.R[d].T))
                rb_h = self.Bias[d, 5 * H:]
                rb_h_name = self.const(f"Rb_h_{d}", rb_h, local=True) if np.any(rb_h) else None
            else:
                recurrent = (self.const(f"R_zr_T_{d}", np.ascontiguousarray(self.R[d, :2 * H].T)),
                             self.const(f"R_h_T_{d}", np.ascontiguousarray(self.R[d, 2 * H:].T)))
                rb_h_name = None
            h_new = gru_step(self, str(d), h, f"{p}gx_t_{d}", split_zr_h, order="zr", recurrent=recurrent,
                             rb_h=rb_h_name)
            if self.lens:
                m = f"{p}mask_t_{d}"
                (h_state,) = self.body("Where", [m, h_new, h], f"h_state_{d}")
                (y,) = self.body("Where", [m, h_new, zero], f"y_{d}")
            else:
                h_state = h_new
                (y,) = self.body("Identity", [h_new], f"y_{d}")
            new_states.append(h_state)
            ys.append((y, H, self.directions[d]))
        finals, ys = self.scan([(h0[d], f"{p}h_{d}", H) for d in range(D)], scan_inputs, new_states,
                               [(y, H, direction) for y, _, direction in ys])

        outputs = list(self.node.output) + [""] * (2 - len(self.node.output))
        if outputs[0]:
            axis1 = self.const("y_axis", np.array([1], np.int64))
            parts = [self.add("Unsqueeze", [y, axis1], f"Y_{d}")[0] for d, y in enumerate(ys)]
            self.nodes.append(helper.make_node("Concat", parts, [outputs[0]], name=p + "Y", axis=1) if D == 2 else
                              helper.make_node("Identity", parts, [outputs[0]], name=p + "Y"))
        if outputs[1]:
            axis0 = self.const("yh_axis", np.array([0], np.int64))
            parts = [self.add("Unsqueeze", [h, axis0], f"Y_h_{d}")[0] for d, h in enumerate(finals)]
            self.nodes.append(helper.make_node("Concat", parts, [outputs[1]], name=p + "Y_h", axis=0) if D == 2 else
                              helper.make_node("Identity", parts, [outputs[1]], name=p + "Y_h"))
        return self.nodes


def lower_gru(model: onnx.ModelProto, check: bool = True) -> onnx.ModelProto:
    """A copy of ``model`` in which every top-level ONNX ``GRU`` node is replaced by one input
    MatMul and a ``Scan`` (see the module docstring); the GRU's weight initializers are replaced
    by transposed ones.  Models without GRU nodes come back unchanged (as a copy)."""
    if _opset(model) < MIN_OPSET:
        raise ValueError(f"lower_gru needs opset >= {MIN_OPSET}, the model has {_opset(model)}")
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    initializers = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    taken = _all_names(graph, set())
    new_nodes, new_tensors, replaced = [], [], set()
    for i, node in enumerate(graph.node):
        if node.op_type != "GRU" or node.domain not in ("", "ai.onnx"):
            new_nodes.append(node)
            continue
        prefix = unique_prefix(node.name or f"GRU_{i}", "lowered", taken)
        lowering = _Lowering(node, initializers, prefix)
        new_nodes += lowering.build()
        new_tensors += lowering.tensors
        replaced.update(name for name in node.input[1:4] if name)
    if not replaced:
        return model
    replace_nodes(graph, new_nodes, new_tensors, replaced)
    if check:
        onnx.checker.check_model(model)
    return model


def lower_gru_file(source: str | Path, destination: str | Path) -> Path:
    """:func:`lower_gru` from file to file (written to a temporary path, checked, then renamed)."""
    destination = Path(destination)
    tmp = destination.with_name(destination.name + ".tmp")
    try:
        onnx.save(lower_gru(onnx.load(str(source))), str(tmp))
        os.replace(tmp, destination)
    finally:
        tmp.unlink(missing_ok=True)
    return destination
