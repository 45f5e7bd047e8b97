"""What the training harness needs from a task."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol

import torch
from torch import nn


class Task(Protocol):
    """A data source, a loss and an evaluation on a held-out split.

    ``metric`` names the number :meth:`evaluate` puts first (for example ``"cer"``) and
    ``higher_is_better`` says which way it points."""

    name: str
    metric: str
    higher_is_better: bool

    def batches(self, generator: torch.Generator) -> Iterator[Any]:
        """An endless stream of training batches drawn with ``generator`` (reproducible)."""

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """The training loss of ``model`` on one batch."""

    def evaluate(self, model: nn.Module, split: str = "test") -> dict[str, float]:
        """Metrics on a held-out split (model in eval mode, no gradients)."""
