#!/usr/bin/env bash
# `nsa gen` writes each workload with what it plants, and the files feed the other subcommands.
source "$(dirname "$0")/lib.sh"
# needle: one sequence per depth, the needle's positions and answer beside q, k, v.
ok $NSA gen --workload needle --T 256 --Hq 4 --Hkv 2 --dk 16 --dv 8 --depth 0,0.5,1 --needle-len 8 --questions 4 --out nd
for f in q k v needle_pos needle_value config.json; do [ -f nd/$f.npy ] || [ -f nd/$f ] || fail "nd/$f missing"; done
contains nd/config.json '"first_question": 252'
contains nd/config.json '"start": ['
ok $NSA forward --q nd/q.npy --k nd/k.npy --v nd/v.npy --cmp-len 8 --cmp-stride 4 --slc-len 16 --slc-count 4 --window 16 \
  --compress mean --out ndf
contains ndf/config.json '"batch": 3'
refused 1 "depth = 2" $NSA gen --workload needle --depth 0.5,2 --out bad
refused 1 "one sequence per depth" $NSA gen --workload needle --B 2 --out bad
# clustered
ok $NSA gen --workload clustered --T 128 --Hq 2 --Hkv 1 --dk 8 --dv 8 --corr-len 16 --out cl
ok $NSA full --q cl/q.npy --k cl/k.npy --v cl/v.npy --out clf
refused 1 "corr_len = -1" $NSA gen --workload clustered --corr-len -1 --out bad
refused 1 "is not one of: random, needle, clustered" $NSA gen --workload zipf --out bad
[ ! -e bad ] || [ -z "$(ls -A bad)" ] || fail "a refused gen left files in bad/"
echo "workloads: ok"
