// Selected-block recall: how well NSA's selection (Eq. 8-11) finds the blocks that carry the
// exact full-attention mass, scored beside other selectors on the same data (docs/analysis.md).
//
// Definitions, for sequence-local query position t and KV group g (G heads h of the group):
//   p[t,h,u]   exact causal softmax of full attention over u <= t, with the selection branch's
//              keys (in.key(Branch::Slc)) and the configured scale;
//   A[t,g,j]   block mass (1/G) sum_h sum_{u in block j, u <= t} p[t,h,u]: the group's average
//              head's mass in selection block j = [j*l', (j+1)*l'); sum_j A = 1;
//   O(t,g)     the oracle: the top-n valid blocks by A, no forced blocks, exact ties to the lower
//              index (the paper's Exact-Top); all valid blocks when at most n are valid;
//   S(t,g)     a selector's blocks;
//   recall     |S ∩ O| / |O|;
//   mass       sum_{j in S} A[t,g,j];
//   mass_with_window  the mass of the tokens u <= t in S's blocks or in the window
//              [max(0, t-w+1), t], each token counted once.
// Positions with at most n valid blocks ("trivial": every selector selects everything and every
// metric is 1) are kept in the per-position maps but left out of the aggregates unless
// RecallOptions::include_trivial.
//
// Exact attention is streamed: per tile (KV group, 64 positions) scores against chunks of whole
// selection blocks, exponentials against each chunk's own row maximum, block sums kept with that
// maximum and rescaled once at the end. Memory is O(tile rows x blocks), never T x T per head.
// OpenMP over tiles; each output is written by one tile, so results do not depend on the thread
// count (ref::set_threads).
#pragma once

#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "nsa_ref.hpp"

namespace nsa::analysis {

// The selectors scored. All but Oracle use the same n and the same forced blocks as NSA (the
// first init_blocks and the local_blocks ending at t's own block, counted within n), then fill up
// to n by their own score, exact ties to the lower index (ref::select_blocks):
//   Nsa       NSA's own selection (ForwardResult::block_idx: compressed-attention scores, Eq. 8-10);
//   Oracle    the top-n blocks by exact mass A (the reference set; its recall is 1 by definition);
//   Quest     sum over the group's heads of sum_c max(q_c min_c, q_c max_c), min/max per key
//             coordinate over the block's keys u <= t (Tang et al. 2024, an upper bound of q.k);
//   Meanpool  sum over the group's heads of softmax_j(s q . mean_j): NSA's Eq. 8-10 with phi =
//             mean over the block's keys u <= t, l = d = l' (no learned compression);
//   Random    uniformly random blocks among the non-forced valid ones (seeded per position);
//   Window    the most recent blocks: a sliding window of about n*l' tokens plus the initial
//             block(s), the StreamingLLM-style baseline.
enum class Selector { Nsa, Oracle, Quest, Meanpool, Random, Window };
const char* to_string(Selector s);
Selector parse_selector(const std::string& s);  // throws ConfigError naming the choices
std::vector<Selector> all_selectors();           // in the order above

struct RecallOptions {
  std::vector<Selector> selectors = all_selectors();
  int64_t buckets = 8;           // equal-width position buckets over [0, T_max)
  bool include_trivial = false;  // aggregate positions with at most n valid blocks too
  uint64_t seed = 0;             // the Random selector's stream
  bool keep_block_mass = false;  // fill RecallResult::block_mass
  bool keep_selections = false;  // fill RecallMaps::idx
};

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

// Means over the aggregated (position, group) pairs; NaN when there are none.
struct RecallStats {
  int64_t positions = 0;  // (position, group) pairs averaged
  double recall = kNaN;
  double mass = kNaN;
  double mass_with_window = kNaN;
};

// Per-position results of one selector (for heatmaps).
struct RecallMaps {
  Selector selector = Selector::Nsa;
  Tensor<double> recall;            // [N, Hkv]
  Tensor<double> mass;              // [N, Hkv]
  Tensor<double> mass_with_window;  // [N, Hkv]
  Tensor<int32_t> idx;              // [N, Hkv, n] the selected blocks, ascending, -1 padding
                                    //   (only with keep_selections)
};

struct RecallRow {
  Selector selector = Selector::Nsa;
  int64_t bucket = -1;     // -1: all positions
  int64_t t_lo = 0;        // the bucket's positions [t_lo, t_hi)
  int64_t t_hi = 0;
  int64_t group = -1;      // -1: all groups
  RecallStats stats;
};

struct RecallResult {
  std::vector<RecallMaps> maps;  // one per selector, in RecallOptions::selectors' order
  // For each selector: buckets 0..K-1 then all (-1); within each, groups 0..Hkv-1 then all (-1).
  std::vector<RecallRow> rows;
  Tensor<double> block_mass;     // [N, Hkv, NB] A[t, g, j], 0 where invalid (keep_block_mass);
                                 //   NB = max over sequences of ceil(T_b / l')
  Tensor<uint8_t> trivial;       // [N] 1 where at most n blocks are valid
  int64_t bucket_width = 0;      // tokens per position bucket

  const RecallMaps& map(Selector s) const;      // throws Error if s was not scored
  RecallStats overall(Selector s) const;        // the row bucket = group = -1
};

// Scores every selector of `opt` on the workload. `fwd` is NSA's forward result on the same
// inputs (only its block_idx is read, and only for Selector::Nsa). Inputs must have passed
// ref::check_inputs. Throws ConfigError for bad options, InputError if fwd does not fit.
RecallResult recall(const Config& cfg, const ref::Inputs<double>& in, const ref::ForwardResult<double>& fwd,
                    const RecallOptions& opt);

// The bytes recall() holds beyond its inputs and `fwd`, for refusing oversized runs early.
double recall_bytes(const Config& cfg, const std::vector<int64_t>& seqlens, const RecallOptions& opt);

}  // namespace nsa::analysis
