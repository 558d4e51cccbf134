// Selected-block recall (recall.hpp): exact block masses streamed per tile, the selectors' block
// sets, and the per-position and aggregated metrics.
#include "recall.hpp"

#include <omp.h>

#include <algorithm>
#include <cmath>

#include "common.hpp"
#include "rng.hpp"

namespace nsa::analysis {

using ref::Mat;
using ref::Vec;

const char* to_string(Selector s) {
  switch (s) {
    case Selector::Nsa: return "nsa";
    case Selector::Oracle: return "oracle";
    case Selector::Quest: return "quest";
    case Selector::Meanpool: return "meanpool";
    case Selector::Random: return "random";
    case Selector::Window: return "window";
  }
  return "?";
}

std::vector<Selector> all_selectors() {
  return {Selector::Nsa, Selector::Oracle, Selector::Quest, Selector::Meanpool, Selector::Random, Selector::Window};
}

Selector parse_selector(const std::string& s) {
  for (Selector x : all_selectors())
    if (s == to_string(x)) return x;
  throw ConfigError(cat("selector '", s, "' is not one of: nsa, oracle, quest, meanpool, random, window"));
}

const RecallMaps& RecallResult::map(Selector s) const {
  for (const auto& m : maps)
    if (m.selector == s) return m;
  throw Error(cat("recall: selector '", to_string(s), "' was not scored"));
}

RecallStats RecallResult::overall(Selector s) const {
  for (const auto& r : rows)
    if (r.selector == s && r.bucket < 0 && r.group < 0) return r.stats;
  throw Error(cat("recall: selector '", to_string(s), "' was not scored"));
}

namespace {

constexpr int64_t kTileQueries = 64;      // positions per tile (x G heads = the tile's rows)
constexpr int64_t kKeyChunkTarget = 256;  // keys per score chunk, rounded to whole blocks

struct Tile {
  int64_t b, g, t0, t1;  // sequence, group, positions [t0, t1)
};

// Per-block statistics of one sequence's selection keys for one group, over whole blocks (the
// last block of the sequence may be short). A query inside a block sees only its prefix; the
// own block's statistics are recomputed for it (own_block_stats).
struct BlockKeys {
  Mat<double> kmin, kmax, kmean;  // [NB, dk]
};

BlockKeys block_keys(const Config& cfg, const double* K, int64_t T) {
  const int64_t ls = cfg.slc_len, dk = cfg.dk, NB = cfg.num_slc_blocks(T);
  BlockKeys s{Mat<double>(NB, dk), Mat<double>(NB, dk), Mat<double>(NB, dk)};
  for (int64_t j = 0; j < NB; ++j) {
    const int64_t u0 = j * ls, len = std::min(T, u0 + ls) - u0;
    const auto rows = ref::head_rows(K, cfg.Hkv, dk, 0, u0, len);
    s.kmin.row(j) = rows.colwise().minCoeff();
    s.kmax.row(j) = rows.colwise().maxCoeff();
    s.kmean.row(j) = rows.colwise().mean();
  }
  return s;
}

// The tile's queries as one [R, dk] matrix, row (t - t0)*G + hi = q[row0 + t, g*G + hi].
Mat<double> tile_queries(const Config& cfg, const Tensor<double>& q, int64_t row0, const Tile& tl) {
  const int64_t G = cfg.G();
  Mat<double> Q((tl.t1 - tl.t0) * G, cfg.dk);
  for (int64_t t = tl.t0; t < tl.t1; ++t)
    Q.middleRows((t - tl.t0) * G, G) = Eigen::Map<const Mat<double>>(q.row(row0 + t, tl.g * G), G, cfg.dk);
  return Q;
}

// The exact block masses of a tile: A [P, NBt] (P positions, A(t - t0, j) = A[t, g, j]) and
// W [P], the mass of the window's first, possibly partial block: tokens [ws, min((jw+1)*l', t+1))
// with ws = max(0, t-w+1), jw = ws / l'. K points at the group's key row 0 of the sequence.
//
// Streaming: the keys [0, t1) go through chunks of whole blocks; each row's exponentials in a
// chunk are taken against that chunk's own maximum mc, and its block sums stored with it. At the
// end, with m the row's maximum over chunks, p-mass = sum * exp(mc - m) / Z: one rescale per
// block instead of one per chunk (an online softmax would rescale all earlier blocks every time
// the maximum grows).
void tile_block_masses(const Config& cfg, const Mat<double>& Q, const double* K, const Tile& tl, Mat<double>& A,
                       Vec<double>& W) {
  const int64_t G = cfg.G(), dk = cfg.dk, ls = cfg.slc_len, R = Q.rows(), P = tl.t1 - tl.t0;
  const int64_t chunk = ls * std::max<int64_t>(1, kKeyChunkTarget / ls), bpc = chunk / ls;  // blocks per chunk
  const int64_t NBt = cfg.num_slc_blocks(tl.t1), nch = (tl.t1 + chunk - 1) / chunk;
  const double scale = cfg.softmax_scale();
  Mat<double> B = Mat<double>::Zero(R, NBt);                      // block sums against mc
  Mat<double> mc = Mat<double>::Constant(R, nch, ref::neg_inf<double>());  // chunk maxima
  Vec<double> wsum = Vec<double>::Zero(R);
  std::vector<int64_t> wch(static_cast<size_t>(R), 0);          // the chunk holding the window's first block
  Mat<double> S;
  for (int64_t c = 0; c < nch; ++c) {
    const int64_t c0 = c * chunk, bk = std::min(chunk, tl.t1 - c0);
    const auto Kc = ref::head_rows(K, cfg.Hkv, dk, 0, c0, bk);
    S.noalias() = (Q * Kc.transpose()) * scale;
    for (int64_t r = 0; r < R; ++r) {
      const int64_t t = tl.t0 + r / G, b = std::min(t + 1, c0 + bk) - c0;  // visible keys [c0, c0 + b)
      if (b <= 0) continue;
      auto seg = S.row(r).head(b);
      const double m = seg.maxCoeff();
      seg = (seg.array() - m).exp();
      mc(r, c) = m;
      for (int64_t u = 0; u < b; u += ls) B(r, c * bpc + u / ls) = seg.segment(u, std::min(ls, b - u)).sum();
      const int64_t ws = cfg.win_start(t), we = std::min((ws / ls + 1) * ls, t + 1);
      if (ws >= c0 && ws < c0 + b) {  // chunks hold whole blocks, so [ws, we) lies in this chunk
        wsum[r] = seg.segment(ws - c0, we - ws).sum();
        wch[static_cast<size_t>(r)] = c;
      }
    }
  }
  A.setZero(P, NBt);
  W.setZero(P);
  Vec<double> f(nch);
  for (int64_t r = 0; r < R; ++r) {  // heads of a position in ascending order: a fixed summation order
    const int64_t p = r / G;
    const double m = mc.row(r).maxCoeff();
    for (int64_t c = 0; c < nch; ++c) f[c] = std::isfinite(mc(r, c)) ? std::exp(mc(r, c) - m) : 0.0;
    double Z = 0;
    for (int64_t j = 0; j < NBt; ++j) Z += B(r, j) * f[j / bpc];
    const double norm = 1.0 / (Z * double(G));
    for (int64_t j = 0; j < NBt; ++j) A(p, j) += B(r, j) * f[j / bpc] * norm;
    W[p] += wsum[r] * f[wch[static_cast<size_t>(r)]] * norm;
  }
}

// Statistics of the own block's visible prefix [j*l', t] when it is shorter than the block.
void own_block_stats(const Config& cfg, const double* K, int64_t t, Eigen::RowVectorXd& kmin,
                     Eigen::RowVectorXd& kmax, Eigen::RowVectorXd& kmean) {
  const int64_t u0 = t / cfg.slc_len * cfg.slc_len;
  const auto rows = ref::head_rows(K, cfg.Hkv, cfg.dk, 0, u0, t + 1 - u0);
  kmin = rows.colwise().minCoeff();
  kmax = rows.colwise().maxCoeff();
  kmean = rows.colwise().mean();
}

// Quest and meanpool scores of the tile's positions against their valid blocks: [P, NBt].
void tile_proxy_scores(const Config& cfg, const Mat<double>& Q, const double* K, const BlockKeys& bk, int64_t T,
                       const Tile& tl, bool quest, bool meanpool, Mat<double>& Sq, Mat<double>& Sm) {
  const int64_t G = cfg.G(), P = tl.t1 - tl.t0, NBt = cfg.num_slc_blocks(tl.t1), ls = cfg.slc_len;
  const double scale = cfg.softmax_scale();
  // The own block is partial for t when the block continues past t.
  auto partial = [&](int64_t t) { return std::min(T, (t / ls + 1) * ls) - 1 > t; };
  Eigen::RowVectorXd omin, omax, omean;
  if (quest) {
    // sum_h sum_c max(q_c min_c, q_c max_c) = (sum_h q+) . max + (sum_h q-) . min, q+- = max/min(q, 0).
    Mat<double> Qp = Mat<double>::Zero(P, cfg.dk), Qn = Mat<double>::Zero(P, cfg.dk);
    for (int64_t p = 0; p < P; ++p)
      for (int64_t hi = 0; hi < G; ++hi) {
        Qp.row(p) += Q.row(p * G + hi).cwiseMax(0.0);
        Qn.row(p) += Q.row(p * G + hi).cwiseMin(0.0);
      }
    Sq.noalias() = Qp * bk.kmax.topRows(NBt).transpose();
    Sq.noalias() += Qn * bk.kmin.topRows(NBt).transpose();
    for (int64_t p = 0; p < P; ++p) {
      const int64_t t = tl.t0 + p;
      if (!partial(t)) continue;
      own_block_stats(cfg, K, t, omin, omax, omean);
      Sq(p, t / ls) = Qp.row(p).dot(omax) + Qn.row(p).dot(omin);
    }
  }
  if (meanpool) {
    Mat<double> L = (Q * bk.kmean.topRows(NBt).transpose()) * scale;  // [R, NBt]
    Sm.setZero(P, NBt);
    for (int64_t p = 0; p < P; ++p) {
      const int64_t t = tl.t0 + p, valid = cfg.slc_valid(t);
      if (partial(t)) {
        own_block_stats(cfg, K, t, omin, omax, omean);
        for (int64_t hi = 0; hi < G; ++hi) L(p * G + hi, t / ls) = scale * Q.row(p * G + hi).dot(omean);
      }
      for (int64_t hi = 0; hi < G; ++hi) {  // Eq. 8 and 10 with phi = mean: softmax per head, summed
        auto row = L.row(p * G + hi).head(valid);
        const double m = row.maxCoeff();
        row = (row.array() - m).exp();
        Sm.row(p).head(valid) += row / row.sum();
      }
    }
  }
}

// Metrics of one selection S (ascending block indices, all valid) against the oracle, from the
// position's block masses a[0..valid) and the window's first-block mass wpart.
struct Metrics {
  double recall, mass, mass_with_window;
};

Metrics score(const Config& cfg, int64_t t, const std::vector<int32_t>& S, const std::vector<char>& in_oracle,
              int64_t n_oracle, const double* a, double wpart, std::vector<char>& in_sel) {
  const int64_t valid = cfg.slc_valid(t), ls = cfg.slc_len;
  std::fill(in_sel.begin(), in_sel.begin() + valid, 0);
  int64_t hit = 0;
  double mass = 0;
  for (int32_t j : S) {
    in_sel[j] = 1;
    hit += in_oracle[j];
    mass += a[j];
  }
  // The window's tokens outside S: its first block from ws on (wpart), then whole blocks up to t.
  double extra = 0;
  const int64_t jw = cfg.win_start(t) / ls;
  if (!in_sel[jw]) extra += wpart;
  for (int64_t j = jw + 1; j < valid; ++j)
    if (!in_sel[j]) extra += a[j];
  return {double(hit) / double(n_oracle), mass, mass + extra};
}

struct SeqInfo {
  int64_t row0, T;
};

}  // namespace

double recall_bytes(const Config& cfg, const std::vector<int64_t>& seqlens, const RecallOptions& opt) {
  int64_t N = 0, NB = 0;
  for (int64_t T : seqlens) N += T, NB = std::max(NB, cfg.num_slc_blocks(T));
  const double S = double(opt.selectors.size());
  double bytes = double(N) * cfg.Hkv * S * 3 * 8;                                    // maps
  if (opt.keep_selections) bytes += double(N) * cfg.Hkv * S * cfg.slc_count * 4;
  if (opt.keep_block_mass) bytes += double(N) * cfg.Hkv * NB * 8;
  bytes += double(cfg.Hkv) * NB * cfg.dk * 3 * 8;                                    // block keys
  const double tile = double(kTileQueries) * cfg.G() * (NB * 3 + 2 * kKeyChunkTarget + cfg.dk) * 8;
  return bytes + tile * omp_get_max_threads();
}

RecallResult recall(const Config& cfg, const ref::Inputs<double>& in, const ref::ForwardResult<double>& fwd,
                    const RecallOptions& opt) {
  if (opt.selectors.empty()) throw ConfigError("recall: no selector given (choose from nsa, oracle, quest, meanpool, random, window)");
  for (size_t a = 0; a < opt.selectors.size(); ++a)
    for (size_t b = 0; b < a; ++b)
      if (opt.selectors[a] == opt.selectors[b])
        throw ConfigError(cat("recall: selector '", to_string(opt.selectors[a]), "' is given twice"));
  if (opt.buckets < 1) throw ConfigError(cat("buckets = ", opt.buckets, " is invalid: expected >= 1"));
  const std::vector<int64_t> cu = in.seqlens_or_single();
  const int64_t N = in.N(), Hkv = cfg.Hkv, n = cfg.slc_count;
  const bool want_nsa = std::find(opt.selectors.begin(), opt.selectors.end(), Selector::Nsa) != opt.selectors.end();
  if (want_nsa && fwd.block_idx.shape() != Shape{N, Hkv, n})
    throw InputError(cat("recall: NSA's block_idx has shape ", shape_str(fwd.block_idx.shape()), ", expected ",
                         shape_str({N, Hkv, n}), " (the forward result of the same inputs and config)"));

  std::vector<SeqInfo> seqs;
  int64_t Tmax = 0, NB = 0;
  for (size_t b = 0; b + 1 < cu.size(); ++b) {
    seqs.push_back({cu[b], cu[b + 1] - cu[b]});
    Tmax = std::max(Tmax, seqs.back().T);
    NB = std::max(NB, cfg.num_slc_blocks(seqs.back().T));
  }

  RecallResult res;
  const int nsel = int(opt.selectors.size());
  for (Selector s : opt.selectors) {
    RecallMaps m;
    m.selector = s;
    m.recall = Tensor<double>({N, Hkv});
    m.mass = Tensor<double>({N, Hkv});
    m.mass_with_window = Tensor<double>({N, Hkv});
    if (opt.keep_selections) m.idx = Tensor<int32_t>({N, Hkv, n}, -1);
    res.maps.push_back(std::move(m));
  }
  if (opt.keep_block_mass) res.block_mass = Tensor<double>({N, Hkv, NB});
  res.trivial = Tensor<uint8_t>({N});
  for (const SeqInfo& s : seqs)
    for (int64_t t = 0; t < s.T; ++t) res.trivial[s.row0 + t] = cfg.slc_valid(t) <= n;

  // Block statistics for quest and meanpool, per sequence and group.
  const bool want_quest = std::find(opt.selectors.begin(), opt.selectors.end(), Selector::Quest) != opt.selectors.end();
  const bool want_mean = std::find(opt.selectors.begin(), opt.selectors.end(), Selector::Meanpool) != opt.selectors.end();
  const Tensor<double>& Ks = in.key(Branch::Slc);
  std::vector<BlockKeys> bkeys(seqs.size() * size_t(Hkv));
  if (want_quest || want_mean) {
#pragma omp parallel for schedule(dynamic, 1)
    for (int64_t i = 0; i < int64_t(bkeys.size()); ++i) {
      const SeqInfo& s = seqs[size_t(i / Hkv)];
      bkeys[size_t(i)] = block_keys(cfg, Ks.row(s.row0, i % Hkv), s.T);
    }
  }

  std::vector<Tile> tiles;
  for (size_t b = 0; b < seqs.size(); ++b)
    for (int64_t g = 0; g < Hkv; ++g)
      for (int64_t t0 = 0; t0 < seqs[b].T; t0 += kTileQueries)
        tiles.push_back({int64_t(b), g, t0, std::min(seqs[b].T, t0 + kTileQueries)});
  // Later positions see more keys: longest work first, for the dynamic schedule.
  std::stable_sort(tiles.begin(), tiles.end(), [](const Tile& a, const Tile& b) { return a.t0 > b.t0; });

  Config exact = cfg;  // the oracle: top-n by mass, nothing forced
  exact.init_blocks = exact.local_blocks = 0;

#pragma omp parallel for schedule(dynamic, 1)
  for (size_t i = 0; i < tiles.size(); ++i) {
    const Tile& tl = tiles[i];
    const SeqInfo& sq = seqs[size_t(tl.b)];
    const double* K = Ks.row(sq.row0, tl.g);
    const Mat<double> Q = tile_queries(cfg, in.q, sq.row0, tl);
    Mat<double> A, Sq, Sm;
    Vec<double> W;
    tile_block_masses(cfg, Q, K, tl, A, W);
    if (want_quest || want_mean)
      tile_proxy_scores(cfg, Q, K, bkeys[size_t(tl.b * Hkv + tl.g)], sq.T, tl, want_quest, want_mean, Sq, Sm);
    const int64_t NBt = A.cols();
    const size_t nbt = static_cast<size_t>(NBt);
    std::vector<double> a(nbt), score_buf(nbt);
    std::vector<char> in_oracle(nbt), in_sel(nbt);
    std::vector<int32_t> S;
    for (int64_t t = tl.t0; t < tl.t1; ++t) {
      const int64_t p = t - tl.t0, row = sq.row0 + t, valid = cfg.slc_valid(t);
      for (int64_t j = 0; j < NBt; ++j) a[size_t(j)] = A(p, j);
      if (opt.keep_block_mass) std::copy(a.begin(), a.end(), &res.block_mass(row, tl.g, 0));
      const std::vector<int32_t> O = ref::select_blocks(exact, t, a.data());
      std::fill(in_oracle.begin(), in_oracle.end(), 0);
      for (int32_t j : O) in_oracle[size_t(j)] = 1;
      for (int s = 0; s < nsel; ++s) {
        switch (opt.selectors[size_t(s)]) {
          case Selector::Nsa:
            S.clear();
            for (int64_t m = 0; m < n; ++m)
              if (fwd.block_idx(row, tl.g, m) >= 0) S.push_back(fwd.block_idx(row, tl.g, m));
            break;
          case Selector::Oracle: S = O; break;
          case Selector::Quest:
            for (int64_t j = 0; j < valid; ++j) score_buf[size_t(j)] = Sq(p, j);
            S = ref::select_blocks(cfg, t, score_buf.data());
            break;
          case Selector::Meanpool:
            for (int64_t j = 0; j < valid; ++j) score_buf[size_t(j)] = Sm(p, j);
            S = ref::select_blocks(cfg, t, score_buf.data());
            break;
          case Selector::Random: {
            // Uniform scores make the top fill a uniform random subset of the non-forced blocks.
            Rng rng(opt.seed * 0x9E3779B97F4A7C15ull ^ (uint64_t(row * Hkv + tl.g) * 0xD1B54A32D192ED03ull));
            for (int64_t j = 0; j < valid; ++j) score_buf[size_t(j)] = rng.uniform();
            S = ref::select_blocks(cfg, t, score_buf.data());
            break;
          }
          case Selector::Window:
            for (int64_t j = 0; j < valid; ++j) score_buf[size_t(j)] = double(j);
            S = ref::select_blocks(cfg, t, score_buf.data());
            break;
        }
        const Metrics mt = score(cfg, t, S, in_oracle, int64_t(O.size()), a.data(), W[p], in_sel);
        RecallMaps& mp = res.maps[size_t(s)];
        mp.recall(row, tl.g) = mt.recall;
        mp.mass(row, tl.g) = mt.mass;
        mp.mass_with_window(row, tl.g) = mt.mass_with_window;
        if (opt.keep_selections)
          for (size_t m = 0; m < S.size(); ++m) mp.idx(row, tl.g, int64_t(m)) = S[m];
      }
    }
  }

  // Aggregates: means over the included (position, group) pairs, summed in a fixed order.
  res.bucket_width = std::max<int64_t>(1, (Tmax + opt.buckets - 1) / opt.buckets);
  const int64_t K = opt.buckets;
  for (int s = 0; s < nsel; ++s) {
    const RecallMaps& mp = res.maps[size_t(s)];
    // sums[(bucket or K for all) * (Hkv + 1) + (group or Hkv for all)]
    struct Acc {
      int64_t cnt = 0;
      double r = 0, m = 0, mw = 0;
    };
    std::vector<Acc> acc(size_t((K + 1) * (Hkv + 1)));
    for (const SeqInfo& sq : seqs)
      for (int64_t t = 0; t < sq.T; ++t) {
        const int64_t row = sq.row0 + t;
        if (res.trivial[row] && !opt.include_trivial) continue;
        const int64_t bkt = std::min(K - 1, t / res.bucket_width);
        for (int64_t g = 0; g < Hkv; ++g)
          for (int64_t bb : {bkt, K})
            for (int64_t gg : {g, Hkv}) {
              Acc& x = acc[size_t(bb * (Hkv + 1) + gg)];
              ++x.cnt;
              x.r += mp.recall(row, g);
              x.m += mp.mass(row, g);
              x.mw += mp.mass_with_window(row, g);
            }
      }
    for (int64_t bb = 0; bb <= K; ++bb)
      for (int64_t gg = 0; gg <= Hkv; ++gg) {
        const Acc& x = acc[size_t(bb * (Hkv + 1) + gg)];
        RecallRow r;
        r.selector = opt.selectors[size_t(s)];
        r.bucket = bb < K ? bb : -1;
        r.t_lo = bb < K ? std::min(Tmax, bb * res.bucket_width) : 0;
        r.t_hi = bb < K ? std::min(Tmax, (bb + 1) * res.bucket_width) : Tmax;
        r.group = gg < Hkv ? gg : -1;
        r.stats.positions = x.cnt;
        if (x.cnt > 0) {
          r.stats.recall = x.r / double(x.cnt);
          r.stats.mass = x.m / double(x.cnt);
          r.stats.mass_with_window = x.mw / double(x.cnt);
        }
        res.rows.push_back(r);
      }
  }
  return res;
}

}  // namespace nsa::analysis
