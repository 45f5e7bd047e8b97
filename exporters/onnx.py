"""Export to ONNX that stock ONNX Runtime loads (CPUExecutionProvider, no custom operators).

Route: the legacy TorchScript exporter (``torch.onnx.export(..., dynamo=False)``), which turns
``nn.GRU``/``nn.LSTM`` into one ONNX GRU/LSTM operator and bakes the (finalized, masked)
weights as initializers.  Masks must be finalized first: the dynamo exporter would write the
un-masked weight plus a runtime mask, twice the size.  The file is written to a temporary path,
checked with ``onnx.checker.check_model`` and then renamed, so a failed export never leaves a
half-written artifact.

DS2's :class:`~compressor.zoo.ds2.SharedInputBiRecurrent` (a Python loop over time, which the
exporter would unroll to the example's length) is exported as one MatMul + ``Scan`` per layer
(:mod:`exporters.onnx_recurrence`); ``nn.GRU``/``nn.LSTM``/``nn.RNN`` stay single ONNX operators.

Dynamic-axis guard: when ``dynamic_axes`` declares an input axis other than 0 dynamic, the
written file is run once in ONNX Runtime at another size of that axis (the example repeated
along it to ``size + 3``) and compared with PyTorch (:data:`GUARD_RTOL` of the largest output);
a mismatch raises ``ValueError`` and no file is written: a forward traced at a fixed size (a
Python loop over time, a size read as a Python int) would otherwise give silently wrong results.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from compressor.packed_model import PackedModel
from exporters.onnx_recurrence import export_form, has_shared_input_recurrences, lower_shared_input_recurrences

OPSET = 17
#: The dynamic-axis guard: largest |ONNX − PyTorch| at the second size, relative to the largest output.
GUARD_RTOL = 1e-4
#: The second size of a dynamic axis is the example's size plus the first of these that PyTorch runs.
GUARD_EXTRA = (3, 2, 4, 1)


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
    shared = has_shared_input_recurrences(module)
    try:
        with warnings.catch_warnings():  # the legacy exporter is chosen on purpose (see the module docstring)
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            torch.onnx.export(export_form(module) if shared else module, inputs, tmp, dynamo=False,
                              opset_version=opset, input_names=list(input_names), output_names=list(output_names),
                              dynamic_axes=dynamic_axes)
        if shared:  # placeholders → MatMul + Scan
            onnx.save(lower_shared_input_recurrences(onnx.load(str(tmp)), check=False), str(tmp))
        onnx.checker.check_model(str(tmp))
        check_dynamic_axes(module, inputs, tmp, input_names, dynamic_axes)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return OnnxArtifact(path, input_names, output_names)


def _flat(outputs) -> list[torch.Tensor]:
    if isinstance(outputs, torch.Tensor):
        return [outputs]
    if isinstance(outputs, dict):
        outputs = list(outputs.values())
    if not isinstance(outputs, (tuple, list)):  # None, numbers: not graph outputs
        return []
    return [t for item in outputs for t in _flat(item)]


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _resized(inputs: tuple[torch.Tensor, ...], where: list[tuple[int, int]], extra: int) -> tuple[torch.Tensor, ...]:
    """``inputs`` with each ``(input, axis)`` of ``where`` grown by ``extra`` by repeating the example along it."""
    out = list(inputs)
    for i, axis in where:
        size = out[i].shape[axis]
        out[i] = out[i].index_select(axis, torch.arange(size + extra, device=out[i].device) % size)
    return tuple(out)


def check_dynamic_axes(module: nn.Module, inputs: tuple[torch.Tensor, ...], path: str | Path,
                       input_names: Sequence[str], dynamic_axes: dict[str, dict[int, str] | Sequence[int]]) -> None:
    """The dynamic-axis guard (see the module docstring): for every named dynamic axis of the
    inputs other than axis 0, run ``path`` in ONNX Runtime and ``module`` in PyTorch with that axis
    grown (by the first of :data:`GUARD_EXTRA` at which PyTorch runs) and raise ``ValueError`` if
    the outputs differ in number, shape or by more than :data:`GUARD_RTOL` of the largest output."""
    axes: dict[str, list[tuple[int, int]]] = {}
    for name, x in zip(input_names, inputs):
        spec = (dynamic_axes or {}).get(name) or {}
        if not isinstance(spec, dict):  # a list of axes: torch.onnx names each one
            spec = {axis: f"{name}_dynamic_axes_{axis}" for axis in spec}
        for axis, dim in spec.items():
            if -x.dim() <= axis < x.dim() and axis % x.dim() != 0 and x.shape[axis] > 0:
                axes.setdefault(dim, []).append((input_names.index(name), axis % x.dim()))
    if not axes:
        return
    import onnxruntime as ort

    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as error:  # noqa: BLE001 - not the guard's business: the file cannot be loaded at all
        warnings.warn(f"dynamic axes not checked: ONNX Runtime cannot load the export ({_first_line(error)})")
        return
    wanted = {i.name for i in session.get_inputs()}
    for dim, where in axes.items():
        i0, axis0 = where[0]
        size = inputs[i0].shape[axis0]
        label = f"dynamic axis {dim!r} (axis {axis0} of input {input_names[i0]!r})"
        for extra in GUARD_EXTRA:
            resized = _resized(inputs, where, extra)
            try:
                with torch.no_grad():
                    expected = [t.detach().cpu().numpy() for t in _flat(module(*resized))]
                break
            except Exception:  # noqa: BLE001, S112 - the size is not valid for the model: try the next
                continue
        else:
            warnings.warn(f"{label} not checked: PyTorch runs the model at none of the sizes "
                          f"{', '.join(str(size + e) for e in GUARD_EXTRA)}")
            continue
        fail = f"{label} is not dynamic in the export: at size {size + extra} (exported at {size}) ONNX Runtime"
        hint = ("the model's forward is traced at a fixed size there (e.g. a Python loop over time): "
                "export with that axis static or make the forward size-independent")
        feeds = {name: t.detach().cpu().numpy() for name, t in zip(input_names, resized) if name in wanted}
        try:
            actual = session.run(None, feeds)
        except Exception as error:  # noqa: BLE001 - ONNX Runtime's errors share no base class but Exception
            raise ValueError(f"{fail} fails ({_first_line(error)}); {hint}") from None
        if len(actual) != len(expected):
            raise ValueError(f"{fail} gives {len(actual)} outputs, PyTorch {len(expected)}; {hint}")
        for k, (a, e) in enumerate(zip(actual, expected)):
            if a.shape != e.shape:
                raise ValueError(f"{fail} gives output {k} of shape {tuple(a.shape)}, PyTorch {tuple(e.shape)}; {hint}")
            if e.size == 0:
                continue
            error = float(np.abs(a.astype(np.float64) - e.astype(np.float64)).max()
                          / max(float(np.abs(e.astype(np.float64)).max()), 1e-12))
            if not error <= GUARD_RTOL:
                raise ValueError(f"{fail} differs from PyTorch by {error:.2e} of the largest output "
                                 f"(output {k}, tolerance {GUARD_RTOL:.0e}); {hint}")
