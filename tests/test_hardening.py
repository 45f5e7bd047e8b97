"""Bad inputs end in a one-line error that names the problem and the fix, exit code 2 on the
command line, and no partial artifact: a missing cross compiler or NDK, an RPC device or tracker
that hangs or hangs up, a block larger than a weight, a pruning group that matches nothing."""

import shutil
import socket
import struct
import tarfile
import threading
import time
from collections.abc import Iterator

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from compressor import BlockShape, MagnitudePruner, OneShot, PruneGroup
from compressor.masking import find_mask
from compressor.selection import LINEAR_TYPES, RECURRENT_TYPES
from exporters.tvm_rpc import TIMEOUT_ENV, connect, default_timeout_s
from pipeline.cli import main

from .models import GRU_FACTORY_SOURCE

FACTORY = GRU_FACTORY_SOURCE + '''
class Convs(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3)
        self.conv2 = nn.Conv2d(4, 4, 3)

    def forward(self, x):
        return self.conv2(torch.relu(self.conv1(x)))

def build_convs():
    torch.manual_seed(0)
    return Convs()
'''
TIMEOUT_S = 2
HANG_BOUND_S = 15  # an upper bound on a hang, not a timing benchmark


@pytest.fixture
def factory(tmp_path):
    path = tmp_path / "netdef.py"
    path.write_text(FACTORY)
    return path


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def one_line_error(result) -> str:
    """The error line of a CLI result that exited with 2 (bad input) and printed only that line."""
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    return lines[0]


def export_args(factory, out, target):
    return ["export", "--model", f"{factory}:build", "--data", "none", "--input-shape", "1,9,12", "--format", "tvm",
            "--target", target, "--out", out, "--quiet"]


# ------------------------------------------------------------------------- compilers and tools


@pytest.fixture
def path_with(tmp_path, monkeypatch):
    """``path_with("tar")``: PATH becomes a folder holding only links to those tools."""
    def restrict(*tools: str) -> None:
        folder = tmp_path / "bin"
        folder.mkdir()
        for tool in tools:
            (folder / tool).symlink_to(shutil.which(tool))
        monkeypatch.setenv("PATH", str(folder))

    monkeypatch.delenv("ANDROID_NDK_HOME", raising=False)
    monkeypatch.delenv("ANDROID_NDK_ROOT", raising=False)
    return restrict


def test_missing_cross_compiler_names_the_package(factory, tmp_path, path_with):
    path_with("gcc", "g++")
    out = tmp_path / "out"
    line = one_line_error(invoke(*export_args(factory, out, "aarch64-linux")))
    assert "cross compiler aarch64-linux-gnu-g++ not found" in line and "apt-get install g++-aarch64-linux-gnu" in line
    assert "--target host" in line
    assert not list(out.glob("*.so")) and not list(out.glob("*.tar"))


def test_missing_host_compiler_names_the_package(factory, tmp_path, path_with, monkeypatch):
    path_with()
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.delenv("CC", raising=False)
    out = tmp_path / "out"
    line = one_line_error(invoke(*export_args(factory, out, "host")))
    assert "no C++ compiler" in line and "apt-get install g++" in line
    assert not list(out.glob("*.so"))


def test_android_with_a_broken_ndk_names_it(factory, tmp_path, monkeypatch):
    ndk = tmp_path / "ndk"
    ndk.mkdir()
    monkeypatch.setenv("ANDROID_NDK_HOME", str(ndk))
    out = tmp_path / "out"
    line = one_line_error(invoke(*export_args(factory, out, "android")))
    assert f"no aarch64-linux-android24-clang++ in the NDK at {ndk}" in line and "ANDROID_NDK_HOME" in line
    assert not list(out.glob("*.so")) and not list(out.glob("*.tar"))


def test_android_without_ndk_or_gzip_names_the_package(factory, tmp_path, path_with):
    path_with("tar")
    out = tmp_path / "out"
    line = one_line_error(invoke(*export_args(factory, out, "android")))
    assert "gzip not found: install the Debian package gzip" in line and "ANDROID_NDK_HOME" in line
    assert not list(out.glob("*.tar"))


def test_android_without_ndk_or_linker_writes_objects(factory, tmp_path, path_with):
    """No NDK and no ld.lld is not an error: the objects are written as a .tar, to be linked on a
    machine that has the NDK (only tar and gzip are needed here)."""
    path_with("tar", "gzip")
    out = tmp_path / "out"
    result = invoke(*export_args(factory, out, "android"))
    assert result.exit_code == 0, result.output
    assert (out / "model-android.tar").exists() and not list(out.glob("*.so"))
    with tarfile.open(out / "model-android.tar") as tar:
        assert any(name.endswith(".o") for name in tar.getnames())


# ------------------------------------------------------------------------- RPC devices


def serve(mode: str, tracker_magic: bytes | None = None) -> Iterator[int]:
    """A local TCP server on a free port that accepts connections and then either never answers
    (``"hang"``) or closes them at once (``"close"``); with ``tracker_magic`` it first answers
    the tracker handshake, then never answers the request (a tracker with no free device)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    held: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            if mode == "close":
                conn.close()
                continue
            held.append(conn)
            if tracker_magic is not None:
                conn.recv(4)
                conn.sendall(tracker_magic)

    threading.Thread(target=accept, daemon=True).start()
    yield listener.getsockname()[1]
    listener.close()
    for conn in held:
        conn.close()


@pytest.fixture
def hanging_port():
    yield from serve("hang")


@pytest.fixture
def closing_port():
    yield from serve("close")


@pytest.fixture
def queueing_tracker_port():
    from tvm.rpc.base import RPC_TRACKER_MAGIC

    yield from serve("hang", struct.pack("<i", RPC_TRACKER_MAGIC))


def assert_bounded_error(address: str, error: type[Exception], *phrases: str) -> None:
    start = time.monotonic()
    with pytest.raises(error) as caught:
        connect(address, timeout_s=TIMEOUT_S)
    assert time.monotonic() - start < HANG_BOUND_S
    message = str(caught.value)
    assert "\n" not in message and address in message, message
    for phrase in phrases:
        assert phrase in message, message


def test_hanging_rpc_server_times_out(hanging_port):
    assert_bounded_error(f"rpc://127.0.0.1:{hanging_port}", TimeoutError, "did not answer within 2 s",
                         "python -m tvm.exec.rpc_server", TIMEOUT_ENV)


def test_rpc_server_that_hangs_up_fails_at_once(closing_port):
    assert_bounded_error(f"rpc://127.0.0.1:{closing_port}", ConnectionError, "failed (",
                         "python -m tvm.exec.rpc_server")


def test_hanging_tracker_times_out(hanging_port):
    assert_bounded_error(f"tracker://127.0.0.1:{hanging_port}/phone", TimeoutError, "the RPC tracker",
                         "python -m tvm.exec.rpc_tracker", "key 'phone'")


def test_tracker_without_a_free_device_times_out(queueing_tracker_port):
    assert_bounded_error(f"tracker://127.0.0.1:{queueing_tracker_port}/phone", TimeoutError,
                         "did not answer within 2 s", "a free device is registered under key 'phone'")


def test_tracker_that_hangs_up_fails_at_once(closing_port):
    assert_bounded_error(f"tracker://127.0.0.1:{closing_port}/phone", ConnectionError, "the RPC tracker",
                         "failed (")


@pytest.mark.parametrize("value, message", [("soon", "not a number"), ("0", "not positive")])
def test_bad_timeout_setting_is_refused(value, message, monkeypatch):
    monkeypatch.setenv(TIMEOUT_ENV, value)
    with pytest.raises(ValueError, match=f"{TIMEOUT_ENV}='{value}' is {message}"):
        default_timeout_s()


def test_check_on_a_hanging_device_exits_2_in_bounded_time(hanging_port, tmp_path, monkeypatch):
    from exporters.tvm import export_tvm

    library = export_tvm(nn.Linear(6, 3).eval(), (torch.randn(1, 6),), tmp_path / "tiny.so").path
    monkeypatch.setenv(TIMEOUT_ENV, str(TIMEOUT_S))
    start = time.monotonic()
    result = invoke("check", library, "--input-shape", "1,6", "--device", f"rpc://127.0.0.1:{hanging_port}")
    assert time.monotonic() - start < HANG_BOUND_S
    line = one_line_error(result)
    assert f"rpc://127.0.0.1:{hanging_port} did not answer within 2 s" in line and "rpc_server" in line


# ------------------------------------------------------------------------- pruning groups and blocks


@pytest.mark.parametrize("block", [BlockShape(64, 64), BlockShape(6, 33)])
def test_block_larger_than_a_weight_is_refused_before_any_mask(block):
    model = nn.Sequential(nn.Linear(32, 64), nn.Linear(32, 5))  # 1.weight is 5x32
    pruner = MagnitudePruner([PruneGroup(OneShot(0.5), block=block)])
    with pytest.raises(ValueError) as caught:
        pruner.prepare(model)
    message = str(caught.value)
    assert f"block {block} is larger than 1.weight (5, 32) in both dimensions" in message
    assert "at most 5 rows or 32 columns" in message and "exclude='^1\\.weight$'" in message
    assert all(find_mask(m, "weight") is None for m in model)  # nothing attached: the model is unchanged


def test_block_larger_than_a_conv_names_its_matrix_view():
    conv = nn.Conv2d(4, 6, 3)
    with pytest.raises(ValueError, match=r"weight \(6, 4, 3, 3\) viewed as 6x36 in both dimensions"):
        MagnitudePruner([PruneGroup(OneShot(0.5), block=BlockShape(8, 40))]).prepare(conv)


@pytest.mark.parametrize("block", [BlockShape(16, 1), BlockShape(64, 32), BlockShape(1, 64), BlockShape(5, 32)])
def test_blocks_larger_in_one_dimension_stay_legal(block):
    torch.manual_seed(0)
    layer = nn.Linear(32, 5)
    pruner = MagnitudePruner([PruneGroup(OneShot(0.5), block=block)])
    pruner.prepare(layer)
    pruner.step()
    (row,) = pruner.report()
    assert row.blocks_total == -(-5 // block.rows) * -(-32 // block.cols)


def test_excluding_the_small_layer_lets_the_block_apply():
    model = nn.Sequential(nn.Linear(32, 64), nn.Linear(64, 5))
    pruner = MagnitudePruner([PruneGroup(OneShot(0.5), block=BlockShape(8, 8), exclude=r"^1\.weight$")])
    pruner.prepare(model)
    assert [ref.name for ref in pruner.weights] == ["0.weight"]


def test_group_matching_no_weight_names_what_the_model_has():
    class Convs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1, self.conv2 = nn.Conv2d(1, 4, 3), nn.Conv2d(4, 4, 3)

    model = Convs()
    group = PruneGroup(OneShot(0.5), types=LINEAR_TYPES + RECURRENT_TYPES, name="linear+recurrent")
    with pytest.raises(ValueError) as caught:
        MagnitudePruner([group]).prepare(model)
    message = str(caught.value)
    assert "no prunable weight matches pruning group 'linear+recurrent' (types Linear, RNN, GRU, LSTM)" in message
    assert "the model has conv1.weight (Conv2d), conv2.weight (Conv2d)" in message and "include" in message
    assert "\n" not in message and find_mask(model.conv1, "weight") is None


def test_second_group_matching_nothing_attaches_no_mask():
    model = nn.Sequential(nn.Linear(4, 4), nn.GRU(4, 4))
    groups = [PruneGroup(OneShot(0.5), types=RECURRENT_TYPES), PruneGroup(OneShot(0.5), include="^head")]
    with pytest.raises(ValueError, match="pruning group 1 .*include '\\^head'.*the model has 0.weight \\(Linear\\)"):
        MagnitudePruner(groups).prepare(model)
    assert find_mask(model[1], "weight_hh_l0") is None


def test_group_whose_weights_an_earlier_group_took_is_legal():
    model = nn.Sequential(nn.GRU(4, 4))
    pruner = MagnitudePruner([PruneGroup(OneShot(0.5), types=RECURRENT_TYPES), PruneGroup(OneShot(0.5))])
    pruner.prepare(model)
    assert len(pruner.weights) == 2


@pytest.mark.parametrize("model, modules", [(nn.Sequential(), "(Sequential)"),
                                            (nn.Sequential(nn.ReLU(), nn.BatchNorm1d(3)), "(BatchNorm1d, ReLU, Sequential)")])
def test_model_without_prunable_layers_says_so(model, modules):
    with pytest.raises(ValueError) as caught:
        MagnitudePruner([PruneGroup(OneShot(0.5))]).prepare(model)
    message = str(caught.value)
    assert f"the model {modules} has no Linear, Conv1d, Conv2d, RNN, GRU, LSTM, Embedding layer" in message
    assert "--method none" in message and "nn.ModuleList" in message


def test_cli_prune_with_too_large_a_block_exits_2(factory, tmp_path):
    out = tmp_path / "out"
    line = one_line_error(invoke("prune", "--model", f"{factory}:build", "--data", "none", "--input-shape", "1,9,12",
                                 "--method", "hard", "--block", "64x64", "--out", out, "--quiet"))
    assert "block 64x64 is larger than fc.weight (5, 32)" in line and "exclude=" in line
    assert not out.exists() or not list(out.iterdir())


def test_cli_prune_of_a_conv_only_model_exits_2(factory, tmp_path):
    out = tmp_path / "out"
    line = one_line_error(invoke("prune", "--model", f"{factory}:build_convs", "--data", "none", "--input-shape",
                                 "1,1,8,8", "--method", "hard", "--out", out, "--quiet"))
    assert "pruning group 'linear+recurrent'" in line and "conv1.weight (Conv2d)" in line
    assert not out.exists() or not list(out.iterdir())
