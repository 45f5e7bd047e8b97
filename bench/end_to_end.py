"""Whole models, end to end: PyTorch eager, ONNX Runtime fp32/int8, TVM dense and TVM sparse fp32/int8.

    python -m bench.end_to_end [--quick] [--threads 1] [--out bench/results]

Models: the paper-size Deep Speech 2 (7 bidirectional ReLU RNN layers of 1760 with the shared
input weight, 67.7 M parameters; untrained, so latency and size only), the trained ``ds2-mini``
(digits; CER) and the trained ResNet-8 (Fashion-MNIST; accuracy).  Sparse variants: the
recurrent and fully connected weights (all Linear/Conv weights for the CNN) pruned in one shot
to 90 % in 16×1 blocks (one-shot, no fine-tuning: the accuracy column shows what that alone
costs), packed BSR 16×1, fp32 or int8.  Dense baselines: PyTorch eager, ONNX Runtime fp32 and
int8 (``quantize_dynamic``, MatMul/Gemm only: ConvInteger is slower than fp32 Conv) of the
*dense* model, and TVM with our scheduled dense kernels.  Latency: median over repeats after a
warm-up, same thread count everywhere, batch 1 and 16, all in one process.
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
from compressor import MagnitudePruner, OneShot, PruneGroup
from compressor.blocks import BlockShape
from compressor.packed_model import PackingConfig, pack_model
from compressor.selection import CONV_TYPES, LINEAR_TYPES
from compressor.zoo import RECURRENT_WEIGHTS, build_model
from compressor.zoo.pretrained import load_pretrained

SPARSITY = 0.9
BLOCK = BlockShape(16, 1)


@dataclass
class Spec:
    name: str
    build: callable
    input_shape: tuple[int, ...]  # batch 1
    groups: callable
    task: str | None = None


def _ds2_groups() -> list[PruneGroup]:
    return [PruneGroup(OneShot(SPARSITY), include=RECURRENT_WEIGHTS, block=BLOCK),
            PruneGroup(OneShot(SPARSITY), include=r"^fc\.weight$", block=BLOCK)]


def _cnn_groups() -> list[PruneGroup]:
    return [PruneGroup(OneShot(SPARSITY), types=LINEAR_TYPES + CONV_TYPES, block=BLOCK, exclude=r"^conv\.weight$")]


def specs(quick: bool) -> list[Spec]:
    ds2 = Spec("ds2 (paper size, 7×1760)", lambda: build_model("ds2").eval(), (1, 1, 161, 100), _ds2_groups)
    if quick:
        ds2 = Spec("ds2 (3×1760)", lambda: build_model("ds2", layers=3).eval(), (1, 1, 161, 60), _ds2_groups)
    return [ds2,
            Spec("ds2-mini (digits)", lambda: load_pretrained("ds2-mini-digits"), (1, 1, 64, 120), _ds2_groups,
                 "speech-digits"),
            Spec("resnet8 (fashion-mnist)", lambda: load_pretrained("resnet8-fashion-mnist"), (1, 1, 28, 28), _cnn_groups,
                 "fashion-mnist")]


def sparse_copy(model: nn.Module, groups: list[PruneGroup]) -> nn.Module:
    model = copy.deepcopy(model)
    pruner = MagnitudePruner(groups)
    pruner.prepare(model)
    pruner.step()
    return pruner.finalize().eval()


def _median_ms(call, repeats: int) -> float:
    call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def measure_model(spec: Spec, batches: list[int], threads: int, repeats: int, directory: Path, progress: bool) -> dict:
    import tvm

    from exporters.onnx import export_onnx
    from exporters.onnx_quantize import quantize_int8
    from exporters.tvm import export_tvm
    from runtime_tests.onnxruntime_check import session
    from runtime_tests.tvm_check import latency_ms, load_vm

    dense = spec.build()
    sparse = sparse_copy(dense, spec.groups())
    packed = {"fp32": pack_model(sparse, PackingConfig(format="bsr", block=BLOCK, dtype="fp32")),
              "int8": pack_model(sparse, PackingConfig(format="bsr", block=BLOCK, dtype="int8"))}
    example = torch.randn(spec.input_shape, generator=torch.Generator().manual_seed(0))
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
        for name, model in (("tvm dense fp32", dense), ("tvm sparse fp32", packed["fp32"]), ("tvm sparse int8", packed["int8"])):
            start = time.perf_counter()
            artifact = export_tvm(model, (x,), directory / f"{spec.name}-{name}-b{batch}.so".replace(" ", "_"))
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
            "parameters": sum(p.numel() for p in dense.parameters()), "rows": rows}


def measure(quick: bool, threads: int, progress: bool = True) -> dict:
    os.environ["TVM_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)
    from threadpoolctl import threadpool_limits

    result = {"machine": machine_info(threads), "quick": quick, "models": []}
    repeats = 5 if quick else 15
    with threadpool_limits(threads), tempfile.TemporaryDirectory() as directory:
        for spec in specs(quick):
            result["models"].append(measure_model(spec, [1, 16], threads, repeats, Path(directory), progress))
    return result


HEADER = ["model", "backend", "size", "ms b1", "ms b16", "× vs ORT fp32 b1", "× vs ORT int8 b1", "× vs ORT fp32 b16",
          "× vs ORT int8 b16"]


def table_rows(result: dict) -> list[list[str]]:
    from compressor.size import format_bytes

    rows = []
    for model in result["models"]:
        for name, entry in model["rows"].items():
            lat, f32, i8 = entry["latency_ms"], entry["speedup_vs_onnx_fp32"], entry["speedup_vs_onnx_int8"]
            rows.append([model["model"], name, format_bytes(entry["size_bytes"]),
                         *(f"{lat[b]:.2f}" for b in (1, 16)),
                         f"{f32[1]:.1f}×", f"{i8[1]:.1f}×", f"{f32[16]:.1f}×", f"{i8[16]:.1f}×"])
    return rows


def to_markdown(result: dict) -> str:
    m = result["machine"]
    lines = ["# Whole models: PyTorch, ONNX Runtime and TVM", "",
             f"{m['cpu']}, {m['threads']} thread(s), TVM {m['tvm']}, ONNX Runtime {m['onnxruntime']}, torch {m['torch']}. "
             f"Sparse: 90 % in 16×1 blocks, one-shot. Medians; batch 1 and 16.", "",
             "| " + " | ".join(HEADER) + " |", "|" + " --- |" * len(HEADER)]
    lines += ["| " + " | ".join(r) + " |" for r in table_rows(result)]
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
    args = parser.parse_args(argv)
    result = measure(args.quick, args.threads)
    stem = args.out / ("end_to_end-quick" if args.quick else "end_to_end")
    write_results(result, stem, to_markdown, plot, HEADER, table_rows(result))
    return result


if __name__ == "__main__":
    main()
