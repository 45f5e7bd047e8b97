"""Small models and a trained digits CNN for the Taylor-pruning tests (imported by the other
test_taylor_* modules; no tests of its own): every coupling the analysis handles, and some it
must leave alone."""

from __future__ import annotations

import copy
import functools

import torch
from torch import nn


def randomize_batchnorm(model: nn.Module, generator: torch.Generator | None = None) -> nn.Module:
    """Non-trivial BatchNorm statistics and affine parameters (so a zeroed channel leaves a
    BatchNorm non-zero, as in a trained network)."""
    generator = generator or torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                n = m.num_features
                m.running_mean.copy_(torch.rand(n, generator=generator) * 2 - 1)
                m.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
                m.weight.copy_(torch.rand(n, generator=generator) + 0.5)
                m.bias.copy_(torch.rand(n, generator=generator) * 2 - 1)
    return model


class Block(nn.Module):
    """Residual block: identity shortcut, or 1×1 projection + BN when the width changes."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Identity() if cin == cout else nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False),
                                                                         nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResCNN(nn.Module):
    """Stem, two residual blocks, a concatenation, a depthwise and a grouped convolution, a
    flatten over a 4×4 map into a hidden Linear, and the classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.block1 = Block(6, 6)
        self.block2 = Block(6, 8)
        self.side = nn.Conv2d(6, 4, 1)
        self.depthwise = nn.Conv2d(12, 24, 3, padding=1, groups=12)
        self.dbn = nn.BatchNorm2d(24)
        self.grouped = nn.Conv2d(24, 8, 3, padding=1, groups=4)
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.hidden = nn.Linear(8 * 16, 12)
        self.head = nn.Linear(12, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        stem = torch.relu(self.bn(self.stem(x)))
        x = self.block2(self.block1(stem))
        x = torch.cat([x, torch.relu(self.side(stem))], dim=1)
        x = torch.relu(self.dbn(self.depthwise(x)))
        x = torch.relu(self.grouped(x))
        x = self.pool(x).flatten(1)
        return self.head(torch.relu(self.hidden(x)))


class BiGRU(nn.Module):
    """2-layer bidirectional GRU (batch first) and a Linear on its output."""

    def __init__(self, cell: type[nn.RNNBase] = nn.GRU, layers: int = 2, **kw) -> None:
        super().__init__()
        self.rnn = cell(5, 6, num_layers=layers, bidirectional=True, batch_first=True, **kw)
        self.fc = nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.rnn(x)[0])


class SummedGRU(nn.Module):
    """DS2-style: bidirectional GRU whose directions are summed through a view (ties unit k of
    both directions), a second GRU layer, and a Linear (time-major)."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn1 = nn.GRU(5, 6, bidirectional=True)
        self.rnn2 = nn.GRU(6, 7)
        self.fc = nn.Linear(7, 3)
        self.temperature = nn.Parameter(torch.tensor(1.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn1(x)
        out = out.view(x.shape[0], x.shape[1], 2, 6).sum(dim=2)
        return self.fc(self.rnn2(out)[0]) * self.temperature * torch.tensor(0.5)  # a parameter and a constant


class Loop(nn.Module):
    """Not traceable by torch.fx: a Python loop over the time axis."""

    def __init__(self) -> None:
        super().__init__()
        self.cell = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x[:, 0] * 0
        for t in range(x.shape[1]):
            h = torch.tanh(self.cell(h) + x[:, t])
        return h


class Awkward(nn.Module):
    """Structures that must be left alone: a LayerNorm consumer, a sigmoid, ``x + 1``, an
    untraceable module, a used final hidden state; plus prunable ones around them."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 6)
        self.norm = nn.LayerNorm(6)
        self.b = nn.Linear(6, 5)
        self.c = nn.Linear(5, 4)
        self.loop = Loop()
        self.d = nn.Linear(4, 7)
        self.e = nn.Linear(7, 4)
        self.gru = nn.GRU(4, 3, batch_first=True)
        self.f = nn.Linear(4, 3)
        self.out = nn.Linear(4 + 5 + 3 + 3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [batch, time, 4]
        ln = self.b(self.norm(self.a(x[:, 0])))          # a feeds a LayerNorm: left alone
        squashed = torch.sigmoid(self.c(ln))             # c feeds a sigmoid: left alone (b is prunable)
        looped = self.loop(x) + squashed                 # Loop is opaque (a Python loop over time)
        hidden = self.e(torch.relu(self.d(looped)))      # d and e are prunable
        _, h_n = self.gru(x)                             # h_n used: the GRU is left alone
        bumped = self.f(x[:, 0]) + 1.0                   # f gets a constant added: left alone
        return self.out(torch.cat([hidden, ln, h_n[-1], bumped], dim=1))


class UntraceableRoot(nn.Module):
    """The top-level forward has data-dependent control flow; its children are analysed alone."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                                      nn.Conv2d(6, 5, 3, padding=1))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(5 * 36, 9), nn.ReLU(), nn.Linear(9, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.features(x)
        if y.sum() > 1e9:  # never true, but fx cannot know
            y = y * 0
        return self.head(y)


def digits_cnn() -> nn.Module:
    """A small CNN for scikit-learn's 8×8 digits: two Conv+BN, max-pool, a hidden Linear."""
    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(32 * 16, 64), nn.ReLU(), nn.Linear(64, 10))


@functools.cache
def _trained_digits():
    from compressor.tasks.images import ImageTask
    from compressor.training import TrainConfig, train

    task = ImageTask("digits", batch_size=64)
    torch.manual_seed(0)
    model = digits_cnn()
    train(model, task, TrainConfig(steps=300, lr=3e-3, seed=0), progress=False)  # about 2 s on one core
    return model, task


def trained_digits_copy():
    """(a fresh copy of a trained digits CNN, the digits task); trained once per session."""
    model, task = _trained_digits()
    return copy.deepcopy(model), task


class Ops(nn.Module):
    """Channel-following operations: pad, interpolate, clamp, a literal-width view, permute and
    transpose, indexing, stack, cat along another dimension, spatial mean, scaling."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 6, 3)
        self.bn = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 5, 1)
        self.proj = nn.Linear(6, 7)
        self.head = nn.Linear(7 + 5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [B, 1, 6, 6]
        y = torch.clamp(self.bn(self.conv(x)), min=0.0)                       # [B, 6, 4, 4]
        y = nn.functional.interpolate(nn.functional.pad(y, (1, 1, 1, 1)), scale_factor=2.0)  # [B, 6, 12, 12]
        seq = y.view(y.shape[0], 6, -1).permute(0, 2, 1)                      # [B, 144, 6], literal width
        feats = self.proj(seq[:, ::2] * 0.5)                                  # [B, 72, 7]
        both = torch.cat([feats, feats.flip(1)], dim=1).transpose(1, 2)       # [B, 7, 144]
        pooled = torch.stack([both.mean(2), both.amax(2)], dim=0).sum(0)      # [B, 7]
        other = self.conv2(y).mean((2, 3))                                    # [B, 5]
        return self.head(torch.cat([torch.relu(pooled), other], dim=1))
