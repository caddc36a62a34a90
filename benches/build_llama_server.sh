#!/usr/bin/env bash
# Builds llama.cpp's `llama-server` for benches/bench_serve.py from the llama.cpp sources vendored
# in the llama-cpp-python sdist (PyPI) with cmake (PyPI); never run in CI. Prints the binary's path.
#   bash benches/build_llama_server.sh [DIR]      (default DIR: .bench/llama-server)
# LLAMA_CMAKE_ARGS adds cmake flags; e.g. "-DGGML_NATIVE=OFF -DGGML_AVX512=ON -DGGML_AMX_TILE=OFF
# -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF" where llama.cpp's AMX path faults (the Intel VM).
set -euo pipefail
dir="${1:-.bench/llama-server}"
version="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
mkdir -p "$dir"
cd "$dir"
if [ ! -x build/bin/llama-server ]; then
  python3 -m pip install -q cmake
  # The sdist itself from PyPI's simple index (JSON form); pip download would build its metadata.
  url=$(python3 -c "
import json, urllib.request
req = urllib.request.Request('https://pypi.org/simple/llama-cpp-python/', headers={'Accept': 'application/vnd.pypi.simple.v1+json'})
files = json.load(urllib.request.urlopen(req))['files']
print(next(f['url'] for f in files if f['filename'] == 'llama_cpp_python-$version.tar.gz'))")
  python3 -c "import sys, urllib.request; urllib.request.urlretrieve(sys.argv[1], 'sdist.tar.gz')" "$url"
  tar xzf sdist.tar.gz
  src="llama_cpp_python-$version/vendor/llama.cpp"
  # shellcheck disable=SC2086
  cmake -S "$src" -B build -DCMAKE_BUILD_TYPE=Release -DLLAMA_BUILD_SERVER=ON -DLLAMA_CURL=OFF \
    -DGGML_NATIVE=ON ${LLAMA_CMAKE_ARGS:-} > cmake.log
  cmake --build build --target llama-server -j "$(nproc)" > build.log
fi
echo "$(pwd)/build/bin/llama-server"
