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
  std::string gates = "none";       // none (all ones), random (uniform in [0, 1]), or the gate MLP's
                                    // inputs: mlp (with a hidden layer) or linear (without)
  bool grad = false;                // also dL/do for `nsa backward` (do.npy, [T, Hq, dv])
};

// The workload's tensors, named as the `nsa` options' files (q, k, v, k_cmp, ..., gates, gate_x,
// ..., do). random: every entry N(0, 1), from one seeded stream in the order q, k, v, per-branch
// k/v, gates, do. The gate MLP (d_model = 16, d_hidden = 8): x ~ N(0, 1), weights N(0, 1/fan-in),
// biases N(0, 0.1^2).
std::vector<std::pair<std::string, Tensor<double>>> generate(const GenSpec& spec);

}  // namespace nsa::cli
