// Synthetic workloads for `nsa gen`, the sweeps and the benchmarks.
#pragma once

#include <string>
#include <utility>
#include <vector>

#include "tensor.hpp"

namespace nsa::cli {

struct GenSpec {
  std::string workload = "random";  // random
  int64_t T = 1024;                 // tokens per sequence
  int64_t B = 0;                    // 0: one sequence [T, H, D]; B >= 1: a batch [B, T, H, D]
  int64_t Hq = 16, Hkv = 1, dk = 64, dv = 64;
  uint64_t seed = 0;
  bool separate_kv = false;         // independent k/v per branch (k_cmp, v_cmp, ...)
  std::string gates = "none";       // none (all ones) or random (uniform in [0, 1])
};

// Throws ConfigError naming the first bad field of the spec and what was expected.
void validate(const GenSpec& spec);

// The workload's tensors, named as the `nsa` options' files (q, k, v, k_cmp, ..., gates).
// random: every entry N(0, 1), from one seeded stream in the order q, k, v, per-branch k/v, gates.
std::vector<std::pair<std::string, Tensor<double>>> generate(const GenSpec& spec);

}  // namespace nsa::cli
