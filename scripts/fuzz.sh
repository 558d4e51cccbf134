#!/usr/bin/env bash
# Fuzzes the .npy reader: builds its libFuzzer target with clang, AddressSanitizer and
# UndefinedBehaviorSanitizer (build-fuzz/, CMake option NSA_FUZZ=ON) and runs it for SECONDS
# (default 60) from the seed corpus tests/fuzz/corpus. Inputs that reach new code are kept in
# build-fuzz/corpus (not committed); a finding stops the run, leaves its input as
# build-fuzz/crash-* (or leak-*, timeout-*) and fails. To keep it as a regression test, copy it
# into tests/fuzz/corpus: every build replays that folder (ctest fuzz_npy_corpus).
#   scripts/fuzz.sh [SECONDS]
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-60}
cmake -S . -B build-fuzz -DNSA_FUZZ=ON -DCMAKE_CXX_COMPILER=clang++ -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
cmake --build build-fuzz -j "$(nproc)"
mkdir -p build-fuzz/corpus
echo "fuzz: .npy reader for ${secs} s"
build-fuzz/tests/fuzz/fuzz_npy build-fuzz/corpus tests/fuzz/corpus -dict=tests/fuzz/npy.dict \
  -max_total_time="$secs" -max_len=4096 -timeout=10 -rss_limit_mb=2048 -artifact_prefix=build-fuzz/ \
  -print_final_stats=1 2>build-fuzz/fuzz.log || { tail -60 build-fuzz/fuzz.log >&2; echo "fuzz: FINDING (build-fuzz/fuzz.log)" >&2; exit 1; }
grep -E "^stat::number_of_executed_units|^stat::peak_rss_mb|^#[0-9]+ +DONE" build-fuzz/fuzz.log || true
echo "fuzz: no finding in ${secs} s; corpus $(ls build-fuzz/corpus | wc -l) inputs"
