"""An emulated aarch64 device: the project's small TVM RPC server, built for aarch64, under qemu.

    with emulated_aarch64_device() as address:          # "rpc://127.0.0.1:PORT"
        session = exporters.tvm_rpc.connect(address)
        vm = session.load_vm(artifact.path)             # an aarch64-linux library
        outputs = runtime_tests.tvm_check.run_vm(vm, inputs, session.device)

The server (``devices/aarch64_rpc_server.cc``) is built by ``scripts/build_aarch64_rpc_server.sh``
when needed (a download of the aarch64 TVM wheels the first time, then seconds) and run with
``qemu-aarch64-static -L /usr/aarch64-linux-gnu``.  It proves that an aarch64 artifact loads and
computes the right numbers on the aarch64 instruction set; timings taken on it say nothing about
a phone or a board (every instruction is emulated).  Needs Debian's ``qemu-user-static``,
``g++-aarch64-linux-gnu`` (which brings the aarch64 C/C++ libraries under /usr/aarch64-linux-gnu)
and, for the first build, network access.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUILD_SCRIPT = ROOT / "scripts" / "build_aarch64_rpc_server.sh"
QEMU = "qemu-aarch64-static"
SYSROOT = Path("/usr/aarch64-linux-gnu")
BUILD_TIMEOUT_S = 600.0
START_TIMEOUT_S = 60.0
READY = "listening on "


class EmulatorUnavailable(RuntimeError):
    """A tool the emulated device needs is missing (the message names the Debian package)."""


def _check_tools() -> str:
    qemu = shutil.which(QEMU)
    if qemu is None:
        raise EmulatorUnavailable(f"{QEMU} not found: install the Debian package qemu-user-static")
    if shutil.which("aarch64-linux-gnu-g++") is None or not (SYSROOT / "lib").is_dir():
        raise EmulatorUnavailable("aarch64-linux-gnu-g++ or the aarch64 libraries in /usr/aarch64-linux-gnu not "
                                  "found: install the Debian package g++-aarch64-linux-gnu")
    return qemu


def build_server() -> Path:
    """Build the aarch64 RPC server if needed (idempotent); the binary's path."""
    _check_tools()
    env = {**os.environ, "PYTHON": os.environ.get("PYTHON", sys.executable)}
    try:
        done = subprocess.run(["bash", str(BUILD_SCRIPT)], check=False, env=env, capture_output=True, text=True,
                              timeout=BUILD_TIMEOUT_S)
    except subprocess.TimeoutExpired as error:
        raise RuntimeError(f"{BUILD_SCRIPT.name} did not finish within {BUILD_TIMEOUT_S:.0f} s") from error
    if done.returncode != 0:
        detail = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise RuntimeError(f"building the aarch64 RPC server failed: {detail}")
    return Path(done.stdout.strip().splitlines()[-1])


def _wait_until_listening(server: subprocess.Popen, log: Path, timeout_s: float) -> int:
    """The port the server printed once it listens; an error if it exits or stays silent."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for line in log.read_text(errors="replace").splitlines():
            if READY in line:
                return int(line.rsplit(":", 1)[1])
        if server.poll() is not None:
            tail = " | ".join(log.read_text(errors="replace").strip().splitlines()[-3:]) or "(no output)"
            raise RuntimeError(f"the emulated aarch64 RPC server exited with code {server.returncode}: {tail}")
        time.sleep(0.1)
    raise TimeoutError(f"the emulated aarch64 RPC server did not listen within {timeout_s:.0f} s")


def _stop(server: subprocess.Popen) -> None:
    """Stop the server and its session process (they share a process group of their own)."""
    if server.poll() is None:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(10)


@contextmanager
def emulated_aarch64_device(port: int | None = None, start_timeout_s: float = START_TIMEOUT_S) -> Iterator[str]:
    """Start the aarch64 RPC server under qemu on 127.0.0.1 and yield its address
    ``rpc://127.0.0.1:PORT`` (``port=None``: a free port the server picks); stopped on exit."""
    qemu = _check_tools()
    binary = build_server()
    lib_dir = binary.parent.parent / "lib"
    with tempfile.TemporaryDirectory(prefix="aarch64-device-") as tmp:
        log = Path(tmp) / "server.log"
        env = {**os.environ, "LD_LIBRARY_PATH": str(lib_dir)}  # read by the emulated aarch64 loader
        with log.open("w") as out:
            server = subprocess.Popen(
                [qemu, "-L", str(SYSROOT), str(binary), "--host", "127.0.0.1", "--port", str(port or 0),
                 "--work-dir", str(Path(tmp) / "work")],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        try:
            bound = _wait_until_listening(server, log, start_timeout_s)
            yield f"rpc://127.0.0.1:{bound}"
        finally:
            _stop(server)
