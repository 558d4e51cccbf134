// The oracle: NSA forward in plain loops, one query and head at a time, in the order of the
// paper's equations (docs/spec.md 1-6). Slow and obvious on purpose; the fast path
// (forward.cpp) must agree with it to round-off.
#include <algorithm>
#include <cmath>

#include "common.hpp"
#include "oracle.hpp"

namespace nsa::ref {

namespace {

// Softmax attention of q over the keys/values whose row pointers are given:
// writes o = sum_u softmax(s q.k_u) v_u and returns lse = ln sum_u exp(s q.k_u) (-inf if none).
// If p is given, the probabilities are written there too.
template <class S>
S attend(const S* q, const std::vector<const S*>& keys, const std::vector<const S*>& vals, int64_t dk,
         int64_t dv, S scale, S* o, S* p = nullptr) {
  std::fill(o, o + dv, S(0));
  if (keys.empty()) return neg_inf<S>();
  std::vector<S> s(keys.size());
  S mx = neg_inf<S>();
  for (size_t u = 0; u < keys.size(); ++u) {
    s[u] = scale * dot(q, keys[u], dk);
    mx = std::max(mx, s[u]);
  }
  S sum = 0;
  for (size_t u = 0; u < keys.size(); ++u) sum += std::exp(s[u] - mx);
  for (size_t u = 0; u < keys.size(); ++u) {
    const S pu = std::exp(s[u] - mx) / sum;
    if (p) p[u] = pu;
    for (int64_t c = 0; c < dv; ++c) o[c] += pu * vals[u][c];
  }
  return mx + std::log(sum);
}

}  // namespace

template <class S>
void oracle_forward_seq(const Config& cfg, const Inputs<S>& in, int64_t t0, int64_t T, int64_t cmp0,
                        ForwardResult<S>& r) {
  const int64_t Hq = cfg.Hq, Hkv = cfg.Hkv, G = cfg.G(), dk = cfg.dk, dv = cfg.dv, n = cfg.slc_count;
  const int64_t l = cfg.cmp_len, d = cfg.cmp_stride, ls = cfg.slc_len;
  const S scale = static_cast<S>(cfg.softmax_scale());
  const int64_t Nc = cfg.num_cmp_blocks(T), NB = cfg.num_slc_blocks(T);
  const Tensor<S>& q = in.q;
  auto krow = [&](Branch b, int64_t t, int64_t h) { return in.key(b).row(t0 + t, h); };
  auto vrow = [&](Branch b, int64_t t, int64_t h) { return in.value(b).row(t0 + t, h); };

  // Eq. 7: compressed keys and values.
  const Tensor<S> kc = compress(cfg, in.key(Branch::Cmp).row(t0, 0), T, dk, in.phi.k, cfg.hidden_k(), Path::Oracle);
  const Tensor<S> vc = compress(cfg, in.value(Branch::Cmp).row(t0, 0), T, dv, in.phi.v, cfg.hidden_v(), Path::Oracle);
  std::copy(kc.vec().begin(), kc.vec().end(), r.k_cmp_compressed.row(cmp0, 0));
  std::copy(vc.vec().begin(), vc.vec().end(), r.v_cmp_compressed.row(cmp0, 0));

  std::vector<const S*> ks, vs;
  std::vector<S> p_cmp(static_cast<size_t>(Nc));
  std::vector<std::vector<S>> p_slc(static_cast<size_t>(G), std::vector<S>(static_cast<size_t>(NB)));
  for (int64_t t = 0; t < T; ++t) {
    const int64_t row = t0 + t;
    for (int64_t g = 0; g < Hkv; ++g) {
      // Compression branch and Eq. 8-9 for each head of the group.
      const int64_t nv = cfg.cmp_visible(t);
      for (int64_t hi = 0; hi < G; ++hi) {
        const int64_t h = g * G + hi;
        ks.clear();
        vs.clear();
        for (int64_t i = 0; i < nv; ++i) {
          ks.push_back(kc.row(i, g));
          vs.push_back(vc.row(i, g));
        }
        r.lse[0](row, h) = attend(q.row(row, h), ks, vs, dk, dv, scale, r.o_branch[0].row(row, h), p_cmp.data());
        // Eq. 9: p_slc[j] = sum_i p_cmp[i] |[i d, i d + l) ∩ [j l', (j+1) l')| / d.
        for (int64_t j = 0; j < NB; ++j) {
          S s = 0;
          for (int64_t i = 0; i < nv; ++i) {
            const int64_t ov = std::min(i * d + l, (j + 1) * ls) - std::max(i * d, j * ls);
            if (ov > 0) s += p_cmp[i] * static_cast<S>(double(ov) / double(d));
          }
          p_slc[hi][j] = s;
        }
      }
      // Eq. 10: the group's score, summed over its heads; 0 for invalid blocks.
      const int64_t valid = cfg.slc_valid(t);
      S* P = &r.block_scores(row, g, 0);
      for (int64_t j = 0; j < valid; ++j) {
        S s = 0;
        for (int64_t hi = 0; hi < G; ++hi) s += p_slc[hi][j];
        P[j] = s;
      }
      // Eq. 11: the selected blocks, shared by the group.
      const std::vector<int32_t> sel = select_blocks(cfg, t, P);
      for (int64_t m = 0; m < n; ++m)
        r.block_idx(row, g, m) = m < int64_t(sel.size()) ? sel[static_cast<size_t>(m)] : -1;
      // Selection branch: tokens u <= t of the selected blocks.
      ks.clear();
      vs.clear();
      for (int32_t j : sel)
        for (int64_t u = j * ls; u < std::min((j + 1) * ls, t + 1); ++u) {
          ks.push_back(krow(Branch::Slc, u, g));
          vs.push_back(vrow(Branch::Slc, u, g));
        }
      for (int64_t hi = 0; hi < G; ++hi) {
        const int64_t h = g * G + hi;
        r.lse[1](row, h) = attend(q.row(row, h), ks, vs, dk, dv, scale, r.o_branch[1].row(row, h));
      }
      // Sliding window: keys [max(0, t - w + 1), t].
      ks.clear();
      vs.clear();
      for (int64_t u = cfg.win_start(t); u <= t; ++u) {
        ks.push_back(krow(Branch::Win, u, g));
        vs.push_back(vrow(Branch::Win, u, g));
      }
      for (int64_t hi = 0; hi < G; ++hi) {
        const int64_t h = g * G + hi;
        r.lse[2](row, h) = attend(q.row(row, h), ks, vs, dk, dv, scale, r.o_branch[2].row(row, h));
      }
    }
    // Eq. 5: the gated sum.
    for (int64_t h = 0; h < Hq; ++h)
      for (int64_t c = 0; c < dv; ++c) {
        S s = 0;
        for (int b = 0; b < kBranches; ++b) s += r.gates(row, h, b) * r.o_branch[b](row, h, c);
        r.o(row, h, c) = s;
      }
  }
}

template <class S>
void oracle_full_seq(const Config& cfg, const Tensor<S>& q, const Tensor<S>& k, const Tensor<S>& v, int64_t t0,
                     int64_t T, FullResult<S>& r) {
  const int64_t G = cfg.G();
  const S scale = static_cast<S>(cfg.softmax_scale());
  std::vector<const S*> ks, vs;
  for (int64_t t = 0; t < T; ++t)
    for (int64_t h = 0; h < cfg.Hq; ++h) {
      ks.clear();
      vs.clear();
      for (int64_t u = 0; u <= t; ++u) {
        ks.push_back(k.row(t0 + u, h / G));
        vs.push_back(v.row(t0 + u, h / G));
      }
      r.lse(t0 + t, h) = attend(q.row(t0 + t, h), ks, vs, cfg.dk, cfg.dv, scale, r.o.row(t0 + t, h));
    }
}

template void oracle_forward_seq<double>(const Config&, const Inputs<double>&, int64_t, int64_t, int64_t,
                                         ForwardResult<double>&);
template void oracle_forward_seq<float>(const Config&, const Inputs<float>&, int64_t, int64_t, int64_t,
                                        ForwardResult<float>&);
template void oracle_full_seq<double>(const Config&, const Tensor<double>&, const Tensor<double>&,
                                      const Tensor<double>&, int64_t, int64_t, FullResult<double>&);
template void oracle_full_seq<float>(const Config&, const Tensor<float>&, const Tensor<float>&, const Tensor<float>&,
                                     int64_t, int64_t, FullResult<float>&);

}  // namespace nsa::ref
