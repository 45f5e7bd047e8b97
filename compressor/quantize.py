"""Symmetric per-output-channel int8 weight quantization.

For output channel (matrix row) ``i``: ``scale_i = max_j |w_ij| / 127`` and
``q_ij = clamp(round(w_ij / scale_i), −127, 127)``; the weight is ``q_ij · scale_i``.  The
zero point is 0, so a pruned weight (exactly 0) quantizes to exactly 0 — quantization never
destroys sparsity (an asymmetric/uint8 zero point would).  −128 is never used, so the range is
symmetric.  Rows that are entirely zero get ``scale = 1``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

QMAX = 127


def row_scales(matrix: np.ndarray) -> np.ndarray:
    """Per-row scales ``max|w_row| / 127`` (float32), 1 for all-zero rows."""
    peak = np.abs(matrix).max(axis=1) if matrix.size else np.zeros(matrix.shape[0], np.float32)
    return np.where(peak > 0, peak / QMAX, 1.0).astype(np.float32)


def quantize_rows(values: np.ndarray, rows: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """int8 codes of ``values`` whose output rows are ``rows`` (broadcast against ``values``)."""
    codes = np.rint(values / scales[rows])
    return np.clip(codes, -QMAX, QMAX).astype(np.int8)


@dataclass(frozen=True)
class QuantError:
    """Error of a quantized weight against the fp32 weight: max |w − ŵ| and ‖w − ŵ‖₂ / ‖w‖₂."""

    name: str
    max_abs: float
    relative: float

    def as_dict(self) -> dict:
        return {"name": self.name, "max_abs": self.max_abs, "relative": self.relative}


def quant_error(name: str, reference: np.ndarray, dequantized: np.ndarray) -> QuantError:
    diff = reference.astype(np.float64) - dequantized.astype(np.float64)
    norm = float(np.linalg.norm(reference.astype(np.float64)))
    return QuantError(name, float(np.abs(diff).max(initial=0.0)), float(np.linalg.norm(diff)) / norm if norm else 0.0)


def format_quant_errors(errors: list[QuantError]) -> str:
    """Per-layer int8 error table."""
    from .texttable import format_table

    return format_table(("layer", "max |w - w_int8|", "relative L2 error"),
                        [(e.name, f"{e.max_abs:.3e}", f"{e.relative:.3e}") for e in errors])
