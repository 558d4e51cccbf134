#!/usr/bin/env bash
# `nsa simulate` at tiny sizes: a drawn selection and nsa forward's block_idx replayed, every file
# and column, identities that hold exactly (q has no reuse; K/V fetched once when the L2 holds
# them; block-centric reads each selected block once), refusals with no partial output.
source "$(dirname "$0")/lib.sh"
SHAPE="--Hq 8 --Hkv 2 --dk 64 --dv 64 --slc-len 16 --slc-count 4 --cmp-len 16 --cmp-stride 16 --window 32"

ok $NSA simulate --help
contains out.txt "--block-idx"
contains out.txt "--schedule"
ok $NSA --help
contains out.txt "simulate"

# A drawn selection, written out and replayed from the file: the same numbers.
ok $NSA simulate --selection clustered --T 700 --corr-len 16 --selection-seed 3 $SHAPE --gpu h100 --sample 1 \
  --reuse-sample 1 --schedule both --branches cmp,slc,win --save-block-idx --out s
for f in simulate.csv streams.csv reuse.csv simulate.json config.json block_idx.npy; do
  [ -s s/$f ] || fail "simulate did not write $f"
done
contains s/simulate.csv "schedule,branch,l2_read_bytes,l2_write_bytes,hbm_read_bytes,hbm_read_stderr,hbm_write_bytes,sector_read_hit_rate,useful_flops,executed_flops,formula_bytes,kv_block_loads,ctas,tiles,ctas_resident,ms_hbm,ms_l2,ms_matrix,predicted_ms,bound"
contains s/streams.csv "schedule,branch,stream,l2_read_bytes,l2_write_bytes,hbm_read_bytes"
contains s/reuse.csv "schedule,branch,kind,distance_lo_bytes,distance_hi_bytes,accesses,fraction"
# 2 schedules x 3 branches, and a header.
[ "$(wc -l < s/simulate.csv)" -eq 7 ] || fail "simulate.csv has $(wc -l < s/simulate.csv) lines, expected 7"
ok $NSA simulate --block-idx s/block_idx.npy --Hq 8 --dk 64 --dv 64 --slc-len 16 --gpu h100 --sample 1 \
  --reuse-sample 1 --out f
python3 - s/simulate.json f/simulate.json <<'PY'
import json, sys
a, b = (json.load(open(p)) for p in sys.argv[1:])
def slc(j, sched):
    r = next(x for x in j["results"] if x["schedule"] == sched)
    return next(x for x in r["branches"] if x["branch"] == "slc")
q, fq, blk = slc(a, "query"), slc(b, "query"), slc(a, "block")
for k in ("l2_read_bytes", "hbm_read_bytes", "kv_block_loads", "useful_flops"):
    assert q[k] == fq[k], (k, q[k], fq[k])
T, Hq, Hkv, d = 700, 8, 2, 64
# q: read once by the query-centric kernel, nothing to reuse; the lists: one 32-byte sector each.
assert q["streams"]["q"]["l2_read_bytes"] == T * Hq * d * 2, q["streams"]["q"]
assert q["streams"]["q"]["hbm_read_bytes"] == T * Hq * d * 2
assert q["streams"]["idx"]["l2_read_bytes"] == T * Hkv * 32
# The L2 (50 MiB) holds K and V (2 x 179 KB): each row of each group once from HBM, all of them
# (every block is the initial, a local or a kept one for some position).
assert q["streams"]["k"]["hbm_read_bytes"] == T * Hkv * d * 2, q["streams"]["k"]
assert q["streams"]["v"]["hbm_read_bytes"] == T * Hkv * d * 2
assert q["hbm_read_stderr"] == 0 and q["hbm_write_bytes"] == 0
# Block-centric: a CTA per selected block of a group and 64 of its positions, each loading the block once.
assert blk["streams"]["k"]["l2_read_bytes"] <= q["streams"]["k"]["l2_read_bytes"]
assert blk["kv_block_loads"] == blk["ctas"] >= Hkv * 44
assert blk["useful_flops"] == q["useful_flops"]
for sched in a["results"]:
    for br in sched["branches"]:
        assert 0 <= br["sector_read_hit_rate"] <= 1 and br["predicted_ms"] > 0, br
        assert br["bound"] in ("hbm", "l2", "matrix")
print("simulate identities: ok")
PY

# nsa forward's own selection replayed (a [B, T, Hkv, n] batch of two sequences).
ok $NSA gen --T 200 --B 2 --Hq 4 --Hkv 2 --dk 16 --dv 16 --seed 4 --out w
ok $NSA forward --q w/q.npy --k w/k.npy --v w/v.npy --cmp-len 16 --cmp-stride 8 --slc-len 16 --slc-count 4 --window 32 \
  --compress mean --out fw
ok $NSA simulate --block-idx fw/block_idx.npy --Hq 4 --dk 16 --dv 16 --slc-len 16 --schedule block --out fs
contains fs/simulate.json '"sequences": 2'
contains fs/simulate.json '"positions": 400'

# --generate-only: the selection and config.json, nothing else.
ok $NSA simulate --selection random --T 300 $SHAPE --generate-only --out g
[ "$(ls g | sort | tr '\n' ' ')" = "block_idx.npy config.json " ] || fail "generate-only wrote: $(ls g)"

# Refusals, with no partial output.
refused 2 "give one of --block-idx FILE or --selection" $NSA simulate $SHAPE --out bad
refused 2 "give one of --block-idx FILE or --selection" $NSA simulate --selection random --block-idx s/block_idx.npy --out bad
refused 1 "is not one of: random, clustered, recent" $NSA simulate --selection zipf --out bad
refused 1 "gpu 'v100' is not one of" $NSA simulate --selection random --T 100 $SHAPE --gpu v100 --out bad
refused 1 "is not one of: query, block" $NSA simulate --selection random --T 100 $SHAPE --schedule tiles --out bad
refused 1 "but --slc-count = 8" $NSA simulate --block-idx s/block_idx.npy --Hq 8 --slc-len 16 --slc-count 8 --out bad
refused 1 "is not a valid block" $NSA simulate --block-idx s/block_idx.npy --Hq 8 --slc-len 32 --out bad
mknpy f2.npy '<f4' False '(10, 2, 4)' 320
refused 1 "f2.npy" $NSA simulate --block-idx f2.npy --out bad
refused 1 "cache line size = 100 B" $NSA simulate --selection random --T 100 $SHAPE --l2-line 100 --out bad
[ ! -e bad ] || [ -z "$(ls -A bad)" ] || fail "a refused simulate left files in bad/"
echo "simulate: ok"
