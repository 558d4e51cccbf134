#!/usr/bin/env bash
# Every test, from a fresh clone: installs what is missing, builds (with the CUDA path if nvcc is
# found; GPU tests then skip visibly without a GPU), and runs the whole ctest suite.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install_deps.sh
jobs=$(nproc)
cmake --preset default >/dev/null
cmake --build --preset default -j "$jobs"
ctest --preset default -j "$jobs"
