#!/usr/bin/env python3
"""Runs the notebooks in notebooks/ with the "Rust (distill)" kernel through nbclient.

  notebooks.py workspace                  write the crate evcxr generates in the kernel's folder (.evcxr/), so that
                                          scripts/test.sh builds the tests there and the kernel reuses what they built
  notebooks.py prebuild                   build distill inside the kernel's persistent folder (setup-notebooks.sh)
  notebooks.py run [--in-place] [NB ...]  execute notebooks; fail on any error output, any panic and any error
                                          written to stderr; print each notebook's run time

`run` executes DISTILL_NOTEBOOK_JOBS notebooks at a time (default: 2 where the machine has 2 or more cores). A cell
spends most of its time in rustc and the linker, one process each, so two kernels keep two cores busy where one
leaves the second idle. Each extra kernel gets its own copy of the prebuilt `.evcxr/` folder (`.evcxr-N/`), since
two kernels must not build in one folder at once. A kernel is started once per runner and cleared (evcxr's `:clear`,
a new evaluation context and child process) between notebooks; see worker().

`run` writes the executed notebooks to target/notebooks/, so the test suite leaves the committed notebooks alone;
`--in-place` refreshes the committed outputs instead. Run times go to target/notebooks/times.csv either way.
"""
import json
import multiprocessing
import os
import queue
import re
import shutil
import sys
import time

import nbformat
from nbclient import NotebookClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = os.path.join(ROOT, "notebooks")
os.environ.setdefault("JUPYTER_PATH", os.path.join(ROOT, ".venv", "share", "jupyter"))
KERNEL = "rust-distill"
# Every notebook's first code cell, and the pre-build's: one set of features, so that evcxr builds polars and distill
# once for all of them (another feature set is another build of polars, minutes long).
DEP_LINE = ':dep distill = { path = "..", features = ["lazy"] }'
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def notebook_client(nb, kernel=KERNEL, timeout=1800):
    # allow_errors: run every cell so one report lists every failing cell; problems() then fails the notebook.
    return NotebookClient(nb, kernel_name=kernel, timeout=timeout, allow_errors=True,
                          resources={"metadata": {"path": NOTEBOOKS}})


def execute(nb, kernel=KERNEL, timeout=1800):
    notebook_client(nb, kernel, timeout).execute()
    return nb


# A cell's value that shows Rust's debug formatting instead of a result a reader can use: a unit, an Ok/Err/Some
# wrapper, a quoted string, a tuple, a list of tuples or a struct (`Figure { title: ... }`).
DEBUG_VALUE = re.compile(r'^(\(\)$|Ok\(|Err\(|Some\(|None$|"|\(|\[\(|[A-Z][A-Za-z0-9_]* \{)')
MAX_LINE = 100


def style(nb):
    """What a reader should not see in a notebook: code lines over MAX_LINE characters and debug-formatted cell
    values; and a first cell other than DEP_LINE."""
    found = []
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    if code and code[0].source.strip() != DEP_LINE:
        found.append(f"the first code cell is {code[0].source.strip()[:80]!r}, not {DEP_LINE!r} (the pre-built one)")
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        for line in cell.source.splitlines():
            if len(line) > MAX_LINE:
                found.append(f"cell {i}: a code line of {len(line)} characters (at most {MAX_LINE}): {line.strip()[:60]}...")
        for out in cell.get("outputs", []):
            if out.get("output_type") == "execute_result":
                text = out.get("data", {}).get("text/plain", "").strip()
                if DEBUG_VALUE.match(text):
                    found.append(f"cell {i}: a debug-formatted value: {text[:60]}")
    return found


def problems(nb):
    """Error outputs, panics and errors returned through `?` (evcxr writes the last two to stderr without failing
    the cell), and style problems."""
    found = style(nb)
    for i, cell in enumerate(nb.cells):
        for out in cell.get("outputs", []):
            text = out.get("text", "") or "\n".join(out.get("traceback", []))
            if out.get("output_type") == "error":
                detail = ANSI.sub("", "\n".join(out.get("traceback", [])) or out.get("evalue", ""))
                found.append(f"cell {i}: {out.get('ename')}\n{detail}")
            elif "panicked at" in text:
                found.append(f"cell {i}: panic: {text.strip().splitlines()[0]}")
            elif out.get("name") == "stderr" and text.strip():
                # evcxr reports an error returned through `?` on stderr and still completes the cell.
                found.append(f"cell {i}: error on stderr: {text.strip()}")
    return found


# The crate evcxr 0.22 generates for a notebook whose only dependency is DEP_LINE (evcxr/src/module.rs,
# get_cargo_toml_contents, at evcxr's default opt-level 2). scripts/test.sh builds and runs the tests inside this
# crate's workspace, with evcxr's profile, target and RUSTFLAGS: cargo then compiles polars, tch and distill once for
# the tests and the kernel together, where two builds took about 35 minutes of the 2 cores.
KERNEL_CRATE = """
[package]
name = "ctx"
version = "1.0.0"
edition = "2024"

[lib]
crate-type = ["cdylib"]
path = "src/lib.rs"

[profile.dev]
opt-level = 2
debug = false
strip = "debuginfo"
rpath = true
lto = false
debug-assertions = true
codegen-units = 16
panic = 'unwind'
incremental = true
overflow-checks = true

[dependencies]
distill = {{ path = "{root}", features = ["lazy"] }}
"""
KERNEL_FOLDER = os.path.join(ROOT, ".evcxr")


def kernel_manifest():
    # evcxr writes the dependency's path resolved (no "..", no symbolic link).
    return KERNEL_CRATE.format(root=os.path.realpath(ROOT))


def workspace():
    """Writes evcxr's crate into .evcxr/ before the kernel ever ran there, with the project's Cargo.lock (evcxr never
    touches the lock file, so the kernel then uses the versions the project pins)."""
    os.makedirs(os.path.join(KERNEL_FOLDER, "src"), exist_ok=True)
    with open(os.path.join(KERNEL_FOLDER, "Cargo.toml"), "w") as f:
        f.write(kernel_manifest())
    lib = os.path.join(KERNEL_FOLDER, "src", "lib.rs")
    if not os.path.exists(lib):
        open(lib, "w").close()
    shutil.copy2(os.path.join(ROOT, "Cargo.lock"), os.path.join(KERNEL_FOLDER, "Cargo.lock"))
    print(f"workspace: {os.path.relpath(KERNEL_FOLDER, ROOT)}/Cargo.toml written")


def prebuild():
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(DEP_LINE), nbformat.v4.new_code_cell("use distill::prelude::*;\ndistill::models::architectures(None).len()")]
    start = time.time()
    # The first cell compiles distill and its dependencies (6 minutes on an idle 2-core machine). scripts/test.sh
    # runs it beside the crate's own tests, and a busy machine once took over 30 minutes: an hour before giving up.
    execute(nb, timeout=3600)
    bad = problems(nb)
    if bad:
        sys.exit("prebuild failed:\n" + "\n".join(bad))
    print(f"prebuild: {time.time() - start:.1f} s")
    # After a `:dep`, evcxr has rewritten Cargo.toml. If a later evcxr writes another crate than KERNEL_CRATE, the
    # tests and the kernel stop sharing their build: nothing breaks, but CI builds polars twice again.
    with open(os.path.join(KERNEL_FOLDER, "Cargo.toml")) as f:
        if f.read().split() != kernel_manifest().split():
            print("prebuild: warning: evcxr's generated Cargo.toml differs from notebooks.py's KERNEL_CRATE, so the "
                  "tests (scripts/test.sh) and the kernel no longer share one build; update KERNEL_CRATE",
                  file=sys.stderr)


def jobs():
    value = os.environ.get("DISTILL_NOTEBOOK_JOBS")
    if value is None:
        return 2 if (os.cpu_count() or 1) >= 2 else 1
    if not value.isdigit() or int(value) < 1:
        sys.exit(f"DISTILL_NOTEBOOK_JOBS={value!r}: expected a whole number of notebooks to run at once, 1 or more")
    return int(value)


def kernel_only(folder, names):
    """What a copy of `.evcxr/` for another kernel leaves out: what scripts/test.sh's tests built there, and the
    kernel needs neither to load distill nor to judge it up to date (about 3 of its 4 GB): the test and bench
    executables in `deps/` (no extension) and every incremental cache but the kernel crate's own (`ctx-*`)."""
    base = os.path.basename(folder)
    if base == "incremental":
        return [n for n in names if not n.startswith("ctx-")]
    if base == "deps":
        return [n for n in names if "." not in n and os.path.isfile(os.path.join(folder, n))]
    return []


def worker_kernel(worker, workers):
    """The kernel name runner `worker` of `workers` uses. One runner: the set-up's own kernelspec. Several: a copy of
    it under target/notebooks/kernels that gives libtorch its share of the cores (OMP_NUM_THREADS; two kernels that
    each spin two OpenMP threads on two cores run several times slower than one after the other) and, for runner N
    > 0, the build folder `.evcxr-N/`, a fresh copy of `.evcxr/` (copy2 keeps the file times, so cargo sees the
    prebuilt dependencies as up to date and compiles only the cells)."""
    if workers == 1:
        return KERNEL
    spec_path = None
    for base in os.environ["JUPYTER_PATH"].split(os.pathsep):
        candidate = os.path.join(base, "kernels", KERNEL, "kernel.json")
        if os.path.exists(candidate):
            spec_path = candidate
            break
    if spec_path is None:
        sys.exit(f"no kernelspec {KERNEL} under JUPYTER_PATH: run scripts/setup-notebooks.sh first")
    with open(spec_path) as f:
        spec = json.load(f)
    if worker > 0:
        source = spec["env"]["EVCXR_TMPDIR"]
        folder = f"{source}-{worker}"
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(source, folder, symlinks=True, ignore=kernel_only, copy_function=shutil.copy2)
        spec["env"]["EVCXR_TMPDIR"] = folder
    spec["env"]["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // workers))
    spec["display_name"] = f"{spec['display_name']} (runner {worker})"
    name = f"{KERNEL}-{worker}"
    kernel_dir = os.path.join(ROOT, "target", "notebooks", "kernels", "kernels", name)
    os.makedirs(kernel_dir, exist_ok=True)
    with open(os.path.join(kernel_dir, "kernel.json"), "w") as f:
        json.dump(spec, f, indent=2)
    return name


def run_notebook(path, out_dir, client):
    """Executes one notebook with `client`, whose kernel stays up for the next one; returns (name, seconds, problems
    or None when it ran clean, whether the kernel is still usable)."""
    name = os.path.basename(path)
    nb = nbformat.read(path, as_version=4)
    start = time.time()
    try:
        if client.kc is not None:
            client.execute_cell(nbformat.v4.new_code_cell(":clear"), 0, store_history=False)
        client.nb = nb
        client.execute(cleanup_kc=False)
    except Exception as e:  # a dead kernel or a cell timeout (cell errors are outputs: allow_errors)
        return name, time.time() - start, [f"{type(e).__name__}: {e}"], False
    # A result's number is the kernel's count, which goes on across notebooks; the cell's is nbclient's, from 1.
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if out.get("output_type") == "execute_result":
                out["execution_count"] = cell.get("execution_count")
    bad = problems(nb)
    nbformat.write(nb, os.path.join(out_dir, name))
    return name, time.time() - start, bad or None, True


def worker(kernel, tasks, results, out_dir):
    """One runner: a kernel started once, and the notebooks it takes from `tasks` executed on it one after the other.
    Before each notebook but the first, evcxr's `:clear` gives it a new evaluation context: no variables, items,
    `use`s or dependencies, and a new child process, so libtorch and every static start afresh. What `:clear` keeps
    is evcxr's rust-analyzer, which has already loaded distill and its dependencies: a fresh kernel spent about 40 s
    of each notebook there (starting, then the `:dep` cell and the first `let`), a cleared one 9 s."""
    client = None
    while True:
        path = tasks.get()
        if path is None:
            break
        if client is None:
            client = notebook_client(nbformat.v4.new_notebook(), kernel)
        name, elapsed, bad, usable = run_notebook(path, out_dir, client)
        if not usable:
            shutdown(client)
            client = None
        results.put((name, elapsed, bad))
    if client is not None:
        shutdown(client)


def shutdown(client):
    try:
        client._cleanup_kernel()
    except Exception:
        pass


def run(args):
    in_place = "--in-place" in args
    names = [a for a in args if a != "--in-place"]
    paths = [os.path.join(NOTEBOOKS, os.path.basename(n)) for n in names] or sorted(
        os.path.join(NOTEBOOKS, f) for f in os.listdir(NOTEBOOKS) if f.endswith(".ipynb"))
    record_dir = os.path.join(ROOT, "target", "notebooks")
    out_dir = NOTEBOOKS if in_place else record_dir
    os.makedirs(record_dir, exist_ok=True)
    workers = min(jobs(), len(paths))
    os.environ["JUPYTER_PATH"] = os.pathsep.join(
        [os.environ["JUPYTER_PATH"], os.path.join(record_dir, "kernels")])
    kernels = [worker_kernel(w, workers) for w in range(workers)]
    failed = []
    times = []
    total = time.time()
    # Runners are processes of their own (nbclient drives a kernel from an asyncio loop, one per interpreter); each
    # takes the next notebook in name order as soon as it is free.
    context = multiprocessing.get_context("spawn")
    tasks, results = context.Queue(), context.Queue()
    for path in paths:
        tasks.put(path)
    for _ in kernels:
        tasks.put(None)
    runners = [context.Process(target=worker, args=(kernel, tasks, results, out_dir)) for kernel in kernels]
    for runner in runners:
        runner.start()
    done = set()
    while len(done) < len(paths):
        try:
            name, elapsed, bad = results.get(timeout=10)
        except queue.Empty:
            if any(runner.is_alive() for runner in runners):
                continue
            break
        done.add(name)
        times.append((name, elapsed, "fail" if bad else "ok"))
        if bad:
            failed.append(f"{name}:\n" + "\n".join(bad))
            print(f"FAIL {name} ({elapsed:.1f} s)", flush=True)
        else:
            print(f"ok {name} ({elapsed:.1f} s)", flush=True)
    for runner in runners:
        runner.join(timeout=60)
    for path in paths:
        name = os.path.basename(path)
        if name not in done:
            failed.append(f"{name}: not run (its runner process died)")
            times.append((name, 0.0, "fail"))
    print(f"{len(paths) - len(failed)} passed, {len(failed)} failed ({workers} at a time)")
    print(f"notebooks: {time.time() - total:.1f} s in all (executed copies in {os.path.relpath(out_dir, ROOT)})")
    with open(os.path.join(record_dir, "times.csv"), "w") as f:
        f.write("notebook,seconds,result\n")
        f.writelines(f"{n},{t:.1f},{r}\n" for n, t, r in sorted(times))
    if failed:
        sys.exit("\n".join(failed))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "prebuild":
        prebuild()
    elif len(sys.argv) > 1 and sys.argv[1] == "workspace":
        workspace()
    elif len(sys.argv) > 1 and sys.argv[1] == "run":
        run(sys.argv[2:])
    else:
        sys.exit(__doc__)
