// Selection checks shared by the CUDA tests (forward and decode): the device's block lists
// compared with the reference's up to recorded near-ties, and with the tie rule applied to the
// device's own scores. (The double twin of the selection attention fed the device's lists, which
// keeps a near-tie difference from hiding or excusing an error in the attention, is in
// cuda_twins.hpp.)
#pragma once

#include <algorithm>
#include <cmath>
#include <limits>
#include <set>
#include <vector>

#include "cuda_twins.hpp"
#include "nsa_ref.hpp"

namespace nsa::test {

struct SelectCheck {
  int64_t rows = 0, differ = 0, near_ties = 0, bad = 0, self_bad = 0;
};

// Row `row` of the lists belongs to a query at position pos[row]. The device's list must equal
// ref::select_blocks of the device's own scores (self_bad counts those that do not); where it
// differs from the reference's, every differing block's reference score must lie within
// tie * |n-th score| of the reference's n-th (lowest non-forced) score (near_ties), else bad.
inline SelectCheck check_lists(const Config& c, const std::vector<int64_t>& pos, const Tensor<int32_t>& got_idx,
                               const Tensor<float>& got_scores, const Tensor<int32_t>& want_idx,
                               const Tensor<double>& want_scores, double tie) {
  SelectCheck s;
  const int64_t N = got_idx.dim(0), n = c.slc_count;
  for (int64_t row = 0; row < N; ++row) {
    const int64_t t = pos[size_t(row)];
    for (int64_t g = 0; g < c.Hkv; ++g) {
      ++s.rows;
      std::vector<int32_t> got(got_idx.row(row, g), got_idx.row(row, g) + n);
      // The tie rule, exactly: the device's list is select_blocks of the device's own scores.
      std::vector<int32_t> self = ref::select_blocks<float>(c, t, got_scores.row(row, g));
      self.resize(size_t(n), -1);
      s.self_bad += self != got;
      std::vector<int32_t> want(want_idx.row(row, g), want_idx.row(row, g) + n);
      if (want == got) continue;
      ++s.differ;
      // The reference's n-th score: the lowest score among its non-forced picks.
      const int64_t own = t / c.slc_len;
      auto forced = [&](int64_t j) { return j < c.init_blocks || (j > own - c.local_blocks && j <= own); };
      const double* P = want_scores.row(row, g);
      double nth = std::numeric_limits<double>::infinity();
      for (int32_t j : want)
        if (j >= 0 && !forced(j)) nth = std::min(nth, P[j]);
      std::set<int32_t> a(want.begin(), want.end()), bset(got.begin(), got.end());
      bool near = std::isfinite(nth);
      for (int32_t j : got)
        if (!a.count(j)) near = near && j >= 0 && j <= t / c.slc_len && std::abs(P[j] - nth) <= tie * std::abs(nth);
      for (int32_t j : want)
        if (!bset.count(j)) near = near && std::abs(P[j] - nth) <= tie * std::abs(nth);
      near ? ++s.near_ties : ++s.bad;
    }
  }
  return s;
}

// check_lists over every position of packed sequences (cu: [B+1] offsets).
inline SelectCheck check_selection(const Config& c, const std::vector<int64_t>& cu, const ref::ForwardResult<float>& gpu,
                                   const ref::ForwardResult<double>& r, double tie) {
  std::vector<int64_t> pos(size_t(gpu.block_idx.dim(0)));
  for (int64_t row = 0; row < int64_t(pos.size()); ++row) pos[size_t(row)] = row - cu[size_t(seq_of(cu, row))];
  return check_lists(c, pos, gpu.block_idx, gpu.block_scores, r.block_idx, r.block_scores, tie);
}

}  // namespace nsa::test
