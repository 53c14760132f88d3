#!/usr/bin/env bash
# The main job, set-up included: train LeNet-5 on the bundled MNIST digits while pruning it with AGP
# (schedules/lenet_agp.yaml), then quantize the pruned model to 8 bits after training
# (schedules/lenet_ptq8.yaml), export it as integers and evaluate the integers. Results in runs/lenet_agp.
# Then structured pruning with thinning: half of LeNet's convolution filters pruned and cut out of the network at
# epoch 4 (schedules/lenet_filters_thin.yaml), and the compute summary of the smaller network. Results in
# runs/lenet_thin. Last, deployment: the quantized model exported to ONNX in QDQ form, and a dense LeNet trained
# the same way as the baseline of a deployment report that measures dense, masked (AGP), thinned and int8 LeNet in
# onnxruntime and libtorch (runs/deploy: ONNX files, deploy_report.csv, deploy_report.svg).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
out=${1:-runs/lenet_agp}
thin=${2:-runs/lenet_thin}
dense=${3:-runs/lenet_dense}
deploy=${4:-runs/deploy}
cargo run --release -- train --arch lenet --dataset mnist --epochs 10 --lr 0.02 --batch-size 32 --seed 1 \
  --compress schedules/lenet_agp.yaml --out "$out"
cargo run --release -- quantize --arch lenet --dataset mnist --checkpoint "$out/checkpoint.safetensors" \
  --config schedules/lenet_ptq8.yaml --calibrate 2 --out "$out/ptq8"
cargo run --release -- train --arch lenet --dataset mnist --epochs 10 --seed 1 \
  --compress schedules/lenet_filters_thin.yaml --out "$thin"
cargo run --release -- summary --arch lenet --dataset mnist --checkpoint "$thin/checkpoint.safetensors" --what compute
cargo run --release -- export --arch lenet --dataset mnist --checkpoint "$out/checkpoint.safetensors" \
  --quantized "$out/ptq8" --out "$out/ptq8/lenet_int8.onnx"
cargo run --release -- train --arch lenet --dataset mnist --epochs 10 --lr 0.02 --batch-size 32 --seed 1 --out "$dense"
cargo run --release -- deploy-report --arch lenet --dataset mnist --dense "$dense/checkpoint.safetensors" \
  --masked "$out/checkpoint.safetensors" --thinned "$thin/checkpoint.safetensors" --quantized "$out/ptq8" --out "$deploy"
