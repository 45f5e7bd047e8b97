"""Run an ONNX artifact in ONNX Runtime and compare it with PyTorch.

    python -m runtime_tests.onnxruntime_check MODEL.onnx --input-shape 1,1,64,100

loads the artifact in a stock ``onnxruntime.InferenceSession`` (CPUExecutionProvider) and runs
it on random inputs of the given shapes (repeatable, one per model input); with a PyTorch
reference (from Python: :func:`compare_with_torch`) it reports the largest difference relative
to the largest reference output.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import nn


def session(path: str | Path, threads: int | None = None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_onnx(path: str | Path, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Outputs of the artifact for ``inputs`` (in the order of the graph's inputs)."""
    sess = session(path)
    names = [i.name for i in sess.get_inputs()]
    if len(names) != len(inputs):
        raise ValueError(f"{path} takes {len(names)} inputs ({', '.join(names)}), got {len(inputs)}")
    return sess.run(None, dict(zip(names, inputs)))


@dataclass(frozen=True)
class Parity:
    """Largest |ONNX − PyTorch| over each output, relative to the largest |PyTorch| output."""

    relative_errors: tuple[float, ...]

    @property
    def worst(self) -> float:
        return max(self.relative_errors)


def compare_with_torch(model: nn.Module, path: str | Path, inputs: Sequence[torch.Tensor]) -> Parity:
    with torch.no_grad():
        expected = model.eval()(*inputs)
    expected = expected if isinstance(expected, (tuple, list)) else (expected,)
    actual = run_onnx(path, [t.numpy() for t in inputs])
    errors = []
    for e, a in zip(expected, actual, strict=True):
        e = e.numpy()
        errors.append(float(np.abs(a - e).max() / max(np.abs(e).max(), 1e-12)))
    return Parity(tuple(errors))


def _shape(text: str) -> tuple[tuple[int, ...], str]:
    dims, _, dtype = text.partition(":")
    return tuple(int(d) for d in dims.split(",")), dtype or "float32"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Run an ONNX artifact in ONNX Runtime on random inputs.")
    parser.add_argument("model", type=Path)
    parser.add_argument("--input-shape", action="append", required=True, help="e.g. 1,1,64,100 or 2,35:int64")
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    inputs = [rng.standard_normal(shape).astype(dtype) if dtype.startswith("float") else
              rng.integers(0, 10, shape).astype(dtype) for shape, dtype in map(_shape, args.input_shape)]
    for i, out in enumerate(run_onnx(args.model, inputs)):
        print(f"output {i}: shape {out.shape}, dtype {out.dtype}, finite {bool(np.isfinite(out).all())}")


if __name__ == "__main__":
    main()
