"""Export to ONNX that stock ONNX Runtime loads (CPUExecutionProvider, no custom operators).

Route: the legacy TorchScript exporter (``torch.onnx.export(..., dynamo=False)``), which turns
``nn.GRU``/``nn.LSTM`` into one ONNX GRU/LSTM operator and bakes the (finalized, masked)
weights as initializers.  Masks must be finalized first: the dynamo exporter would write the
un-masked weight plus a runtime mask, twice the size.  The file is written to a temporary path,
checked with ``onnx.checker.check_model`` and then renamed, so a failed export never leaves a
half-written artifact.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import onnx
import torch
from torch import nn

from compressor.packed_model import PackedModel

OPSET = 17


@dataclass(frozen=True)
class OnnxArtifact:
    """An exported model: its path, input and output names and the size of the file."""

    path: Path
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]

    @property
    def size_bytes(self) -> int:
        return self.path.stat().st_size


def _module_of(model: nn.Module | PackedModel) -> nn.Module:
    module = model.module if isinstance(model, PackedModel) else model
    if any(hasattr(m, "parametrizations") for m in module.modules()):
        raise ValueError("the model still has pruning masks attached: call pruner.finalize() before exporting")
    return module


def export_onnx(
    model: nn.Module | PackedModel,
    example_inputs: Sequence[torch.Tensor],
    path: str | Path,
    *,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    dynamic_axes: dict[str, dict[int, str]] | None = None,
    opset: int = OPSET,
) -> OnnxArtifact:
    """Export ``model`` (a plain module, or the module of a fp32 ``PackedModel``) to ``path``.

    ``dynamic_axes`` defaults to a dynamic axis 0 (``batch``) on every input and output; give
    your own to make sequence axes dynamic too, as in ``torch.onnx.export``."""
    module = _module_of(model).eval()
    inputs = tuple(example_inputs)
    input_names = tuple(input_names or [f"input_{i}" if len(inputs) > 1 else "input" for i in range(len(inputs))])
    with torch.no_grad():
        outputs = module(*inputs)
    n_outputs = len(outputs) if isinstance(outputs, (tuple, list)) else 1
    output_names = tuple(output_names or [f"output_{i}" if n_outputs > 1 else "output" for i in range(n_outputs)])
    if dynamic_axes is None:
        dynamic_axes = {name: {0: "batch"} for name in (*input_names, *output_names)}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with warnings.catch_warnings():  # the legacy exporter is chosen on purpose (see the module docstring)
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            torch.onnx.export(module, inputs, tmp, dynamo=False, opset_version=opset, input_names=list(input_names),
                              output_names=list(output_names), dynamic_axes=dynamic_axes)
        onnx.checker.check_model(str(tmp))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return OnnxArtifact(path, input_names, output_names)
