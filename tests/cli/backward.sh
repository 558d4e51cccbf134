#!/usr/bin/env bash
# `nsa backward` through the command line: every gradient file it writes agrees with central
# finite differences of the forward pass (`nsa gradcheck`), on workloads covering shared and
# separate k/v, the three phi kinds, gates given, computed (with and without a hidden layer) and
# all ones, G = 1 and G = 2, dk != dv, a batch, t < l and w >= T; oracle = fast, float ~ double;
# a wrong gradient is caught; bad --do files are refused.
source "$(dirname "$0")/lib.sh"
BLOCKS="--cmp-len 8 --cmp-stride 4 --slc-len 16 --slc-count 4"
SMALL="$BLOCKS --window 32"
# checked NAME GEN_OPTIONS... -- NSA_OPTIONS...: gen (float64, with do.npy) into w_NAME, backward
# into g_NAME, then gradcheck, with one thread (it runs hundreds of tiny forward passes). Leaves
# the inputs' options in ARGS_NAME.
checked() {
  local name=$1; shift
  local gen=(); while [ "$1" != "--" ]; do gen+=("$1"); shift; done; shift
  ok $NSA gen --dtype float64 --do "${gen[@]}" --out "w_$name"
  local in="--q w_$name/q.npy --k w_$name/k.npy --v w_$name/v.npy --do w_$name/do.npy"
  for f in k_cmp v_cmp k_slc v_slc k_win v_win gates gate_x gate_w gate_b gate_w0 gate_b0; do
    if [ -e "w_$name/$f.npy" ]; then in="$in --${f//_/-} w_$name/$f.npy"; fi
  done
  in="$in $*"
  eval "ARGS_$name=\"\$in\""
  ok $NSA backward $in --out "g_$name"
  ok $NSA gradcheck $in --grads "g_$name" --threads 1
  contains out.txt "PASS: "
}
HEADS="--T 100 --Hq 4 --Hkv 2 --dk 16 --dv 8"
# Separate k/v per branch, mlp phi, gate MLP with a hidden layer, G = 2, dk != dv.
checked sep $HEADS --separate-kv --gates mlp -- $SMALL
contains out.txt "PASS: 23 gradient files checked"
for f in dq dk_cmp dv_cmp dk_slc dv_slc dk_win dv_win dgates dpe_k dw1_k db1_k dw2_k db2_k dpe_v dw1_v db1_v \
         dw2_v db2_v dgate_x dgate_w dgate_b dgate_w0 dgate_b0; do
  [ -e "g_sep/$f.npy" ] || fail "g_sep/$f.npy missing"
done
[ ! -e g_sep/dk.npy ] || fail "dk.npy written although every branch has keys of its own"
# Shared k/v, linear phi, given gates, G = 1: dk and dv are written (the branches' sums).
checked lin --T 100 --Hq 2 --Hkv 2 --dk 16 --dv 8 --gates random -- $SMALL --compress linear
[ -e g_lin/dk.npy ] && [ -e g_lin/dv.npy ] && [ -e g_lin/dw_k.npy ] && [ -e g_lin/db_v.npy ] || fail "g_lin incomplete"
# Mean phi, gate MLP without a hidden layer, w >= T, a batch of 2 sequences.
checked mean $HEADS --B 2 --gates linear -- $BLOCKS --compress mean --window 200
contains g_mean/config.json '"batch": 2'
# T < l: no compressed block; gates all ones.
checked short --T 6 --Hq 4 --Hkv 2 --dk 16 --dv 8 -- $SMALL
# Oracle (plain loops) = fast path to 1e-12; float within float round-off of double. Elementwise
# with an absolute floor: db2_k is zero in exact arithmetic (a shift of every compressed key
# leaves the softmax unchanged), so both paths hold only their round-off there.
ok $NSA backward $ARGS_sep --path oracle --out oracle
ok $NSA compare g_sep oracle --rtol 1e-12 --atol 1e-13
contains out.txt "23 files compared"
ok $NSA backward $ARGS_sep --precision float --out float
ok $NSA compare float g_sep --rtol 1e-3 --atol 1e-5
# A wrong gradient is caught: dq computed with other phi parameters (--seed 5).
ok $NSA backward $ARGS_lin --seed 5 --out lin5
cp -r g_lin wrong && cp lin5/dq.npy wrong/dq.npy
refused 1 "" $NSA gradcheck $ARGS_lin --grads wrong --threads 1
contains out.txt "FAIL"
# Bad --do: missing, wrong shape; a failed run leaves no output.
refused 2 "the option '--do' is required" $NSA backward --q w_sep/q.npy --k w_sep/k.npy --v w_sep/v.npy --out bad
refused 1 "--do w_sep/q.npy: shape [100, 4, 16], expected [100, 4, 8]" \
  $NSA backward --q w_sep/q.npy --k w_sep/k.npy --v w_sep/v.npy --do w_sep/q.npy --out bad
[ ! -e bad ] || [ -z "$(ls -A bad)" ] || fail "a failed run left files in bad/"
# nsa bench times the backward passes too, each against its forward (tiny smoke run).
ok $NSA bench --T 64,100 --Hq 4 --Hkv 2 --dk 16 --dv 8 $SMALL --precisions double --reps 1 --warmup 0 --threads 1 \
  --clock cpu --out bench
contains out.txt "backward nsa_cpu  T=   100 fp64"
contains out.txt "x its forward"
contains bench/bench.csv "backward,full_cpu,64,fp64"
contains bench/bench.json '"backward_over_forward"'
contains bench/bench.json '"clock": "cpu"'
refused 1 "ops: backward is timed against its forward pass" $NSA bench --ops backward --out bench2
echo "backward: ok"
