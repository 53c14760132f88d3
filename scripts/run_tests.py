#!/usr/bin/env python3
"""Runs the test executables that `cargo test --no-run --message-format=json` built, several binaries at a time.

cargo runs one test binary after another; with one test at a time inside each (the tests of one binary share
libtorch's global random generator) that left one of CI's two cores idle for most of the ten minutes the tests
take. Separate binaries are separate processes, so they can run side by side. This runs what `cargo test` would
run, in the package's folder as cargo does, starting the slowest binaries first so the last ones to finish are
short, prints each binary's output whole when it ends (never interleaved), and ends with a table of times.

    cargo test --all-targets --no-run --message-format=json-render-diagnostics > built.json
    python3 scripts/run_tests.py built.json [--jobs 2]

Exit status: 0 when every binary passed, 1 otherwise (every binary runs either way, so one failure does not hide
another).
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor, as_completed

# Binaries known to take longest ("kind name"; seconds two at a time on the 2-core machine, stop 30: cli 163,
# onnx 125, schedules 83, quantization 72, imagenet_zoo 61, thinning 24, bench train_step 22, training 17): started
# first. Anything not listed starts after them, in cargo's order. A stale list only costs a little wall time.
SLOWEST_FIRST = ["test cli", "test onnx", "test schedules", "test quantization", "test imagenet_zoo", "test thinning", "bench train_step", "test training"]


def test_executables(json_path):
    """(name, kind, executable, package folder) of every test-mode artifact, in cargo's order."""
    found = []
    with open(json_path) as f:
        for line in f:
            line = line.strip()
            if not line.startswith("{"):
                continue
            message = json.loads(line)
            if message.get("reason") != "compiler-artifact" or not message.get("executable"):
                continue
            if not message["profile"]["test"]:
                continue
            target = message["target"]
            found.append((target["name"], target["kind"][0], message["executable"], os.path.dirname(message["manifest_path"])))
    return found


def run_one(test):
    name, kind, executable, folder = test
    start = time.monotonic()
    with tempfile.TemporaryFile() as output:
        code = subprocess.call([executable], cwd=folder, stdout=output, stderr=subprocess.STDOUT)
        output.seek(0)
        text = output.read().decode("utf-8", "replace")
    return name, kind, code, time.monotonic() - start, text


def run_all(tests, jobs):
    """Runs the tests `jobs` at a time, printing each binary's output when it ends; returns (name, kind, exit, s)."""
    results = []
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        for future in as_completed([pool.submit(run_one, t) for t in tests]):
            name, kind, code, seconds, text = future.result()
            status = "ok" if code == 0 else f"FAILED (exit {code})"
            print(f"\n===== {kind} {name}: {status} in {seconds:.1f} s =====", flush=True)
            print(text, end="" if text.endswith("\n") else "\n", flush=True)
            results.append((name, kind, code, seconds))
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("built", help="cargo's JSON messages from `cargo test --no-run --message-format=json`")
    parser.add_argument("--jobs", type=int, default=2, help="test binaries at a time (default 2)")
    args = parser.parse_args()
    tests = test_executables(args.built)
    if not tests:
        sys.exit(f"run_tests: no test executable in {args.built}; was it written by `cargo test --no-run --message-format=json`?")
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    tests.sort(key=lambda t: rank.get(f"{t[1]} {t[0]}", len(rank)))
    start = time.monotonic()
    results = run_all(tests, args.jobs)
    print(f"\nrun_tests: {len(results)} test binaries, {args.jobs} at a time, {time.monotonic() - start:.1f} s wall")
    for name, kind, code, seconds in sorted(results, key=lambda r: -r[3]):
        print(f"  {seconds:7.1f} s  {'ok' if code == 0 else 'FAILED'}  {kind} {name}")
    failed = [f"{kind} {name}" for name, kind, code, _ in results if code != 0]
    if failed:
        print(f"run_tests: {len(failed)} failed: {', '.join(failed)}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
