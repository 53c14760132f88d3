#!/usr/bin/env bash
# The whole test suite, set-up included: unit, integration and doc tests, a build of the benches, and every
# notebook executed by Jupyter (nbclient) with the project's evcxr kernel.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo test --release --all-targets
cargo test --release --doc
scripts/setup-notebooks.sh
.venv/bin/python scripts/notebooks.py run
