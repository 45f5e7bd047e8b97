"""Physical removal: from a masked (gated) model to a plain, smaller, dense ``nn.Module``.

:func:`shrink` takes a clean copy of the prepared model (no hooks, no parametrizations, no mask
buffer) and, following the plan of kept indices (:func:`~compressor.taylor.cost.make_plan`):

* slices every Conv/Linear (output rows, input columns; a depthwise convolution gets
  ``groups`` = kept channels, a grouped one keeps its groups with fewer channels each) and every
  BatchNorm (weight, bias, running statistics);
* rebuilds every recurrent module: an ``nn.GRU/LSTM/RNN`` of the same type when all its layers
  and directions keep the same number of units, else a
  :class:`~compressor.taylor.modules.PrunedRNN`; unit k of direction d of layer l takes its rows
  ``g·H + k`` of that direction's weights and biases, column k of its ``weight_hh`` and the
  columns ``d·H + k`` of the next layer's ``weight_ih``;
* keeps the model's own class, methods and attributes; where the forward code passes a literal
  width to ``view``/``reshape`` on a pruned channel dimension (``out.view(T, B, 2, 256)``), the
  module (its class becomes a subclass) gets the forward generated from the analysed fx graph
  with that size rewritten (``view(T, B, 2, 200)``); ``type(m)._taylor_code`` shows it.

The result is checked against the masked model on the example inputs given to ``prepare``
(eval mode): a difference larger than ``1e-4`` relative to the largest output raises — a broken
model is never returned silently.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import fx, nn

from .cost import make_plan
from .graph import BN_TYPES, CONV_TYPES, RNN_TYPES, Analysis
from .modules import PrunedRNN

TOLERANCE = 1e-4


def _parameter(tensor: torch.Tensor, like: nn.Parameter) -> nn.Parameter:
    return nn.Parameter(tensor.detach().clone(), requires_grad=like.requires_grad)


def _index(values: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.as_tensor(values, dtype=torch.long, device=device)


def _kept_outputs(m: nn.Module, p: dict) -> tuple[torch.Tensor, np.ndarray | None]:
    """The weight rows of the kept outputs ``p["out"]`` (all without it); the bias is cut in place."""
    weight, out = m.weight.detach(), p.get("out")
    if out is not None:
        weight = weight[_index(out, weight.device)]
        if m.bias is not None:
            m.bias = _parameter(m.bias.detach()[_index(out, weight.device)], m.bias)
    return weight, out


def _shrink_conv(m: nn.Module, p: dict) -> None:
    weight, out = _kept_outputs(m, p)
    if out is not None:
        m.out_channels = len(out)
    kept_in = p.get("in")
    if kept_in is not None:
        if m.groups == 1:
            weight = weight[:, _index(kept_in, weight.device)]
            m.in_channels = len(kept_in)
        elif m.groups == m.in_channels:
            m.in_channels = m.groups = len(kept_in)
        else:
            n_in = m.in_channels // m.groups
            positions = kept_in[kept_in < n_in]
            weight = weight[:, _index(positions, weight.device)]
            m.in_channels = len(positions) * m.groups
    m.weight = _parameter(weight, m.weight)


def _shrink_linear(m: nn.Linear, p: dict) -> None:
    weight, out = _kept_outputs(m, p)
    if out is not None:
        m.out_features = len(out)
    kept_in = p.get("in")
    if kept_in is not None:
        weight = weight[:, _index(kept_in, weight.device)]
        m.in_features = len(kept_in)
    m.weight = _parameter(weight, m.weight)


def _shrink_bn(m: nn.Module, p: dict) -> None:
    keep = p["in"]
    if m.affine:
        index = _index(keep, m.weight.device)
        m.weight = _parameter(m.weight.detach()[index], m.weight)
        m.bias = _parameter(m.bias.detach()[index], m.bias)
    if m.running_mean is not None:
        index = _index(keep, m.running_mean.device)
        m.running_mean = m.running_mean[index].clone()
        m.running_var = m.running_var[index].clone()
    m.num_features = len(keep)


def _shrink_rnn(m: nn.RNNBase, p: dict) -> nn.Module:
    units: list[list[np.ndarray]] = p["units"]
    gates = {"GRU": 3, "LSTM": 4}.get(m.mode, 1)
    hidden, directions = m.hidden_size, 2 if m.bidirectional else 1
    kept_in = p.get("in", np.arange(m.input_size))
    sizes = [[len(u) for u in layer] for layer in units]
    tensors: dict[tuple[int, int], list[torch.Tensor]] = {}
    for layer in range(m.num_layers):
        cols = kept_in if layer == 0 else np.concatenate([d * hidden + units[layer - 1][d] for d in range(directions)])
        for d in range(directions):
            u = units[layer][d]
            rows = np.concatenate([g * hidden + u for g in range(gates)])
            sfx = f"l{layer}{'_reverse' if d else ''}"
            w_ih = getattr(m, f"weight_ih_{sfx}").detach()
            device = w_ih.device
            group = [w_ih[_index(rows, device)][:, _index(cols, device)],
                     getattr(m, f"weight_hh_{sfx}").detach()[_index(rows, device)][:, _index(u, device)]]
            if m.bias:
                group += [getattr(m, f"bias_ih_{sfx}").detach()[_index(rows, device)],
                          getattr(m, f"bias_hh_{sfx}").detach()[_index(rows, device)]]
            tensors[layer, d] = group
    extra = {"nonlinearity": m.nonlinearity} if isinstance(m, nn.RNN) else {}
    if len({s for layer in sizes for s in layer}) == 1:
        new = type(m)(len(kept_in), sizes[0][0], num_layers=m.num_layers, bias=m.bias, batch_first=m.batch_first,
                      dropout=m.dropout, bidirectional=m.bidirectional, **extra)
        targets = {(layer, d): (new, f"l{layer}{'_reverse' if d else ''}") for layer, d in tensors}
    else:
        new = PrunedRNN(m.mode, len(kept_in), sizes, bias=m.bias, batch_first=m.batch_first, dropout=m.dropout)
        targets = {(layer, d): (new.layers[layer][d], "l0") for layer, d in tensors}
    for key, group in tensors.items():
        module, sfx = targets[key]
        names = [f"weight_ih_{sfx}", f"weight_hh_{sfx}"] + ([f"bias_ih_{sfx}", f"bias_hh_{sfx}"] if m.bias else [])
        for name, tensor in zip(names, group):
            getattr(module, name).data = tensor.clone()
        if hasattr(module, "_init_flat_weights"):
            module._init_flat_weights()
    new.to(next(m.parameters()).device)
    new.train(m.training)
    return new


def _set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


def apply_plan(model: nn.Module, analysis: Analysis, plan: dict) -> nn.Module:
    """Slice the modules of ``model`` (a clean copy) in place; returns ``model``."""
    for path, entry in plan.items():
        module = model.get_submodule(path)
        if isinstance(module, CONV_TYPES):
            _shrink_conv(module, entry)
        elif isinstance(module, nn.Linear):
            _shrink_linear(module, entry)
        elif isinstance(module, BN_TYPES):
            _shrink_bn(module, entry)
        elif isinstance(module, RNN_TYPES) and path in analysis.rnns:
            _set_submodule(model, path, _shrink_rnn(module, entry))
    return model


def _rewrite_reshape(node: fx.Node, dim: int, size: int) -> None:
    """Replace the literal size at output dimension ``dim`` of a view/reshape call."""
    args = list(node.args)
    if len(args) == 2 and isinstance(args[1], (list, tuple)):
        shape = list(args[1])
        if dim < len(shape) and isinstance(shape[dim], int) and shape[dim] != -1:
            shape[dim] = size
            args[1] = type(args[1])(shape)
    elif dim + 1 < len(args) and isinstance(args[dim + 1], int) and args[dim + 1] != -1:
        args[dim + 1] = size
    node.args = tuple(args)


def _get_path(obj: object, path: str) -> object:
    for name in path.split("."):
        obj = getattr(obj, name)
    return obj


def _install_forward(module: nn.Module, graph_module: fx.GraphModule) -> None:
    """Give ``module`` (the user's own instance, sliced) the generated ``forward`` of
    ``graph_module``: its class becomes a subclass of its class with that forward, so its other
    methods and attributes stay.  The generated code addresses submodules and parameters by
    their paths, which are the same in ``module``."""
    for node in graph_module.graph.nodes:  # constants the tracer made (``_tensor_constant0``)
        if node.op == "get_attr":
            try:
                _get_path(module, node.target)
            except AttributeError:
                owner, _, name = node.target.rpartition(".")
                setattr(_get_path(module, owner) if owner else module, name, _get_path(graph_module, node.target))
    cls = type(module)
    base = getattr(cls, "_taylor_base", cls)
    module.__class__ = type(base.__name__, (base,), {"forward": type(graph_module).forward, "_taylor_base": base,
                                                      "__module__": base.__module__,
                                                      "_taylor_code": graph_module.code})


def rebuild_regions(model: nn.Module, analysis: Analysis, keep_atom: np.ndarray) -> nn.Module:
    """Rewrite literal ``view``/``reshape`` sizes on pruned channel dimensions: each traced region
    that has one gets the generated forward of its analysed graph with the new sizes
    (:func:`_install_forward`); the others keep their own forward.  Returns ``model``."""
    for region in sorted(analysis.regions, key=lambda r: (r.path == "", -r.path.count("."))):
        module = model if region.path == "" else model.get_submodule(region.path)
        mapping: dict[fx.Node, fx.Node] = {}
        graph = fx.Graph()
        output = graph.graph_copy(region.graph_module.graph, mapping)
        graph.output(output)
        changed = False
        for old, new in mapping.items():
            if old.name in region.reshapes:
                dim, ids = region.reshapes[old.name]
                before = new.args
                _rewrite_reshape(new, dim, int(keep_atom[ids].sum()))
                changed |= new.args != before
        if changed:
            _install_forward(module, fx.GraphModule(module, graph, type(module).__name__))
    return model


def _flatten(output) -> list[torch.Tensor]:
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, (list, tuple)):
        return [t for item in output for t in _flatten(item)]
    if isinstance(output, dict):
        return [t for item in output.values() for t in _flatten(item)]
    return []


def max_relative_difference(a: nn.Module, b: nn.Module, inputs: tuple) -> float:
    """Largest |a(x) − b(x)| relative to the largest |a(x)|, both in eval mode, no gradients."""
    modes = [(m, m.training) for model in (a, b) for m in model.modules()]
    try:
        a.eval()
        b.eval()
        with torch.no_grad():
            out_a, out_b = _flatten(a(*inputs)), _flatten(b(*inputs))
    finally:
        for m, mode in modes:
            m.training = mode
    if len(out_a) != len(out_b) or any(x.shape != y.shape for x, y in zip(out_a, out_b)):
        return float("inf")
    worst = 0.0
    for x, y in zip(out_a, out_b):
        scale = max(float(x.abs().max()) if x.numel() else 0.0, 1e-12)
        worst = max(worst, float((x - y).abs().max()) / scale if x.numel() else 0.0)
    return worst


def shrink(pruner, verify: bool = True) -> nn.Module:
    """The plain, smaller model whose forward equals ``pruner``'s masked model (see the module
    docstring).  The prepared model is not changed."""
    model = pruner._require_prepared()
    analysis: Analysis = pruner.analysis
    keep_atom = pruner.keep_atoms()
    plan = make_plan(analysis, keep_atom)
    clean = pruner.clean_copy()
    apply_plan(clean, analysis, plan)
    small = rebuild_regions(clean, analysis, keep_atom)
    small.train(model.training)
    if verify:
        try:
            difference = max_relative_difference(model, small, pruner.example_inputs)
        except Exception as error:
            raise RuntimeError(f"the shrunk model does not run on the example inputs: {error}") from error
        if not difference <= TOLERANCE:
            raise RuntimeError(f"the shrunk model differs from the masked model by {difference:.3g} (relative); "
                               "please report this model: the analysis missed a dependency")
    return small

