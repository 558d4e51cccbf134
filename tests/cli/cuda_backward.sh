#!/usr/bin/env bash
# `nsa backward --device cuda` writes the same files as `--device cpu` and matches it through the
# command line: in fp32 (the fp32 kernels) every gradient file to 1e-4 relative L2 when both devices
# select the same blocks (checked through `nsa forward`); db2_k, zero in exact arithmetic, to an
# absolute 1e-4. In bf16 (tensor cores) the same file set, and the deterministic mode writes the
# same bytes twice. Without a GPU (CI) it exits 77, which ctest reports as skipped.
source "$(dirname "$0")/lib.sh"
ok $NSA gen --T 700 --Hq 8 --Hkv 2 --dk 128 --dv 128 --gates random --do --seed 5 --out w
IN="--q w/q.npy --k w/k.npy --v w/v.npy --gates w/gates.npy --slc-count 4"
on_cuda $NSA backward $IN --do w/do.npy --device cuda --dtype fp32 --out gpu32
contains gpu32/config.json '"backward": {'
contains gpu32/config.json '"variant": "fp32"'
ok $NSA backward $IN --do w/do.npy --out cpu
n=0
for f in cpu/*.npy; do
  [ -f "gpu32/$(basename "$f")" ] || fail "gpu32 lacks $(basename "$f")"
  n=$((n + 1))
done
[ "$(ls gpu32/*.npy | wc -l)" -eq "$n" ] || fail "gpu32 holds other files than cpu: $(ls gpu32)"
# The gradients hold the selected blocks fixed: compare where both devices select the same ones.
ok $NSA forward $IN --device cuda --dtype fp32 --out fgpu
ok $NSA forward $IN --out fcpu
ok $NSA compare fgpu/block_idx.npy fcpu/block_idx.npy --tie-tol 1e-4
if grep -q "equal" out.txt; then
  for f in cpu/*.npy; do
    name=$(basename "$f" .npy)
    if [ "$name" = db2_k ]; then
      ok $NSA compare "gpu32/$name.npy" "$f" --rtol 0 --atol 1e-4
    else
      ok $NSA compare "gpu32/$name.npy" "$f" --metric rel_l2 --rtol 1e-4
    fi
  done
else
  echo "note: near-ties changed some selections: $(cat out.txt); the gradient files are not compared"
fi
# bf16 on the tensor cores: the same files; the deterministic mode is bitwise repeatable.
ok $NSA backward $IN --do w/do.npy --device cuda --out gpu16
contains gpu16/config.json '"backward": {'
contains gpu16/config.json '"variant": "mma"'
for f in cpu/*.npy; do [ -f "gpu16/$(basename "$f")" ] || fail "gpu16 lacks $(basename "$f")"; done
ok $NSA backward $IN --do w/do.npy --device cuda --deterministic --out det1
ok $NSA backward $IN --do w/do.npy --device cuda --deterministic --out det2
contains det1/config.json '"deterministic": true'
ok $NSA compare det1 det2 --rtol 0 --atol 0
echo "cuda backward through the command line: ok"
