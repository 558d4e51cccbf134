// Attention locality (locality.hpp): exact attention rows at sampled positions, reduced to
// top-k block/token masses, logit autocorrelation and mass by distance.
#include "locality.hpp"

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <numeric>

#include "common.hpp"

namespace nsa::analysis {

using ref::Mat;

namespace {

constexpr int64_t kMinPairs = 8;  // fewest logit pairs for an autocorrelation term
const double nan = std::numeric_limits<double>::quiet_NaN();

// Sampled positions of a sequence of T tokens.
std::vector<int64_t> sample_positions(int64_t T, int64_t q) {
  std::vector<int64_t> pos;
  if (q <= 0 || q >= T) {
    pos.resize(size_t(T));
    std::iota(pos.begin(), pos.end(), 0);
    return pos;
  }
  for (int64_t i = 0; i < q; ++i) pos.push_back((i + 1) * T / q - 1);
  return pos;
}

// Sums of one job (sequence, position, group) over its G rows.
struct Sums {
  std::vector<int64_t> topk_rows;
  std::vector<double> block_mass, token_mass, ratio;  // [block_sizes x ks]
  std::vector<int64_t> lag_rows;
  std::vector<double> lag_ac;                          // [lags]
  std::vector<double> dist;                            // [bins]
  int64_t rows = 0;
  void init(size_t nt, size_t nl, size_t nd) {
    topk_rows.assign(nt, 0);
    block_mass.assign(nt, 0);
    token_mass.assign(nt, 0);
    ratio.assign(nt, 0);
    lag_rows.assign(nl, 0);
    lag_ac.assign(nl, 0);
    dist.assign(nd, 0);
  }
};

void check_positive(const std::vector<int64_t>& v, const char* what) {
  if (v.empty()) throw ConfigError(cat("locality: ", what, ": empty list"));
  for (int64_t x : v)
    if (x < 1) throw ConfigError(cat("locality: ", what, " = ", x, " is invalid: expected >= 1"));
}

}  // namespace

LocalityResult locality(const Config& cfg, const ref::Inputs<double>& in, const LocalityOptions& opt) {
  check_positive(opt.block_sizes, "block sizes");
  check_positive(opt.ks, "k");
  check_positive(opt.lags, "lags");
  if (opt.queries < 0) throw ConfigError(cat("locality: queries = ", opt.queries, " is invalid: expected >= 0"));
  const std::vector<int64_t> cu = in.seqlens_or_single();
  const int64_t G = cfg.G(), Hkv = cfg.Hkv, dk = cfg.dk;
  const double scale = cfg.softmax_scale();

  struct Job {
    int64_t row0, t, g;
  };
  std::vector<Job> jobs;
  int64_t Tmax = 0;
  LocalityResult res;
  for (size_t b = 0; b + 1 < cu.size(); ++b) {
    const int64_t T = cu[b + 1] - cu[b];
    const std::vector<int64_t> pos = sample_positions(T, opt.queries);
    if (T > Tmax) Tmax = T, res.positions = pos;
    for (int64_t t : pos)
      for (int64_t g = 0; g < Hkv; ++g) jobs.push_back({cu[b], t, g});
  }
  std::vector<int64_t> lags;
  for (int64_t L : opt.lags)
    if (L < Tmax) lags.push_back(L);
  int64_t nbins = 1;  // bins [0,1), [1,2), [2,4), ..., the last reaching Tmax - 1
  while ((int64_t(1) << (nbins - 1)) < Tmax) ++nbins;
  const size_t nt = opt.block_sizes.size() * opt.ks.size();

  std::vector<Sums> sums(jobs.size());
#pragma omp parallel for schedule(dynamic, 1)
  for (size_t i = 0; i < jobs.size(); ++i) {
    const Job& jb = jobs[i];
    Sums& sm = sums[i];
    sm.init(nt, lags.size(), size_t(nbins));
    const int64_t n = jb.t + 1;
    const auto K = ref::head_rows(in.k.data(), Hkv, dk, jb.g, jb.row0, n);
    const Eigen::Map<const Mat<double>> Q(in.q.row(jb.row0 + jb.t, jb.g * G), G, dk);
    const Mat<double> S = (Q * K.transpose()) * scale;  // [G, t+1] logits
    std::vector<double> p(static_cast<size_t>(n)), sorted(static_cast<size_t>(n)), blocks;
    for (int64_t hi = 0; hi < G; ++hi) {
      const auto s = S.row(hi);
      const double m = s.maxCoeff();
      double Z = 0;
      for (int64_t u = 0; u < n; ++u) Z += (p[size_t(u)] = std::exp(s[u] - m));
      for (double& x : p) x /= Z;
      ++sm.rows;

      // Top-k*B tokens against top-k blocks of size B.
      sorted = p;
      std::sort(sorted.begin(), sorted.end(), std::greater<double>());
      std::partial_sum(sorted.begin(), sorted.end(), sorted.begin());
      for (size_t bi = 0; bi < opt.block_sizes.size(); ++bi) {
        const int64_t B = opt.block_sizes[bi], nb = (n + B - 1) / B;
        blocks.assign(size_t(nb), 0.0);
        for (int64_t u = 0; u < n; ++u) blocks[size_t(u / B)] += p[size_t(u)];
        std::sort(blocks.begin(), blocks.end(), std::greater<double>());
        std::partial_sum(blocks.begin(), blocks.end(), blocks.begin());
        for (size_t ki = 0; ki < opt.ks.size(); ++ki) {
          const int64_t k = opt.ks[ki];
          if (k * B >= n) continue;  // both are the whole row
          const size_t e = bi * opt.ks.size() + ki;
          const double bm = blocks[size_t(k - 1)], tm = sorted[size_t(k * B - 1)];
          ++sm.topk_rows[e];
          sm.block_mass[e] += bm;
          sm.token_mass[e] += tm;
          sm.ratio[e] += bm / tm;
        }
      }

      // Autocorrelation of the logits against lag.
      double mu = 0, var = 0;
      for (int64_t u = 0; u < n; ++u) mu += s[u];
      mu /= double(n);
      for (int64_t u = 0; u < n; ++u) var += (s[u] - mu) * (s[u] - mu);
      var /= double(n);
      if (var > 0)
        for (size_t li = 0; li < lags.size(); ++li) {
          const int64_t L = lags[li], pairs = n - L;
          if (pairs < kMinPairs) continue;
          double c = 0;
          for (int64_t u = 0; u < pairs; ++u) c += (s[u] - mu) * (s[u + L] - mu);
          ++sm.lag_rows[li];
          sm.lag_ac[li] += c / (double(pairs) * var);
        }

      // Mass against distance t - u: bin 0 is distance 0, bin b >= 1 is [2^(b-1), 2^b).
      for (int64_t u = 0; u < n; ++u) {
        const uint64_t dist = uint64_t(jb.t - u);
        const int bin = dist == 0 ? 0 : 64 - __builtin_clzll(dist);  // floor(log2(dist)) + 1
        sm.dist[size_t(bin)] += p[size_t(u)];
      }
    }
  }

  // Reduce in job order (deterministic), then average.
  Sums tot;
  tot.init(nt, lags.size(), size_t(nbins));
  for (const Sums& sm : sums) {
    tot.rows += sm.rows;
    for (size_t e = 0; e < nt; ++e) {
      tot.topk_rows[e] += sm.topk_rows[e];
      tot.block_mass[e] += sm.block_mass[e];
      tot.token_mass[e] += sm.token_mass[e];
      tot.ratio[e] += sm.ratio[e];
    }
    for (size_t li = 0; li < lags.size(); ++li) {
      tot.lag_rows[li] += sm.lag_rows[li];
      tot.lag_ac[li] += sm.lag_ac[li];
    }
    for (int64_t b = 0; b < nbins; ++b) tot.dist[size_t(b)] += sm.dist[size_t(b)];
  }
  res.rows = tot.rows;
  for (size_t bi = 0; bi < opt.block_sizes.size(); ++bi)
    for (size_t ki = 0; ki < opt.ks.size(); ++ki) {
      const size_t e = bi * opt.ks.size() + ki;
      TopkRow r;
      r.block_size = opt.block_sizes[bi];
      r.k = opt.ks[ki];
      r.tokens = r.block_size * r.k;
      r.rows = tot.topk_rows[e];
      const double c = r.rows > 0 ? double(r.rows) : nan;
      r.block_mass = tot.block_mass[e] / c;
      r.token_mass = tot.token_mass[e] / c;
      r.ratio = tot.ratio[e] / c;
      res.topk.push_back(r);
    }
  for (size_t li = 0; li < lags.size(); ++li)
    res.autocorr.push_back({lags[li], tot.lag_rows[li],
                            tot.lag_rows[li] > 0 ? tot.lag_ac[li] / double(tot.lag_rows[li]) : nan});
  for (int64_t b = 0; b < nbins; ++b) {
    DistanceRow d;
    d.lo = b == 0 ? 0 : int64_t(1) << (b - 1);
    d.hi = b == 0 ? 1 : int64_t(1) << b;
    d.mass = res.rows > 0 ? tot.dist[size_t(b)] / double(res.rows) : nan;
    d.mass_per_token = d.mass / double(d.hi - d.lo);
    res.distance.push_back(d);
  }
  return res;
}

}  // namespace nsa::analysis
