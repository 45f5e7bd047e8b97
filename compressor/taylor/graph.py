"""Which structures a model has, which of them are tied together, and which are left alone.

A *structure* (Molchanov et al. 2019) is one output channel of a ``Conv1d/2d``, one output
neuron of a ``Linear`` or one hidden unit of one direction of one layer of an
``nn.RNN/GRU/LSTM``.  Every structure is an *atom*; the atoms of one layer form a *space*
(``Space``).  Removing an atom deletes its output row(s) from the producer and the matching
input column(s) from every consumer.  Some atoms can only be removed together — the analysis
ties them (a union–find over atoms); an equivalence class of tied atoms is a prunable *unit*:

* a residual addition ``a + b``: channel k of ``a`` and channel k of ``b`` (the tensors must
  keep the same shape), and so on through chains of blocks;
* a concatenation along the channel dimension keeps its inputs' atoms side by side (no tie);
  a concatenation along another dimension ties index-wise;
* a depthwise convolution (``groups == in_channels``, multiplier m): input channel c with its
  output channels ``c·m … c·m + m − 1``; a grouped convolution: position i of every group with
  position i of group 0, on its input and on its output, so that all groups keep equal sizes;
* a view that splits a channel dimension into (segments, channels) — ``out.view(T, B, 2, H)``
  of a bidirectional layer — ties the segments index-wise (``H`` must stay one number);
* GRU/LSTM/RNN gates need no tie: hidden unit k of direction d of layer l owns rows
  ``g·H + k`` (every gate g) of that direction's ``weight_ih``, ``weight_hh`` and biases and
  column k of its ``weight_hh``; its consumers are columns ``d·H + k`` of the next layer's
  ``weight_ih`` (both directions), or of whatever consumes the module's output.

An atom is *fixed* (tied to the pseudo-atom 0 and never removed) when removing it could change
what the model computes or break a shape: it reaches the model output, feeds an operation the
analysis does not model (LayerNorm, softmax, sigmoid, matmul, an untraceable module, ...), is
added to a tensor without channels (``x + 1``, ``x + input``), is mixed with the batch
dimension, the module's final hidden state ``h_n`` is used, and so on.  Each fixed space is
reported by name with the reason (``Analysis.left_alone``) — never an exception.

The graph comes from ``torch.fx`` (``symbolic_trace`` with a tracer that keeps every
``torch.nn`` module a leaf).  A submodule whose ``forward`` fx cannot trace (data-dependent
control flow, a Python loop over the time axis) becomes an *opaque* leaf: its inputs and
outputs are fixed, and each of its children is analysed on its own as a *region* with a fixed
interface (inputs captured in one forward pass), recursively.  If the whole model cannot be
traced, its children are analysed that way.  Shapes come from ``ShapeProp`` on example inputs.

A tied tensor that passes through a BatchNorm is re-masked after it (a zeroed channel leaves a
BatchNorm as ``β − γμ/σ``, not 0): every BatchNorm on a prunable channel is a mask site.
"""

from __future__ import annotations

import operator
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

FIXED = 0

RNN_TYPES: tuple[type[nn.Module], ...] = (nn.RNN, nn.GRU, nn.LSTM)
CONV_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d)
BN_TYPES: tuple[type[nn.Module], ...] = (nn.BatchNorm1d, nn.BatchNorm2d)
#: f(0) = 0 elementwise: a removed (zero) channel stays zero through these modules
ZERO_PRESERVING_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Tanh, nn.Hardswish, nn.Mish, nn.Softsign,
    nn.Hardshrink, nn.Softshrink, nn.Tanhshrink, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.CELU,
    nn.SELU, nn.PReLU,
)
#: modules acting on the dimensions after the channel dimension (1) only
SPATIAL_MODULES: tuple[type[nn.Module], ...] = (
    nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.Upsample, nn.ZeroPad2d,
)
ZERO_PRESERVING_FUNCTIONS = {
    torch.relu, torch.relu_, F.relu, F.relu_, F.relu6, F.gelu, F.silu, F.elu, F.leaky_relu, F.hardswish, F.mish,
    torch.tanh, F.tanh, F.dropout, F.dropout1d, F.dropout2d, torch.dropout, operator.neg, torch.neg, F.softsign,
    torch.nn.functional.selu, torch.nn.functional.celu,
}
ZERO_PRESERVING_METHODS = {"relu", "relu_", "tanh", "tanh_", "contiguous", "clone", "float", "detach", "neg",
                           "requires_grad_"}
SPATIAL_FUNCTIONS = {
    F.max_pool1d, F.max_pool2d, F.avg_pool1d, F.avg_pool2d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d,
    F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.interpolate, torch.max_pool1d, torch.max_pool2d,
    torch.avg_pool1d,
}
ADD_LIKE = {operator.add, operator.iadd, operator.sub, operator.isub, torch.add, torch.sub}
MUL_LIKE = {operator.mul, operator.imul, torch.mul}
DIV_LIKE = {operator.truediv, operator.itruediv, torch.div}
RESHAPE_METHODS = {"view", "reshape", "flatten"}
META_FUNCTIONS = {getattr, len}
META_METHODS = {"size", "dim", "numel", "type", "is_contiguous", "__len__"}


@dataclass
class Space:
    """The atoms (structures) of one producer: a Conv/Linear's output channels, or one
    direction of one layer of a recurrent module."""

    index: int
    name: str
    kind: str  # "conv" | "linear" | "rnn"
    module: str
    size: int
    atoms: np.ndarray
    #: module whose output is masked (and gated "after BN"): the BatchNorm right after a
    #: Conv/Linear when it is that output's only user, else the producer itself
    end: str = ""
    bn: str | None = None
    layer: int = 0
    direction: int = 0


@dataclass
class Chan:
    """Channel layout of a tensor: index j along ``dim`` belongs to atom ``ids[j]`` (0 = fixed)."""

    dim: int
    ids: np.ndarray


@dataclass
class Site:
    """A forward hook multiplying a module's output along ``dim`` (counted from the end) by the
    keep-mask (and gates) of the atoms ``ids``; ``rnn``: the output is ``(out, h)``."""

    module: str
    dim: int
    ids: np.ndarray
    rnn: bool = False


@dataclass
class Consumer:
    """Input columns of a module: index j of its input channel dimension is atom ``ids[j]``."""

    module: str
    kind: str  # "conv" | "linear" | "rnn" | "bn"
    ids: np.ndarray


@dataclass
class RnnInfo:
    """A recurrent module: its type (``mode``), sizes and the space of each (layer, direction)."""

    module: str
    mode: str
    layers: int
    directions: int
    hidden: int
    gates: int
    spaces: list[list[int]]  # [layer][direction] -> space index


@dataclass
class _RnnOut:
    info: RnnInfo


@dataclass
class Region:
    """A part of the model traced by torch.fx with a fixed interface: the whole model, or a child
    of an untraceable module."""

    path: str
    opaque: frozenset[str]
    graph_module: fx.GraphModule
    #: view/reshape nodes whose output dimension ``dim`` carries the atoms ``ids``
    reshapes: dict[str, tuple[int, np.ndarray]] = field(default_factory=dict)


@dataclass
class FlopRecord:
    """Input and output shapes of one call of a Conv/Linear/RNN module on the example inputs."""

    module: str
    kind: str
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]


class RegionUntraceable(Exception):
    """The forward of a region's own module cannot be traced (its children are analysed instead)."""


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix and name else prefix or name


class _Tracer(fx.Tracer):
    """fx tracer: torch.nn modules are leaves (as usual), and so is every module in ``opaque``;
    remembers the innermost non-leaf module whose forward failed."""

    def __init__(self, opaque: Iterable[str]) -> None:
        super().__init__()
        self.opaque = set(opaque)
        self.failed: str | None = None

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return module_qualified_name in self.opaque or super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m, forward, args, kwargs):
        name = self.path_of_module(m)
        if self.is_leaf_module(m, name):
            return super().call_module(m, forward, args, kwargs)
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed is None:
                self.failed = name
            raise


def trace(module: nn.Module, opaque: Iterable[str] = ()) -> fx.GraphModule:
    """``module`` traced with the analysis' leaf policy (``opaque`` modules are leaves)."""
    tracer = _Tracer(opaque)
    graph = tracer.trace(module)
    return fx.GraphModule(tracer.root, graph, module.__class__.__name__)


def trace_with_opaque(module: nn.Module) -> tuple[fx.GraphModule, dict[str, str]]:
    """Trace ``module``, making every submodule whose forward fails opaque; returns the graph
    module and ``{opaque submodule: why}``.  Raises :class:`RegionUntraceable` if the module's
    own forward cannot be traced."""
    opaque: dict[str, str] = {}
    while True:
        tracer = _Tracer(opaque)
        try:
            graph = tracer.trace(module)
        except Exception as error:
            reason = f"not traceable by torch.fx ({type(error).__name__}: {str(error).splitlines()[0][:160]})"
            if tracer.failed is None or tracer.failed in opaque or tracer.failed == "":
                raise RegionUntraceable(reason) from error
            opaque[tracer.failed] = reason
            continue
        return fx.GraphModule(tracer.root, graph, module.__class__.__name__), opaque


def _tensors_only(args: tuple, kwargs: dict) -> bool:
    return not kwargs and all(isinstance(a, torch.Tensor) for a in args)


def _shape(node) -> tuple[int, ...] | None:
    if not isinstance(node, fx.Node):
        return None
    meta = node.meta.get("tensor_meta")
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def _norm_dim(dim: int, ndim: int) -> int:
    return dim + ndim if dim < 0 else dim


def _reshape_groups(a: Sequence[int], b: Sequence[int]) -> list[tuple[list[int], list[int]]]:
    """Pair runs of input dims ``a`` and output dims ``b`` with equal products (a reshape's blocks)."""
    groups: list[tuple[list[int], list[int]]] = []
    i = j = 0
    while i < len(a) and j < len(b):
        ia, jb, pa, pb = [i], [j], a[i], b[j]
        i, j = i + 1, j + 1
        while pa != pb:
            if pa < pb and i < len(a):
                ia.append(i)
                pa *= a[i]
                i += 1
            elif j < len(b):
                jb.append(j)
                pb *= b[j]
                j += 1
            else:
                return []
        groups.append((ia, jb))
    if not groups:
        return []
    groups[-1][0].extend(range(i, len(a)))
    groups[-1][1].extend(range(j, len(b)))
    return groups


class Analysis:
    """Atoms, spaces, ties, mask sites and consumers of a model (see the module docstring)."""

    def __init__(self, model: nn.Module, example_inputs: Sequence[torch.Tensor]) -> None:
        self.parent: list[int] = [0]
        self.atom_space: list[int] = [-1]
        self.spaces: list[Space] = []
        self.space_by_module: dict[str, list[int]] = {}
        self.sites: dict[str, Site] = {}
        self.consumers: dict[str, Consumer] = {}
        self.rnns: dict[str, RnnInfo] = {}  # recurrent modules whose units can be removed
        self.rnn_spaces: dict[str, RnnInfo] = {}  # every recurrent module met
        self.regions: list[Region] = []
        self.opaque: dict[str, str] = {}
        self.opaque_types: dict[str, str] = {}
        self.reasons: dict[int, list[str]] = defaultdict(list)
        self.flops: list[FlopRecord] = []
        self.param_numel: dict[str, int] = {name: sum(p.numel() for p in m.parameters(recurse=False))
                                            for name, m in model.named_modules()}
        inputs = tuple(example_inputs)
        captured = self._capture(model, inputs)
        self._visit_region("", model, inputs, captured)

    # ------------------------------------------------------------------ union-find
    def _new_atoms(self, n: int, space: int) -> np.ndarray:
        start = len(self.parent)
        self.parent.extend(range(start, start + n))
        self.atom_space.extend([space] * n)
        return np.arange(start, start + n, dtype=np.int64)

    def find(self, a: int) -> int:
        parent = self.parent
        root = a
        while parent[root] != root:
            root = parent[root]
        while parent[a] != root:
            parent[a], a = root, parent[a]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(int(a)), self.find(int(b))
        if ra == rb:
            return
        if rb == self.find(FIXED) or (ra != self.find(FIXED) and rb < ra):
            ra, rb = rb, ra
        self.parent[rb] = ra

    def union_arrays(self, a: np.ndarray, b: np.ndarray) -> None:
        for x, y in zip(a.tolist(), b.tolist()):
            self.union(x, y)

    def fix(self, ids: np.ndarray | Iterable[int], reason: str) -> None:
        for atom in set(np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids).tolist()):
            if atom == FIXED:
                continue
            self.union(FIXED, atom)
            space = self.atom_space[atom]
            if reason not in self.reasons[space] and len(self.reasons[space]) < 4:
                self.reasons[space].append(reason)

    def is_fixed(self, atom: int) -> bool:
        return self.find(atom) == self.find(FIXED)

    @property
    def n_atoms(self) -> int:
        return len(self.parent)

    # ------------------------------------------------------------------ regions
    def _capture(self, model: nn.Module, inputs: tuple) -> dict[str, tuple]:
        """First-call inputs of every submodule (eval mode, no gradients; modes restored), and the
        input/output shapes of every Conv/Linear/RNN call for FLOPs counting."""
        captured: dict[str, tuple] = {}
        handles = []
        kinds = ((CONV_TYPES, "conv"), ((nn.Linear,), "linear"), (RNN_TYPES, "rnn"))
        for name, module in model.named_modules():
            def pre_hook(mod, args, kwargs, name=name):
                if name not in captured:
                    captured[name] = tuple(a.detach().clone() if isinstance(a, torch.Tensor) else a for a in args) \
                        if _tensors_only(args, kwargs) else None
            handles.append(module.register_forward_pre_hook(pre_hook, with_kwargs=True))
            kind = next((k for types, k in kinds if isinstance(module, types)), None)
            if kind is not None:
                def hook(mod, args, output, name=name, kind=kind):
                    out = output[0] if isinstance(output, tuple) else output
                    if args and isinstance(args[0], torch.Tensor) and isinstance(out, torch.Tensor):
                        self.flops.append(FlopRecord(name, kind, tuple(args[0].shape), tuple(out.shape)))
                handles.append(module.register_forward_hook(hook))
        modes = {m: m.training for m in model.modules()}
        try:
            model.eval()
            with torch.no_grad():
                model(*inputs)
        finally:
            for handle in handles:
                handle.remove()
            for m, mode in modes.items():
                m.training = mode
        return captured

    def _visit_region(self, path: str, module: nn.Module, inputs: tuple | None, captured: dict) -> None:
        if inputs is None:
            self.opaque.setdefault(path or "<model>", "called with non-tensor or keyword arguments")
            self.opaque_types[path or "<model>"] = type(module).__name__
            return
        try:
            gm, opaque = trace_with_opaque(module)
            modes = {m: m.training for m in module.modules()}
            try:
                module.eval()
                with torch.no_grad():
                    ShapeProp(gm).propagate(*inputs)
            finally:
                for m, mode in modes.items():
                    m.training = mode
        except Exception as error:  # noqa: BLE001 - report, analyse the children
            reason = str(error) if isinstance(error, RegionUntraceable) else \
                f"shape propagation failed ({type(error).__name__}: {str(error).splitlines()[0][:160]})"
            self.opaque[path or "<model>"] = reason
            self.opaque_types[path or "<model>"] = type(module).__name__
            self._visit_children(path, module, captured)
            return
        region = Region(path, frozenset(opaque), gm)
        self.regions.append(region)
        for name, why in opaque.items():
            self.opaque[_join(path, name)] = why
            self.opaque_types[_join(path, name)] = type(module.get_submodule(name)).__name__
        _Propagator(self, region).run()
        for name in opaque:
            self._visit_children(_join(path, name), module.get_submodule(name), captured)

    def _visit_children(self, path: str, module: nn.Module, captured: dict) -> None:
        for name, child in module.named_children():
            child_path = _join(path, name)
            if _is_leaf_type(child) or isinstance(child, (nn.ModuleList, nn.ModuleDict)):
                if isinstance(child, (nn.ModuleList, nn.ModuleDict)):
                    self._visit_children(child_path, child, captured)
                continue
            if child_path not in captured:
                continue  # never called
            self._visit_region(child_path, child, captured[child_path], captured)

    # ------------------------------------------------------------------ bookkeeping used by the propagator
    def new_space(self, name: str, kind: str, module: str, size: int, **extra) -> Space:
        index = len(self.spaces)
        space = Space(index, name, kind, module, size, self._new_atoms(size, index), end=module, **extra)
        self.spaces.append(space)
        self.space_by_module.setdefault(module, []).append(index)
        return space

    def add_consumer(self, module: str, kind: str, ids: np.ndarray) -> None:
        old = self.consumers.get(module)
        if old is None:
            self.consumers[module] = Consumer(module, kind, ids.copy())
        elif len(old.ids) == len(ids):
            self.union_arrays(old.ids, ids)
        else:
            self.fix(old.ids, f"{module} is called on inputs of different widths")
            self.fix(ids, f"{module} is called on inputs of different widths")

    def add_site(self, module: str, dim: int, ids: np.ndarray, rnn: bool = False) -> None:
        old = self.sites.get(module)
        if old is None:
            self.sites[module] = Site(module, dim, ids.copy(), rnn)
        elif len(old.ids) == len(ids) and old.dim == dim:
            self.union_arrays(old.ids, ids)
        else:
            self.fix(old.ids, f"{module} is called on differently shaped inputs")
            self.fix(ids, f"{module} is called on differently shaped inputs")

    # ------------------------------------------------------------------ results
    def space_of(self, atom: int) -> Space:
        return self.spaces[self.atom_space[atom]]

    def atom_name(self, atom: int) -> str:
        space = self.space_of(atom)
        return f"{space.name}[{atom - int(space.atoms[0])}]"

    def classes(self) -> list[list[int]]:
        """Equivalence classes of prunable (non-fixed) atoms, in atom order."""
        by_root: dict[int, list[int]] = {}
        fixed_root = self.find(FIXED)
        for atom in range(1, self.n_atoms):
            root = self.find(atom)
            if root != fixed_root:
                by_root.setdefault(root, []).append(atom)
        return list(by_root.values())

    def left_alone(self) -> dict[str, str]:
        """``{name: why}`` for untraceable modules and every space with fixed atoms."""
        out = {f"{path} ({self._type_name(path)})": why for path, why in self.opaque.items()}
        fixed_root = self.find(FIXED)
        for space in self.spaces:
            fixed = [a for a in space.atoms.tolist() if self.find(a) == fixed_root]
            if not fixed:
                continue
            why = "; ".join(self.reasons.get(space.index, []))
            if not why:
                partners = sorted({self.spaces[s].name for s in self._tied_spaces(space) if self.reasons.get(s)})
                why = "tied to " + (", ".join(partners) if partners else "a fixed structure")
            count = "" if len(fixed) == space.size else f" ({len(fixed)} of {space.size} units)"
            out[f"{space.name}{count}"] = why
        return out

    def _tied_spaces(self, space: Space) -> set[int]:
        roots = {self.find(a) for a in space.atoms.tolist()}
        return {self.atom_space[a] for a in range(1, self.n_atoms) if self.find(a) in roots} - {space.index}

    def _type_name(self, path: str) -> str:
        return self.opaque_types.get(path, "module")


def _is_leaf_type(module: nn.Module) -> bool:
    return (module.__module__.startswith("torch.nn") or module.__module__.startswith("torch.ao.nn")) \
        and not isinstance(module, nn.Sequential)


class _Propagator:
    """Walks one region's fx graph and propagates channel layouts (:class:`Chan`) node by node."""

    def __init__(self, analysis: Analysis, region: Region) -> None:
        self.a = analysis
        self.region = region
        self.gm = region.graph_module
        self.val: dict[fx.Node, object] = {}

    def full(self, target: str) -> str:
        return _join(self.region.path, target)

    def run(self) -> None:
        for node in self.gm.graph.nodes:
            try:
                self.val[node] = self.visit(node)
            except Exception as error:  # noqa: BLE001 - an op we misread: leave its channels alone
                self.unknown(node, f"could not be analysed ({type(error).__name__}: {error})")
                self.val[node] = None

    # ------------------------------------------------------------------ helpers
    def chan(self, arg) -> Chan | None:
        value = self.val.get(arg) if isinstance(arg, fx.Node) else None
        return value if isinstance(value, Chan) else None

    def chans_in(self, obj) -> list[Chan]:
        found: list[Chan] = []
        if isinstance(obj, fx.Node):
            value = self.val.get(obj)
            if isinstance(value, Chan):
                found.append(value)
            elif isinstance(value, _RnnOut):
                found.append(Chan(-1, np.concatenate([self.a.spaces[s].atoms for layer in value.info.spaces
                                                      for s in layer])))
        elif isinstance(obj, (list, tuple)):
            for item in obj:
                found += self.chans_in(item)
        elif isinstance(obj, dict):
            for item in obj.values():
                found += self.chans_in(item)
        return found

    def describe(self, node: fx.Node) -> str:
        if node.op == "call_module":
            return f"{self.full(node.target)} ({type(self.gm.get_submodule(node.target)).__name__})"
        if node.op == "call_method":
            return f".{node.target}()"
        if node.op == "output":
            return "the output"
        return getattr(node.target, "__name__", str(node.target))

    def unknown(self, node: fx.Node, why: str | None = None) -> None:
        reason = f"feeds {self.describe(node)}" + (f", which {why}" if why else ", which the analysis does not model")
        for chan in self.chans_in((node.args, node.kwargs)):
            self.a.fix(chan.ids, reason)

    def arg(self, node: fx.Node, index: int, name: str, default=None):
        if len(node.args) > index:
            return node.args[index]
        return node.kwargs.get(name, default)

    # ------------------------------------------------------------------ dispatch
    def visit(self, node: fx.Node):
        if node.op in ("placeholder", "get_attr"):
            return None
        if node.op == "output":
            where = f"the output of {self.region.path}" if self.region.path else "the model output"
            for chan in self.chans_in(node.args):
                self.a.fix(chan.ids, f"reaches {where}")
            return None
        if node.op == "call_module":
            return self.visit_module(node, self.gm.get_submodule(node.target))
        if node.op == "call_function":
            return self.visit_function(node)
        if node.op == "call_method":
            return self.visit_method(node)
        self.unknown(node)
        return None

    # ------------------------------------------------------------------ modules
    def visit_module(self, node: fx.Node, m: nn.Module):
        path = self.full(node.target)
        if isinstance(m, RNN_TYPES):
            return self.rnn(node, m, path)
        single = len(node.args) == 1 and not node.kwargs
        x = self.chan(node.args[0]) if node.args else None
        in_shape, out_shape = _shape(node.args[0]) if node.args else None, _shape(node)
        if isinstance(m, CONV_TYPES) and single:
            return self.conv(node, m, path, x, in_shape, out_shape)
        if isinstance(m, nn.Linear) and single:
            return self.linear(node, m, path, x, in_shape, out_shape)
        if not single:
            self.unknown(node)
            return None
        if x is None:
            return None
        ndim = len(in_shape)
        if isinstance(m, BN_TYPES):
            if x.dim != 1 or ndim < 2:
                self.a.fix(x.ids, f"feeds {path} on a dimension other than its channels")
                return None
            self.a.add_consumer(path, "bn", x.ids)
            self.a.add_site(path, 1 - ndim, x.ids)
            return Chan(1, x.ids)
        if isinstance(m, nn.Hardtanh) and not m.min_val <= 0 <= m.max_val:
            self.unknown(node, "does not keep zero at zero")
            return None
        if isinstance(m, ZERO_PRESERVING_MODULES):
            if isinstance(m, nn.PReLU) and m.num_parameters > 1:
                self.unknown(node, "has a parameter per channel")
                return None
            return Chan(x.dim, x.ids)
        if isinstance(m, nn.Hardtanh):
            return Chan(x.dim, x.ids)
        if isinstance(m, SPATIAL_MODULES):
            if x.dim != 1:
                self.unknown(node, "pools over the channel dimension")
                return None
            return Chan(1, x.ids)
        if isinstance(m, nn.Flatten):
            return self.reshape(node, x, in_shape, out_shape)
        self.unknown(node)
        return None

    def conv(self, node, m: nn.Module, path: str, x: Chan | None, in_shape, out_shape):
        channel_dim = len(out_shape) - 1 - len(m.kernel_size)
        if x is not None and x.dim != channel_dim:
            self.a.fix(x.ids, f"feeds {path} on a dimension other than its channels")
            x = None
        ids_in = x.ids if x is not None else np.zeros(m.in_channels, np.int64)
        space = self._space(path, "conv", m.out_channels)
        groups = m.groups
        if groups == 1:
            pass
        elif groups == m.in_channels:  # depthwise: input channel c ↔ outputs c·mult … c·mult + mult − 1
            mult = m.out_channels // groups
            for c in range(groups):
                for j in range(mult):
                    self.a.union(int(ids_in[c]), int(space.atoms[c * mult + j]))
        else:  # grouped: equal group sizes, position i tied across groups on both sides
            n_in, n_out = m.in_channels // groups, m.out_channels // groups
            for g in range(1, groups):
                self.a.union_arrays(ids_in[g * n_in:(g + 1) * n_in], ids_in[:n_in])
                self.a.union_arrays(space.atoms[g * n_out:(g + 1) * n_out], space.atoms[:n_out])
        self.a.add_consumer(path, "conv", ids_in)
        self._end(node, space, path, channel_dim - len(out_shape))
        return Chan(channel_dim, space.atoms)

    def linear(self, node, m: nn.Linear, path: str, x: Chan | None, in_shape, out_shape):
        last = len(out_shape) - 1
        if x is not None and x.dim != len(in_shape) - 1:
            self.a.fix(x.ids, f"feeds {path} on a dimension other than its features")
            x = None
        self.a.add_consumer(path, "linear", x.ids if x is not None else np.zeros(m.in_features, np.int64))
        space = self._space(path, "linear", m.out_features)
        self._end(node, space, path, -1)
        return Chan(last, space.atoms)

    def _space(self, path: str, kind: str, size: int) -> Space:
        existing = self.a.space_by_module.get(path)
        if existing:
            return self.a.spaces[existing[0]]
        return self.a.new_space(path, kind, path, size)

    def _end(self, node: fx.Node, space: Space, path: str, dim_from_end: int) -> None:
        """Mask after the BatchNorm that is this output's only user, else on the producer."""
        users = list(node.users)
        if len(users) == 1 and users[0].op == "call_module" and users[0].args and users[0].args[0] is node \
                and isinstance(self.gm.get_submodule(users[0].target), BN_TYPES) and dim_from_end == 1 - len(_shape(node)):
            space.bn = space.end = self.full(users[0].target)
            return
        space.end = path
        self.a.add_site(path, dim_from_end, space.atoms)

    def rnn(self, node: fx.Node, m: nn.RNNBase, path: str):
        existing = self.a.rnn_spaces.get(path)
        gates = {"GRU": 3, "LSTM": 4}.get(m.mode, 1)
        directions = 2 if m.bidirectional else 1
        if existing is None:
            spaces = [[self.a.new_space(f"{path}.l{layer}{'_reverse' if d else ''}", "rnn", path, m.hidden_size,
                                        layer=layer, direction=d).index for d in range(directions)]
                      for layer in range(m.num_layers)]
            info = RnnInfo(path, m.mode, m.num_layers, directions, m.hidden_size, gates, spaces)
            if m.proj_size == 0:
                self.a.rnns[path] = info
            self.a.rnn_spaces[path] = info
        else:
            info = existing
        all_atoms = np.concatenate([self.a.spaces[s].atoms for layer in info.spaces for s in layer])
        x = self.chan(node.args[0]) if node.args else None
        in_shape = _shape(node.args[0]) if node.args else None
        if x is not None and (in_shape is None or x.dim != len(in_shape) - 1):
            self.a.fix(x.ids, f"feeds {path} on a dimension other than its features")
            x = None
        ids_in = x.ids if x is not None else np.zeros(m.input_size, np.int64)
        if m.proj_size > 0:
            self.a.fix(ids_in, f"feeds {path}, an LSTM with proj_size (not handled)")
            self.a.fix(all_atoms, "LSTM with proj_size is not handled")
            return _RnnOut(info)
        if len(node.args) > 1 or node.kwargs:
            self.a.fix(all_atoms, "an initial hidden state is passed in")
        self.a.add_consumer(path, "rnn", ids_in)
        last = np.concatenate([self.a.spaces[s].atoms for s in info.spaces[-1]])
        self.a.add_site(path, -1, last, rnn=True)
        for user in node.users:
            if not (user.op == "call_function" and user.target is operator.getitem and user.args[1] in (0, 1)):
                self.a.fix(all_atoms, f"its output tuple feeds {self.describe(user)}")
        return _RnnOut(info)

    # ------------------------------------------------------------------ functions and methods
    def visit_function(self, node: fx.Node):
        target = node.target
        if target in META_FUNCTIONS:
            return None
        if target is operator.getitem:
            return self.getitem(node)
        x = self.chan(node.args[0]) if node.args else None
        if target in ADD_LIKE or target in MUL_LIKE or target in DIV_LIKE:
            return self.binary(node, target)
        if not self.chans_in((node.args, node.kwargs)):
            return None
        if target in (torch.cat, torch.concat):
            return self.cat(node)
        if target is torch.stack:
            return self.stack(node)
        others = self.chans_in((node.args[1:], node.kwargs))
        if target in ZERO_PRESERVING_FUNCTIONS and x is not None and not others:
            return Chan(x.dim, x.ids)
        if target in (torch.clamp, torch.clip, F.hardtanh) and x is not None and not others:
            return self.clamp(node, x, target is F.hardtanh)
        if target in SPATIAL_FUNCTIONS and x is not None and not others:
            if x.dim != 1:
                self.unknown(node, "acts on the channel dimension")
                return None
            return Chan(1, x.ids)
        if target is torch.flatten and x is not None and not others:
            return self.reshape(node, x, _shape(node.args[0]), _shape(node))
        if target is torch.reshape and x is not None and not others:
            return self.reshape(node, x, _shape(node.args[0]), _shape(node))
        if target in (torch.permute, torch.transpose, torch.swapaxes, torch.movedim, torch.squeeze,
                      torch.unsqueeze, torch.t) and x is not None and not others:
            return self.move(node, x, target.__name__)
        if target in (torch.sum, torch.mean, torch.amax, torch.amin) and x is not None and not others:
            return self.reduce(node, x, target.__name__)
        if target is F.pad and x is not None and not others:
            return self.pad(node, x)
        if target is torch.flip and x is not None and not others:
            return self.flip(node, x)
        self.unknown(node)
        return None

    def visit_method(self, node: fx.Node):
        name = node.target
        if name in META_METHODS:
            return None
        x = self.chan(node.args[0]) if node.args else None
        if name in ("add", "add_", "sub", "sub_"):
            return self.binary(node, operator.add)
        if name in ("mul", "mul_"):
            return self.binary(node, operator.mul)
        if name in ("div", "div_"):
            return self.binary(node, operator.truediv)
        if not self.chans_in((node.args, node.kwargs)):
            return None
        others = self.chans_in((node.args[1:], node.kwargs))
        if x is None or others:
            self.unknown(node)
            return None
        if name in ZERO_PRESERVING_METHODS:
            return Chan(x.dim, x.ids)
        if name == "to" and all(isinstance(a, (torch.dtype, torch.device, str)) for a in node.args[1:]):
            return Chan(x.dim, x.ids)
        if name in ("clamp", "clamp_", "clip", "clip_"):
            return self.clamp(node, x, False)
        if name in RESHAPE_METHODS:
            return self.reshape(node, x, _shape(node.args[0]), _shape(node))
        if name in ("permute", "transpose", "swapaxes", "movedim", "squeeze", "unsqueeze", "t"):
            return self.move(node, x, name)
        if name in ("sum", "mean", "amax", "amin"):
            return self.reduce(node, x, name)
        if name == "flip":
            return self.flip(node, x)
        self.unknown(node)
        return None

    def getitem(self, node: fx.Node):
        base = node.args[0]
        value = self.val.get(base) if isinstance(base, fx.Node) else None
        if isinstance(value, _RnnOut):
            info = value.info
            if node.args[1] == 0:
                shape = _shape(node)
                if shape is None:  # a PackedSequence
                    self.a.fix(np.concatenate([self.a.spaces[s].atoms for layer in info.spaces for s in layer]),
                               "its output is not a plain tensor (PackedSequence?)")
                    return None
                return Chan(len(shape) - 1, np.concatenate([self.a.spaces[s].atoms for s in info.spaces[-1]]))
            if node.users:
                self.a.fix(np.concatenate([self.a.spaces[s].atoms for layer in info.spaces for s in layer]),
                           "its final hidden state h_n is used")
            return None
        if not isinstance(value, Chan):
            return None
        in_shape = _shape(base)
        chan = Chan(_norm_dim(value.dim, len(in_shape)), value.ids)
        index = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
        if any(item is Ellipsis for item in index):
            at = index.index(Ellipsis)
            used = sum(1 for item in index if item is not None and item is not Ellipsis)
            index = index[:at] + (slice(None),) * (len(in_shape) - used) + index[at + 1:]
        in_dim = out_dim = 0
        new_dim = None
        for item in index:
            if item is None:
                out_dim += 1
                continue
            if isinstance(item, slice):
                full = item.start is None and item.stop is None and item.step is None
                if in_dim == chan.dim:
                    if not full:
                        self.unknown(node, "slices the channel dimension")
                        return None
                    new_dim = out_dim
                in_dim += 1
                out_dim += 1
            elif isinstance(item, int):
                if in_dim == chan.dim:
                    self.unknown(node, "indexes the channel dimension")
                    return None
                in_dim += 1
            else:
                self.unknown(node, "uses advanced indexing")
                return None
        if new_dim is None:
            new_dim = out_dim + (chan.dim - in_dim)
        return Chan(new_dim, chan.ids)

    def binary(self, node: fx.Node, target) -> Chan | None:
        operands = list(node.args[:2])
        out_shape = _shape(node)
        if out_shape is None:
            self.unknown(node)
            return None
        out_nd = len(out_shape)
        chans, plain = [], []
        for operand in operands:
            chan = self.chan(operand)
            if chan is not None:
                shape = _shape(operand)
                chans.append((Chan(_norm_dim(chan.dim, len(shape)) + out_nd - len(shape), chan.ids), shape))
            else:
                plain.append(operand)
        if not chans:
            return None
        is_add = target in ADD_LIKE
        is_div = target in DIV_LIKE
        if is_div and self.chan(operands[1]) is not None:
            self.unknown(node, "divides by a tensor with channels")
            return None
        first = chans[0][0]
        if len(chans) == 2:
            second = chans[1][0]
            if first.dim != second.dim or len(first.ids) != len(second.ids):
                self.unknown(node, "combines channels on different dimensions")
                return None
            self.a.union_arrays(first.ids, second.ids)
            return Chan(first.dim, first.ids)
        other = plain[0] if plain else None
        if isinstance(other, fx.Node):
            shape = _shape(other)
            if shape is None:
                self.unknown(node)
                return None
            offset = out_nd - len(shape)
            size = shape[first.dim - offset] if first.dim - offset >= 0 else 1
            if size != 1:
                self.unknown(node, "combines them with a tensor without prunable channels")
                return None
            if is_add:
                self.unknown(node, "adds a value to removed (zero) channels")
                return None
            return Chan(first.dim, first.ids)
        if is_add and other != 0:
            self.unknown(node, "adds a constant to removed (zero) channels")
            return None
        return Chan(first.dim, first.ids)

    def clamp(self, node, x: Chan, hardtanh: bool) -> Chan | None:
        if hardtanh:
            low, high = self.arg(node, 1, "min_val", -1.0), self.arg(node, 2, "max_val", 1.0)
        else:
            low, high = self.arg(node, 1, "min", None), self.arg(node, 2, "max", None)
        if isinstance(low, fx.Node) or isinstance(high, fx.Node) or (low is not None and low > 0) \
                or (high is not None and high < 0):
            self.unknown(node, "does not keep zero at zero")
            return None
        return Chan(x.dim, x.ids)

    def cat(self, node: fx.Node) -> Chan | None:
        tensors = self.arg(node, 0, "tensors")
        out_shape = _shape(node)
        dim = _norm_dim(self.arg(node, 1, "dim", 0), len(out_shape))
        chans = [self.chan(t) for t in tensors]
        normalized = [Chan(_norm_dim(c.dim, len(out_shape)), c.ids) if c is not None else None for c in chans]
        if all(c is None or c.dim == dim for c in normalized):
            parts = [c.ids if c is not None else np.zeros(_shape(t)[dim], np.int64)
                     for c, t in zip(normalized, tensors)]
            return Chan(dim, np.concatenate(parts))
        if all(c is not None and c.dim == normalized[0].dim and len(c.ids) == len(normalized[0].ids)
               for c in normalized):
            for c in normalized[1:]:
                self.a.union_arrays(normalized[0].ids, c.ids)
            return Chan(normalized[0].dim, normalized[0].ids)
        self.unknown(node, "concatenates channels with a tensor without them")
        return None

    def stack(self, node: fx.Node) -> Chan | None:
        tensors = self.arg(node, 0, "tensors")
        out_shape = _shape(node)
        dim = _norm_dim(self.arg(node, 1, "dim", 0), len(out_shape))
        chans = [self.chan(t) for t in tensors]
        if not all(c is not None for c in chans):
            self.unknown(node, "stacks channels with a tensor without them")
            return None
        in_nd = len(out_shape) - 1
        dims = {_norm_dim(c.dim, in_nd) for c in chans}
        if len(dims) != 1 or len({len(c.ids) for c in chans}) != 1:
            self.unknown(node, "stacks tensors with different channel layouts")
            return None
        for c in chans[1:]:
            self.a.union_arrays(chans[0].ids, c.ids)
        d = dims.pop()
        return Chan(d + 1 if dim <= d else d, chans[0].ids)

    def pad(self, node: fx.Node, x: Chan) -> Chan | None:
        pads = self.arg(node, 1, "pad")
        value = self.arg(node, 3, "value", None)
        ndim = len(_shape(node.args[0]))
        padded = {ndim - 1 - i // 2 for i in range(len(pads))}
        if _norm_dim(x.dim, ndim) in padded or value not in (None, 0, 0.0):
            self.unknown(node, "pads the channel dimension or pads with a non-zero value")
            return None
        return Chan(x.dim, x.ids)

    def flip(self, node: fx.Node, x: Chan) -> Chan | None:
        nd = len(_shape(node.args[0]))
        dims = node.args[1:] if len(node.args) > 1 else [node.kwargs.get("dims", ())]
        if len(dims) == 1 and isinstance(dims[0], (list, tuple)):
            dims = dims[0]
        if _norm_dim(x.dim, nd) in {_norm_dim(int(d), nd) for d in dims}:
            self.unknown(node, "reverses the channel dimension")
            return None
        return Chan(x.dim, x.ids)

    def move(self, node: fx.Node, x: Chan, name: str) -> Chan | None:
        in_shape, out_shape = _shape(node.args[0]), _shape(node)
        nd = len(in_shape)
        d = _norm_dim(x.dim, nd)
        rest = list(node.args[1:])
        if name == "permute":
            dims = rest[0] if len(rest) == 1 and isinstance(rest[0], (list, tuple)) else rest
            if not dims:
                dims = node.kwargs.get("dims")
            dims = [_norm_dim(int(v), nd) for v in dims]
            return Chan(dims.index(d), x.ids)
        if name in ("transpose", "swapaxes"):
            a, b = (_norm_dim(int(v), nd) for v in rest[:2])
            return Chan(b if d == a else a if d == b else d, x.ids)
        if name == "t":
            return Chan(1 - d if nd == 2 else d, x.ids)
        if name == "movedim":
            src, dst = _norm_dim(int(rest[0]), nd), _norm_dim(int(rest[1]), nd)
            order = list(range(nd))
            order.insert(dst, order.pop(src))
            return Chan(order.index(d), x.ids)
        if name in ("squeeze", "unsqueeze"):
            return self.reshape(node, x, in_shape, out_shape)
        self.unknown(node)
        return None

    def reduce(self, node: fx.Node, x: Chan, name: str) -> Chan | None:
        in_shape = _shape(node.args[0])
        nd = len(in_shape)
        d = _norm_dim(x.dim, nd)
        dims = self.arg(node, 1, "dim", None)
        keepdim = bool(self.arg(node, 2, "keepdim", False))
        if dims is None:
            reduced = set(range(nd))
        else:
            reduced = {_norm_dim(int(v), nd) for v in (dims if isinstance(dims, (list, tuple)) else [dims])}
        if d in reduced:
            if name == "sum":
                return None  # a sum over channels: removed (zero) channels add nothing
            self.unknown(node, f"takes the {name} over channels")
            return None
        return Chan(d if keepdim else d - sum(1 for r in reduced if r < d), x.ids)

    def reshape(self, node: fx.Node, x: Chan, in_shape, out_shape) -> Chan | None:
        """Follow the atoms through view / reshape / flatten / (un)squeeze (see the module docstring)."""
        nd = len(in_shape)
        d = _norm_dim(x.dim, nd)
        groups = _reshape_groups(list(in_shape), list(out_shape))
        group = next(((ia, jb) for ia, jb in groups if d in ia), None)
        if group is None:
            self.unknown(node, "reshapes channels in a way the analysis does not follow")
            return None
        ia, jb = group
        if 0 in ia and len(ia) > 1:
            self.unknown(node, "mixes channels with the batch dimension")
            return None
        shape = [in_shape[k] for k in ia]
        arr = np.broadcast_to(x.ids.reshape([-1 if k == d else 1 for k in ia]), shape)
        arr = arr.reshape([out_shape[k] for k in jb]) if jb else arr.reshape(())
        if not jb:
            return None
        varying = [t for t in range(arr.ndim) if arr.shape[t] > 1 and np.any(np.diff(arr, axis=t) != 0)]
        if not varying:
            sizes = [t for t in range(arr.ndim) if arr.shape[t] > 1]
            axis = sizes[-1] if sizes else arr.ndim - 1
        else:
            axis = varying[-1]
        moved = np.moveaxis(arr, axis, -1).reshape(-1, arr.shape[axis])
        for row in moved[1:]:
            if not np.array_equal(row, moved[0]):
                self.a.union_arrays(moved[0], row)
        ids = moved[0].copy()
        out_dim = jb[axis]
        if node.op == "call_method" and node.target in ("view", "reshape") or \
                node.op == "call_function" and node.target is torch.reshape:
            self.region.reshapes[node.name] = (out_dim, ids)
        return Chan(out_dim, ids)
