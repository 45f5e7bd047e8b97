"""Compilation targets of the TVM exporter: the host CPU, aarch64 Linux and aarch64 Android.

- ``host``: LLVM for this machine's CPU, ``target.llvm_get_system_cpu`` (TVM's "native" silently
  falls back to a generic CPU, 1–5× slower), plus the AMX features LLVM's host detection finds
  when the CPU's name lacks them (a virtual machine may report a Sapphire Rapids as an older
  model), linked by the C++ compiler (``$CXX``, ``g++``, …).
- ``aarch64-linux``: ``mtriple=aarch64-linux-gnu`` with NEON, linked into a ``.so`` by Debian's
  ``aarch64-linux-gnu-g++`` (package ``g++-aarch64-linux-gnu``).
- ``android``: ``mtriple=aarch64-linux-android`` with NEON.  With an NDK (``ANDROID_NDK_HOME``
  or ``ANDROID_NDK_ROOT``) the library is linked by the NDK's clang into a ``.so``; without one
  the objects are written as a ``.tar`` (by ``tar`` and ``gzip``) and linked on a machine that has the NDK:
  ``tar xf lib.tar && $NDK/toolchains/llvm/prebuilt/linux-x86_64/bin/aarch64-linux-android24-clang -shared -o lib.so *.o``
  (or ``ld.lld -shared -o lib.so *.o``).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import tvm
from tvm.support import cc

ANDROID_API = 24


@dataclass(frozen=True)
class CompileTarget:
    """A TVM target plus how its library is linked (``suffix`` ".so" or ".tar")."""

    name: str
    target: tvm.target.Target
    suffix: str
    fcompile: Callable | None = None

    @property
    def is_host(self) -> bool:
        return self.name == "host"


def host_cpu() -> str:
    """LLVM's name for this machine's CPU (for example ``znver4``)."""
    return str(tvm.get_global_func("target.llvm_get_system_cpu")())


#: CPU features added to the host target when the host has them but its CPU name does not imply
#: them (LLVM's names): the AMX tiles of :mod:`exporters.tvm_amx_conv`.
HOST_EXTRA_FEATURES = ("amx-tile", "amx-int8")


def host_target() -> tvm.target.Target:
    """LLVM target for this machine's CPU: :func:`host_cpu` plus those of
    :data:`HOST_EXTRA_FEATURES` the host has (``tvm.codegen.llvm.GetHostCPUFeatures``)."""
    features = tvm.get_global_func("tvm.codegen.llvm.GetHostCPUFeatures")()
    extra = [f"+{name}" for name in HOST_EXTRA_FEATURES if name in features and bool(features[name])]
    return tvm.target.Target({"kind": "llvm", "mcpu": host_cpu(), **({"mattr": extra} if extra else {})})


def _require(tool: str, package: str, role: str, fix: str) -> str:
    """The path of ``tool``, or a one-line error naming the Debian ``package`` that provides it."""
    path = shutil.which(tool)
    if path is None:
        raise RuntimeError(f"{role} {tool} not found: install the Debian package {package} "
                           f"(apt-get install {package}) or {fix}")
    return path


def _require_host_compiler() -> None:
    if cc.get_cc() is None:  # $CXX, $CC, then g++, gcc, clang++, clang, c++, cc on PATH
        raise RuntimeError("no C++ compiler (g++, gcc, clang++, clang, c++, cc or $CXX) to link the host library: "
                           "install the Debian package g++ (apt-get install g++) or set CXX")


def _android_clang() -> str | None:
    ndk = os.environ.get("ANDROID_NDK_HOME") or os.environ.get("ANDROID_NDK_ROOT")
    if not ndk:
        return None
    clang = Path(ndk) / "toolchains/llvm/prebuilt/linux-x86_64/bin" / f"aarch64-linux-android{ANDROID_API}-clang++"
    if not clang.exists():
        raise RuntimeError(f"no {clang.name} in the NDK at {ndk}: point ANDROID_NDK_HOME at an NDK r21 or newer")
    return str(clang)


TARGET_NAMES = ("host", "aarch64-linux", "android")


def compile_target(name: str) -> CompileTarget:
    """The :class:`CompileTarget` called ``name`` (one of :data:`TARGET_NAMES`)."""
    if name == "host":
        _require_host_compiler()
        return CompileTarget(name, host_target(), ".so")
    if name == "aarch64-linux":
        compiler = _require("aarch64-linux-gnu-g++", "g++-aarch64-linux-gnu", "cross compiler", "use --target host")
        target = tvm.target.Target({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]})
        return CompileTarget(name, target, ".so", cc.cross_compiler(compiler))
    if name == "android":
        target = tvm.target.Target({"kind": "llvm", "mtriple": "aarch64-linux-android", "mattr": ["+neon"]})
        clang = _android_clang()
        if clang is None:
            for tool in ("tar", "gzip"):
                _require(tool, tool, "bundling tool", "set ANDROID_NDK_HOME to link a .so with the NDK")
            return CompileTarget(name, target, ".tar")
        return CompileTarget(name, target, ".so", cc.cross_compiler(clang))
    raise ValueError(f"unknown target {name!r}: use one of {', '.join(TARGET_NAMES)}")
