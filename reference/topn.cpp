// Selection (docs/spec.md 4): the mapping of compressed-block probabilities to selection blocks
// (Eq. 9) and the choice of the n blocks (Eq. 11 with the forced initial and local blocks).
#include <algorithm>
#include <cmath>
#include <numeric>

#include "nsa_ref.hpp"

namespace nsa::ref {

// Eq. 9, general form: p_slc[j] = sum_i p_cmp[i] * |[i*d, i*d+l) ∩ [j*l', (j+1)*l')| / d.
// Compressed block i overlaps the selection blocks floor(i*d / l') .. floor((i*d + l - 1) / l').
std::vector<std::vector<OverlapTerm>> overlap_map(const Config& cfg, int64_t Nc) {
  const int64_t l = cfg.cmp_len, d = cfg.cmp_stride, ls = cfg.slc_len;
  std::vector<std::vector<OverlapTerm>> map(static_cast<size_t>(Nc));
  for (int64_t i = 0; i < Nc; ++i) {
    const int64_t a = i * d, b = i * d + l;  // [a, b)
    for (int64_t j = a / ls; j <= (b - 1) / ls; ++j) {
      const int64_t lo = std::max(a, j * ls), hi = std::min(b, (j + 1) * ls);
      if (hi > lo) map[static_cast<size_t>(i)].push_back({j, double(hi - lo) / double(d)});
    }
  }
  return map;
}

template <class S>
std::vector<int32_t> select_blocks(const Config& cfg, int64_t t, const S* P) {
  const int64_t valid = cfg.slc_valid(t), n = cfg.slc_count;
  std::vector<int32_t> sel;
  if (valid <= n) {  // every valid block fits
    sel.resize(static_cast<size_t>(valid));
    std::iota(sel.begin(), sel.end(), 0);
    return sel;
  }
  // Forced: the first init_blocks blocks and the local_blocks blocks ending at t's own block.
  const int64_t own = t / cfg.slc_len;
  std::vector<char> taken(static_cast<size_t>(valid), 0);
  for (int64_t j = 0; j < std::min(cfg.init_blocks, valid); ++j) taken[j] = 1;
  for (int64_t j = std::max<int64_t>(0, own - cfg.local_blocks + 1); j <= own; ++j) taken[j] = 1;
  std::vector<int32_t> rest;
  rest.reserve(static_cast<size_t>(valid));
  for (int64_t j = 0; j < valid; ++j)
    if (taken[j]) sel.push_back(static_cast<int32_t>(j));
    else rest.push_back(static_cast<int32_t>(j));
  // Top-n of the rest: higher score first; exactly equal scores go to the lower index. A NaN
  // score (only with --allow-nonfinite) ranks below every number, so the order stays strict.
  const auto key = [P](int32_t j) { return std::isnan(P[j]) ? -std::numeric_limits<S>::infinity() : P[j]; };
  const size_t want = static_cast<size_t>(n) - sel.size();
  std::partial_sort(rest.begin(), rest.begin() + static_cast<std::ptrdiff_t>(want), rest.end(),
                    [&](int32_t a, int32_t b) {
                      const S ka = key(a), kb = key(b);
                      return ka > kb || (ka == kb && a < b);
                    });
  sel.insert(sel.end(), rest.begin(), rest.begin() + static_cast<std::ptrdiff_t>(want));
  std::sort(sel.begin(), sel.end());
  return sel;
}

template std::vector<int32_t> select_blocks<double>(const Config&, int64_t, const double*);
template std::vector<int32_t> select_blocks<float>(const Config&, int64_t, const float*);

}  // namespace nsa::ref
