#!/usr/bin/env bash
# `nsa decode` writes what `nsa forward` writes, token by token through the cache: equal to
# 1e-12 for any prefill length, batches, packed sequences, per-branch keys/values, gate MLP.
source "$(dirname "$0")/lib.sh"
S="--cmp-len 8 --cmp-stride 4 --slc-len 16 --slc-count 4 --window 32"
ok $NSA gen --T 150 --Hq 4 --Hkv 2 --dk 16 --dv 8 --seed 3 --gates random --out w
IN="--q w/q.npy --k w/k.npy --v w/v.npy --gates w/gates.npy"
ok $NSA forward $IN $S --out fwd
for P in 0 7 70 150 1000; do
  ok $NSA decode $IN $S --prefill $P --out dec$P
  ok $NSA compare dec$P fwd --rtol 1e-12 --atol 1e-14
  contains out.txt "12 files compared"
done
# A step count, the cache size and the traffic per step are reported; one CSV row per step.
contains dec70/config.json '"steps": 80'
contains dec70/config.json '"cache_bytes"'
contains dec70/config.json '"bytes_read_per_step_mean"'
[ "$(wc -l < dec70/decode_steps.csv)" -eq 81 ] || fail "decode_steps.csv: expected a header and 80 rows"
contains dec70/decode_steps.csv "0,149,150,"
contains dec150/config.json '"steps": 0'
# A batch [B, T, ...] with separate keys/values per branch and the linear phi.
ok $NSA gen --T 90 --B 3 --Hq 6 --Hkv 3 --dk 8 --dv 12 --separate-kv --seed 5 --out wb
BIN="--q wb/q.npy --k wb/k.npy --v wb/v.npy"
for b in cmp slc win; do BIN="$BIN --k-$b wb/k_$b.npy --v-$b wb/v_$b.npy"; done
ok $NSA forward $BIN $S --compress linear --out fb
ok $NSA decode $BIN $S --compress linear --prefill 33 --out db
ok $NSA compare db fb --rtol 1e-12 --atol 1e-14
contains db/config.json '"cmp_k": false'
# Packed sequences of different lengths (60, 0, 90 tokens; --cu-seqlens), also in float.
# npy_i64 FILE V...: an int64 .npy vector, header padded to 64 bytes as numpy writes it.
npy_i64() {
  local f=$1; shift
  local h="{'descr': '<i8', 'fortran_order': False, 'shape': ($#,), }"
  while [ $(( (10 + ${#h} + 1) % 64 )) -ne 0 ]; do h="$h "; done
  { printf '\x93NUMPY\x01\x00'; printf "\\x$(printf %02x $(( (${#h} + 1) % 256 )))\\x$(printf %02x $(( (${#h} + 1) / 256 )))"
    printf '%s\n' "$h"
    for v in "$@"; do for i in 0 1 2 3 4 5 6 7; do printf "\\x$(printf %02x $(( (v >> (8 * i)) & 255 )))"; done; done; } > "$f"
}
npy_i64 cu.npy 0 60 60 150
ok $NSA forward $IN $S --cu-seqlens cu.npy --out fp
ok $NSA decode $IN $S --cu-seqlens cu.npy --prefill 20 --out dp
ok $NSA compare dp fp --rtol 1e-12 --atol 1e-14
contains dp/config.json '"seqlens": ['
contains dp/config.json '"steps": 110'
ok $NSA forward $IN $S --cu-seqlens cu.npy --precision float --out ff
ok $NSA decode $IN $S --cu-seqlens cu.npy --precision float --prefill 40 --out df
ok $NSA compare df ff --metric rel_l2 --rtol 1e-5
# Refusals name the problem.
refused 1 "prefill = -1" $NSA decode $IN $S --prefill -1 --out bad
refused 1 "device = cuda" $NSA decode $IN $S --device cuda --out bad
[ ! -e bad/o.npy ] || fail "a refused run left outputs"
echo "decode: ok"
