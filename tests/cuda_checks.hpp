// Checks shared by the CUDA tests (forward and decode): the selection compared with the
// reference's up to recorded near-ties and with the tie rule applied to the device's own scores,
// and a double twin of the selection attention fed the device's block lists, so a near-tie
// difference in the lists can neither hide nor excuse an error in the attention.
#pragma once

#include <algorithm>
#include <cmath>
#include <limits>
#include <set>
#include <vector>

#include "nsa_ref.hpp"

namespace nsa::test {

inline int64_t seq_of(const std::vector<int64_t>& cu, int64_t row) {
  return int64_t(std::upper_bound(cu.begin(), cu.end(), row) - cu.begin()) - 1;
}

// Eq. 12 with given block lists, plain loops in double: the twin of slc_attn fed the device's
// lists. Blocks that are invalid for the query (or garbage) are skipped; the exact list check
// reports them.
inline void slc_twin(const Config& c, const ref::Inputs<double>& in, const Tensor<int32_t>& idx, Tensor<double>& o,
                     Tensor<double>& lse) {
  const auto cu = in.seqlens_or_single();
  const int64_t N = in.N(), G = c.G(), ls = c.slc_len;
  o = Tensor<double>({N, c.Hq, c.dv});
  lse = Tensor<double>({N, c.Hq}, -std::numeric_limits<double>::infinity());
  const Tensor<double>& K = in.key(Branch::Slc);
  const Tensor<double>& V = in.value(Branch::Slc);
  const double scale = c.softmax_scale();
#pragma omp parallel for schedule(dynamic, 8)
  for (int64_t row = 0; row < N; ++row) {
    const int64_t b = seq_of(cu, row), t = row - cu[b];
    std::vector<int64_t> us;
    std::vector<double> sc;
    for (int64_t g = 0; g < c.Hkv; ++g) {
      us.clear();
      for (int64_t m = 0; m < c.slc_count; ++m) {
        const int64_t j = idx(row, g, m);
        if (j < 0 || j * ls > t) continue;
        for (int64_t u = j * ls; u < std::min((j + 1) * ls, t + 1); ++u) us.push_back(cu[b] + u);
      }
      if (us.empty()) continue;
      sc.resize(us.size());
      for (int64_t h = g * G; h < (g + 1) * G; ++h) {
        double mx = -std::numeric_limits<double>::infinity();
        for (size_t a = 0; a < us.size(); ++a) {
          double s = 0;
          for (int64_t x = 0; x < c.dk; ++x) s += in.q(row, h, x) * K(us[a], g, x);
          sc[a] = s * scale;
          mx = std::max(mx, sc[a]);
        }
        double sum = 0;
        for (auto& s : sc) sum += (s = std::exp(s - mx));
        for (int64_t x = 0; x < c.dv; ++x) {
          double acc = 0;
          for (size_t a = 0; a < us.size(); ++a) acc += sc[a] * V(us[a], g, x);
          o(row, h, x) = acc / sum;
        }
        lse(row, h) = mx + std::log(sum);
      }
    }
  }
}

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
