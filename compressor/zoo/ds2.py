"""Deep Speech 2 (Amodei et al. 2016), the model Narang et al. (2017) pruned.

Spectrogram ``[batch, 1, n_freq, time]`` → two 2-D convolutions (41×11 stride 2×2, then
21×11 stride 2×1, 32 channels, BatchNorm, clipped ReLU min(max(x, 0), 20)) → ``layers``
bidirectional recurrent layers of ``hidden`` units → fully connected ``hidden → hidden`` →
output ``n_classes`` (29 characters with the CTC blank).

As in DS2, the input weight of a bidirectional layer is shared by both directions
(``W_ih·x_t`` is computed once) and the outputs of the two directions are summed
(:class:`SharedInputBiRecurrent`; every weight an ``nn.Linear``).  With ``shared_input=False``
each layer is a standard bidirectional ``nn.GRU`` / ``nn.RNN`` (ReLU) with the directions
summed (:class:`SummedBiRecurrent`): twice the input weights, but PyTorch's fused recurrent
kernels (about 2x faster training on CPU) and one GRU/RNN operator in ONNX.  With ``n_freq=161``, ``hidden=1760``, ``layers=7`` and ReLU cells the model has
67,699,677 parameters: 270.8 MB in fp32 (the paper: 268 MB).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

Cell = Literal["rnn", "gru"]

#: Regular expression selecting the recurrent weights (input and hidden-to-hidden) for a PruneGroup.
RECURRENT_WEIGHTS = r"^rnns\.\d+\.(input\.weight|forward_hh\.weight|backward_hh\.weight|rnn\.weight_(ih|hh)_l0(_reverse)?)$"


def clipped_relu(x: torch.Tensor) -> torch.Tensor:
    """DS2's activation: min(max(x, 0), 20)."""
    return torch.clamp(x, 0.0, 20.0)


class SharedInputBiRecurrent(nn.Module):
    """Bidirectional recurrent layer with one input weight for both directions; outputs summed.

    RNN cell: ``h_t = min(max(W x_t + b + U h_{t−1} + b_U, 0), 20)``.
    GRU cell (PyTorch's equations and gate order r, z, n)::

        r = σ(W_r x + b_r + U_r h + c_r),  z = σ(W_z x + b_z + U_z h + c_z)
        n = tanh(W_n x + b_n + r ⊙ (U_n h + c_n)),  h' = (1 − z) ⊙ n + z ⊙ h
    """

    def __init__(self, input_size: int, hidden_size: int, cell: Cell = "rnn") -> None:
        super().__init__()
        if cell not in ("rnn", "gru"):
            raise ValueError(f"cell={cell!r}: use 'rnn' or 'gru'")
        gates = 3 if cell == "gru" else 1
        self.cell, self.hidden_size = cell, hidden_size
        self.input = nn.Linear(input_size, gates * hidden_size)
        self.forward_hh = nn.Linear(hidden_size, gates * hidden_size)
        self.backward_hh = nn.Linear(hidden_size, gates * hidden_size)

    def step(self, gi: torch.Tensor, h: torch.Tensor, hh: nn.Module) -> torch.Tensor:
        """One time step: ``gi`` is the (shared) input projection, ``hh`` the direction's U."""
        gh = hh(h)
        if self.cell == "rnn":
            return clipped_relu(gi + gh)
        ir, iz, inn = gi.chunk(3, dim=-1)
        hr, hz, hn = gh.chunk(3, dim=-1)
        r, z = torch.sigmoid(ir + hr), torch.sigmoid(iz + hz)
        n = torch.tanh(inn + r * hn)
        return (1 - z) * n + z * h

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``[time, batch, input_size]`` → ``[time, batch, hidden_size]``."""
        gi = self.input(x)
        h_fwd = h_bwd = x.new_zeros(x.shape[1], self.hidden_size)
        forward_out, backward_out = [], []
        for t in range(x.shape[0]):
            h_fwd = self.step(gi[t], h_fwd, self.forward_hh)
            forward_out.append(h_fwd)
            h_bwd = self.step(gi[x.shape[0] - 1 - t], h_bwd, self.backward_hh)
            backward_out.append(h_bwd)
        return torch.stack(forward_out) + torch.stack(backward_out[::-1])


class SummedBiRecurrent(nn.Module):
    """A standard bidirectional ``nn.GRU`` / ``nn.RNN`` (ReLU) whose two directions are summed."""

    def __init__(self, input_size: int, hidden_size: int, cell: Cell = "rnn") -> None:
        super().__init__()
        if cell == "gru":
            self.rnn: nn.RNNBase = nn.GRU(input_size, hidden_size, bidirectional=True)
        elif cell == "rnn":
            self.rnn = nn.RNN(input_size, hidden_size, nonlinearity="relu", bidirectional=True)
        else:
            raise ValueError(f"cell={cell!r}: use 'rnn' or 'gru'")
        self.hidden_size = hidden_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``[time, batch, input_size]`` → ``[time, batch, hidden_size]``."""
        out, _ = self.rnn(x)
        return out.view(x.shape[0], x.shape[1], 2, self.hidden_size).sum(dim=2)


class DeepSpeech2(nn.Module):
    """Deep Speech 2; ``forward`` returns logits ``[batch, time', n_classes]`` with
    ``time' = ⌊(time − 1)/2⌋ + 1`` (see :meth:`output_lengths`)."""

    def __init__(self, n_freq: int = 161, hidden: int = 1760, layers: int = 7, cell: Cell = "rnn",
                 n_classes: int = 29, conv_channels: int = 32, shared_input: bool = True) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(1, conv_channels, kernel_size=(41, 11), stride=(2, 2), padding=(20, 5)),
            nn.BatchNorm2d(conv_channels),
            nn.Hardtanh(0.0, 20.0),
            nn.Conv2d(conv_channels, conv_channels, kernel_size=(21, 11), stride=(2, 1), padding=(10, 5)),
            nn.BatchNorm2d(conv_channels),
            nn.Hardtanh(0.0, 20.0),
        )
        freq = (n_freq + 2 * 20 - 41) // 2 + 1
        freq = (freq + 2 * 10 - 21) // 2 + 1
        sizes = [conv_channels * freq] + [hidden] * layers
        layer = SharedInputBiRecurrent if shared_input else SummedBiRecurrent
        self.rnns = nn.ModuleList(layer(sizes[i], hidden, cell) for i in range(layers))
        self.fc = nn.Linear(hidden, hidden)
        self.out = nn.Linear(hidden, n_classes)

    @staticmethod
    def output_lengths(lengths: torch.Tensor) -> torch.Tensor:
        """Frames after the convolutions (time stride 2)."""
        return (lengths + 2 * 5 - 11) // 2 + 1

    def forward(self, spectrogram: torch.Tensor) -> torch.Tensor:
        features = self.conv(spectrogram)  # [batch, channels, freq', time']
        x = features.flatten(1, 2).permute(2, 0, 1)  # [time', batch, channels·freq']
        for rnn in self.rnns:
            x = rnn(x)
        x = clipped_relu(self.fc(x))
        return self.out(x).transpose(0, 1)
