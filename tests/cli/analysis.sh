#!/usr/bin/env bash
# The analysis subcommands at tiny sizes: recall, locality, traffic write their tables, the
# identities hold through the command line, the paper's decode table comes out, errors exit.
source "$(dirname "$0")/lib.sh"
ok $NSA gen --T 300 --Hq 4 --Hkv 2 --dk 16 --dv 8 --seed 5 --out w
IN="--q w/q.npy --k w/k.npy --v w/v.npy"
SMALL="--cmp-len 8 --cmp-stride 4 --slc-len 16 --slc-count 4 --window 32"

# recall: every selector, tables and maps.
ok $NSA recall --help
contains out.txt "--selectors"
ok $NSA recall $IN $SMALL --buckets 4 --save-selections --save-block-mass --out rec
for f in recall.csv summary.json config.json nsa_recall.npy oracle_mass.npy window_mass_with_window.npy \
         quest_idx.npy block_mass.npy; do
  [ -s rec/$f ] || fail "recall did not write $f"
done
contains rec/recall.csv "selector,bucket,t_lo,t_hi,group,positions,recall,mass,mass_with_window"
# 6 selectors x (4 buckets + all) x (2 groups + all) rows and a header.
[ "$(wc -l < rec/recall.csv)" -eq 91 ] || fail "recall.csv has $(wc -l < rec/recall.csv) lines, expected 91"
contains rec/recall.csv "oracle,all,0,300,all,"
python3 - rec/summary.json <<'EOF'
import json, sys
s = json.load(open(sys.argv[1]))
assert set(s) == {"nsa", "oracle", "quest", "meanpool", "random", "window"}, s.keys()
assert s["oracle"]["recall"] == 1.0, s["oracle"]
for k, v in s.items():
    assert 0 <= v["recall"] <= 1 and 0 < v["mass"] <= v["mass_with_window"] <= 1 + 1e-12, (k, v)
    assert v["mass"] <= s["oracle"]["mass"] + 1e-12, (k, v)
    assert v["positions"] == 2 * (300 - 64), (k, v)  # positions with more than n = 4 blocks of 16
EOF
# Selecting every block (n >= ceil(300/16) = 19): recall 1 and mass 1, all positions counted.
ok $NSA recall $IN --cmp-len 8 --cmp-stride 4 --slc-len 16 --slc-count 19 --include-trivial --selectors nsa,random --out all
python3 - all/summary.json <<'EOF'
import json, sys
s = json.load(open(sys.argv[1]))
for k, v in s.items():
    assert v["recall"] == 1.0 and abs(v["mass"] - 1) < 1e-12 and v["positions"] == 600, (k, v)
EOF
refused 1 "selector 'topk' is not one of" $NSA recall $IN $SMALL --selectors nsa,topk --out bad
refused 1 "double only" $NSA recall $IN $SMALL --precision float --out bad
[ ! -e bad ] || [ -z "$(ls -A bad)" ] || fail "a failed recall left files in bad/"

# locality: three tables and the JSON.
ok $NSA locality $IN --queries 16 --block-sizes 8,16 --ks 1,2 --lags 1,2,4 --out loc
for f in locality_topk.csv locality_autocorr.csv locality_distance.csv locality.json config.json; do
  [ -s loc/$f ] || fail "locality did not write $f"
done
contains loc/locality_topk.csv "block_size,k,tokens,rows,block_mass,token_mass,ratio"
[ "$(wc -l < loc/locality_topk.csv)" -eq 5 ] || fail "locality_topk.csv: expected 4 rows"
contains loc/locality_autocorr.csv "lag,rows,autocorr"
refused 1 "block sizes = 0 is invalid" $NSA locality $IN --block-sizes 0 --out bad

# traffic: the paper's decode table under the paper's convention, exactly.
ok $NSA traffic --decode --context 8192,16384,32768,65536 --convention paper --out tp
printf 'context,full_tokens,nsa_tokens,expected_speedup\n8192,8192,2048,4\n16384,16384,2560,6.4\n32768,32768,3584,9.142857143\n65536,65536,5632,11.63636364\n' > want.csv
diff want.csv tp/decode.csv || fail "decode.csv differs from the paper's table"
[ ! -e tp/prefill.csv ] || fail "--decode alone wrote prefill.csv"
ok $NSA traffic --context 4096 --convention exact --gpu a100 --peak-tflops 280 --out te
for f in decode.csv prefill.csv traffic.csv traffic.json; do [ -s te/$f ] || fail "traffic did not write $f"; done
contains te/traffic.csv "phase,convention,loading,context,batch,branch,tokens,bytes,flops,intensity,roofline_ms"
contains te/traffic.json '"flops_per_s": 280000000000000.0'
refused 1 "convention = 'tokens' is not one of: paper, exact" $NSA traffic --convention tokens --out bad
refused 1 "device 'tpu' is not one of" $NSA traffic --gpu tpu --out bad
echo "analysis: ok"
