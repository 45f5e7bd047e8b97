"""Export to a TVM-compiled library (Apache TVM 0.27, Relax) for the host CPU, aarch64 Linux or Android.

``export_tvm(model_or_packed, example_inputs, "out/model.so", target="aarch64-linux")``:

1. :func:`~exporters.tvm_rewrite.to_relax`: ``torch.export`` → Relax, with every matmul over a
   weight, every convolution (im2col + the same matmul kernels; grouped ones stay with TVM)
   and every recurrent time loop running the project's TIR kernels over the packed weights
   (BSR r×c / CSR / scheduled dense; fp32 or int8 with per-row scales).
2. ``tvm.compile`` for the target (:mod:`exporters.tvm_targets`) and ``export_library``; the file
   is written under a temporary name and renamed, so a failed export leaves nothing behind.

Shapes are those of the example inputs (a library per batch size) unless ``dynamic_axes`` makes
some of them run-time sizes; recurrent layers loop over the time axis inside one kernel, so
compile time and library size do not grow with the sequence length.  Load the library with :func:`runtime_tests.tvm_check.load_vm` (a
``relax.VirtualMachine``; function ``main``).
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import tvm
from torch import nn

from compressor.packed_model import PackedModel

from .tvm_rewrite import KernelUse, to_relax
from .tvm_targets import compile_target
from .tvm_vnni_kernel import FEATURE, target_has_vnni


@dataclass(frozen=True)
class TvmArtifact:
    """A compiled library: its path, target, input shapes and what was compiled into it."""

    path: Path
    target: str
    input_shapes: tuple[tuple[int, ...], ...]
    kernels: tuple[KernelUse, ...]
    left_dense: tuple[str, ...]
    compile_seconds: float

    @property
    def size_bytes(self) -> int:
        return self.path.stat().st_size

    @property
    def loadable_here(self) -> bool:
        """True for a host library (an aarch64 one runs on the device or under emulation)."""
        return self.target == "host"


def export_tvm(model: nn.Module | PackedModel, example_inputs: Sequence[torch.Tensor], path: str | Path,
               target: str = "host", dynamic_axes: dict[int, Sequence[int]] | None = None,
               activations: str = "fp32") -> TvmArtifact:
    """Compile ``model`` for ``target`` ("host", "aarch64-linux" or "android") into ``path``.

    The suffix of ``path`` is replaced by the target's: ``.so``, or ``.tar`` (objects to link)
    for Android without an NDK.  ``dynamic_axes`` (``{input index: [axes]}``) makes those axes
    run-time sizes, e.g. ``{0: [3]}`` for the time axis of a spectrogram
    (:func:`~exporters.tvm_rewrite.to_relax`).  ``activations="int8"`` quantizes the input of
    every matmul over a 16×1-block int8 weight at run time and multiplies in integers, the
    recurrence ``h·W_hhᵀ`` included (:mod:`exporters.tvm_vnni_kernel`; x86 targets with AVX-512
    VNNI only), and convolutions over int8 weights (on AMX tiles where the CPU has them)."""
    compiled_for = compile_target(target)
    if activations == "int8" and not target_has_vnni(compiled_for.target):
        raise ValueError(f"activations='int8' needs an x86 CPU with AVX-512 VNNI ({FEATURE}); target {target!r} "
                         f"({compiled_for.target}) has none: export with activations='fp32'")
    inputs = tuple(example_inputs)
    start = time.perf_counter()
    relax_model = to_relax(model, inputs, dynamic_axes, activations, compiled_for.target)
    executable = tvm.compile(relax_model.mod, target=compiled_for.target)
    path = Path(path).with_suffix(compiled_for.suffix)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp" + compiled_for.suffix)
    try:
        if compiled_for.fcompile is None:
            executable.export_library(str(tmp))
        else:
            executable.export_library(str(tmp), fcompile=compiled_for.fcompile)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return TvmArtifact(path, target, tuple(tuple(x.shape) for x in inputs), tuple(relax_model.kernels),
                       tuple(relax_model.left_dense), time.perf_counter() - start)
