"""A ``torch.export`` program (``.pt2``) as an ordinary module the pruner and exporters understand.

``torch.export.load(path).module()`` is a graph of ATen calls: its weights are plain attributes,
so nothing in it is an ``nn.Linear`` or an ``nn.GRU`` — the pruner, the packer and the exporters,
which select layers by type, would find nothing — and it refuses ``.eval()``.  This module
rewrites the graph so that each call of ``aten.linear``, ``aten.conv1d/2d``, ``aten.gru``,
``aten.lstm`` and ``aten.rnn_tanh/relu`` on stored weights becomes a ``call_module`` of the matching
``torch.nn`` layer holding the *same* parameter objects (under the same names), and returns a
plain :class:`torch.fx.GraphModule`.  Outputs are unchanged (the layers call the same ATen ops).
"""

from __future__ import annotations

import torch
from torch import fx, nn

ATEN = torch.ops.aten
RECURRENT = {ATEN.gru.input: nn.GRU, ATEN.lstm.input: nn.LSTM, ATEN.rnn_tanh.input: nn.RNN,
             ATEN.rnn_relu.input: nn.RNN}


def module_from_program(program: torch.export.ExportedProgram) -> fx.GraphModule:
    """The program's module with its Linear / Conv / recurrent calls as ``torch.nn`` layers."""
    graph_module = program.module()
    graph = graph_module.graph
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        layer = _layer_for(graph_module, node)
        if layer is None or not _replaceable(graph_module, *layer[:2]):
            continue
        prefix, module, inputs = layer
        _replace_submodule(graph_module, prefix, module)
        with graph.inserting_before(node):
            call = graph.call_module(prefix, inputs)
        node.replace_all_uses_with(call)
        graph.erase_node(node)
    graph.eliminate_dead_code()
    graph.lint()
    return fx.GraphModule(graph_module, graph).eval()


def _attr(graph_module: fx.GraphModule, node: object) -> tuple[str, torch.Tensor] | None:
    if isinstance(node, fx.Node) and node.op == "get_attr":
        return node.target, graph_module.get_parameter(node.target) if _is_parameter(graph_module, node.target) \
            else graph_module.get_buffer(node.target)
    return None


def _is_parameter(graph_module: fx.GraphModule, name: str) -> bool:
    return name in dict(graph_module.named_parameters())


def _prefix(names: list[str]) -> str | None:
    """The common owner of the weight names (``fc`` for ``fc.weight`` and ``fc.bias``)."""
    owners = {name.rpartition(".")[0] for name in names}
    return owners.pop() if len(owners) == 1 and "" not in owners else None


def _layer_for(graph_module: fx.GraphModule, node: fx.Node) -> tuple[str, nn.Module, tuple] | None:
    """``(prefix, layer, call arguments)`` for a node that a torch.nn layer can take over."""
    target, args = node.target, node.args
    if target in (ATEN.linear.default, ATEN.conv1d.default, ATEN.conv2d.default):
        weight = _attr(graph_module, args[1])
        bias = _attr(graph_module, args[2]) if len(args) > 2 and args[2] is not None else None
        if weight is None or (len(args) > 2 and args[2] is not None and bias is None):
            return None
        prefix = _prefix([weight[0]] + ([bias[0]] if bias else []))
        if prefix is None or not all(name.endswith((".weight", ".bias")) for name in
                                     [weight[0]] + ([bias[0]] if bias else [])):
            return None
        w = weight[1]
        if target == ATEN.linear.default:
            layer: nn.Module = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None)
        else:
            stride, padding, dilation, groups = (list(args[3:7]) + [None] * 4)[:4]
            conv = nn.Conv1d if target == ATEN.conv1d.default else nn.Conv2d
            if isinstance(padding, str):
                return None
            layer = conv(w.shape[1] * (groups or 1), w.shape[0], tuple(w.shape[2:]), stride=stride or 1,
                         padding=padding or 0, dilation=dilation or 1, groups=groups or 1, bias=bias is not None)
        _adopt(layer, "weight", w)
        if bias:
            _adopt(layer, "bias", bias[1])
        return prefix, layer, (args[0],)
    if target in RECURRENT:
        data, hx, params, has_biases, num_layers, dropout, _train, bidirectional, batch_first = args
        weights = [_attr(graph_module, p) for p in params]
        if any(w is None for w in weights):
            return None
        prefix = _prefix([name for name, _ in weights])
        if prefix is None:
            return None
        weight_ih = weights[0][1]
        hidden = weights[1][1].shape[1]
        kwargs = {"nonlinearity": "relu" if target == ATEN.rnn_relu.input else "tanh"} if RECURRENT[target] is nn.RNN \
            else {}
        layer = RECURRENT[target](weight_ih.shape[1], hidden, num_layers=num_layers, bias=has_biases,
                                  batch_first=batch_first, dropout=dropout, bidirectional=bidirectional, **kwargs)
        if [name.rpartition(".")[2] for name, _ in weights] != layer._flat_weights_names:
            return None
        for name, tensor in weights:
            _adopt(layer, name.rpartition(".")[2], tensor)
        layer.flatten_parameters()
        state = tuple(hx) if isinstance(hx, (list, tuple)) else hx
        return prefix, layer, (data, state)
    return None


def _adopt(layer: nn.Module, name: str, tensor: torch.Tensor) -> None:
    """Put the program's own tensor (same object, so the same name in the state_dict) into ``layer``."""
    parameter = tensor if isinstance(tensor, nn.Parameter) else nn.Parameter(tensor, requires_grad=False)
    setattr(layer, name, parameter)


def _replaceable(graph_module: fx.GraphModule, prefix: str, layer: nn.Module) -> bool:
    """True if the attribute holder ``prefix`` holds nothing but this layer's tensors."""
    old = graph_module.get_submodule(prefix)
    own = {name for name, _ in old.named_parameters(recurse=False)} | {name for name, _ in old.named_buffers(recurse=False)}
    return not list(old.children()) and own <= {name for name, _ in layer.named_parameters(recurse=False)}


def _replace_submodule(graph_module: fx.GraphModule, prefix: str, layer: nn.Module) -> None:
    parent_name, _, child = prefix.rpartition(".")
    setattr(graph_module.get_submodule(parent_name) if parent_name else graph_module, child, layer)
