#!/usr/bin/env bash
# Every test, from a fresh clone: installs what is missing, then
#   1. builds (with the CUDA path if nvcc is found; GPU tests then skip visibly) and runs ctest,
#      the Python package's tests (tests/python, pytest) among them: the extension is built in the
#      same build folder from the same libraries, against the environment of scripts/python_env.sh;
#   2. builds the CPU code with AddressSanitizer + UndefinedBehaviorSanitizer (preset asan,
#      build-asan/) and runs the same CPU tests there, the command-line tests included;
#   3. fuzzes the .npy reader for FUZZ_SECONDS (default 60) seconds (scripts/fuzz.sh).
# `scripts/test.sh --quick` runs step 1 only. Each step prints its wall time.
set -euo pipefail
cd "$(dirname "$0")/.."
quick=0
[ "${1:-}" = "--quick" ] && quick=1
./scripts/install_deps.sh
jobs=$(nproc)
step() { echo "== test.sh: $1 ($(( SECONDS - t0 )) s)"; }

t0=$SECONDS
python_args=()
if [ "${NSA_NO_PYTHON:-0}" != 1 ]; then
  . scripts/python_env.sh
  python_args=(-DNSA_PYTHON=ON "-DPython_EXECUTABLE=$(nsa_pyenv)/bin/python")
fi
cmake --preset default "${python_args[@]}" >/dev/null
cmake --build --preset default -j "$jobs"
ctest --preset default -j "$jobs"
step "build and tests"
[ "$quick" -eq 1 ] && exit 0

t0=$SECONDS
cmake --preset asan >/dev/null
cmake --build --preset asan -j "$jobs"
ctest --preset asan -j "$jobs"
step "ASan + UBSan build and tests"

t0=$SECONDS
./scripts/fuzz.sh "${FUZZ_SECONDS:-60}"
step "fuzzing"
