"""Packed weights: CSR and block-sparse (BSR) storage with fp32 or int8 values.

A weight is viewed as the matrix ``[shape[0], prod(shape[1:])]`` (see
:func:`compressor.blocks.as_matrix`).  BSR with an r×c block (``scipy.sparse.bsr_matrix``
layout) keeps every block that holds a non-zero::

    indptr[block_rows + 1]      indptr[i]..indptr[i+1] are the stored blocks of block row i
    indices[nnz_blocks]         their block-column numbers
    values[nnz_blocks, r, c]    their values (zeros inside a stored block are kept)

CSR is BSR with a 1×1 block and ``values[nnz]``.  Two more encodings serve the exporters:
COO (``row[nnz]``, ``col[nnz]``, ``values[nnz]``; ONNX ``sparse_initializer``) and bit-mask
(``mask``: one bit per element — or per block — packed little-endian with ``np.packbits``, then
the stored values in row-major order; rebuilt in ONNX graphs with standard ops).  Edges that a block does not divide are padded
with zeros inside the stored blocks and cropped on unpacking, so every round trip is exact.
Index arrays use the smallest integer type that holds their largest value (uint8, uint16,
int32).  int8 packing stores ``values`` as int8 plus one float32 ``scales`` entry per matrix row
(:mod:`compressor.quantize`); only the stored values are quantized.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Literal

import numpy as np

from .blocks import BlockShape
from .quantize import quant_error, QuantError, quantize_rows, row_scales

Format = Literal["dense", "csr", "bsr", "coo", "bitmask"]
FORMATS: tuple[str, ...] = ("dense", "csr", "bsr", "coo", "bitmask")
ValueType = Literal["fp32", "int8"]
#: The index arrays each format stores besides ``values`` (and ``scales`` for int8).
INDEX_ARRAYS: dict[str, tuple[str, ...]] = {"dense": (), "csr": ("indptr", "indices"), "bsr": ("indptr", "indices"),
                                            "coo": ("row", "col"), "bitmask": ("mask",)}


def index_dtype(max_value: int) -> np.dtype:
    """Smallest of uint8 / uint16 / int32 that holds ``max_value``."""
    for dtype in (np.uint8, np.uint16):
        if max_value <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    if max_value > np.iinfo(np.int32).max:
        raise ValueError(f"index {max_value} does not fit in int32")
    return np.dtype(np.int32)


def matrix_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    """The 2-D view of a weight shape: ``[shape[0], prod(shape[1:])]``."""
    return (shape[0], math.prod(shape[1:])) if len(shape) > 1 else (1, shape[0])


@dataclass
class PackedWeight:
    """One weight tensor in packed form.

    ``arrays`` holds exactly what is stored: ``values`` (and ``scales`` for int8) for every
    format, plus ``indptr``/``indices`` (CSR, BSR), ``row``/``col`` (COO) or ``mask``
    (bit-mask).  :attr:`nbytes` is their total size."""

    shape: tuple[int, ...]
    format: Format
    dtype: ValueType
    block: BlockShape = field(default_factory=BlockShape)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def matrix_shape(self) -> tuple[int, int]:
        return matrix_shape(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes of every stored array (values, indices, index pointers, masks, scales)."""
        return sum(int(a.nbytes) for a in self.arrays.values())

    @property
    def nnz(self) -> int:
        """Stored values (including explicit zeros inside stored blocks)."""
        return int(self.arrays["values"].size)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def block_coords(self) -> tuple[np.ndarray, np.ndarray]:
        """Block-row and block-column numbers of the stored blocks, in storage order."""
        a = self.arrays
        if self.format in ("csr", "bsr"):
            indptr = a["indptr"].astype(np.int64)
            return np.repeat(np.arange(len(indptr) - 1), np.diff(indptr)), a["indices"].astype(np.int64)
        if self.format == "coo":
            return a["row"].astype(np.int64), a["col"].astype(np.int64)
        if self.format == "bitmask":
            n_br, n_bc = self.block.grid(self.matrix_shape)
            bits = np.unpackbits(a["mask"], count=n_br * n_bc, bitorder="little")
            return np.nonzero(bits.reshape(n_br, n_bc))
        rows, cols = self.matrix_shape
        return np.repeat(np.arange(rows), cols), np.tile(np.arange(cols), rows)

    def value_rows(self) -> np.ndarray:
        """Matrix row of every stored value, shaped like ``values`` (padding rows clipped)."""
        if self.format == "dense":
            rows, cols = self.matrix_shape
            return np.arange(rows)[:, None] + np.zeros((1, cols), np.int64)
        r, c = self.block.rows, self.block.cols
        block_row, _ = self.block_coords()
        rows = block_row[:, None, None] * r + np.arange(r)[None, :, None] + np.zeros((1, 1, c), np.int64)
        return np.minimum(rows, self.matrix_shape[0] - 1).reshape(self.arrays["values"].shape)

    def float_values(self) -> np.ndarray:
        """Stored values as float32, dequantized for int8 (same layout as ``values``)."""
        values = self.arrays["values"]
        if self.dtype == "fp32":
            return values
        return (values.astype(np.float32) * self.arrays["scales"][self.value_rows()]).astype(np.float32)

    def to_dense(self) -> np.ndarray:
        """The float32 weight of ``shape`` (dequantized for int8)."""
        return self._scattered(self.float_values()).reshape(self.shape)

    def stored_matrix(self) -> np.ndarray:
        """The stored values in place in the matrix ``[rows, cols]`` of :attr:`matrix_shape`, zeros
        elsewhere, in their stored type: int8 codes (the weight is ``codes · scales[row]``) or fp32."""
        return self._scattered(self.arrays["values"])

    def _scattered(self, values: np.ndarray) -> np.ndarray:
        """``values`` (laid out as ``arrays["values"]``) put at their places in the matrix."""
        rows, cols = self.matrix_shape
        if self.format == "dense":
            return values.reshape(rows, cols).copy()
        r, c = self.block.rows, self.block.cols
        n_br, n_bc = self.block.grid((rows, cols))
        padded = np.zeros((n_br, n_bc, r, c), values.dtype)
        padded[self.block_coords()] = values.reshape(-1, r, c)
        return np.ascontiguousarray(padded.transpose(0, 2, 1, 3).reshape(n_br * r, n_bc * c)[:rows, :cols])

    def scaled_rows(self, factors: np.ndarray) -> PackedWeight:
        """This weight with matrix row ``i`` multiplied by ``factors[i]``, nothing re-quantized:
        int8 rescales its per-row ``scales`` (the codes stay), fp32 multiplies its values."""
        factors = np.asarray(factors, np.float32)
        if factors.shape != (self.matrix_shape[0],):
            raise ValueError(f"one factor per row: {self.matrix_shape[0]} needed, got shape {factors.shape}")
        arrays = dict(self.arrays)
        if self.dtype == "int8":
            arrays["scales"] = (self.arrays["scales"] * factors).astype(np.float32)
        else:
            arrays["values"] = (self.arrays["values"] * factors[self.value_rows()]).astype(np.float32)
        return replace(self, arrays=arrays)

    def check(self) -> None:
        """Raise ``ValueError`` unless :attr:`arrays` are a packing of :attr:`shape` that :meth:`to_dense`
        can read: the arrays of the format, their types and lengths, block positions in range and in
        row-major order, each stored once (what :func:`pack` writes)."""
        a, index_arrays = self.arrays, INDEX_ARRAYS[self.format]
        rows, cols = self.matrix_shape
        n_br, n_bc = self.block.grid((rows, cols))
        expected = {"values", *index_arrays, *(("scales",) if self.dtype == "int8" else ())}
        if set(a) != expected:
            raise ValueError(f"{self.format} {self.dtype} stores {', '.join(sorted(expected))}, "
                             f"not {', '.join(sorted(a)) or 'nothing'}")
        if any(not np.issubdtype(a[key].dtype, np.integer) or a[key].ndim != 1 for key in index_arrays):
            raise ValueError(f"{', '.join(index_arrays)} must be 1-D integer arrays")
        if a["values"].dtype != (np.float32 if self.dtype == "fp32" else np.int8):
            raise ValueError(f"{self.dtype} values are stored as {a['values'].dtype}")
        if self.dtype == "int8" and (a["scales"].dtype != np.float32 or a["scales"].shape != (rows,)
                                     or not np.isfinite(a["scales"]).all()):
            raise ValueError(f"scales must be {rows} finite float32 numbers")
        if self.format == "dense":
            stored: tuple[int, ...] = (rows, cols)
        else:
            if self.format in ("csr", "bsr"):
                indptr = a["indptr"].astype(np.int64)
                if (indptr.shape != (n_br + 1,) or indptr[0] != 0 or indptr[-1] != a["indices"].size
                        or np.any(np.diff(indptr) < 0)):
                    raise ValueError(f"indptr must rise from 0 to {a['indices'].size} in {n_br + 1} entries")
            elif self.format == "coo" and a["row"].shape != a["col"].shape:
                raise ValueError("row and col must have the same length")
            elif self.format == "bitmask" and (a["mask"].dtype != np.uint8 or a["mask"].shape != (-(-n_br * n_bc // 8),)):
                raise ValueError(f"mask must be {-(-n_br * n_bc // 8)} uint8 bytes, one bit per block")
            block_row, block_col = self.block_coords()
            position = block_row * n_bc + block_col
            if block_row.size and (min(block_row.min(), block_col.min()) < 0 or block_row.max() >= n_br
                                   or block_col.max() >= n_bc or np.any(np.diff(position) <= 0)):
                raise ValueError("stored blocks must lie inside the matrix, in row-major order, each once")
            r, c = self.block.rows, self.block.cols
            stored = (block_row.size,) if self.block.is_unstructured else (block_row.size, r, c)
        if a["values"].shape != stored:
            raise ValueError(f"values have shape {a['values'].shape}, not {stored}")

    def quant_error(self, name: str, reference: np.ndarray) -> QuantError:
        """Error of :meth:`to_dense` against the fp32 ``reference`` weight."""
        return quant_error(name, reference, self.to_dense())


def pack(weight: np.ndarray, fmt: Format, block: BlockShape = BlockShape(), dtype: ValueType = "fp32") -> PackedWeight:
    """Pack ``weight`` (any shape; zeros are what is left out) in ``fmt``.

    ``block`` applies to "bsr" and "bitmask" (one bit per block); "csr" and "coo" are
    element-wise.  ``dtype="int8"`` quantizes the stored values per matrix row."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}: use one of {', '.join(FORMATS)}")
    if dtype not in ("fp32", "int8"):
        raise ValueError(f"unknown value type {dtype!r}: use fp32 or int8")
    weight = np.asarray(weight, np.float32)
    if weight.ndim == 0:
        raise ValueError("cannot pack a scalar: give a weight with at least one dimension")
    if dtype == "int8" and not np.isfinite(weight).all():
        raise ValueError("the weight holds inf or NaN, which int8 cannot store: fix the weight or pack it as fp32")
    matrix = weight.reshape(matrix_shape(weight.shape))
    if fmt in ("csr", "coo", "dense"):
        block = BlockShape()
    packed = PackedWeight(tuple(weight.shape), fmt, dtype, block, _encode(matrix, fmt, block))
    if dtype == "int8":
        scales = row_scales(matrix)
        packed.arrays["values"] = quantize_rows(packed.arrays["values"], packed.value_rows(), scales)
        packed.arrays["scales"] = scales
    return packed


def _encode(matrix: np.ndarray, fmt: Format, block: BlockShape) -> dict[str, np.ndarray]:
    """fp32 arrays of ``fmt`` for a 2-D matrix."""
    if fmt == "dense":
        return {"values": matrix.copy()}
    rows, cols = matrix.shape
    r, c = block.rows, block.cols
    n_br, n_bc = block.grid((rows, cols))
    padded = np.zeros((n_br * r, n_bc * c), np.float32)
    padded[:rows, :cols] = matrix
    tiles = padded.reshape(n_br, r, n_bc, c).transpose(0, 2, 1, 3)  # [n_br, n_bc, r, c]
    kept = np.any(tiles != 0, axis=(2, 3))
    block_row, block_col = np.nonzero(kept)  # row-major: by block row, then block column
    values = tiles[block_row, block_col]
    if block.is_unstructured:
        values = values.reshape(-1)
    if fmt == "coo":
        return {"row": block_row.astype(index_dtype(max(rows - 1, 0))),
                "col": block_col.astype(index_dtype(max(cols - 1, 0))), "values": values}
    if fmt == "bitmask":
        return {"mask": np.packbits(kept.reshape(-1), bitorder="little"), "values": values}
    indptr = np.concatenate([[0], np.cumsum(np.bincount(block_row, minlength=n_br))])
    return {"indptr": indptr.astype(index_dtype(int(indptr[-1]))),
            "indices": block_col.astype(index_dtype(max(n_bc - 1, 0))), "values": values}
