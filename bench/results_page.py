"""The results page: ``docs/results.md`` and ``docs/results.json`` from the benchmarks' JSON.

    python -m bench --page-only [--quick] [--results bench/results] [--docs docs]

Reads ``<results>/<stem>.json`` of the chosen size (``<stem>-quick`` for ``--quick``, else the full
``<stem>``), falling back to the other size when one is missing (said so on the page, per
section).  Every number of ours in a table is read from those files; the papers' numbers come from
:mod:`bench.papers` and appear only in columns whose header starts with "paper".  What the issue
asks for and no JSON holds is listed under "Not measured" in each section.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

from bench.machine import machine_info
from bench.papers import PAPERS
from compressor.size import format_bytes

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
DOCS = ROOT / "docs"
ACCURACY_TASKS = ("speech-digits", "speech-sentences")
KERNEL_GRID = {"size": (1760, 2560, 3072), "sparsity": (0.8, 0.9, 0.95), "batch": (1, 16)}  # the paper's table
KERNEL_BACKENDS = ("torch dense fp32", "onnxruntime fp32 dense fp32", "onnxruntime int8 dense int8",
                   "tvm dense dense fp32", "tvm dense dense int8", "tvm csr sparse fp32", "tvm csr sparse int8",
                   "tvm bsr* sparse fp32", "tvm bsr* sparse int8")
MACHINE_FIELDS = ("cpu", "cores", "threads", "python", "torch", "numpy", "onnx", "onnxruntime", "tvm")
MACHINE_REQUIRED = ("cpu", "cores", "threads", "python", "torch")


# ---------------------------------------------------------------------- formatting
def pct0(x: float) -> str:
    return f"{x:.0%}"


def pct2(x: float) -> str:
    return f"{x:.2%}"


def ms(x: float) -> str:
    return f"{x:.3f}"


def times(x: float) -> str:
    return f"{x:.2f}×"


def corr(x: float) -> str:
    return f"{x:.3f}"


def count(n: float) -> str:
    return f"{n:,.0f}"


# ---------------------------------------------------------------------- page model
@dataclass
class Column:
    """A table column: the row key it shows, its header and how a value is written."""

    key: str
    header: str
    fmt: Callable[[Any], str] = str


@dataclass
class Table:
    """Rows of raw values (as in the JSON), shown through ``columns``."""

    key: str
    caption: str
    columns: list[Column]
    rows: list[dict]

    def markdown(self) -> list[str]:
        def cell(row: dict, column: Column) -> str:
            value = row.get(column.key)
            return "–" if value is None else column.fmt(value).replace("|", "\\|")

        lines = [f"**{self.caption}**", "", "| " + " | ".join(c.header for c in self.columns) + " |",
                 "|" + " --- |" * len(self.columns)]
        return lines + ["| " + " | ".join(cell(r, c) for c in self.columns) + " |" for r in self.rows]

    def to_json(self) -> dict:
        return {"caption": self.caption, "columns": {c.key: c.header for c in self.columns}, "rows": self.rows}


@dataclass
class Source:
    """One benchmark's JSON as read for the page: the stem wanted, the stem read (None: none)."""

    wanted: str
    stem: str | None = None
    data: dict | None = None

    @property
    def fallback(self) -> bool:
        return self.stem is not None and self.stem != self.wanted


@dataclass
class Section:
    """One section of the page: its sources, tables and the numbers no JSON holds."""

    key: str
    title: str
    intro: str
    sources: list[Source]
    tables: list[Table] = field(default_factory=list)
    not_measured: list[str] = field(default_factory=list)


def load(results: Path, name: str, quick: bool, sized: bool = True) -> Source:
    """The JSON of benchmark ``name`` at the chosen size, else at the other size (a fallback)."""
    stems = ([f"{name}-quick", name] if quick else [name, f"{name}-quick"]) if sized else [name]
    for stem in stems:
        path = results / f"{stem}.json"
        if path.exists():
            return Source(stems[0], stem, json.loads(path.read_text()))
    return Source(stems[0])


PAPER_COLUMNS = [Column("paper", "paper: their number"), Column("paper_source", "paper: source")]


def vs_paper(row: dict, paper: str | None) -> dict:
    """``row`` with the paper's number ``PAPERS[paper]`` (or none) in the paper columns."""
    quote = PAPERS.get(paper or "")
    return {**row, "paper": quote and quote["value"], "paper_source": quote and quote["source"]}


# ---------------------------------------------------------------------- 1. size
ARTIFACT_KINDS = ("onnx", "tvm")  # the issue asks for both files of the pruned paper-size DS2


def size_section(results: Path, quick: bool) -> Section:
    sizes, e2e = load(results, "sizes", quick, sized=False), load(results, "end_to_end", quick)
    section = Section("size", "Size: the paper-size Deep Speech 2, stage by stage",
                      "The paper-size DS2 (`bench.sizes`) packed in every format at each sparsity (Linear weights "
                      "pruned one-shot by magnitude; bytes of the stored arrays), the files the CLI writes for it "
                      "at 90 % (ONNX fp32 → int8 → compressed at rest; TVM host libraries; `bench.sizes`), and "
                      "the ONNX and TVM artifacts of `bench.end_to_end`.", [sizes])
    if sizes.data is None:
        section.not_measured.append(f"every size: no `{sizes.wanted}.json` (run `python -m bench.sizes`)")
        return section
    section.tables += [formats_table(sizes.data), size_vs_paper(sizes.data, section)]
    artifacts = sizes.data.get("artifacts")
    if artifacts:
        section.tables.append(size_artifacts_table(sizes.data))
    missing = [kind for kind in ARTIFACT_KINDS
               if not any(name.startswith(kind) for name in (artifacts or {}).get("rows", {}))]
    if missing:
        what = " and ".join({"onnx": "ONNX artifact", "tvm": "TVM library"}[k] for k in missing)
        section.not_measured.append(f"{what} of the *pruned* paper-size DS2: `{sizes.stem}.json` holds no such file "
                                    "(run `python -m bench.sizes` without `--no-artifacts`)")
    elif sizes.data.get("model_overrides"):
        section.not_measured.append(f"files of the paper-size DS2: `{sizes.stem}.json` measured `{sizes.data['model']}` "
                                    f"with {sizes.data['model_overrides']} (run `python -m bench.sizes` without "
                                    "`--hidden` / `--layers`)")
    model = paper_size_model(e2e, sizes.data["parameters"])
    if model is None:
        if missing:  # else bench.sizes holds the paper-size files already
            section.not_measured.append(
                f"ONNX artifact and TVM library of the paper-size DS2: `{e2e.stem or e2e.wanted}.json` holds no model "
                f"of {sizes.data['parameters']:,} parameters (run `python -m bench.end_to_end` without `--quick`)")
        return section
    section.sources.append(e2e)
    section.tables.append(artifacts_table(model))
    return section


def size_artifacts_table(d: dict) -> Table:
    a = d["artifacts"]
    rows = [{"artifact": name, "pruning": row["pruning"], **{f"step {k}": v for k, v in row.get("sizes_by_step", {}).items()},
             "bytes": row["size_bytes"], "ratio": d["dense_fp32_bytes"] / row["size_bytes"], "seconds": row["seconds"],
             "time_axis": row.get("time_axis")} for name, row in a["rows"].items()]
    steps = list(dict.fromkeys(k for row in a["rows"].values() for k in row.get("sizes_by_step", {})))
    columns = [Column("artifact", "artifact"), Column("pruning", "pruning block"),
               *(Column(f"step {k}", f"ONNX {k}", format_bytes) for k in steps),
               Column("bytes", "file", format_bytes), Column("ratio", "× smaller than fp32 dense", times),
               Column("seconds", "export s", lambda x: f"{x:.1f}"), Column("time_axis", "time axis")]
    width = f"hidden {a['hidden']}, {a['layers']} recurrent layers" if a.get("hidden") else ""
    return Table("files", f"Files of `{d['model']}` ({width}) at {pct0(float(a['sparsity']))} sparsity, written by the "
                 f"CLI's export functions (`bench.sizes`; example input {'×'.join(map(str, a['input_shape']))}; "
                 f"{a['pruning']}; peak memory of the run {format_bytes(a['peak_rss_bytes'])})", columns, rows)


def formats_table(d: dict) -> Table:
    columns = [Column("format", "format")]
    for s in d["sparsities"]:
        columns += [Column(f"{s} bytes", f"{pct0(float(s))} sparse", format_bytes),
                    Column(f"{s} compression", f"{pct0(float(s))}: × smaller", times)]
    rows = [{"format": "fp32 dense (unpruned)", **{f"{s} bytes": d["dense_fp32_bytes"] for s in d["sparsities"]}}]
    rows += [{"format": label, **{f"{s} bytes": v[s]["total_bytes"] for s in d["sparsities"]},
              **{f"{s} compression": v[s]["compression"] for s in d["sparsities"]}}
             for label, v in d["variants"].items()]
    return Table("formats", f"`{d['model']}` ({d['parameters']:,} parameters) by storage format", columns, rows)


def size_vs_paper(d: dict, section: Section) -> Table:
    rows = [vs_paper({"what": "dense fp32", "ours": format_bytes(d["dense_fp32_bytes"]),
                      "ours_bytes": d["dense_fp32_bytes"]}, "ds2_dense_size")]
    if "0.9" not in d["sparsities"]:
        section.not_measured.append("sizes at 90 % sparsity (the paper's sparse model): not in `sizes.json`")
    else:
        at_90 = {label: v["0.9"]["total_bytes"] for label, v in d["variants"].items()}
        rows += [vs_paper({"what": f"90 % sparse, {label}", "ours": format_bytes(n), "ours_bytes": n},
                          "ds2_sparse_size" if label == "CSR fp32" else None) for label, n in at_90.items()]
    return Table("vs_paper", "Next to the paper (the paper's sparse model: values and indices in fp32, as CSR fp32)",
                 [Column("what", "DS2"), Column("ours", "ours (this run)"), *PAPER_COLUMNS], rows)


def paper_size_model(e2e: Source, parameters: int) -> dict | None:
    """The end-to-end benchmark's model with the paper-size DS2's parameter count, if it ran one."""
    models = e2e.data["models"] if e2e.data else []
    return next((m for m in models if m["parameters"] == parameters), None)


def artifacts_table(model: dict) -> Table:
    rows = [{"artifact": name, "bytes": entry["size_bytes"]} for name, entry in model["rows"].items()]
    return Table("artifacts", f"Artifacts of `{model['model']}` (`bench.end_to_end`: dense rows unpruned; sparse rows "
                 f"{pct0(model['sparsity'])} in {model['block']} blocks, one-shot)",
                 [Column("artifact", "artifact"), Column("bytes", "size", format_bytes)], rows)


# ---------------------------------------------------------------------- 2. kernels
KERNEL_COLUMNS = [Column("size", "N"), Column("sparsity", "sparsity", pct0), Column("batch", "batch"),
                  Column("backend", "backend"), Column("kind", "kind"), Column("latency_ms", "ms", ms),
                  Column("speedup_vs_best_dense_fp32", "× vs best dense fp32", times),
                  Column("speedup_vs_best_dense_same_dtype", "× vs best dense, same dtype", times),
                  Column("bytes_moved", "bytes moved", format_bytes),
                  Column("bound_ms", "bytes-moved bound ms", ms), Column("bound_fraction", "bound reached", pct0)]


def kernels_section(results: Path, quick: bool) -> Section:
    kernels = load(results, "tvm_kernels", quick)
    section = Section("kernels", "Kernels: sparse vs dense, every backend",
                      "`y = x·Wᵀ` for an N×N weight, cold cache, every backend at the same thread count "
                      "(`bench.tvm_kernels`). The bytes-moved bound is the bytes a kernel must read and write over "
                      "the memory bandwidth measured in the same run.", [kernels])
    if kernels.data is None:
        section.not_measured.append(f"every kernel: no `{kernels.wanted}.json` (run `python -m bench.tvm_kernels`)")
        return section
    rows = kernels.data["rows"]
    section.tables += [Table("kernels", f"Every kernel (memory bandwidth {kernels.data['bandwidth_gbs']:.1f} GB/s, "
                                        f"medians of {kernels.data['repeats']} calls)", KERNEL_COLUMNS, rows),
                       kernels_vs_paper(rows)]
    section.not_measured += kernel_gaps(rows, kernels.stem)
    return section


def best(rows: list[dict], kind: str, key: str) -> dict:
    """The row of ``kind`` with the largest ``key`` (a speedup)."""
    return max((r for r in rows if r["kind"] == kind), key=lambda r: r[key])


def kernels_vs_paper(rows: list[dict]) -> Table:
    table = []
    for case in dict.fromkeys((r["size"], r["sparsity"], r["batch"]) for r in rows):
        here = [r for r in rows if (r["size"], r["sparsity"], r["batch"]) == case]
        dense = min((r for r in here if r["kind"] == "dense fp32"), key=lambda r: r["latency_ms"])
        fp32 = best(here, "sparse fp32", "speedup_vs_best_dense_fp32")
        int8 = best(here, "sparse int8", "speedup_vs_best_dense_same_dtype")
        table.append(vs_paper({"size": case[0], "sparsity": case[1], "batch": case[2],
                               "dense": dense["backend"], "dense_ms": dense["latency_ms"],
                               "fp32": fp32["backend"], "fp32_ms": fp32["latency_ms"],
                               "fp32_speedup": fp32["speedup_vs_best_dense_fp32"],
                               "int8": int8["backend"], "int8_ms": int8["latency_ms"],
                               "int8_speedup": int8["speedup_vs_best_dense_same_dtype"]},
                              "sparse_gemv_speedup" if case[2] == 1 else None))
    columns = [Column("size", "N"), Column("sparsity", "sparsity", pct0), Column("batch", "batch"),
               Column("dense", "best dense fp32"), Column("dense_ms", "ms", ms),
               Column("fp32", "best sparse fp32"), Column("fp32_ms", "ms", ms),
               Column("fp32_speedup", "× vs best dense fp32 (ours)", times),
               Column("int8", "best sparse int8"), Column("int8_ms", "ms", ms),
               Column("int8_speedup", "× vs best dense int8 (ours)", times), *PAPER_COLUMNS]
    return Table("vs_paper", "Next to the paper: the best sparse kernel against the best dense one of its dtype",
                 columns, table)


def kernel_gaps(rows: list[dict], stem: str) -> list[str]:
    """The paper's layer sizes, sparsities, batches and the shipped backends this run lacks."""
    gaps = [f"{key} {', '.join(pct0(v) if key == 'sparsity' else str(v) for v in missing)}: not in `{stem}.json`"
            for key, wanted in KERNEL_GRID.items()
            if (missing := [v for v in wanted if v not in {r[key] for r in rows}])]
    labels = {f"{r['backend']} {r['kind']}" for r in rows}
    gaps += [f"backend `{pattern}`: not in `{stem}.json`" for pattern in KERNEL_BACKENDS
             if not any(fnmatch(label, pattern) for label in labels)]
    return gaps


# ---------------------------------------------------------------------- 3. end to end
def end_to_end_section(results: Path, quick: bool) -> Section:
    e2e, onnx = load(results, "end_to_end", quick), load(results, "onnx_latency", quick)
    section = Section("end_to_end", "End to end: whole models on every runtime",
                      "Whole models at batch 1 and 16, one process, same thread count (`bench.end_to_end`); "
                      "every ONNX artifact of a model in ONNX Runtime (`bench.onnx_latency`).", [e2e, onnx])
    if e2e.data is None:
        section.not_measured.append(f"whole models: no `{e2e.wanted}.json` (run `python -m bench.end_to_end`)")
    else:
        section.tables.append(end_to_end_table(e2e.data))
        if any(model.get("accuracy", {}).get("reference") for model in e2e.data["models"]):
            section.tables.append(end_to_end_reference_table(e2e.data))
        section.not_measured += end_to_end_gaps(e2e)
    if onnx.data is None:
        section.not_measured.append(f"ONNX artifacts: no `{onnx.wanted}.json` (run `python -m bench.onnx_latency`)")
    else:
        section.tables.append(onnx_table(onnx.data))
    return section


def batches_of(latency: dict) -> list[str]:
    return sorted(latency, key=int)


def on_task(model: dict, metrics: dict | None) -> dict:
    """The task metric of a row evaluated on the task (``bench.end_to_end``'s accuracy phase), else nothing."""
    if not metrics or "accuracy" not in model:
        return {}
    a = model["accuracy"]
    return {"metric": a["metric"], "on_task": metrics[a["metric"]], "examples": a["examples"]}


def end_to_end_table(d: dict) -> Table:
    rows = [{"model": model["model"], "backend": name, "size_bytes": entry["size_bytes"],
             **{f"ms b{b}": entry["latency_ms"][b] for b in batches_of(entry["latency_ms"])},
             **{f"{ref} b{b}": entry[f"speedup_vs_onnx_{ref}"][b] for ref in ("fp32", "int8")
                for b in batches_of(entry["latency_ms"])},
             **on_task(model, entry.get("accuracy"))}
            for model in d["models"] for name, entry in model["rows"].items()]
    batches = batches_of(next(iter(d["models"][0]["rows"].values()))["latency_ms"])
    columns = [Column("model", "model"), Column("backend", "backend"), Column("size_bytes", "size", format_bytes),
               *(Column(f"ms b{b}", f"ms, batch {b}", ms) for b in batches),
               *(Column(f"{ref} b{b}", f"× vs ORT {ref}, batch {b}", times) for ref in ("fp32", "int8")
                 for b in batches)]
    if any("on_task" in row for row in rows):
        columns += [Column("metric", "task metric"), Column("on_task", "on the task", pct2),
                    Column("examples", "test examples")]
    sparse = d["models"][0]
    how = (f"trained models pruned gradually while fine-tuned for {d['finetune_steps']} steps, untrained ones in one "
           "shot" if "finetune_steps" in d else "one-shot, no fine-tuning")
    return Table("end_to_end", f"Whole models (sparse: {pct0(sparse['sparsity'])} in {sparse['block']} blocks, "
                 f"{how}; speedups over ONNX Runtime on the dense model; task metric on the first "
                 "examples of the test split, evaluated after the timings)", columns, rows)


def end_to_end_reference_table(d: dict) -> Table:
    rows = [{"model": model["model"], "reference": name, **on_task(model, metrics),
             "pruning": model["accuracy"].get("pruning")}
            for model in d["models"] if "accuracy" in model
            for name, metrics in model["accuracy"].get("reference", {}).items()]
    return Table("end_to_end_reference", "Task metric of the pruned models in PyTorch (the reference of the sparse "
                 "rows above)", [Column("model", "model"), Column("reference", "model as run"),
                                 Column("metric", "task metric"), Column("on_task", "on the task", pct2),
                                 Column("examples", "test examples"), Column("pruning", "pruning")], rows)


def end_to_end_gaps(e2e: Source) -> list[str]:
    gaps = []
    models = e2e.data["models"]
    if e2e.data["quick"]:
        gaps.append(f"the paper-size DS2 end to end: the quick run measures `{models[0]['model']}` "
                    "(run `python -m bench.end_to_end`)")
    if not any("accuracy" in entry for model in models for entry in model["rows"].values()):
        gaps.append(f"accuracy on the task of each backend (CER of ds2-mini, accuracy of ResNet-8): "
                    f"`{e2e.stem}.json` records latency and size only")
    else:
        gaps += [f"accuracy on the task of `{model['model']}`: no trained checkpoint (latency and size only)"
                 for model in models if not any("accuracy" in entry for entry in model["rows"].values())]
    return gaps


def onnx_table(d: dict) -> Table:
    rows = [{"model": name, "variant": variant, "size_bytes": v["size_bytes"], "size_ratio": v["size_ratio"],
             "session_ms": v["session_ms"], "relative_error": v["relative_error"],
             **{f"ms b{b}": v["latency"][str(b)]["median_ms"] for b in d["batches"]},
             **{f"speedup b{b}": v["speedup"][str(b)] for b in d["batches"]}}
            for name, model in d["models"].items() for variant, v in model["variants"].items()]
    columns = [Column("model", "model"), Column("variant", "variant"), Column("size_bytes", "file", format_bytes),
               Column("size_ratio", "× smaller", times), Column("session_ms", "session ms", ms),
               *(c for b in d["batches"] for c in (Column(f"ms b{b}", f"ms, batch {b}", ms),
                                                   Column(f"speedup b{b}", f"× vs fp32 dense, batch {b}", times))),
               Column("relative_error", "rel. error", lambda x: f"{x:.1e}")]
    return Table("onnx_runtime", f"ONNX Runtime, every artifact ({pct0(d['sparsity'])} one-shot pruning; "
                 "ratios against the unpruned fp32 file)", columns, rows)


# ---------------------------------------------------------------------- 4. accuracy
def accuracy_section(results: Path, quick: bool) -> Section:
    speech = [load(results, f"accuracy-{task}", quick) for task in ACCURACY_TASKS]
    taylor = load(results, "taylor", quick)
    section = Section("accuracy", "Accuracy: the pruning experiments",
                      "The experiments of Narang et al. 2017 on the offline speech tasks (`bench.accuracy`: "
                      "gradual vs hard, block vs unstructured, large sparse vs small dense; CER mean and standard "
                      "deviation over seeds) and of Molchanov et al. 2019 (`bench.taylor`: criteria vs the oracle, "
                      "Taylor FO vs weight magnitude vs random).", [*speech, taylor])
    for task, source in zip(ACCURACY_TASKS, speech):
        if source.data is None:
            section.not_measured.append(f"`{source.wanted}.json` is missing (run `python -m bench.accuracy "
                                        f"--task {task.removeprefix('speech-')}`)")
        else:
            section.tables += narang_tables(source.data, section)
    if taylor.data is None:
        section.not_measured.append(f"Taylor experiments: no `{taylor.wanted}.json` (run `python -m bench.taylor`)")
    else:
        section.tables += [t for task in ("images", "speech") if task in taylor.data
                           for t in taylor_tables(task, taylor.data[task])]
    return section


def summary(s: dict) -> dict:
    return {"cer": s["cer_mean"], "cer_std": s["cer_std"], "wer": s["wer_mean"], "seeds": len(s["runs"])}


CER_COLUMNS = [Column("cer", "CER", pct2), Column("cer_std", "± (std)", pct2), Column("wer", "WER", pct2),
               Column("seeds", "seeds")]


def narang_tables(d: dict, section: Section) -> list[Table]:
    task, dense = d["task"], d["dense"]["cer"]
    gvh = [{"sparsity": float(s), "method": method, "reached": r["sparsity_mean"], **summary(r)}
           for s, by_method in d["gradual_vs_hard"].items() for method, r in by_method.items()]
    tables = [Table(f"{task}/gradual_vs_hard", f"{task}: gradual vs hard pruning (dense CER {pct2(dense)}, "
                    f"{d['finetune_steps']} fine-tuning steps)",
                    [Column("sparsity", "sparsity", pct0), Column("method", "method"),
                     Column("reached", "reached sparsity", lambda x: f"{x:.1%}"), *CER_COLUMNS], gvh),
              gradual_vs_paper(d),
              Table(f"{task}/block_vs_unstructured", f"{task}: block vs unstructured pruning",
                    [Column("block", "block"), *CER_COLUMNS],
                    [{"block": block, **summary(r)} for block, r in d["block_vs_unstructured"].items()])]
    if "large_sparse_vs_small_dense" in d:
        tables += large_sparse_tables(task, d["large_sparse_vs_small_dense"])
    else:
        section.not_measured.append(f"{task}: large sparse vs small dense, not in the JSON (runs with "
                                    "`--skip-large-sparse` leave it out)")
    return tables


def gradual_vs_paper(d: dict) -> Table:
    rows = []
    for s, by_method in d["gradual_vs_hard"].items():
        hard = next(r["cer_mean"] for method, r in by_method.items() if method.startswith("hard"))
        rows += [vs_paper({"sparsity": float(s), "method": method, "hard": hard, "gradual": r["cer_mean"],
                           "better": (hard - r["cer_mean"]) / hard}, "gradual_vs_hard")
                 for method, r in by_method.items() if method.startswith("gradual")]
    columns = [Column("sparsity", "sparsity", pct0), Column("method", "gradual method"),
               Column("hard", "CER hard", pct2), Column("gradual", "CER gradual", pct2),
               Column("better", "gradual better by (ours, relative)", lambda x: f"{x:.1%}"), *PAPER_COLUMNS]
    return Table(f"{d['task']}/gradual_vs_paper", f"{d['task']}: gradual vs hard, next to the paper", columns, rows)


def large_sparse_tables(task: str, d: dict) -> list[Table]:
    rows = [{"model": label, "hidden": r["runs"][0]["hidden"], "nonzeros": r["runs"][0]["recurrent_nonzeros"],
             **summary(r)} for label, r in d.items()]
    large, small = d["large sparse"]["cer_mean"], d["small dense"]["cer_mean"]
    verdict = vs_paper({"what": "large sparse vs small dense", "ours": "lower CER: large sparse" if large < small
                        else "lower CER: small dense", "large": large, "small": small}, "large_sparse_vs_small_dense")
    return [Table(f"{task}/large_sparse_vs_small_dense", f"{task}: large sparse vs small dense (same recurrent "
                  "non-zeros, trained from scratch)", [Column("model", "model"), Column("hidden", "hidden"),
                                                       Column("nonzeros", "recurrent non-zeros", count),
                                                       *CER_COLUMNS], rows),
            Table(f"{task}/large_sparse_vs_paper", f"{task}: large sparse vs small dense, next to the paper",
                  [Column("what", "comparison"), Column("ours", "ours (this run)"), Column("large", "CER large sparse",
                                                                                       pct2),
                   Column("small", "CER small dense", pct2), *PAPER_COLUMNS], [verdict])]


def taylor_tables(task: str, r: dict) -> list[Table]:
    c = r["correlation"]
    correlation = [{"criterion": label, **row} for label, row in c["rows"].items()]
    paper_rows = [vs_paper({"criterion": label, "spearman": c["rows"][label]["spearman"]}, key)
                  for label, key in (("Taylor FO, gate after BN", "taylor_fo_oracle"),
                                     ("weight magnitude", "magnitude_oracle")) if label in c["rows"]]
    metric = next(iter(r["curves"].values()))["metric"]
    curves = [{"method": label, "rounds": v["rounds"], "params": v["final"]["params"],
               "params_fraction": v["final"]["params_fraction"], "flops": v["final"]["flops_per_example"],
               "flops_fraction": v["final"]["flops_fraction"], metric: v["final"][metric]}
              for label, v in r["curves"].items()]
    latency = [{"model": label, **row} for label, row in r["latency"].items()]
    return [
        Table(f"taylor/{task}/correlation", f"Taylor, {task} (`{r['checkpoint']}`): Spearman correlation with the "
              f"oracle ({c['units']} of {c['of_units']} units, {c['batches']} minibatches)",
              [Column("criterion", "criterion"), Column("spearman", "vs oracle ΔL²", corr),
               Column("spearman_signed", "vs signed ΔL", corr), Column("units", "units")], correlation),
        Table(f"taylor/{task}/vs_paper", f"Taylor, {task}: next to the paper",
              [Column("criterion", "criterion"), Column("spearman", "Spearman vs oracle (ours)", corr),
               *PAPER_COLUMNS], paper_rows),
        Table(f"taylor/{task}/curves", f"Taylor, {task}: prune + fine-tune, Taylor FO vs weight magnitude vs random "
              f"(dense test {metric} {pct2(r['dense'][metric])})",
              [Column("method", "method"), Column("rounds", "rounds"), Column("params", "parameters left", count),
               Column("params_fraction", "fraction", pct2), Column("flops", "FLOPs/example left", count),
               Column("flops_fraction", "fraction", pct2), Column(metric, f"test {metric} (shrunk)", pct2)], curves),
        Table(f"taylor/{task}/latency", f"Taylor, {task}: latency after export, batch 1, one thread",
              [Column("model", "model"), Column("params", "parameters", count), Column("torch_ms", "PyTorch ms", ms),
               Column("onnx_ms", "ONNX Runtime ms", ms), Column("tvm_ms", "TVM ms", ms),
               Column("onnx_bytes", "ONNX file", format_bytes)], latency),
    ]


# ---------------------------------------------------------------------- the page
SECTIONS: tuple[Callable[[Path, bool], Section], ...] = (size_section, kernels_section, end_to_end_section,
                                                         accuracy_section)


def machine_text(machine: dict | None) -> str:
    if not machine:
        return "not recorded"
    parts = [f"{key} {machine[key]}" for key in MACHINE_FIELDS if machine.get(key) not in (None, "")]
    if machine.get("load_average_start"):  # how busy the machine was when the benchmark started
        parts.append("load average at start " + "/".join(f"{x:.2f}" for x in machine["load_average_start"]))
    return ", ".join(parts)


def machine_gaps(source: Source) -> list[str]:
    """The parts of the machine description ``source`` does not record."""
    machine = source.data.get("machine") or {}
    missing = [key for key in MACHINE_REQUIRED if machine.get(key) in (None, "")]
    return [f"machine description in `{source.stem}.json`: {', '.join(missing)} not recorded"] if missing else []


def build_sections(results: Path, quick: bool) -> list[Section]:
    sections = [build(results, quick) for build in SECTIONS]
    for section in sections:
        section.not_measured += [gap for s in section.sources if s.data is not None for gap in machine_gaps(s)]
    return sections


def source_line(source: Source) -> str:
    if source.stem is None:
        return f"- `{source.wanted}.json`: missing"
    line = f"- `{source.stem}.json` — machine: {machine_text(source.data.get('machine'))}"
    if source.fallback:
        run = "quick" if source.stem.endswith("-quick") else "full"
        line += f". **Fallback: `{source.wanted}.json` is missing; these are the numbers of the {run} run.**"
    return line


def section_markdown(number: int, section: Section, results: Path, docs: Path) -> list[str]:
    lines = [f"## {number}. {section.title}", "", section.intro, "", "Measured by:", ""]
    lines += [source_line(s) for s in section.sources] + [""]
    for table in section.tables:
        lines += table.markdown() + [""]
    plots = [results / f"{s.stem}.png" for s in section.sources if s.stem]
    lines += [f"![{p.stem}]({os.path.relpath(p, docs)})" for p in plots if p.exists()] + [""]
    if section.not_measured:
        lines += ["**Not measured** (no benchmark JSON holds these numbers):", ""]
        lines += [f"- {gap}" for gap in section.not_measured] + [""]
    return lines


def page_markdown(sections: list[Section], quick: bool, machine: dict, results: Path, docs: Path) -> str:
    flag = " --quick" if quick else ""
    intro = ("One command runs every benchmark and rewrites this page: `python -m bench --quick` (under an hour on "
             "2 cores: small grids, few steps) or `python -m bench` (the published numbers: many hours; an "
             "interrupted run goes on with `python -m bench --resume`); "
             f"`python -m bench{flag} --page-only` rebuilds it from the JSON already in `bench/results/`. "
             "Every number in the tables is read from the benchmark JSON named under its section, measured by "
             "that run on the machine described there. The papers' numbers appear only in the columns whose "
             'header starts with "paper" (`bench/papers.py`). All numbers in one file: [results.json](results.json).')
    lines = [f"# Results ({'quick' if quick else 'full'} size)", "",
             f"<!-- generated by `python -m bench{flag} --page-only`: edit bench/results_page.py, not this file -->",
             "", intro, "", f"Page built on: {machine_text(machine)}.", ""]
    for number, section in enumerate(sections, 1):
        lines += section_markdown(number, section, results, docs)
    return "\n".join(lines).rstrip() + "\n"


def page_json(sections: list[Section], quick: bool, machine: dict) -> dict:
    return {"size": "quick" if quick else "full", "created": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": machine,
            "papers": PAPERS,
            "sections": {s.key: {"title": s.title,
                                 "sources": [{"wanted": x.wanted, "used": x.stem, "fallback": x.fallback,
                                              "machine": (x.data or {}).get("machine")} for x in s.sources],
                                 "tables": {t.key: t.to_json() for t in s.tables},
                                 "not_measured": s.not_measured} for s in sections}}


def write_page(results: Path = RESULTS, docs: Path = DOCS, quick: bool = False) -> tuple[Path, Path]:
    """Write ``docs/results.md`` and ``docs/results.json`` from ``results``; return their paths."""
    sections = build_sections(results, quick)
    machine = machine_info(threads=1)
    docs.mkdir(parents=True, exist_ok=True)
    markdown, data = docs / "results.md", docs / "results.json"
    markdown.write_text(page_markdown(sections, quick, machine, results.resolve(), docs.resolve()))
    data.write_text(json.dumps(page_json(sections, quick, machine), indent=1, ensure_ascii=False) + "\n")
    return markdown, data
