// Attention locality: how blockwise the exact full-attention mass is (the paper's Section 3.3.2
// motivation for block selection, its Figure 8), measured on a workload (docs/analysis.md).
//
// For sampled query positions t and every query head h, p[t,h,u] is the exact causal softmax of
// full attention (keys in.k, the configured scale) over u <= t; s[t,h,u] = scale * q.k_u are its
// logits. Three measurements, each averaged over the sampled (position, head) rows:
//   top-k blocks against top-k*B tokens: for block size B (blocks [i*B, (i+1)*B) ∩ [0, t]),
//     block_mass = the mass of the k heaviest blocks, token_mass = the mass of the k*B heaviest
//     single tokens (the most any k*B tokens can hold), ratio = block_mass / token_mass <= 1
//     (1: attention is perfectly blockwise at granularity B). Rows with t+1 <= k*B, where both
//     are 1 trivially, are left out;
//   autocorrelation of the logits against key distance (lag) L: sum_u (s_u - mu)(s_{u+L} - mu) /
//     ((t+1-L) var), mu and var over the row's t+1 logits; rows with fewer than 8 pairs or
//     constant logits are left out;
//   mass against distance t - u, in bins [0,1), [1,2), [2,4), [4,8), ...: the row's mass in the
//     bin, averaged over all rows (bins beyond a row's reach count 0, so the bins sum to 1).
#pragma once

#include <cstdint>
#include <vector>

#include "nsa_ref.hpp"

namespace nsa::analysis {

struct LocalityOptions {
  std::vector<int64_t> block_sizes = {8, 16, 32, 64, 128};
  std::vector<int64_t> ks = {1, 2, 4, 8, 16};
  std::vector<int64_t> lags = {1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024};
  // Query positions per sequence, evenly spaced and ending at T-1: t_i = floor((i+1) T / q) - 1.
  // 0 (or q >= T): every position.
  int64_t queries = 256;
};

struct TopkRow {
  int64_t block_size = 0, k = 0, tokens = 0;  // B, k, k*B
  int64_t rows = 0;                           // (position, head) rows averaged
  double block_mass = 0, token_mass = 0, ratio = 0;
};

struct LagRow {
  int64_t lag = 0;
  int64_t rows = 0;
  double autocorr = 0;
};

struct DistanceRow {
  int64_t lo = 0, hi = 0;     // distances t - u in [lo, hi)
  double mass = 0;            // mean over rows of the mass in the bin
  double mass_per_token = 0;  // mass / (hi - lo)
};

struct LocalityResult {
  int64_t rows = 0;                  // (position, head) rows sampled
  std::vector<int64_t> positions;    // the sampled positions of the longest sequence
  std::vector<TopkRow> topk;         // block_sizes x ks, in the options' order
  std::vector<LagRow> autocorr;      // one per lag shorter than the longest sequence
  std::vector<DistanceRow> distance; // bins up to the longest sequence
};

// Inputs must have passed ref::check_inputs. Throws ConfigError for bad options. Memory per
// thread: one [G, T] score matrix; OpenMP over (sequence, position, group); deterministic.
LocalityResult locality(const Config& cfg, const ref::Inputs<double>& in, const LocalityOptions& opt);

}  // namespace nsa::analysis
