#!/usr/bin/env bash
# Validation of `nsa simulate` against the GPU's counters (docs/simulate.md, issue 20), on the GPU
# machine, in one device call of about 2-3 minutes after the build:
#   1. draw the selections (random and clustered, T = 8k, 32k, 64k; Hq = 64, Hkv = 4, dk = dv = 128,
#      l' = 64, n = 16, bf16) with `nsa simulate --generate-only`;
#   2. run today's selection kernel on each (nsa_slc_replay) under Nsight Compute, one launch, L2
#      flushed by ncu's cache control: DRAM bytes read, L2 sectors read by the SMs, the hit rate, the
#      kernel's duration and its occupancy limits; then 5 timed launches (L2 flushed) for its time;
#   3. `nsa simulate` on the same block_idx three times, in parallel: with the h200 preset; with what
#      the device reports (its L2 size, SM count, and the CTAs per SM Nsight Compute measured); and
#      the same with half that L2 (Hopper's L2 is two partitions: if data were held in both, half
#      the capacity would be what a kernel sees; the comparison says which fits the counters);
#   4. scripts/validate_simulator.py: predicted against measured -> $OUT/validate_simulator.json
#      (the results file to commit) and $OUT/validate_simulator.md (the table); the raw ncu CSVs,
#      replay and simulate JSONs in $OUT/raw.tar.gz, the log in $OUT/validate.log.
# Binaries: $BIN/nsa and $BIN/nsa_slc_replay (BIN=.bin, where scripts/device.sh puts nsa). A missing
# nsa_slc_replay is built from build-gpu (device.sh's build tree); BUILD=1 configures and builds
# both from scratch (paper head dims only, a few minutes on 16 cores, with the .carry/ of
# scripts/device_prepare.sh); BUILD_ONLY=1 stops after the build (a device call of its own).
# usage: OUT=dir bash scripts/validate_simulator.sh   (TS=8192,32768,65536 SELS=random,clustered)
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${OUT:-$ROOT/out/validate}
BIN=${BIN:-$ROOT/.bin}
TS=${TS:-8192,32768,65536}
SELS=${SELS:-random,clustered}
W=$(mktemp -d)
mkdir -p "$OUT" "$BIN"
LOG=$OUT/validate.log
: >"$LOG"
T0=$(date +%s)
say() { echo "== [$(($(date +%s) - T0))s] $*" | tee -a "$LOG"; }

if [ "${BUILD:-0}" = 1 ]; then
  say "build (configure + nsa, nsa_slc_replay)"
  cmake --preset gpu -DNSA_EXTRA_PREFIX="$ROOT/.carry" -DNSA_CUDA_ARCHS=90a -DNSA_NATIVE=OFF -DNSA_CUDA_DIMS=paper \
    >>"$LOG" 2>&1 || { say "configure failed"; exit 1; }
  cmake --build build-gpu -j "$(nproc)" --target nsa nsa_slc_replay >>"$LOG" 2>&1 || { say "build failed"; exit 1; }
  cp build-gpu/experiments/nsa build-gpu/experiments/nsa_slc_replay "$BIN/"
fi
if [ ! -x "$BIN/nsa_slc_replay" ]; then
  say "build nsa_slc_replay (build-gpu)"
  cmake --build build-gpu -j "$(nproc)" --target nsa_slc_replay >>"$LOG" 2>&1 &&
    cp build-gpu/experiments/nsa_slc_replay "$BIN/" || { say "could not build nsa_slc_replay (BUILD=1 builds all)"; exit 1; }
fi
[ -x "$BIN/nsa" ] || { say "no $BIN/nsa (run scripts/device.sh's build, or BUILD=1)"; exit 1; }
if ! "$BIN/nsa" simulate --help >/dev/null 2>&1; then  # an nsa built before `simulate` existed
  say "rebuild nsa (build-gpu): $BIN/nsa has no simulate subcommand"
  cmake --build build-gpu -j "$(nproc)" --target nsa >>"$LOG" 2>&1 && cp build-gpu/experiments/nsa "$BIN/" ||
    { say "could not rebuild nsa (BUILD=1 builds all)"; exit 1; }
fi
[ "${BUILD_ONLY:-0}" = 1 ] && { say "built: $BIN/nsa, $BIN/nsa_slc_replay"; exit 0; }
command -v ncu >/dev/null || { say "ncu (Nsight Compute) is not on PATH"; exit 1; }
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv; ncu --version | tail -1; } >>"$LOG" 2>&1

SHAPE="--Hq 64 --Hkv 4 --dk 128 --dv 128 --slc-len 64 --slc-count 16 --dtype bf16"
CASES=()
for T in ${TS//,/ }; do for S in ${SELS//,/ }; do CASES+=("${S}_$T"); done; done

# ---- 1. selections ----
say "selections: ${CASES[*]}"
for c in "${CASES[@]}"; do
  S=${c%_*} T=${c##*_}
  "$BIN/nsa" simulate --selection "$S" --T "$T" --selection-seed 1 $SHAPE --generate-only --out "$W/sel_$c" \
    >>"$LOG" 2>&1 &
done
wait

# ---- 2. the kernel under Nsight Compute ----
# The counters the comparison needs (CORE, the issue's), and more where this ncu knows them: the
# hit/miss split, writes, the occupancy limits the simulator's CTAs per SM come from. An unknown
# name fails a whole ncu run, so the extras are filtered through --query-metrics, and a run that
# fails with them is repeated with CORE alone.
CORE="dram__bytes_read.sum,lts__t_sectors_srcunit_tex_op_read.sum,lts__t_sector_hit_rate.pct,gpu__time_duration.sum"
EXTRA="dram__bytes_write.sum lts__t_sectors_srcunit_tex_op_read_lookup_hit.sum
lts__t_sectors_srcunit_tex_op_read_lookup_miss.sum lts__t_sectors_op_read.sum lts__t_sectors_op_write.sum
launch__occupancy_limit_shared_mem launch__occupancy_limit_registers launch__occupancy_limit_warps
launch__occupancy_limit_blocks launch__registers_per_thread launch__grid_size launch__block_size"
ncu --query-metrics >"$W/metrics.txt" 2>>"$LOG"
METRICS=$CORE
for m in $EXTRA; do
  if grep -qE "^\s*${m%.*}\b" "$W/metrics.txt"; then METRICS="$METRICS,$m"; else echo "ncu lists no $m: left out" >>"$LOG"; fi
done
profile() {  # profile CASE METRICS
  timeout 120 ncu --clock-control none --cache-control all --kernel-name regex:slc_attn --launch-count 1 \
    --metrics "$2" --csv --page raw --print-units base --log-file "$W/ncu_$1.csv" \
    "$BIN/nsa_slc_replay" --block-idx "$W/sel_$1/block_idx.npy" --Hq 64 --dk 128 --dv 128 --slc-len 64 --reps 5 \
    --out "$W/replay_$1.json" >>"$LOG" 2>&1 && grep -q '^"ID"' "$W/ncu_$1.csv"
}
for c in "${CASES[@]}"; do
  say "ncu $c"
  profile "$c" "$METRICS" || { say "ncu $c failed with the extra metrics: again with $CORE"; profile "$c" "$CORE"; } ||
    say "ncu $c failed"
  cat "$W/ncu_$c.csv" >>"$LOG" 2>/dev/null
done

# ---- 3. the simulator on the same selections: preset, and as the device reports ----
say "simulate (preset and as measured), in parallel"
for c in "${CASES[@]}"; do
  "$BIN/nsa" simulate --block-idx "$W/sel_$c/block_idx.npy" $SHAPE --gpu h200 --out "$W/sim_preset_$c" \
    >"$W/sim_preset_$c.log" 2>&1 &
  # The device's SM count and measured CTAs per SM; its L2 (MiB), and half of it.
  ARGS=$(python3 scripts/validate_simulator.py --device-args "$W/replay_$c.json" "$W/ncu_$c.csv" 2>>"$LOG")
  L2=$(python3 scripts/validate_simulator.py --l2-mb "$W/replay_$c.json" 2>>"$LOG")
  HALF=$(python3 scripts/validate_simulator.py --l2-mb "$W/replay_$c.json" --half 2>>"$LOG")
  "$BIN/nsa" simulate --block-idx "$W/sel_$c/block_idx.npy" $SHAPE --gpu h200 $ARGS ${L2:+--l2-mb $L2} \
    --out "$W/sim_device_$c" >"$W/sim_device_$c.log" 2>&1 &
  "$BIN/nsa" simulate --block-idx "$W/sel_$c/block_idx.npy" $SHAPE --gpu h200 $ARGS --l2-mb "${HALF:-25}" \
    --out "$W/sim_half_$c" >"$W/sim_half_$c.log" 2>&1 &
done
wait
cat "$W"/sim_*.log >>"$LOG"

# ---- 4. predicted against measured ----
say "results"
python3 scripts/validate_simulator.py --collect "$W" --cases "$(IFS=,; echo "${CASES[*]}")" \
  --command "scripts/validate_simulator.sh (TS=$TS SELS=$SELS)" --out "$OUT/validate_simulator.json" \
  --table "$OUT/validate_simulator.md" 2>&1 | tee -a "$LOG"
# The raw files in one archive (the device tool brings back at most 8 files).
mkdir -p "$W/raw"
for c in "${CASES[@]}"; do
  cp "$W/ncu_$c.csv" "$W/replay_$c.json" "$W/raw/" 2>/dev/null
  for k in preset device half; do cp "$W/sim_${k}_$c/simulate.json" "$W/raw/sim_${k}_$c.json" 2>/dev/null; done
done
tar czf "$OUT/raw.tar.gz" -C "$W" raw
rm -rf "$W"
say "done"
