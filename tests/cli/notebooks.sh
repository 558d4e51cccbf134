#!/usr/bin/env bash
# Every notebook runs headless on the quick experiments' outputs (scripts/notebooks.sh --quick) and
# draws its figure; skipped (exit 77) when the notebooks' Python environment is not installed.
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
source "$(dirname "$0")/lib.sh"
if [ ! -x "$ROOT/.venv/bin/python" ]; then
  echo "SKIPPED: $ROOT/.venv/bin/python is missing (scripts/install_deps.sh installs the notebooks' packages)"
  exit 77
fi
export NSA
ok "$ROOT/scripts/notebooks.sh" --quick "$WORK/nb"
contains out.txt "8 notebooks executed"
for f in needle_grid trainability recall_mass selection_heatmap locality traffic_roofline simulate_traffic; do
  [ -s "$WORK/nb/data/figures/$f.png" ] || fail "figure $f.png was not drawn"
done
# No GPU results are committed in a fresh clone: the notebook says so instead of plotting.
if ! ls "$ROOT"/experiments/results/*.json >/dev/null 2>&1; then
  grep -q "No GPU results committed yet" "$WORK/nb/data/notebooks/gpu_speed.ipynb" || fail "gpu_speed did not report the missing results"
fi
echo "notebooks: ok"
