#!/usr/bin/env bash
# The GPU machine's run of the Python package (issue 18), in one device call:
#   1. builds the extension nsa._nsa alone, as fast as possible: a direct CMake build of the module
#      (no pip, no network), sm_90a only, the paper's head dims only (NSA_CUDA_DIMS=paper), no
#      tests, no `nsa` command, -j$(nproc); Boost.Program_options and nlohmann/json from .carry/
#      (scripts/device_prepare.sh), the machine's own Python (3.12), PyTorch, NumPy and nanobind;
#   2. the GPU tests (tests/python/test_cuda.py: forward, backward and decode through PyTorch
#      tensors against the reference, the zero-copy operator, CUDA-graph capture, bad inputs) and
#      the CPU PyTorch tests (tests/python/test_torch.py), with pytest;
#   3. the binding's overhead at T = 8k against the kernels' time (python/bench_overhead.py; the
#      target is < 5%).
# Logs and JSON go to $OUT: python_device.log (everything), pytest_cuda.xml, overhead.json and
# summary.txt (each step's PASS/FAIL and time, the build's included).
# usage (on the GPU machine, after scripts/device_prepare.sh here and with .carry carried):
#   OUT=dir bash scripts/device_python.sh
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${OUT:-$ROOT/out/device_python}
mkdir -p "$OUT"
LOG=$OUT/python_device.log
: >"$LOG"
T0=$(date +%s)
SUMMARY=()
say() { echo "== [$(($(date +%s) - T0))s] $*" | tee -a "$LOG"; }
step() {
  local name=$1 limit=$2; shift 2
  local t=$(date +%s)
  say "$name: $*"
  timeout "$limit" "$@" >>"$LOG" 2>&1
  local rc=$?
  SUMMARY+=("$(printf '%-26s %-5s %4ss  rc=%s' "$name" "$([ $rc -eq 0 ] && echo PASS || echo FAIL)" $(($(date +%s) - t)) $rc)")
  return $rc
}
PY=${PYTHON:-python3}
say "machine"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; nvcc --version | tail -1
  $PY -c 'import sys, torch, numpy, nanobind; print("python", sys.version.split()[0], "torch", torch.__version__, "numpy", numpy.__version__, "nanobind", nanobind.__version__)'; } >>"$LOG" 2>&1

BUILD=build-python-gpu
step configure 200 cmake -S . -B "$BUILD" -DCMAKE_BUILD_TYPE=Release -DNSA_PYTHON=ON -DNSA_CUDA=ON \
  -DNSA_CUDA_ARCHS=90a -DNSA_CUDA_DIMS=paper -DNSA_NATIVE=OFF -DBUILD_TESTING=OFF \
  -DNSA_EXTRA_PREFIX="$ROOT/.carry" -DPython_EXECUTABLE="$(command -v "$PY")"
step build 480 cmake --build "$BUILD" -j "$(nproc)" --target _nsa
export PYTHONPATH=$ROOT/$BUILD/python
step import 60 "$PY" -c 'import nsa; print(nsa.__file__, "cuda_built", nsa._nsa.cuda_built, "cuda_available", nsa.cuda_available(), nsa._nsa.cuda_unavailable_reason() if nsa._nsa.cuda_built else "")'
step pytest_cuda 300 "$PY" -m pytest -v -rs -p no:cacheprovider --junitxml="$OUT/pytest_cuda.xml" \
  tests/python/test_cuda.py tests/python/test_torch.py
step overhead_8k 120 "$PY" python/bench_overhead.py --T 8192 --out "$OUT/overhead.json"
say "summary"
printf '%s\n' "${SUMMARY[@]}" | tee -a "$LOG" >"$OUT/summary.txt"
grep -E "passed|failed|skipped|binding overhead" "$LOG" | tail -5 | tee -a "$OUT/summary.txt"
