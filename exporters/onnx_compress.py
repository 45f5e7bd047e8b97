"""Weights compressed at rest in an ONNX file, rebuilt by standard operators that ONNX Runtime
constant-folds when the session is created.

A sparse initializer ``W`` (``N`` elements) is replaced by ``W__mask`` — one bit per element,
``np.packbits(W != 0, bitorder="little")`` — and ``W__values`` — the non-zeros in row-major
order (the bit-mask encoding of :mod:`compressor.packing`).  The graph rebuilds it::

    bits[k]  = (mask[k // 8] >> (k % 8)) mod 2            Unsqueeze, BitShift, Mod, Reshape, Slice
    pos[k]   = max(cumsum(bits)[k] − 1, 0)                 Cast, CumSum, Sub, Max
    W        = reshape(where(bits, values[pos], 0), shape) Gather, Where, Reshape

Every input of these nodes is a constant, so ONNX Runtime folds them into the dense tensor once
at load; ``NonZero`` is avoided because it is not folded and would run at every inference.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from compressor.packing import pack

COMPRESSIBLE = (np.dtype(np.float32), np.dtype(np.int8))


@dataclass(frozen=True)
class CompressedTensor:
    """One initializer stored as bit-mask + values: its shape, sparsity and bytes before/after."""

    name: str
    shape: tuple[int, ...]
    sparsity: float
    dense_bytes: int
    stored_bytes: int


def _decode_nodes(name: str, shape: tuple[int, ...], numel: int, dtype: np.dtype):
    p = f"{name}__"
    constants = {
        "axis1": np.array([1], np.int64),
        "shifts": np.arange(8, dtype=np.uint8),
        "two": np.array(2, np.uint8),
        "flat": np.array([-1], np.int64),
        "start": np.array([0], np.int64),
        "stop": np.array([numel], np.int64),
        "zero": np.array(0, np.int64),
        "one": np.array(1, np.int64),
        "shape": np.array(shape, np.int64),
        "fill": np.array(0, dtype),
    }
    nodes = [
        helper.make_node("Unsqueeze", [p + "mask", p + "axis1"], [p + "bytes"]),
        helper.make_node("BitShift", [p + "bytes", p + "shifts"], [p + "shifted"], direction="RIGHT"),
        helper.make_node("Mod", [p + "shifted", p + "two"], [p + "bits8"]),
        helper.make_node("Reshape", [p + "bits8", p + "flat"], [p + "bits_padded"]),
        helper.make_node("Slice", [p + "bits_padded", p + "start", p + "stop"], [p + "bits"]),
        helper.make_node("Cast", [p + "bits"], [p + "kept"], to=TensorProto.BOOL),
        helper.make_node("Cast", [p + "bits"], [p + "bits64"], to=TensorProto.INT64),
        helper.make_node("CumSum", [p + "bits64", p + "zero"], [p + "count"]),
        helper.make_node("Sub", [p + "count", p + "one"], [p + "index"]),
        helper.make_node("Max", [p + "index", p + "zero"], [p + "position"]),
        helper.make_node("Gather", [p + "values", p + "position"], [p + "gathered"]),
        helper.make_node("Where", [p + "kept", p + "gathered", p + "fill"], [p + "dense"]),
        helper.make_node("Reshape", [p + "dense", p + "shape"], [name]),
    ]
    return nodes, [numpy_helper.from_array(value, p + key) for key, value in constants.items()]


def compress_initializers(model: onnx.ModelProto, min_sparsity: float = 0.5,
                          min_numel: int = 1024) -> tuple[onnx.ModelProto, list[CompressedTensor]]:
    """A copy of ``model`` whose sparse float32 or int8 initializers (at least ``min_numel``
    elements and ``min_sparsity`` zeros, not all zero) are stored as bit-mask + values (of the
    initializer's own dtype: int8 weights of a quantized model stay int8)."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    kept, decoders, report = [], [], []
    for tensor in graph.initializer:
        array = numpy_helper.to_array(tensor)
        sparsity = float((array == 0).mean()) if array.size else 0.0
        if array.dtype not in COMPRESSIBLE or array.size < min_numel or not min_sparsity <= sparsity < 1.0:
            kept.append(tensor)
            continue
        packed = pack(array, "bitmask")  # float32 holds every int8 value exactly
        values = packed.arrays["values"].astype(array.dtype)
        kept.append(numpy_helper.from_array(packed.arrays["mask"], f"{tensor.name}__mask"))
        kept.append(numpy_helper.from_array(values, f"{tensor.name}__values"))
        nodes, constants = _decode_nodes(tensor.name, tuple(array.shape), array.size, array.dtype)
        decoders += nodes
        kept += constants
        report.append(CompressedTensor(tensor.name, tuple(array.shape), sparsity, array.nbytes,
                                       packed.arrays["mask"].nbytes + values.nbytes))
    del graph.initializer[:]
    graph.initializer.extend(kept)
    nodes = list(graph.node)
    del graph.node[:]
    graph.node.extend(decoders + nodes)
    return model, report
