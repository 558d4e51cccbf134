# experiments/report.py, which prints the README's tables: on a fresh CPU bench.json and on the
# committed GPU results file, every ratio it prints is formed from the records it reads.
ROOT=$(realpath "$(dirname "$0")/../..")
REPORT=$ROOT/experiments/report.py
RESULTS=$ROOT/experiments/results
source "$(dirname "$0")/lib.sh"

ok "$NSA" bench --device cpu --T 256,512 --Hq 4 --reps 1 --warmup 0 --out b
ok python3 "$REPORT" b/bench.json --table cpu
[ "$(grep -c '^| fp' out.txt)" -eq 4 ] || { cat out.txt; fail "expected 4 rows (2 precisions x 2 lengths)"; }
# The speedup column is full / NSA of the same records.
python3 - b/bench.json out.txt <<'PY' || fail "cpu table does not match bench.json"
import json, sys
recs = json.load(open(sys.argv[1]))["records"]
ms = {(r["op"], r["impl"], str(r["T"]), r["dtype"]): r["ms"] for r in recs}
rows = [[c.strip() for c in l.split("|")[1:-1]] for l in open(sys.argv[2]) if l.startswith("| fp")]
for r in rows:
    want = ms[("forward", "full_cpu", r[1], r[0])] / ms[("forward", "nsa_cpu", r[1], r[0])]
    assert abs(float(r[5][:-1]) - want) <= 0.006, (r, want)
PY

for f in "$RESULTS"/h100-*.json; do
  for t in forward forward_backward decode; do
    ok python3 "$REPORT" "$f" --table $t
    [ "$(grep -c '^| [0-9]' out.txt)" -ge 4 ] || { cat out.txt; fail "$f: table $t has fewer than 4 rows"; }
  done
done
refused 1 "cannot read a results file" python3 "$REPORT" "$REPORT" --table cpu
refused 1 "no records for table 'decode'" python3 "$REPORT" b/bench.json --table decode
echo "report tables: ok"
