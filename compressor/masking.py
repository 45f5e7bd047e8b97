"""The weight mask: a parametrization that multiplies a weight by a stored boolean mask.

``effective_weight = original ⊙ mask``.  The mask is a buffer, so it lives in the model's
``state_dict`` (``<module>.parametrizations.<name>.0.mask``) next to the original weight
(``<module>.parametrizations.<name>.original``).  The gradient reaching a pruned original weight
is exactly zero, and whatever an optimizer does to it (momentum, weight decay) the effective
weight stays exactly zero.  Works for ``nn.RNN/GRU/LSTM``: their forward re-reads the weights
(``_update_flat_weights``) and so sees the masked tensors.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize


class WeightMask(nn.Module):
    """Parametrization ``w ↦ w ⊙ mask`` with a boolean ``mask`` buffer of the weight's shape."""

    def __init__(self, shape: torch.Size, device: torch.device | None = None) -> None:
        super().__init__()
        self.register_buffer("mask", torch.ones(shape, dtype=torch.bool, device=device))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.mask


def attach_mask(module: nn.Module, name: str) -> WeightMask:
    """Register a :class:`WeightMask` (all ones) on ``module.<name>`` and return it."""
    weight = getattr(module, name)
    mask = WeightMask(weight.shape, weight.device)
    parametrize.register_parametrization(module, name, mask)
    return mask


def find_mask(module: nn.Module, name: str) -> WeightMask | None:
    """The :class:`WeightMask` on ``module.<name>``, if there is one."""
    if not parametrize.is_parametrized(module, name):
        return None
    return next((p for p in module.parametrizations[name] if isinstance(p, WeightMask)), None)


def original_weight(module: nn.Module, name: str) -> torch.Tensor:
    """The unmasked parameter behind a masked weight."""
    return module.parametrizations[name].original


def bake_mask(module: nn.Module, name: str, parameter_order: list[str]) -> None:
    """Replace the parametrized ``module.<name>`` by a plain parameter holding ``original ⊙ mask``.

    ``parameter_order`` is ``list(module._parameters)`` from before the mask was attached: the
    parameters are put back in that order, so ``state_dict`` keys come out as they went in."""
    parametrize.remove_parametrizations(module, name, leave_parametrized=True)
    if set(parameter_order) == set(module._parameters):
        reordered = {key: module._parameters[key] for key in parameter_order}
        module._parameters.clear()
        module._parameters.update(reordered)
