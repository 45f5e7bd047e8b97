"""The report of a run: ``report.json`` (schema below), ``report.md``, PNG plots and a terminal summary.

``report.json`` (schema 1) — every number measured in the run that wrote it:

- ``recipe``: the recipe after command-line overrides; ``inputs``: example input shapes;
  ``task`` / ``metric``: the task and its first metric (``cer``, ``accuracy``, ``bpc``…);
- ``prune``: ``method``, ``sparsity_asked``, ``sparsity_reached`` (pruned / prunable weights),
  ``block``, ``steps``, ``seconds``, ``losses`` (sampled), ``layers`` (per weight: ``name``,
  ``shape``, ``pruned``, ``total``, ``block``, ``blocks_pruned``, ``blocks_total``),
  ``left_dense`` (layers with a weight matrix the method does not prune: name → type).
  Structured (``method = "taylor"``): ``sparsity_reached`` is the fraction of the parameters (or
  FLOPs, ``target``) removed; ``params_fraction``, ``flops_fraction``, ``units_fraction`` left;
  ``criterion``, ``units_per_round``, ``rounds``, ``target_reached``, ``curve`` (step, params,
  flops, units), ``layers`` (per layer: ``name``, ``kind``, ``pruned`` and ``total`` units),
  ``left_alone`` (structure → reason);
- ``input_fp32_bytes``: the input model's fp32 state_dict (differs from ``size.dense_fp32_bytes``
  when the model was shrunk);
- ``size``: :meth:`compressor.size.SizeReport.as_dict` of the packed model (per layer: format,
  block, dtype, nnz, stored bytes of each array; ``dense_fp32_bytes``, ``total_bytes``,
  ``compression``); ``quant_errors``: per int8 layer;
- ``metrics``: ``{"pytorch dense" | "pytorch pruned" | "pytorch packed (stored weights)" |
  "onnx runtime": {metric: value, …, "seconds": …}}``;
- ``artifacts``: ``{"onnx" | "tvm <target>": {"path", "size_bytes", "parity_tolerance", …}}``;
  ``parity``: worst relative output error of each artifact against PyTorch (ONNX against the
  pruned fp32 model, TVM against the model with the stored weights); ``checks_passed``;
- ``latency_ms``: ``{batch: {backend: median ms}}`` (and ``device`` for an RPC device);
- ``timings_s`` per stage, ``total_seconds``, ``machine`` (CPU, cores, threads, versions).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from compressor.size import format_bytes
from compressor.texttable import format_table


def size_steps(report: dict[str, Any]) -> list[tuple[str, int]]:
    """The size waterfall: fp32 dense → stored fp32 / int8 packed → each artifact file."""
    size = report["size"]
    steps = [("fp32 dense (state_dict)", report.get("input_fp32_bytes", size["dense_fp32_bytes"]))]
    if structured(report):
        steps.append(("fp32 shrunk (state_dict)", size["dense_fp32_bytes"]))
    steps.append(("packed (stored arrays)", size["total_bytes"]))
    for name, artifact in report.get("artifacts", {}).items():
        if name == "onnx":
            for step, nbytes in artifact["sizes_by_step"].items():
                steps.append((f"onnx {step}", nbytes))
        else:
            steps.append((f"{name} library", artifact["size_bytes"]))
    return steps


def structured(report: dict[str, Any]) -> bool:
    """True when the model was shrunk by structured (Taylor) pruning."""
    return report["prune"].get("method") == "taylor"


def pruned_what(report: dict[str, Any]) -> str:
    """What ``sparsity_reached`` is a fraction of."""
    return f"the {report['prune'].get('target', 'params')} (whole units removed)" if structured(report) else \
        "the prunable weights"


def summary_rows(report: dict[str, Any]) -> list[list[str]]:
    metric = report.get("metric")
    rows = []
    for name, values in report.get("metrics", {}).items():
        rows.append(["metric", name, f"{values[metric]:.4g}" if metric in values else "-"])
    for name, nbytes in size_steps(report):
        rows.append(["size", name, format_bytes(nbytes)])
    for name, error in report.get("parity", {}).items():
        tolerance = report["artifacts"][name]["parity_tolerance"]
        rows.append(["parity", name, f"{error:.2e} (≤ {tolerance:.0e}: {'ok' if error <= tolerance else 'FAILED'})"])
    for batch, backends in report.get("latency_ms", {}).items():
        if batch == "device":
            rows.append(["latency", f"device {backends['address']}", f"{backends['tvm artifact']:.3f} ms"])
            continue
        for backend, ms in backends.items():
            rows.append(["latency", f"{backend}, batch {batch}", f"{ms:.3f} ms"])
    return rows


def format_summary(report: dict[str, Any]) -> str:
    prune = report["prune"]
    dense = report.get("input_fp32_bytes", report["size"]["dense_fp32_bytes"])
    head = (f"{prune['method']} pruning: {prune.get('sparsity_reached', 0.0):.1%} of {pruned_what(report)} "
            f"(asked {prune.get('sparsity_asked', 0.0):.0%}); stored {format_bytes(report['size']['total_bytes'])} "
            f"vs {format_bytes(dense)} fp32 dense ({dense / max(1, report['size']['total_bytes']):.1f}×); "
            f"{report['total_seconds']:.0f} s in all")
    return head + "\n" + format_table(["kind", "what", "value"], summary_rows(report))


def to_markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = ["# compress-and-export report", "",
             f"Machine: {m['cpu']}, {m['threads']} thread(s); torch {m['torch']}, ONNX Runtime {m['onnxruntime']}, "
             f"TVM {m['tvm']}. Every number below was measured by this run.", "",
             "```", format_summary(report), "```", "",
             "![size](size.png)", "![sparsity](sparsity.png)", "![accuracy](accuracy.png)", "![latency](latency.png)", "",
             *_left_dense_lines(report),
             *_structured_lines(report),
             "## Layers", "", "| weight | shape | sparsity | format | dtype | stored |", "| --- | --- | --- | --- | --- | --- |"]
    sparsity = {row["name"]: row["pruned"] / max(1, row["total"]) for row in report["prune"].get("layers", [])}
    for layer in report["size"]["layers"]:
        fmt = layer["format"] + (f" {layer['block']}" if layer["format"] == "bsr" else "")
        lines.append(f"| {layer['name']} | {tuple(layer['shape'])} | {sparsity.get(layer['name'], 0.0):.1%} | {fmt} | "
                     f"{layer['dtype']} | {format_bytes(layer['stored_bytes'])} |")
    return "\n".join(lines) + "\n"


def _left_dense_lines(report: dict[str, Any]) -> list[str]:
    left = report["prune"].get("left_dense", {})
    if not left:
        return []
    return [f"Left dense (layers {report['prune']['method']} pruning does not handle): "
            + ", ".join(f"{name} ({kind})" for name, kind in left.items()), ""]


def _structured_lines(report: dict[str, Any]) -> list[str]:
    """Units removed per layer and the structures left alone, for a shrunk model."""
    if not structured(report):
        return []
    prune = report["prune"]
    lines = ["## Units removed (Taylor, " + prune["criterion"] + ")", "",
             f"Parameters left {prune['params_fraction']:.1%}, FLOPs left {prune['flops_fraction']:.1%}, units left "
             f"{prune['units_fraction']:.1%} after {prune['rounds']} rounds of {prune['units_per_round']} units"
             + ("" if prune["target_reached"] else " — the target was not reached: give more steps"), "",
             "| layer | kind | removed / units |", "| --- | --- | --- |"]
    lines += [f"| {row['name']} | {row['kind']} | {row['pruned']} / {row['total']} |" for row in prune["layers"]]
    if prune["left_alone"]:
        lines += ["", "Left alone: " + "; ".join(f"{name} ({why})" for name, why in prune["left_alone"].items())]
    return lines + [""]


def plot_all(report: dict[str, Any], out: Path) -> list[Path]:
    """size.png (waterfall), sparsity.png (per layer), accuracy.png (metric vs sparsity) and
    latency.png (per backend); returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []

    def save(fig, name: str) -> None:
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        written.append(out / name)

    steps = size_steps(report)
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.barh([s for s, _ in steps][::-1], [b / 1e6 for _, b in steps][::-1], color="tab:blue")
    ax.set_xlabel("MB")
    ax.set_title("Size at every stage")
    save(fig, "size.png")

    layers = report["prune"].get("layers", [])
    fig, ax = plt.subplots(figsize=(8, max(3, 0.3 * len(layers))))
    ax.barh([row["name"] for row in layers][::-1], [row["pruned"] / max(1, row["total"]) for row in layers][::-1],
            color="tab:green")
    ax.set_xlim(0, 1)
    ax.set_xlabel("fraction of units removed" if structured(report) else "sparsity")
    ax.set_title("Per-layer units removed" if structured(report) else "Per-layer sparsity")
    save(fig, "sparsity.png")

    metric, metrics = report.get("metric"), report.get("metrics", {})
    fig, ax = plt.subplots(figsize=(6, 4))
    reached = report["prune"].get("sparsity_reached", 0.0)
    for name, values in metrics.items():
        if metric in values:
            ax.scatter([0.0 if name == "pytorch dense" else reached], [values[metric]], label=name, s=50)
    ax.set_xlabel(f"fraction of {pruned_what(report)}")
    ax.set_ylabel(metric or "metric")
    ax.set_title("Task metric against sparsity")
    if metrics:
        ax.legend(fontsize=8)
    save(fig, "accuracy.png")

    latency = {b: v for b, v in report.get("latency_ms", {}).items() if b != "device"}
    fig, ax = plt.subplots(figsize=(8, 4))
    backends = sorted({k for row in latency.values() for k in row})
    width = 0.8 / max(1, len(latency))
    for i, (batch, row) in enumerate(latency.items()):
        ax.bar([j + i * width for j in range(len(backends))], [row.get(b, 0.0) for b in backends], width,
               label=f"batch {batch}")
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(backends))], backends, rotation=20, ha="right")
    ax.set_ylabel("median ms")
    ax.set_title("Latency per backend")
    ax.legend()
    save(fig, "latency.png")
    return written


def write_report(report: dict[str, Any], out: Path) -> None:
    """``report.md`` and the plots (``report.json`` is written by the caller)."""
    report["plots"] = [p.name for p in plot_all(report, out)]
    (out / "report.md").write_text(to_markdown(report))
