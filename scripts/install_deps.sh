#!/usr/bin/env bash
# Installs what the project needs on a fresh Debian/Ubuntu machine: the compilers and libraries
# from Debian's packages, and the notebooks' Python packages (pinned) into .venv/. Idempotent:
# packages already present are not fetched again. The CUDA toolkit is optional (see README).
set -euo pipefail
cd "$(dirname "$0")/.."
pkgs=(cmake g++ make libeigen3-dev libboost-program-options-dev nlohmann-json3-dev doctest-dev clang libclang-rt-dev
      python3 python3-venv)
missing=()
for p in "${pkgs[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  echo "install_deps: installing ${missing[*]}"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi
if [ -f notebooks/requirements.txt ]; then
  if [ ! -x .venv/bin/python ] || ! cmp -s notebooks/requirements.txt .venv/.requirements.txt; then
    echo "install_deps: Python packages for the notebooks -> .venv/"
    python3 -m venv .venv
    .venv/bin/python -m pip install -q --upgrade pip
    .venv/bin/python -m pip install -q -r notebooks/requirements.txt
    cp notebooks/requirements.txt .venv/.requirements.txt
  fi
fi
# CUTLASS / CuTe headers for the Hopper kernels (cuda/*_sm90.cu), only where the CUDA path can be
# built: PyPI's nvidia-cutlass wheel (pinned; pure headers and Python, any platform), its
# cutlass_library/source/include unpacked into .deps/cutlass/include (git-ignored), which CMake's
# NSA_CUTLASS_DIR points at by default.
CUTLASS_VERSION=4.2.0.0
if command -v nvcc >/dev/null 2>&1 || [ -x /usr/local/cuda/bin/nvcc ] || [ -n "${CUDACXX:-}" ]; then
  if [ "$(cat .deps/cutlass/VERSION 2>/dev/null)" != "$CUTLASS_VERSION" ] || [ ! -f .deps/cutlass/include/cute/tensor.hpp ]; then
    echo "install_deps: CUTLASS $CUTLASS_VERSION headers -> .deps/cutlass/"
    tmp=$(mktemp -d)
    # pip from the project's venv (made above; Debian's python3 may have no pip module).
    pip_py=python3
    [ -x .venv/bin/python ] && pip_py=.venv/bin/python
    "$pip_py" -m pip download -q --no-deps --only-binary=:all: "nvidia-cutlass==$CUTLASS_VERSION" -d "$tmp"
    rm -rf .deps/cutlass
    python3 - "$tmp" .deps/cutlass <<'PY'
import glob, os, sys, zipfile
whl = glob.glob(os.path.join(sys.argv[1], "nvidia_cutlass-*.whl"))[0]
prefix = "cutlass_library/source/include/"
with zipfile.ZipFile(whl) as z:
    for name in z.namelist():
        if name.startswith(prefix) and not name.endswith("/"):
            out = os.path.join(sys.argv[2], "include", name[len(prefix):])
            os.makedirs(os.path.dirname(out), exist_ok=True)
            with z.open(name) as src, open(out, "wb") as dst:
                dst.write(src.read())
PY
    echo "$CUTLASS_VERSION" > .deps/cutlass/VERSION
    rm -rf "$tmp"
  fi
fi
# The Python package's build and test dependencies (nanobind, scikit-build-core, NumPy, pytest,
# PyTorch), pinned, into a virtual environment outside the clone (scripts/python_env.sh).
# NSA_NO_PYTHON=1 skips it (the Python tests then do not run).
if [ "${NSA_NO_PYTHON:-0}" != 1 ]; then
  . scripts/python_env.sh
  pyenv=$(nsa_pyenv)
  if [ ! -x "$pyenv/bin/python" ] || ! cmp -s python/requirements.txt "$pyenv/.requirements.txt"; then
    echo "install_deps: Python packages of the nsa package (PyTorch included, ~5 GB) -> $pyenv"
    t_py=$SECONDS
    rm -rf "$pyenv"
    python3 -m venv "$pyenv"
    "$pyenv/bin/python" -m pip install -q -r python/requirements.txt
    cp python/requirements.txt "$pyenv/.requirements.txt"
    echo "install_deps: Python environment in $(( SECONDS - t_py )) s"
  fi
fi
echo "install_deps: ok"
