"""Recurrent layers as one time-loop operator, so that compilers see the loop, not T copies of it.

``torch.export`` unrolls ``nn.GRU`` / ``nn.LSTM`` / ``nn.RNN`` over the example's time steps; a
compiled library would then grow with the sequence length.  :func:`scan_recurrent_layers`
returns a copy of a model whose recurrent layers compute

    gi = x · W_ihᵀ + b_ih                       (one matmul over all time steps)
    y, state = recurrence(gi, state0, W_hh, b_hh, cell, reverse[, addend])

(for every cell but the GRU ``b_ih`` moves into the recurrence's bias instead,
``gi = x · W_ihᵀ`` and ``b_hh + b_ih``: :func:`joins_recurrent_bias`)

where :func:`recurrence` is the custom operator ``compress_and_export::recurrence``: the whole
time loop of one direction of one layer.  Its eager implementation is PyTorch's own cell
equations (gate orders as in PyTorch)::

    gru:   r = σ(gi_r + gh_r),  z = σ(gi_z + gh_z),  n = tanh(gi_n + r ⊙ gh_n),  h' = (1 − z) ⊙ n + z ⊙ h
    lstm:  i, f, g, o = σ(gi_i + gh_i), σ(gi_f + gh_f), tanh(gi_g + gh_g), σ(gi_o + gh_o)
           c' = f ⊙ c + i ⊙ g,  h' = o ⊙ tanh(c')
    rnn_tanh / rnn_relu / rnn_clipped_relu (DS2's min(max(·, 0), 20)):  h' = act(gi + gh)

with ``gh = h · W_hhᵀ + b_hh``.  DS2's layers sum their two directions: the backward loop takes
the forward one's ``y`` as ``addend`` and returns the sum, so that no pass of its own adds them.  The TVM exporter maps the operator to a TIR kernel over the
packed ``W_hh`` (:mod:`exporters.tvm_recurrence_kernel`); parameter names are unchanged, so
``PackedModel`` entries still name the weights.
"""

from __future__ import annotations

import copy
from typing import Literal

import torch
from torch import Tensor, nn

from compressor.zoo.ds2 import SharedInputBiRecurrent

Cell = Literal["gru", "lstm", "rnn_tanh", "rnn_relu", "rnn_clipped_relu"]
GATES: dict[str, int] = {"gru": 3, "lstm": 4, "rnn_tanh": 1, "rnn_relu": 1, "rnn_clipped_relu": 1}
OP_NAME = "compress_and_export::recurrence"


def cell_step(cell: str, gi: Tensor, gh: Tensor, h: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
    """One step of ``cell`` (equations in the module docstring); returns ``(h', c')``."""
    if cell == "gru":
        ir, iz, inn = gi.chunk(3, dim=-1)
        hr, hz, hn = gh.chunk(3, dim=-1)
        r, z = torch.sigmoid(ir + hr), torch.sigmoid(iz + hz)
        n = torch.tanh(inn + r * hn)
        return (1 - z) * n + z * h, c
    if cell == "lstm":
        i, f, g, o = (gi + gh).chunk(4, dim=-1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c), c
    pre = gi + gh
    if cell == "rnn_tanh":
        return torch.tanh(pre), c
    if cell == "rnn_relu":
        return torch.relu(pre), c
    if cell == "rnn_clipped_relu":
        return torch.clamp(pre, 0.0, 20.0), c
    raise ValueError(f"cell={cell!r}: use one of {', '.join(GATES)}")


@torch.library.custom_op(OP_NAME, mutates_args=())
def recurrence(gi: Tensor, state: Tensor, w_hh: Tensor, b_hh: Tensor, cell: str, reverse: bool,
               addend: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The time loop of one direction: ``gi [T, B, G·H]``, ``state [S, B, H]`` (S = 2 for LSTM:
    h and c, else 1) → ``y [T, B, H]`` and the final state ``[S, B, H]``.  With ``addend``
    (``[T, B, H]``, the other direction's ``y`` of a layer that sums its directions) ``y`` is
    ``h + addend``: the TVM kernel adds it as it writes ``h``, in place of ``addend``, which the
    caller must not use again."""
    h = state[0]
    c = state[1] if cell == "lstm" else state[0]
    steps = range(gi.shape[0] - 1, -1, -1) if reverse else range(gi.shape[0])
    ys = [gi.new_empty(0)] * gi.shape[0]
    for t in steps:
        h, c = cell_step(cell, gi[t], torch.nn.functional.linear(h, w_hh, b_hh), h, c)
        ys[t] = h
    final = torch.stack([h, c]) if cell == "lstm" else h.unsqueeze(0)
    y = torch.stack(ys) if ys else gi.new_empty(0, *state.shape[1:])
    return (y if addend is None else y + addend), final.contiguous()


@recurrence.register_fake
def _(gi: Tensor, state: Tensor, w_hh: Tensor, b_hh: Tensor, cell: str, reverse: bool,
      addend: Tensor | None = None) -> tuple[Tensor, Tensor]:
    return gi.new_empty(gi.shape[0], gi.shape[1], w_hh.shape[1]), torch.empty_like(state)


def joins_recurrent_bias(cell: str, b_ih: Tensor | None) -> bool:
    """Whether ``b_ih`` is added to the recurrent bias ``b_hh`` instead of to the input projection
    ``gi``: every cell but the GRU adds ``x·W_ihᵀ + b_ih + h·W_hhᵀ + b_hh`` inside its
    nonlinearity, so ``b = b_ih + b_hh`` is added once a step inside the recurrence and ``gi``
    needs no pass of its own over ``[time, batch, gates·hidden]``; the GRU's
    ``n = tanh(W_in x + b_in + r ⊙ (W_hn h + b_hn))`` keeps them apart."""
    return b_ih is not None and cell != "gru"


class ScanRNN(nn.Module):
    """``nn.GRU`` / ``nn.LSTM`` / ``nn.RNN`` computed with :func:`recurrence`; same parameters
    (the very objects, under the same names), same inputs and outputs."""

    def __init__(self, rnn: nn.RNNBase) -> None:
        super().__init__()
        if getattr(rnn, "proj_size", 0):
            raise ValueError(f"{type(rnn).__name__} with proj_size is not supported: export it without projections")
        if isinstance(rnn, nn.GRU):
            self.cell: str = "gru"
        elif isinstance(rnn, nn.LSTM):
            self.cell = "lstm"
        else:
            self.cell = "rnn_tanh" if rnn.nonlinearity == "tanh" else "rnn_relu"
        self.hidden_size, self.num_layers = rnn.hidden_size, rnn.num_layers
        self.batch_first, self.bidirectional, self.bias = rnn.batch_first, rnn.bidirectional, rnn.bias
        for name, param in rnn.named_parameters(recurse=False):
            self.register_parameter(name, param)

    def forward(self, x: Tensor, hx: Tensor | tuple[Tensor, Tensor] | None = None):
        if self.batch_first:
            x = x.transpose(0, 1)
        directions = 2 if self.bidirectional else 1
        batch = x.shape[1]
        states = 2 if self.cell == "lstm" else 1
        if hx is None:
            init = x.new_zeros(states, self.num_layers * directions, batch, self.hidden_size)
        else:
            init = torch.stack(hx) if isinstance(hx, tuple) else hx.unsqueeze(0)
        finals = []
        for layer in range(self.num_layers):
            outputs = []
            for direction in range(directions):
                suffix = f"_l{layer}" + ("_reverse" if direction else "")
                w_ih, w_hh = getattr(self, "weight_ih" + suffix), getattr(self, "weight_hh" + suffix)
                b_ih = getattr(self, "bias_ih" + suffix) if self.bias else None
                b_hh = getattr(self, "bias_hh" + suffix) if self.bias else w_hh.new_zeros(w_hh.shape[0])
                join = joins_recurrent_bias(self.cell, b_ih)
                gi = nn.functional.linear(x, w_ih, None if join else b_ih)
                b_hh = b_ih + b_hh if join else b_hh
                y, final = recurrence(gi, init[:, layer * directions + direction], w_hh, b_hh, self.cell, bool(direction))
                outputs.append(y)
                finals.append(final)
            x = torch.cat(outputs, dim=-1) if directions == 2 else outputs[0]
        out = x.transpose(0, 1) if self.batch_first else x
        final = torch.stack(finals, dim=1)  # [S, layers·directions, B, H]
        return out, ((final[0], final[1]) if self.cell == "lstm" else final[0])


class ScanSharedInputBiRecurrent(nn.Module):
    """DS2's :class:`~compressor.zoo.ds2.SharedInputBiRecurrent` computed with :func:`recurrence`."""

    def __init__(self, layer: SharedInputBiRecurrent) -> None:
        super().__init__()
        self.cell = "gru" if layer.cell == "gru" else "rnn_clipped_relu"
        self.hidden_size = layer.hidden_size
        self.input, self.forward_hh, self.backward_hh = layer.input, layer.forward_hh, layer.backward_hh

    def forward(self, x: Tensor) -> Tensor:
        b_ih, b_forward, b_backward = self.input.bias, self.forward_hh.bias, self.backward_hh.bias
        join = joins_recurrent_bias(self.cell, b_ih)
        gi = nn.functional.linear(x, self.input.weight, None if join else b_ih)
        if join:
            b_forward, b_backward = b_ih + b_forward, b_ih + b_backward
        state = x.new_zeros(1, x.shape[1], self.hidden_size)
        forward, _ = recurrence(gi, state, self.forward_hh.weight, b_forward, self.cell, False)
        summed, _ = recurrence(gi, state, self.backward_hh.weight, b_backward, self.cell, True, forward)
        return summed


def scan_recurrent_layers(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` with every recurrent layer replaced by its scan form
    (:class:`ScanRNN`, :class:`ScanSharedInputBiRecurrent`); parameter names are unchanged."""
    model = copy.deepcopy(model)
    if isinstance(model, (nn.RNNBase, SharedInputBiRecurrent)):
        return _scan_form(model)
    for name, child in list(model.named_modules()):
        if isinstance(child, (nn.RNNBase, SharedInputBiRecurrent)):
            parent_name, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent_name), attr, _scan_form(child))
    return model


def _scan_form(layer: nn.Module) -> nn.Module:
    return ScanSharedInputBiRecurrent(layer) if isinstance(layer, SharedInputBiRecurrent) else ScanRNN(layer)
