"""The size benchmark runs end to end on a small model (its numbers are checked for consistency,
not for speed)."""

from bench.sizes import VARIANTS, measure, plot, to_markdown


def test_size_benchmark_on_ds2_mini(tmp_path):
    result = measure([0.9], model_name="ds2-mini", progress=False)
    sizes = {label: v["0.9"]["total_bytes"] for label, v in result["variants"].items()}
    assert set(sizes) == {label for label, _, _ in VARIANTS}
    assert sizes["masked dense fp32"] == result["dense_fp32_bytes"]  # zeros alone save nothing
    assert sizes["CSR int8"] < sizes["CSR fp32"] < sizes["masked dense fp32"]
    assert sizes["BSR 16x1 int8"] < sizes["CSR int8"]  # one index per 16 values
    assert "| BSR 16x1 int8 |" in to_markdown(result)
    plot(result, tmp_path / "sizes.png")
    assert (tmp_path / "sizes.png").stat().st_size > 10_000
