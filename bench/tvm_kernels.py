"""Sparse vs dense matrix-vector/matrix products: the paper's kernel table for every backend.

    python -m bench.tvm_kernels [--quick] [--threads 1] [--out bench/results]

For each weight ``N×N`` (1760, 2560, 3072), sparsity (80 / 90 / 95 %) and batch (1, 16), one
process times ``y = x·Wᵀ`` with the same thread count in: numpy (OpenBLAS), torch, ONNX Runtime
fp32 MatMul and int8 (``quantize_dynamic``), our scheduled TVM dense kernel (fp32, int8) and our
TVM sparse kernels (CSR, BSR 16×1, 8×8, 4×4, 1×16; fp32 and int8 weights on fp32 activations)
and, on a CPU with AVX-512 VNNI, the BSR 16×1 kernel with int8 activations ("tvm bsr16x1 vnni":
the input quantized at every call, integer products, :mod:`exporters.tvm_vnni_kernel`).  Weights are block-pruned
at random to exactly the sparsity (Narang et al. 2017 pruned 1760–3072-wide RNN layers and
reported 3–7× sparse speedups on GPU/CPU libraries).

Cold cache, as for one step of a big model whose weights do not stay in cache: TVM kernels take
their weights as arguments and ``time_evaluator`` flushes them before every call
(``cache_flush_cpu_non_first_arg``); numpy / torch / ONNX Runtime calls are timed one by one
after writing a buffer twice the size of the last-level cache.  Medians over repeats.

The bytes-moved bound of a kernel is the bytes it must read and write (weights, indices, scales,
x, y) divided by the memory bandwidth measured here (numpy copy of 256 MB, read + write); the
"bound reached" column is that bound over the measured time.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
import tvm
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import QuantType, quantize_dynamic
from threadpoolctl import threadpool_limits
from tvm import relax

from bench.machine import machine_info
from bench.output import write_results
from compressor.blocks import BlockShape
from compressor.packing import PackedWeight, pack
from exporters.tvm_kernels import KernelCall, matmul_kernel
from exporters.tvm_targets import compile_target
from exporters.tvm_vnni_kernel import takes_int8_activations, target_has_vnni, vnni_matmul_call

FLUSH_BYTES = 2 * 64 * 2**20  # twice a generous last-level cache
SPARSE_LAYOUTS: dict[str, tuple[str, BlockShape]] = {
    "csr": ("csr", BlockShape(1, 1)), "bsr16x1": ("bsr", BlockShape(16, 1)), "bsr8x8": ("bsr", BlockShape(8, 8)),
    "bsr4x4": ("bsr", BlockShape(4, 4)), "bsr1x16": ("bsr", BlockShape(1, 16)),
}


def block_pruned(size: int, sparsity: float, block: BlockShape, rng: np.random.Generator) -> np.ndarray:
    """A random ``size×size`` weight with exactly ``round(blocks·(1 − sparsity))`` r×c blocks kept."""
    rows, cols = size // block.rows, size // block.cols
    keep = rng.permutation(rows * cols) < round(rows * cols * (1 - sparsity))
    mask = np.repeat(np.repeat(keep.reshape(rows, cols), block.rows, 0), block.cols, 1)
    return (rng.standard_normal((size, size)).astype(np.float32) * mask).astype(np.float32)


def memory_bandwidth_gbs() -> float:
    """Read + write bandwidth of a 256 MB numpy copy (median of 5), GB/s."""
    source = np.ones(2**26, np.float32)
    target = np.empty_like(source)
    times = []
    for _ in range(5):
        start = time.perf_counter()
        np.copyto(target, source)
        times.append(time.perf_counter() - start)
    return 2 * source.nbytes / statistics.median(times) / 1e9


class Flusher:
    """Evicts caches by writing a buffer larger than the last-level cache."""

    def __init__(self) -> None:
        self.buffer = np.zeros(FLUSH_BYTES // 8)

    def __call__(self) -> None:
        self.buffer += 1.0


def time_cold(call: Callable[[], object], flush: Flusher, repeats: int) -> float:
    """Median ms of ``call`` with a cache flush before each (one warm-up call first)."""
    call()
    times = []
    for _ in range(repeats):
        flush()
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def _onnx_matmul(weight: np.ndarray, path: Path) -> Path:
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w_t"], ["y"])], "matmul",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", weight.shape[1]])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", weight.shape[0]])],
                              [numpy_helper.from_array(np.ascontiguousarray(weight.T), "w_t")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def onnx_runners(weight: np.ndarray, directory: Path, threads: int) -> dict[str, ort.InferenceSession]:
    fp32 = _onnx_matmul(weight, directory / "matmul.onnx")
    int8 = directory / "matmul.int8.onnx"
    logging.getLogger().setLevel(logging.ERROR)  # quantize_dynamic's advice to pre-process a single MatMul
    quantize_dynamic(str(fp32), str(int8), weight_type=QuantType.QInt8, per_channel=True)
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = threads
    return {name: ort.InferenceSession(str(p), options, providers=["CPUExecutionProvider"])
            for name, p in (("onnxruntime fp32", fp32), ("onnxruntime int8", int8))}


def tvm_function(call: KernelCall, k: int, target: tvm.target.Target) -> relax.VirtualMachine:
    """A VM whose ``main(x, *weights)`` runs the kernel; weights are arguments so they can be flushed."""
    batch, n = call.out_shape
    builder = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((batch, k), "float32"))
    weights = [relax.Var(f"w{i}", relax.TensorType(c.shape, str(c.dtype))) for i, c in enumerate(call.constants)]
    with builder.function("main", [x, *weights]):
        kernel = builder.add_func(call.func, call.name)
        with builder.dataflow():
            y = builder.emit(relax.call_tir(kernel, [x, *weights], relax.TensorType((batch, n), "float32")))
            out = builder.emit_output(y)
        builder.emit_func_output(out)
    return relax.VirtualMachine(tvm.compile(builder.get(), target=target), tvm.cpu())


def time_tvm(call: KernelCall, x: np.ndarray, target: tvm.target.Target, repeats: int) -> float:
    vm = tvm_function(call, x.shape[1], target)
    args = [tvm.runtime.tensor(x)] + [tvm.runtime.tensor(c) for c in call.constants]
    timer = vm.time_evaluator("main", tvm.cpu(), number=1, repeat=repeats, f_preproc="cache_flush_cpu_non_first_arg")
    return 1e3 * statistics.median(timer(*args).results)


def measure_case(size: int, sparsity: float, batch: int, layouts: list[str], threads: int, repeats: int,
                 bandwidth_gbs: float, flush: Flusher, rng: np.random.Generator) -> list[dict]:
    """Every backend for one (size, sparsity, batch); each sparse layout gets its own block pruning."""
    target = compile_target("host").target
    x = rng.standard_normal((batch, size)).astype(np.float32)
    dense_weight = block_pruned(size, sparsity, BlockShape(1, 1), rng)
    rows: list[dict] = []

    def add(backend: str, kind: str, latency: float, bytes_moved: int | None) -> None:
        bound = bytes_moved / (bandwidth_gbs * 1e6) if bytes_moved else None
        rows.append({"size": size, "sparsity": sparsity, "batch": batch, "backend": backend, "kind": kind,
                     "latency_ms": latency, "bytes_moved": bytes_moved, "bound_ms": bound,
                     "bound_fraction": bound / latency if bound else None})

    dense_bytes = 4 * size * size + 4 * batch * 2 * size
    w_t = np.ascontiguousarray(dense_weight.T)
    add("numpy", "dense fp32", time_cold(lambda: x @ w_t, flush, repeats), dense_bytes)
    tx, tw = torch.from_numpy(x), torch.from_numpy(dense_weight)
    with torch.no_grad():
        add("torch", "dense fp32", time_cold(lambda: torch.nn.functional.linear(tx, tw), flush, repeats), dense_bytes)
    with tempfile.TemporaryDirectory() as directory:
        for name, sess in onnx_runners(dense_weight, Path(directory), threads).items():
            add(name, "dense " + name.split()[-1], time_cold(lambda s=sess: s.run(None, {"x": x}), flush, repeats),
                dense_bytes if name.endswith("fp32") else size * size + 4 * size + 4 * batch * 2 * size)
    for dtype in ("fp32", "int8"):
        call = matmul_kernel(pack(dense_weight, "dense", dtype=dtype), batch)
        add("tvm dense", f"dense {dtype}", time_tvm(call, x, target, repeats), call.bytes_moved)
    for layout in layouts:
        fmt, block = SPARSE_LAYOUTS[layout]
        weight = block_pruned(size, sparsity, block, rng)
        for dtype in ("fp32", "int8"):
            packed: PackedWeight = pack(weight, fmt, block, dtype)
            call = matmul_kernel(packed, batch)
            add(f"tvm {layout}", f"sparse {dtype}", time_tvm(call, x, target, repeats), call.bytes_moved)
        if takes_int8_activations(packed) and target_has_vnni(target):
            call = vnni_matmul_call(packed, batch)
            add(f"tvm {layout} vnni", "sparse int8", time_tvm(call, x, target, repeats), call.bytes_moved)
    best_dense = {dtype: min(r["latency_ms"] for r in rows if r["kind"] == f"dense {dtype}" and r["backend"] != "tvm dense")
                  for dtype in ("fp32", "int8")}
    best_fp32_baseline = min(r["latency_ms"] for r in rows if r["kind"] == "dense fp32")
    for row in rows:
        row["speedup_vs_best_dense_fp32"] = best_fp32_baseline / row["latency_ms"]
        row["speedup_vs_best_dense_same_dtype"] = best_dense[row["kind"].split()[-1]] / row["latency_ms"]
    return rows


def measure(quick: bool = False, threads: int = 1, progress: bool = True) -> dict:
    sizes = [1760] if quick else [1760, 2560, 3072]
    sparsities = [0.9] if quick else [0.8, 0.9, 0.95]
    layouts = ["csr", "bsr16x1"] if quick else list(SPARSE_LAYOUTS)
    repeats = 15 if quick else 40
    rng = np.random.default_rng(0)
    torch.set_num_threads(threads)
    result = {"machine": machine_info(threads), "quick": quick, "cache": "cold", "repeats": repeats, "rows": []}
    with threadpool_limits(threads):
        result["bandwidth_gbs"] = memory_bandwidth_gbs()
        flush = Flusher()
        for size in sizes:
            for sparsity in sparsities:
                for batch in (1, 16):
                    if progress:
                        print(f"  {size}×{size}, {sparsity:.0%} sparse, batch {batch} …", flush=True)
                    result["rows"] += measure_case(size, sparsity, batch, layouts, threads, repeats,
                                                   result["bandwidth_gbs"], flush, rng)
    return result


def table_rows(result: dict) -> list[list[str]]:
    return [[f"{r['size']}", f"{r['sparsity']:.0%}", str(r["batch"]), r["backend"], r["kind"], f"{r['latency_ms']:.3f}",
             f"{r['speedup_vs_best_dense_fp32']:.1f}×", f"{r['speedup_vs_best_dense_same_dtype']:.1f}×",
             f"{r['bound_ms']:.3f}" if r["bound_ms"] else "-",
             f"{r['bound_fraction']:.0%}" if r["bound_fraction"] else "-"] for r in result["rows"]]


HEADER = ["N", "sparsity", "batch", "backend", "kind", "ms", "vs best dense fp32", "vs best dense same dtype",
          "bytes bound ms", "bound reached"]


def to_markdown(result: dict) -> str:
    m = result["machine"]
    lines = ["# Sparse vs dense kernels (cold cache)", "",
             f"{m['cpu']}, {m['threads']} thread(s), TVM {m['tvm']}, ONNX Runtime {m['onnxruntime']}, torch {m['torch']}; "
             f"memory bandwidth {result['bandwidth_gbs']:.1f} GB/s; medians of {result['repeats']} calls. "
             "'Best dense' is the fastest of numpy, torch and ONNX Runtime at the same thread count "
             "(same dtype: ONNX Runtime int8 for int8).", "",
             "| " + " | ".join(HEADER) + " |", "|" + " --- |" * len(HEADER)]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(result)]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = sorted({(r["size"], r["sparsity"], r["batch"]) for r in result["rows"]})
    backends = [b for b in dict.fromkeys(f"{r['backend']} {r['kind'].split()[-1]}" for r in result["rows"])]
    fig, ax = plt.subplots(figsize=(max(8, 1.2 * len(cases)), 5))
    width = 0.8 / len(backends)
    for i, backend in enumerate(backends):
        values = [next((r["speedup_vs_best_dense_fp32"] for r in result["rows"]
                        if (r["size"], r["sparsity"], r["batch"]) == case and f"{r['backend']} {r['kind'].split()[-1]}" == backend), 0)
                  for case in cases]
        ax.bar(np.arange(len(cases)) + i * width, values, width, label=backend)
    ax.set_xticks(np.arange(len(cases)) + 0.4, [f"{s}², {p:.0%}, b{b}" for s, p, b in cases], rotation=30, ha="right")
    ax.set_yscale("log")
    ax.set_ylabel("speedup over the best dense fp32 baseline (log)")
    ax.axhline(1, color="black", linewidth=0.8)
    ax.legend(fontsize=7, ncol=3)
    ax.set_title("Sparse vs dense matmul, cold cache")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1760² at 90 %%, CSR and BSR 16×1 only (about a minute)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)
    result = measure(args.quick, args.threads)
    stem = args.out / ("tvm_kernels-quick" if args.quick else "tvm_kernels")
    write_results(result, stem, to_markdown, plot, HEADER, table_rows(result))
    return result


if __name__ == "__main__":
    main()
