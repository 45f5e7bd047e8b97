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
        from compressor.tasks.speech import STANDARD_CORPORA, SpeechTask

        return SpeechTask(STANDARD_CORPORA[name.removeprefix("speech-")], batch_size=32, progress=progress,
                          eval_limit=data.eval_limit)
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


# ----------------------------------------------------------------------------------- model


def validate_model(model: nn.Module, inputs: Sequence[torch.Tensor] | None = None) -> None:
    """Refuse a model that cannot be compressed: no parameters, NaN / Inf weights, or (with
    ``inputs``) inputs it does not accept.  Raises :class:`RecipeError` naming the problem."""
    state = model.state_dict()
    if not any(t.numel() for t in state.values()):
        raise RecipeError("the model has no weights: nothing to compress (check --model / the checkpoint)")
    bad = [f"{name} ({int(t.isnan().sum())} NaN, {int(t.isinf().sum())} Inf)" for name, t in state.items()
           if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise RecipeError(f"the checkpoint has non-finite weights in {', '.join(bad[:4])}{' …' if len(bad) > 4 else ''}:"
                          " fix the training run that wrote it (lower the learning rate, clip gradients)")
    if inputs is None:
        return
    try:
        with torch.no_grad():
            model.eval()(*inputs)
    except Exception as error:  # any failure here means the shapes are wrong for this model
        shapes = ", ".join(",".join(map(str, x.shape)) for x in inputs)
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise RecipeError(f"the model does not accept inputs of shape {shapes} ({type(error).__name__}: {reason}): "
                          "give --input-shape with the shapes it expects, one per input") from error


def fine_tuning_settings(recipe) -> dict[str, Any] | None:
    """The recipe values that shape magnitude pruning while fine-tuning — what ``--resume`` must
    find unchanged — or None when the recipe does not fine-tune that way."""
    prune = recipe.prune
    if recipe.data.task == "none" or prune.steps == 0 or prune.sparsity == 0 or \
            prune.method not in ("gradual", "cubic", "hard"):
        return None
    document = recipe.as_dict()
    return {f"{section}.{key}": value for section in ("model", "data", "prune")
            for key, value in document[section].items()}


# ----------------------------------------------------------------------------------- prune

CHECKPOINT_EVERY = 10  # fine-tuning steps between two saves of the resumable state


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

    @property
    def structured(self) -> bool:
        """True for a Taylor-shrunk model: smaller and dense, not a state_dict of the input model."""
        return self.record.get("method") == "taylor"


def prune_model(model: nn.Module, task: Task | None, prune: PruneSection, threads: int | None = None,
                progress: bool = True, inputs: Sequence[torch.Tensor] | None = None,
                checkpoint: Path | None = None) -> PruneResult:
    """A pruned, finalized copy of ``model``: gradual / cubic / hard pruning inside ``prune.steps``
    fine-tuning steps on the task, one-shot without training (no task, or ``steps = 0``), or
    Taylor structured pruning (``method = "taylor"``; needs ``inputs``) that returns a smaller
    dense model.  ``checkpoint``: the fine-tuning state is saved there every
    :data:`CHECKPOINT_EVERY` steps and on Ctrl-C, and a run resumes from it if it exists."""
    model = copy.deepcopy(model)
    if prune.method == "none" or prune.sparsity == 0.0:
        return PruneResult(model.eval(), {"method": "none", "sparsity": 0.0})
    if prune.method == "taylor":
        if checkpoint is not None and checkpoint.exists():
            raise RecipeError("--resume: Taylor pruning cannot resume an interrupted run yet: run it again "
                              "without --resume")
        return _prune_taylor(model, task, prune, threads, progress, inputs)
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
        config = TrainConfig(steps=prune.steps, lr=prune.lr, grad_clip=5.0, seed=prune.seed, threads=threads,
                             checkpoint=checkpoint, checkpoint_every=CHECKPOINT_EVERY)
        result = train(model, task, config, pruner, progress=progress, desc=f"prune ({prune.method})")
        losses = result.losses
    rows = pruner.report()
    pruned = pruner.finalize().eval()
    reached = sum(r.pruned for r in rows) / max(1, sum(r.total for r in rows))
    return PruneResult(pruned, {"method": prune.method, "sparsity_asked": prune.sparsity, "sparsity_reached": reached,
                                "block": prune.block, "steps": prune.steps, "seconds": time.perf_counter() - start,
                                "losses": losses[:: max(1, len(losses) // 100)],
                                "layers": [row.__dict__ for row in sparsity_report(pruned)],
                                "left_dense": left_dense(pruned, {row.name for row in rows})})


def left_dense(model: nn.Module, pruned: set[str]) -> dict[str, str]:
    """Layers with a weight matrix that the pruning left alone: ``{module name: type}``
    (normalization layers, which are never pruned, are not listed)."""
    skip = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)
    result = {}
    for name, module in model.named_modules():
        weights = [f"{name}.{p}" if name else p for p, value in module.named_parameters(recurse=False)
                   if value.dim() >= 2]
        if weights and not isinstance(module, skip) and not any(w in pruned for w in weights):
            result[name or "(root)"] = type(module).__name__
    return result


def _prune_taylor(model: nn.Module, task: Task | None, prune: PruneSection, threads: int | None, progress: bool,
                  inputs: Sequence[torch.Tensor] | None) -> PruneResult:
    """Molchanov et al. (2019): gates, importance averaged with momentum 0.9, the least important
    ``taylor_step_fraction`` of the units removed every ``freq`` fine-tuning steps until
    ``1 - sparsity`` of the parameters (or FLOPs) remain; then the model is physically shrunk."""
    from compressor.taylor import PruneTarget, TaylorPruner, prune_finetune

    if task is None or prune.steps == 0:
        raise RecipeError("[prune] method = 'taylor' ranks units by gradients while fine-tuning: give a --data task "
                          "and steps > 0")
    if not inputs:
        raise RecipeError("[prune] method = 'taylor' needs example inputs: give --input-shape or a --data task")
    threads_before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    start = time.perf_counter()
    try:
        pruner = TaylorPruner(prune.taylor_criterion, every=prune.freq, seed=prune.seed,
                              target=PruneTarget(prune.taylor_target, 1.0 - prune.sparsity))
        pruner.prepare(model, batched(inputs, 2))
        prunable = int(pruner.remaining()["prunable_units"])
        if prunable == 0:
            raise RecipeError("[prune] method = 'taylor' found no unit it can remove in this model (see the "
                              f"structures left alone: {', '.join(pruner.left_alone) or 'none'}): use gradual or hard")
        pruner.per_prune = max(1, round(prune.taylor_step_fraction * prunable))
        curve = prune_finetune(model, task, pruner, prune.steps, lr=prune.lr, grad_clip=5.0, seed=prune.seed,
                               evaluate=lambda _: {}, progress=progress, desc="prune (taylor)")
        now = pruner.remaining()
        small = pruner.shrink().eval()
    finally:
        torch.set_num_threads(threads_before)
    return PruneResult(small, {
        "method": "taylor", "criterion": prune.taylor_criterion, "target": prune.taylor_target,
        "sparsity_asked": prune.sparsity, "sparsity_reached": 1.0 - now[f"{prune.taylor_target}_fraction"],
        "params_fraction": now["params_fraction"], "flops_fraction": now["flops_fraction"],
        "units_fraction": now["units_fraction"], "units_per_round": pruner.per_prune, "rounds": len(pruner.history),
        "target_reached": pruner.reached(), "steps": prune.steps, "seconds": time.perf_counter() - start,
        "curve": [{k: v for k, v in point.items() if k in ("step", "params", "flops", "units")} for point in curve],
        "layers": [{"name": row["layer"], "kind": row["kind"], "pruned": row["total"] - row["kept"], "total": row["total"]}
                   for row in pruner.report()],
        "left_alone": pruner.left_alone})


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
                        dynamic_axes: dict[int, list[int]] | None = None, activations: str = "fp32") -> dict[str, Any]:
    from exporters.tvm import export_tvm

    artifact = export_tvm(packed, inputs, out / f"model-{target}.so", target=target, dynamic_axes=dynamic_axes,
                          activations=activations)
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
