"""The stages of the straight flow, one function each:

    load → prune (masks + fine-tuning, finalized) → pack (+ int8) → export (ONNX, TVM) → check

Each returns what the next stage needs plus a JSON-ready record for the report.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from compressor import CubicSchedule, MagnitudePruner, OneShot, PruneGroup, ThresholdSchedule, sparsity_report
from compressor.packed_model import PackedModel, PackingConfig, pack_model
from compressor.selection import LINEAR_TYPES, RECURRENT_TYPES
from compressor.tasks.base import Task
from compressor.training import TrainConfig, train
from compressor.zoo import RECURRENT_WEIGHTS, DeepSpeech2

from .recipe import DataSection, PackSection, PruneSection, RecipeError

# ------------------------------------------------------------------------------------ data


def make_task(data: DataSection, progress: bool = True) -> Task | None:
    """The task named in the recipe, or None (``task = "none"``: parity, size and latency only)."""
    name = data.task
    if name == "none":
        return None
    if name in ("speech-digits", "speech-sentences"):
        from compressor.tasks.speech import SpeechCorpusSpec, SpeechTask

        spec = (SpeechCorpusSpec(kind="digits", train_size=4000, test_size=400, flite_size=200) if name == "speech-digits"
                else SpeechCorpusSpec(kind="sentences"))
        return SpeechTask(spec, batch_size=32, progress=progress, eval_limit=data.eval_limit)
    if name in ("fashion-mnist", "digits"):
        from compressor.tasks.images import ImageTask

        return ImageTask(name, eval_limit=data.eval_limit)
    if name == "charlm":
        from compressor.tasks.charlm import CharLMTask

        return CharLMTask(seq_len=128, batch_size=32)
    if ":" in name:
        from .checkpoint import load_factory

        return load_factory(name)()
    raise RecipeError(f"unknown task {name!r}: use speech-digits, speech-sentences, fashion-mnist, digits, charlm, "
                      "none or module.path:function")


def parse_input_shape(text: str) -> torch.Tensor:
    """``"1,1,64,100"`` (float32) or ``"2,35:int64"`` → a deterministic example tensor."""
    dims, _, dtype = text.partition(":")
    try:
        shape = tuple(int(d) for d in dims.split(","))
    except ValueError as error:
        raise RecipeError(f"--input-shape {text!r}: write comma-separated sizes, e.g. 1,1,64,100 or 2,35:int64") from error
    if any(d < 1 for d in shape):
        raise RecipeError(f"--input-shape {text!r}: every size must be ≥ 1")
    generator = torch.Generator().manual_seed(0)
    if dtype in ("", "float32"):
        return torch.randn(shape, generator=generator)
    if dtype in ("int64", "int32"):
        return torch.randint(0, 8, shape, generator=generator, dtype=getattr(torch, dtype))
    raise RecipeError(f"--input-shape {text!r}: dtype must be float32, int64 or int32")


def example_inputs(task: Task | None, data: DataSection, factory_examples: tuple[torch.Tensor, ...] | None
                   ) -> tuple[torch.Tensor, ...]:
    """Inputs for export: ``input_shapes``, else the factory's, else one held-out example of the task."""
    if data.input_shapes:
        return tuple(parse_input_shape(s) for s in data.input_shapes)
    if factory_examples is not None:
        return factory_examples
    if task is None:
        raise RecipeError("no example inputs: give --input-shape (one per model input) or a --data task")
    if hasattr(task, "corpus"):
        from compressor.tasks.speech import collate

        return (collate(task.corpus["test"], [0])["features"],)
    if hasattr(task, "images"):
        return (task.images["test"][:1],)
    if hasattr(task, "calibration_batches"):
        return (task.calibration_batches(1)[0][:1],)
    batch = next(task.batches(torch.Generator().manual_seed(0)))
    first = batch[0] if isinstance(batch, (tuple, list)) else batch
    return (first[:1],)


# ----------------------------------------------------------------------------------- prune


def prune_groups(model: nn.Module, prune: PruneSection, schedule) -> list[PruneGroup]:
    """Narang et al. prune recurrent and fully connected weights (never biases or BatchNorm).
    DS2-family models: the recurrent weights and the FC layer (the output layer stays dense)."""
    block = prune.block_shape
    common = {"block": block, "exclude": prune.exclude or None}
    extra = {"final_sparsity": prune.sparsity} if isinstance(schedule, ThresholdSchedule) else {}
    if prune.include:
        return [PruneGroup(schedule, include=prune.include, name="selected", **common, **extra)]
    if isinstance(model, DeepSpeech2):
        return [PruneGroup(schedule, include=RECURRENT_WEIGHTS, name="recurrent", **common, **extra),
                PruneGroup(schedule, include=r"^fc\.weight$", name="fc", **common, **extra)]
    return [PruneGroup(schedule, types=LINEAR_TYPES + RECURRENT_TYPES, name="linear+recurrent", **common, **extra)]


def _schedule(prune: PruneSection):
    start = int(prune.start_fraction * prune.steps)
    end = max(start + 1, int(prune.end_fraction * prune.steps))
    if prune.method == "gradual":
        return ThresholdSchedule(start_itr=start, ramp_itr=start + (end - start) // 2, end_itr=end, freq=prune.freq)
    if prune.method == "cubic":
        return CubicSchedule(prune.sparsity, start_itr=max(start, 1), n_steps=max(1, (end - start) // prune.freq),
                             delta_t=prune.freq)
    return OneShot(prune.sparsity)


@dataclass
class PruneResult:
    model: nn.Module
    record: dict[str, Any] = field(default_factory=dict)


def prune_model(model: nn.Module, task: Task | None, prune: PruneSection, threads: int | None = None,
                progress: bool = True) -> PruneResult:
    """A pruned, finalized copy of ``model``: gradual / cubic / hard pruning inside ``prune.steps``
    fine-tuning steps on the task, or one-shot without training (no task, or ``steps = 0``)."""
    model = copy.deepcopy(model)
    if prune.method == "none" or prune.sparsity == 0.0:
        return PruneResult(model.eval(), {"method": "none", "sparsity": 0.0})
    if prune.method == "taylor":
        raise RecipeError("[prune] method = 'taylor' needs the structured pruner of the [taylor] stage, "
                          "which this version does not ship yet: use gradual, cubic or hard")
    if (task is None or prune.steps == 0) and prune.method != "hard":
        raise RecipeError(f"[prune] method = {prune.method!r} prunes during training: give a --data task and steps > 0, "
                          "or use method = 'hard' for one-shot pruning without training")
    schedule = _schedule(prune)
    pruner = MagnitudePruner(prune_groups(model, prune, schedule))
    pruner.prepare(model)
    start = time.perf_counter()
    losses: list[float] = []
    if task is None or prune.steps == 0:
        pruner.step()
    else:
        result = train(model, task, TrainConfig(steps=prune.steps, lr=prune.lr, grad_clip=5.0, seed=prune.seed,
                                                threads=threads), pruner, progress=progress, desc=f"prune ({prune.method})")
        losses = result.losses
    rows = pruner.report()
    pruned = pruner.finalize().eval()
    reached = sum(r.pruned for r in rows) / max(1, sum(r.total for r in rows))
    return PruneResult(pruned, {"method": prune.method, "sparsity_asked": prune.sparsity, "sparsity_reached": reached,
                                "block": prune.block, "steps": prune.steps, "seconds": time.perf_counter() - start,
                                "losses": losses[:: max(1, len(losses) // 100)],
                                "layers": [row.__dict__ for row in sparsity_report(pruned)]})


# ------------------------------------------------------------------------------------ pack


def pack(model: nn.Module, pack_section: PackSection, prune: PruneSection) -> PackedModel:
    """Pack the pruned weights: the recipe's format (BSR with the pruning block), fp32 or int8."""
    dtype = "int8" if pack_section.int8 else "fp32"
    block = prune.block_shape
    if pack_section.format == "bsr":
        config = PackingConfig(format="bsr", block=block, dtype=dtype)
    elif pack_section.format == "auto":
        config = PackingConfig(dtype=dtype, blocks=(block,) if not block.is_unstructured else PackingConfig().blocks)
    else:
        config = PackingConfig(format=pack_section.format, dtype=dtype,
                               block=block if pack_section.format == "bitmask" else None)
    return pack_model(model, config)


# ---------------------------------------------------------------------------------- export


def dynamic_axes_for(task_name: str, n_inputs: int) -> dict[str, dict[int, str]] | None:
    """Dynamic batch (and time, for speech and text) axes of the ONNX export."""
    if n_inputs != 1:
        return None
    if task_name.startswith("speech"):
        return {"input": {0: "batch", 3: "time"}, "output": {0: "batch", 1: "time"}}
    if task_name == "charlm":
        return {"input": {0: "batch", 1: "time"}, "output": {0: "batch", 1: "time"}}
    return {"input": {0: "batch"}, "output": {0: "batch"}}


def export_onnx_artifact(model: nn.Module, inputs: Sequence[torch.Tensor], out: Path, int8: bool,
                         dynamic_axes: dict | None) -> dict[str, Any]:
    """fp32 ONNX → (GRUs lowered →) int8 → weights compressed at rest; sizes of every step."""
    from exporters.onnx import export_onnx
    from exporters.onnx_compress import compress_file
    from exporters.onnx_gru import lower_gru_file
    from exporters.onnx_quantize import quantize_int8

    work = out / "onnx-steps"
    plain = export_onnx(model, inputs, work / "model.fp32.onnx", dynamic_axes=dynamic_axes)
    sizes = {"fp32": plain.size_bytes}
    source = plain.path
    if int8:
        lowered = lower_gru_file(plain.path, work / "model.lowered.onnx")
        # convolutions stay fp32: ONNX Runtime's ConvInteger is several times slower than its fp32 Conv
        source = quantize_int8(lowered, work / "model.int8.onnx", op_types=["MatMul", "Gemm", "LSTM"])
        sizes["int8"] = source.stat().st_size
    final = out / "model.onnx"
    report = compress_file(source, final)
    sizes["compressed"] = final.stat().st_size
    return {"path": str(final), "size_bytes": final.stat().st_size, "sizes_by_step": sizes, "int8": int8,
            "compressed_tensors": len(report), "intermediate_dir": str(work)}


def tvm_dynamic_axes(task_name: str, n_inputs: int) -> dict[int, list[int]] | None:
    """Run-time time axis of the TVM library for speech and text models (batch stays fixed)."""
    if n_inputs != 1:
        return None
    if task_name.startswith("speech"):
        return {0: [3]}
    if task_name == "charlm":
        return {0: [1]}
    return None


def export_tvm_artifact(packed: PackedModel, inputs: Sequence[torch.Tensor], out: Path, target: str,
                        dynamic_axes: dict[int, list[int]] | None = None) -> dict[str, Any]:
    from exporters.tvm import export_tvm

    artifact = export_tvm(packed, inputs, out / f"model-{target}.so", target=target, dynamic_axes=dynamic_axes)
    return {"path": str(artifact.path), "target": target, "size_bytes": artifact.size_bytes,
            "compile_seconds": artifact.compile_seconds, "kernels": [k.__dict__ for k in artifact.kernels],
            "left_dense": list(artifact.left_dense), "input_shapes": [list(s) for s in artifact.input_shapes]}


# ----------------------------------------------------------------------------------- check


def torch_latency_ms(model: nn.Module, inputs: Sequence[torch.Tensor], repeats: int = 7) -> float:
    with torch.no_grad():
        model(*inputs)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            model(*inputs)
            times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times))


def onnx_latency_ms(path: str | Path, inputs: Sequence[np.ndarray], threads: int, repeats: int = 7) -> float:
    from runtime_tests.onnxruntime_check import session

    sess = session(path, threads)
    feeds = dict(zip([i.name for i in sess.get_inputs()], inputs))
    sess.run(None, feeds)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        sess.run(None, feeds)
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times))


def batched(inputs: Sequence[torch.Tensor], batch: int) -> tuple[torch.Tensor, ...]:
    """The example inputs repeated to ``batch`` along axis 0."""
    return tuple(x.expand(batch, *x.shape[1:]).contiguous() if x.shape[0] == 1 else x for x in inputs)
