#!/usr/bin/env bash
# The spec's identities through the command line: full attention three ways, oracle = fast,
# float ~ double, INI config = flags, config.json beside the outputs.
source "$(dirname "$0")/lib.sh"
ok $NSA gen --T 300 --Hq 4 --Hkv 2 --dk 16 --dv 8 --seed 3 --out w
IN="--q w/q.npy --k w/k.npy --v w/v.npy"
ok $NSA full $IN --out full
# A window covering everything is full attention.
ok $NSA forward $IN --window 300 --cmp-len 8 --cmp-stride 4 --slc-len 16 --slc-count 4 --out win
ok $NSA compare win/o_win.npy full/o.npy --rtol 1e-12 --atol 1e-14
ok $NSA compare win/lse_win.npy full/lse.npy --rtol 1e-12 --atol 1e-14
# Selecting every block (n >= ceil(300/64) = 5) is full attention.
ok $NSA forward $IN --slc-count 5 --out slc
ok $NSA compare slc/o_slc.npy full/o.npy --rtol 1e-12 --atol 1e-14
# Mean compression with l = d = 1 is full attention.
ok $NSA forward $IN --compress mean --cmp-len 1 --cmp-stride 1 --out cmp
ok $NSA compare cmp/o_cmp.npy full/o.npy --rtol 1e-12 --atol 1e-14
# ... and a real difference is caught: the compressed branch of l = 32 is not full attention.
refused 1 "" $NSA compare win/o_cmp.npy full/o.npy
contains out.txt "FAIL"
# Oracle (plain loops) and fast path agree to 1e-12; float is within float round-off of double.
ok $NSA forward $IN --cmp-len 8 --cmp-stride 4 --slc-len 16 --slc-count 4 --window 32 --out fast
ok $NSA forward $IN --cmp-len 8 --cmp-stride 4 --slc-len 16 --slc-count 4 --window 32 --path oracle --out oracle
ok $NSA compare fast oracle --metric rel_l2 --rtol 1e-12
contains out.txt "12 files compared"
ok $NSA forward $IN --cmp-len 8 --cmp-stride 4 --slc-len 16 --slc-count 4 --window 32 --precision float --out float
ok $NSA compare float fast --metric rel_l2 --rtol 1e-5
# An INI config gives the same result as the flags; the resolved config is written.
printf 'cmp-len = 8\ncmp-stride = 4\nslc-len = 16\nslc-count = 4\nwindow = 32\n' > run.ini
ok $NSA forward $IN --config run.ini --out ini
ok $NSA compare ini fast --rtol 0 --atol 0
contains ini/config.json '"window": 32'
contains ini/config.json '"slc_len": 16'
# A batch [B, T, H, D] gives outputs [B, T, ...].
ok $NSA gen --T 100 --B 2 --Hq 4 --Hkv 2 --dk 16 --dv 8 --out wb
ok $NSA forward --q wb/q.npy --k wb/k.npy --v wb/v.npy --out batch
contains batch/config.json '"seqlens": ['
echo "forward identities: ok"
