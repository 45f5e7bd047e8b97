"""Structured pruning by Taylor importance (Molchanov et al. 2019), driven like an optimizer.

Usage inside an ordinary training loop::

    pruner = TaylorPruner("taylor_fo_gate", every=30, per_prune=8, target=PruneTarget("params", 0.5))
    pruner.prepare(model, example_inputs)     # gates + 0/1 masks as forward hooks (in place)
    for batch in data:
        loss = criterion(model(batch.x), batch.y)
        optimizer.zero_grad(); pruner.backward(loss)    # = loss.backward() for first-order criteria
        optimizer.step()
        pruner.step()            # accumulate importance; every `every` steps remove `per_prune` units
    small = pruner.shrink()      # the same model class with smaller dense layers, same outputs

``prepare`` analyses the model (:mod:`compressor.taylor.graph`: units, ties, what is left
alone), registers the keep-mask over units as the buffer ``taylor_unit_mask`` of the model (so
it is in ``model.state_dict()``) and attaches:

* a forward hook on every *mask site* — the end of each Conv/Linear structure (its BatchNorm if
  that is the only user of its output, else the layer itself), every other BatchNorm on prunable
  channels, and recurrent modules — multiplying the output along the channel dimension by
  ``mask`` (and by the gates ``z = 1`` where they are placed);
* on recurrent modules, parametrizations that multiply the rows of a removed hidden unit (every
  gate, ``weight_ih``/``weight_hh``/biases) by 0 — the unit's state then stays exactly 0 — and,
  inside multi-layer modules, the next layer's input columns by the gates.

The pruner's own state (step counter, averaged importance, what was removed when) is in
``pruner.state_dict()``.  Removing a unit is permanent.
"""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

from ..texttable import format_table
from .cost import count_flops, count_params, make_plan
from .criteria import ACCUMULATED, CRITERIA, GATE_POSITIONS, Criterion, GatePosition
from .graph import FIXED, Analysis, Space

MASK_BUFFER = "taylor_unit_mask"


@dataclass(frozen=True)
class PruneTarget:
    """When pruning stops.

    ``kind`` ``"params"``, ``"flops"`` or ``"units"``: once the remaining parameters /
    multiply–accumulates / units (channels + neurons + hidden units of every analysed layer) are at
    most ``value`` — a fraction of the dense model's when ``value <= 1``, else an absolute count.
    ``"metric"``: after each pruning round ``metric(model)`` is evaluated (say a validation
    accuracy or loss); when it passes ``value`` (below it if ``higher_is_better``, above
    otherwise) that round is undone and pruning stops."""

    kind: Literal["params", "flops", "units", "metric"]
    value: float
    metric: Callable[[nn.Module], float] | None = None
    higher_is_better: bool = True

    def __post_init__(self) -> None:
        if self.kind not in ("params", "flops", "units", "metric"):
            raise ValueError(f"target kind {self.kind!r}: use params, flops, units or metric")
        if self.kind == "metric" and self.metric is None:
            raise ValueError("a metric target needs metric=callable(model) -> float")
        if self.kind != "metric" and self.value <= 0:
            raise ValueError(f"target value {self.value} must be positive")


@dataclass
class Unit:
    """A prunable unit: one class of tied atoms (structures)."""

    index: int
    atoms: list[int]
    name: str
    spaces: Counter = field(default_factory=Counter)


class _State:
    """What the hooks and parametrizations read: the keep-mask buffer of the model and the gates.
    Shared, never copied (``copy.deepcopy`` of the model keeps pointing here)."""

    def __init__(self, root: nn.Module, size: int) -> None:
        self.root, self.size = root, size
        self.gates: dict[torch.device, torch.Tensor] = {}

    def __deepcopy__(self, memo) -> _State:
        return self

    @property
    def keep(self) -> torch.Tensor:
        return self.root._buffers[MASK_BUFFER]

    def gate(self, device: torch.device) -> torch.Tensor:
        gate = self.gates.get(device)
        if gate is None:
            gate = self.gates[device] = torch.ones(self.size, device=device, requires_grad=True)
        return gate


def _on(cache: dict, device: torch.device) -> torch.Tensor | None:
    if device not in cache:
        cache[device] = next(iter(cache.values())).to(device)
    return cache[device]


def _site_hook(state: _State, index: torch.Tensor, gated: torch.Tensor | None, dim: int, rnn: bool,
               mask: bool = True):
    index_cache, gated_cache = {index.device: index}, ({gated.device: gated} if gated is not None else None)

    def hook(module, args, output):
        out = output[0] if rnn else output
        if not isinstance(out, torch.Tensor):
            return None
        keep = state.keep
        idx = _on(index_cache, keep.device)
        factor = keep[idx] if mask else torch.ones(idx.shape, device=keep.device)
        if gated is not None:
            where = _on(gated_cache, keep.device)
            factor = torch.where(where, factor * state.gate(keep.device)[idx], factor)
        shape = [1] * out.dim()
        shape[dim] = -1
        out = out * factor.to(out.dtype).view(shape)
        return (out, *output[1:]) if rnn else out
    return hook


class _UnitMask(nn.Module):
    """Parametrization of a recurrent weight: rows of removed units × 0; columns (next layer's
    ``weight_ih`` inside a multi-layer module) × mask × gate."""

    def __init__(self, state: _State, rows: torch.Tensor, cols: torch.Tensor | None) -> None:
        super().__init__()
        self.state = state
        self.register_buffer("rows", rows, persistent=False)
        self.register_buffer("cols", cols, persistent=False)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        keep = self.state.keep
        weight = weight * keep[self.rows].to(weight.dtype).view(-1, *([1] * (weight.dim() - 1)))
        if self.cols is not None:
            cols = keep[self.cols] * self.state.gate(keep.device)[self.cols]
            weight = weight * cols.to(weight.dtype).view(1, -1)
        return weight


def _leaf(module: nn.Module, name: str) -> torch.Tensor:
    """The trainable tensor behind ``module.<name>`` (the original under a parametrization)."""
    if parametrize.is_parametrized(module, name):
        return module.parametrizations[name].original
    return getattr(module, name)


def _plain_rnn(module: nn.RNNBase) -> nn.RNNBase:
    """A plain ``nn.GRU/LSTM/RNN`` with the (unmasked) weights of a parametrized one."""
    base = next(c for c in type(module).__mro__ if c in (nn.GRU, nn.LSTM, nn.RNN))
    extra = {"nonlinearity": module.nonlinearity} if base is nn.RNN else {}
    if base is nn.LSTM:
        extra["proj_size"] = module.proj_size
    reference = _leaf(module, module._flat_weights_names[0])
    plain = base(module.input_size, module.hidden_size, num_layers=module.num_layers, bias=module.bias,
                 batch_first=module.batch_first, dropout=module.dropout, bidirectional=module.bidirectional,
                 device=reference.device, dtype=reference.dtype, **extra)
    with torch.no_grad():
        for name in module._flat_weights_names:
            getattr(plain, name).copy_(_leaf(module, name))
            getattr(plain, name).requires_grad_(_leaf(module, name).requires_grad)
    plain.train(module.training)
    return plain


def _rnn_names(layer: int, direction: int, bias: bool) -> list[str]:
    sfx = f"l{layer}{'_reverse' if direction else ''}"
    return [f"weight_ih_{sfx}", f"weight_hh_{sfx}"] + ([f"bias_ih_{sfx}", f"bias_hh_{sfx}"] if bias else [])


class TaylorPruner:
    """Remove whole Conv channels, Linear neurons and recurrent hidden units, least important first.

    ``criterion``: see :mod:`compressor.taylor.criteria`.  ``gate_position``: ``"after_bn"``
    (default, the paper's best) or ``"before_bn"`` — where the gates of the gate criteria sit
    (removal always masks the whole structure, after its BatchNorm).  ``momentum``: smoothing of
    the per-minibatch importance (None: plain mean).  ``normalize``: ``None`` or ``"l2"`` (per
    layer, before the global ranking).  ``every`` / ``per_prune``: :meth:`step` removes
    ``per_prune`` units every ``every`` steps until ``target`` (:class:`PruneTarget`) is met;
    ``every=0`` leaves pruning to explicit :meth:`prune` calls.  ``min_units``: every layer keeps
    at least this many.  ``hessian_probes``: Hutchinson probes per minibatch for
    ``taylor_so_gate``.  ``seed``: for ``random`` and the probes."""

    def __init__(self, criterion: Criterion = "taylor_fo_gate", gate_position: GatePosition = "after_bn",
                 momentum: float | None = 0.9, normalize: Literal["l2"] | None = None, every: int = 0,
                 per_prune: int = 1, target: PruneTarget | None = None, min_units: int = 1,
                 hessian_probes: int = 1, seed: int = 0) -> None:
        if criterion not in CRITERIA:
            raise ValueError(f"criterion={criterion!r}: choose one of {', '.join(CRITERIA)}")
        if gate_position not in GATE_POSITIONS:
            raise ValueError(f"gate_position={gate_position!r}: use 'after_bn' or 'before_bn'")
        if normalize not in (None, "l2"):
            raise ValueError(f"normalize={normalize!r}: use None or 'l2'")
        if momentum is not None and not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum={momentum} is outside [0, 1)")
        if every < 0 or per_prune < 1 or min_units < 1 or hessian_probes < 1:
            raise ValueError("every >= 0, per_prune >= 1, min_units >= 1 and hessian_probes >= 1 are required")
        self.criterion, self.gate_position, self.momentum, self.normalize = criterion, gate_position, momentum, normalize
        self.every, self.per_prune, self.target, self.min_units = every, per_prune, target, min_units
        self.hessian_probes, self.seed = hessian_probes, seed
        self.itr = 0
        self.batches = 0
        self.done = False
        self.history: list[dict[str, Any]] = []
        self._ema: torch.Tensor | None = None
        self._hessian: torch.Tensor | None = None
        self._model: nn.Module | None = None
        self.analysis: Analysis | None = None
        self.units: list[Unit] = []

    # ------------------------------------------------------------------ set-up
    def prepare(self, model: nn.Module, example_inputs: Sequence[torch.Tensor]) -> nn.Module:
        """Analyse ``model`` on ``example_inputs`` (a batch of 2 or more is best) and attach gates
        and masks; returns ``model`` (changed in place)."""
        if isinstance(model, nn.parallel.DistributedDataParallel):
            raise TypeError("prepare() got a DistributedDataParallel model: prepare the plain model first")
        if self._model is not None:
            raise RuntimeError("this pruner is already prepared; create a new one for another model")
        if hasattr(model, MASK_BUFFER):
            raise RuntimeError("the model already carries a TaylorPruner: shrink() it or use a fresh copy")
        self.example_inputs = tuple(example_inputs)
        analysis = self.analysis = Analysis(model, self.example_inputs)
        self.units = []
        atom_class = np.zeros(analysis.n_atoms, np.int64)
        for index, atoms in enumerate(analysis.classes(), start=1):
            names = [analysis.atom_name(a) for a in atoms]
            name = "+".join(names[:3]) + (f"+{len(names) - 3} more" if len(names) > 3 else "")
            self.units.append(Unit(index, atoms, name, Counter(analysis.atom_space[a] for a in atoms)))
            atom_class[atoms] = index
        self.atom_class = atom_class
        self._atom_class_t = torch.from_numpy(atom_class)
        size = len(self.units) + 1
        model.register_buffer(MASK_BUFFER, torch.ones(size))
        self._state = _State(model, size)
        self._hooks: list[tuple[str, int]] = []
        self._parametrized: list[tuple[str, str]] = []
        self._attach(model)
        self._space_params = self._collect_space_params(model)
        generator = torch.Generator().manual_seed(self.seed)
        self._random = torch.rand(size, generator=generator, dtype=torch.float64)
        self._groups = self._layer_groups()
        self._model = model
        self.dense = None
        self.dense = self.remaining()
        return model

    def _attach(self, model: nn.Module) -> None:
        analysis, state = self.analysis, self._state
        for site in analysis.sites.values():
            module = model.get_submodule(site.module)
            gated = np.array([self._gated_at(int(atom), site.module, site.rnn) for atom in site.ids])
            index = torch.from_numpy(self.atom_class[site.ids])
            hook = _site_hook(state, index, torch.from_numpy(gated) if gated.any() else None, site.dim, site.rnn)
            self._hooks.append((site.module, module.register_forward_hook(hook).id))
        if self.gate_position == "before_bn":
            for space in analysis.spaces:
                if space.bn is None or space.kind == "rnn" or not (self.atom_class[space.atoms] > 0).any():
                    continue
                site = analysis.sites[space.bn]
                index = torch.from_numpy(self.atom_class[space.atoms])
                hook = _site_hook(state, index, index > 0, site.dim, False, mask=False)
                self._hooks.append((space.module, model.get_submodule(space.module).register_forward_hook(hook).id))
        for path, info in analysis.rnns.items():
            module = model.get_submodule(path)
            for layer in range(info.layers):
                for direction in range(info.directions):
                    space = analysis.spaces[info.spaces[layer][direction]]
                    units = torch.from_numpy(self.atom_class[space.atoms])
                    rows = units.repeat(info.gates)
                    cols = None
                    if layer > 0:
                        previous = np.concatenate([analysis.spaces[s].atoms for s in info.spaces[layer - 1]])
                        cols = torch.from_numpy(self.atom_class[previous])
                    for name in _rnn_names(layer, direction, module.bias):
                        use_cols = cols if name.startswith("weight_ih") else None
                        if not (rows > 0).any() and (use_cols is None or not (use_cols > 0).any()):
                            continue
                        parametrize.register_parametrization(module, name, _UnitMask(state, rows, use_cols))
                        self._parametrized.append((path, name))

    def _gated_at(self, atom: int, module: str, rnn: bool) -> bool:
        if self.atom_class[atom] == 0:
            return False
        if rnn:
            return True
        space = self.analysis.space_of(atom)
        if space.bn is not None and self.gate_position == "before_bn":
            return False
        return space.end == module

    def _collect_space_params(self, model: nn.Module) -> dict[int, list[tuple[torch.Tensor, str, bool]]]:
        """Per space: (tensor, layout, is_weight) with layout "rows" (dim 0 = unit) or "gates"
        (rows g·H + k)."""
        params: dict[int, list[tuple[torch.Tensor, str, bool]]] = {}
        for space in self.analysis.spaces:
            if not (self.atom_class[space.atoms] > 0).any():
                continue
            module = model.get_submodule(space.module)
            entries: list[tuple[torch.Tensor, str, bool]] = []
            if space.kind == "rnn":
                for name in _rnn_names(space.layer, space.direction, module.bias):
                    entries.append((_leaf(module, name), "gates", name.startswith("weight")))
            else:
                entries.append((module.weight, "rows", True))
                if module.bias is not None:
                    entries.append((module.bias, "rows", False))
                if space.bn is not None:
                    bn = model.get_submodule(space.bn)
                    if bn.affine:
                        entries += [(bn.weight, "rows", False), (bn.bias, "rows", False)]
            params[space.index] = entries
        return params

    def _layer_groups(self) -> np.ndarray:
        keys: dict[frozenset, int] = {}
        groups = np.zeros(len(self.units) + 1, np.int64)
        for unit in self.units:
            groups[unit.index] = keys.setdefault(frozenset(unit.spaces), len(keys) + 1)
        return groups

    # ------------------------------------------------------------------ importance
    def backward(self, loss: torch.Tensor) -> None:
        """``loss.backward()``; for ``taylor_so_gate`` also one Hessian-vector product per probe
        with respect to the gates (a double backward).  Gradients land in ``.grad`` as usual."""
        self._require_prepared()
        if self.criterion != "taylor_so_gate":
            loss.backward()
            return
        model = self._model
        gate = self._state.gate(self._state.keep.device)
        params = [p for p in model.parameters() if p.requires_grad]
        grads = torch.autograd.grad(loss, [gate, *params], create_graph=True, allow_unused=True)
        grad_gate = grads[0]
        hessian = torch.zeros(gate.shape, dtype=torch.float64)
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.batches)
        if grad_gate is not None and grad_gate.requires_grad:
            for probe in range(self.hessian_probes):
                signs = torch.randint(0, 2, gate.shape, generator=generator).to(gate) * 2 - 1
                try:
                    hv, = torch.autograd.grad(grad_gate, gate, grad_outputs=signs,
                                              retain_graph=probe < self.hessian_probes - 1, allow_unused=True)
                except RuntimeError as error:
                    if "not implemented" not in str(error):
                        raise
                    raise RuntimeError("taylor_so_gate needs a loss that PyTorch differentiates twice; this one is "
                                       f"not ({error}) — CTC loss, for one, has no second derivative") from error
                if hv is not None:
                    hessian += (signs * hv).detach().double().cpu()
        self._hessian = hessian / self.hessian_probes
        with torch.no_grad():
            for tensor, grad in zip([gate, *params], grads):
                if grad is None:
                    continue
                tensor.grad = grad.detach() if tensor.grad is None else tensor.grad + grad.detach()

    def _gate_grad(self) -> torch.Tensor:
        total = torch.zeros(len(self.units) + 1, dtype=torch.float64)
        for gate in self._state.gates.values():
            if gate.grad is not None:
                total += gate.grad.detach().double().cpu()
                gate.grad = None
        total[0] = 0.0
        return total

    def gate_gradients(self) -> torch.Tensor:
        """``∂L/∂z`` per unit (index ``unit.index``; entry 0 unused) from the last backward,
        without consuming it."""
        total = torch.zeros(len(self.units) + 1, dtype=torch.float64)
        for gate in self._state.gates.values():
            if gate.grad is not None:
                total += gate.grad.detach().double().cpu()
        total[0] = 0.0
        return total

    def _per_atom(self, fn: Callable[[torch.Tensor], torch.Tensor | None], weights_only: bool = False) -> torch.Tensor:
        values = torch.zeros(self.analysis.n_atoms, dtype=torch.float64)
        for index, entries in self._space_params.items():
            space = self.analysis.spaces[index]
            total = torch.zeros(space.size, dtype=torch.float64)
            for tensor, layout, is_weight in entries:
                if weights_only and not is_weight:
                    continue
                value = fn(tensor)
                if value is None:
                    continue
                value = value.detach().double().cpu()
                if layout == "rows":
                    total += value.reshape(space.size, -1).sum(1)
                else:
                    total += value.reshape(-1, space.size, value[0].numel() if value.dim() > 1 else 1).sum((0, 2))
            values[torch.from_numpy(space.atoms)] = total
        return values

    def _per_unit(self, atom_values: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(len(self.units) + 1, dtype=torch.float64).index_add_(0, self._atom_class_t, atom_values)
        out[0] = 0.0
        return out

    def batch_importance(self, criterion: str | None = None) -> torch.Tensor:
        """This minibatch's importance of every unit under ``criterion`` (default: the pruner's),
        from the gradients of the last backward (gate gradients are not consumed)."""
        criterion = criterion or self.criterion
        if criterion == "taylor_fo_gate":
            return self.gate_gradients() ** 2
        if criterion == "taylor_so_gate":
            if self._hessian is None:
                raise RuntimeError("taylor_so_gate needs pruner.backward(loss) in place of loss.backward()")
            return (self.gate_gradients() - 0.5 * self._hessian) ** 2
        if criterion == "taylor_fo_weight":
            return self._per_unit(self._per_atom(lambda p: p.grad * p if p.grad is not None else None)) ** 2
        if criterion == "taylor_fo_weight_sum":
            return self._per_unit(self._per_atom(lambda p: (p.grad * p) ** 2 if p.grad is not None else None))
        return self.weight_importance(criterion)

    def weight_importance(self, criterion: str) -> torch.Tensor:
        """``magnitude``, ``bn_scale`` or ``random`` read off the current weights."""
        if criterion == "magnitude":
            return self._per_unit(self._per_atom(lambda p: p.detach() ** 2, weights_only=True)).sqrt()
        if criterion == "bn_scale":
            values = torch.zeros(self.analysis.n_atoms, dtype=torch.float64)
            has_bn = torch.zeros(self.analysis.n_atoms, dtype=torch.float64)
            for index in self._space_params:
                space = self.analysis.spaces[index]
                if space.bn is not None and self._model.get_submodule(space.bn).affine:
                    gamma = self._model.get_submodule(space.bn).weight.detach().abs().double().cpu()
                    values[torch.from_numpy(space.atoms)] = gamma
                    has_bn[torch.from_numpy(space.atoms)] = 1.0
            scores = self._per_unit(values)
            scores[self._per_unit(has_bn) == 0] = float("inf")
            scores[0] = 0.0
            return scores
        if criterion == "random":
            return self._random.clone()
        raise ValueError(f"unknown criterion {criterion!r}")

    def accumulate(self) -> None:
        """After each backward (before the gradients are zeroed): add this minibatch's importance
        to the running average.  Consumes the gate gradients."""
        self._require_prepared()
        if self.criterion in ACCUMULATED:
            batch = self.batch_importance()
            if self._ema is None:
                self._ema = batch
            elif self.momentum is None:
                self._ema = self._ema + (batch - self._ema) / (self.batches + 1)
            else:
                self._ema = self.momentum * self._ema + (1.0 - self.momentum) * batch
            self.batches += 1
        self._gate_grad()
        self._hessian = None

    def importance(self, normalized: bool = True) -> torch.Tensor:
        """Current importance per unit (index ``unit.index``); removed units are ``+inf``."""
        self._require_prepared()
        if self.criterion in ACCUMULATED:
            if self._ema is None:
                raise RuntimeError(f"{self.criterion} has no minibatch yet: call accumulate() after backward")
            scores = self._ema.clone()
        else:
            scores = self.weight_importance(self.criterion)
        keep = self.keep_units()
        if normalized and self.normalize == "l2" and self.criterion != "random":
            for group in np.unique(self._groups[1:]):
                members = torch.from_numpy(np.flatnonzero((self._groups == group) & keep))
                norm = scores[members].norm()
                if torch.isfinite(norm) and norm > 0:
                    scores[members] = scores[members] / norm
        scores[torch.from_numpy(~keep)] = float("inf")
        scores[0] = float("inf")
        return scores

    # ------------------------------------------------------------------ state of the masks
    def keep_units(self) -> np.ndarray:
        """Boolean per unit index (entry 0: the fixed pseudo-unit, always True)."""
        return self._state.keep.detach().cpu().numpy() > 0.5

    def keep_atoms(self) -> np.ndarray:
        return self.keep_units()[self.atom_class]

    def _set_keep(self, keep: np.ndarray) -> None:
        with torch.no_grad():
            buffer = self._state.keep
            buffer.copy_(torch.from_numpy(keep.astype(np.float32)).to(buffer.device))

    def remaining(self) -> dict[str, float]:
        """Parameters, FLOPs (multiply–accumulates for the example inputs, and per example: divided
        by dimension 0 of the first input) and units (every analysed layer's, fixed ones included)
        with the current masks, and as fractions of the dense model."""
        model = self._require_prepared()
        keep = self.keep_atoms()
        plan = make_plan(self.analysis, keep)
        params = count_params(model, self.analysis, plan)
        flops = count_flops(model, self.analysis, plan)
        first = self.example_inputs[0] if self.example_inputs else None
        batch = first.shape[0] if isinstance(first, torch.Tensor) and first.dim() else 1
        out = {"params": params, "flops": flops, "flops_per_example": flops / max(batch, 1),
               "units": int(keep[1:].sum()), "prunable_units": int(self.keep_units()[1:].sum())}
        dense = getattr(self, "dense", None)
        if dense is not None:
            out.update({f"{k}_fraction": out[k] / dense[k] if dense[k] else 1.0 for k in ("params", "flops", "units")})
        return out

    def reached(self) -> bool:
        """True once a params / flops / units target is met (metric targets: after a failed round)."""
        if self.target is None:
            return False
        if self.target.kind == "metric":
            return self.done
        now = self.remaining()
        value = self.target.value
        limit = value * self.dense[self.target.kind] if value <= 1 else value
        return now[self.target.kind] <= limit

    # ------------------------------------------------------------------ pruning
    def prune(self, n: int) -> list[str]:
        """Remove the ``n`` least important units (globally, tied units together), keeping
        ``min_units`` per layer and stopping early once a params / flops / units target is met.
        Returns the names of the removed units."""
        self._require_prepared()
        if n <= 0:
            return []
        scores = self.importance()
        keep = self.keep_units()
        kept_per_space = np.array([int(keep[self.atom_class[s.atoms]].sum()) for s in self.analysis.spaces])
        order = sorted((u for u in self.units if keep[u.index] and np.isfinite(float(scores[u.index]))),
                       key=lambda u: (float(scores[u.index]), u.index))
        removed: list[Unit] = []
        counted = self.target is not None and self.target.kind != "metric"
        for unit in order:
            if len(removed) >= n or (counted and self.reached()):
                break
            if any(kept_per_space[s] - k < self.min_units for s, k in unit.spaces.items()):
                continue
            for s, k in unit.spaces.items():
                kept_per_space[s] -= k
            keep[unit.index] = False
            self._set_keep(keep)
            removed.append(unit)
        if removed:
            self.history.append({"itr": self.itr, "removed": [u.index for u in removed], **self.remaining()})
        return [u.name for u in removed]

    def step(self) -> bool:
        """After every optimizer step: :meth:`accumulate`, and every ``every`` steps remove
        ``per_prune`` units unless the target is met.  Returns True if units were removed."""
        self._require_prepared()
        self.itr += 1
        self.accumulate()
        if not self.every or self.itr % self.every or self.done:
            return False
        if self.reached():
            self.done = True
            return False
        before = self.keep_units().copy()
        removed = self.prune(self.per_prune)
        if not removed:
            self.done = True
            return False
        if self.target is not None and self.target.kind == "metric":
            value = float(self.target.metric(self._model))
            worse = value < self.target.value if self.target.higher_is_better else value > self.target.value
            if worse:
                self._set_keep(before)
                self.history.pop()
                self.done = True
                return False
            self.history[-1]["metric"] = value
        return True

    # ------------------------------------------------------------------ reporting
    @property
    def left_alone(self) -> dict[str, str]:
        """Structures that are never removed, by name, with the reason."""
        self._require_analysis()
        return self.analysis.left_alone()

    def report(self) -> list[dict[str, Any]]:
        """Per layer (space): kept / total units and whether it can be pruned."""
        self._require_prepared()
        keep = self.keep_atoms()
        rows = []
        for space in self.analysis.spaces:
            prunable = int((self.atom_class[space.atoms] > 0).sum())
            rows.append({"layer": space.name, "kind": space.kind, "kept": int(keep[space.atoms].sum()),
                         "total": space.size, "prunable": prunable})
        return rows

    def format_report(self) -> str:
        rows = self.report()
        table = format_table(["layer", "kind", "kept", "total", "prunable"],
                             [[r["layer"], r["kind"], r["kept"], r["total"], r["prunable"]] for r in rows],
                             ["total", "", sum(r["kept"] for r in rows), sum(r["total"] for r in rows),
                              sum(r["prunable"] for r in rows)])
        now = self.remaining()
        lines = [table, "", (f"parameters {now['params']:,} ({now['params_fraction']:.1%}), FLOPs per example "
                 f"{now['flops_per_example']:,.0f} ({now['flops_fraction']:.1%})")]
        if self.left_alone:
            lines += ["", "left alone:"] + [f"  {name}: {why}" for name, why in self.left_alone.items()]
        return "\n".join(lines)

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict[str, Any]:
        """Step counter, averaged importance and history (the keep-mask is in the model's state_dict)."""
        return {"itr": self.itr, "batches": self.batches, "done": self.done, "ema": self._ema,
                "history": copy.deepcopy(self.history)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.itr, self.batches, self.done = int(state["itr"]), int(state["batches"]), bool(state["done"])
        self._ema = state["ema"]
        self.history = copy.deepcopy(state["history"])

    # ------------------------------------------------------------------ the end
    def clean_copy(self) -> nn.Module:
        """A deep copy of the model without hooks, parametrizations and the mask buffer (every
        weight as it is, removed units not zeroed).  Recurrent modules are rebuilt as plain
        modules from the parametrizations' originals (removing a parametrization from a deep copy
        would change the class it shares with the original)."""
        model = self._require_prepared()
        clone = copy.deepcopy(model)
        for path, hook_id in self._hooks:
            clone.get_submodule(path)._forward_hooks.pop(hook_id, None)
        for path in dict.fromkeys(path for path, _ in self._parametrized):
            module = clone.get_submodule(path)
            parent, _, name = path.rpartition(".")
            setattr(clone.get_submodule(parent) if parent else clone, name, _plain_rnn(module))
        del clone._buffers[MASK_BUFFER]
        return clone

    def shrink(self, verify: bool = True) -> nn.Module:
        """The physically smaller, dense model, checked against the masked one on the example
        inputs (see :func:`compressor.taylor.shrink.shrink`)."""
        from .shrink import shrink

        return shrink(self, verify=verify)

    def _require_prepared(self) -> nn.Module:
        if self._model is None:
            raise RuntimeError("call pruner.prepare(model, example_inputs) first")
        return self._model

    def _require_analysis(self) -> Analysis:
        if self.analysis is None:
            raise RuntimeError("call pruner.prepare(model, example_inputs) first")
        return self.analysis


__all__ = ["FIXED", "MASK_BUFFER", "PruneTarget", "Space", "TaylorPruner", "Unit"]
