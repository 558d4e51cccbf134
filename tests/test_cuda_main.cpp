// Main of the CUDA tests: without a usable GPU (CI) every test exits with ctest's skip code 77 and
// prints why, so ctest lists them as skipped rather than passed. Listing the test cases (what
// doctest_discover_tests does at build time) works everywhere.
#define DOCTEST_CONFIG_IMPLEMENT
#include <doctest/doctest.h>

#include <cstdio>
#include <cstring>
#include <string>

#include "nsa_cuda.hpp"

int main(int argc, char** argv) {
  bool listing = false;
  for (int i = 1; i < argc; ++i) listing = listing || std::strncmp(argv[i], "--list", 6) == 0 || std::strncmp(argv[i], "-l", 2) == 0;
  std::string why;
  if (!listing && !nsa::cuda::available(&why)) {
    std::printf("SKIPPED: the CUDA tests need a GPU: %s\n", why.c_str());
    return 77;
  }
  if (!listing) std::printf("CUDA device: %s\n", nsa::cuda::device_name().c_str());
  doctest::Context ctx(argc, argv);
  return ctx.run();
}
