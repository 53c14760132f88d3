#!/usr/bin/env python3
"""Runs the notebooks in notebooks/ with the "Rust (distill)" kernel through nbclient.

  notebooks.py prebuild                   build distill inside the kernel's persistent folder (setup-notebooks.sh)
  notebooks.py run [--in-place] [NB ...]  execute notebooks; fail on any error output, any panic and any error
                                          written to stderr; print each notebook's run time

`run` writes the executed notebooks to target/notebooks/, so the test suite leaves the committed notebooks alone;
`--in-place` refreshes the committed outputs instead. Run times go to target/notebooks/times.csv either way.
"""
import os
import re
import sys
import time

import nbformat
from nbclient import NotebookClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = os.path.join(ROOT, "notebooks")
os.environ.setdefault("JUPYTER_PATH", os.path.join(ROOT, ".venv", "share", "jupyter"))
KERNEL = "rust-distill"
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def execute(nb, cwd):
    # allow_errors: run every cell so one report lists every failing cell; problems() then fails the notebook.
    client = NotebookClient(nb, kernel_name=KERNEL, timeout=1800, allow_errors=True, resources={"metadata": {"path": cwd}})
    client.execute()
    return nb


# A cell's value that shows Rust's debug formatting instead of a result a reader can use: a unit, an Ok/Err/Some
# wrapper, a quoted string, a tuple or a list of tuples.
DEBUG_VALUE = re.compile(r'^(\(\)$|Ok\(|Err\(|Some\(|None$|"|\(|\[\()')
MAX_LINE = 100


def style(nb):
    """What a reader should not see in a notebook: code lines over MAX_LINE characters and debug-formatted cell
    values."""
    found = []
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


def prebuild():
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(":dep distill = { path = \"..\" }"), nbformat.v4.new_code_cell("use distill::prelude::*;\ndistill::models::architectures(None).len()")]
    start = time.time()
    execute(nb, NOTEBOOKS)
    bad = problems(nb)
    if bad:
        sys.exit("prebuild failed:\n" + "\n".join(bad))
    print(f"prebuild: {time.time() - start:.1f} s")


def run(args):
    in_place = "--in-place" in args
    names = [a for a in args if a != "--in-place"]
    paths = [os.path.join(NOTEBOOKS, os.path.basename(n)) for n in names] or sorted(
        os.path.join(NOTEBOOKS, f) for f in os.listdir(NOTEBOOKS) if f.endswith(".ipynb"))
    record_dir = os.path.join(ROOT, "target", "notebooks")
    out_dir = NOTEBOOKS if in_place else record_dir
    os.makedirs(record_dir, exist_ok=True)
    failed = []
    times = []
    total = time.time()
    for path in paths:
        nb = nbformat.read(path, as_version=4)
        start = time.time()
        try:
            execute(nb, NOTEBOOKS)
        except Exception as e:  # CellExecutionError and kernel failures
            failed.append(f"{os.path.basename(path)}: {type(e).__name__}")
            times.append((os.path.basename(path), time.time() - start, "fail"))
            print(f"FAIL {os.path.basename(path)}\n{e}", flush=True)
            continue
        bad = problems(nb)
        nbformat.write(nb, os.path.join(out_dir, os.path.basename(path)))
        elapsed = time.time() - start
        times.append((os.path.basename(path), elapsed, "fail" if bad else "ok"))
        if bad:
            failed.append(f"{os.path.basename(path)}:\n" + "\n".join(bad))
            print(f"FAIL {os.path.basename(path)} ({elapsed:.1f} s)", flush=True)
        else:
            print(f"ok {os.path.basename(path)} ({elapsed:.1f} s)", flush=True)
    print(f"{len(paths) - len(failed)} passed, {len(failed)} failed")
    print(f"notebooks: {time.time() - total:.1f} s in all (executed copies in {os.path.relpath(out_dir, ROOT)})")
    with open(os.path.join(record_dir, "times.csv"), "w") as f:
        f.write("notebook,seconds,result\n")
        f.writelines(f"{n},{t:.1f},{r}\n" for n, t, r in times)
    if failed:
        sys.exit("\n".join(failed))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "prebuild":
        prebuild()
    elif len(sys.argv) > 1 and sys.argv[1] == "run":
        run(sys.argv[2:])
    else:
        sys.exit(__doc__)
