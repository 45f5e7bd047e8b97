"""Exact size accounting: the one function every report in the project uses.

Sizes are bytes of the arrays that are actually stored: for a packed weight the sum of its
arrays' ``nbytes`` (values, indices, index pointers, bit-masks, scales); for everything else
(biases, norms, buffers, layers left dense) the ``nbytes`` of its ``state_dict`` tensor.
Container overhead (file headers, names) is not counted.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from torch import nn

from .packed_model import PackedModel
from .texttable import format_table


@dataclass(frozen=True)
class LayerSize:
    """One packed weight: how it is stored and how many bytes each array takes."""

    name: str
    shape: tuple[int, ...]
    format: str
    block: str
    dtype: str
    nnz: int
    numel: int
    dense_fp32_bytes: int
    stored_bytes: int
    array_bytes: dict[str, int]

    def as_dict(self) -> dict:
        return {**asdict(self), "shape": list(self.shape)}


@dataclass(frozen=True)
class SizeReport:
    """Per-layer and per-model sizes.  ``other_bytes``: every state_dict tensor not packed."""

    layers: list[LayerSize]
    other_bytes: int
    dense_fp32_bytes: int

    @property
    def packed_bytes(self) -> int:
        return sum(layer.stored_bytes for layer in self.layers)

    @property
    def total_bytes(self) -> int:
        return self.packed_bytes + self.other_bytes

    @property
    def compression(self) -> float:
        """fp32 dense size / stored size."""
        return self.dense_fp32_bytes / self.total_bytes if self.total_bytes else 1.0

    def as_dict(self) -> dict:
        return {
            "layers": [layer.as_dict() for layer in self.layers],
            "packed_bytes": self.packed_bytes,
            "other_bytes": self.other_bytes,
            "total_bytes": self.total_bytes,
            "dense_fp32_bytes": self.dense_fp32_bytes,
            "compression": self.compression,
        }


def size_report(packed: PackedModel) -> SizeReport:
    """Bytes of every stored array, per layer and for the whole model."""
    layers = []
    for name, weight in packed.weights.items():
        layers.append(LayerSize(
            name=name,
            shape=tuple(weight.shape),
            format=weight.format,
            block=str(weight.block),
            dtype=weight.dtype,
            nnz=weight.nnz,
            numel=weight.numel,
            dense_fp32_bytes=4 * weight.numel,
            stored_bytes=weight.nbytes,
            array_bytes={key: int(array.nbytes) for key, array in weight.arrays.items()},
        ))
    state = packed.module.state_dict()
    other = sum(t.numel() * t.element_size() for key, t in state.items() if key not in packed.weights)
    return SizeReport(layers, other, fp32_bytes(packed.module))


def fp32_bytes(module: nn.Module) -> int:
    """Bytes of ``module``'s state_dict with every floating-point tensor in fp32."""
    return sum(4 * t.numel() if t.is_floating_point() else t.numel() * t.element_size()
               for t in module.state_dict().values())


def format_bytes(n: float) -> str:
    """Human-readable size in decimal units (kB, MB), as the papers quote them."""
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    raise AssertionError


def format_size_report(report: SizeReport) -> str:
    """Per-layer table with a model total."""
    header = ("layer", "shape", "format", "block", "dtype", "nnz / numel", "fp32 dense", "stored", "ratio")
    rows = [(layer.name, "x".join(map(str, layer.shape)), layer.format, layer.block, layer.dtype,
             f"{layer.nnz:,} / {layer.numel:,}", format_bytes(layer.dense_fp32_bytes), format_bytes(layer.stored_bytes),
             f"{layer.dense_fp32_bytes / max(layer.stored_bytes, 1):.1f}x") for layer in report.layers]
    rows.append(("other tensors", "", "", "", "", "", "", format_bytes(report.other_bytes), ""))
    total = ("TOTAL", "", "", "", "", "", format_bytes(report.dense_fp32_bytes), format_bytes(report.total_bytes),
             f"{report.compression:.1f}x")
    return format_table(header, rows, total)
