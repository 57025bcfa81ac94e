#!/usr/bin/env bash
# Build llama.cpp's llama-server (CPU only) from the llama.cpp source that the llama-cpp-python
# sdist on PyPI carries, and install it into DEST (default: the active Python environment's bin,
# so that it is on PATH with the venv). Used by tests/test_llamacpp.py; about 6 minutes on
# 2 cores. Needs cmake and a C++ compiler (installed with apt-get when missing and root).
set -euo pipefail
VERSION=0.3.36  # llama-cpp-python release whose vendored llama.cpp is built
DEST="${1:-$(python -c 'import os, sys; print(os.path.join(sys.prefix, "bin"))')}"

if ! command -v cmake >/dev/null || ! command -v g++ >/dev/null; then
  if [ "$(id -u)" = "0" ]; then
    apt-get update -qq && apt-get install -y -qq cmake g++ >/dev/null
  else
    echo "cmake and g++ are needed to build llama-server" >&2; exit 1
  fi
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
python -m pip download --quiet --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$work"
tar xzf "$work/llama_cpp_python-$VERSION.tar.gz" -C "$work"
src="$work/llama_cpp_python-$VERSION/vendor/llama.cpp"
cmake -S "$src" -B "$work/build" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF \
  -DGGML_NATIVE=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
  -DLLAMA_BUILD_SERVER=ON >/dev/null
cmake --build "$work/build" --target llama-server -j "$(nproc)" >/dev/null
install -m 755 "$work/build/bin/llama-server" "$DEST/llama-server"
echo "installed $DEST/llama-server"
