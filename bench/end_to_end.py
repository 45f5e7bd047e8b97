"""Whole models, end to end: PyTorch eager, ONNX Runtime fp32/int8, TVM dense and TVM sparse fp32/int8.

    python -m bench.end_to_end [--quick] [--threads 1] [--out bench/results] [--eval-limit N] [--no-accuracy]

Models: the paper-size Deep Speech 2 (7 bidirectional ReLU RNN layers of 1760 with the shared
input weight, 67.7 M parameters; untrained, so latency and size only), the same without its two
(dense, unpruned) convolutions (:class:`RecurrentStack`: what the pruned layers alone gain; the
convolutions take most of the whole model's time at batch 16), the trained ``ds2-mini``
(digits; CER) and the trained ResNet-8 (Fashion-MNIST; accuracy).  Sparse variants: the
recurrent and fully connected weights (all Linear/Conv weights but the first for the CNN) pruned
to 90 % in 16×1 blocks — the trained models gradually (cubic schedule over the first 60 % of
:data:`FINETUNE_STEPS` fine-tuning steps on the task's training split, as a user would), the
untrained paper-size ones in one shot — packed BSR 16×1, fp32 or int8, and on a CPU with
AVX-512 VNNI int8 with int8 activations as well (``export_tvm(activations="int8")``).  Dense baselines: PyTorch eager, ONNX Runtime fp32 and
int8 (``quantize_dynamic``, MatMul/Gemm only: ConvInteger is slower than fp32 Conv) of the
*dense* model, and TVM with our scheduled dense kernels.  Latency: median over repeats after a
warm-up, same thread count everywhere, batch 1 and 16, all in one process.

Accuracy on the task (``"accuracy"`` of each row, and of the model), in a second phase after every
latency is measured: each backend of the models with a shipped trained checkpoint (``ds2-mini``:
CER / WER on the spoken digits, ResNet-8: accuracy on Fashion-MNIST) is evaluated on the first
examples of the held-out test split (``--quick``: 200 utterances and 2,000 images; else all 400
and 10,000) through :class:`runtime_tests.onnxruntime_check.OnnxModule` and
:class:`runtime_tests.tvm_check.TvmModule`, as ``pipeline.run`` evaluates artifacts.  The
artifacts are exported again for it from the same models with the same settings, speech ones with
a run-time time axis (ONNX ``{batch, time}``, TVM ``{0: [3]}``) so that one file runs every
utterance length; TVM libraries at batch 1.  The PyTorch accuracy of the pruned model (fp32, and
with the int8 weights as stored) is recorded beside them as the reference of the sparse rows.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from bench.machine import machine_info
from bench.output import write_results
from compressor import CubicSchedule, MagnitudePruner, OneShot, PruneGroup
from compressor.blocks import BlockShape
from compressor.packed_model import PackingConfig, pack_model
from compressor.selection import CONV_TYPES, LINEAR_TYPES
from compressor.training import TrainConfig, train
from compressor.zoo import RECURRENT_WEIGHTS, build_model
from compressor.zoo.ds2 import DeepSpeech2
from compressor.zoo.pretrained import load_pretrained

SPARSITY = 0.9
BLOCK = BlockShape(16, 1)
#: fine-tuning steps (Adam, lr 5e-4, batch of the task) of the trained models while they are pruned, by ``--quick``
FINETUNE_STEPS = {True: 150, False: 600}
PRUNING = (f"magnitude pruning to {SPARSITY:.0%} in {BLOCK} blocks (DS2: recurrent and FC weights; CNN: every "
           "Linear / Conv weight but the first convolution); trained models gradually, cubic schedule over the "
           "first 60 % of {steps} fine-tuning steps on the training split; untrained paper-size models in one shot")
#: examples of the test split evaluated per backend (None: the whole split)
EVAL_LIMITS = {True: {"speech-digits": 200, "fashion-mnist": 2000}, False: {"speech-digits": None, "fashion-mnist": None}}


@dataclass
class Spec:
    name: str
    build: callable
    input_shape: tuple[int, ...]  # batch 1
    groups: callable
    task: str | None = None


def _ds2_groups(schedule) -> list[PruneGroup]:
    return [PruneGroup(schedule, include=RECURRENT_WEIGHTS, block=BLOCK),
            PruneGroup(schedule, include=r"^fc\.weight$", block=BLOCK)]


def _cnn_groups(schedule) -> list[PruneGroup]:
    return [PruneGroup(schedule, types=LINEAR_TYPES + CONV_TYPES, block=BLOCK, exclude=r"^conv\.weight$")]


class RecurrentStack(nn.Module):
    """A DS2 without its convolutions: the features they would give, ``[batch, time, C·F]``, through
    the recurrent layers, the FC layer and the output layer (the same modules and parameter names).
    The convolutions are left dense by the pruning (as in the paper) and dominate the whole model's
    time at batch 16; this model shows what the pruned part alone gains."""

    def __init__(self, ds2: nn.Module) -> None:
        super().__init__()
        self.rnns, self.fc, self.out = ds2.rnns, ds2.fc, ds2.out

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = features.transpose(0, 1)
        for rnn in self.rnns:
            x = rnn(x)
        return self.out(torch.clamp(self.fc(x), 0.0, 20.0)).transpose(0, 1)


def specs(quick: bool) -> list[Spec]:
    layers, frames = (3, 60) if quick else (7, 100)
    name = "ds2 (3×1760)" if quick else "ds2 (paper size, 7×1760)"
    ds2 = Spec(name, lambda: build_model("ds2", layers=layers).eval(), (1, 1, 161, frames), _ds2_groups)
    features = build_model("ds2", layers=1).rnns[0].input.in_features
    stack = Spec(f"{name.removesuffix(')')}, recurrent layers only)",
                 lambda: RecurrentStack(build_model("ds2", layers=layers)).eval(),
                 (1, DeepSpeech2.output_lengths(torch.tensor(frames)).item(), features), _ds2_groups)
    return [ds2, stack,
            Spec("ds2-mini (digits)", lambda: load_pretrained("ds2-mini-digits"), (1, 1, 64, 120), _ds2_groups,
                 "speech-digits"),
            Spec("resnet8 (fashion-mnist)", lambda: load_pretrained("resnet8-fashion-mnist"), (1, 1, 28, 28), _cnn_groups,
                 "fashion-mnist")]


def sparse_copy(model: nn.Module, spec: Spec, task=None, steps: int = 0) -> nn.Module:
    """A pruned copy of ``model``: in one shot, or with a ``task``, gradually while fine-tuned for
    ``steps`` steps on its training split (cubic schedule reaching :data:`SPARSITY` at 60 %)."""
    model = copy.deepcopy(model)
    if task is None:
        pruner = MagnitudePruner(spec.groups(OneShot(SPARSITY)))
        pruner.prepare(model)
        pruner.step()
        return pruner.finalize().eval()
    end = int(steps * 0.6)
    pruner = MagnitudePruner(spec.groups(CubicSchedule(SPARSITY, start_itr=0, n_steps=10, delta_t=max(1, end // 10))))
    pruner.prepare(model)
    train(model, task, TrainConfig(steps=steps, lr=5e-4, grad_clip=5.0, seed=0), pruner,
          desc=f"prune {spec.name}")
    return pruner.finalize().eval()


def _median_ms(call, repeats: int) -> float:
    call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def prepare(spec: Spec, task=None, steps: int = 0) -> tuple[nn.Module, nn.Module, dict, torch.Tensor]:
    """The dense model, its pruned copy (:func:`sparse_copy`), the pruned copy packed BSR fp32 /
    int8, and the example input (batch 1)."""
    dense = spec.build()
    sparse = sparse_copy(dense, spec, task, steps)
    packed = {"fp32": pack_model(sparse, PackingConfig(format="bsr", block=BLOCK, dtype="fp32")),
              "int8": pack_model(sparse, PackingConfig(format="bsr", block=BLOCK, dtype="int8"))}
    example = torch.randn(spec.input_shape, generator=torch.Generator().manual_seed(0))
    return dense, sparse, packed, example


def tvm_variants(dense: nn.Module, packed: dict) -> list[tuple[str, object, str]]:
    """(row name, model, activations) of every TVM artifact: dense fp32, sparse fp32 and int8, and
    on a CPU with AVX-512 VNNI sparse int8 with int8 activations (:mod:`exporters.tvm_vnni_kernel`)."""
    from exporters.tvm_kernels import host_target
    from exporters.tvm_vnni_kernel import target_has_vnni

    variants = [("tvm dense fp32", dense, "fp32"), ("tvm sparse fp32", packed["fp32"], "fp32"),
                ("tvm sparse int8", packed["int8"], "fp32")]
    if target_has_vnni(host_target()):
        variants.append(("tvm sparse int8, int8 activations", packed["int8"], "int8"))
    return variants


def measure_model(spec: Spec, prepared: tuple, batches: list[int], threads: int, repeats: int, directory: Path,
                  progress: bool, pruning: str) -> dict:
    import tvm

    from exporters.onnx import export_onnx
    from exporters.onnx_quantize import quantize_int8
    from exporters.tvm import export_tvm
    from runtime_tests.onnxruntime_check import session
    from runtime_tests.tvm_check import latency_ms, load_vm

    dense, _, packed, example = prepared
    onnx_fp32 = export_onnx(dense, (example,), directory / f"{spec.name}.onnx").path
    onnx_int8 = quantize_int8(onnx_fp32, directory / f"{spec.name}.int8.onnx", op_types=["MatMul", "Gemm"])
    rows: dict[str, dict] = {}

    def row(name: str) -> dict:
        return rows.setdefault(name, {"latency_ms": {}})

    row("pytorch eager dense")["size_bytes"] = sum(p.numel() * 4 for p in dense.parameters())
    row("onnx runtime fp32 dense")["size_bytes"] = onnx_fp32.stat().st_size
    row("onnx runtime int8 dense")["size_bytes"] = onnx_int8.stat().st_size
    for batch in batches:
        x = example.expand(batch, *example.shape[1:]).contiguous()
        if progress:
            print(f"  {spec.name}, batch {batch} …", flush=True)
        with torch.no_grad():
            row("pytorch eager dense")["latency_ms"][batch] = _median_ms(lambda: dense(x), repeats)
        for name, path in (("onnx runtime fp32 dense", onnx_fp32), ("onnx runtime int8 dense", onnx_int8)):
            sess = session(path, threads)
            feeds = {sess.get_inputs()[0].name: x.numpy()}
            row(name)["latency_ms"][batch] = _median_ms(lambda s=sess, f=feeds: s.run(None, f), repeats)
        for name, model, activations in tvm_variants(dense, packed):
            start = time.perf_counter()
            artifact = export_tvm(model, (x,), directory / f"{spec.name}-{name}-b{batch}.so".replace(" ", "_")
                                  .replace(",", ""), activations=activations)
            entry = row(name)
            entry.setdefault("compile_s", {})[batch] = time.perf_counter() - start
            entry["size_bytes"] = artifact.size_bytes
            entry["latency_ms"][batch] = latency_ms(load_vm(artifact.path), [x.numpy()], tvm.cpu(), repeat=repeats,
                                                    min_repeat_ms=50)
    for entry in rows.values():
        entry["speedup_vs_onnx_fp32"] = {b: rows["onnx runtime fp32 dense"]["latency_ms"][b] / ms
                                         for b, ms in entry["latency_ms"].items()}
        entry["speedup_vs_onnx_int8"] = {b: rows["onnx runtime int8 dense"]["latency_ms"][b] / ms
                                         for b, ms in entry["latency_ms"].items()}
    return {"model": spec.name, "input_shape": list(spec.input_shape), "sparsity": SPARSITY, "block": str(BLOCK),
            "pruning": pruning, "parameters": sum(p.numel() for p in dense.parameters()), "rows": rows}


def make_task(name: str, eval_limit: int | None):
    """The task of a shipped checkpoint, evaluating the first ``eval_limit`` test examples."""
    if name.startswith("speech-"):
        from compressor.tasks.speech import STANDARD_CORPORA, SpeechTask

        return SpeechTask(STANDARD_CORPORA[name.removeprefix("speech-")], progress=False, eval_limit=eval_limit)
    from compressor.tasks.images import ImageTask

    return ImageTask(name, eval_limit=eval_limit)


def evaluated_examples(task) -> int:
    count = len(task.corpus["test"].features) if hasattr(task, "corpus") else len(task.images["test"])
    return count if task.eval_limit is None else min(count, task.eval_limit)


def measure_accuracy(spec: Spec, prepared: tuple, task, threads: int, directory: Path, progress: bool,
                     pruning: str) -> dict:
    """Task metrics of every backend of ``spec`` (see the module docstring): ``{"rows": {backend:
    metrics}, "reference": {pruned PyTorch model: metrics}, ...}``; each entry's ``seconds`` covers the
    export of its artifact (TVM compilation) and the evaluation.  Exports its own artifacts (run-time
    time axis for speech) into ``directory``."""
    from exporters.onnx import export_onnx
    from exporters.onnx_quantize import quantize_int8
    from exporters.tvm import export_tvm
    from pipeline.stages import dynamic_axes_for, tvm_dynamic_axes
    from runtime_tests.onnxruntime_check import OnnxModule
    from runtime_tests.tvm_check import TvmModule

    started = time.perf_counter()
    dense, sparse, packed, example = prepared
    methods = {"output_lengths": dense.output_lengths} if hasattr(dense, "output_lengths") else {}
    onnx_axes, tvm_axes = dynamic_axes_for(task.name, 1), tvm_dynamic_axes(task.name, 1)
    work = directory / "accuracy" / spec.task
    onnx_fp32 = export_onnx(dense, (example,), work / "dense.onnx", dynamic_axes=onnx_axes).path
    onnx_int8 = quantize_int8(onnx_fp32, work / "dense.int8.onnx", op_types=["MatMul", "Gemm"])

    def tvm(model, name: str, activations: str) -> nn.Module:
        artifact = export_tvm(model, (example,), work / f"{name}.so".replace(" ", "-").replace(",", ""),
                              dynamic_axes=tvm_axes, activations=activations)
        return TvmModule(artifact.path, example.shape[0], **methods)

    backends = {"pytorch eager dense": lambda: dense,
                "onnx runtime fp32 dense": lambda: OnnxModule(onnx_fp32, threads, **methods),
                "onnx runtime int8 dense": lambda: OnnxModule(onnx_int8, threads, **methods),
                **{name: (lambda m=model, n=name, a=activations: tvm(m, n, a))
                   for name, model, activations in tvm_variants(dense, packed)}}
    references = {"pytorch eager sparse fp32": lambda: sparse,
                  "pytorch eager sparse int8 (stored weights)": lambda: packed["int8"].dequantized()}
    rows, reference = {}, {}
    for into, table in ((rows, backends), (reference, references)):
        for name, build in table.items():
            if progress:
                print(f"  {spec.name}: {task.metric} of {name} …", flush=True)
            start = time.perf_counter()
            into[name] = {**task.evaluate(build()), "seconds": time.perf_counter() - start}
    return {"task": task.name, "metric": task.metric, "split": "test", "examples": evaluated_examples(task),
            "pruning": pruning, "time_axis": "run-time (dynamic)" if tvm_axes else "fixed",
            "rows": rows, "reference": reference, "seconds": time.perf_counter() - started}


def measure(quick: bool, threads: int, progress: bool = True, accuracy: bool = True,
            eval_limit: int | None | str = "default") -> dict:
    """Phase 1: latency and size of every model; phase 2 (``accuracy``): the task metric of every
    backend of the models with a task, on ``eval_limit`` test examples (default: :data:`EVAL_LIMITS`)."""
    os.environ["TVM_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)
    from threadpoolctl import threadpool_limits

    steps = FINETUNE_STEPS[quick]
    pruning = PRUNING.format(steps=steps)
    result = {"machine": machine_info(threads), "quick": quick, "finetune_steps": steps, "models": []}
    repeats = 5 if quick else 15
    with threadpool_limits(threads), tempfile.TemporaryDirectory() as directory:
        chosen = specs(quick)
        tasks = {spec.task: make_task(spec.task, EVAL_LIMITS[quick][spec.task] if eval_limit == "default" else eval_limit)
                 for spec in chosen if spec.task is not None}
        kept = {}  # the trained models' pruned copies, fine-tuned once for both phases
        for spec in chosen:
            prepared = prepare(spec, tasks.get(spec.task), steps)
            if spec.task is not None:
                kept[spec.name] = prepared
            result["models"].append(measure_model(spec, prepared, [1, 16], threads, repeats, Path(directory),
                                                  progress, pruning))
            del prepared
        if accuracy:  # after every latency: evaluation never runs beside a timed call
            for spec, model in zip(chosen, result["models"]):
                if spec.task is not None:
                    add_accuracy(model, measure_accuracy(spec, kept[spec.name], tasks[spec.task], threads,
                                                         Path(directory), progress, pruning))
    return result


def add_accuracy(model: dict, accuracy: dict) -> None:
    """Put each backend's metrics in its row (``row["accuracy"]``) and the rest in ``model["accuracy"]``."""
    for name, metrics in accuracy["rows"].items():
        model["rows"][name]["accuracy"] = metrics
    model["accuracy"] = {key: value for key, value in accuracy.items() if key != "rows"}


HEADER = ["model", "backend", "size", "ms b1", "ms b16", "× vs ORT fp32 b1", "× vs ORT int8 b1", "× vs ORT fp32 b16",
          "× vs ORT int8 b16", "task metric"]


def metric_text(model: dict, metrics: dict | None) -> str:
    """``"cer 1.37%"`` for a row evaluated on the task, ``"–"`` otherwise."""
    if not metrics or "accuracy" not in model:
        return "–"
    metric = model["accuracy"]["metric"]
    return f"{metric} {metrics[metric]:.2%}"


def table_rows(result: dict) -> list[list[str]]:
    from compressor.size import format_bytes

    rows = []
    for model in result["models"]:
        for name, entry in model["rows"].items():
            lat, f32, i8 = entry["latency_ms"], entry["speedup_vs_onnx_fp32"], entry["speedup_vs_onnx_int8"]
            rows.append([model["model"], name, format_bytes(entry["size_bytes"]),
                         *(f"{lat[b]:.2f}" for b in (1, 16)),
                         f"{f32[1]:.1f}×", f"{i8[1]:.1f}×", f"{f32[16]:.1f}×", f"{i8[16]:.1f}×",
                         metric_text(model, entry.get("accuracy"))])
    return rows


def to_markdown(result: dict) -> str:
    m = result["machine"]
    lines = ["# Whole models: PyTorch, ONNX Runtime and TVM", "",
             f"{m['cpu']}, {m['threads']} thread(s), TVM {m['tvm']}, ONNX Runtime {m['onnxruntime']}, torch {m['torch']}. "
             f"Sparse: 90 % in 16×1 blocks (see Pruning below). Medians; batch 1 and 16.", "",
             "| " + " | ".join(HEADER) + " |", "|" + " --- |" * len(HEADER)]
    lines += ["| " + " | ".join(r) + " |" for r in table_rows(result)]
    evaluated = [m for m in result["models"] if "accuracy" in m]
    if evaluated:
        lines += ["", ("Task metric: first examples of the held-out test split, after every latency was measured; "
                       "speech artifacts exported again with a run-time time axis. Pruned models in PyTorch (the "
                       "reference of the sparse rows):"), ""]
        lines += [f"- {m['model']} ({m['accuracy']['examples']} {m['accuracy']['task']} test examples): "
                  + ", ".join(f"{name} {metric_text(m, metrics)}" for name, metrics in m["accuracy"]["reference"].items())
                  for m in evaluated]
        lines += ["", f"Pruning: {evaluated[0]['accuracy']['pruning']}."]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(result["models"]), figsize=(5 * len(result["models"]), 4), squeeze=False)
    for ax, model in zip(axes[0], result["models"]):
        names = list(model["rows"])
        for i, batch in enumerate((1, 16)):
            ax.bar(np.arange(len(names)) + 0.4 * i, [model["rows"][n]["latency_ms"][batch] for n in names], 0.4,
                   label=f"batch {batch}")
        ax.set_xticks(np.arange(len(names)) + 0.2, names, rotation=35, ha="right", fontsize=7)
        ax.set_yscale("log")
        ax.set_ylabel("median ms (log)")
        ax.set_title(model["model"], fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a 3-layer DS2 and fewer repeats")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--eval-limit", type=int, help="test examples per backend for the task metric "
                        "(default: 200 utterances / 2,000 images with --quick, else the whole test split)")
    parser.add_argument("--no-accuracy", action="store_true", help="latency and size only")
    args = parser.parse_args(argv)
    result = measure(args.quick, args.threads, accuracy=not args.no_accuracy,
                     eval_limit="default" if args.eval_limit is None else args.eval_limit)
    stem = args.out / ("end_to_end-quick" if args.quick else "end_to_end")
    write_results(result, stem, to_markdown, plot, HEADER, table_rows(result))
    return result


if __name__ == "__main__":
    main()
