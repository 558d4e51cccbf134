#!/usr/bin/env bash
# `nsa decode --device cuda` (the prefill through the CUDA forward pass, the other positions
# through the CUDA decode step) writes the same files as `nsa decode` on the CPU and matches it
# through `nsa compare`: bf16 on the device against float on the CPU (the device also rounds the
# inputs to bf16), every branch output but the selection's, the LSEs, the block scores, the
# compressed K/V and the gates to 3e-2 relative L2; block_idx equal up to near-ties; the same
# steps and token counts in decode_steps.csv. Without a GPU (CI) it exits 77.
source "$(dirname "$0")/lib.sh"
ok $NSA gen --T 700 --B 2 --Hq 16 --Hkv 1 --dk 128 --dv 128 --gates random --seed 7 --out w
IN="--q w/q.npy --k w/k.npy --v w/v.npy --gates w/gates.npy"
on_cuda $NSA decode $IN --device cuda --prefill 600 --out gpu
contains gpu/config.json '"dtype": "bf16"'
contains gpu/config.json '"steps": 200'
ok $NSA decode $IN --prefill 600 --precision float --out cpu
for f in cpu/*.npy cpu/decode_steps.csv; do [ -f "gpu/$(basename "$f")" ] || fail "gpu lacks $(basename "$f")"; done
ok $NSA compare gpu/block_idx.npy cpu/block_idx.npy --tie-tol 5e-2
for f in o_cmp lse_cmp o_win lse_win lse_slc block_scores k_cmp_compressed v_cmp_compressed gates; do
  ok $NSA compare gpu/$f.npy cpu/$f.npy --metric rel_l2 --rtol 3e-2
done
# The same steps, positions and token counts (bytes differ: 2 bytes per element against 4).
cut -d, -f1-8 gpu/decode_steps.csv >g.csv
cut -d, -f1-8 cpu/decode_steps.csv >c.csv
cmp -s g.csv c.csv || fail "decode_steps.csv: the steps or token counts differ"
refused 1 "fp32" $NSA decode $IN --device cuda --dtype fp32 --out bad
[ ! -e bad/o.npy ] || fail "a refused run left outputs"
echo "cuda decode through the command line: ok"
