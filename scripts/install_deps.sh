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
echo "install_deps: ok"
