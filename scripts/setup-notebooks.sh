#!/usr/bin/env bash
# Notebook set-up (after scripts/setup.sh): the evcxr Rust kernel, Jupyter and nbclient in .venv, a kernelspec
# "Rust (distill)" whose environment finds libtorch and keeps evcxr's build folder (.evcxr) between kernel
# starts, and a first build of distill inside that folder so a notebook's `:dep distill` is quick.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
jupyter_only=0
prebuild=1
for arg in "$@"; do
  case "$arg" in
    --jupyter-only) jupyter_only=1 ;;
    --no-prebuild) prebuild=0 ;;
    *) echo "setup-notebooks.sh: unknown option '$arg' (valid: --jupyter-only, --no-prebuild)" >&2; exit 2 ;;
  esac
done
scripts/setup.sh

# Jupyter first: `--jupyter-only` stops after it, so scripts/test.sh can finish changing .venv before its tests
# start Python from there, and then build the kernel while they run.
if ! .venv/bin/python -c "import nbclient, jupyterlab" 2>/dev/null; then
  echo "setup-notebooks: installing jupyterlab and nbclient into .venv"
  .venv/bin/python -m pip install --disable-pip-version-check -q jupyterlab nbclient nbformat 2>&1 | grep -v "^torch 2.13.0 requires\|dependency resolver\|dependency conflicts" || true
fi
[ "$jupyter_only" = 1 ] && exit 0

rustup component add rust-src >/dev/null 2>&1 || echo "setup-notebooks: could not add rust-src (evcxr's completions need it)" >&2
if ! cargo install --list 2>/dev/null | grep -q "^evcxr_jupyter v0.22.0:"; then
  echo "setup-notebooks: building evcxr_jupyter 0.22.0 (about 10 minutes on 2 cores)"
  start=$SECONDS
  # From /, so that the project's .cargo/config.toml (its foldhash patch) does not meet evcxr's own lock file.
  (cd / && cargo install evcxr_jupyter --locked --version 0.22.0 --quiet)
  echo "setup-notebooks: evcxr_jupyter built in $((SECONDS - start)) s"
fi

kernel=.venv/share/jupyter/kernels/rust-distill
mkdir -p "$kernel" .evcxr
torch_lib=$(cd .libtorch/lib && pwd -P)
# No LIBTORCH here: evcxr's builds in .evcxr/ take it from .cargo/config.toml, as scripts/test.sh's builds there do.
# Another value, even the same folder by another path, makes cargo rebuild tch and distill for the kernel.
cat > "$kernel/kernel.json" <<JSON
{
  "argv": ["$(command -v evcxr_jupyter)", "--control_file", "{connection_file}"],
  "display_name": "Rust (distill)",
  "language": "rust",
  "interrupt_mode": "message",
  "env": {
    "LD_LIBRARY_PATH": "$torch_lib",
    "EVCXR_TMPDIR": "$root/.evcxr",
    "DISTILL_ROOT": "$root"
  }
}
JSON
echo "setup-notebooks: kernelspec $kernel (open notebooks/ with: .venv/bin/jupyter lab --notebook-dir notebooks)"

[ "$prebuild" = 0 ] && exit 0

# Build distill once inside evcxr's folder: the first `:dep distill` of a notebook then only relinks.
[ -f .evcxr/Cargo.toml ] || .venv/bin/python scripts/notebooks.py workspace
if [ ! -f .evcxr/.distill-prebuilt ] || [ -n "$(find src Cargo.toml vendor .cargo/config.toml scripts/notebooks.py -newer .evcxr/.distill-prebuilt 2>/dev/null | head -1)" ]; then
  echo "setup-notebooks: pre-building distill for the kernel (several minutes the first time)"
  .venv/bin/python scripts/notebooks.py prebuild
  touch .evcxr/.distill-prebuilt
fi
echo "setup-notebooks: ready in $SECONDS s"
