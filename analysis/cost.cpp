#include "cost.hpp"

#include <algorithm>
#include <utility>

namespace nsa::analysis {

int64_t slc_tokens(const Config& c, int64_t t) {
  const int64_t valid = c.slc_valid(t);
  if (valid <= c.slc_count) return t + 1;
  if (c.local_blocks == 0) return c.slc_count * c.slc_len;
  return (c.slc_count - 1) * c.slc_len + t % c.slc_len + 1;
}

double phi_flops_per_block(const Config& c) {
  const double l = double(c.cmp_len);
  double flops = 0;
  for (const auto& [D, h] : {std::pair{double(c.dk), double(c.hidden_k())}, {double(c.dv), double(c.hidden_v())}}) {
    switch (c.compress) {
      case CompressKind::Mean: flops += l * D; break;
      case CompressKind::Linear: flops += 2 * l * D * D; break;
      case CompressKind::Mlp: flops += 2 * l * D * h + 2 * h * D; break;
    }
  }
  return flops;
}

ForwardFlops nsa_forward_flops(const Config& c, int64_t T) {
  ForwardFlops f;
  const double per_key = 2.0 * double(c.dk + c.dv) * double(c.Hq);
  double cmp_keys = 0, slc_keys = 0, win_keys = 0;
  for (int64_t t = 0; t < T; ++t) {
    cmp_keys += double(c.cmp_visible(t));
    slc_keys += double(slc_tokens(c, t));
    win_keys += double(std::min(c.window, t + 1));
  }
  f.cmp = per_key * cmp_keys;
  f.slc = per_key * slc_keys;
  f.win = per_key * win_keys;
  f.phi = phi_flops_per_block(c) * double(c.num_cmp_blocks(T)) * double(c.Hkv);
  return f;
}

double full_forward_flops(const Config& c, int64_t T) {
  return 2.0 * double(c.dk + c.dv) * double(c.Hq) * double(T) * double(T + 1) / 2;
}

ForwardFlops nsa_backward_flops(const Config& c, int64_t T) {
  const ForwardFlops f = nsa_forward_flops(c, T);
  const double per_key = double(3 * c.dk + 2 * c.dv) / double(c.dk + c.dv);  // (6dk + 4dv) / (2dk + 2dv)
  ForwardFlops b;
  b.cmp = f.cmp * per_key;
  b.slc = f.slc * per_key;
  b.win = f.win * per_key;
  b.phi = c.compress == CompressKind::Mean ? f.phi : 2 * f.phi;
  return b;
}

double full_backward_flops(const Config& c, int64_t T) {
  return full_forward_flops(c, T) * double(3 * c.dk + 2 * c.dv) / double(c.dk + c.dv);
}

}  // namespace nsa::analysis
