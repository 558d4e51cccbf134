#!/usr/bin/env bash
# Builds the GPU machine's binaries HERE and packs them into .devbin/ (git-ignored; pass it with the
# device tool's `carry`), so that a device call spends its minutes on tests and timings, not on a
# 16-core build: `nsa`, `test_cuda`, `nsa_slc_replay` (sm_90a, the paper's head dims, no
# -march=native: the GPU machine's CPU is another), gzipped, plus the CUTLASS headers (.deps/cutlass,
# for the Python extension built there by scripts/device_python.sh). On the GPU machine,
# `PREBUILT=1 bash scripts/device.sh` unpacks them into .bin/ and skips its build.
# BASE=<commit> also builds `nsa` at that commit (a git worktree under .devbase/) as nsa-base, which
# device.sh's bench step times beside the new one in the same call (before/after comparisons).
# usage: scripts/device_pack.sh [BASE=<commit>]
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
jobs=${JOBS:-$(nproc)}
BUILD=${DEV_BUILD:-build-dev}
flags=(-DCMAKE_BUILD_TYPE=Release -DNSA_CUDA=ON -DNSA_CUDA_ARCHS=90a -DNSA_CUDA_DIMS=paper -DNSA_NATIVE=OFF)
cmake -S . -B "$BUILD" "${flags[@]}" >/dev/null
cmake --build "$BUILD" -j "$jobs" --target nsa test_cuda nsa_slc_replay
mkdir -p .devbin
for f in "$BUILD/experiments/nsa" "$BUILD/tests/test_cuda" "$BUILD/experiments/nsa_slc_replay"; do
  strip -o "/tmp/devpack.$$" "$f"
  gzip -6 -c "/tmp/devpack.$$" >".devbin/$(basename "$f").gz"
done
rm -f "/tmp/devpack.$$"
[ -d .deps/cutlass ] && tar -czf .devbin/cutlass.tar.gz .deps/cutlass
if [ -n "${BASE:-}" ]; then
  rm -rf .devbase && git worktree prune
  git worktree add -q --detach .devbase "$BASE"
  (cd .devbase && cmake -S . -B build-dev "${flags[@]}" -DBUILD_TESTING=OFF >/dev/null &&
    cmake --build build-dev -j "$jobs" --target nsa)
  strip -o "/tmp/devpack.$$" .devbase/build-dev/experiments/nsa
  gzip -6 -c "/tmp/devpack.$$" >.devbin/nsa-base.gz
  rm -f "/tmp/devpack.$$"
  echo "$BASE" >.devbin/BASE
fi
git rev-parse HEAD >.devbin/HEAD
du -sh .devbin
