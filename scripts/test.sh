#!/usr/bin/env bash
# The whole test suite, set-up included: unit, integration and doc tests, and a build of the benches.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo test --release --all-targets
cargo test --release --doc
