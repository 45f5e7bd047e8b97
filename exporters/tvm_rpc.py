"""A device that runs TVM's RPC server: upload a library, load it in a Relax VM, run and time it.

Addresses: ``rpc://host:port`` (a server started with ``python -m tvm.exec.rpc_server --host
0.0.0.0 --port 9090`` on the device, or TVM's Android RPC app) or ``tracker://host:port/key``
(a TVM RPC tracker that hands out a device registered under ``key``).  Connecting is bounded by
``timeout_s``: an unreachable or silent device is an error within that time, never a hang.
"""

from __future__ import annotations

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


def _bounded(call: Callable[[], T], timeout_s: float, what: str) -> T:
    """``call()`` in a daemon thread; an error if it has not returned within ``timeout_s``."""
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
        raise TimeoutError(f"{what} did not answer within {timeout_s:.0f} s: check that the device's RPC server is "
                           f"running and reachable, or raise the timeout")
    if "error" in result:
        raise ConnectionError(f"{what} failed: {result['error']}") from result["error"]  # type: ignore[misc]
    return result["value"]  # type: ignore[return-value]


class RemoteSession:
    """An open RPC session: ``upload``, :meth:`load_vm` and the remote CPU ``device``."""

    def __init__(self, session: rpc.RPCSession, address: DeviceAddress, timeout_s: float) -> None:
        self.session, self.address, self.timeout_s = session, address, timeout_s
        self.device = session.cpu()

    def load_vm(self, library: str | Path) -> relax.VirtualMachine:
        """Upload ``library`` and load it in a Relax VM on the device."""
        library = Path(library)
        self.session.upload(str(library))
        module = _bounded(lambda: self.session.load_module(library.name), self.timeout_s, f"loading {library.name} on {self.address}")
        return relax.VirtualMachine(module, self.device)


def connect(address: str | DeviceAddress, timeout_s: float = DEFAULT_TIMEOUT_S) -> RemoteSession:
    """Open an RPC session with the device at ``address`` within ``timeout_s``."""
    device = parse_address(address) if isinstance(address, str) else address
    try:
        socket.create_connection((device.host, device.port), timeout=timeout_s).close()
    except OSError as error:
        raise ConnectionError(f"cannot reach {device} ({error.strerror or error}): start the RPC server on the device "
                              f"(python -m tvm.exec.rpc_server --host 0.0.0.0 --port {device.port}) or fix the address") from error
    if device.uses_tracker:
        def open_session() -> rpc.RPCSession:
            return rpc.connect_tracker(device.host, device.port).request(device.key, session_timeout=0)
    else:
        def open_session() -> rpc.RPCSession:
            return rpc.connect(device.host, device.port)
    return RemoteSession(_bounded(open_session, timeout_s, f"the RPC server at {device}"), device, timeout_s)


@contextmanager
def remote_session(address: str | DeviceAddress, timeout_s: float = DEFAULT_TIMEOUT_S) -> Iterator[RemoteSession]:
    """``with remote_session("rpc://127.0.0.1:9090") as s: vm = s.load_vm("model.so")``."""
    yield connect(address, timeout_s)

