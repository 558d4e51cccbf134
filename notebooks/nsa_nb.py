"""Helpers shared by the notebooks: where the experiments' outputs are, reading their CSV/JSON
files, saving figures. Notebooks only read what the `nsa` experiments wrote (STYLE 9).

Environment:
  NSA_DATA     folder of experiment outputs (default: <repo>/out/main/experiments, what
               scripts/run_main.sh writes)
  NSA_FIGURES  folder the key figures are saved to as PNG (default: <repo>/docs/figures)
"""
import csv
import json
import os
import pathlib

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
DATA = pathlib.Path(os.environ.get("NSA_DATA", ROOT / "out" / "main" / "experiments")).resolve()
FIGURES = pathlib.Path(os.environ.get("NSA_FIGURES", ROOT / "docs" / "figures")).resolve()


def shown(path):
    """A path as printed in the notebooks: relative to the repository when inside it."""
    path = pathlib.Path(path)
    try:
        return str(path.relative_to(ROOT))
    except ValueError:
        return str(path)


def require(path):
    """The path, or a FileNotFoundError that says which experiment writes it."""
    path = pathlib.Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"{path} is missing: run scripts/run_main.sh (or scripts/notebooks.sh) first, "
            f"or point NSA_DATA at a folder of experiment outputs")
    return path


def read_csv(path):
    """A CSV with a header as a dict of columns: numbers as float arrays (empty cells NaN),
    text as arrays of str."""
    with open(require(path), newline="") as f:
        rows = list(csv.reader(f))
    header, body = rows[0], rows[1:]
    cols = {}
    for i, name in enumerate(header):
        cells = [r[i] for r in body]
        try:
            cols[name] = np.array([float(c) if c != "" else np.nan for c in cells])
        except ValueError:
            cols[name] = np.array(cells, dtype=object)
    return cols


def select(cols, **where):
    """Rows of a column dict whose columns equal the given values."""
    n = len(next(iter(cols.values())))
    keep = np.ones(n, dtype=bool)
    for k, v in where.items():
        keep &= cols[k] == v
    return {k: c[keep] for k, c in cols.items()}


def read_json(path):
    with open(require(path)) as f:
        return json.load(f)


def save(fig, name):
    """Saves a figure as FIGURES/name.png (for the README) and returns its path."""
    FIGURES.mkdir(parents=True, exist_ok=True)
    out = FIGURES / f"{name}.png"
    fig.savefig(out, dpi=110, bbox_inches="tight")
    return out
