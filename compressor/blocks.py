"""Block views of weight tensors for block pruning.

Narang, Undersander and Diamos (2017), "Block-Sparse Recurrent Neural Networks": the weight
matrix is tiled into r×c blocks; a block is represented by its largest magnitude (the paper) or
by its L2 norm, and the whole block is kept or pruned.  Tensors with more than two dimensions
(convolutions) are viewed as ``[out_channels, in_channels·k…]`` matrices; edges that a block does
not divide form smaller blocks (zero padding changes neither the max nor the L2 norm).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

BlockScore = Literal["max", "l2"]


@dataclass(frozen=True)
class BlockShape:
    """A block of ``rows × cols`` weights; ``BlockShape(1, 1)`` is unstructured pruning."""

    rows: int = 1
    cols: int = 1

    def __post_init__(self) -> None:
        if self.rows < 1 or self.cols < 1:
            raise ValueError(f"block shape {self.rows}x{self.cols} is invalid: both sides must be >= 1")

    @classmethod
    def parse(cls, text: str) -> "BlockShape":
        """``"16x1"`` → ``BlockShape(16, 1)``."""
        try:
            rows, cols = (int(part) for part in text.lower().split("x"))
        except ValueError:
            raise ValueError(f"block shape {text!r} is not of the form RxC (for example 16x1)") from None
        return cls(rows, cols)

    def __str__(self) -> str:
        return f"{self.rows}x{self.cols}"

    @property
    def is_unstructured(self) -> bool:
        return self.rows == 1 and self.cols == 1

    def grid(self, matrix_shape: tuple[int, int]) -> tuple[int, int]:
        """Number of block rows and block columns covering a matrix (edges rounded up)."""
        return math.ceil(matrix_shape[0] / self.rows), math.ceil(matrix_shape[1] / self.cols)


def as_matrix(weight: torch.Tensor) -> torch.Tensor:
    """View a weight as the 2-D matrix that blocks tile: ``[shape[0], prod(shape[1:])]``."""
    if weight.dim() == 1:
        return weight.reshape(1, -1)
    return weight.reshape(weight.shape[0], -1)


def _padded_blocks(matrix: torch.Tensor, block: BlockShape) -> torch.Tensor:
    """``[block_rows, block_cols, r, c]`` tiles of a zero-padded matrix."""
    n_br, n_bc = block.grid(tuple(matrix.shape))
    padded = F.pad(matrix, (0, n_bc * block.cols - matrix.shape[1], 0, n_br * block.rows - matrix.shape[0]))
    return padded.reshape(n_br, block.rows, n_bc, block.cols).permute(0, 2, 1, 3)


def block_scores(weight: torch.Tensor, block: BlockShape, score: BlockScore = "max") -> torch.Tensor:
    """One score per block, shape ``[block_rows, block_cols]``: ``max|w|`` or ``‖w‖₂`` of the block."""
    tiles = _padded_blocks(as_matrix(weight.detach()), block)
    if score == "max":
        return tiles.abs().amax(dim=(2, 3))
    if score == "l2":
        return tiles.float().pow(2).sum(dim=(2, 3)).sqrt()
    raise ValueError(f"unknown block score {score!r}: use 'max' or 'l2'")


def expand_block_mask(block_mask: torch.Tensor, block: BlockShape, weight_shape: torch.Size) -> torch.Tensor:
    """Element mask of ``weight_shape`` from a ``[block_rows, block_cols]`` mask (edges cropped)."""
    rows = weight_shape[0] if len(weight_shape) > 1 else 1
    cols = math.prod(weight_shape[1:]) if len(weight_shape) > 1 else weight_shape[0]
    full = block_mask.repeat_interleave(block.rows, dim=0).repeat_interleave(block.cols, dim=1)
    return full[:rows, :cols].reshape(weight_shape)


def block_mask_of(mask: torch.Tensor, block: BlockShape) -> torch.Tensor:
    """``[block_rows, block_cols]`` mask: a block is kept if any of its elements is kept."""
    return _padded_blocks(as_matrix(mask).to(torch.uint8), block).amax(dim=(2, 3)).bool()


def group_lasso(weight: torch.Tensor, block: BlockShape) -> torch.Tensor:
    """Σ over blocks of ‖w_block‖₂ (differentiable): the group-lasso term of Narang, Undersander
    and Diamos (2017) that pushes whole blocks towards zero when added to the loss."""
    tiles = _padded_blocks(as_matrix(weight), block)
    return tiles.pow(2).sum(dim=(2, 3)).add(1e-12).sqrt().sum()
