"""The whole job: load → prune → pack → export → check → report, from one :class:`Recipe`.

Every figure in the report is measured in this run: sizes from the files and the one size
accounting function (:func:`compressor.size.size_report`), parity against PyTorch on the example
inputs, the task metric of the dense model, the pruned model and every artifact, and median
latencies of PyTorch, ONNX Runtime and TVM at the same thread count.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from compressor.size import fp32_bytes, size_report
from runtime_tests.onnxruntime_check import relative_errors

from . import stages
from .checkpoint import load_recipe_model
from .recipe import Recipe
from .report import write_report
from .workspace import OutputFolder

#: parity tolerances, relative to the largest reference output
FP32_RTOL = 1e-4
INT8_ONNX_RTOL = 6e-2  # ONNX Runtime's dynamic int8 quantizes activations too
STORED_WEIGHTS_RTOL = 1e-4  # TVM's int8 kernels compute exactly with the stored weights
INT8_ACTIVATIONS_RTOL = INT8_ONNX_RTOL  # TVM with [export] activations = "int8" quantizes them the same way


class StageProgress:
    """A progress bar over the stages of the run (training shows its own bar inside "prune")."""

    def __init__(self, recipe: Recipe, enabled: bool) -> None:
        from tqdm.auto import tqdm

        total = 6 + len(recipe.export.targets) * ("tvm" in recipe.export.formats) + ("onnx" in recipe.export.formats)
        self.bar = tqdm(total=total, desc="compress-and-export", unit="stage", disable=not enabled,
                        bar_format="{desc}: {n_fmt}/{total_fmt} stages |{bar}| {elapsed}")

    def __call__(self, text: str) -> None:
        self.bar.set_description_str(text)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


def _evaluate(task, model, name: str) -> dict[str, float]:
    start = time.perf_counter()
    metrics = task.evaluate(model)
    return {**metrics, "seconds": time.perf_counter() - start, "evaluated": name}


def run(recipe: Recipe, out: str | Path, progress: bool = True, resume: bool = False) -> dict[str, Any]:
    """Run every stage of ``recipe``; write the artifacts and the report into ``out`` — all of them
    when the run succeeds, none otherwise (:class:`~pipeline.workspace.OutputFolder`).  The
    fine-tuning state is kept in ``out/.resume`` until the run succeeds; ``resume=True``
    continues an interrupted run from it."""
    folder = OutputFolder(out)
    with folder as work:
        checkpoint = folder.resume_checkpoint(stages.fine_tuning_settings(recipe), resume)
        return _run(recipe, folder, work, progress, checkpoint)


def _run(recipe: Recipe, folder: OutputFolder, out: Path, progress: bool, checkpoint: Path) -> dict[str, Any]:
    threads = recipe.check.threads
    torch.set_num_threads(threads)
    os.environ["TVM_NUM_THREADS"] = str(threads)  # read when TVM's thread pool starts
    started = time.perf_counter()
    timings: dict[str, float] = {}
    stage = StageProgress(recipe, progress)

    def timed(stage: str, since: float) -> None:
        timings[stage] = time.perf_counter() - since

    t = time.perf_counter()
    stage("load")
    model, factory_examples = load_recipe_model(recipe.model)
    task = stages.make_task(recipe.data, progress)
    inputs = stages.example_inputs(task, recipe.data, factory_examples)
    stages.validate_model(model, inputs)
    timed("load", t)

    report: dict[str, Any] = {"schema": 1, "recipe": recipe.as_dict(), "inputs": [list(x.shape) for x in inputs],
                              "input_fp32_bytes": fp32_bytes(model),
                              "task": getattr(task, "name", None), "metric": getattr(task, "metric", None)}
    metrics: dict[str, dict] = {}
    if task is not None:
        stage("evaluate the dense model")
        metrics["pytorch dense"] = _evaluate(task, model, "pytorch dense")

    t = time.perf_counter()
    stage(f"prune ({recipe.prune.method}, {recipe.prune.sparsity:.0%})")
    pruned = stages.prune_model(model, task, recipe.prune, threads, progress, inputs, checkpoint)
    report["prune"] = pruned.record
    timed("prune", t)
    if task is not None:
        metrics["pytorch pruned"] = _evaluate(task, pruned.model, "pytorch pruned")

    t = time.perf_counter()
    stage("pack")
    packed = stages.pack(pruned.model, recipe.pack, recipe.prune)
    sizes = size_report(packed)
    report["size"] = sizes.as_dict()
    report["quant_errors"] = [e.__dict__ for e in packed.quant_errors()]
    reference = packed.dequantized()
    if task is not None and recipe.pack.int8:
        metrics["pytorch packed (stored weights)"] = _evaluate(task, reference, "pytorch packed")
    timed("pack", t)

    artifacts: dict[str, dict] = {}
    parity: dict[str, float] = {}
    torch_ref = [o.numpy() for o in _outputs(pruned.model, inputs)]
    stored_ref = [o.numpy() for o in _outputs(reference, inputs)]
    if "onnx" in recipe.export.formats:
        t = time.perf_counter()
        stage("export ONNX")
        axes = stages.dynamic_axes_for(getattr(task, "name", ""), len(inputs))
        artifacts["onnx"] = stages.export_onnx_artifact(pruned.model, inputs, out, recipe.pack.int8, axes)
        if pruned.structured:
            from exporters.onnx import export_onnx

            input_file = Path(artifacts["onnx"]["intermediate_dir"]) / "model.input.fp32.onnx"
            artifacts["onnx"]["input_model_fp32"] = str(export_onnx(model, inputs, input_file, dynamic_axes=axes).path)
        from runtime_tests.onnxruntime_check import OnnxModule, run_onnx

        got = run_onnx(artifacts["onnx"]["path"], [x.numpy() for x in inputs])
        parity["onnx"] = relative_errors(torch_ref, got).worst
        artifacts["onnx"]["parity_tolerance"] = INT8_ONNX_RTOL if recipe.pack.int8 else FP32_RTOL
        if task is not None:
            methods = {"output_lengths": pruned.model.output_lengths} if hasattr(pruned.model, "output_lengths") else {}
            metrics["onnx runtime"] = _evaluate(task, OnnxModule(artifacts["onnx"]["path"], threads, **methods),
                                                "onnx runtime")
        timed("export onnx", t)
    if "tvm" in recipe.export.formats:
        for target in recipe.export.targets:
            t = time.perf_counter()
            stage(f"export TVM ({target})")
            key = f"tvm {target}"
            axes = stages.tvm_dynamic_axes(getattr(task, "name", ""), len(inputs))
            artifacts[key] = stages.export_tvm_artifact(packed, inputs, out, target, axes, recipe.export.activations)
            artifacts[key]["parity_tolerance"] = (INT8_ACTIVATIONS_RTOL if recipe.export.activations == "int8"
                                                  else STORED_WEIGHTS_RTOL)
            if target == "host":
                from runtime_tests.tvm_check import TvmModule, run_tvm

                got = run_tvm(artifacts[key]["path"], [x.numpy() for x in inputs])
                parity[key] = relative_errors(stored_ref, got).worst
                if task is not None and (axes or not getattr(task, "name", "").startswith(("speech", "charlm"))):
                    methods = {"output_lengths": reference.output_lengths} if hasattr(reference, "output_lengths") else {}
                    metrics["tvm host"] = _evaluate(task, TvmModule(artifacts[key]["path"], inputs[0].shape[0], **methods),
                                                    "tvm host")
            timed(f"export {key}", t)

    t = time.perf_counter()
    stage("measure latency")
    report["latency_ms"] = _latencies(recipe, pruned.model, model, artifacts, inputs, packed, out)
    timed("latency", t)

    report.update({"metrics": metrics, "parity": parity, "artifacts": artifacts, "timings_s": timings,
                   "total_seconds": time.perf_counter() - started, "machine": _machine(threads)})
    stage("report")
    stage.close()
    report["checks_passed"] = all(parity[k] <= artifacts[k]["parity_tolerance"] for k in parity)
    report = folder.relocate(report)
    write_report(report, out)
    (out / "report.json").write_text(json.dumps(report, indent=1, default=_json_default))
    return report


def _outputs(model, inputs) -> list[torch.Tensor]:
    with torch.no_grad():
        result = model.eval()(*inputs)
    return list(result) if isinstance(result, (tuple, list)) else [result]


def _latencies(recipe: Recipe, pruned_model, dense_model, artifacts: dict, inputs, packed, out: Path) -> dict:
    """Median latency (ms) per backend and batch size, all at ``recipe.check.threads`` threads."""
    import tvm

    from exporters.tvm import export_tvm
    from runtime_tests.tvm_check import latency_ms, load_vm

    threads = recipe.check.threads
    result: dict[str, dict[str, float]] = {}
    for batch in recipe.check.batches:
        batch_inputs = stages.batched(inputs, batch)
        arrays = [x.numpy() for x in batch_inputs]
        row = {"pytorch dense": stages.torch_latency_ms(dense_model, batch_inputs),
               "pytorch pruned": stages.torch_latency_ms(pruned_model, batch_inputs)}
        if "onnx" in artifacts:
            steps = Path(artifacts["onnx"]["intermediate_dir"])
            if "input_model_fp32" in artifacts["onnx"]:  # a shrunk model: the input model's own fp32 file too
                row["onnx runtime input model fp32"] = stages.onnx_latency_ms(artifacts["onnx"]["input_model_fp32"],
                                                                              arrays, threads)
            row["onnx runtime fp32"] = stages.onnx_latency_ms(steps / "model.fp32.onnx", arrays, threads)
            row["onnx runtime artifact"] = stages.onnx_latency_ms(artifacts["onnx"]["path"], arrays, threads)
        if "tvm host" in artifacts:
            path = Path(artifacts["tvm host"]["path"])
            if batch != inputs[0].shape[0]:
                path = export_tvm(packed, batch_inputs, out / "tvm-steps" / f"model-host-b{batch}.so",
                                  activations=recipe.export.activations).path
            row["tvm artifact"] = latency_ms(load_vm(path), arrays, tvm.cpu())
        result[str(batch)] = row
    if recipe.export.device and any(k.startswith("tvm") for k in artifacts):
        from exporters.tvm_rpc import connect

        session = connect(recipe.export.device)
        key = next(k for k in artifacts if k.startswith("tvm") and not k.endswith("host")) if \
            any(k.startswith("tvm") and not k.endswith("host") for k in artifacts) else "tvm host"
        vm = session.load_vm(artifacts[key]["path"])
        result["device"] = {"address": recipe.export.device, "artifact": key,
                            "tvm artifact": latency_ms(vm, [x.numpy() for x in inputs], session.device)}
    return result


def _machine(threads: int) -> dict:
    from bench.machine import machine_info

    info = machine_info(threads)
    info["python"] = platform.python_version()
    return info


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "__dict__"):
        return value.__dict__
    return str(value)
