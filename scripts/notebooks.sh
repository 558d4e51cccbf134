#!/usr/bin/env bash
# Executes the notebooks (notebooks/*.ipynb) headless with the Python of .venv/ (scripts/install_deps.sh).
#   scripts/notebooks.sh DATA            on the experiments' outputs in DATA (scripts/experiments.sh):
#                                        executed copies into DATA/notebooks, figures into DATA/figures
#   scripts/notebooks.sh --inplace DATA  the same, but the committed notebooks are overwritten with their
#                                        executed versions and the key figures go to docs/figures/
#   scripts/notebooks.sh --quick WORK    CI: tiny experiments into WORK/data first, then as the first form
#                                        (executed copies in WORK/data/notebooks); the repository is untouched
# NSA=path/to/nsa picks the binary for --quick (default: build/experiments/nsa).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=$ROOT/.venv/bin/python
[ -x "$PY" ] || { echo "notebooks: $PY not found: run scripts/install_deps.sh first" >&2; exit 1; }
MODE=render
case "${1:-}" in
  --quick) MODE=quick; shift ;;
  --inplace) MODE=inplace; shift ;;
esac
[ $# -eq 1 ] || { echo "usage: scripts/notebooks.sh [--inplace | --quick] DIR" >&2; exit 2; }
DATA=$(realpath -m "$1")
if [ $MODE = quick ]; then
  WORK=$DATA
  DATA=$WORK/data
  mkdir -p "$WORK"
  "$ROOT/scripts/experiments.sh" --quick "$DATA" > "$WORK/experiments.log" 2>&1 ||
    { cat "$WORK/experiments.log" >&2; echo "notebooks: the quick experiments failed" >&2; exit 1; }
fi
if [ $MODE = inplace ]; then
  NSA_DATA=$DATA NSA_FIGURES=$ROOT/docs/figures "$PY" "$ROOT/notebooks/run_notebooks.py" --inplace
else
  NSA_DATA=$DATA NSA_FIGURES=$DATA/figures "$PY" "$ROOT/notebooks/run_notebooks.py" --out "$DATA/notebooks"
fi
