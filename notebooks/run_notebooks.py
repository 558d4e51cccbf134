"""Executes notebooks headless (nbclient), for CI and for refreshing the committed ones.

usage: python notebooks/run_notebooks.py [--inplace | --out DIR] [NOTEBOOK ...]

With no notebooks named, runs every notebooks/*.ipynb. The notebooks read NSA_DATA and write key
figures into NSA_FIGURES (nsa_nb.py); set those in the environment. --inplace overwrites each
notebook with its executed version (what is committed); --out writes executed copies into DIR
and leaves the repository untouched (CI). Exits 1 naming the notebooks whose execution failed.
"""
import argparse
import os
import pathlib
import sys
import time

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

HERE = pathlib.Path(__file__).resolve().parent


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--inplace", action="store_true", help="overwrite the notebooks with their executed versions")
    mode.add_argument("--out", type=pathlib.Path, help="write executed copies here")
    ap.add_argument("--timeout", type=int, default=300, help="seconds per cell")
    ap.add_argument("notebooks", nargs="*", type=pathlib.Path)
    args = ap.parse_args()
    # The kernels run in notebooks/: relative folders are taken from where this script was called.
    for var in ("NSA_DATA", "NSA_FIGURES"):
        if os.environ.get(var):
            os.environ[var] = str(pathlib.Path(os.environ[var]).resolve())
    books = args.notebooks or sorted(HERE.glob("*.ipynb"))
    if not books:
        print("run_notebooks: no notebooks found", file=sys.stderr)
        return 1
    failed = []
    for path in books:
        t0 = time.time()
        nb = nbformat.read(path, as_version=4)
        client = NotebookClient(nb, timeout=args.timeout, kernel_name="python3",
                                resources={"metadata": {"path": str(HERE)}})
        try:
            client.execute()
            status = "ok"
        except CellExecutionError as e:
            failed.append(path.name)
            status = "FAILED\n" + str(e)[-2000:]
        dest = path if args.inplace else args.out / path.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        nbformat.write(nb, dest)
        print(f"notebook {path.name}: {status} ({time.time() - t0:.1f} s) -> {dest}", flush=True)
    if failed:
        print(f"run_notebooks: {len(failed)} failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    print(f"run_notebooks: {len(books)} notebooks executed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
