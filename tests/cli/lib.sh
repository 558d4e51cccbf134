# Helpers for the command-line tests: each test script gets the nsa binary as $1 and a scratch
# folder; a failed expectation prints what was expected and exits 1.
set -euo pipefail
NSA=$(realpath "$1")
WORK=$(mktemp -d "${TMPDIR:-/tmp}/nsa-cli-test.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
cd "$WORK"

fail() { echo "FAILED: $*" >&2; exit 1; }
# ok CMD...: the command must exit 0.
ok() { "$@" >out.txt 2>err.txt || { cat out.txt err.txt >&2; fail "expected success: $*"; }; }
# refused CODE TEXT CMD...: the command must exit with CODE and print TEXT on stderr.
refused() {
  local code=$1 text=$2; shift 2
  set +e; "$@" >out.txt 2>err.txt; local rc=$?; set -e
  [ "$rc" -eq "$code" ] || { cat out.txt err.txt >&2; fail "expected exit $code, got $rc: $*"; }
  [ -z "$text" ] || grep -qF -- "$text" err.txt || { cat err.txt >&2; fail "expected '$text' in stderr of: $*"; }
}
# contains FILE TEXT
contains() { grep -qF -- "$2" "$1" || { cat "$1" >&2; fail "expected '$2' in $1"; }; }
