"""Which weight tensors are pruned.

Pruned: ``weight`` of ``nn.Linear``, ``nn.Conv1d``, ``nn.Conv2d`` (and optionally
``nn.Embedding``), and every ``weight_ih_l{k}`` / ``weight_hh_l{k}`` (with their ``_reverse``
twins) of ``nn.RNN``, ``nn.GRU`` and ``nn.LSTM``.  Never biases, BatchNorm or LayerNorm
parameters — those modules are not prunable types and biases are never selected.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from torch import nn

RECURRENT_TYPES: tuple[type[nn.Module], ...] = (nn.RNN, nn.GRU, nn.LSTM)
LINEAR_TYPES: tuple[type[nn.Module], ...] = (nn.Linear,)
CONV_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d)
DEFAULT_TYPES: tuple[type[nn.Module], ...] = LINEAR_TYPES + CONV_TYPES + RECURRENT_TYPES
PRUNABLE_TYPES: tuple[type[nn.Module], ...] = DEFAULT_TYPES + (nn.Embedding,)

_RNN_WEIGHT = re.compile(r"^weight_(ih|hh)_l\d+(_reverse)?$")


@dataclass(frozen=True)
class WeightRef:
    """One prunable weight: the module that owns it and the attribute name on that module."""

    module_name: str
    module: nn.Module
    attr: str

    @property
    def name(self) -> str:
        """Fully qualified parameter name as in an un-pruned ``state_dict`` (``rnn.weight_hh_l0``)."""
        return f"{self.module_name}.{self.attr}" if self.module_name else self.attr


def weight_attrs(module: nn.Module) -> list[str]:
    """Names of the prunable weights of one module (empty for non-prunable types)."""
    if isinstance(module, RECURRENT_TYPES):
        return [name for name in module._flat_weights_names if _RNN_WEIGHT.match(name)]
    if isinstance(module, PRUNABLE_TYPES):
        return ["weight"]
    return []


def iter_prunable_weights(
    model: nn.Module,
    types: Sequence[type[nn.Module]] = DEFAULT_TYPES,
    include: str | None = None,
    exclude: str | None = None,
) -> Iterator[WeightRef]:
    """Prunable weights of ``model`` whose module is one of ``types`` and whose fully qualified
    name matches the regular expression ``include`` (``re.search``) and not ``exclude``."""
    include_re = re.compile(include) if include else None
    exclude_re = re.compile(exclude) if exclude else None
    for module_name, module in model.named_modules():
        if not isinstance(module, tuple(types)):
            continue
        for attr in weight_attrs(module):
            ref = WeightRef(module_name, module, attr)
            if include_re and not include_re.search(ref.name):
                continue
            if exclude_re and exclude_re.search(ref.name):
                continue
            yield ref
