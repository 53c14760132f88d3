#!/usr/bin/env bash
# The main job, set-up included: train LeNet-5 on the bundled MNIST digits and save its results in runs/lenet.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo run --release --example lenet_mnist -- "${1:-runs/lenet}"
