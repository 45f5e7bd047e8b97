"""Per-layer sparsity report: layer, shape, pruned/total, sparsity, block shape."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass

import torch
from torch import nn

from .blocks import BlockShape, block_mask_of
from .masking import find_mask
from .selection import PRUNABLE_TYPES, iter_prunable_weights
from .texttable import format_table


@dataclass(frozen=True)
class LayerSparsity:
    """Sparsity of one weight tensor.  ``blocks_pruned``/``blocks_total`` count r×c blocks."""

    name: str
    shape: tuple[int, ...]
    pruned: int
    total: int
    block: str
    blocks_pruned: int
    blocks_total: int

    @property
    def sparsity(self) -> float:
        return self.pruned / self.total if self.total else 0.0

    def as_dict(self) -> dict:
        return {**asdict(self), "shape": list(self.shape), "sparsity": self.sparsity}


def sparsity_report(
    model: nn.Module,
    blocks: Mapping[str, BlockShape] | None = None,
    only: Iterable[str] | None = None,
) -> list[LayerSparsity]:
    """Sparsity of every prunable weight of ``model`` (or of the names in ``only``).

    A masked weight is read from its mask; a plain weight counts its exact zeros, so the report
    is the same before and after ``finalize()``.  ``blocks`` gives the block shape per name
    (default 1×1)."""
    blocks = blocks or {}
    wanted = set(only) if only is not None else None
    rows = []
    for ref in iter_prunable_weights(model, PRUNABLE_TYPES):
        if wanted is not None and ref.name not in wanted:
            continue
        mask_module = find_mask(ref.module, ref.attr)
        with torch.no_grad():
            kept = mask_module.mask if mask_module is not None else getattr(ref.module, ref.attr) != 0
        block = blocks.get(ref.name, BlockShape())
        kept_blocks = block_mask_of(kept, block)
        rows.append(LayerSparsity(
            name=ref.name,
            shape=tuple(kept.shape),
            pruned=int((~kept).sum()),
            total=kept.numel(),
            block=str(block),
            blocks_pruned=int((~kept_blocks).sum()),
            blocks_total=kept_blocks.numel(),
        ))
    return rows


def format_report(rows: list[LayerSparsity]) -> str:
    """The report as a fixed-width text table with a total line."""
    pruned, total = sum(r.pruned for r in rows), sum(r.total for r in rows)
    return format_table(
        ("layer", "shape", "pruned / total", "sparsity", "block", "blocks pruned"),
        [(r.name, "x".join(map(str, r.shape)), f"{r.pruned:,} / {r.total:,}", f"{r.sparsity:7.2%}", r.block,
          f"{r.blocks_pruned:,} / {r.blocks_total:,}") for r in rows],
        total=("TOTAL", "", f"{pruned:,} / {total:,}", f"{(pruned / total if total else 0):7.2%}", "", ""),
    )
