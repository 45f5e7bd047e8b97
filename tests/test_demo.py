"""The embedded default job (small settings) and its command line."""

import pytest
from click.testing import CliRunner

from compressor.demo import run_pruning_demo
from compressor.schedules import count_to_prune
from compressor.tasks.adding import BASELINE_MSE
from pipeline.cli import main


def test_demo_prunes_to_the_requested_sparsity_and_learns():
    result = run_pruning_demo(sparsity=0.8, dense_steps=300, prune_steps=100, progress=False)
    assert result.dense_mse < 0.5 * BASELINE_MSE  # 300 steps of training learn something real
    for label in ("gradual, cubic (Zhu & Gupta)", "one-shot (hard)"):
        for row in result.reports[label]:
            if row.name in ("rnn.weight_hh_l0", "fc.weight"):
                assert row.pruned == count_to_prune(0.8, row.total), (label, row)
            else:
                assert row.pruned == 0, (label, row)
    narang = {r.name: r.sparsity for r in result.reports["gradual, threshold (Narang)"]}
    assert 0.5 < narang["rnn.weight_hh_l0"] <= 0.9
    assert all(v == v and v < 1.0 for v in result.mse.values())  # finite
    narang_mse = result.mse["gradual, threshold (Narang)"]
    assert result.packed_mse["packed fp32"] == pytest.approx(narang_mse, rel=1e-4)
    assert result.packed_mse["packed int8, int8 activations"] == pytest.approx(narang_mse, rel=0.2, abs=2e-3)
    assert result.sizes["int8"].total_bytes < result.sizes["fp32"].total_bytes < result.sizes["fp32"].dense_fp32_bytes


def test_cli_demo_prints_tables():
    out = CliRunner().invoke(main, ["demo", "--dense-steps", "30", "--prune-steps", "40", "--sparsity", "0.5"])
    assert out.exit_code == 0, out.output
    assert out.output.count("TOTAL") == 4 and "held-out mean squared error" in out.output


@pytest.mark.parametrize("args", [["--sparsity", "1.0"], ["--prune-steps", "5"]])
def test_cli_rejects_bad_options(args):
    out = CliRunner().invoke(main, ["demo", *args])
    assert out.exit_code == 2 and "Invalid value" in out.output


def test_cli_help_shows_examples():
    out = CliRunner().invoke(main, ["--help"])
    assert out.exit_code == 0 and "Examples" in out.output
