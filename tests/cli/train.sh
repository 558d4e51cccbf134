#!/usr/bin/env bash
# `nsa train`: fixed columns, determinism, the learned phi usable as --compress-params, refusals.
source "$(dirname "$0")/lib.sh"
L="--T 256 --batch 2 --Hq 2 --dk 8 --dv 8 --cmp-hidden 32 --cmp-len 8 --cmp-stride 4 --slc-len 16 --slc-count 5 --window 16"
ok $NSA train $L --steps 5 --out a
[ "$(head -1 a/train.csv)" = "step,loss,needle_found,recall,mass,gate_cmp,gate_slc,gate_win,grad_norm,seconds" ] ||
  fail "unexpected header: $(head -1 a/train.csv)"
[ "$(wc -l < a/train.csv)" -eq 6 ] || fail "expected 5 steps"
for f in train.json gate_w.npy gate_b.npy config.json phi/w1_k.npy phi/w2_v.npy phi/pe_k.npy; do [ -f a/$f ] || fail "a/$f missing"; done
# The same run again: the same numbers (all but the wall time).
ok $NSA train $L --steps 5 --threads 1 --out b
cut -d, -f1-9 a/train.csv > x.txt; cut -d, -f1-9 b/train.csv > y.txt
cmp -s x.txt y.txt || { diff x.txt y.txt >&2; fail "two runs (threads all and 1) differ"; }
# The learned phi drives nsa forward and nsa sweep.
ok $NSA gen --workload needle --T 256 --Hq 2 --Hkv 1 --dk 8 --dv 8 --out w
ok $NSA forward --q w/q.npy --k w/k.npy --v w/v.npy --cmp-hidden 32 --cmp-len 8 --cmp-stride 4 --slc-len 16 \
  --slc-count 5 --window 16 --compress-params a/phi --out f
ok $NSA sweep --workload needle --context 256 --Hq 2 --Hkv 1 --dk 8 --dv 8 --cmp-hidden 32 --cmp-len 8 --cmp-stride 4 \
  --slc-len 16 --slc-count 5 --window 16 --compress-params a/phi --out s
contains s/sweep.csv ",a/phi,nsa,"
# A phi of other shapes is refused naming the file.
refused 1 "a/phi/pe_k.npy" $NSA sweep --workload needle --context 256 --Hq 2 --Hkv 1 --dk 8 --dv 8 --cmp-len 16 \
  --cmp-stride 8 --slc-len 16 --slc-count 5 --window 16 --compress-params a/phi --out bad
refused 1 "mean pooling has no parameters" $NSA train $L --compress mean --out bad
refused 1 "learn: 'gate'" $NSA train $L --learn gate --out bad
refused 2 "training starts from phi drawn" $NSA train $L --compress-params a/phi --out bad
echo "train: ok"
