#!/usr/bin/env bash
# The whole test suite, set-up included: unit, integration and doc tests, a build of the benches, and every
# notebook executed by Jupyter (nbclient) with the project's evcxr kernel. Ends with the time of each step.
set -euo pipefail
cd "$(dirname "$0")/.."
steps=()
step_start=$SECONDS
step() { steps+=("$1 $((SECONDS - step_start)) s"); step_start=$SECONDS; }

scripts/setup.sh
scripts/setup-notebooks.sh --jupyter-only
step "set-up"

# The notebook kernel's set-up (building evcxr_jupyter, about 10 minutes on 2 cores, then distill inside evcxr's
# folder, about 6) runs next to the crate's own build and tests. Each of the two leaves a core idle for long
# stretches (one large crate compiling, a link, a test binary with one test left), so together they finish sooner
# than one after the other.
mkdir -p target
notebook_log=target/setup-notebooks.log
scripts/setup-notebooks.sh > "$notebook_log" 2>&1 &
notebook_setup=$!
trap 'kill $notebook_setup 2>/dev/null || true' EXIT

# One libtorch thread per test process. libtest runs two tests at a time here, and the CLI's tests start a process
# each: with libtorch's default of one OpenMP thread per core, two of them spin four threads on two cores, and
# tests/cli.rs took 250 s instead of 104 s.
export OMP_NUM_THREADS=1
cargo test --release --all-targets
step "cargo test"
cargo test --release --doc
step "doc tests"
unset OMP_NUM_THREADS

status=0
wait $notebook_setup || status=$?
trap - EXIT
cat "$notebook_log"
step "waiting for the notebook set-up"
if [ $status -ne 0 ]; then
  echo "test: the notebook set-up failed (exit $status); its output is above and in $notebook_log" >&2
  exit $status
fi
.venv/bin/python scripts/notebooks.py run
step "notebooks"
echo "test.sh: ${steps[*]/%/;} ${SECONDS} s in all"
