"""Run a TVM-compiled library (Relax VM) and compare it with PyTorch; time it locally or on a device.

    python -m runtime_tests.tvm_check MODEL.so --input-shape 1,1,64,100 [--device rpc://host:port]

loads the library (on this machine, or uploaded to a device that runs TVM's RPC server), runs
``main`` on random inputs of the given shapes and prints the outputs' shapes and the median
latency (TVM's ``time_evaluator``).  From Python: :func:`run_tvm`, :func:`compare_with_torch`,
:func:`latency_ms`, and :class:`TvmModule`, an ``nn.Module`` view of a library so that a task's
``evaluate`` runs unchanged on it.
"""

from __future__ import annotations

import argparse
import statistics
import struct
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import tvm
from torch import nn
from tvm import relax

from exporters.tvm_rpc import RemoteSession, remote_session

from .onnxruntime_check import ArtifactError, Parity, _first_line, _shape, relative_errors

#: Per ELF class (1: 32-bit, 2: 64-bit), ``struct`` layouts of the file header from ``e_type`` (type,
#: program- and section-header offsets, their entry sizes and counts) and of a program header
#: (type, file offset, size in the file); ``x`` skips the fields not checked.
ELF_LAYOUTS = {1: ("H10xII6xHHHH", "II8xI"), 2: ("H14xQQ6xHHHH", "I4xQ16xQ")}
ET_DYN = 3


def check_library(path: Path) -> None:
    """:class:`ArtifactError` unless ``path`` is a whole ELF shared library: ``dlopen`` maps a
    truncated one and the process dies of SIGBUS, so the header tables and every segment must lie
    inside the file.  (A library with corrupted contents can still crash ``dlopen``.)"""
    fix = "export it again with exporters.tvm.export_tvm"
    try:
        data = path.read_bytes()
    except OSError as error:
        raise ArtifactError(f"{path} cannot be read ({_first_line(error)}): give the path of a TVM library") from error
    if len(data) < 64 or data[:4] != b"\x7fELF" or data[4] not in ELF_LAYOUTS or data[5] not in (1, 2):
        raise ArtifactError(f"{path} is not a shared library (no ELF header): {fix}")
    order = "<" if data[5] == 1 else ">"
    header, segment = (order + layout for layout in ELF_LAYOUTS[data[4]])
    e_type, phoff, shoff, phentsize, phnum, shentsize, shnum = struct.unpack_from(header, data, 16)
    if e_type != ET_DYN:
        raise ArtifactError(f"{path} is an ELF file but not a shared library (type {e_type}): {fix}")
    if (phnum == 0 or phentsize < struct.calcsize(segment) or phoff + phnum * phentsize > len(data)
            or shoff + shnum * shentsize > len(data)
            or any(offset + size > len(data) for _, offset, size in
                   (struct.unpack_from(segment, data, phoff + i * phentsize) for i in range(phnum)))):
        raise ArtifactError(f"{path} is truncated or corrupt (its ELF tables or segments end past its "
                            f"{len(data)} bytes): {fix}")


def load_vm(path: str | Path, device: tvm.runtime.Device | None = None) -> relax.VirtualMachine:
    """A Relax VM over the library at ``path`` on ``device`` (the local CPU by default);
    :class:`ArtifactError` for a file that is not a whole shared library (:func:`check_library`)
    or not a TVM Relax library for this machine."""
    path = Path(path)
    check_library(path)
    try:
        return relax.VirtualMachine(tvm.runtime.load_module(str(path)), device or tvm.cpu())
    except Exception as error:  # TVM raises TVMError, RuntimeError, AttributeError, …
        raise ArtifactError(f"{path} is not a TVM Relax library for this machine ({_first_line(error)}): "
                            "export it again with exporters.tvm.export_tvm") from error


def _outputs(result: Any) -> list[np.ndarray]:
    if hasattr(result, "numpy"):
        return [result.numpy()]
    return [r.numpy() for r in result]


def run_vm(vm: relax.VirtualMachine, inputs: Sequence[np.ndarray], device: tvm.runtime.Device) -> list[np.ndarray]:
    """Outputs of ``main`` for ``inputs`` (set_input / invoke_stateful / get_outputs, which also
    works over RPC)."""
    vm.set_input("main", *(tvm.runtime.tensor(np.ascontiguousarray(x), device) for x in inputs))
    vm.invoke_stateful("main")
    return _outputs(vm.get_outputs("main"))


def run_tvm(path: str | Path, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Outputs of the host library at ``path`` for ``inputs``."""
    return run_vm(load_vm(path), inputs, tvm.cpu())


def torch_outputs(model: nn.Module, inputs: Sequence[torch.Tensor]) -> list[np.ndarray]:
    with torch.no_grad():
        expected = model.eval()(*inputs)
    return [e.numpy() for e in (expected if isinstance(expected, (tuple, list)) else (expected,))]


def compare_with_torch(model: nn.Module, path: str | Path, inputs: Sequence[torch.Tensor]) -> Parity:
    """Parity of the host library at ``path`` with ``model`` on ``inputs``."""
    return relative_errors(torch_outputs(model, inputs), run_tvm(path, [t.numpy() for t in inputs]))


def latency_ms(vm: relax.VirtualMachine, inputs: Sequence[np.ndarray], device: tvm.runtime.Device,
               repeat: int = 7, min_repeat_ms: int = 100) -> float:
    """Median latency of ``main`` in milliseconds (``time_evaluator``: each of ``repeat`` runs
    repeats the call until ``min_repeat_ms`` have passed)."""
    args = [tvm.runtime.tensor(np.ascontiguousarray(x), device) for x in inputs]
    timer = vm.time_evaluator("main", device, repeat=repeat, min_repeat_ms=min_repeat_ms)
    return statistics.median(timer(*args).results) * 1e3


class TvmModule(nn.Module):
    """A host TVM library that looks like the PyTorch model it was compiled from (see
    :class:`runtime_tests.onnxruntime_check.OnnxModule`).  The library's batch size is fixed at
    export (``batch``): a larger batch is run in slices of that size along axis 0 of every input
    and output; other axes must have the compiled sizes, or be dynamic axes of the export."""

    def __init__(self, path: str | Path, batch: int = 1, **methods: Callable[..., Any]) -> None:
        super().__init__()
        self.path, self.batch = Path(path), batch
        self.vm = load_vm(path)
        for name, method in methods.items():
            setattr(self, name, method)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        slices = []
        for start in range(0, inputs[0].shape[0], self.batch):
            arrays = [t[start:start + self.batch].detach().cpu().numpy() for t in inputs]
            slices.append(run_vm(self.vm, arrays, tvm.cpu()))
        outputs = tuple(torch.from_numpy(np.concatenate(parts)) for parts in zip(*slices))
        return outputs[0] if len(outputs) == 1 else outputs


def _run_remote(session: RemoteSession, path: Path, inputs: list[np.ndarray]) -> tuple[list[np.ndarray], float]:
    vm = session.load_vm(path)
    return run_vm(vm, inputs, session.device), latency_ms(vm, inputs, session.device)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Run a TVM library on random inputs, here or on an RPC device.")
    parser.add_argument("library", type=Path)
    parser.add_argument("--input-shape", action="append", required=True, help="e.g. 1,1,64,100 or 2,35:int64")
    parser.add_argument("--device", help="rpc://host:port or tracker://host:port/key (default: this machine)")
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    inputs = [rng.standard_normal(shape).astype(dtype) if dtype.startswith("float") else
              rng.integers(0, 10, shape).astype(dtype) for shape, dtype in map(_shape, args.input_shape)]
    if args.device:
        with remote_session(args.device) as session:
            outputs, latency = _run_remote(session, args.library, inputs)
    else:
        vm = load_vm(args.library)
        outputs, latency = run_vm(vm, inputs, tvm.cpu()), latency_ms(vm, inputs, tvm.cpu())
    for i, out in enumerate(outputs):
        print(f"output {i}: shape {out.shape}, dtype {out.dtype}, finite {bool(np.isfinite(out).all())}")
    print(f"latency: {latency:.3f} ms (median of 7)")


if __name__ == "__main__":
    main()
