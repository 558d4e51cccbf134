// Synthetic workloads for `nsa gen`, the sweeps, the training experiment and the benchmarks
// (docs/experiments.md, "Workloads"). Every workload is a pure function of its GenSpec: the same
// spec gives the same tensors on every machine (core/rng.hpp).
//
//   random     every entry of q, k, v ~ N(0, 1).
//   needle     needle in a haystack (the paper's retrieval test, Fig. 5): a random haystack, one
//              needle per sequence (one sequence per depth), and question queries at the end of
//              the sequence that look for it. With u a random direction of norm sqrt(dk) per
//              (sequence, KV head) and s = 1/sqrt(dk):
//                question q[t, h]       = u_g              (g the group of head h)
//                needle key  k[p+i, g]  = haystack + strength * u_g / sqrt(dk),   i < needle_len
//                needle value v[p+i, g] = w_g, a random vector of norm sqrt(dv) (the "answer")
//              so a question's logit s q.k is N(0, 1) on the haystack and N(strength, 1) on the
//              needle: `strength` is the needle's margin in standard deviations of the haystack
//              logits. The questions are the last `questions` tokens; the needle starts at
//              p = round(depth * (T - questions - needle_len)), so depth 0 is the first token
//              and depth 1 ends right before the questions.
//   clustered  keys k[t] = a * z[t] + e[t] with e ~ N(0, I) and z a latent AR(1) process along
//              the sequence, z[t] = rho z[t-1] + sqrt(1 - rho^2) n[t], rho = exp(-1/corr_len)
//              (z ~ N(0, I) at every t; corr(z[t], z[t+k]) = exp(-k/corr_len)), one per KV head.
//              A query's logits along t are then a smooth field of std a plus unit noise, so its
//              attention mass falls in contiguous runs about corr_len long: the blockwise
//              clustering real attention maps show. a = cluster_strength; q, v ~ N(0, 1).
#pragma once

#include <string>
#include <utility>
#include <vector>

#include "tensor.hpp"

namespace nsa::cli {

struct GenSpec {
  std::string workload = "random";  // random, needle, clustered
  int64_t T = 1024;                 // tokens per sequence
  int64_t B = 0;                    // 0: one sequence [T, H, D]; B >= 1: a batch [B, T, H, D]
  int64_t Hq = 16, Hkv = 1, dk = 64, dv = 64;
  uint64_t seed = 0;
  bool separate_kv = false;         // independent k/v per branch (k_cmp, v_cmp, ...)
  std::string gates = "none";       // none (all ones), random (uniform in [0, 1]), or the gate MLP's
                                    // inputs: mlp (with a hidden layer) or linear (without)
  bool grad = false;                // also dL/do for `nsa backward` (do.npy, [T, Hq, dv])

  // needle: one sequence per depth (a batch when there are several).
  std::vector<double> depths = {0.5};  // in [0, 1]
  int64_t needle_len = 16;             // tokens the needle spans
  double needle_strength = 8;          // the needle's logit margin, in haystack-logit std
  int64_t questions = 16;              // question positions: the last `questions` tokens

  // clustered
  double corr_len = 64;          // correlation length of the latent process, tokens (0: none)
  double cluster_strength = 2;   // a: std of the latent part of the keys (the noise has std 1)

  // Sequences generated: depths.size() for needle, else max(B, 1).
  int64_t sequences() const;
};

// Throws ConfigError naming the first bad field.
void validate(const GenSpec& spec);

// Where a needle workload put things, per sequence (needle_layout() computes it from the spec).
struct NeedleLayout {
  std::vector<int64_t> start;  // [S] first token of the needle
  int64_t len = 0;             // tokens the needle spans
  int64_t first_question = 0;  // questions are the tokens [first_question, T)
};
NeedleLayout needle_layout(const GenSpec& spec);

// "Needle found" by one (query, group): every needle token [start, start + len) lies in one of the
// n selected blocks idx[0..n) of length slc_len (forced blocks count: they are selected; -1 pads).
bool needle_found(const int32_t* idx, int64_t n, int64_t start, int64_t len, int64_t slc_len);

// The workload's tensors, by name. Inputs are named as the `nsa` options' files (q, k, v, k_cmp,
// ..., gates, gate_x, ..., do); needle also plants needle_value [S, Hkv, dv] (the answer w of each
// sequence and group). Tensors are [T, H, D] for one sequence and [S, T, H, D] for a batch. One
// seeded stream, in the order q, k, v, per-branch k/v, gates, the gate MLP, do, then what the
// workload plants. The gate MLP (d_model = 16, d_hidden = 8): x ~ N(0, 1), weights N(0, 1/fan-in),
// biases N(0, 0.1^2).
struct Generated {
  std::vector<std::pair<std::string, Tensor<double>>> tensors;
  const Tensor<double>& at(const std::string& name) const;  // throws Error if absent
  bool has(const std::string& name) const;
  auto begin() const { return tensors.begin(); }
  auto end() const { return tensors.end(); }
  size_t size() const { return tensors.size(); }
};
Generated generate(const GenSpec& spec);

}  // namespace nsa::cli
