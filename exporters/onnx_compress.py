"""Weights compressed at rest in an ONNX file: a bit-mask (one bit per element or per r×c block)
rebuilt by standard operators that ONNX Runtime constant-folds when the session is created, or a
COO ``sparse_initializer`` that ONNX Runtime densifies at load.

Bit-mask.  A sparse initializer ``W`` is viewed as a matrix ``[R, C]`` (the view of
:func:`compressor.packing.matrix_shape`, ``[shape[0], prod(shape[1:])]``, or for tensors of three
or more dimensions also ``[prod(shape[:-1]), shape[-1]]``, which keeps the rows of recurrent
weights ``[directions, gates·hidden, input]`` together) and tiled into r×c blocks, a grid of
``n_br × n_bc = ⌈R/r⌉ × ⌈C/c⌉`` blocks (edges padded with zeros).  It is stored as ``W__mask`` —
one bit per block, ``np.packbits(kept, bitorder="little")`` — and ``W__values`` — the kept blocks
``[n_kept, r, c]`` in row-major block order (``[nnz]`` for 1×1) — exactly the arrays of
``compressor.packing.pack(W, "bitmask", block)``.  The graph rebuilds it::

    bits[k]  = table[mask[k // 8], k % 8],  table[b, j] = (b >> j) mod 2   Cast, Gather, Reshape, (Slice)
    pos[k]   = bits[k] · cumsum(bits)[k]       (0 for a dropped block)      CumSum, Mul
    tiles    = concat(0, values)[pos]          [n_br·n_bc, r, c]            Concat, Gather
    W        = crop(untile(tiles), R, C) → shape        (Reshape, Transpose, Reshape, Slice,) Reshape

positions in int32 (int64 beyond 2³¹ blocks); the ``[256, 8]`` table is computed once per model
(Range, Cast, Unsqueeze, BitShift, Mod, Cast).  Every input of these nodes is a constant, so ONNX
Runtime folds them into the dense tensor once at load; ``NonZero`` is avoided because it is not
folded and would run at every inference.

COO.  ``W`` becomes a ``SparseTensorProto`` in ``graph.sparse_initializer``: the non-zeros and
their row-major linear positions as int64 (``onnx.checker`` accepts no other index type).

Stored bytes, per tensor (``s`` = bytes per value, ``n_kept`` = kept blocks, ``nnz`` = non-zeros)::

    bit-mask  ⌈n_br·n_bc / 8⌉ + n_kept·r·c·s          (= pack(W, "bitmask", block).nbytes for fp32)
    COO       nnz·(8 + s)

By default each tensor gets the smallest of every candidate block (:data:`CANDIDATE_BLOCKS`, both
views) and COO: COO wins only above about 98.4 % sparsity (element bit-mask ``N/8 + nnz·s`` against
``8·nnz + nnz·s``), a block bit-mask wins on block-pruned weights.

Checks.  Files with a COO ``sparse_initializer`` pass ``onnx.checker.check_model`` with its default
``full_check=False`` (graph structure, operator schemas, initializers; for sparse ones: int64
indices, in range and ascending) but not ``full_check=True``: ONNX's strict shape inference types
a sparse initializer as ``sparse_tensor`` and rejects it as input of dense operators.  Bit-mask
files pass both.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from compressor.blocks import BlockShape
from compressor.packing import matrix_shape, pack

COMPRESSIBLE = (np.dtype(np.float32), np.dtype(np.int8))
#: Bit-mask blocks tried per tensor when no ``block`` is given (1×1 = one bit per element).
CANDIDATE_BLOCKS: tuple[BlockShape, ...] = tuple(BlockShape.parse(text) for text in (
    "1x1", "2x1", "1x2", "4x1", "1x4", "2x2", "8x1", "1x8", "4x4", "16x1", "1x16", "8x8", "32x1", "1x32", "16x16"))
COO_INDEX_BYTES = 8  # int64, the only index type onnx.checker accepts


@dataclass(frozen=True)
class CompressedTensor:
    """One initializer stored compressed: its shape, sparsity, bytes before/after and how.

    ``encoding`` is ``"bitmask"`` (with ``block`` and the ``matrix`` view ``[R, C]`` that the
    blocks tile) or ``"coo"`` (``block`` 1×1, ``matrix`` None)."""

    name: str
    shape: tuple[int, ...]
    sparsity: float
    dense_bytes: int
    stored_bytes: int
    encoding: str = "bitmask"
    block: BlockShape = field(default_factory=BlockShape)
    matrix: tuple[int, int] | None = None


@dataclass(frozen=True)
class EncodingChoice:
    """An encoding of one tensor and its stored bytes (``matrix``: the view the blocks tile)."""

    encoding: str
    block: BlockShape
    matrix: tuple[int, int] | None
    nbytes: int


def matrix_views(shape: tuple[int, ...]) -> list[tuple[int, int]]:
    """``[shape[0], prod(shape[1:])]`` (the packing view) and, for three or more dimensions,
    ``[prod(shape[:-1]), shape[-1]]``."""
    views = [matrix_shape(shape)]
    if len(shape) > 2 and (math.prod(shape[:-1]), shape[-1]) != views[0]:
        views.append((math.prod(shape[:-1]), shape[-1]))
    return views


def kept_blocks(nonzero: np.ndarray, block: BlockShape) -> np.ndarray:
    """``[n_br, n_bc]`` booleans of a 2-D ``nonzero`` matrix: does the block hold a non-zero."""
    rows, cols = nonzero.shape
    n_br, n_bc = block.grid((rows, cols))
    if (n_br * block.rows, n_bc * block.cols) != (rows, cols):
        nonzero = np.pad(nonzero, ((0, n_br * block.rows - rows), (0, n_bc * block.cols - cols)))
    return nonzero.reshape(n_br, block.rows, n_bc, block.cols).any(axis=(1, 3))


def bitmask_bytes(nonzero: np.ndarray, block: BlockShape, itemsize: int) -> int:
    """``⌈n_br·n_bc / 8⌉ + n_kept·r·c·itemsize`` for a 2-D ``nonzero`` matrix."""
    kept = kept_blocks(nonzero, block)
    return math.ceil(kept.size / 8) + int(kept.sum()) * block.rows * block.cols * itemsize


def coo_bytes(nnz: int, itemsize: int) -> int:
    """``nnz·(8 + itemsize)``: int64 linear indices plus the values."""
    return nnz * (COO_INDEX_BYTES + itemsize)


def choose_encoding(array: np.ndarray, block: BlockShape | None = None, coo: bool = True) -> EncodingChoice:
    """The encoding of ``array`` with the fewest stored bytes: bit-mask with ``block`` (or every
    block of :data:`CANDIDATE_BLOCKS`) over every view of :func:`matrix_views`, and COO if
    ``coo``.  Ties go to the earlier candidate (bit-mask before COO, small blocks first)."""
    itemsize = array.dtype.itemsize
    nonzero = array != 0
    choices = []
    for view in matrix_views(array.shape):
        matrix = nonzero.reshape(view)
        for candidate in (block,) if block is not None else CANDIDATE_BLOCKS:
            choices.append(EncodingChoice("bitmask", candidate, view, bitmask_bytes(matrix, candidate, itemsize)))
    if coo:
        choices.append(EncodingChoice("coo", BlockShape(), None, coo_bytes(int(nonzero.sum()), itemsize)))
    return min(choices, key=lambda choice: choice.nbytes)  # min keeps the first of equals


def _index_type(count: int) -> tuple[np.dtype, int]:
    """int32 positions where they fit (half the memory and time of int64 while folding)."""
    return (np.dtype(np.int32), TensorProto.INT32) if count < 2**31 else (np.dtype(np.int64), TensorProto.INT64)


def bit_table_nodes(name: str, index_proto: int):
    """Nodes and constants computing ``name`` = ``table[b, j] = (b >> j) mod 2`` (``[256, 8]``, the
    bits of every byte, little-endian) in the graph — a few bytes instead of a stored table; one
    per model and index type, shared by every bit-mask decoder, folded at load like them."""
    p = f"{name}__"
    constants = {"start": np.array(0, np.int32), "limit": np.array(256, np.int32), "delta": np.array(1, np.int32),
                 "axis1": np.array([1], np.int64), "shifts": np.arange(8, dtype=np.uint8), "two": np.array(2, np.uint8)}
    nodes = [
        helper.make_node("Range", [p + "start", p + "limit", p + "delta"], [p + "range"]),
        helper.make_node("Cast", [p + "range"], [p + "bytes"], to=TensorProto.UINT8),
        helper.make_node("Unsqueeze", [p + "bytes", p + "axis1"], [p + "column"]),
        helper.make_node("BitShift", [p + "column", p + "shifts"], [p + "shifted"], direction="RIGHT"),
        helper.make_node("Mod", [p + "shifted", p + "two"], [p + "bits"]),
        helper.make_node("Cast", [p + "bits"], [name], to=index_proto),
    ]
    return nodes, [numpy_helper.from_array(value, p + key) for key, value in constants.items()]


def _bitmask_nodes(name: str, shape: tuple[int, ...], matrix: tuple[int, int], block: BlockShape, dtype: np.dtype,
                   tables: dict[np.dtype, str]):
    """Nodes and constants that rebuild ``name`` from ``name__mask`` and ``name__values`` (with
    the shared bit table of ``tables``, one name per index type)."""
    p = f"{name}__"
    r, c = block.rows, block.cols
    n_br, n_bc = block.grid(matrix)
    n_blocks = n_br * n_bc
    index, index_proto = _index_type(n_blocks + 1)
    constants = {
        "flat": np.array([-1], np.int64),
        "zero": np.array(0, index),
        "zero_block": np.zeros((1,) if block.is_unstructured else (1, r, c), dtype),
        "shape": np.array(shape, np.int64),
    }
    nodes = [
        helper.make_node("Cast", [p + "mask"], [p + "mask_index"], to=index_proto),
        helper.make_node("Gather", [tables[index], p + "mask_index"], [p + "bits8"]),
        helper.make_node("Reshape", [p + "bits8", p + "flat"], [p + "bits_padded" if n_blocks % 8 else p + "bits"]),
    ]
    if n_blocks % 8:
        constants |= {"start": np.array([0], np.int64), "stop": np.array([n_blocks], np.int64)}
        nodes.append(helper.make_node("Slice", [p + "bits_padded", p + "start", p + "stop"], [p + "bits"]))
    nodes += [
        helper.make_node("CumSum", [p + "bits", p + "zero"], [p + "count"]),
        helper.make_node("Mul", [p + "count", p + "bits"], [p + "position"]),
        helper.make_node("Concat", [p + "zero_block", p + "values"], [p + "table"], axis=0),
        helper.make_node("Gather", [p + "table", p + "position"],
                         [p + "dense" if block.is_unstructured else p + "blocks"]),
    ]
    if not block.is_unstructured:
        padded = (n_br * r, n_bc * c)
        constants |= {"grid": np.array([n_br, n_bc, r, c], np.int64), "padded": np.array(padded, np.int64)}
        nodes += [
            helper.make_node("Reshape", [p + "blocks", p + "grid"], [p + "tiles"]),
            helper.make_node("Transpose", [p + "tiles"], [p + "untiled"], perm=[0, 2, 1, 3]),
        ]
        if padded == matrix:
            nodes.append(helper.make_node("Reshape", [p + "untiled", p + "padded"], [p + "dense"]))
        else:
            constants |= {"origin": np.array([0, 0], np.int64), "matrix": np.array(matrix, np.int64)}
            nodes += [helper.make_node("Reshape", [p + "untiled", p + "padded"], [p + "padded_matrix"]),
                      helper.make_node("Slice", [p + "padded_matrix", p + "origin", p + "matrix"], [p + "dense"])]
    nodes.append(helper.make_node("Reshape", [p + "dense", p + "shape"], [name]))
    return nodes, [numpy_helper.from_array(value, p + key) for key, value in constants.items()]


def _bitmask_arrays(array: np.ndarray, matrix: tuple[int, int], block: BlockShape) -> tuple[np.ndarray, np.ndarray]:
    """``mask`` and ``values`` (in ``array``'s dtype) of ``pack(array viewed as matrix, "bitmask", block)``;
    float32 holds every int8 value exactly."""
    packed = pack(array.reshape(matrix), "bitmask", block)
    return packed.arrays["mask"], packed.arrays["values"].astype(array.dtype)


def coo_initializer(name: str, array: np.ndarray) -> onnx.SparseTensorProto:
    """``array`` as an ONNX COO sparse tensor: its non-zeros and their int64 row-major positions."""
    flat = array.reshape(-1)
    positions = np.flatnonzero(flat)
    return helper.make_sparse_tensor(numpy_helper.from_array(flat[positions], name),
                                     numpy_helper.from_array(positions.astype(np.int64), f"{name}__indices"),
                                     list(array.shape))


def _as_block(block: BlockShape | str | None) -> BlockShape | None:
    return BlockShape.parse(block) if isinstance(block, str) else block


def compress_initializers(model: onnx.ModelProto, min_sparsity: float = 0.5, min_numel: int = 1024, *,
                          block: BlockShape | str | None = None,
                          coo: bool = True) -> tuple[onnx.ModelProto, list[CompressedTensor]]:
    """A copy of ``model`` whose sparse float32 or int8 initializers (at least ``min_numel``
    elements and ``min_sparsity`` zeros, not all zero, not scalars) are stored compressed, values in the
    initializer's own dtype (int8 weights of a quantized model stay int8).

    Each gets the encoding with the fewest bytes (:func:`choose_encoding`): bit-mask with
    ``block`` (default: the best of :data:`CANDIDATE_BLOCKS`) or, if ``coo``, a COO
    ``sparse_initializer``."""
    block = _as_block(block)
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    kept, decoders, report = [], [], []
    tables = {np.dtype(t): f"compressed__bit_table_{np.dtype(t).name}" for t in (np.int32, np.int64)}
    for tensor in graph.initializer:
        array = numpy_helper.to_array(tensor)
        sparsity = float((array == 0).mean()) if array.size else 0.0
        if (array.dtype not in COMPRESSIBLE or array.ndim == 0 or array.size < min_numel
                or not min_sparsity <= sparsity < 1.0):
            kept.append(tensor)
            continue
        choice = choose_encoding(array, block, coo)
        if choice.encoding == "coo":
            graph.sparse_initializer.append(coo_initializer(tensor.name, array))
        else:
            mask, values = _bitmask_arrays(array, choice.matrix, choice.block)
            kept += [numpy_helper.from_array(mask, f"{tensor.name}__mask"),
                     numpy_helper.from_array(values, f"{tensor.name}__values")]
            nodes, constants = _bitmask_nodes(tensor.name, tuple(array.shape), choice.matrix, choice.block,
                                              array.dtype, tables)
            decoders += nodes
            kept += constants
        report.append(CompressedTensor(tensor.name, tuple(array.shape), sparsity, array.nbytes, choice.nbytes,
                                       choice.encoding, choice.block, choice.matrix))
    used = {name for node in decoders for name in node.input}
    for dtype, name in tables.items():
        if name in used:
            nodes, constants = bit_table_nodes(name, helper.np_dtype_to_tensor_dtype(dtype))
            decoders[:0] = nodes
            kept += constants
    del graph.initializer[:]
    graph.initializer.extend(kept)
    nodes = list(graph.node)
    del graph.node[:]
    graph.node.extend(decoders + nodes)
    return model, report


def compress_file(source: str | Path, destination: str | Path, min_sparsity: float = 0.5, min_numel: int = 1024, *,
                  block: BlockShape | str | None = None, coo: bool = True) -> list[CompressedTensor]:
    """:func:`compress_initializers` from file to file: written to a temporary path, checked with
    ``onnx.checker.check_model`` (``full_check=False``, see the module docstring), then renamed."""
    compressed, report = compress_initializers(onnx.load(str(source)), min_sparsity, min_numel, block=block, coo=coo)
    destination = Path(destination)
    tmp = destination.with_name(destination.name + ".tmp")
    try:
        onnx.save(compressed, str(tmp))
        onnx.checker.check_model(str(tmp))
        os.replace(tmp, destination)
    finally:
        tmp.unlink(missing_ok=True)
    return report
