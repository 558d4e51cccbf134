#!/usr/bin/env bash
# Usage errors exit 2, bad inputs exit 1 with the file and the problem named, and a failed run
# leaves no partial output.
source "$(dirname "$0")/lib.sh"
ok $NSA --help
ok $NSA forward --help
contains out.txt "--slc-count"
refused 2 "unknown subcommand 'fwd'" $NSA fwd
refused 2 "unrecognised option '--windw'" $NSA forward --windw 3
ok $NSA gen --T 64 --Hq 4 --Hkv 2 --dk 16 --dv 8 --out w
IN="--q w/q.npy --k w/k.npy --v w/v.npy"
refused 1 "missing.npy: cannot open file" $NSA forward --q missing.npy --k w/k.npy --v w/v.npy --out o
refused 1 "cmp_stride (d) = 64 is invalid: expected 1 <= d <= cmp_len (l) = 32" $NSA forward $IN --cmp-stride 64 --out o
refused 1 "slc_count (n) = 2 is invalid" $NSA forward $IN --slc-count 2 --out o
refused 1 "compress = 'pool' is not one of: mean, linear, mlp" $NSA forward $IN --compress pool --out o
ok $NSA gen --T 32 --Hq 4 --Hkv 2 --dk 16 --dv 8 --out w32
refused 1 "--k-cmp w32/k.npy: shape [32, 2, 16], expected [64, 2, 16]" $NSA forward $IN --k-cmp w32/k.npy --out o
refused 1 "not a .npy file" $NSA forward --q w/config.json --k w/k.npy --v w/v.npy --out o
[ ! -e o ] || [ -z "$(ls -A o)" ] || fail "a failed run left files in o/"
refused 2 "the option '--out' is required" $NSA forward $IN
echo "errors: ok"
