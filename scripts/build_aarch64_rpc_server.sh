#!/usr/bin/env bash
# Builds devices/aarch64_rpc_server.cc, a small TVM RPC server for aarch64 Linux, and prints the
# path of the binary (last line of stdout).  Idempotent: the wheels are downloaded and unpacked once
# (then deleted), and the server is recompiled only when its source, this script or the TVM
# versions change.
#
#   scripts/build_aarch64_rpc_server.sh            # → $CACHE/bin/aarch64_rpc_server
#
# What it does, in $CACHE (default ${COMPRESS_AND_EXPORT_CACHE:-$HOME/.cache/compress-and-export}/aarch64-tvm):
#   include/  tvm_ffi and dlpack headers (the server needs nothing else); tvm/ headers for other tools
#   lib/      libtvm_runtime.so and libtvm_ffi.so for aarch64 (what the server links and loads)
#   bin/      aarch64_rpc_server, linked with rpath $ORIGIN:$ORIGIN/../lib so that it finds the two
#             libraries here, or next to it once copied to a board.
#
# Note: in the 0.27.0.post1 wheel, tvm/runtime/tensor.h includes tvm/support/io.h, which the
# wheel does not ship; code built against the wheel must use the tvm_ffi headers
# (tvm::ffi::Tensor, tvm::ffi::Module, ...) and not tvm/runtime/tensor.h.  The server does.
#
# Environment: PYTHON (the interpreter with the x86 apache-tvm install; default .venv/bin/python,
# else python3), CXX (default aarch64-linux-gnu-g++), TVM_VERSION / TVM_FFI_VERSION (default: the
# installed versions).  Needs Debian's g++-aarch64-linux-gnu and network access for the first run.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
SOURCE="$ROOT/devices/aarch64_rpc_server.cc"
CACHE="${COMPRESS_AND_EXPORT_CACHE:-$HOME/.cache/compress-and-export}/aarch64-tvm"
CXX=${CXX:-aarch64-linux-gnu-g++}
if [ -z "${PYTHON:-}" ]; then
  if [ -x "$ROOT/.venv/bin/python" ]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi

say() { echo "== $*" >&2; }

command -v "$CXX" >/dev/null || {
  echo "error: $CXX not found: install the Debian package g++-aarch64-linux-gnu" >&2; exit 1; }

installed_version() {  # version of an installed distribution, or nothing
  "$PYTHON" -c "import importlib.metadata as m, sys
try: print(m.version(sys.argv[1]))
except m.PackageNotFoundError: pass" "$1" 2>/dev/null || true
}
TVM_VERSION=${TVM_VERSION:-$(installed_version apache-tvm)}
TVM_VERSION=${TVM_VERSION:-0.27.0.post1}
TVM_FFI_VERSION=${TVM_FFI_VERSION:-$(installed_version apache-tvm-ffi)}
if [ -z "$TVM_FFI_VERSION" ]; then
  echo "error: apache-tvm-ffi is not installed for $PYTHON: set PYTHON to the project's venv or TVM_FFI_VERSION" >&2
  exit 1
fi
VERSIONS="apache-tvm==$TVM_VERSION apache-tvm-ffi==$TVM_FFI_VERSION"

# 1-2. Headers and runtime libraries from the aarch64 wheels, fetched again only when the
# versions change; the wheels themselves (~100 MB) are deleted once unpacked.
if [ "$(cat "$CACHE/VERSIONS" 2>/dev/null)" != "$VERSIONS" ] || [ ! -f "$CACHE/lib/libtvm_runtime.so" ] \
   || [ ! -f "$CACHE/lib/libtvm_ffi.so" ] || [ ! -f "$CACHE/include/tvm/ffi/function.h" ]; then
  rm -rf "$CACHE/wheels" "$CACHE/unpack" "$CACHE/include" "$CACHE/lib" "$CACHE/bin" "$CACHE/VERSIONS"
  mkdir -p "$CACHE/wheels"
  say "downloading aarch64 wheels: $VERSIONS"
  "$PYTHON" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
    --platform manylinux_2_28_aarch64 --python-version 3.11 -d "$CACHE/wheels" \
    "apache-tvm==$TVM_VERSION" "apache-tvm-ffi==$TVM_FFI_VERSION" >&2
  tvm_wheel=$(ls "$CACHE"/wheels/apache_tvm-"$TVM_VERSION"-*aarch64*.whl)
  ffi_wheel=$(ls "$CACHE"/wheels/apache_tvm_ffi-"$TVM_FFI_VERSION"-*aarch64*.whl)
  say "unpacking headers and libraries into $CACHE"
  # Only what is needed: not the 240 MB compiler library.
  unzip -q "$tvm_wheel" 'tvm/lib/libtvm_runtime.so' 'tvm/include/*' -d "$CACHE/unpack"
  unzip -q "$ffi_wheel" 'tvm_ffi/lib/libtvm_ffi.so' 'tvm_ffi/include/*' 'tvm_ffi/3rdparty/dlpack/include/*' \
    -d "$CACHE/unpack"
  mkdir -p "$CACHE/include" "$CACHE/lib"
  cp -r "$CACHE/unpack/tvm_ffi/include/tvm" "$CACHE/include/"               # tvm/ffi/...
  cp -r "$CACHE/unpack/tvm_ffi/3rdparty/dlpack/include/dlpack" "$CACHE/include/"
  cp -r "$CACHE/unpack/tvm/include/tvm/." "$CACHE/include/tvm/"             # tvm/runtime/... (see note)
  cp "$CACHE/unpack/tvm/lib/libtvm_runtime.so" "$CACHE/unpack/tvm_ffi/lib/libtvm_ffi.so" "$CACHE/lib/"
  rm -rf "$CACHE/unpack" "$CACHE/wheels"
  echo "$VERSIONS" > "$CACHE/VERSIONS"
fi

# 3. The server (recompiled when its source, this script or the versions are newer).
BINARY="$CACHE/bin/aarch64_rpc_server"
if [ ! -x "$BINARY" ] || [ "$SOURCE" -nt "$BINARY" ] || [ "$0" -nt "$BINARY" ] || [ "$CACHE/VERSIONS" -nt "$BINARY" ]; then
  say "compiling $SOURCE with $CXX"
  mkdir -p "$CACHE/bin"
  # --no-as-needed: the server calls libtvm_runtime only through the global function registry
  # (rpc.ServerLoop), so without it the linker could drop the library the server cannot run without.
  "$CXX" -std=c++17 -O2 -Wall -I "$CACHE/include" -o "$BINARY.tmp" "$SOURCE" \
    -L "$CACHE/lib" -Wl,--no-as-needed -ltvm_runtime -ltvm_ffi -Wl,--as-needed \
    -Wl,-rpath-link,"$CACHE/lib" -Wl,-rpath,'$ORIGIN:$ORIGIN/../lib'
  mv "$BINARY.tmp" "$BINARY"
fi
echo "$BINARY"
