// Double twins of CUDA stages for the CUDA tests: computations the reference does not expose on
// their own, in plain loops.
#pragma once

#include <algorithm>
#include <cmath>
#include <limits>
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

}  // namespace nsa::test
