#!/usr/bin/env bash
# One-time (and idempotent) set-up of distill's toolchain on a fresh machine:
#   - a project-local virtualenv .venv holding the PyPI wheel torch==2.13.0 (the libtorch tch 0.26 expects);
#     CPU-only by default, which needs just the CUDA runtime and CUPTI libraries (51 MB) beside the 526 MB wheel;
#     `--cuda` (or DISTILL_CUDA=1) installs the wheel's full CUDA dependency set (about 2.7 GB) for GPU machines;
#   - a link .libtorch -> .venv/.../site-packages/torch, which .cargo/config.toml hands to tch as LIBTORCH.
#   - TensorBoard's Python package (the tests read our event files with its EventAccumulator);
# Afterwards plain `cargo build`, `cargo test` and `cargo run` work with no variable set by hand.
set -euo pipefail
cd "$(dirname "$0")/.."

TORCH_VERSION=2.13.0
cuda=${DISTILL_CUDA:-0}
for arg in "$@"; do
  case "$arg" in
    --cuda) cuda=1 ;;
    -h|--help) sed -n '2,8p' "$0"; exit 0 ;;
    *) echo "setup.sh: unknown option '$arg' (valid: --cuda)" >&2; exit 2 ;;
  esac
done

command -v cargo >/dev/null || { echo "setup.sh: cargo not found; install Rust with rustup first" >&2; exit 1; }
python=${PYTHON:-python3}
command -v "$python" >/dev/null || { echo "setup.sh: $python not found; install Python 3.9+ with venv" >&2; exit 1; }

if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  "$python" -m venv .venv
fi
site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')

have_torch=$( (.venv/bin/python -m pip show torch 2>/dev/null || true) | sed -n "s/^Version: //p")
if [ "$cuda" = 1 ]; then
  if [ ! -d "$site/nvidia/cublas" ] || [ "${have_torch%%+*}" != "$TORCH_VERSION" ]; then
    echo "setup: installing torch==$TORCH_VERSION with its full CUDA set (about 3.3 GB)"
    .venv/bin/python -m pip install --disable-pip-version-check -q "torch==$TORCH_VERSION"
  fi
elif [ "${have_torch%%+*}" != "$TORCH_VERSION" ] || [ ! -d "$site/nvidia/cu13/lib" ]; then
  echo "setup: installing torch==$TORCH_VERSION (CPU use: wheel plus CUDA runtime and CUPTI only, about 580 MB)"
  .venv/bin/python -m pip install --disable-pip-version-check -q --no-deps "torch==$TORCH_VERSION" \
    "cuda-toolkit[cudart,cupti]==13.0.3" nvidia-cuda-runtime==13.0.96 nvidia-cuda-cupti==13.0.85
fi

# onnx and onnxruntime are the test oracle of the ONNX export (tests/onnx.rs through scripts/onnx_run.py).
if ! .venv/bin/python -c "import onnx, onnxruntime" 2>/dev/null; then
  echo "setup: installing onnx and onnxruntime (the ONNX export's test oracle)"
  .venv/bin/python -m pip install --disable-pip-version-check -q "onnx==1.19.1" "onnxruntime==1.23.2" 2>&1 | grep -v "^torch 2.13.0 requires\|dependency resolver\|dependency conflicts" || true
  .venv/bin/python -c "import onnx, onnxruntime" || { echo "setup: onnx and onnxruntime did not install" >&2; exit 1; }
fi

# TensorBoard's own reader checks our event files in the test suite (tests/tensorboard.rs); its resolver
# complains about torch's uninstalled CUDA dependencies, which the CPU set-up leaves out on purpose.
if ! .venv/bin/python -c "import tensorboard" 2>/dev/null; then
  echo "setup: installing tensorboard (used by the tests to read our event files)"
  .venv/bin/python -m pip install --disable-pip-version-check -q "tensorboard==2.21.0" 2>&1 | grep -v "^torch 2.13.0 requires\|dependency resolver\|dependency conflicts" || true
fi

# Only when it changes: scripts/test.sh runs this again in the background while cargo reads through the link.
[ "$(readlink .libtorch 2>/dev/null)" = "$site/torch" ] || ln -sfn "$site/torch" .libtorch
[ -f .libtorch/lib/libtorch_cpu.so ] || { echo "setup.sh: $site/torch/lib/libtorch_cpu.so missing; remove .venv and rerun" >&2; exit 1; }
echo "setup: libtorch $TORCH_VERSION at $site/torch"
