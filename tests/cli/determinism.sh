#!/usr/bin/env bash
# Results do not depend on the thread count: every subcommand's files with --threads 1 and
# --threads 2 are bitwise identical (cmp, and compare with zero tolerance), and so are two runs
# with the same seed. (bench writes timings, which are not meant to repeat.)
source "$(dirname "$0")/lib.sh"

# same A B: every .npy file of folder A equals B's byte for byte, and compare agrees.
same() {
  local n=0
  for f in "$1"/*.npy; do
    cmp -s "$f" "$2/$(basename "$f")" || fail "$f and $2/$(basename "$f") differ"
    n=$((n + 1))
  done
  [ "$n" -gt 0 ] || fail "no .npy files in $1"
  ok "$NSA" compare "$1" "$2" --rtol 0 --atol 0
  contains out.txt "$n files compared"
}

# gen: the same seed gives the same files.
ok "$NSA" gen --T 333 --Hq 4 --Hkv 2 --dk 16 --dv 8 --seed 5 --separate-kv --gates random --out w
ok "$NSA" gen --T 333 --Hq 4 --Hkv 2 --dk 16 --dv 8 --seed 5 --separate-kv --gates random --out w_again
same w w_again
ok "$NSA" gen --T 100 --B 3 --Hq 4 --Hkv 1 --dk 16 --dv 8 --seed 6 --out wb

IN="--q w/q.npy --k w/k.npy --v w/v.npy"
SMALL="--cmp-len 8 --cmp-stride 4 --slc-len 8 --slc-count 4 --window 16"
# Packed sequences 100, 0, 133, 100 (cu_seqlens 0, 100, 100, 233, 333 as int64).
mknpy cu.npy '<i8' False '(5,)' 40
poke cu.npy 1 6400000000000000 && poke cu.npy 2 6400000000000000
poke cu.npy 3 e900000000000000 && poke cu.npy 4 4d01000000000000

n=0
while read -r sub args; do
  n=$((n + 1))
  ok "$NSA" "$sub" $args --threads 1 --out "t1_$n"
  ok "$NSA" "$sub" $args --threads 2 --out "t2_$n"
  same "t1_$n" "t2_$n"
  ok "$NSA" "$sub" $args --threads 2 --out "t3_$n"
  same "t2_$n" "t3_$n"
done <<EOF
forward $IN $SMALL --gates w/gates.npy
forward $IN $SMALL --precision float
forward $IN $SMALL --compress linear --k-cmp w/k_cmp.npy --v-cmp w/v_cmp.npy --k-slc w/k_slc.npy --v-slc w/v_slc.npy --k-win w/k_win.npy --v-win w/v_win.npy
forward $IN $SMALL --compress mean --cu-seqlens cu.npy
forward $IN $SMALL --path oracle
forward --q wb/q.npy --k wb/k.npy --v wb/v.npy $SMALL --precision float
forward $IN
full $IN
full $IN --precision float --cu-seqlens cu.npy
full --q wb/q.npy --k wb/k.npy --v wb/v.npy
decode $IN $SMALL --prefill 200 --cu-seqlens cu.npy
decode --q wb/q.npy --k wb/k.npy --v wb/v.npy $SMALL --prefill 37 --precision float
EOF
echo "determinism: ok ($n cases)"
