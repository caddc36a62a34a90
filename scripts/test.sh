#!/usr/bin/env bash
# kvgen's test command (README): Rust unit tests, then the pytest parity suite against transformers.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo test --lib
python3 -m pytest tests -q -p no:cacheprovider "$@"
