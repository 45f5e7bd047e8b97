"""aarch64 Linux libraries on an emulated aarch64 device (the project's TVM RPC server under qemu).

Slow (a server build the first time, qemu start per test, every aarch64 instruction emulated):
run with ``pytest --run-slow runtime_tests/test_tvm_emulated_aarch64.py``.  What it proves: the
library built for ``aarch64-linux`` loads in TVM's aarch64 runtime and computes what PyTorch
computes, within 1e-4 relative (int8 libraries against the dequantized model: the kernels compute
exactly with the stored weights).  What it does not prove: anything about speed on a phone.
"""

import numpy as np
import pytest
import torch
from torch import nn

from compressor.packed_model import PackingConfig, pack_model
from compressor.zoo import build_model
from exporters.tvm import export_tvm
from exporters.tvm_rpc import connect
from runtime_tests.emulated_device import emulated_aarch64_device
from runtime_tests.models import GRUModel, pruned
from runtime_tests.tvm_check import latency_ms, relative_errors, run_vm, torch_outputs

pytestmark = pytest.mark.slow

RTOL = 1e-4
EM_AARCH64 = 183
TIMEOUT_S = 120  # loading a library under emulation takes well under a second; be generous

# name: (factory, example input shape, packing dtype); models pruned to 90 % (unstructured)
MODELS = {
    "gru-int8": (GRUModel, (2, 9, 12), "int8"),
    "linear-stack-fp32": (lambda: nn.Sequential(nn.Linear(30, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                                                nn.Linear(64, 10)), (2, 30), "fp32"),
    "ds2-mini-int8": (lambda: build_model("ds2-mini", hidden=64), (1, 1, 64, 40), "int8"),
}


@pytest.fixture
def device():
    """A fresh emulated device per test: a failed test's lingering session cannot block the next."""
    with emulated_aarch64_device() as address:
        yield address


def _elf_machine(path) -> int:
    header = path.read_bytes()[:20]
    assert header[:4] == b"\x7fELF"
    return int.from_bytes(header[18:20], "little")


def _run_on_device(address, library, inputs, time_it=False):
    """Outputs of the library on the device (and its latency, if asked); the RPC session is
    closed when this returns (the server serves one session at a time)."""
    session = connect(address, timeout_s=TIMEOUT_S)
    vm = session.load_vm(library)
    outputs = run_vm(vm, inputs, session.device)
    # Emulated timings mean nothing (qemu translates every aarch64 instruction on an x86 host):
    # this only shows that time_evaluator works over RPC on the device.
    latency = latency_ms(vm, inputs, session.device, repeat=1, min_repeat_ms=0) if time_it else None
    return outputs, latency


@pytest.mark.parametrize("name", sorted(MODELS))
def test_aarch64_library_matches_pytorch_on_emulated_device(name, device, tmp_path):
    torch.manual_seed(0)
    factory, shape, dtype = MODELS[name]
    example = torch.randn(shape)
    packed = pack_model(pruned(factory().eval()), PackingConfig(dtype=dtype))
    artifact = export_tvm(packed, (example,), tmp_path / f"{name}.so", target="aarch64-linux")
    assert _elf_machine(artifact.path) == EM_AARCH64
    outputs, latency = _run_on_device(device, artifact.path, [example.numpy()], time_it=name == "gru-int8")
    expected = torch_outputs(packed.dequantized(), (example,))
    assert [o.shape for o in outputs] == [e.shape for e in expected]
    assert relative_errors(expected, outputs).worst < RTOL
    if latency is not None:
        assert latency > 0


def test_emulated_device_is_really_aarch64(device, tmp_path):
    """A host (x86-64) library is refused: the numbers above come from aarch64 code.  (glibc's
    dlopen reports an ELF for another machine as "cannot open shared object file".)"""
    artifact = export_tvm(pruned(GRUModel().eval()), (torch.randn(1, 5, 12),), tmp_path / "host.so", target="host")
    with pytest.raises(ConnectionError, match=r"(?s)loading host\.so.*Failed to load dynamic shared library"):
        _run_on_device(device, artifact.path, [np.zeros((1, 5, 12), np.float32)])
