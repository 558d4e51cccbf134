// The fast path of the NSA forward pass and of full attention (docs/spec.md 1-6).
//
// Work is cut into tiles (sequence b, KV group g, query rows [t0, t1)); a tile holds the G query
// heads of its group for Bq consecutive positions as one [Bq*G, dk] matrix, so every product
// against keys is shared by the group (the paper's group-centric layout, here for Eigen's GEMM).
// Tiles run in parallel under OpenMP; each output row is written by exactly one tile in a fixed
// order, so results are bitwise independent of the thread count (Eigen's own threading is off).
//   compression: scores against the visible compressed keys, one masked row softmax (the
//                probabilities are needed for Eq. 8-10 anyway), at most ~64 MB per tile; the
//                group's heads are summed before the Eq. 9 mapping (Eq. 10 first);
//   selection:   each block chosen by any position of the tile is attended once by all the rows
//                that chose it, with an online softmax over blocks in ascending order; its keys
//                and values are read in place from a per-sequence layout (slc_operands) by a
//                small kernel (rows_times) whose rows round independently of each other, so the
//                grouping by block keeps results bitwise causal;
//   window, full: chunks of kKeyChunk keys with an online softmax, so memory is O(rows * chunk).
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>

#include "common.hpp"
#include "nsa_ref.hpp"
#include "oracle.hpp"

namespace nsa::ref {

namespace {

constexpr int64_t kTileQueries = 64;   // Bq: query positions per tile
constexpr int64_t kKeyChunk = 256;     // keys per online-softmax step
constexpr double kCmpTileBytes = 64e6;  // cap on a tile's compression score matrix

// Bq for a sequence of at most Ncmax compressed blocks: the compression scores [Bq*G, Nc] of a
// tile stay under kCmpTileBytes, with at least one position per tile.
int64_t tile_queries(const Config& cfg, int64_t Ncmax, size_t elem) {
  const double per_query = double(cfg.G()) * double(std::max<int64_t>(Ncmax, 1)) * double(elem);
  return std::clamp<int64_t>(int64_t(kCmpTileBytes / per_query), 1, kTileQueries);
}

// The online softmax of R rows over keys that arrive in chunks: running max m and sum of
// exponentials per row; O holds the unnormalised outputs, rescaled when a row's max grows.
template <class S>
struct OnlineSoftmax {
  Vec<S> m, sum;  // [R]
  explicit OnlineSoftmax(int64_t R) : m(Vec<S>::Constant(R, neg_inf<S>())), sum(Vec<S>::Zero(R)) {}

  // Row r's scores of one chunk, of which the columns [a, b) are visible (a < b): replaced by
  // exp(score - new max) there and 0 elsewhere, ready for O.row(r) += row * V_chunk.
  template <class Row, class ORow>
  void step(int64_t r, Row row, int64_t a, int64_t b, ORow o) {
    auto seg = row.segment(a, b - a);
    const S mnew = std::max(m[r], seg.maxCoeff());
    const S alpha = std::exp(m[r] - mnew);  // 0 on the row's first visible chunk (m = -inf)
    seg = (seg.array() - mnew).exp();       // Eigen's vectorised exp: scalar exp would cost more than the products
    row.head(a).setZero();
    row.tail(row.size() - b).setZero();
    sum[r] = sum[r] * alpha + seg.sum();
    o *= alpha;
    m[r] = mnew;
  }

  // Normalises O's rows and gives their lse (-inf, and zeros in O, for a row that saw no key).
  void finish(Mat<S>& O, Vec<S>& lse) const {
    lse.resize(m.size());
    for (int64_t r = 0; r < m.size(); ++r) {
      if (sum[r] > 0) {
        O.row(r) /= sum[r];
        lse[r] = m[r] + std::log(sum[r]);
      } else {
        lse[r] = neg_inf<S>();
      }
    }
  }
};

// Softmax attention of the tile's rows over the keys [lo(t), t] of one head, streamed through
// chunks of kKeyChunk keys with an online softmax. Qs holds the queries already multiplied by the
// softmax scale (scaling [R, dk] once costs less than scaling every [R, chunk] score block). K, V
// point at the head's first row of the sequence, with row strides ks, vs. Writes O [R, dv] and
// lse [R] (-inf and zeros for no key).
template <class S, class Lo>
void attend_causal_range(const Mat<S>& Qs, const TileRows& tr, Lo lo, const S* K, int64_t ks, const S* V,
                         int64_t vs, int64_t dk, int64_t dv, Mat<S>& O, Vec<S>& lse) {
  const int64_t R = tr.rows();
  OnlineSoftmax<S> sm(R);
  O.setZero(R, dv);
  const int64_t first = lo(tr.t0), last = tr.t1;  // union of the rows' key ranges: [first, last)
  Mat<S> Sc;
  for (int64_t c0 = first; c0 < last; c0 += kKeyChunk) {
    const int64_t bk = std::min(kKeyChunk, last - c0);
    Eigen::Map<const Mat<S>, 0, Eigen::OuterStride<>> Kc(K + c0 * ks, bk, dk, Eigen::OuterStride<>(ks));
    Eigen::Map<const Mat<S>, 0, Eigen::OuterStride<>> Vc(V + c0 * vs, bk, dv, Eigen::OuterStride<>(vs));
    Sc.noalias() = Qs * Kc.transpose();
    for (int64_t r = 0; r < R; ++r) {
      const int64_t t = tr.pos(r);
      const int64_t a = std::max(lo(t), c0) - c0, b = std::min(t + 1, c0 + bk) - c0;  // [a, b)
      if (b <= a) Sc.row(r).setZero();
      else sm.step(r, Sc.row(r), a, b, O.row(r));
    }
    O.noalias() += Sc * Vc;
  }
  sm.finish(O, lse);
}

// Writes tile rows into a [N, Hq, D] tensor (and their lse into [N, Hq]).
template <class S>
void scatter_rows(const Mat<S>& O, const Vec<S>& lse, int64_t row0, const TileRows& tr, int64_t g,
                  Tensor<S>& out, Tensor<S>& out_lse) {
  const int64_t G = tr.G, D = O.cols();
  for (int64_t t = tr.t0; t < tr.t1; ++t) {
    Eigen::Map<Mat<S>>(out.row(row0 + t, g * G), G, D) = O.middleRows((t - tr.t0) * G, G);
    for (int64_t hi = 0; hi < G; ++hi) out_lse(row0 + t, g * G + hi) = lse[(t - tr.t0) * G + hi];
  }
}

// One 64-byte vector (GCC/Clang extension; the compiler splits it where registers are narrower).
typedef float Vec64f __attribute__((vector_size(64)));
typedef double Vec64d __attribute__((vector_size(64)));

// C [M, N] = A [M, K] B [K, N], row-major with leading dimensions, for the selection branch:
// M a multiple of 4 (rows of queries or probabilities), N a multiple of 2 vectors.
// Every element is one chain of multiply-adds over k ascending, computed by the same
// instructions whatever M is or where its row sits: a row's result never depends on which other
// rows share the product, so selection outputs stay bitwise causal and independent of how the
// tile's positions are grouped by block (Eigen's GEMM rounds a row differently by its panel).
// The register tile is 4 rows x 2 vectors, 8 independent chains (measured: as written with
// arrays of 4 x 4 or 4 x 2 vectors, gcc keeps the accumulators on the stack, 1.5x slower).
template <class S>
void rows_times(int64_t M, int64_t N, int64_t K, const S* A, int64_t lda, const S* B, int64_t ldb, S* C,
                int64_t ldc) {
  using V = std::conditional_t<std::is_same_v<S, float>, Vec64f, Vec64d>;
  constexpr int64_t L = 64 / sizeof(S);
  for (int64_t i = 0; i < M; i += 4)
    for (int64_t c = 0; c < N; c += 2 * L) {
      V c00 = {}, c01 = {}, c10 = {}, c11 = {}, c20 = {}, c21 = {}, c30 = {}, c31 = {};
      const S *a0 = A + i * lda, *a1 = a0 + lda, *a2 = a1 + lda, *a3 = a2 + lda;
      for (int64_t k = 0; k < K; ++k) {
        V b0, b1;
        std::memcpy(&b0, B + k * ldb + c, sizeof(V));
        std::memcpy(&b1, B + k * ldb + c + L, sizeof(V));
        c00 += a0[k] * b0, c01 += a0[k] * b1;
        c10 += a1[k] * b0, c11 += a1[k] * b1;
        c20 += a2[k] * b0, c21 += a2[k] * b1;
        c30 += a3[k] * b0, c31 += a3[k] * b1;
      }
      const V out[8] = {c00, c01, c10, c11, c20, c21, c30, c31};
      for (int r = 0; r < 4; ++r) std::memcpy(C + (i + r) * ldc + c, &out[2 * r], 2 * sizeof(V));
    }
}

// Widths of the selection's operands in rows_times: l' keys and dv value columns, rounded up to
// whole pairs of 64-byte vectors.
template <class S>
int64_t slc_pad(int64_t n) {
  constexpr int64_t L2 = 2 * 64 / int64_t(sizeof(S));
  return (n + L2 - 1) / L2 * L2;
}

// The selection branch's keys and values of one sequence and KV group, laid out for rows_times,
// which reads any block of them in place: block j's keys transposed and zero-padded to Wp columns
// (block-major: a power-of-two row stride of T keys made the rows of a block collide in the
// cache), and values with rows padded to dvp. Built once per forward: per tile, the transposing
// copy of every chosen block cost more than the products at T = 16k (every tile chooses most
// blocks).
template <class S>
struct SlcOperands {
  Mat<S> Kt;  // [NB * dk, Wp]  rows j*dk + a, column c: key j*l' + c, dimension a
  Mat<S> V;   // [T, dvp]
};

template <class S>
SlcOperands<S> slc_operands(const Config& cfg, const Inputs<S>& in, int64_t row0, int64_t T, int64_t g) {
  const int64_t NB = cfg.num_slc_blocks(T), ls = cfg.slc_len, dk = cfg.dk;
  SlcOperands<S> so{Mat<S>::Zero(NB * dk, slc_pad<S>(ls)), Mat<S>::Zero(T, slc_pad<S>(cfg.dv))};
  for (int64_t j = 0; j < NB; ++j) {
    const int64_t len = std::min(ls, T - j * ls);
    so.Kt.block(j * dk, 0, dk, len) = head_rows(in.key(Branch::Slc).data(), cfg.Hkv, dk, g, row0 + j * ls, len).transpose();
  }
  so.V.leftCols(cfg.dv) = head_rows(in.value(Branch::Slc).data(), cfg.Hkv, cfg.dv, g, row0, T);
  return so;
}

struct Tile {
  int64_t b, g, t0, t1;
};

std::vector<Tile> make_tiles(const std::vector<int64_t>& cu, int64_t Hkv, int64_t Bq) {
  std::vector<Tile> tiles;
  for (size_t b = 0; b + 1 < cu.size(); ++b) {
    const int64_t T = cu[b + 1] - cu[b];
    for (int64_t g = 0; g < Hkv; ++g)
      for (int64_t t0 = 0; t0 < T; t0 += Bq) tiles.push_back({int64_t(b), g, t0, std::min(T, t0 + Bq)});
  }
  // Longest work first (later positions see more keys), for a better dynamic schedule.
  std::stable_sort(tiles.begin(), tiles.end(), [](const Tile& a, const Tile& b) { return a.t0 > b.t0; });
  return tiles;
}

// One tile of the NSA forward pass: all three branches for G heads x Bq positions.
template <class S>
void nsa_tile(const Config& cfg, const Inputs<S>& in, const Tile& tile, int64_t row0, int64_t cmp0,
              const std::vector<std::vector<OverlapTerm>>& ovmap, const SlcOperands<S>& so, ForwardResult<S>& r) {
  const int64_t Hkv = cfg.Hkv, G = cfg.G(), dk = cfg.dk, dv = cfg.dv, g = tile.g, ls = cfg.slc_len;
  const S scale = static_cast<S>(cfg.softmax_scale());
  const TileRows tr{tile.t0, tile.t1, G};
  const int64_t R = tr.rows();
  const Mat<S> Q = gather_queries(in.q, row0, tr, g, dk);
  const Mat<S> Qs = Q * scale;  // s q, for the selection and window branches
  Mat<S> O;
  Vec<S> lse(R);

  // ---- Compression branch (Eq. 7) and the importance scores (Eq. 8-10) ----
  const int64_t nvmax = cfg.cmp_visible(tr.t1 - 1);
  O.setZero(R, dv);
  lse.setConstant(neg_inf<S>());
  Mat<S> P;  // [R, nvmax] probabilities p_cmp
  Eigen::Matrix<S, Eigen::Dynamic, Eigen::Dynamic> Pc;  // [R + 16, nvmax] column-major Q K^T
  if (nvmax > 0) {
    auto Kc = head_rows(r.k_cmp_compressed.data() + cmp0 * Hkv * dk, Hkv, dk, g, 0, nvmax);
    auto Vc = head_rows(r.v_cmp_compressed.data() + cmp0 * Hkv * dv, Hkv, dv, g, 0, nvmax);
    // (Q K^T) s, not (s Q) K^T, and Q K^T column-major: with equal keys (constant inputs) this
    // product gives exactly equal scores in every column, as the oracle does, so exact ties stay
    // ties (measured: (s Q) K^T, or Q K^T evaluated row-major, which Eigen computes as K Q^T,
    // broke a tie at one position of tests' constant-key case). Scaled into the row-major P in
    // 64 x 64 blocks: the plain strided copy, one cache line per element, took ~10% of the
    // forward at T = 16k. Pc has 16 spare rows: with R = 1024 floats its column stride was 4 KB,
    // which put all the columns of a block in one cache set (measured: -9% time at T = 16k).
    Pc.resize(R + 16, nvmax);
    Pc.topRows(R).noalias() = Q * Kc.transpose();
    P.resize(R, nvmax);
    for (int64_t c0 = 0; c0 < nvmax; c0 += 64)
      for (int64_t r0 = 0; r0 < R; r0 += 64) {
        const int64_t rb = std::min<int64_t>(64, R - r0), cb = std::min<int64_t>(64, nvmax - c0);
        P.block(r0, c0, rb, cb) = Pc.block(r0, c0, rb, cb) * scale;
      }
    for (int64_t rr = 0; rr < R; ++rr) {
      const int64_t nv = cfg.cmp_visible(tr.pos(rr));
      auto row = P.row(rr);
      if (nv == 0) {
        row.setZero();
        continue;
      }
      const S mx = row.head(nv).maxCoeff();
      row.head(nv) = (row.head(nv).array() - mx).exp();
      const S s = row.head(nv).sum();
      row.head(nv) /= s;
      row.tail(nvmax - nv).setZero();
      lse[rr] = mx + std::log(s);
    }
    O.noalias() = P * Vc;
  }
  scatter_rows(O, lse, row0, tr, g, r.o_branch[0], r.lse[0]);

  // Eq. 10 before Eq. 9: both are fixed-weight sums, so the group's heads are summed first
  // (vectorised over i) and the scalar overlap mapping runs once per position, not once per head.
  // Heads are summed in ascending order, then i ascending: exactly equal columns of p_cmp (equal
  // compressed keys) still give exactly equal block scores, so exact ties stay ties as in the
  // oracle (which maps each head first); otherwise the two orders differ by round-off.
  Vec<S> pgrp(std::max<int64_t>(nvmax, 1));  // [nv] sum over the group's heads of p_cmp
  for (int64_t t = tr.t0; t < tr.t1; ++t) {
    const int64_t nv = cfg.cmp_visible(t), valid = cfg.slc_valid(t);
    S* Pg = &r.block_scores(row0 + t, g, 0);
    std::fill(Pg, Pg + valid, S(0));
    if (nv == 0) continue;
    pgrp.head(nv) = P.row((t - tr.t0) * G).head(nv);
    for (int64_t hi = 1; hi < G; ++hi) pgrp.head(nv) += P.row((t - tr.t0) * G + hi).head(nv);
    for (int64_t i = 0; i < nv; ++i)
      for (const OverlapTerm& ot : ovmap[static_cast<size_t>(i)]) Pg[ot.j] += pgrp[i] * static_cast<S>(ot.w);
  }

  // ---- Selection branch (Eq. 11-12): per position, the group's selected tokens u <= t ----
  // Each position chooses its blocks (Eq. 11); then each chosen block is attended once by all the
  // tile's rows (positions x G heads) that chose it, its keys and values read in place, with an
  // online softmax over the blocks in ascending order (the oracle's order of keys). Positions of a
  // tile share the initial and local blocks, and under random scores each other block is still
  // chosen by several positions, so a block's keys and values are copied once per tile instead of
  // once per position (the per-position gather of n*l' keys was copy-bound: measured 3.65 s ->
  // 2.9 s CPU for the float forward at T = 16k, Hq = 16, Hkv = 1, d = 64).
  const int64_t NBt = cfg.num_slc_blocks(tr.t1);
  std::vector<std::vector<int32_t>> users(static_cast<size_t>(NBt));  // [NBt] tile positions t - t0 choosing j
  for (int64_t t = tr.t0; t < tr.t1; ++t) {
    const std::vector<int32_t> sel = select_blocks(cfg, t, &r.block_scores(row0 + t, g, 0));
    for (size_t m = 0; m < sel.size(); ++m) {
      r.block_idx(row0 + t, g, int64_t(m)) = sel[m];
      users[static_cast<size_t>(sel[m])].push_back(static_cast<int32_t>(t - tr.t0));
    }
  }
  // Scores Sj = Qj Kt_j for the rows Qj of the block's users (padded to a multiple
  // of 4 with zero rows), then, after the softmax step, Oj = Pj V[u0 : u0 + len) (rows_times).
  // Columns past the block's visible keys are zeroed by the softmax step.
  const int64_t Wp = slc_pad<S>(ls), dvp = so.V.cols();
  OnlineSoftmax<S> sm(R);
  O.setZero(R, dv);
  Mat<S> Qj, Sj, Oj;  // [M, dk], [M, Wp], [M, dvp]
  for (int64_t j = 0; j < NBt; ++j) {
    const std::vector<int32_t>& us = users[static_cast<size_t>(j)];
    if (us.empty()) continue;
    const int64_t u0 = j * ls, len = std::min((j + 1) * ls, tr.t0 + us.back() + 1) - u0;
    const int64_t M = (int64_t(us.size()) * G + 3) / 4 * 4;
    Qj.setZero(M, dk);
    for (size_t p = 0; p < us.size(); ++p) Qj.middleRows(int64_t(p) * G, G) = Qs.middleRows(us[p] * G, G);
    Sj.resize(M, Wp);
    rows_times<S>(M, Wp, dk, Qj.data(), dk, so.Kt.data() + j * dk * Wp, Wp, Sj.data(), Wp);
    for (size_t p = 0; p < us.size(); ++p) {
      const int64_t b = std::min(len, tr.t0 + us[p] + 1 - u0);  // keys [u0, u0 + b) are <= t
      for (int64_t hi = 0; hi < G; ++hi)
        sm.step(us[p] * G + hi, Sj.row(int64_t(p) * G + hi), 0, b, O.row(us[p] * G + hi));
    }
    Oj.resize(M, dvp);
    rows_times<S>(M, dvp, len, Sj.data(), Wp, so.V.data() + u0 * dvp, dvp, Oj.data(), dvp);
    for (size_t p = 0; p < us.size(); ++p)
      O.middleRows(us[p] * G, G) += Oj.block(int64_t(p) * G, 0, G, dv);
  }
  sm.finish(O, lse);
  scatter_rows(O, lse, row0, tr, g, r.o_branch[1], r.lse[1]);

  // ---- Sliding window: keys [max(0, t-w+1), t] ----
  const Tensor<S>& Kw = in.key(Branch::Win);
  const Tensor<S>& Vw = in.value(Branch::Win);
  attend_causal_range(
      Qs, tr, [&](int64_t t) { return cfg.win_start(t); }, Kw.row(row0, g), Hkv * dk, Vw.row(row0, g), Hkv * dv, dk,
      dv, O, lse);
  scatter_rows(O, lse, row0, tr, g, r.o_branch[2], r.lse[2]);
}

template <class S>
void forward_fast(const Config& cfg, const Inputs<S>& in, const std::vector<int64_t>& cu, ForwardResult<S>& r) {
  const int64_t B = int64_t(cu.size()) - 1;
  // Eq. 7 for every sequence.
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t b = 0; b < B; ++b) {
    const int64_t T = cu[b + 1] - cu[b];
    const Tensor<S> kc =
        compress(cfg, in.key(Branch::Cmp).row(cu[b], 0), T, cfg.dk, in.phi.k, cfg.hidden_k(), Path::Fast);
    const Tensor<S> vc =
        compress(cfg, in.value(Branch::Cmp).row(cu[b], 0), T, cfg.dv, in.phi.v, cfg.hidden_v(), Path::Fast);
    std::copy(kc.vec().begin(), kc.vec().end(), r.k_cmp_compressed.data() + r.cu_cmp[b] * cfg.Hkv * cfg.dk);
    std::copy(vc.vec().begin(), vc.vec().end(), r.v_cmp_compressed.data() + r.cu_cmp[b] * cfg.Hkv * cfg.dv);
  }
  int64_t Tmax = 0;
  for (int64_t b = 0; b < B; ++b) Tmax = std::max(Tmax, cu[b + 1] - cu[b]);
  const int64_t Ncmax = cfg.num_cmp_blocks(Tmax);
  const int64_t Bq = tile_queries(cfg, Ncmax, sizeof(S));
  const auto ovmap = overlap_map(cfg, Ncmax);
  const std::vector<Tile> tiles = make_tiles(cu, cfg.Hkv, Bq);
  std::vector<SlcOperands<S>> so(static_cast<size_t>(B * cfg.Hkv));  // [B * Hkv]
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t bg = 0; bg < B * cfg.Hkv; ++bg)
    so[size_t(bg)] = slc_operands(cfg, in, cu[bg / cfg.Hkv], cu[bg / cfg.Hkv + 1] - cu[bg / cfg.Hkv], bg % cfg.Hkv);
#pragma omp parallel for schedule(dynamic, 1)
  for (size_t i = 0; i < tiles.size(); ++i) {
    const Tile& tl = tiles[i];
    nsa_tile(cfg, in, tl, cu[tl.b], r.cu_cmp[tl.b], ovmap, so[size_t(tl.b * cfg.Hkv + tl.g)], r);
  }
  // Eq. 5: the gated sum.
  const int64_t N = in.N(), Hq = cfg.Hq, dv = cfg.dv;
#pragma omp parallel for schedule(static)
  for (int64_t t = 0; t < N; ++t) combine_row(r, t, Hq, dv);
}

}  // namespace

template <class S>
ForwardResult<S> forward(const Config& cfg, const Inputs<S>& in, Path path) {
  const std::vector<int64_t> cu = in.seqlens_or_single();
  const int64_t B = int64_t(cu.size()) - 1, N = in.N();
  ForwardResult<S> r;
  r.gates = compute_gates(cfg, in);
  r.o = Tensor<S>({N, cfg.Hq, cfg.dv});
  for (int c = 0; c < kBranches; ++c) {
    r.o_branch[c] = Tensor<S>({N, cfg.Hq, cfg.dv});
    r.lse[c] = Tensor<S>({N, cfg.Hq}, neg_inf<S>());
  }
  int64_t NB = 0;
  r.cu_cmp.assign(1, 0);
  for (int64_t b = 0; b < B; ++b) {
    const int64_t T = cu[b + 1] - cu[b];
    NB = std::max(NB, cfg.num_slc_blocks(T));
    r.cu_cmp.push_back(r.cu_cmp.back() + cfg.num_cmp_blocks(T));
  }
  r.block_idx = Tensor<int32_t>({N, cfg.Hkv, cfg.slc_count}, -1);
  r.block_scores = Tensor<S>({N, cfg.Hkv, NB});
  r.k_cmp_compressed = Tensor<S>({r.cu_cmp.back(), cfg.Hkv, cfg.dk});
  r.v_cmp_compressed = Tensor<S>({r.cu_cmp.back(), cfg.Hkv, cfg.dv});
  if (path == Path::Oracle) {
    for (int64_t b = 0; b < B; ++b) oracle_forward_seq(cfg, in, cu[b], cu[b + 1] - cu[b], r.cu_cmp[b], r);
  } else {
    forward_fast(cfg, in, cu, r);
  }
  return r;
}

template <class S>
FullResult<S> full_attention(const Config& cfg, const Tensor<S>& q, const Tensor<S>& k, const Tensor<S>& v,
                             const std::vector<int64_t>& cu_in, Path path) {
  const int64_t N = q.dim(0);
  const std::vector<int64_t> cu = cu_in.empty() ? std::vector<int64_t>{0, N} : cu_in;
  FullResult<S> r{Tensor<S>({N, cfg.Hq, cfg.dv}), Tensor<S>({N, cfg.Hq}, neg_inf<S>())};
  if (path == Path::Oracle) {
    for (size_t b = 0; b + 1 < cu.size(); ++b) oracle_full_seq(cfg, q, k, v, cu[b], cu[b + 1] - cu[b], r);
    return r;
  }
  const std::vector<Tile> tiles = make_tiles(cu, cfg.Hkv, kTileQueries);
  const S scale = static_cast<S>(cfg.softmax_scale());
#pragma omp parallel for schedule(dynamic, 1)
  for (size_t i = 0; i < tiles.size(); ++i) {
    const Tile& tl = tiles[i];
    const int64_t row0 = cu[tl.b];
    const TileRows tr{tl.t0, tl.t1, cfg.G()};
    const Mat<S> Qs = gather_queries(q, row0, tr, tl.g, cfg.dk) * scale;
    Mat<S> O;
    Vec<S> lse;
    attend_causal_range(
        Qs, tr, [](int64_t) { return int64_t(0); }, k.row(row0, tl.g), cfg.Hkv * cfg.dk, v.row(row0, tl.g),
        cfg.Hkv * cfg.dv, cfg.dk, cfg.dv, O, lse);
    scatter_rows(O, lse, row0, tr, tl.g, r.o, r.lse);
  }
  return r;
}

// ---- Memory (nsa_ref.hpp): the allocations above, counted --------------------------------------

namespace {
// Eigen's matrix products pack blocks of their operands into buffers sized to the caches
// (a few MB); allowed per thread.
constexpr double kGemmBuffers = 16e6;

// The sum of the `k` largest values.
double top_sum(std::vector<double> v, size_t k) {
  std::sort(v.begin(), v.end(), std::greater<double>());
  double s = 0;
  for (size_t i = 0; i < std::min(k, v.size()); ++i) s += v[i];
  return s;
}
}  // namespace

MemoryUse forward_memory(const Config& cfg, const std::vector<int64_t>& seqlens, int64_t gate_hidden, int elem,
                         int threads, Path path) {
  const double Hq = double(cfg.Hq), Hkv = double(cfg.Hkv), G = double(cfg.G()), dk = double(cfg.dk),
               dv = double(cfg.dv), n = double(cfg.slc_count), ls = double(cfg.slc_len), e = elem;
  double N = 0, Nc = 0;
  int64_t Tmax = 0, NB = 0;
  for (int64_t T : seqlens) {
    N += double(T), Nc += double(cfg.num_cmp_blocks(T));
    Tmax = std::max(Tmax, T), NB = std::max(NB, cfg.num_slc_blocks(T));
  }
  const double Ncmax = double(cfg.num_cmp_blocks(Tmax)), nb = double(NB);
  MemoryUse m;
  // ForwardResult: o and the three o_branch [N, Hq, dv], three lse and the gates [N, Hq, (3)],
  // block_scores [N, Hkv, NB], the compressed keys and values, and block_idx (int32).
  m.result = e * (N * Hq * (4 * dv + 6) + N * Hkv * nb + Nc * Hkv * (dk + dv)) + 4.0 * N * Hkv * n;
  // compute_gates with the MLP: the hidden activations [N, d_hidden] and the product's temporary.
  const double gates = e * 2 * N * double(gate_hidden);
  // compress() of one sequence's keys and then its values.
  std::vector<double> cmp_seq;
  for (int64_t T : seqlens)
    cmp_seq.push_back(compress_memory(cfg, T, cfg.dk, cfg.hidden_k(), elem, path) +
                      compress_memory(cfg, T, cfg.dv, cfg.hidden_v(), elem, path));
  if (path == Path::Oracle) {
    // One sequence at a time: its compressed keys and values, p_cmp, p_slc, and key/value row
    // pointers (and scores) for at most every token.
    const double seq = top_sum(cmp_seq, 1) + e * (Ncmax + G * nb + double(Tmax)) + 16.0 * double(Tmax);
    m.working = std::max(gates, seq);
    return m;
  }
  // Compression: the `threads` largest sequences at once, one per thread.
  const double cmp = top_sum(cmp_seq, size_t(std::max(threads, 1))) + kGemmBuffers * threads;
  // Tiles, one per thread: queries, outputs and lse [R, dk + dv + 1], compression scores and
  // probabilities [R + 16, Nc] and [R, Nc] and their head sum [Nc], the window's chunk scores [R, kKeyChunk] and running max and
  // sum, the selection's running max and sum [R, 2], one block's users' queries, scores and
  // outputs [R + 3, dk + l' + dv + 64],
  // the blocks' user lists (4 bytes per position and selected block, 24 per block),
  // select_blocks' lists (9 bytes per block), and the tile list and the Eq. 9 map shared by all.
  const double R = double(tile_queries(cfg, int64_t(Ncmax), size_t(elem))) * G;
  const double slc = (R + 3) * (dk + ls + dv + 64) + 2 * R;
  const double tile = e * (R * (dk + dv + 3 + 2 * Ncmax + double(kKeyChunk)) + 17 * Ncmax + slc) +
                      4.0 * (R / G) * n + 33.0 * nb + kGemmBuffers;
  // Shared: the tile list, the Eq. 9 map, and slc_operands' padded keys and values of every
  // sequence and group [NB * dk, l' + 32] + [T, dv + 32].
  double operands = 0;
  for (int64_t T : seqlens)
    operands += Hkv * e * (double(cfg.num_slc_blocks(T)) * dk * (ls + 32) + double(T) * (dv + 32));
  const double shared =
      32.0 * (N / double(kTileQueries) + double(seqlens.size())) * Hkv + Ncmax * 88.0 + operands;
  m.working = std::max({gates, cmp, tile * threads + shared});
  return m;
}

MemoryUse full_attention_memory(const Config& cfg, const std::vector<int64_t>& seqlens, int elem, int threads,
                                Path path) {
  double N = 0;
  int64_t Tmax = 0;
  for (int64_t T : seqlens) N += double(T), Tmax = std::max(Tmax, T);
  const double e = elem, dk = double(cfg.dk), dv = double(cfg.dv);
  MemoryUse m;
  m.result = e * N * double(cfg.Hq) * (dv + 1);  // o [N, Hq, dv], lse [N, Hq]
  if (path == Path::Oracle) {
    m.working = (16.0 + e) * double(Tmax);  // key/value row pointers and scores of one query
    return m;
  }
  // A tile per thread: queries, outputs, lse, running max and sum [R, dk + dv + 3] and the chunk
  // scores [R, kKeyChunk]; and the tile list.
  const double R = double(kTileQueries) * double(cfg.G());
  m.working = threads * (e * R * (dk + dv + 3 + double(kKeyChunk)) + kGemmBuffers) +
              32.0 * (N / double(kTileQueries) + double(seqlens.size())) * double(cfg.Hkv);
  return m;
}

template ForwardResult<double> forward<double>(const Config&, const Inputs<double>&, Path);
template ForwardResult<float> forward<float>(const Config&, const Inputs<float>&, Path);
template FullResult<double> full_attention<double>(const Config&, const Tensor<double>&, const Tensor<double>&,
                                                   const Tensor<double>&, const std::vector<int64_t>&, Path);
template FullResult<float> full_attention<float>(const Config&, const Tensor<float>&, const Tensor<float>&,
                                                 const Tensor<float>&, const std::vector<int64_t>&, Path);

}  // namespace nsa::ref
