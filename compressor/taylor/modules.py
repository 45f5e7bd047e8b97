"""Plain-torch module used by shrunk models: a recurrent stack whose layers and directions have
their own hidden sizes.

``nn.GRU`` / ``nn.LSTM`` / ``nn.RNN`` give every layer and both directions one ``hidden_size``.
When unit removal leaves them with different sizes, :func:`~compressor.taylor.shrink.shrink`
replaces the module by a :class:`PrunedRNN`: one single-layer, one-directional module of the
same type per (layer, direction); the reverse direction runs on the time-reversed input and its
output is reversed back (exactly what a bidirectional module does on an unpacked batch), and
the directions are concatenated.  Only standard modules and ``flip`` / ``cat`` are used, so the
result exports through ``torch.export``, ONNX and TVM like any model; a file saved with
:func:`~compressor.taylor.io.save_shrunk` (a ``torch.export`` program) reloads without this
module.
"""

from __future__ import annotations

import torch
from torch import nn

_TYPES = {"GRU": nn.GRU, "LSTM": nn.LSTM, "RNN_TANH": nn.RNN, "RNN_RELU": nn.RNN}


class PrunedRNN(nn.Module):
    """``layers[l][d]``: a one-layer, one-direction ``nn.GRU/LSTM/RNN`` with its own hidden size.

    ``forward(x)`` returns ``(output, None)``: the output of the last layer with the directions
    concatenated (like the module it replaces); the final states are not returned (a model whose
    ``h_n`` is used is never shrunk)."""

    def __init__(self, mode: str, input_size: int, hidden_sizes: list[list[int]], bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0) -> None:
        super().__init__()
        self.mode, self.batch_first, self.dropout = mode, batch_first, dropout
        self.hidden_sizes = [list(h) for h in hidden_sizes]
        kind = _TYPES[mode]
        extra = {"nonlinearity": "relu" if mode == "RNN_RELU" else "tanh"} if kind is nn.RNN else {}
        layers, size = [], input_size
        for sizes in hidden_sizes:
            layers.append(nn.ModuleList(kind(size, h, num_layers=1, bias=bias, batch_first=batch_first, **extra)
                                        for h in sizes))
            size = sum(sizes)
        self.layers = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor, hx: None = None) -> tuple[torch.Tensor, None]:
        time_dim = 1 if self.batch_first and x.dim() == 3 else 0
        for index, layer in enumerate(self.layers):
            outputs = []
            for direction, rnn in enumerate(layer):
                if direction == 0:
                    outputs.append(rnn(x)[0])
                else:
                    outputs.append(rnn(x.flip(time_dim))[0].flip(time_dim))
            x = torch.cat(outputs, dim=-1) if len(outputs) > 1 else outputs[0]
            if self.dropout > 0 and self.training and index < len(self.layers) - 1:
                x = nn.functional.dropout(x, self.dropout, training=True)
        return x, None
