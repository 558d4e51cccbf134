#!/usr/bin/env bash
# The default experiments, end to end, into one folder that the notebooks read (docs/experiments.md):
#   train/      nsa train: phi and the gates learned on needle retrieval (train.csv, phi/)
#   needle/     nsa sweep: the needle grid, context x depth, for mean pooling, the untrained mlp phi
#               and the trained one (sweep.csv)
#   ablation/   nsa sweep: recall, mass, error, FLOPs, traffic against n and l' on the clustered
#               workload, for every selector (sweep.csv)
#   corr/       nsa sweep: the same against the keys' correlation length (sweep.csv)
#   selection/  nsa recall on one clustered workload: per-position selections of NSA and the
#               oracle, exact block masses (the heatmaps)
#   locality/   nsa locality on the same workload
#   traffic/    nsa traffic at the paper's settings (decode and prefill model)
#   simulate/   nsa simulate: the selection kernel's L2 and HBM bytes against T, G, l', n and the
#               schedule, on random and clustered selections (one folder per run)
#
# usage: scripts/experiments.sh [--quick] [OUT]      (OUT default: out/main/experiments)
#   --quick   tiny sizes (seconds): what CI runs before executing the notebooks
# NSA=path/to/nsa picks the binary (default: build/experiments/nsa). Reruns skip finished sweep
# points (nsa sweep is resumable); the other steps are rerun.
set -euo pipefail
cd "$(dirname "$0")/.."
QUICK=0
if [ "${1:-}" = "--quick" ]; then QUICK=1; shift; fi
OUT=${1:-out/main/experiments}
NSA=${NSA:-build/experiments/nsa}
[ -x "$NSA" ] || { echo "experiments: $NSA not found: build first (cmake --preset default && cmake --build build)" >&2; exit 1; }
mkdir -p "$OUT"

# One small NSA layer for the needle grid and the training: the paper's ratios scaled down to
# contexts of a few thousand tokens (l = 16, d = 8, l' = 32, n = 6 with 1 initial + 2 local
# blocks, w = 64), G = 4 query heads per KV head, head dim 16; phi's hidden width 4 dk, enough
# to carry a block's direction through the GELU (h_c = dk learns far slower).
LAYER="--Hq 4 --Hkv 1 --dk 16 --dv 16 --cmp-len 16 --cmp-stride 8 --slc-len 32 --slc-count 6 --window 64 --cmp-hidden 64"
if [ $QUICK = 1 ]; then
  TRAIN="--T 512 --batch 2 --steps 4"
  CONTEXTS=256,512; DEPTHS=0,0.5,1
  ABL="--context 512 --slc-len 16,32 --slc-count 4,8"
  CORR="--context 512 --corr-len 0,64 --slc-len 32 --slc-count 8"
  SEL_T=512; LOC="--queries 32"
  TRAFFIC_CTX=8192,16384
  SIM_TS="512 1024"; SIM_T=1024; SIM_OPTS="--sample 8 --reuse-sample 64"
else
  TRAIN="--T 1024 --batch 8 --steps 120"
  CONTEXTS=1024,2048,4096,8192; DEPTHS=0,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1
  ABL="--context 4096 --slc-len 16,32,64,128 --slc-count 4,8,16,32"
  CORR="--context 4096 --corr-len 0,4,16,64,256,1024 --slc-len 64 --slc-count 16"
  SEL_T=2048; LOC="--queries 256"
  TRAFFIC_CTX=8192,16384,32768,65536
  SIM_TS="4096 8192 16384 32768"; SIM_T=16384; SIM_OPTS=""
fi

echo "== 1/7 trainability: learn phi and the gates on needle retrieval -> $OUT/train"
# shellcheck disable=SC2086
$NSA train $LAYER $TRAIN --lr 1e-2 --out "$OUT/train"

echo "== 2/7 the needle grid (context x depth): mean pooling, untrained mlp, trained mlp -> $OUT/needle"
# shellcheck disable=SC2086
$NSA sweep --workload needle $LAYER --context $CONTEXTS --depth $DEPTHS --compress mean,mlp --out "$OUT/needle"
# shellcheck disable=SC2086
$NSA sweep --workload needle $LAYER --context $CONTEXTS --depth $DEPTHS --compress mlp \
  --compress-params "$OUT/train/phi" --out "$OUT/needle"

echo "== 3/7 ablation: recall and mass against n and l' (every selector), and against the keys' correlation length -> $OUT/ablation, $OUT/corr"
# shellcheck disable=SC2086
$NSA sweep --workload clustered --corr-len 64 --Hq 8 --Hkv 2 --dk 32 --dv 32 $ABL --cmp-len 32 --cmp-stride 16 \
  --window 128 --compress mean --selector nsa,oracle,quest,window,random --out "$OUT/ablation"
# shellcheck disable=SC2086
$NSA sweep --workload clustered --Hq 8 --Hkv 2 --dk 32 --dv 32 $CORR --cmp-len 32 --cmp-stride 16 --window 128 \
  --compress mean --selector nsa,oracle,quest --out "$OUT/corr"

echo "== 4/7 selection heatmaps: per-position selections and block masses -> $OUT/selection"
$NSA gen --workload clustered --corr-len 64 --T $SEL_T --Hq 8 --Hkv 2 --dk 32 --dv 32 --out "$OUT/selection/workload"
W="--q $OUT/selection/workload/q.npy --k $OUT/selection/workload/k.npy --v $OUT/selection/workload/v.npy"
# shellcheck disable=SC2086
$NSA recall $W --cmp-len 16 --cmp-stride 8 --slc-len 32 --slc-count 8 --window 64 --compress mean \
  --selectors nsa,oracle,quest --save-selections --save-block-mass --out "$OUT/selection"

echo "== 5/7 locality of exact attention on the same workload -> $OUT/locality"
# shellcheck disable=SC2086
$NSA locality $W $LOC --out "$OUT/locality"

echo "== 6/7 memory traffic and roofline model at the paper's settings -> $OUT/traffic"
$NSA traffic --context $TRAFFIC_CTX --out "$OUT/traffic"

echo "== 7/7 memory simulation of the selection kernel against T, G, l', n and the schedule -> $OUT/simulate"
# The paper's heads and blocks (Hq = 64, Hkv = 4, dk = dv = 128, l' = 64, n = 16, bf16) on the H200
# preset; each folder is one run, named axis_value_selection (the notebook reads the names).
sim() {
  local name=$1; shift
  # shellcheck disable=SC2086
  $NSA simulate --Hkv 4 --dk 128 --dv 128 --gpu h200 $SIM_OPTS "$@" --out "$OUT/simulate/$name" >/dev/null
}
for S in random clustered; do
  for T in $SIM_TS; do sim "T_${T}_$S" --selection $S --T "$T" --Hq 64 --schedule both; done
  for Hq in 4 16; do sim "G_$((Hq / 4))_$S" --selection $S --T $SIM_T --Hq $Hq --schedule both; done
  for ls_n in 32:32 128:8; do
    sim "ls_${ls_n%:*}_$S" --selection $S --T $SIM_T --Hq 64 --slc-len "${ls_n%:*}" --slc-count "${ls_n#*:}" --schedule both
  done
  for n in 8 32; do sim "n_${n}_$S" --selection $S --T $SIM_T --Hq 64 --slc-count $n --schedule both; done
  sim "sched_cta-union_$S" --selection $S --T $SIM_T --Hq 64 --cta-union
  sim "sched_4-positions_$S" --selection $S --T $SIM_T --Hq 64 --tile-positions 4
  sim "sched_position-order_$S" --selection $S --T $SIM_T --Hq 64 --order position
  sim "sched_per-head_$S" --selection $S --T $SIM_T --Hq 64 --tile-heads 1
done

echo "experiments: outputs in $OUT/ (train, needle, ablation, corr, selection, locality, traffic, simulate)"
