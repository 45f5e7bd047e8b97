"""Character-level recurrent language model: the standard char-RNN (Graves 2013, "Generating
Sequences With Recurrent Neural Networks"; Karpathy 2015, "The Unreasonable Effectiveness of
Recurrent Neural Networks").

Characters ``[batch, time]`` → embedding of ``embed`` → ``layers`` unidirectional GRU or LSTM
layers of ``hidden`` units → linear output layer ``hidden → vocab_size``, giving the logits of
the next character at every step::

    h_t = cell(E[c_t], h_{t−1}),   p(c_{t+1} | c_1 … c_t) = softmax(W_out h_t + b_out)

The weights Narang et al. (2017) prune are the recurrent ones (``rnn.weight_ih_l{k}`` and
``rnn.weight_hh_l{k}``) and the output layer (``out.weight``) — exactly what a
:class:`compressor.PruneGroup` selects by default; the embedding (``embedding.weight``) is
pruned only when ``nn.Embedding`` is added to the group's ``types``.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

Cell = Literal["gru", "lstm"]


class CharLM(nn.Module):
    """Embedding → GRU/LSTM (``batch_first``) → Linear; ``forward`` returns logits ``[B, T, V]``.

    ``dropout`` is applied to the embeddings, between recurrent layers and to the last layer's
    outputs — the non-recurrent connections (Zaremba, Sutskever and Vinyals 2014)."""

    def __init__(self, vocab_size: int, embed: int = 64, hidden: int = 512, layers: int = 1, cell: Cell = "gru",
                 dropout: float = 0.0) -> None:
        super().__init__()
        rnn_types = {"gru": nn.GRU, "lstm": nn.LSTM}
        if cell not in rnn_types:
            raise ValueError(f"cell={cell!r}: use 'gru' or 'lstm'")
        self.embedding = nn.Embedding(vocab_size, embed)
        self.rnn: nn.RNNBase = rnn_types[cell](embed, hidden, num_layers=layers, batch_first=True,
                                               dropout=dropout if layers > 1 else 0.0)
        self.drop = nn.Dropout(dropout)
        self.out = nn.Linear(hidden, vocab_size)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        states, _ = self.rnn(self.drop(self.embedding(tokens)))
        return self.out(self.drop(states))
