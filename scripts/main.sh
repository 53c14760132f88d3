#!/usr/bin/env bash
# The main job, set-up included: train LeNet-5 on the bundled MNIST digits while pruning it with AGP
# (schedules/lenet_agp.yaml), then quantize the pruned model to 8 bits after training
# (schedules/lenet_ptq8.yaml), export it as integers and evaluate the integers. Results in runs/lenet_agp.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
out=${1:-runs/lenet_agp}
cargo run --release -- train --arch lenet --dataset mnist --epochs 10 --lr 0.02 --batch-size 32 --seed 1 \
  --compress schedules/lenet_agp.yaml --out "$out"
cargo run --release -- quantize --arch lenet --dataset mnist --checkpoint "$out/checkpoint.safetensors" \
  --config schedules/lenet_ptq8.yaml --calibrate 2 --out "$out/ptq8"
