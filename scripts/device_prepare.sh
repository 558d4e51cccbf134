#!/usr/bin/env bash
# Run on the development machine before a GPU-machine call: gathers into .carry/ (git-ignored,
# passed with the device tool's `carry`) what the GPU machine lacks: the Boost.Program_options
# static library and the exact Boost headers it was built with (its own Boost headers are another
# version), and nlohmann/json's headers. CMake finds them through -DNSA_EXTRA_PREFIX=.carry.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .carry
mkdir -p .carry/include .carry/lib
echo '#include <boost/program_options.hpp>' | g++ -std=c++17 -x c++ -M - | tr ' \\' '\n\n' |
  grep '^/usr/include/boost/' | sort -u | while read -r f; do
    rel=${f#/usr/include/}
    mkdir -p ".carry/include/$(dirname "$rel")"
    cp "$f" ".carry/include/$rel"
  done
cp /usr/lib/x86_64-linux-gnu/libboost_program_options.a .carry/lib/
cp -r /usr/include/nlohmann .carry/include/
du -sh .carry
