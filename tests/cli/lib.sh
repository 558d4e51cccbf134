# Helpers for the command-line tests: each test script gets the nsa binary as $1 and a scratch
# folder; a failed expectation prints what was expected and exits 1.
set -euo pipefail
NSA=$(realpath "$1")
WORK=$(mktemp -d "${TMPDIR:-/tmp}/nsa-cli-test.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
cd "$WORK"

fail() { echo "FAILED: $*" >&2; exit 1; }
# A sanitizer build reports memory errors and undefined behaviour on stderr: never acceptable.
no_sanitizer_report() {
  ! grep -qE 'ERROR: (Address|Leak)Sanitizer|runtime error:' err.txt || { cat err.txt >&2; fail "sanitizer report: $*"; }
}
# ok CMD...: the command must exit 0.
ok() {
  "$@" >out.txt 2>err.txt || { cat out.txt err.txt >&2; fail "expected success: $*"; }
  no_sanitizer_report "$@"
}
# refused CODE TEXT CMD...: the command must exit with CODE and print TEXT on stderr.
refused() {
  local code=$1 text=$2; shift 2
  set +e; "$@" >out.txt 2>err.txt; local rc=$?; set -e
  [ "$rc" -eq "$code" ] || { cat out.txt err.txt >&2; fail "expected exit $code, got $rc: $*"; }
  [ -z "$text" ] || grep -qF -- "$text" err.txt || { cat err.txt >&2; fail "expected '$text' in stderr of: $*"; }
  no_sanitizer_report "$@"
}
# on_cuda CMD...: the first CUDA command of a test; without a GPU (or a CUDA build) the test is
# skipped: exit 77, which ctest reports as skipped, with the reason printed.
on_cuda() {
  set +e; "$@" >out.txt 2>err.txt; local rc=$?; set -e
  if [ $rc -ne 0 ] && grep -qE "no usable CUDA device|no CUDA device present|built without the CUDA path" err.txt; then
    echo "SKIPPED: $(cat err.txt)"
    exit 77
  fi
  [ $rc -eq 0 ] || { cat out.txt err.txt >&2; fail "expected success: $*"; }
}
# contains FILE TEXT
contains() { grep -qF -- "$2" "$1" || { cat "$1" >&2; fail "expected '$2' in $1"; }; }

# mknpy FILE DESCR FORTRAN SHAPE DATA_BYTES: a .npy file (format 1.0) with this header and
# DATA_BYTES zero bytes of data, written sparse, so a header announcing terabytes costs no disk.
# mknpy x.npy '<f4' False '(2, 3)' 24 is a valid float32 [2, 3] of zeros.
mknpy() {
  local dict="{'descr': '$2', 'fortran_order': $3, 'shape': $4, }"
  local pad=$(( (64 - (10 + ${#dict} + 1) % 64) % 64 ))
  local hl=$(( ${#dict} + pad + 1 ))
  {
    printf '\x93NUMPY\x01\x00'
    printf "\\x$(printf %02x $((hl & 255)))\\x$(printf %02x $((hl >> 8)))"
    printf '%s%*s\n' "$dict" "$pad" ''
  } >"$1"
  truncate -s "+$5" "$1"
}
# npy_data_offset FILE: where the data of a format-1.0 .npy file starts.
npy_data_offset() { echo $(( 10 + $(od -An -tu2 -j8 -N2 "$1" | tr -d ' ') )); }
# poke FILE INDEX HEX: overwrites element INDEX (C order) of a format-1.0 .npy file with the
# little-endian bytes HEX, whose length gives the element size: 0000c07f is a float32 NaN,
# 0000807f float32 +Inf, 9c7500883ce4377e the float64 1e300.
poke() {
  local size=$(( ${#3} / 2 ))
  local off=$(( $(npy_data_offset "$1") + size * $2 ))
  printf "$(echo "$3" | sed 's/../\\x&/g')" | dd of="$1" bs=1 seek="$off" conv=notrunc status=none
}
