"""The ONNX Runtime latency benchmark runs end to end on tiny models (its JSON is checked for
completeness and positive numbers, never for speed)."""

import json

from bench.onnx_latency import VARIANTS, main, model_specs


def test_onnx_latency_benchmark_tiny(tmp_path):
    main(["--quick", "--size", "tiny", "--threads", "1", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "onnx_latency-quick-tiny.json").read_text())
    specs = model_specs("tiny", quick=True)
    assert set(result["models"]) == {s.name for s in specs}
    for spec in specs:
        variants = result["models"][spec.name]["variants"]
        assert list(variants) == spec.variants and list(variants)[:len(VARIANTS)] == VARIANTS
        for row in variants.values():
            assert row["size_bytes"] > 0 and row["session_ms"] > 0 and row["size_ratio"] > 0
            for batch in ("1", "16"):
                assert row["latency"][batch]["median_ms"] > 0 and row["speedup"][batch] > 0
            assert row["relative_error"] < 3e-2  # every artifact still computes the model
        assert variants["fp32 dense"]["size_ratio"] == 1.0
    assert result["machine"]["threads"] == 1 and result["machine"]["onnxruntime"] and result["machine"]["cpu"]
    assert "| gru | int8 lowered |" in (tmp_path / "onnx_latency-quick-tiny.md").read_text()
    assert (tmp_path / "onnx_latency-quick-tiny.png").stat().st_size > 10_000
