"""Size of the paper-size Deep Speech 2 model in every storage format at 80 / 90 / 95 % sparsity.

    python -m bench.sizes [--out bench/results] [--sparsity 0.8 0.9 0.95] [--no-artifacts] [--threads 1]

The model is ``build_model("ds2")`` (67.7 M parameters, 270.8 MB fp32; Narang et al. 2017
report 268 MB dense and ~32 MB at ~90 % sparsity).  Every Linear weight (recurrent input and
hidden-to-hidden, FC, output) is magnitude-pruned one-shot to the sparsity — element-wise for
CSR / COO / bit-mask, in blocks for BSR — and packed; the two convolutions (0.25 M parameters)
stay dense fp32.  Sizes come from :func:`compressor.size.size_report`: bytes of the stored
arrays.  Size depends only on the sparsity pattern and the dtypes, not on trained values, so a
freshly initialized model gives the same numbers as a trained one with the same pattern.

Artifacts (``"artifacts"`` in the JSON; ``--no-artifacts`` skips them): at 90 % the same pruned
models are also written as the files the CLI writes, with the CLI's own functions, and their
bytes and export seconds recorded —

* ONNX (:func:`pipeline.stages.export_onnx_artifact`): fp32 export → int8 (``quantize_int8``,
  MatMul / Gemm / LSTM; GRUs lowered first) → weights compressed at rest (``compress_file``), once
  for the element-wise (1×1) and once for the 16×1-block pruned model.  The shared-input recurrent
  layer of DS2 is a Python time loop that the TorchScript exporter unrolls, so the ONNX graph has a
  fixed time length (that of the example, ``ARTIFACT_FRAMES`` frames); its weights are stored once,
  and the nodes of the unrolled steps add a few kB per step.
* TVM host libraries (:func:`pipeline.stages.export_tvm_artifact`): BSR 16×1 int8 (16×1-block
  pruned) and CSR int8 (element-wise pruned), with a run-time time axis (the recurrences are loops,
  so the library does not grow with the utterance length).

The example is one utterance of ``ARTIFACT_FRAMES`` frames.  On 2 cores the artifacts add about
a minute and the process peaks at about 3.5 GB (``peak_rss_bytes``).

Writes ``sizes.json``, ``sizes.md`` and ``sizes.png`` to ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path

import torch
from tqdm import tqdm

from compressor import BlockShape, MagnitudePruner, OneShot, PruneGroup
from compressor.packed_model import PackingConfig, pack_model
from compressor.selection import LINEAR_TYPES
from compressor.size import SizeReport, format_bytes
from compressor.zoo import MODELS, DeepSpeech2, SharedInputBiRecurrent, build_model

PAPER_DENSE_MB = 268.0
PAPER_SPARSE_MB = 32.0
GOAL_BLOCK_INT8_MB = 12.0
ARTIFACT_SPARSITY = 0.9
ARTIFACT_FRAMES = 20  # one utterance; the sizes do not depend on it (the ONNX graph by a few kB per step)

def _linear(**kwargs) -> PackingConfig:
    """Pack the Linear weights only: the convolutions stay dense fp32 (counted as other tensors)."""
    return PackingConfig(types=LINEAR_TYPES, **kwargs)


# (label, pruning block, packing config); packing follows the pruning pattern
VARIANTS: list[tuple[str, BlockShape, PackingConfig]] = [
    ("masked dense fp32", BlockShape(1, 1), _linear(format="dense")),
    ("CSR fp32", BlockShape(1, 1), _linear(format="csr")),
    ("CSR int8", BlockShape(1, 1), _linear(format="csr", dtype="int8")),
    ("bit-mask fp32", BlockShape(1, 1), _linear(format="bitmask")),
    ("bit-mask int8", BlockShape(1, 1), _linear(format="bitmask", dtype="int8")),
    ("BSR 16x1 fp32", BlockShape(16, 1), _linear(format="bsr", block=BlockShape(16, 1))),
    ("BSR 16x1 int8", BlockShape(16, 1), _linear(format="bsr", block=BlockShape(16, 1), dtype="int8")),
    ("BSR 4x4 fp32", BlockShape(4, 4), _linear(format="bsr", block=BlockShape(4, 4))),
    ("BSR 4x4 int8", BlockShape(4, 4), _linear(format="bsr", block=BlockShape(4, 4), dtype="int8")),
]


def pruned_copy(model: torch.nn.Module, sparsity: float, block: BlockShape) -> torch.nn.Module:
    pruned = copy.deepcopy(model)
    pruner = MagnitudePruner([PruneGroup(OneShot(sparsity), types=LINEAR_TYPES, block=block)])
    pruner.prepare(pruned)
    pruner.step()
    return pruner.finalize()


def artifact_input(model_name: str, overrides: dict, frames: int = ARTIFACT_FRAMES) -> torch.Tensor:
    """One utterance ``[1, 1, n_freq, frames]`` for a Deep Speech 2 of the zoo (fixed seed)."""
    n_freq = {**getattr(MODELS[model_name], "keywords", {}), **overrides}.get("n_freq", 161)
    return torch.randn(1, 1, n_freq, frames, generator=torch.Generator().manual_seed(0))


def _unrolled(model: torch.nn.Module) -> bool:
    """True when TorchScript export unrolls the recurrences (DS2's shared-input layer)."""
    return any(isinstance(m, SharedInputBiRecurrent) for m in model.modules())


def measure_artifacts(pruned_by_block: dict[BlockShape, torch.nn.Module], example: torch.Tensor,
                      progress: bool = True) -> dict:
    """The ONNX artifact and the TVM host libraries of the pruned models (see the module docstring):
    bytes of each file and the seconds its export took."""
    from pipeline.stages import dynamic_axes_for, export_onnx_artifact, export_tvm_artifact, tvm_dynamic_axes

    variants = {label: (block, config) for label, block, config in VARIANTS}
    rows: dict[str, dict] = {}
    jobs = [("onnx int8 compressed, unstructured", BlockShape(1, 1), None),
            ("onnx int8 compressed, 16x1 blocks", BlockShape(16, 1), None),
            ("tvm bsr16x1 int8", *variants["BSR 16x1 int8"]), ("tvm csr int8", *variants["CSR int8"])]
    with tempfile.TemporaryDirectory(prefix="bench-sizes-") as tmp, \
            tqdm(jobs, desc="artifacts", disable=not progress) as bar:
        for i, (name, block, config) in enumerate(bar):
            bar.set_postfix_str(name)
            model, out = pruned_by_block[block], Path(tmp) / str(i)
            start = time.perf_counter()
            if config is None:
                unrolled = _unrolled(model)
                axes = None if unrolled else dynamic_axes_for("speech", 1)
                record = export_onnx_artifact(model, (example,), out, int8=True, dynamic_axes=axes)
                rows[name] = {"pruning": str(block), "size_bytes": record["size_bytes"],
                              "sizes_by_step": record["sizes_by_step"],
                              "compressed_tensors": record["compressed_tensors"],
                              "time_axis": f"fixed ({example.shape[-1]} frames: the time loop is unrolled)"
                              if unrolled else "dynamic", "seconds": time.perf_counter() - start}
            else:
                axes = tvm_dynamic_axes("speech", 1)
                record = export_tvm_artifact(pack_model(model, config), (example,), out, "host", axes)
                rows[name] = {"pruning": str(block), "packing": str(config.format) + " " + str(config.dtype),
                              "size_bytes": record["size_bytes"], "compile_seconds": record["compile_seconds"],
                              "kernels": len(record["kernels"]), "left_dense": record["left_dense"],
                              "time_axis": "dynamic", "seconds": time.perf_counter() - start}
            shutil.rmtree(out)  # keep the disk use to one artifact's files (the ONNX steps: about 0.6 GB)
    return rows


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux


def measure(sparsities: list[float], model_name: str = "ds2", seed: int = 0, progress: bool = True,
            artifacts: bool = True, overrides: dict | None = None, threads: int = 1,
            frames: int = ARTIFACT_FRAMES) -> dict:
    """Sizes of ``model_name`` (with ``overrides`` of its defaults) in every format of
    :data:`VARIANTS`; with ``artifacts``, also the ONNX / TVM files at :data:`ARTIFACT_SPARSITY`."""
    from bench.machine import machine_info

    threads_before = torch.get_num_threads()
    torch.set_num_threads(threads)
    os.environ["TVM_NUM_THREADS"] = str(threads)
    try:
        return _measure(sparsities, model_name, seed, progress, artifacts, dict(overrides or {}), threads, frames,
                        machine_info(threads))
    finally:
        torch.set_num_threads(threads_before)


def _measure(sparsities: list[float], model_name: str, seed: int, progress: bool, artifacts: bool, overrides: dict,
             threads: int, frames: int, machine: dict) -> dict:
    torch.manual_seed(seed)
    model = build_model(model_name, **overrides).eval()
    if artifacts and not isinstance(model, DeepSpeech2):
        raise ValueError(f"artifacts are written for Deep Speech 2 models only, not {model_name!r}: "
                         "give --no-artifacts")
    params = sum(p.numel() for p in model.parameters())
    dense = pack_model(model, PackingConfig(format="dense")).size_report()
    rows: dict[str, dict[str, dict]] = {}
    artifact_rows: dict | None = None
    started = time.perf_counter()
    with tqdm(total=len(sparsities) * len(VARIANTS), desc="pack", disable=not progress) as bar:
        for sparsity in sparsities:
            pruned_by_block: dict[BlockShape, torch.nn.Module] = {}
            for label, block, config in VARIANTS:
                if block not in pruned_by_block:
                    pruned_by_block[block] = pruned_copy(model, sparsity, block)
                report: SizeReport = pack_model(pruned_by_block[block], config).size_report()
                rows.setdefault(label, {})[f"{sparsity:g}"] = {
                    "total_bytes": report.total_bytes,
                    "packed_bytes": report.packed_bytes,
                    "other_bytes": report.other_bytes,
                    "compression": report.compression,
                }
                bar.update()
            if artifacts and abs(sparsity - ARTIFACT_SPARSITY) < 1e-9:
                artifact_rows = measure_artifacts(pruned_by_block, artifact_input(model_name, overrides, frames),
                                                  progress)
            del pruned_by_block
    if artifacts and artifact_rows is None:  # the artifact sparsity was not among the asked ones
        pruned = {block: pruned_copy(model, ARTIFACT_SPARSITY, block) for block in (BlockShape(1, 1), BlockShape(16, 1))}
        artifact_rows = measure_artifacts(pruned, artifact_input(model_name, overrides, frames), progress)
        del pruned
    result = {
        "model": model_name,
        "model_overrides": overrides,
        "parameters": params,
        "dense_fp32_bytes": dense.total_bytes,
        "sparsities": [f"{s:g}" for s in sparsities],
        "variants": rows,
        "paper": {"dense_MB": PAPER_DENSE_MB, "sparse_MB_at_about_90pct": PAPER_SPARSE_MB},
        "goal": {"block_sparse_int8_MB_at_90pct": GOAL_BLOCK_INT8_MB},
        "machine": machine,
        "seconds": time.perf_counter() - started,
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    if artifact_rows is not None:
        result["artifacts"] = {
            "sparsity": f"{ARTIFACT_SPARSITY:g}",
            "input_shape": list(artifact_input(model_name, overrides, frames).shape),
            "hidden": model.rnns[0].hidden_size, "layers": len(model.rnns),
            "pruning": "one-shot magnitude pruning of every Linear weight (no fine-tuning, untrained weights): "
                       "element-wise (1x1) or in 16x1 blocks",
            "rows": artifact_rows,
            "peak_rss_bytes": _peak_rss_bytes(),
        }
    return result


def to_markdown(result: dict) -> str:
    sparsities = result["sparsities"]
    lines = [
        "# Deep Speech 2 size by storage format",
        "",
        f"Model `{result['model']}`: {result['parameters']:,} parameters, fp32 dense "
        f"{format_bytes(result['dense_fp32_bytes'])} (paper: {PAPER_DENSE_MB:.0f} MB). All Linear weights pruned "
        "one-shot by magnitude (element-wise, or in the BSR block); convolutions dense fp32. "
        "Bytes of stored arrays, from `compressor.size.size_report`; regenerate with `python -m bench.sizes`.",
        "",
        "| format | " + " | ".join(f"{float(s):.0%} sparse" for s in sparsities) + " |",
        "| --- | " + " | ".join("---" for _ in sparsities) + " |",
        "| fp32 dense (unpruned) | " + " | ".join(format_bytes(result["dense_fp32_bytes"]) for _ in sparsities) + " |",
    ]
    for label, by_sparsity in result["variants"].items():
        cells = [f"{format_bytes(by_sparsity[s]['total_bytes'])} ({by_sparsity[s]['compression']:.1f}x)"
                 for s in sparsities]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", f"Paper (Narang et al. 2017, its own column): {PAPER_DENSE_MB:.0f} MB dense → ~{PAPER_SPARSE_MB:.0f} MB "
              f"at ~90 % sparsity. Goal here: ≤ {GOAL_BLOCK_INT8_MB:.0f} MB for block-sparse int8 at 90 %."]
    if "artifacts" in result:
        lines += [""] + artifacts_markdown(result["artifacts"])
    return "\n".join(lines) + "\n"


def artifacts_markdown(artifacts: dict) -> list[str]:
    lines = [f"## Artifacts at {float(artifacts['sparsity']):.0%} sparsity", "",
             (f"Files written by the CLI's export functions (hidden {artifacts['hidden']}, {artifacts['layers']} "
              f"recurrent layers; example input {'×'.join(map(str, artifacts['input_shape']))}); "
              f"{artifacts['pruning']}. Process peak memory {format_bytes(artifacts['peak_rss_bytes'])}."), "",
             "| artifact | pruning | steps | size | export s |", "| --- | --- | --- | --- | --- |"]
    for name, row in artifacts["rows"].items():
        steps = " → ".join(f"{step} {format_bytes(n)}" for step, n in row.get("sizes_by_step", {}).items())
        lines.append(f"| {name} | {row['pruning']} | {steps or row.get('packing', '')} | "
                     f"{format_bytes(row['size_bytes'])} | {row['seconds']:.1f} |")
    return lines


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sparsity = "0.9" if "0.9" in result["sparsities"] else result["sparsities"][0]
    labels = ["fp32 dense"] + list(result["variants"])
    values = [result["dense_fp32_bytes"] / 1e6] + [v[sparsity]["total_bytes"] / 1e6 for v in result["variants"].values()]
    colors = ["tab:blue"] * len(labels)
    if result.get("artifacts", {}).get("sparsity") == sparsity:  # the files, in another colour
        rows = result["artifacts"]["rows"]
        labels += [f"file: {name}" for name in rows]
        values += [row["size_bytes"] / 1e6 for row in rows.values()]
        colors += ["tab:orange"] * len(rows)
    fig, ax = plt.subplots(figsize=(8, 4.5 + 0.25 * (len(labels) - 10)))
    bars = ax.barh(labels[::-1], values[::-1], color=colors[::-1])
    ax.axvline(PAPER_SPARSE_MB, color="tab:red", linestyle="--", label=f"paper, ~90 % sparse ({PAPER_SPARSE_MB:.0f} MB)")
    ax.axvline(GOAL_BLOCK_INT8_MB, color="tab:green", linestyle=":", label=f"goal, block int8 ({GOAL_BLOCK_INT8_MB:.0f} MB)")
    ax.bar_label(bars, fmt="%.1f MB", padding=3, fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("stored size (MB, log scale)")
    ax.set_title(f"Deep Speech 2 ({result['parameters'] / 1e6:.1f} M parameters) at {float(sparsity):.0%} sparsity")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--sparsity", type=float, nargs="+", default=[0.8, 0.9, 0.95])
    parser.add_argument("--model", default="ds2", help="zoo model (default: the paper-size ds2)")
    parser.add_argument("--hidden", type=int, help="override the model's recurrent width")
    parser.add_argument("--layers", type=int, help="override the model's number of recurrent layers")
    parser.add_argument("--no-artifacts", action="store_true", help="skip the ONNX / TVM files (about a minute)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    overrides = {key: value for key, value in (("hidden", args.hidden), ("layers", args.layers)) if value is not None}
    result = measure(args.sparsity, args.model, artifacts=not args.no_artifacts, overrides=overrides,
                     threads=args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "sizes.json").write_text(json.dumps(result, indent=2) + "\n")
    markdown = to_markdown(result)
    (args.out / "sizes.md").write_text(markdown)
    plot(result, args.out / "sizes.png")
    print(markdown)


if __name__ == "__main__":
    main()
