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

# The tests are built and run inside the crate that the notebook kernel (evcxr) generates in .evcxr/, with evcxr's
# profile (opt-level 2, debug assertions and overflow checks on), target and RUSTFLAGS, and distill's `lazy` feature
# as the notebooks ask for it: cargo then compiles polars, tch and distill once for the tests and the kernel, where a
# release build for the tests and evcxr's build for the notebooks took about 35 minutes of the two cores between
# them. Meanwhile the kernel itself (evcxr_jupyter, about 10 minutes on 2 cores where it is not installed yet) builds
# in the background.
.venv/bin/python scripts/notebooks.py workspace
mkdir -p target
notebook_log=target/setup-notebooks.log
scripts/setup-notebooks.sh --no-prebuild > "$notebook_log" 2>&1 &
notebook_setup=$!
trap 'kill $notebook_setup 2>/dev/null || true' EXIT

# One libtorch thread per test process, as the figures the tests check were measured. (With libtorch's default of
# one OpenMP thread per core, two tests at a time once spun four threads on two cores: tests/cli.rs took 250 s
# instead of 104 s.)
export OMP_NUM_THREADS=1
host=$(rustc -vV | sed -n 's/^host: //p')
kernel_cargo() {
  (cd .evcxr && CARGO_TARGET_DIR=target CARGO_BUILD_BUILD_DIR=target RUSTFLAGS=-Cprefer-dynamic \
    cargo test -p distill --target "$host" "$@")
}
kernel_cargo --all-targets --no-run --message-format=json-render-diagnostics > target/test-executables.json
step "build"
# One test at a time within a test binary. The tests of one binary share libtorch's global random generator: run
# side by side, a test that seeds it and then draws can get another test's draws, and a clean-clone run failed so
# (tests/training.rs, resuming_a_pruning_schedule_restores_pruner_state: "conv1.weight differs after resume").
# Binaries are separate processes, so two of them run at a time instead (cargo runs one after another): 320 s
# wall where the binaries' own times add up to 637 s.
export RUST_TEST_THREADS=1
.venv/bin/python scripts/run_tests.py target/test-executables.json --jobs 2
step "cargo test"
# Each doc test is a process of its own, so they may run side by side.
unset RUST_TEST_THREADS
kernel_cargo --doc
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
# The kernel's first `:dep distill` now finds distill and its dependencies built by the tests.
scripts/setup-notebooks.sh
step "kernel pre-build"
.venv/bin/python scripts/notebooks.py run
step "notebooks"
echo "test.sh: ${steps[*]/%/;} ${SECONDS} s in all"
