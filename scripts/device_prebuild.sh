#!/usr/bin/env bash
# Optional, on the development machine before a GPU-machine call (x86-64 only): builds `nsa` and
# `test_cuda` for the GPU machine (sm_90a, no -march=native, static CUDA runtime) into .prebuilt/
# (git-ignored), so scripts/device.sh can skip its build and spend the GPU machine's minutes on
# tests and benchmarks. device.sh builds from source when .prebuilt/ is absent or does not run.
set -euo pipefail
cd "$(dirname "$0")/.."
cmake -S . -B build-carry -DCMAKE_BUILD_TYPE=Release -DNSA_CUDA=ON -DNSA_NATIVE=OFF -DNSA_CUDA_ARCHS=90a >/dev/null
cmake --build build-carry -j "$(nproc)" --target nsa test_cuda
rm -rf .prebuilt
mkdir -p .prebuilt
cp build-carry/experiments/nsa build-carry/tests/test_cuda .prebuilt/
echo "commit $(git rev-parse --short HEAD)$(git diff --quiet || echo '+changes'), built $(date -u +%FT%TZ)" >.prebuilt/BUILD_INFO
du -sh .prebuilt
