"""PyTorch reference modules that compute with packed weights.

:class:`SparseLinear` and :class:`SparseRecurrent` (RNN, GRU, LSTM) compute ``x·Wᵀ`` block by
block from a :class:`~compressor.packing.PackedWeight` — the stored blocks only, never a
densified weight — so their output shows what the packed representation really computes.
:func:`swap_sparse_modules` swaps them into a copy of a packed model in one call.  They are the
reference the exporters are checked against, written for clarity, not speed.

Activations: ``"fp32"`` (int8 weights are dequantized: weight-only int8) or ``"int8"``
(dynamic int8 activations): each row of ``x`` is quantized symmetrically,
``s_x = max|x_row| / 127``, ``x_q = round(x / s_x)``; products are accumulated in int32 and
``y = acc · s_x · s_w[out]``.
"""

from __future__ import annotations

import copy
from typing import Literal

import torch
from torch import nn

from .packed_model import PackedModel
from .packing import PackedWeight, pack
from .quantize import QMAX

Activations = Literal["fp32", "int8"]
_CHUNK_ELEMENTS = 1 << 24  # rows of x are processed in chunks of at most this many gathered products


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row symmetric int8: codes (int32) and scales ``max|x_row| / 127`` (1 for zero rows)."""
    peak = x.abs().amax(dim=1)
    scale = torch.where(peak > 0, peak / QMAX, torch.ones_like(peak))
    return torch.round(x / scale[:, None]).clamp(-QMAX, QMAX).to(torch.int32), scale


class PackedMatmul(nn.Module):
    """``y = x·Wᵀ`` for a packed ``W`` of matrix shape ``[out, in]`` (any stored format)."""

    def __init__(self, packed: PackedWeight, activations: Activations = "fp32") -> None:
        super().__init__()
        if activations not in ("fp32", "int8"):
            raise ValueError(f"activations={activations!r}: use fp32 or int8")
        if activations == "int8" and packed.dtype != "int8":
            raise ValueError("int8 activations need int8 weights: pack with dtype='int8'")
        self.out_features, self.in_features = packed.matrix_shape
        self.block = packed.block
        self.dense = packed.format == "dense"
        self.activations = activations
        if activations == "int8":
            values = torch.from_numpy(packed.arrays["values"].astype("int32"))
            self.register_buffer("weight_scales", torch.from_numpy(packed.arrays["scales"].copy()))
        else:
            values = torch.from_numpy(packed.float_values().copy())
        if self.dense:
            self.register_buffer("values", values.reshape(self.out_features, self.in_features))
        else:
            block_row, block_col = packed.block_coords()
            self.register_buffer("values", values.reshape(-1, self.block.rows, self.block.cols))
            self.register_buffer("block_row", torch.from_numpy(block_row.astype("int64")))
            self.register_buffer("block_col", torch.from_numpy(block_col.astype("int64")))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if self.activations == "int8":
            x2, x_scale = quantize_activations(x2)
        y = x2 @ self.values.T if self.dense else self._block_matmul(x2)
        if self.activations == "int8":
            y = y.to(torch.float32) * x_scale[:, None] * self.weight_scales[None, :]
        return y.reshape(*lead, self.out_features)

    def _block_matmul(self, x: torch.Tensor) -> torch.Tensor:
        r, c = self.block.rows, self.block.cols
        n_br, n_bc = self.block.grid((self.out_features, self.in_features))
        x = nn.functional.pad(x, (0, n_bc * c - self.in_features)).reshape(x.shape[0], n_bc, c)
        step = max(1, _CHUNK_ELEMENTS // max(1, self.values.numel()))
        outputs = []
        for chunk in x.split(step):
            gathered = chunk[:, self.block_col]  # [b, nnz_blocks, c]
            products = torch.einsum("bnc,nrc->bnr", gathered, self.values)
            out = torch.zeros(chunk.shape[0], n_br, r, dtype=products.dtype)
            outputs.append(out.index_add_(1, self.block_row, products).reshape(chunk.shape[0], n_br * r))
        y = torch.cat(outputs) if outputs else x.new_zeros(0, n_br * r, dtype=self.values.dtype)
        return y[:, : self.out_features]


class SparseLinear(nn.Module):
    """``nn.Linear`` computing with a packed weight."""

    def __init__(self, packed: PackedWeight, bias: torch.Tensor | None, activations: Activations = "fp32") -> None:
        super().__init__()
        self.matmul = PackedMatmul(packed, activations)
        self.in_features, self.out_features = self.matmul.in_features, self.matmul.out_features
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    @classmethod
    def from_linear(cls, linear: nn.Linear, packed: PackedWeight, activations: Activations = "fp32") -> "SparseLinear":
        return cls(packed, linear.bias, activations)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.matmul(x)
        return y if self.bias is None else y + self.bias


class SparseRecurrent(nn.Module):
    """``nn.RNN`` / ``nn.GRU`` / ``nn.LSTM`` computing with packed ``weight_ih``/``weight_hh``.

    Same gate equations and gate order as PyTorch (GRU: r, z, n; LSTM: i, f, g, o), same
    arguments and outputs (``batch_first``, ``bidirectional``, ``num_layers``, optional initial
    state, unbatched input).  Padded batches only (no ``PackedSequence``) and no ``proj_size``."""

    def __init__(self, rnn: nn.RNNBase, packed: dict[str, PackedWeight], activations: Activations = "fp32") -> None:
        super().__init__()
        if getattr(rnn, "proj_size", 0):
            raise ValueError("SparseRecurrent does not support LSTM proj_size")
        self.mode = rnn.mode
        self.hidden_size, self.num_layers = rnn.hidden_size, rnn.num_layers
        self.batch_first, self.directions = rnn.batch_first, 2 if rnn.bidirectional else 1
        self.ih, self.hh = nn.ModuleList(), nn.ModuleList()
        gates = self.hidden_size * {"LSTM": 4, "GRU": 3}.get(self.mode, 1)
        for layer in range(self.num_layers):
            for direction in range(self.directions):
                suffix = f"_l{layer}" + ("_reverse" if direction else "")
                for kind, matmuls in (("ih", self.ih), ("hh", self.hh)):
                    name = f"weight_{kind}{suffix}"
                    weight = packed.get(name) or pack(getattr(rnn, name).detach().numpy(), "dense")
                    matmul = PackedMatmul(weight, activations if weight.dtype == "int8" else "fp32")
                    matmuls.append(matmul)
                    bias = getattr(rnn, f"bias_{kind}{suffix}") if rnn.bias else torch.zeros(gates)
                    self.register_buffer(f"bias_{kind}{suffix}", bias.detach().clone())

    def _cell(self, gi: torch.Tensor, gh: torch.Tensor, h: torch.Tensor, c: torch.Tensor | None):
        if self.mode == "GRU":
            ir, iz, inn = gi.chunk(3, dim=-1)
            hr, hz, hn = gh.chunk(3, dim=-1)
            r, z = torch.sigmoid(ir + hr), torch.sigmoid(iz + hz)
            n = torch.tanh(inn + r * hn)
            return (1 - z) * n + z * h, None
        if self.mode == "LSTM":
            i, f, g, o = (gi + gh).chunk(4, dim=-1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            return torch.sigmoid(o) * torch.tanh(c), c
        pre = gi + gh
        return (torch.tanh(pre) if self.mode == "RNN_TANH" else torch.relu(pre)), None

    def forward(self, x: torch.Tensor, hx=None):
        if isinstance(x, nn.utils.rnn.PackedSequence):
            raise TypeError("SparseRecurrent takes padded batches, not PackedSequence")
        unbatched = x.dim() == 2
        if unbatched:
            x = x.unsqueeze(1 if not self.batch_first else 0)
        if self.batch_first:
            x = x.transpose(0, 1)  # [time, batch, features]
        steps, batch = x.shape[0], x.shape[1]
        zeros = x.new_zeros(self.num_layers * self.directions, batch, self.hidden_size)
        if self.mode == "LSTM":
            h0, c0 = hx if hx is not None else (zeros, zeros)
        else:
            h0, c0 = (hx if hx is not None else zeros), None
        if unbatched and hx is not None:
            h0 = h0.unsqueeze(1)
            c0 = c0.unsqueeze(1) if c0 is not None else None
        h_n, c_n = [], []
        layer_input = x
        for layer in range(self.num_layers):
            outputs = []
            for direction in range(self.directions):
                index = layer * self.directions + direction
                suffix = f"_l{layer}" + ("_reverse" if direction else "")
                gi = self.ih[index](layer_input) + getattr(self, f"bias_ih{suffix}")
                bias_hh = getattr(self, f"bias_hh{suffix}")
                h, c = h0[index], (c0[index] if c0 is not None else None)
                out = [None] * steps
                for t in (reversed(range(steps)) if direction else range(steps)):
                    h, c = self._cell(gi[t], self.hh[index](h) + bias_hh, h, c)
                    out[t] = h
                outputs.append(torch.stack(out))
                h_n.append(h)
                c_n.append(c)
            layer_input = torch.cat(outputs, dim=-1)
        output, h_n = layer_input, torch.stack(h_n)
        if self.batch_first:
            output = output.transpose(0, 1)
        if unbatched:
            output = output.squeeze(1 if not self.batch_first else 0)
            h_n = h_n.squeeze(1)
        if self.mode == "LSTM":
            c_n = torch.stack(c_n).squeeze(1) if unbatched else torch.stack(c_n)
            return output, (h_n, c_n)
        return output, h_n


def swap_sparse_modules(packed: PackedModel, activations: Activations = "fp32") -> nn.Module:
    """A copy of ``packed.module`` in which every Linear and RNN/GRU/LSTM with packed weights
    computes with them (:class:`SparseLinear`, :class:`SparseRecurrent`); any other packed weight
    (convolutions, embeddings) is replaced by its unpacked (for int8: dequantized) value."""
    model = copy.deepcopy(packed.module)
    by_module: dict[str, dict[str, PackedWeight]] = {}
    for name, weight in packed.weights.items():
        module_name, _, attr = name.rpartition(".")
        by_module.setdefault(module_name, {})[attr] = weight
    for module_name, weights in by_module.items():
        module = model.get_submodule(module_name)
        if isinstance(module, nn.Linear):
            weight = weights["weight"]
            replacement: nn.Module = SparseLinear.from_linear(module, weight,
                                                              activations if weight.dtype == "int8" else "fp32")
        elif isinstance(module, nn.RNNBase):
            replacement = SparseRecurrent(module, weights, activations)
        else:
            with torch.no_grad():
                for attr, weight in weights.items():
                    getattr(module, attr).copy_(torch.from_numpy(weight.to_dense()))
            continue
        parent_name, _, child = module_name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, replacement)
    return model.eval()
