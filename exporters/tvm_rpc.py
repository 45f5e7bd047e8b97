"""A device that runs TVM's RPC server: upload a library, load it in a Relax VM, run and time it.

Addresses: ``rpc://host:port`` (a server started with ``python -m tvm.exec.rpc_server --host
0.0.0.0 --port 9090`` on the device, or TVM's Android RPC app) or ``tracker://host:port/key``
(a TVM RPC tracker that hands out a device registered under ``key``).  Connecting, uploading and
loading are each bounded by ``timeout_s`` (default ``$COMPRESS_AND_EXPORT_RPC_TIMEOUT`` seconds,
else 30): an unreachable, silent or closing device or tracker is a one-line error within that
time, never a hang.
"""

from __future__ import annotations

import os
import re
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlparse

from tvm import relax, rpc

DEFAULT_TIMEOUT_S = 30.0
TIMEOUT_ENV = "COMPRESS_AND_EXPORT_RPC_TIMEOUT"
T = TypeVar("T")


@dataclass(frozen=True)
class DeviceAddress:
    """A parsed device address."""

    host: str
    port: int
    key: str | None = None

    @property
    def uses_tracker(self) -> bool:
        return self.key is not None

    def __str__(self) -> str:
        return f"tracker://{self.host}:{self.port}/{self.key}" if self.key else f"rpc://{self.host}:{self.port}"


def parse_address(address: str) -> DeviceAddress:
    """``rpc://host:port`` or ``tracker://host:port/key`` → :class:`DeviceAddress`."""
    parsed = urlparse(address)
    if parsed.scheme not in ("rpc", "tracker") or not parsed.hostname or not parsed.port:
        raise ValueError(f"device address {address!r}: use rpc://HOST:PORT or tracker://HOST:PORT/KEY")
    key = parsed.path.strip("/") or None
    if parsed.scheme == "tracker" and not key:
        raise ValueError(f"device address {address!r} names a tracker but no device key: use tracker://HOST:PORT/KEY")
    return DeviceAddress(parsed.hostname, parsed.port, key if parsed.scheme == "tracker" else None)


def default_timeout_s() -> float:
    """``$COMPRESS_AND_EXPORT_RPC_TIMEOUT`` (seconds) if set, else :data:`DEFAULT_TIMEOUT_S`."""
    text = os.environ.get(TIMEOUT_ENV, "")
    try:
        value = float(text) if text else DEFAULT_TIMEOUT_S
    except ValueError:
        raise ValueError(f"{TIMEOUT_ENV}={text!r} is not a number: set it to seconds, e.g. 60") from None
    if value <= 0:
        raise ValueError(f"{TIMEOUT_ENV}={text!r} is not positive: set it to seconds, e.g. 60")
    return value


def _reason(error: BaseException) -> str:
    """The informative line of an error: TVM's RPC errors start with a header ("Error caught from
    RPC call:") and put the cause (e.g. "Failed to load dynamic shared library …") below it."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip() and not line.strip().endswith(":")]
    if not lines:
        return type(error).__name__
    informative = [line for line in lines if re.search(r"fail|error|cannot|refused|reset|broken", line, re.I)]
    return re.sub(r"^\[[\d:.]+\]\s+\S+:\d+:\s*", "", (informative or lines)[0])


def _bounded(call: Callable[[], T], timeout_s: float, what: str, fix: str) -> T:
    """``call()`` in a daemon thread; a one-line error naming ``what`` and the ``fix`` if it
    raises or has not returned within ``timeout_s`` (the thread is then left blocked)."""
    result: dict[str, object] = {}

    def run() -> None:
        try:
            result["value"] = call()
        except Exception as error:  # noqa: BLE001 - re-raised in the caller's thread
            result["error"] = error

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(timeout_s)
    if worker.is_alive():
        raise TimeoutError(f"{what} did not answer within {timeout_s:.0f} s: {fix}, or raise the timeout "
                           f"(timeout_s or {TIMEOUT_ENV}=SECONDS)")
    if "error" in result:
        error = result["error"]
        raise ConnectionError(f"{what} failed ({_reason(error)}): {fix}") from error  # type: ignore[misc, arg-type]
    return result["value"]  # type: ignore[return-value]


def _server_fix(device: DeviceAddress) -> str:
    return (f"check that {device.host} runs TVM's RPC server on port {device.port} (python -m tvm.exec.rpc_server "
            f"--host 0.0.0.0 --port {device.port}) and that no other client holds it")


def _tracker_fix(device: DeviceAddress) -> str:
    return (f"check that {device.host} runs TVM's RPC tracker on port {device.port} (python -m tvm.exec.rpc_tracker "
            f"--port {device.port}) and that a free device is registered under key {device.key!r} "
            f"(python -m tvm.exec.query_rpc_tracker --port {device.port})")


class RemoteSession:
    """An open RPC session: ``upload``, :meth:`load_vm` and the remote CPU ``device``."""

    def __init__(self, session: rpc.RPCSession, address: DeviceAddress, timeout_s: float) -> None:
        self.session, self.address, self.timeout_s = session, address, timeout_s
        self.device = session.cpu()

    def load_vm(self, library: str | Path) -> relax.VirtualMachine:
        """Upload ``library`` and load it in a Relax VM on the device."""
        library = Path(library)
        _bounded(lambda: self.session.upload(str(library)), self.timeout_s, f"uploading {library.name} to {self.address}",
                 "check that the device is still reachable and has room in its RPC server's folder")
        module = _bounded(lambda: self.session.load_module(library.name), self.timeout_s,
                          f"loading {library.name} on {self.address}",
                          "check that the library was compiled for the device (--target aarch64-linux or android)")
        return relax.VirtualMachine(module, self.device)


def connect(address: str | DeviceAddress, timeout_s: float | None = None) -> RemoteSession:
    """Open an RPC session with the device at ``address`` within ``timeout_s`` (default:
    :func:`default_timeout_s`)."""
    device = parse_address(address) if isinstance(address, str) else address
    timeout_s = default_timeout_s() if timeout_s is None else timeout_s
    fix = _tracker_fix(device) if device.uses_tracker else _server_fix(device)
    try:
        socket.create_connection((device.host, device.port), timeout=timeout_s).close()
    except OSError as error:
        raise ConnectionError(f"cannot reach {device} ({error.strerror or error}): {fix}, or fix the address") from error
    if device.uses_tracker:
        def open_session() -> rpc.RPCSession:
            return rpc.connect_tracker(device.host, device.port).request(device.key, session_timeout=0)
        what = f"the RPC tracker at {device}"
    else:
        def open_session() -> rpc.RPCSession:
            return rpc.connect(device.host, device.port)
        what = f"the RPC server at {device}"
    return RemoteSession(_bounded(open_session, timeout_s, what, fix), device, timeout_s)


@contextmanager
def remote_session(address: str | DeviceAddress, timeout_s: float | None = None) -> Iterator[RemoteSession]:
    """``with remote_session("rpc://127.0.0.1:9090") as s: vm = s.load_vm("model.so")``."""
    yield connect(address, timeout_s)
