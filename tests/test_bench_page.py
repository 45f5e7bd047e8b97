"""The results page (``python -m bench``) from small synthetic benchmark JSON, and the runner."""

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.__main__ import Benchmark, main, make_jobs
from bench.papers import PAPERS
from bench.results_page import write_page

ROOT = Path(__file__).resolve().parents[1]
MACHINE = {"cpu": "Test CPU 9000", "cores": 4, "threads": 1, "python": "3.11", "torch": "2.13", "onnxruntime": "1.32",
           "tvm": "0.27"}


def kernel_row(kind: str, backend: str, ms: float, fp32: float, same: float) -> dict:
    return {"size": 1760, "sparsity": 0.9, "batch": 1, "backend": backend, "kind": kind, "latency_ms": ms,
            "bytes_moved": 12_404_480, "bound_ms": 0.4969, "bound_fraction": 0.4969 / ms,
            "speedup_vs_best_dense_fp32": fp32, "speedup_vs_best_dense_same_dtype": same}


def e2e_model(name: str, parameters: int) -> dict:
    def row(size: int, ms1: float, ms16: float) -> dict:
        return {"latency_ms": {"1": ms1, "16": ms16}, "size_bytes": size, "speedup_vs_onnx_fp32": {"1": 2.5, "16": 1.25},
                "speedup_vs_onnx_int8": {"1": 0.75, "16": 0.5}}

    return {"model": name, "sparsity": 0.9, "block": "16x1", "parameters": parameters,
            "rows": {"onnx runtime fp32 dense": row(271_000_111, 95.125, 261.5),
                     "tvm sparse int8": row(4_726_160, 16.4375, 230.25)}}


def method(cer: float, std: float = 0.001) -> dict:
    return {"cer_mean": cer, "cer_std": std, "wer_mean": 3 * cer, "sparsity_mean": 0.8933,
            "runs": [{"cer": cer, "hidden": 256, "recurrent_nonzeros": 123_456}] * 2}


RESULTS = {
    "sizes": {"model": "ds2", "parameters": 67_699_677, "dense_fp32_bytes": 270_799_236, "sparsities": ["0.9"],
              "variants": {"CSR fp32": {"0.9": {"total_bytes": 41_761_080, "compression": 6.4845}},
                           "BSR 16x1 int8": {"0.9": {"total_bytes": 8_904_274, "compression": 30.4123}}},
              "machine": {"python": "3.11", "torch": "2.13", "cpu": ""}},
    "tvm_kernels-quick": {"machine": MACHINE, "quick": True, "repeats": 15, "bandwidth_gbs": 24.96, "rows": [
        kernel_row("dense fp32", "torch", 0.8231, 1.0, 1.0),
        kernel_row("dense int8", "onnxruntime int8", 0.2694, 3.0554, 1.0),
        kernel_row("sparse fp32", "tvm bsr16x1", 0.0791, 10.4058, 10.4058),
        kernel_row("sparse int8", "tvm csr", 0.1552, 5.3035, 1.7358)]},
    "end_to_end": {"machine": MACHINE, "quick": False, "models": [e2e_model("ds2 (paper size, 7×1760)", 67_699_677)]},
    "end_to_end-quick": {"machine": MACHINE, "quick": True, "models": [e2e_model("ds2 (3×1760)", 30_507_357)]},
    "accuracy-speech-digits": {
        "task": "speech-digits", "dense": {"cer": 0.0145}, "finetune_steps": 600,
        "gradual_vs_hard": {"0.9": {"gradual (threshold)": method(0.0186), "hard (one-shot)": method(0.0223)}},
        "block_vs_unstructured": {"1x1": method(0.025), "16x1": method(0.0599)},
        "large_sparse_vs_small_dense": {"large sparse": method(0.031), "small dense": method(0.047)}},
    "taylor": {"size": "full", "machine": MACHINE, "images": {
        "checkpoint": "resnet8-fashion-mnist", "dense": {"accuracy": 0.918},
        "correlation": {"units": 224, "of_units": 224, "batches": 4, "rows": {
            "Taylor FO, gate after BN": {"spearman": 0.8685, "spearman_signed": 0.7766, "units": 224},
            "weight magnitude": {"spearman": -0.0122, "spearman_signed": -0.0223, "units": 224}}},
        "curves": {"Taylor FO": {"rounds": 7, "metric": "accuracy", "final": {
            "accuracy": 0.8902, "params": 19_240, "params_fraction": 0.2474, "flops_per_example": 4_592_837.0,
            "flops_fraction": 0.4914}}},
        "latency": {"dense": {"params": 77_754, "torch_ms": 0.5728, "onnx_ms": 0.1168, "onnx_bytes": 314_392,
                              "tvm_ms": 0.3328}}}},
}


def write_results(directory: Path, stems: list[str] | None = None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for stem in stems or RESULTS:
        (directory / f"{stem}.json").write_text(json.dumps(RESULTS[stem]))
    return directory


def markdown_tables(markdown: str) -> dict[str, tuple[list[str], list[list[str]]]]:
    """Caption (the bold line before a table) -> header cells, body rows."""
    tables, lines = {}, markdown.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("| ") and lines[i + 1].startswith("| ---") and lines[i - 2].startswith("**"):
            body = []
            for row in lines[i + 2:]:
                if not row.startswith("|"):
                    break
                body.append([c.strip() for c in row.strip("|").split(" | ")])
            tables[lines[i - 2].strip("*")] = ([c.strip() for c in line.strip("|").split(" | ")], body)
    return tables


def table(tables: dict, start: str) -> tuple[list[str], list[list[str]]]:
    [caption] = [c for c in tables if c.startswith(start)]
    return tables[caption]


@pytest.fixture(scope="module")
def page(tmp_path_factory) -> tuple[str, dict]:
    tmp = tmp_path_factory.mktemp("page")
    markdown, data = write_page(write_results(tmp / "results"), tmp / "docs", quick=False)
    return markdown.read_text(), json.loads(data.read_text())


def test_tables_hold_exactly_the_numbers_of_the_json(page):
    tables = markdown_tables(page[0])
    assert table(tables, "`ds2` (67,699,677 parameters)")[1] == [
        ["fp32 dense (unpruned)", "270.80 MB", "–"], ["CSR fp32", "41.76 MB", "6.48×"],
        ["BSR 16x1 int8", "8.90 MB", "30.41×"]]
    assert table(tables, "Artifacts of `ds2 (paper size")[1] == [["onnx runtime fp32 dense", "271.00 MB"],
                                                                 ["tvm sparse int8", "4.73 MB"]]
    kernels = table(tables, "Every kernel")[1]
    assert [r[3:8] for r in kernels] == [["torch", "dense fp32", "0.823", "1.00×", "1.00×"],
                                         ["onnxruntime int8", "dense int8", "0.269", "3.06×", "1.00×"],
                                         ["tvm bsr16x1", "sparse fp32", "0.079", "10.41×", "10.41×"],
                                         ["tvm csr", "sparse int8", "0.155", "5.30×", "1.74×"]]
    assert kernels[0][:3] + kernels[0][8:] == ["1760", "90%", "1", "12.40 MB", "0.497", "60%"]
    assert table(tables, "Next to the paper: the best sparse")[1] == [
        ["1760", "90%", "1", "torch", "0.823", "tvm bsr16x1", "0.079", "10.41×", "tvm csr", "0.155", "1.74×",
         PAPERS["sparse_gemv_speedup"]["value"], PAPERS["sparse_gemv_speedup"]["source"]]]
    assert table(tables, "Whole models")[1] == [
        ["ds2 (paper size, 7×1760)", "onnx runtime fp32 dense", "271.00 MB", "95.125", "261.500", "2.50×", "1.25×",
         "0.75×", "0.50×"],
        ["ds2 (paper size, 7×1760)", "tvm sparse int8", "4.73 MB", "16.438", "230.250", "2.50×", "1.25×", "0.75×",
         "0.50×"]]
    assert table(tables, "speech-digits: gradual vs hard pruning")[1] == [
        ["90%", "gradual (threshold)", "89.3%", "1.86%", "0.10%", "5.58%", "2"],
        ["90%", "hard (one-shot)", "89.3%", "2.23%", "0.10%", "6.69%", "2"]]
    assert table(tables, "speech-digits: gradual vs hard, next")[1][0][:5] == [
        "90%", "gradual (threshold)", "2.23%", "1.86%", f"{(0.0223 - 0.0186) / 0.0223:.1%}"]
    assert table(tables, "speech-digits: large sparse vs small dense (")[1] == [
        ["large sparse", "256", "123,456", "3.10%", "0.10%", "9.30%", "2"],
        ["small dense", "256", "123,456", "4.70%", "0.10%", "14.10%", "2"]]
    assert table(tables, "Taylor, images (")[1] == [["Taylor FO, gate after BN", "0.869", "0.777", "224"],
                                                    ["weight magnitude", "-0.012", "-0.022", "224"]]
    assert table(tables, "Taylor, images: prune")[1] == [["Taylor FO", "7", "19,240", "24.74%", "4,592,837",
                                                          "49.14%", "89.02%"]]


def test_json_holds_each_sections_numbers_and_machine(page):
    data = page[1]
    assert data["size"] == "full" and data["papers"] == PAPERS and data["machine"]["cpu"]
    kernels = data["sections"]["kernels"]
    assert kernels["tables"]["kernels"]["rows"] == RESULTS["tvm_kernels-quick"]["rows"]
    assert kernels["sources"] == [{"wanted": "tvm_kernels", "used": "tvm_kernels-quick", "fallback": True,
                                   "machine": MACHINE}]
    assert data["sections"]["accuracy"]["sources"][0]["machine"] is None


def paper_cells_removed(markdown: str) -> tuple[str, list[str]]:
    """The page with every cell of a "paper…" column blanked, and those cells."""
    lines, cells = markdown.splitlines(), []
    paper_columns: list[int] = []
    for i, line in enumerate(lines):
        if not line.startswith("|"):
            paper_columns = []
            continue
        row = line.strip("|").split(" | ")
        if i + 1 < len(lines) and lines[i + 1].startswith("| ---"):
            paper_columns = [j for j, c in enumerate(row) if c.strip().startswith("paper")]
            continue
        cells += [row[j].strip() for j in paper_columns]
        lines[i] = " | ".join("" if j in paper_columns else c for j, c in enumerate(row))
    return "\n".join(lines), cells


def test_papers_numbers_only_in_paper_columns(page):
    rest, cells = paper_cells_removed(page[0])
    for quote in PAPERS.values():
        assert quote["value"] in cells
        assert quote["value"] not in rest


def test_fallback_to_quick_is_said_per_section(page):
    sections = page[0].split("\n## ")
    [kernels] = [s for s in sections if s.startswith("2. Kernels")]
    assert "**Fallback: `tvm_kernels.json` is missing; these are the numbers of the quick run.**" in kernels
    [size] = [s for s in sections if s.startswith("1. Size")]
    assert "Fallback" not in size  # sizes.json and the full end_to_end.json are there


def test_not_measured_lists_the_gaps(page):
    markdown = page[0]
    assert "size 2560, 3072: not in `tvm_kernels-quick.json`" in markdown
    assert "sparsity 80%, 95%: not in `tvm_kernels-quick.json`" in markdown
    assert "ONNX artifact and TVM library of the *pruned* paper-size DS2: `sizes.json` holds no such file" in markdown
    assert "`accuracy-speech-sentences.json` is missing" in markdown
    assert "machine description in `sizes.json`: cpu, cores, threads not recorded" in markdown
    assert "accuracy on the task of each backend" in markdown


# ---------------------------------------------------------------- the newer fields
FULL_MACHINE = {**MACHINE, "cores_available": 2, "load_average_start": [1.5, 1.25, 0.125], "numpy": "2.4",
                "onnx": "1.23", "platform": "Linux"}
SIZE_FILES = {
    "sparsity": "0.9", "input_shape": [1, 1, 161, 20], "hidden": 1760, "layers": 7,
    "pruning": "one-shot magnitude pruning of every Linear weight", "peak_rss_bytes": 3_384_164_352,
    "rows": {"onnx int8 compressed, unstructured": {
        "pruning": "1x1", "size_bytes": 16_958_554, "seconds": 14.625, "time_axis": "fixed (20 frames)",
        "sizes_by_step": {"fp32": 270_964_538, "int8": 69_165_641, "compressed": 16_958_554}},
        "tvm bsr16x1 int8": {"pruning": "16x1", "packing": "bsr int8", "size_bytes": 9_425_232, "seconds": 7.5,
                             "compile_seconds": 7.25, "time_axis": "dynamic"}}}


def with_accuracy(model: dict, metric: str, values: dict[str, float], examples: int) -> dict:
    model = copy.deepcopy(model)
    for name, value in values.items():
        model["rows"][name]["accuracy"] = {metric: value, "seconds": 1.0}
    model["accuracy"] = {"task": "speech-digits", "metric": metric, "examples": examples, "pruning": "one-shot",
                         "reference": {"pytorch eager sparse fp32": {metric: 0.7941}}}
    return model


NEWER = {
    "sizes": {**RESULTS["sizes"], "machine": FULL_MACHINE, "model_overrides": {}, "artifacts": SIZE_FILES},
    "end_to_end": {"machine": FULL_MACHINE, "quick": False, "finetune_steps": 600, "models": [
        e2e_model("ds2 (paper size, 7×1760)", 67_699_677),
        with_accuracy(e2e_model("ds2-mini (digits)", 2_296_637), "cer",
                      {"onnx runtime fp32 dense": 0.0137, "tvm sparse int8": 0.797}, 200)]},
}


@pytest.fixture(scope="module")
def newer_page(tmp_path_factory) -> tuple[str, dict]:
    tmp = tmp_path_factory.mktemp("newer")
    results = tmp / "results"
    results.mkdir()
    for stem, data in {**RESULTS, **NEWER}.items():
        (results / f"{stem}.json").write_text(json.dumps(data))
    markdown, data = write_page(results, tmp / "docs", quick=False)
    return markdown.read_text(), json.loads(data.read_text())


def test_size_section_shows_the_files_of_bench_sizes(newer_page):
    tables = markdown_tables(newer_page[0])
    header, rows = table(tables, "Files of `ds2` (hidden 1760, 7 recurrent layers) at 90% sparsity")
    assert header == ["artifact", "pruning block", "ONNX fp32", "ONNX int8", "ONNX compressed", "file",
                      "× smaller than fp32 dense", "export s", "time axis"]
    assert rows == [["onnx int8 compressed, unstructured", "1x1", "270.96 MB", "69.17 MB", "16.96 MB", "16.96 MB",
                     f"{270_799_236 / 16_958_554:.2f}×", "14.6", "fixed (20 frames)"],
                    ["tvm bsr16x1 int8", "16x1", "–", "–", "–", "9.43 MB", f"{270_799_236 / 9_425_232:.2f}×", "7.5",
                     "dynamic"]]
    assert "peak memory of the run 3.38 GB" in newer_page[0]
    files = newer_page[1]["sections"]["size"]["tables"]["files"]["rows"]
    assert files[1]["bytes"] == 9_425_232 and files[0]["step int8"] == 69_165_641


def test_end_to_end_shows_the_task_metric_of_each_backend(newer_page):
    tables = markdown_tables(newer_page[0])
    header, rows = table(tables, "Whole models")
    assert header[-3:] == ["task metric", "on the task", "test examples"]
    assert "**Whole models (sparse: 90% in 16x1 blocks, trained models pruned gradually while fine-tuned for 600 " \
        "steps, untrained ones in one shot;" in newer_page[0]
    assert [r[:2] + r[-3:] for r in rows] == [
        ["ds2 (paper size, 7×1760)", "onnx runtime fp32 dense", "–", "–", "–"],
        ["ds2 (paper size, 7×1760)", "tvm sparse int8", "–", "–", "–"],
        ["ds2-mini (digits)", "onnx runtime fp32 dense", "cer", "1.37%", "200"],
        ["ds2-mini (digits)", "tvm sparse int8", "cer", "79.70%", "200"]]
    assert table(tables, "Task metric of the pruned models in PyTorch")[1] == [
        ["ds2-mini (digits)", "pytorch eager sparse fp32", "cer", "79.41%", "200", "one-shot"]]


def test_newer_fields_close_their_gaps_and_describe_the_machine(newer_page):
    markdown, data = newer_page
    assert "of the *pruned* paper-size DS2" not in markdown
    assert "holds no model of 67,699,677 parameters" not in markdown
    assert "accuracy on the task of each backend" not in markdown
    assert "accuracy on the task of `ds2 (paper size, 7×1760)`: no trained checkpoint" in markdown
    assert "machine description in `sizes.json`" not in markdown
    assert ("- `sizes.json` — machine: cpu Test CPU 9000, cores 4, threads 1, python 3.11, torch 2.13, numpy 2.4, "
            "onnx 1.23, onnxruntime 1.32, tvm 0.27, load average at start 1.50/1.25/0.12") in markdown
    assert data["sections"]["size"]["sources"][0]["machine"] == FULL_MACHINE
    assert not [gap for gap in data["sections"]["size"]["not_measured"] if "sizes.json" in gap]


def test_files_of_a_smaller_width_are_not_taken_for_the_paper_size(tmp_path):
    results = write_results(tmp_path / "results", ["tvm_kernels-quick"])
    (results / "sizes.json").write_text(json.dumps({**NEWER["sizes"], "model_overrides": {"hidden": 512}}))
    markdown, _ = write_page(results, tmp_path / "docs", quick=False)
    assert "files of the paper-size DS2: `sizes.json` measured `ds2` with {'hidden': 512}" in markdown.read_text()


def test_page_only_from_the_command_line(tmp_path):
    results = write_results(tmp_path / "results", ["tvm_kernels-quick", "end_to_end-quick"])
    (results / "tvm_kernels-quick.png").write_bytes(b"png")
    docs = tmp_path / "docs"
    done = subprocess.run([sys.executable, "-m", "bench", "--page-only", "--quick", "--results", str(results),
                           "--docs", str(docs)], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    markdown = (docs / "results.md").read_text()
    assert markdown.startswith("# Results (quick size)")
    assert "![tvm_kernels-quick](../results/tvm_kernels-quick.png)" in markdown
    assert "Fallback" not in markdown
    assert json.loads((docs / "results.json").read_text())["sections"]["size"]["not_measured"]


FAKE = {"boom": "import sys\nprint('boom starts')\nsys.exit(3)\n",
        "fine": "import sys\nfrom pathlib import Path\nout = Path(sys.argv[sys.argv.index('--out') + 1])\n"
                "out.mkdir(exist_ok=True)\n(out / 'fine.txt').write_text(' '.join(sys.argv[1:]))\n",
        "tasky": "import sys\nprint('usage: tasky [--quick] [--resume] [--task {digits,sentences}]')\n"}
FAKES = (Benchmark("boom", package="fakebench"), Benchmark("fine", package="fakebench"))


@pytest.fixture
def fakebench(tmp_path, monkeypatch) -> Path:
    package = tmp_path / "fakebench"
    package.mkdir()
    (package / "__init__.py").write_text("")
    for name, source in FAKE.items():
        (package / f"{name}.py").write_text(source)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    return tmp_path


def test_runner_reports_a_failure_and_goes_on(fakebench, capfd):
    results, docs = fakebench / "results", fakebench / "docs"
    assert main(["--quick", "--results", str(results), "--docs", str(docs)], FAKES) == 1
    out = capfd.readouterr().out
    assert "=== [1/2] boom: python -m fakebench.boom --quick --out" in out and "boom starts" in out
    assert "=== [1/2] boom: FAILED (exit status 3)" in out and "=== [2/2] fine: ok" in out
    assert "1 of 2 failed: boom" in out
    assert (results / "fine.txt").read_text() == f"--quick --out {results.resolve()}"
    assert (docs / "results.md").exists()


def test_runner_only_and_skip(fakebench):
    results = fakebench / "results"
    assert main(["--only", "fine", "--results", str(results), "--docs", str(fakebench / "docs")], FAKES) == 0
    assert (results / "fine.txt").read_text() == f"--out {results.resolve()}"
    assert main(["--skip", "boom", "--results", str(results), "--docs", str(fakebench / "docs")], FAKES) == 0


def test_runner_runs_each_task_when_the_module_offers_task(fakebench):
    benchmarks = (Benchmark("tasky", package="fakebench", tasks=("digits", "sentences"), quick_tasks=("digits",)),
                  Benchmark("fine", package="fakebench", tasks=("digits", "sentences")))
    jobs = make_jobs(benchmarks, quick=False, results=Path("r"))
    assert [(j.name, j.command[2:]) for j in jobs] == [
        ("tasky digits", ("fakebench.tasky", "--out", "r", "--task", "digits")),
        ("tasky sentences", ("fakebench.tasky", "--out", "r", "--task", "sentences")),
        ("fine", ("fakebench.fine", "--out", "r"))]
    quick = make_jobs(benchmarks, quick=True, results=Path("r"))
    assert [(j.name, j.command[2:]) for j in quick] == [
        ("tasky digits", ("fakebench.tasky", "--quick", "--out", "r", "--task", "digits")),
        ("fine", ("fakebench.fine", "--quick", "--out", "r"))]


def test_runner_passes_resume_only_where_offered(fakebench):
    jobs = make_jobs((Benchmark("tasky", package="fakebench"), Benchmark("fine", package="fakebench")),
                     quick=False, results=Path("r"), resume=True)
    assert [j.command[2:] for j in jobs] == [("fakebench.tasky", "--out", "r", "--resume"),
                                            ("fakebench.fine", "--out", "r")]
