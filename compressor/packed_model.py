"""``PackedModel``: the hand-off from ``compressor`` to ``exporters``.

A packed model is the (pruned, finalized) ``nn.Module`` — for its structure, biases and any
layer left alone — plus one :class:`~compressor.packing.PackedWeight` per packed weight, keyed
by parameter name.  :func:`pack_model` builds it; the format and block of each weight are
chosen by :func:`choose_packing` (smallest by default) unless the config forces them.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from .blocks import BlockShape
from .packing import FORMATS, Format, PackedWeight, ValueType, pack
from .quantize import QuantError

if TYPE_CHECKING:
    from .size import SizeReport
from .selection import DEFAULT_TYPES, WeightRef, iter_prunable_weights

DEFAULT_BLOCKS: tuple[BlockShape, ...] = (BlockShape(4, 4), BlockShape(8, 8), BlockShape(16, 1), BlockShape(1, 16))

#: A cost of a packed weight; the chooser picks the candidate with the lowest cost.
PackingCost = Callable[[str, PackedWeight], float]


def size_cost(name: str, packed: PackedWeight) -> float:
    """The default cost: stored bytes."""
    return float(packed.nbytes)


@dataclass(frozen=True)
class PackingConfig:
    """How weights are packed.

    ``format``: "auto" lets :func:`choose_packing` pick among dense, CSR and BSR with each of
    ``blocks`` (or BSR with ``block`` if one is given); any format of
    :data:`~compressor.packing.FORMATS` forces it (for "bsr", ``block`` must be given; for
    "bitmask" it is optional: one bit per block).
    ``dtype``: "fp32" or "int8" (symmetric per-output-channel, only the stored values).
    ``types`` / ``filter_fn``: which prunable weights are packed (``filter_fn(name, module)``
    returns True to pack; like torchao's ``quantize_`` filter)."""

    format: Format | str = "auto"
    block: BlockShape | None = None
    blocks: tuple[BlockShape, ...] = DEFAULT_BLOCKS
    dtype: ValueType = "fp32"
    types: tuple[type[nn.Module], ...] = DEFAULT_TYPES
    filter_fn: Callable[[str, nn.Module], bool] | None = None
    cost: PackingCost = size_cost

    def __post_init__(self) -> None:
        if self.format != "auto" and self.format not in FORMATS:
            raise ValueError(f"format={self.format!r}: use auto or one of {', '.join(FORMATS)}")
        if self.format == "bsr" and self.block is None:
            raise ValueError("format='bsr' needs a block shape, for example block=BlockShape(16, 1)")
        if self.dtype not in ("fp32", "int8"):
            raise ValueError(f"dtype={self.dtype!r}: use fp32 or int8")


def candidates(weight: np.ndarray, config: PackingConfig) -> list[PackedWeight]:
    """Every packing the config allows for one weight."""
    if config.format != "auto":
        return [pack(weight, config.format, config.block or BlockShape(), config.dtype)]
    if config.block is not None:
        return [pack(weight, "bsr", config.block, config.dtype)]
    return [pack(weight, "dense", dtype=config.dtype), pack(weight, "csr", dtype=config.dtype),
            *(pack(weight, "bsr", block, config.dtype) for block in config.blocks)]


def choose_packing(name: str, weight: np.ndarray, config: PackingConfig) -> PackedWeight:
    """The candidate with the lowest ``config.cost`` (ties go to the earlier: dense, CSR, BSR)."""
    options = candidates(weight, config)
    return min(options, key=lambda packed: config.cost(name, packed))


@dataclass
class PackedModel:
    """A module plus the packed form of its pruned weights (by parameter name)."""

    module: nn.Module
    weights: dict[str, PackedWeight] = field(default_factory=dict)

    def size_report(self) -> "SizeReport":
        from .size import size_report

        return size_report(self)

    def dequantized(self) -> nn.Module:
        """A copy of the module whose packed weights are replaced by what is stored (int8
        values times their scales): the exact reference for artifacts built from this model."""
        module = copy.deepcopy(self.module)
        params = dict(module.named_parameters())
        with torch.no_grad():
            for name, weight in self.weights.items():
                params[name].copy_(torch.from_numpy(weight.to_dense()))
        return module

    def quant_errors(self) -> list[QuantError]:
        """Per-layer error of every int8 weight against the module's fp32 weight."""
        params = dict(self.module.named_parameters())
        return [weight.quant_error(name, params[name].detach().cpu().float().numpy())
                for name, weight in self.weights.items() if weight.dtype == "int8"]


def _selected(model: nn.Module, config: PackingConfig) -> list[WeightRef]:
    refs = list(iter_prunable_weights(model, config.types))
    if config.filter_fn is not None:
        refs = [ref for ref in refs if config.filter_fn(ref.name, ref.module)]
    return refs


def pack_model(model: nn.Module, config: PackingConfig = PackingConfig()) -> PackedModel:
    """Pack the selected weights of a pruned, finalized model (zeros are what is left out)."""
    if any(hasattr(module, "parametrizations") for module in model.modules()):
        raise ValueError("the model still has pruning masks attached: call pruner.finalize() before packing")
    weights = {}
    for ref in _selected(model, config):
        weight = getattr(ref.module, ref.attr).detach().cpu().float().numpy()
        weights[ref.name] = choose_packing(ref.name, weight, config)
    return PackedModel(model, weights)


def save_packed(packed: PackedModel, path: str | Path) -> Path:
    """Write the packed weights to one ``.npz``: every stored array as ``"<weight>/<array>"``
    plus ``"<weight>/__meta__"`` (JSON: shape, format, dtype, block), and the rest of the
    module's state (biases, normalization, layers left dense) as ``"__state__/<name>"``.
    Written to a temporary name and renamed.  :func:`load_packed` reads it back exactly."""
    path = Path(path)
    arrays: dict[str, np.ndarray] = {}
    for name, weight in packed.weights.items():
        meta = {"shape": list(weight.shape), "format": weight.format, "dtype": weight.dtype,
                "block": [weight.block.rows, weight.block.cols]}
        arrays[f"{name}/__meta__"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
        arrays.update({f"{name}/{key}": value for key, value in weight.arrays.items()})
    for name, tensor in packed.module.state_dict().items():
        if name not in packed.weights:
            arrays[f"__state__/{name}"] = tensor.detach().cpu().numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    try:
        np.savez(tmp, **arrays)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


class PackedFileError(ValueError):
    """A packed-weights file that :func:`load_packed` cannot use; the message names the file, the
    problem and the fix."""


#: numpy types of the saved module state that torch reads and copies into any parameter or buffer.
STATE_DTYPES = ("bool", "uint8", "int8", "int16", "int32", "int64", "float16", "float32", "float64")


def _is_sizes(value: object, least: int) -> bool:
    """A non-empty JSON list of whole numbers ≥ ``least``."""
    return (isinstance(value, list) and len(value) > 0
            and all(isinstance(v, int) and not isinstance(v, bool) and v >= least for v in value))


def _packed_weight(meta_array: np.ndarray, arrays: dict[str, np.ndarray]) -> PackedWeight:
    """A weight from its ``__meta__`` JSON and its stored arrays (``ValueError`` if the meta is malformed)."""
    try:
        meta = json.loads(meta_array.tobytes().decode())
    except (ValueError, RecursionError) as error:
        raise ValueError(f"its __meta__ is not JSON ({error})") from error
    if not (isinstance(meta, dict) and _is_sizes(meta.get("shape"), 0) and meta.get("format") in FORMATS
            and meta.get("dtype") in ("fp32", "int8") and _is_sizes(meta.get("block"), 1) and len(meta["block"]) == 2):
        raise ValueError("its __meta__ is not {shape, format, dtype, block}")
    return PackedWeight(tuple(meta["shape"]), meta["format"], meta["dtype"], BlockShape(*meta["block"]), arrays)


def load_packed(path: str | Path, module: nn.Module) -> PackedModel:
    """The :class:`PackedModel` saved by :func:`save_packed`, on ``module`` (built like the saved
    one); the module receives the dequantized packed weights and the saved remaining state.
    Raises :class:`PackedFileError` for a file that is unreadable, malformed or saved from another module."""
    path = Path(path)
    fix = "write it again with save_packed (compress-and-export pack)"
    try:
        with np.load(path, allow_pickle=False) as data:
            files = {key: data[key] for key in data.files}
    except Exception as error:  # zipfile, zlib and numpy raise many types; all mean an unreadable file
        reason = str(error).strip().splitlines()[0] if str(error).strip() else "no details"
        raise PackedFileError(f"{path} is not a readable .npz archive ({type(error).__name__}: {reason}): {fix}"
                              ) from error
    weights, state = {}, {}
    for key, value in files.items():
        owner, _, array = key.rpartition("/")
        if owner == "__state__":
            if not value.dtype.isnative or value.dtype.name not in STATE_DTYPES:
                raise PackedFileError(f"{path}: {key!r} is stored as {value.dtype}, not a native number type: {fix}")
            state[array] = torch.from_numpy(value)
        elif array == "__meta__":
            stored = {k.rpartition("/")[2]: v for k, v in files.items() if k.rpartition("/")[0] == owner and not k.endswith("/__meta__")}
            try:
                weights[owner] = _packed_weight(value, stored)
            except ValueError as error:
                raise PackedFileError(f"{path}: packed weight {owner!r} is malformed ({error}): {fix}") from error
    own = module.state_dict()
    shapes = {**{k: tuple(v.shape) for k, v in state.items()}, **{k: w.shape for k, w in weights.items()}}
    missing = [k for k in own if k not in shapes]
    unexpected = [k for k in shapes if k not in own]
    wrong = [f"{k} {shapes[k]} vs module {tuple(own[k].shape)}" for k in own if k in shapes and shapes[k] != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        parts = [f"missing {', '.join(missing[:8])}" if missing else "",
                 f"unexpected {', '.join(map(repr, unexpected[:8]))}" if unexpected else "",
                 f"shape mismatch {'; '.join(wrong[:8])}" if wrong else ""]
        raise PackedFileError(f"{path} does not match the module ({'; '.join(p for p in parts if p)}): "
                              "load it on a module built like the one it was saved from")
    for name, weight in weights.items():
        try:
            weight.check()
        except ValueError as error:
            raise PackedFileError(f"{path}: packed weight {name!r} is malformed ({error}): {fix}") from error
        state[name] = torch.from_numpy(weight.to_dense())
    module.load_state_dict(state)
    return PackedModel(module, weights)
