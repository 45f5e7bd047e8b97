"""ONNX Runtime latency, session-creation time and file size of every ONNX artifact of a model.

    python -m bench.onnx_latency [--quick] [--threads 1] [--size full|tiny]
                                 [--models mlp gru ds2-mini resnet8] [--note TEXT] [--out bench/results]

Models: a 3 × Linear(1760) MLP, a GRU(1760) + Linear(1760, 29) over ``T`` steps (time-major),
``ds2-mini`` (2 bidirectional GRU(256) layers) and ResNet-8.  Each is magnitude-pruned one-shot
to 90 % (``MagnitudePruner`` + ``OneShot(0.9)``, masks finalized), exported with ``export_onnx``
(legacy exporter, opset 17), and turned into these artifacts:

* ``fp32 dense`` — the unpruned model (the reference of every ratio);
* ``fp32 pruned + compressed`` — ``compress_initializers`` (weights at rest as bit-mask + values or
  COO, whichever it finds smaller; dense again once the session is created);
* ``int8`` — ``quantize_int8`` (ONNX Runtime dynamic quantization, QInt8 weights): GRU stays fp32;
* ``int8 + compressed`` — the same, compressed at rest;
* GRU models only: ``fp32 lowered`` (``lower_gru``: MatMul + Scan), ``int8 lowered``
  (``quantize_int8``: the recurrent MatMul in int8 too) and ``int8 lowered + compressed``;
  GRU models with convolutions (``ds2-mini``) also ``int8 lowered, MatMul only`` (convolutions
  kept fp32: dynamic quantization turns Conv into ConvInteger, several times slower on CPU).

All are measured in ONE process with the same ``SessionOptions`` (``intra_op_num_threads`` =
``--threads``, one inter-op thread, default graph optimizations): file size; session-creation
time (median of several creations, rebuilding the compressed weights included);
latency at batch 1 and 16 (median of the repeats, after warm-up runs; the minimum is kept in the
JSON too); creations and runs are interleaved across the files of a model (round-robin), so that
load from other processes falls on every variant alike; the largest error
relative to the largest output of the PyTorch model the file came from.  Every file gets the
same random input.  Prints a table; writes ``onnx_latency[-quick][-tiny].{json,md,png}`` to
``--out``.  ``--quick`` (fewer steps and repeats) takes about 1–2 minutes on 2 cores;
``--size tiny`` shrinks every model (for the test).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from bench.machine import machine_info
from compressor import MagnitudePruner, OneShot, PruneGroup
from compressor.size import format_bytes
from compressor.texttable import format_table
from compressor.zoo import build_model
from exporters.onnx import export_onnx
from exporters.onnx_compress import compress_initializers
from exporters.onnx_gru import lower_gru_file
from exporters.onnx_quantize import quantize_int8

SPARSITY = 0.9
BATCHES = (1, 16)
REFERENCE = "fp32 dense"
VARIANTS = ["fp32 dense", "fp32 pruned + compressed", "int8", "int8 + compressed"]
GRU_VARIANTS = ["fp32 lowered", "int8 lowered", "int8 lowered + compressed"]
CONV_GRU_VARIANTS = ["int8 lowered, MatMul only"]  # convolutions kept fp32 (ConvInteger is slow)


class GRUModel(nn.Module):
    """One GRU layer and an output layer, time-major: ``[T, B, I]`` → ``[T, B, classes]``."""

    def __init__(self, hidden: int, classes: int = 29) -> None:
        super().__init__()
        self.gru = nn.GRU(hidden, hidden)
        self.out = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.gru(x)[0])


def mlp(width: int) -> nn.Module:
    return nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width))


@dataclass(frozen=True)
class ModelSpec:
    name: str
    description: str
    build: Callable[[], nn.Module]
    example: Callable[[int], torch.Tensor]  # batch size → input
    dynamic_axes: dict[str, dict[int, str]] | None = None
    recurrent: bool = False
    conv: bool = False

    @property
    def variants(self) -> list[str]:
        return VARIANTS + (GRU_VARIANTS if self.recurrent else []) + (
            CONV_GRU_VARIANTS if self.recurrent and self.conv else [])


def model_specs(size: str = "full", quick: bool = False) -> list[ModelSpec]:
    tiny = size == "tiny"
    width = 64 if tiny else 1760
    hidden = 32 if tiny else 1760
    steps = 4 if tiny else (10 if quick else 50)
    ds2_hidden, ds2_frames = (16, 20) if tiny else (256, 100 if quick else 200)
    seq = {"input": {0: "time", 1: "batch"}, "output": {0: "time", 1: "batch"}}
    specs = [
        ModelSpec("mlp", f"3 x Linear({width})", lambda: mlp(width), lambda b: torch.randn(b, width)),
        ModelSpec("gru", f"GRU({hidden}) + Linear({hidden}, 29), {steps} steps", lambda: GRUModel(hidden),
                  lambda b: torch.randn(steps, b, hidden), seq, recurrent=True),
        ModelSpec("ds2-mini", f"ds2-mini (2 x bidirectional GRU({ds2_hidden})), {ds2_frames} frames",
                  lambda: build_model("ds2-mini", hidden=ds2_hidden), lambda b: torch.randn(b, 1, 64, ds2_frames),
                  {"input": {0: "batch", 3: "time"}, "output": {0: "batch", 1: "time"}}, recurrent=True, conv=True),
        ModelSpec("resnet8", "ResNet-8, 1 x 28 x 28", lambda: build_model("resnet8"), lambda b: torch.randn(b, 1, 28, 28)),
    ]
    return specs


def pruned_copy(model: nn.Module, sparsity: float = SPARSITY) -> nn.Module:
    pruner = MagnitudePruner([PruneGroup(OneShot(sparsity))])
    pruner.prepare(copy.deepcopy(model))
    pruner.step()
    return pruner.finalize().eval()


ENCODINGS: dict[Path, dict[str, int]] = {}  # compressed file → {encoding: number of tensors}


def _compress(source: Path, destination: Path) -> Path:
    compressed, report = compress_initializers(onnx.load(str(source)))
    onnx.save(compressed, str(destination))
    counts: dict[str, int] = {}
    for tensor in report:
        encoding = getattr(tensor, "encoding", "bitmask")
        block = getattr(tensor, "block", None)
        key = f"{encoding} {block}" if encoding == "bitmask" and block is not None else encoding
        counts[key] = counts.get(key, 0) + 1
    ENCODINGS[destination] = counts
    return destination


def build_artifacts(spec: ModelSpec, directory: Path) -> tuple[dict[str, Path], nn.Module, nn.Module]:
    """The ONNX files of every variant (``{variant: path}``), the dense and the pruned model."""
    torch.manual_seed(0)
    dense = spec.build().eval()
    pruned = pruned_copy(dense)
    example = (spec.example(2),)
    d = directory / spec.name
    files = {"fp32 dense": export_onnx(dense, example, d / "dense.onnx", dynamic_axes=spec.dynamic_axes).path}
    plain = export_onnx(pruned, example, d / "pruned.onnx", dynamic_axes=spec.dynamic_axes).path
    files["fp32 pruned + compressed"] = _compress(plain, d / "pruned.compressed.onnx")
    files["int8"] = quantize_int8(plain, d / "int8.onnx")
    files["int8 + compressed"] = _compress(files["int8"], d / "int8.compressed.onnx")
    if spec.recurrent:
        files["fp32 lowered"] = lower_gru_file(plain, d / "lowered.onnx")
        files["int8 lowered"] = quantize_int8(files["fp32 lowered"], d / "lowered.int8.onnx")
        files["int8 lowered + compressed"] = _compress(files["int8 lowered"], d / "lowered.int8.compressed.onnx")
    if spec.recurrent and spec.conv:
        files["int8 lowered, MatMul only"] = quantize_int8(files["fp32 lowered"], d / "lowered.int8.matmul.onnx",
                                                                   op_types=["MatMul"])
    assert list(files) == spec.variants
    return files, dense, pruned


def session_options(threads: int) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return options


def measure_files(files: dict[str, Path], inputs: dict[int, np.ndarray], threads: int, creations: int,
                  warmup: int, repeats: int) -> tuple[dict[str, dict], dict[str, np.ndarray]]:
    """Session-creation time and latency per batch size of every file, and its first output at
    batch 1.  Interleaved: each round creates (or runs) every file once, in turn, so that load
    from other processes on a shared machine falls on all variants alike."""
    options = session_options(threads)
    created: dict[str, list[float]] = {v: [] for v in files}
    sessions: dict[str, ort.InferenceSession] = {}
    for _ in range(creations):
        for variant, path in files.items():
            sessions.pop(variant, None)
            start = time.perf_counter()
            sessions[variant] = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            created[variant].append(time.perf_counter() - start)
    names = {v: s.get_inputs()[0].name for v, s in sessions.items()}
    outputs = {v: s.run(None, {names[v]: inputs[1]})[0] for v, s in sessions.items()}
    times: dict[str, dict[int, list[float]]] = {v: {b: [] for b in inputs} for v in files}
    for batch, x in inputs.items():
        for _ in range(warmup):
            for variant, session in sessions.items():
                session.run(None, {names[variant]: x})
        for _ in range(repeats):
            for variant, session in sessions.items():
                start = time.perf_counter()
                session.run(None, {names[variant]: x})
                times[variant][batch].append(time.perf_counter() - start)
    sessions.clear()
    rows = {v: {"session_ms": 1e3 * statistics.median(created[v]), "session_ms_all": [1e3 * t for t in created[v]],
                "latency": {str(b): {"median_ms": 1e3 * statistics.median(t), "min_ms": 1e3 * min(t), "repeats": len(t)}
                            for b, t in times[v].items()}} for v in files}
    return rows, outputs


def measure(quick: bool = False, threads: int = 1, size: str = "full", models: list[str] | None = None,
            note: str = "", progress: bool = True) -> dict:
    creations, warmup, repeats = (2, 1, 5) if quick else (5, 2, 20)
    if size == "tiny":
        creations, warmup, repeats = 2, 1, 3
    specs = [s for s in model_specs(size, quick) if models is None or s.name in models]
    result = {"benchmark": "onnx_latency", "quick": quick, "size": size, "sparsity": SPARSITY,
              "batches": list(BATCHES), "creations": creations, "warmup": warmup, "repeats": repeats,
              "machine": machine_info(threads), "note": note, "models": {}}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="onnx_latency_") as tmp:
        for spec in specs:
            t0 = time.perf_counter()
            files, dense, pruned = build_artifacts(spec, Path(tmp))
            torch.manual_seed(1)
            inputs = {b: spec.example(b).numpy() for b in BATCHES}
            with torch.no_grad():
                expected = {kind: m(torch.from_numpy(inputs[1])).numpy() for kind, m in
                            (("dense", dense), ("pruned", pruned))}
            rows, outputs = measure_files(files, inputs, threads, creations, warmup, repeats)
            for variant, path in files.items():
                row = rows[variant]
                reference = expected["dense" if variant == REFERENCE else "pruned"]
                row["size_bytes"] = path.stat().st_size
                if path in ENCODINGS:
                    row["encodings"] = ENCODINGS[path]
                row["relative_error"] = float(np.abs(outputs[variant] - reference).max() / max(np.abs(reference).max(), 1e-12))
                if progress:
                    lat = ", ".join(f"b={b} {row['latency'][str(b)]['median_ms']:.2f} ms" for b in BATCHES)
                    print(f"  {spec.name:9s} {variant:24s} {format_bytes(row['size_bytes']):>10s}  "
                          f"session {row['session_ms']:.0f} ms  {lat}", flush=True)
            ref = rows[REFERENCE]
            for row in rows.values():
                row["size_ratio"] = ref["size_bytes"] / row["size_bytes"]  # > 1: smaller than fp32 dense
                row["session_ratio"] = row["session_ms"] / ref["session_ms"]  # > 1: slower to load
                row["speedup"] = {b: ref["latency"][b]["median_ms"] / row["latency"][b]["median_ms"]
                                  for b in row["latency"]}  # > 1: faster than fp32 dense
            result["models"][spec.name] = {"description": spec.description, "parameters":
                                           sum(p.numel() for p in dense.parameters()),
                                           "build_and_measure_s": time.perf_counter() - t0, "variants": rows}
    result["machine"]["load_average_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    result["total_s"] = time.perf_counter() - started
    result["created"] = time.strftime("%Y-%m-%d %H:%M:%S")
    return result


def table_rows(result: dict) -> list[list[str]]:
    rows = []
    for name, model in result["models"].items():
        for variant, row in model["variants"].items():
            rows.append([name, variant, format_bytes(row["size_bytes"]), f"{row['size_ratio']:.1f}x",
                         f"{row['session_ms']:.0f}", f"{row['session_ratio']:.2f}x",
                         *[f"{row['latency'][str(b)]['median_ms']:.2f} ({row['speedup'][str(b)]:.2f}x)" for b in result["batches"]],
                         f"{row['relative_error']:.1e}"])
    return rows


HEADER = ["model", "variant", "file", "smaller", "session ms", "vs fp32", "batch 1 ms (speed-up)",
          "batch 16 ms (speed-up)", "rel. error"]


def to_markdown(result: dict) -> str:
    m = result["machine"]
    lines = [
        "# ONNX Runtime latency, session creation and file size",
        "",
        (f"{result['sparsity']:.0%} one-shot magnitude pruning; ratios against `fp32 dense` (the unpruned model): "
         "*smaller* = its file size / this file size, *speed-up* = its median latency / this median latency, "
         "session *vs fp32* = this session-creation time / its. Latency: median of "
         f"{result['repeats']} runs after {result['warmup']} warm-up run(s); session creation: median of "
         f"{result['creations']}. Error: largest |ONNX − PyTorch| / largest |PyTorch| at batch 1 (pruned "
         "PyTorch model for the pruned variants). Regenerate with `python -m bench.onnx_latency"
         f"{' --quick' if result['quick'] else ''} --threads {m['threads']}`."),
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores ({m['cores_available']} available), {m['threads']} ORT thread(s); "
        f"onnxruntime {m['onnxruntime']}, torch {m['torch']}; load average {m['load_average_start'][0]:.2f} → "
        f"{m['load_average_end'][0]:.2f}." + (f" {result['note']}" if result.get("note") else ""),
        "",
    ]
    for name, model in result["models"].items():
        lines.append(f"- `{name}`: {model['description']}, {model['parameters']:,} parameters")
    lines += ["", "| " + " | ".join(HEADER) + " |", "| " + " | ".join("---" for _ in HEADER) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(result)]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    names = list(result["models"])
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 4.6), squeeze=False)
    metrics = [(f"speed-up, batch {b}", lambda r, b=b: r["speedup"][str(b)]) for b in result["batches"]]
    metrics.append(("smaller file", lambda r: r["size_ratio"]))
    colors = ["tab:blue", "tab:orange", "tab:green"]
    for ax, name in zip(axes[0], names):
        variants = result["models"][name]["variants"]
        labels = list(variants)[::-1]
        y = np.arange(len(labels))
        height = 0.8 / len(metrics)
        for i, (label, value) in enumerate(metrics):
            values = [value(variants[v]) for v in labels]  # bars from 1 (= fp32 dense): right better, left worse
            ax.barh(y + (i - (len(metrics) - 1) / 2) * height, [v - 1 for v in values], height, left=1,
                    label=label, color=colors[i % len(colors)])
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_yticks(y, labels, fontsize=8)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("x fp32 dense (log)")
    handles, legend_labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, legend_labels, loc="lower center", ncol=len(metrics), fontsize=8)
    fig.suptitle(f"ONNX Runtime {result['machine']['onnxruntime']}, {result['machine']['threads']} thread(s), "
                 f"{result['sparsity']:.0%} pruned", fontsize=10)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer GRU steps and repeats (about 1-2 minutes)")
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads (default 1)")
    parser.add_argument("--size", choices=["full", "tiny"], default="full", help="tiny: small models, for tests")
    parser.add_argument("--models", nargs="+", help="only these (mlp, gru, ds2-mini, resnet8)")
    parser.add_argument("--note", default="", help="free text stored with the results (e.g. shared machine)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    result = measure(args.quick, args.threads, args.size, args.models, args.note)
    stem = "onnx_latency" + ("-quick" if args.quick else "") + ("-tiny" if args.size == "tiny" else "")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / f"{stem}.md").write_text(to_markdown(result))
    plot(result, args.out / f"{stem}.png")
    print()
    print(format_table(HEADER, table_rows(result)))
    print(f"\nwrote {args.out / stem}.{{json,md,png}} in {result['total_s']:.0f} s")
    return result


if __name__ == "__main__":
    main()
