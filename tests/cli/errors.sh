#!/usr/bin/env bash
# Help and usage: --help exits 0 with the options; no subcommand or an unknown one exits 2.
# Every class of bad input has its own test: bad_inputs.sh.
source "$(dirname "$0")/lib.sh"
ok $NSA --help
contains out.txt "forward"
refused 2 "" $NSA
contains out.txt "usage: nsa <subcommand>"
for sub in forward full compare gen bench; do
  ok $NSA $sub --help
  contains out.txt "usage: nsa $sub"
done
ok $NSA forward --help
contains out.txt "--slc-count"
contains out.txt "--allow-nonfinite"
refused 2 "unknown subcommand 'fwd'" $NSA fwd
echo "errors: ok"
