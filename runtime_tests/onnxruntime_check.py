"""Run an ONNX artifact in ONNX Runtime and compare it with PyTorch.

    python -m runtime_tests.onnxruntime_check MODEL.onnx --input-shape 1,1,64,100

loads the artifact in a stock ``onnxruntime.InferenceSession`` (CPUExecutionProvider) and runs
it on random inputs of the given shapes (repeatable, one per model input); with a PyTorch
reference (from Python: :func:`compare_with_torch`) it reports the largest difference relative
to the largest reference output.  ``--time-session`` also prints the median session-creation
time (:func:`session_creation_seconds`).

From Python, :class:`OnnxModule` wraps a session as an ``nn.Module`` so that a task's
``evaluate`` runs unchanged on the artifact (:func:`evaluate_onnx`), and
:func:`folded_op_types` lists the operators left after ONNX Runtime's constant folding.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn


class ArtifactError(ValueError):
    """An artifact (ONNX model, TVM library) that its runtime cannot load; the message names the
    file, the problem and the fix."""


def _first_line(error: BaseException) -> str:
    """The first line of ``error``'s message (runtimes write several), or its type without one."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def session(path: str | Path, threads: int | None = None) -> ort.InferenceSession:
    """A CPUExecutionProvider session; ``threads`` sets both intra- and inter-op thread counts.
    :class:`ArtifactError` if ``path`` is not a file or not a model ONNX Runtime can load."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path} is not a file: give the path of an .onnx model")
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = threads
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as error:  # ONNX Runtime's error types share no base class but Exception
        raise ArtifactError(f"{path} cannot be loaded by ONNX Runtime ({_first_line(error)}): export it again"
                            ) from error


def session_creation_seconds(path: str | Path, repeats: int = 5, threads: int | None = 1) -> float:
    """Median wall time of ``InferenceSession(path)`` over ``repeats`` creations (after one
    untimed warm-up), with default graph optimizations: reading the file, constant folding
    (where compressed initializers are rebuilt) and kernel set-up."""
    if repeats < 1:
        raise ValueError(f"repeats={repeats}: time at least one session creation")
    session(path, threads)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        session(path, threads)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def folded_op_types(path: str | Path) -> list[str]:
    """Operator types left in the graph after ONNX Runtime's basic optimizations (constant
    folding among them): what actually runs at every inference."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    with tempfile.TemporaryDirectory() as directory:
        options.optimized_model_filepath = str(Path(directory) / "optimized.onnx")
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        optimized = onnx.load(options.optimized_model_filepath, load_external_data=False)
        return [node.op_type for node in optimized.graph.node]


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


def relative_errors(expected: Sequence[np.ndarray], actual: Sequence[np.ndarray]) -> Parity:
    """Largest |actual − expected| per output, relative to the largest |expected|."""
    return Parity(tuple(float(np.abs(a - e).max() / max(np.abs(e).max(), 1e-12))
                        for e, a in zip(expected, actual, strict=True)))


def compare_with_torch(model: nn.Module, path: str | Path, inputs: Sequence[torch.Tensor]) -> Parity:
    with torch.no_grad():
        expected = model.eval()(*inputs)
    expected = expected if isinstance(expected, (tuple, list)) else (expected,)
    return relative_errors([e.numpy() for e in expected], run_onnx(path, [t.numpy() for t in inputs]))


class OnnxModule(nn.Module):
    """An ONNX Runtime session that looks like the PyTorch model it was exported from:
    ``forward(*tensors)`` feeds the graph's inputs in order and returns a tensor (or a tuple
    for several outputs), so ``task.evaluate(OnnxModule(path))`` works unchanged.  Extra
    methods the task needs (``output_lengths`` of DeepSpeech2) are passed as keywords."""

    def __init__(self, path: str | Path, threads: int | None = None, **methods: Callable[..., Any]) -> None:
        super().__init__()
        self.path = Path(path)
        self.session = session(path, threads)
        self.input_names = [i.name for i in self.session.get_inputs()]
        for name, method in methods.items():
            setattr(self, name, method)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        if len(inputs) != len(self.input_names):
            raise ValueError(f"{self.path.name} takes {len(self.input_names)} inputs "
                             f"({', '.join(self.input_names)}), got {len(inputs)}")
        feeds = {name: t.detach().cpu().numpy() for name, t in zip(self.input_names, inputs)}
        outputs = tuple(torch.from_numpy(o) for o in self.session.run(None, feeds))
        return outputs[0] if len(outputs) == 1 else outputs


def evaluate_onnx(path: str | Path, task: Any, split: str = "test", threads: int | None = None,
                  **methods: Callable[..., Any]) -> dict[str, float]:
    """``task.evaluate`` of the artifact at ``path`` (see :class:`OnnxModule`)."""
    return task.evaluate(OnnxModule(path, threads, **methods), split)


def _shape(text: str) -> tuple[tuple[int, ...], str]:
    dims, _, dtype = text.partition(":")
    return tuple(int(d) for d in dims.split(",")), dtype or "float32"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Run an ONNX artifact in ONNX Runtime on random inputs.")
    parser.add_argument("model", type=Path)
    parser.add_argument("--input-shape", action="append", required=True, help="e.g. 1,1,64,100 or 2,35:int64")
    parser.add_argument("--time-session", action="store_true", help="also print the median session-creation time")
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    inputs = [rng.standard_normal(shape).astype(dtype) if dtype.startswith("float") else
              rng.integers(0, 10, shape).astype(dtype) for shape, dtype in map(_shape, args.input_shape)]
    for i, out in enumerate(run_onnx(args.model, inputs)):
        print(f"output {i}: shape {out.shape}, dtype {out.dtype}, finite {bool(np.isfinite(out).all())}")
    if args.time_session:
        print(f"session creation: {session_creation_seconds(args.model) * 1e3:.1f} ms (median of 5, 1 thread)")


if __name__ == "__main__":
    main()
