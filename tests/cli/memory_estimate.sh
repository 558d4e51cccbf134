#!/usr/bin/env bash
# The memory estimate that refuses oversized runs is honest: for runs of 50 to 300 MB, the
# peak RSS the run really added (config.json "memory": peak_rss_bytes - start_rss_bytes) stays
# below the estimate, and the estimate is not more than twice that plus 64 MB (the per-thread
# allowances for matrix-product buffers dominate small runs). Not run in the sanitizer build,
# whose shadow memory and quarantine inflate the RSS.
source "$(dirname "$0")/lib.sh"

ok "$NSA" gen --T 4096 --Hq 16 --Hkv 2 --dk 64 --dv 64 --gates random --out w
ok "$NSA" gen --T 1024 --Hq 16 --Hkv 2 --dk 64 --dv 64 --out ws
ok "$NSA" gen --T 1024 --B 2 --Hq 8 --Hkv 1 --dk 128 --dv 64 --out wb
IN="--q w/q.npy --k w/k.npy --v w/v.npy"
# check FOLDER: the estimate bounds the used memory, within a factor 2 + 64 MB.
check() {
  local est used
  est=$(grep -o '"estimate_bytes": [0-9.e+]*' "$1/config.json" | awk '{print $2}')
  used=$(grep -oE '"(peak|start)_rss_bytes": [0-9.e+]*' "$1/config.json" |
    awk '/peak/ {p = $2} /start/ {s = $2} END {print p - s}')
  awk -v e="$est" -v u="$used" 'BEGIN {exit !(u <= e && e <= 2 * u + 64e6)}' ||
    fail "$1: estimate $est bytes, used $used bytes"
  echo "$1 ($2): estimate $(awk -v e="$est" 'BEGIN {printf "%.0f MB", e / 1e6}'), used $(awk -v u="$used" 'BEGIN {printf "%.0f MB", u / 1e6}')"
}
n=0
while read -r sub args; do
  n=$((n + 1))
  ok "$NSA" "$sub" $args --out "r$n"
  check "r$n" "$sub $args"
done <<EOT
forward $IN --gates w/gates.npy
forward $IN --precision float --threads 1
forward $IN --compress linear --cmp-len 16 --cmp-stride 8 --slc-len 16
forward --q ws/q.npy --k ws/k.npy --v ws/v.npy --path oracle --window 32 --slc-count 2 --init-blocks 0 --local-blocks 1
forward --q wb/q.npy --k wb/k.npy --v wb/v.npy
full $IN
full --q wb/q.npy --k wb/k.npy --v wb/v.npy --precision float
EOT
echo "memory estimate: ok ($n runs)"
