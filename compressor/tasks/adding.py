"""The adding problem (Hochreiter and Schmidhuber 1997; Le, Jaitly and Hinton 2015).

Each input is a sequence of ``length`` steps with two channels: a value drawn uniformly from
[0, 1] and a marker that is 1 at exactly two steps (one in each half) and 0 elsewhere.  The
target is the sum of the two marked values.  Predicting the mean (1.0) gives a mean squared
error of 1/6 ≈ 0.167; a recurrent network that solves the task gets close to 0.  Data is
generated from a seed, so every split is reproducible and nothing is downloaded.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

BASELINE_MSE = 1.0 / 6.0


@dataclass(frozen=True)
class AddingProblem:
    """The adding problem as a :class:`~compressor.tasks.base.Task`;
    ``batch(generator)`` returns ``(x[b, length, 2], y[b])``."""

    length: int = 30
    batch_size: int = 64
    name: str = "adding"
    metric: str = "mse"
    higher_is_better: bool = False

    def batches(self, generator: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            yield self.batch(generator)

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        return torch.mean((model(x) - y) ** 2)

    def evaluate(self, model: nn.Module, split: str = "test") -> dict[str, float]:
        return {"mse": mean_squared_error(model, self.eval_set())}

    def batch(self, generator: torch.Generator, batch_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        n = batch_size or self.batch_size
        values = torch.rand(n, self.length, generator=generator)
        half = self.length // 2
        first = torch.randint(0, half, (n,), generator=generator)
        second = torch.randint(half, self.length, (n,), generator=generator)
        markers = torch.zeros(n, self.length)
        rows = torch.arange(n)
        markers[rows, first] = 1.0
        markers[rows, second] = 1.0
        target = values[rows, first] + values[rows, second]
        return torch.stack([values, markers], dim=-1), target

    def eval_set(self, size: int = 2048, seed: int = 12345) -> tuple[torch.Tensor, torch.Tensor]:
        """A fixed evaluation split (its own seed, never used for training)."""
        return self.batch(torch.Generator().manual_seed(seed), size)


class AddingGRU(nn.Module):
    """GRU over the sequence, then a two-layer head on the last hidden state."""

    def __init__(self, hidden: int = 128, layers: int = 1) -> None:
        super().__init__()
        self.rnn = nn.GRU(2, hidden, num_layers=layers, batch_first=True)
        self.fc = nn.Linear(hidden, hidden)
        self.out = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        states, _ = self.rnn(x)
        return self.out(torch.relu(self.fc(states[:, -1]))).squeeze(-1)


@torch.no_grad()
def mean_squared_error(model: nn.Module, data: tuple[torch.Tensor, torch.Tensor]) -> float:
    """Mean squared error of ``model`` on ``(x, y)`` in eval mode."""
    was_training = model.training
    model.eval()
    x, y = data
    error = float(torch.mean((model(x) - y) ** 2))
    model.train(was_training)
    return error
