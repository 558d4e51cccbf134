#!/usr/bin/env bash
# Writes the fuzzer's seed corpus, tests/fuzz/corpus/: small .npy files, valid ones of every
# accepted dtype, version and rank, and one of each way a file is refused. The files are committed;
# this script says how they were made (rerun it after changing it, then commit the folder).
# Inputs the fuzzer found (found_*.npy) are kept: this script leaves them in place.
set -euo pipefail
cd "$(dirname "$0")"
mkdir -p corpus
find corpus -type f ! -name 'found_*' -delete

# npy NAME VERSION DICT DATA_HEX: magic, version, header length, the dict padded to 64 bytes
# with a final newline, then the data bytes.
npy() {
  local name=$1 version=$2 dict=$3 data=$4
  local pre=$(( version == 1 ? 10 : 12 ))
  local pad=$(( (64 - (pre + ${#dict} + 1) % 64) % 64 ))
  local hl=$(( ${#dict} + pad + 1 ))
  {
    printf '\x93NUMPY'
    printf "\\x$(printf %02x "$version")\\x00"
    printf "\\x$(printf %02x $((hl & 255)))\\x$(printf %02x $(((hl >> 8) & 255)))"
    if [ "$version" -ne 1 ]; then printf '\x00\x00'; fi
    printf '%s%*s\n' "$dict" "$pad" ''
    printf "$(echo -n "$data" | sed 's/../\\x&/g')"
  } >"corpus/$name"
}
d() { echo "{'descr': '$1', 'fortran_order': $2, 'shape': $3, }"; }

# Valid.
npy f8_2x2.npy 1 "$(d '<f8' False '(2, 2)')" 000000000000f03f000000000000004000000000000008400000000000001040
npy f4_3.npy 1 "$(d '<f4' False '(3,)')" 0000803f0000c07f0000807f
npy f2_3.npy 2 "$(d '<f2' False '(3,)')" 003c00c00100
npy i4_2x1x2.npy 1 "$(d '<i4' False '(2, 1, 2)')" 01000000ffffffff0000008007000000
npy i8_3.npy 3 "$(d '<i8' False '(3,)')" 0000000000000000640000000000000000000000ffffff7f
npy scalar_f8.npy 1 "$(d '<f8' False '()')" 0000000000000440
npy empty_0x3.npy 1 "$(d '<f4' False '(0, 3)')" ''
npy pipe_order.npy 1 "$(d '|f4' False '(1,)')" 00000040
npy native_order.npy 1 "$(d '=f8' False '(1, 1)')" 0000000000002440
npy double_quotes.npy 1 "{\"descr\": \"<f4\", \"fortran_order\": False, \"shape\": (2,), }" 0000803f00000040
npy long_int.npy 1 "$(d '<f4' False '(1L, 2L)')" 0000803f00000040
# Refused.
npy big_endian.npy 1 "$(d '>f4' False '(2,)')" 3f80000040000000
npy fortran.npy 1 "$(d '<f4' True '(2, 2)')" 0000803f000000400000404000008040
npy complex.npy 1 "$(d '<c8' False '(1,)')" 0000803f00000000
npy bool.npy 1 "$(d '|b1' False '(2,)')" 0100
npy truncated_data.npy 1 "$(d '<f8' False '(4,)')" 000000000000f03f
npy extra_bytes.npy 1 "$(d '<f4' False '(1,)')" 0000803f0000
npy negative_dim.npy 1 "$(d '<f4' False '(-1,)')" ''
npy huge_shape.npy 1 "$(d '<f8' False '(999999999999999, 999999999999999)')" 00
npy bad_shape.npy 1 "$(d '<f4' False '(2, x)')" ''
npy no_descr.npy 1 "{'fortran_order': False, 'shape': (1,), }" 0000803f
npy unclosed.npy 1 "{'descr': '<f4, 'fortran_order': False, 'shape': (1, }" 0000803f
npy version9.npy 9 "$(d '<f4' False '(1,)')" 0000803f
printf '\x93NUMPY\x01\x00\xff\xff{' >corpus/truncated_header.npy
printf 'PK\x03\x04 not a numpy file' >corpus/not_npy.npy
ls corpus | wc -l
