"""Small models covering every prunable layer type, shared by the tests."""

import torch
from torch import nn


class Mixed(nn.Module):
    """Conv2d + BatchNorm, Conv1d, 2-layer bidirectional GRU and LSTM, LayerNorm, Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 6, kernel_size=3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.conv1d = nn.Conv1d(6 * 8, 20, kernel_size=3, padding=1)
        self.gru = nn.GRU(20, 13, num_layers=2, bidirectional=True, batch_first=True)
        self.lstm = nn.LSTM(26, 11, num_layers=2, bidirectional=True, batch_first=True)
        self.norm = nn.LayerNorm(22)
        self.fc = nn.Linear(22, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [batch, 1, 8 (freq), time]
        h = torch.relu(self.bn(self.conv(x)))
        h = self.conv1d(h.flatten(1, 2))  # [batch, 20, time]
        h, _ = self.gru(h.transpose(1, 2))
        h, _ = self.lstm(h)
        return self.fc(self.norm(h))


def batch(generator: torch.Generator, size: int = 4, time: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(size, 1, 8, time, generator=generator)
    y = torch.randint(0, 5, (size, time), generator=generator)
    return x, y


def loss_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(model(x).reshape(-1, 5), y.reshape(-1))


#: source of a small user model file (``build()``: a GRU and a Linear on ``[batch, time, 12]``),
#: written to a temporary ``.py`` and handed to the command line as ``--model path.py:build``
GRU_FACTORY_SOURCE = '''
import torch
from torch import nn

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.gru = nn.GRU(12, 32, batch_first=True)
        self.fc = nn.Linear(32, 5)

    def forward(self, x):
        return self.fc(self.gru(x)[0])

def build():
    torch.manual_seed(0)
    return Net()
'''
