"""The size benchmark runs end to end on small models (its numbers are checked for consistency,
not for speed)."""

import json

from bench.sizes import VARIANTS, main, measure, plot, to_markdown


def test_size_benchmark_on_ds2_mini(tmp_path):
    result = measure([0.9], model_name="ds2-mini", progress=False, artifacts=False)
    sizes = {label: v["0.9"]["total_bytes"] for label, v in result["variants"].items()}
    assert set(sizes) == {label for label, _, _ in VARIANTS}
    assert sizes["masked dense fp32"] == result["dense_fp32_bytes"]  # zeros alone save nothing
    assert sizes["CSR int8"] < sizes["CSR fp32"] < sizes["masked dense fp32"]
    assert sizes["BSR 16x1 int8"] < sizes["CSR int8"]  # one index per 16 values
    assert "| BSR 16x1 int8 |" in to_markdown(result)
    assert "artifacts" not in result
    assert result["machine"]["threads"] == 1 and result["machine"]["cpu"] and result["machine"]["cores"]
    plot(result, tmp_path / "sizes.png")
    assert (tmp_path / "sizes.png").stat().st_size > 10_000


def test_artifact_sizes_of_a_tiny_shared_input_ds2(tmp_path):
    """The paper's DS2 architecture (shared-input bidirectional ReLU layers) at width 32: the ONNX
    file (fp32 → int8 → compressed) and the TVM libraries, through the command line."""
    main(["--sparsity", "0.8", "0.9", "--hidden", "32", "--layers", "2", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "sizes.json").read_text())
    assert result["model"] == "ds2" and result["model_overrides"] == {"hidden": 32, "layers": 2}
    assert result["machine"]["threads"] == 1 and result["machine"]["tvm"] and result["machine"]["onnxruntime"]
    files = result["artifacts"]
    assert (files["sparsity"], files["hidden"], files["layers"], files["input_shape"]) == ("0.9", 32, 2, [1, 1, 161, 20])
    assert files["peak_rss_bytes"] > 0
    rows = files["rows"]
    assert list(rows) == ["onnx int8 compressed, unstructured", "onnx int8 compressed, 16x1 blocks",
                          "tvm bsr16x1 int8", "tvm csr int8"]
    for name, row in rows.items():
        assert row["size_bytes"] > 0 and row["seconds"] > 0
        if name.startswith("onnx"):
            steps = row["sizes_by_step"]
            assert list(steps) == ["fp32", "int8", "compressed"] and steps["compressed"] == row["size_bytes"]
            assert steps["compressed"] < steps["int8"] < steps["fp32"]
            assert row["time_axis"].startswith("fixed (20 frames")  # the shared-input loop is unrolled
        else:
            assert row["compile_seconds"] > 0 and row["time_axis"] == "dynamic" and row["left_dense"] == []
    assert rows["onnx int8 compressed, 16x1 blocks"]["size_bytes"] < rows["onnx int8 compressed, unstructured"]["size_bytes"]
    markdown = (tmp_path / "sizes.md").read_text()
    assert "## Artifacts at 90% sparsity" in markdown and "| tvm csr int8 | 1x1 | csr int8 |" in markdown
    assert (tmp_path / "sizes.png").stat().st_size > 10_000
