#!/usr/bin/env bash
# The main job, from a fresh clone: installs what is missing, builds, runs the default experiment
# end to end (training, the needle grid, the ablation sweeps, selection heatmaps, locality, the
# traffic model: scripts/experiments.sh) and renders the notebooks and their figures from it, then
# checks the reference on a built-in workload. Outputs go to out/main/ (override with OUT=...);
# the experiment's in out/main/experiments/ (rerunning skips the sweep points already done).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install_deps.sh
cmake --preset default >/dev/null
cmake --build --preset default -j "$(nproc)"
OUT=${OUT:-out/main}
NSA=build/experiments/nsa
mkdir -p "$OUT"
echo "== the default experiment -> $OUT/experiments"
start=$(date +%s)
NSA=$NSA ./scripts/experiments.sh "$OUT/experiments"
echo "== notebooks and figures -> $OUT/experiments/notebooks, $OUT/experiments/figures"
./scripts/notebooks.sh "$OUT/experiments"
echo "the default experiment took $(( $(date +%s) - start )) s; outputs in $OUT/experiments/ (docs/experiments.md):"
echo "  train/ needle/ ablation/ corr/ selection/ locality/ traffic/: CSV, JSON, .npy; notebooks/*.ipynb; figures/*.png"
echo "== 1. a random workload: T = 4096, Hq = 16, Hkv = 1 (G = 16), dk = dv = 64"
$NSA gen --T 4096 --Hq 16 --Hkv 1 --dk 64 --dv 64 --gates random --seed 0 --out "$OUT/workload"
echo "== 2. NSA forward at the paper's settings (l=32, d=16, l'=64, n=16, w=512), double"
$NSA forward --q "$OUT/workload/q.npy" --k "$OUT/workload/k.npy" --v "$OUT/workload/v.npy" \
  --gates "$OUT/workload/gates.npy" --out "$OUT/forward"
echo "== 3. the same in float, compared with double"
$NSA forward --q "$OUT/workload/q.npy" --k "$OUT/workload/k.npy" --v "$OUT/workload/v.npy" \
  --gates "$OUT/workload/gates.npy" --precision float --out "$OUT/forward_float"
$NSA compare "$OUT/forward_float" "$OUT/forward" --metric rel_l2 --rtol 1e-5
echo "== 4. full attention, and an identity: a window covering everything is full attention"
$NSA full --q "$OUT/workload/q.npy" --k "$OUT/workload/k.npy" --v "$OUT/workload/v.npy" --out "$OUT/full"
$NSA forward --q "$OUT/workload/q.npy" --k "$OUT/workload/k.npy" --v "$OUT/workload/v.npy" --window 4096 \
  --out "$OUT/forward_w4096"
$NSA compare "$OUT/forward_w4096/o_win.npy" "$OUT/full/o.npy" --rtol 1e-12 --atol 1e-14
echo "== 5. decoding through the KV cache: prefill 3584 tokens, then 512 steps; equal to the forward pass"
$NSA decode --q "$OUT/workload/q.npy" --k "$OUT/workload/k.npy" --v "$OUT/workload/v.npy" \
  --gates "$OUT/workload/gates.npy" --prefill 3584 --out "$OUT/decode"
$NSA compare "$OUT/decode" "$OUT/forward" --rtol 1e-12 --atol 1e-14
echo "== 6. CPU benchmark at T = 4096"
$NSA bench --T 4096 --precisions float --reps 3 --out "$OUT/bench"
echo "== 7. analysis: selected-block recall against the exact-attention oracle, and the paper's decode table"
$NSA recall --q "$OUT/workload/q.npy" --k "$OUT/workload/k.npy" --v "$OUT/workload/v.npy" --out "$OUT/recall"
$NSA traffic --decode --context 8192,16384,32768,65536 --convention paper --out "$OUT/traffic"
echo "main job done: outputs in $OUT/; the experiment and its figures in $OUT/experiments/ (figures/*.png)"
