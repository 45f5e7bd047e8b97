"""A shrunk model reloads without the pruning code and goes through ONNX and TVM like any model."""

import subprocess
import sys

import numpy as np
import onnxruntime as ort
import pytest
import torch

from compressor.taylor import PrunedRNN, TaylorPruner, load_shrunk, save_shrunk
from compressor.zoo import build_model
from exporters.onnx import export_onnx

from .test_taylor_models import BiGRU, randomize_batchnorm

NAMES = ["resnet8-w4", "bigru", "ds2-mini-h16"]


def _shrunk(name: str):
    torch.manual_seed(0)
    if name == "resnet8-w4":
        model, x = randomize_batchnorm(build_model("resnet8", width=4)).eval(), torch.randn(2, 1, 28, 28)
    elif name == "ds2-mini-h16":
        model, x = randomize_batchnorm(build_model("ds2-mini", hidden=16)).eval(), torch.randn(2, 1, 64, 12)
    else:
        model, x = BiGRU().eval(), torch.randn(2, 7, 5)
    pruner = TaylorPruner("random", seed=1)
    pruner.prepare(model, (x,))
    if name == "bigru":  # unequal directions: a PrunedRNN
        keep = pruner.keep_units().copy()
        keep[next(u for u in pruner.units if u.name == "rnn.l1_reverse[2]").index] = False
        pruner._set_keep(keep)
    pruner.prune(len(pruner.units) // 3)
    small = pruner.shrink().eval()
    if name == "bigru":
        assert isinstance(small.rnn, PrunedRNN)
    if name == "ds2-mini-h16":  # the literal hidden size of the directions' view was rewritten
        assert hasattr(type(small), "_taylor_code") and small.rnns[0].rnn.hidden_size < 16
    return small, x


@pytest.mark.parametrize("name", NAMES)
def test_saved_program_reloads_with_plain_torch(name, tmp_path):
    small, x = _shrunk(name)
    path = save_shrunk(small, (x,), tmp_path / f"{name}.pt2")
    bigger = torch.cat([x, x, x[:1]])  # the batch dimension is dynamic
    torch.save(bigger, tmp_path / "x.pt")
    with torch.no_grad():
        torch.save(small(bigger), tmp_path / "y.pt")
    script = ("import sys, torch; model = torch.export.load(sys.argv[1]).module(); "
              "x, y = torch.load(sys.argv[2]), torch.load(sys.argv[3]); "
              "assert not any(m.startswith(('compressor', 'exporters')) for m in sys.modules), 'project imported'; "
              "print(float((model(x) - y).abs().max()))")
    result = subprocess.run([sys.executable, "-I", "-c", script, str(path), str(tmp_path / "x.pt"),
                             str(tmp_path / "y.pt")], capture_output=True, text=True, cwd=tmp_path, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert float(result.stdout.strip().splitlines()[-1]) < 1e-5
    with torch.no_grad():
        torch.testing.assert_close(load_shrunk(path)(bigger), small(bigger))


@pytest.mark.parametrize("name", NAMES)
def test_onnx_export_of_the_shrunk_model(name, tmp_path):
    small, x = _shrunk(name)
    artifact = export_onnx(small, (x,), tmp_path / f"{name}.onnx")
    session = ort.InferenceSession(str(artifact.path), providers=["CPUExecutionProvider"])
    bigger = torch.cat([x, x[:1]])
    (out,) = session.run(None, {"input": bigger.numpy()})
    with torch.no_grad():
        expected = small(bigger).numpy()
    assert np.abs(out - expected).max() <= 1e-4 * np.abs(expected).max()


@pytest.mark.parametrize("name", NAMES)
def test_tvm_export_of_the_shrunk_model(name, tmp_path):
    from exporters.tvm import export_tvm
    from runtime_tests.tvm_check import compare_with_torch

    small, x = _shrunk(name)
    artifact = export_tvm(small, (x,), tmp_path / f"{name}.so")
    assert compare_with_torch(small, artifact.path, (x,)).worst < 1e-4
