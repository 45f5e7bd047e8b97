"""TVM libraries (Relax VM, host CPU) against PyTorch, and the aarch64 / Android / RPC paths.

Tolerances: fp32 artifacts within 1e-4 relative of PyTorch; int8 artifacts within 1e-4 of the
PyTorch model that carries the stored (dequantized) weights — the kernels compute exactly with
them — and within 5e-2 of the fp32 model (the quantization error itself)."""

import socket
import subprocess
import sys
import tarfile
import time

import numpy as np
import pytest
import torch

from compressor.blocks import BlockShape
from compressor.packed_model import PackedModel, PackingConfig, pack_model
from compressor.zoo import build_model
from exporters.tvm import export_tvm
from exporters.tvm_rpc import connect, parse_address
from runtime_tests.models import CASES, GRUModel, pruned
from runtime_tests.tvm_check import compare_with_torch, latency_ms, run_vm, torch_outputs

FP32_RTOL = 1e-4
INT8_VS_FP32_RTOL = 5e-2
TVM_CASES = {**{name: (factory, example) for name, (factory, example, _, _) in CASES.items()},
             "ds2-shared-input": (lambda: build_model("ds2", n_freq=32, hidden=48, layers=2), torch.randn(1, 1, 32, 30))}
KINDS = {
    "dense": None,
    "pruned-fp32": (BlockShape(), PackingConfig(dtype="fp32")),
    "pruned-int8": (BlockShape(), PackingConfig(dtype="int8")),
    "block16x1-int8": (BlockShape(16, 1), PackingConfig(format="bsr", block=BlockShape(16, 1), dtype="int8")),
}


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("name", sorted(TVM_CASES))
def test_tvm_library_matches_pytorch(name, kind, tmp_path):
    torch.manual_seed(0)
    factory, example = TVM_CASES[name]
    model = factory().eval()
    if KINDS[kind] is None:
        artifact = export_tvm(model, (example,), tmp_path / f"{name}.so")
        assert compare_with_torch(model, artifact.path, (example,)).worst < FP32_RTOL
        assert all(use.format == "dense" for use in artifact.kernels)
        return
    block, config = KINDS[kind]
    model = pruned(model, block).eval()
    packed = pack_model(model, config)
    artifact = export_tvm(packed, (example,), tmp_path / f"{name}.so")
    assert artifact.kernels, "no matmul was given a project kernel"
    assert {use.weight for use in artifact.kernels} | set(artifact.left_dense) == set(packed.weights)
    left = [model.get_submodule(name.rpartition(".")[0]) for name in artifact.left_dense]
    assert all(isinstance(m, torch.nn.Embedding) or (isinstance(m, (torch.nn.Conv1d, torch.nn.Conv2d)) and m.groups > 1)
               for m in left)  # TVM's own gather and grouped convolutions; every other conv runs our kernels
    assert compare_with_torch(packed.dequantized(), artifact.path, (example,)).worst < FP32_RTOL
    if config.dtype == "int8":
        assert compare_with_torch(model, artifact.path, (example,)).worst < INT8_VS_FP32_RTOL


def test_library_size_does_not_grow_with_sequence_length(tmp_path):
    model = pruned(GRUModel().eval())
    packed = pack_model(model, PackingConfig(dtype="int8"))
    short = export_tvm(packed, (torch.randn(1, 20, 12),), tmp_path / "short.so")
    long = export_tvm(packed, (torch.randn(1, 400, 12),), tmp_path / "long.so")
    assert long.size_bytes <= 1.02 * short.size_bytes  # 20× the steps, no bigger (only shape constants differ)
    assert compare_with_torch(packed.dequantized(), long.path, (torch.randn(1, 400, 12),)).worst < FP32_RTOL


def test_failed_export_leaves_nothing(tmp_path):
    model = GRUModel().eval()
    with pytest.raises(RuntimeError):
        export_tvm(model, (torch.randn(1, 5, 7),), tmp_path / "bad.so")  # wrong input width
    assert list(tmp_path.iterdir()) == []


def _elf_machine(path) -> int:
    header = path.read_bytes()[:20]
    assert header[:4] == b"\x7fELF"
    return int.from_bytes(header[18:20], "little")


EM_AARCH64 = 183


def test_aarch64_linux_library_is_an_aarch64_elf(tmp_path):
    model = pruned(GRUModel().eval())
    artifact = export_tvm(pack_model(model, PackingConfig(dtype="int8")), (torch.randn(1, 9, 12),),
                          tmp_path / "gru.so", target="aarch64-linux")
    assert artifact.path.suffix == ".so" and _elf_machine(artifact.path) == EM_AARCH64


def test_android_without_ndk_writes_objects_that_link(tmp_path, monkeypatch):
    monkeypatch.delenv("ANDROID_NDK_HOME", raising=False)
    monkeypatch.delenv("ANDROID_NDK_ROOT", raising=False)
    artifact = export_tvm(pruned(GRUModel().eval()), (torch.randn(1, 9, 12),), tmp_path / "gru.so", target="android")
    assert artifact.path.suffix == ".tar"
    with tarfile.open(artifact.path) as tar:
        objects = [m.name for m in tar.getmembers() if m.name.endswith(".o")]
        tar.extractall(tmp_path / "objects", filter="data")
    assert objects
    linked = tmp_path / "gru_android.so"
    subprocess.run(["ld.lld", "-shared", "-o", str(linked), *(str(tmp_path / "objects" / o) for o in objects)], check=True)
    assert _elf_machine(linked) == EM_AARCH64


def test_unknown_target_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown target 'riscv'"):
        export_tvm(GRUModel().eval(), (torch.randn(1, 5, 12),), tmp_path / "m.so", target="riscv")
    assert list(tmp_path.iterdir()) == []


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def rpc_server():
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "tvm.exec.rpc_server", "--host", "127.0.0.1", "--port", str(port),
                               "--port-end", str(port + 1)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.2)
    yield f"rpc://127.0.0.1:{port}"
    server.terminate()
    server.wait(10)


def test_library_runs_and_is_timed_over_rpc(rpc_server, tmp_path):
    model = pruned(GRUModel().eval())
    packed = pack_model(model, PackingConfig(dtype="int8"))
    example = torch.randn(2, 9, 12)
    artifact = export_tvm(packed, (example,), tmp_path / "gru.so")
    session = connect(rpc_server, timeout_s=30)
    vm = session.load_vm(artifact.path)
    (out,) = run_vm(vm, [example.numpy()], session.device)
    (expected,) = torch_outputs(packed.dequantized(), (example,))
    assert np.abs(out - expected).max() / np.abs(expected).max() < FP32_RTOL
    assert latency_ms(vm, [example.numpy()], session.device, repeat=3, min_repeat_ms=10) > 0


def test_unreachable_device_fails_fast():
    start = time.monotonic()
    with pytest.raises(ConnectionError, match="cannot reach rpc://127.0.0.1"):
        connect(f"rpc://127.0.0.1:{_free_port()}", timeout_s=5)
    assert time.monotonic() - start < 5


def test_silent_device_times_out():
    with socket.socket() as listener:  # accepts the connection, never speaks RPC
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        with pytest.raises(TimeoutError, match="did not answer within 2 s"):
            connect(f"rpc://127.0.0.1:{listener.getsockname()[1]}", timeout_s=2)


@pytest.mark.parametrize("address", ["127.0.0.1:9090", "rpc://host", "tracker://h:9190", "http://h:1"])
def test_bad_device_addresses_are_refused(address):
    with pytest.raises(ValueError, match="device address"):
        parse_address(address)


def test_packed_model_dequantized_carries_stored_weights():
    model = pruned(GRUModel().eval())
    packed = pack_model(model, PackingConfig(dtype="int8"))
    reference = packed.dequantized()
    assert isinstance(packed, PackedModel)
    for name, weight in packed.weights.items():
        assert np.array_equal(dict(reference.named_parameters())[name].detach().numpy(), weight.to_dense())


def test_dynamic_time_axis_one_library_for_every_length(tmp_path):
    """ds2-mini with a run-time time axis: convolutions, matmuls and recurrent loops use the
    kernels whose row / step counts are run-time values."""
    from runtime_tests.tvm_check import TvmModule

    model = pruned(build_model("ds2-mini", hidden=64).eval())
    packed = pack_model(model, PackingConfig(dtype="int8"))
    artifact = export_tvm(packed, (torch.randn(1, 1, 64, 40),), tmp_path / "dyn.so", dynamic_axes={0: [3]})
    reference = packed.dequantized()
    for frames in (17, 40, 123):
        assert compare_with_torch(reference, artifact.path, (torch.randn(1, 1, 64, frames),)).worst < FP32_RTOL
    batch = torch.randn(3, 1, 64, 50)  # three utterances run one by one through the batch-1 library
    with torch.no_grad():
        assert torch.allclose(TvmModule(artifact.path, batch=1)(batch), reference(batch), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="dynamic axes"):
        export_tvm(packed, (torch.randn(1, 1, 64, 40),), tmp_path / "bad.so", dynamic_axes={0: [4]})
