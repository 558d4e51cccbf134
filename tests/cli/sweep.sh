#!/usr/bin/env bash
# `nsa sweep`: the issue's command as written, fixed columns, resume, jobs-independence, INI = flags,
# real-data (.npy) workloads, a bad point refused before anything runs.
source "$(dirname "$0")/lib.sh"
# stable FILE: the CSV without its wall-time column (the one column that differs between runs).
stable() { awk -F, 'NR == 1 { for (i = 1; i <= NF; i++) if ($i == "seconds") s = i } { $s = ""; print }' OFS=, "$1"; }
# column FILE NAME: the values of one column.
column() { awk -F, -v n="$2" 'NR == 1 { for (i = 1; i <= NF; i++) if ($i == n) c = i; next } { print $c }' "$1"; }
ok $NSA sweep --workload needle --context 2048 --slc-len 32,64 --slc-count 4,8 --window 128 --out s
[ "$(wc -l < s/sweep.csv)" -eq 5 ] || fail "expected 4 rows"
H=workload,data,T,depth,needle_len,needle_strength,corr_len,seed,Hq,Hkv,dk,dv,cmp_len,cmp_stride,slc_len,slc_count
H=$H,window,init_blocks,local_blocks,compress,compress_params,selector,precision,queries,recall,mass,mass_with_window
H=$H,rel_error,rel_error_cmp,rel_error_slc,rel_error_win,needle_found,flops_nsa,flops_full,flop_ratio,bytes_nsa
H=$H,bytes_full,traffic_ratio,decode_speedup,ms_nsa,ms_full,seconds
[ "$(head -1 s/sweep.csv)" = "$H" ] || fail "unexpected header: $(head -1 s/sweep.csv)"
contains s/sweep.json '"records"'
contains s/config.json '"points": 4'
# Rerun: every point is already there; nothing is recomputed, the file is unchanged.
cp s/sweep.csv before.csv
ok $NSA sweep --workload needle --context 2048 --slc-len 32,64 --slc-count 4,8 --window 128 --out s
contains out.txt "4 already in"
contains out.txt "0 to run"
cmp -s before.csv s/sweep.csv || fail "a rerun changed sweep.csv"
# Resume: drop two rows (as if interrupted); the rerun computes exactly those, in grid order.
head -3 before.csv > s/sweep.csv
ok $NSA sweep --workload needle --context 2048 --slc-len 32,64 --slc-count 4,8 --window 128 --out s
contains out.txt "2 to run"
stable before.csv > a.txt; stable s/sweep.csv > b.txt
cmp -s a.txt b.txt || { diff a.txt b.txt >&2; fail "resumed sweep differs from the uninterrupted one"; }
# One job or two: the same rows in the same order.
G="--workload clustered --context 256 --corr-len 8,64 --Hq 4 --Hkv 2 --dk 16 --dv 16 --cmp-len 16 --cmp-stride 8 --slc-len 16,32 --slc-count 4 --window 32"
ok $NSA sweep $G --jobs 1 --out j1
ok $NSA sweep $G --jobs 2 --out j2
stable j1/sweep.csv > a.txt; stable j2/sweep.csv > b.txt
cmp -s a.txt b.txt || { diff a.txt b.txt >&2; fail "--jobs 2 differs from --jobs 1"; }
[ "$(wc -l < j1/sweep.csv)" -eq 5 ] || fail "expected 4 clustered rows"
# An INI file gives the same grid as the flags.
printf 'workload = clustered\ncontext = 256\ncorr-len = 8,64\nHq = 4\nHkv = 2\ndk = 16\ndv = 16\ncmp-len = 16\ncmp-stride = 8\nslc-len = 16,32\nslc-count = 4\nwindow = 32\n' > grid.ini
ok $NSA sweep --config grid.ini --out ini
stable ini/sweep.csv > b.txt
cmp -s a.txt b.txt || { diff a.txt b.txt >&2; fail "INI sweep differs from flags"; }
# Real data: .npy dumps (here from gen), cut to the first 128 tokens; timing columns with --time cpu.
ok $NSA gen --T 200 --Hq 2 --Hkv 1 --dk 8 --dv 8 --out dump
ok $NSA sweep --workload npy --data dump --context 128,0 --cmp-len 8 --cmp-stride 4 --slc-len 16 --slc-count 4 --window 16 \
  --compress mean --time cpu --reps 1 --warmup 0 --out npy
grep -q '^npy,dump,128,' npy/sweep.csv || fail "no npy row at T=128"
grep -q '^npy,dump,200,' npy/sweep.csv || fail "context 0 should mean all 200 tokens"
! column npy/sweep.csv ms_nsa | grep -q '^$' || fail "--time cpu left ms_nsa empty"
! column npy/sweep.csv ms_full | grep -q '^$' || fail "--time cpu left ms_full empty"
# The first sweep's phi is an untrained (seed-0) mlp: it scrambles the needle's direction, and no
# question finds the needle at depth 0.5 (mean pooling does: test_experiments; training: nsa train).
[ "$(column s/sweep.csv needle_found | sort -u)" = "0" ] || fail "random-mlp needle sweep: expected needle_found 0"
# Selectors: the oracle's recall is 1 by definition; rel_error is NSA's own (empty for the others).
ok $NSA sweep --workload clustered --context 512 --Hq 4 --Hkv 2 --dk 16 --dv 16 --cmp-len 16 --cmp-stride 8 \
  --slc-len 32 --slc-count 4 --window 32 --selector nsa,oracle,random --out sel
[ "$(column sel/sweep.csv selector | tr '\n' ' ')" = "nsa oracle random " ] || fail "selector rows out of grid order"
[ "$(column sel/sweep.csv recall | sed -n 2p)" = "1" ] || fail "oracle recall is not 1"
[ -n "$(column sel/sweep.csv rel_error | sed -n 1p)" ] && [ -z "$(column sel/sweep.csv rel_error | sed -n 2p)" ] ||
  fail "rel_error should be set for nsa only"
refused 1 "is not one of" $NSA sweep --selector best --out bad
# A bad point is refused before anything runs, naming it.
refused 1 "slc_count=2" $NSA sweep --slc-count 2,16 --context 256 --out bad
[ ! -e bad/sweep.csv ] || fail "a refused sweep wrote rows"
refused 1 "context = 300 is invalid" $NSA sweep --workload npy --data dump --context 300 --out bad
echo "sweep: ok"
