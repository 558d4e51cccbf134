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
