// The fast path of the NSA backward pass and of full attention's (docs/spec.md 7), and the entry
// points of both paths.
//
// Tiles are the forward's (forward.cpp): the G query heads of a group for Bq positions as the rows
// of one matrix. A query row's gradient (dq) belongs to its tile. A key's gradient gathers
// contributions from many tiles (the selection's in particular scatter to blocks anywhere in the
// past), so the positions of each (sequence, group) are cut into a fixed number of chunks of
// consecutive tiles; a chunk runs its tiles in order and adds into dK/dV buffers of its own, and
// the buffers are then summed in chunk order. The chunks depend on the shapes only, so results
// are bitwise independent of the thread count.
//
// Per tile and branch, with the forward's lse and branch output kept (no softmax is redone):
//   P  = exp(s Q K^T - lse)  (masked to the keys each row sees),  dP = dO_c V^T,
//   dS = s P * (dP - D) with D = rowsum(dO_c * O_c),
//   dQ += dS K,   dK += dS^T Q,   dV += P^T dO_c:
// five products per key against the forward's two.
//   compression: all visible compressed keys at once (the forward's P matrix, capped in size);
//   selection:   per position, the group's selected tokens gathered as in the forward, their
//                gradients added back to the chunk's buffer block by block;
//   window, full: chunks of kKeyChunk keys.
#include <omp.h>

#include <algorithm>
#include <cmath>

#include "common.hpp"
#include "nsa_ref.hpp"
#include "oracle.hpp"

namespace nsa::ref {

namespace {

constexpr int64_t kTileQueries = 64;    // Bq: query positions per tile, as in the forward
constexpr int64_t kKeyChunk = 256;      // keys per step of the window and full attention
constexpr double kCmpTileBytes = 32e6;  // cap on a tile's compression P (and dP) matrix
// Chunks in all (over sequences and groups): enough to keep 16 or more cores busy with a dynamic
// schedule, few enough that the partial buffers stay small (each holds at most the prefix of its
// sequence: at T = 16k, dk = dv = 64, Hkv = 1, 32 chunks hold 270 MB in double at the most).
constexpr int64_t kTargetChunks = 32;

template <class S>
Tensor<S> zeros_like(const Tensor<S>& t) {
  return t.empty() ? Tensor<S>() : Tensor<S>(t.shape());
}

// A chunk's partial dL/dK and dL/dV of one branch in one group: rows [k0, k0 + dK.rows()) of the
// branch's keys of the sequence (compressed keys for the compression branch).
template <class S>
struct KvGrad {
  int64_t k0 = 0;
  Mat<S> dK, dV;
  void init(int64_t lo, int64_t hi, int64_t dk, int64_t dv) {
    k0 = lo;
    dK.setZero(std::max<int64_t>(hi - lo, 0), dk);
    dV.setZero(std::max<int64_t>(hi - lo, 0), dv);
  }
};

// Positions [t0, t1) of sequence b, group g; its tiles run in order with one set of buffers.
struct Chunk {
  int64_t b, g, t0, t1;
};

// The fixed cut of every (sequence, group) into chunks of whole tiles of Bq positions, in the
// order (sequence, group, position).
std::vector<Chunk> make_chunks(const std::vector<int64_t>& cu, int64_t Hkv, int64_t Bq) {
  int64_t seqs = 0;
  for (size_t b = 0; b + 1 < cu.size(); ++b) seqs += cu[b + 1] > cu[b];
  const int64_t per = std::max<int64_t>(1, (kTargetChunks + seqs * Hkv - 1) / std::max<int64_t>(seqs * Hkv, 1));
  std::vector<Chunk> chunks;
  for (size_t b = 0; b + 1 < cu.size(); ++b) {
    const int64_t T = cu[b + 1] - cu[b], tiles = (T + Bq - 1) / Bq, n = std::min(per, tiles);
    for (int64_t g = 0; g < Hkv; ++g)
      for (int64_t k = 0; k < n; ++k)
        chunks.push_back({int64_t(b), g, std::min(T, k * tiles / n * Bq), std::min(T, (k + 1) * tiles / n * Bq)});
  }
  return chunks;
}

// Adds the chunks' buffers into the gradient rows of one group: row u of the sequence is at
// out + u * stride (dK) and out_v + u * stride_v (dV). Every row takes its chunks in chunk order.
template <class S>
void reduce_chunks(const std::vector<const KvGrad<S>*>& parts, int64_t rows, S* out_k, int64_t stride_k, S* out_v,
                   int64_t stride_v) {
  constexpr int64_t kRowBlock = 256;
#pragma omp parallel for schedule(static)
  for (int64_t r0 = 0; r0 < rows; r0 += kRowBlock) {
    const int64_t r1 = std::min(rows, r0 + kRowBlock);
    for (const KvGrad<S>* p : parts) {
      const int64_t a = std::max(r0, p->k0), b = std::min(r1, p->k0 + int64_t(p->dK.rows()));
      for (int64_t u = a; u < b; ++u) {
        Eigen::Map<Eigen::Matrix<S, 1, Eigen::Dynamic>>(out_k + u * stride_k, p->dK.cols()) += p->dK.row(u - p->k0);
        Eigen::Map<Eigen::Matrix<S, 1, Eigen::Dynamic>>(out_v + u * stride_v, p->dV.cols()) += p->dV.row(u - p->k0);
      }
    }
  }
}

// One branch's view of the tile's rows: the gradient of its output and the forward's statistics.
template <class S>
struct BranchRows {
  Mat<S> dO;   // [R, dv]  dO_c = g_c dL/do
  Vec<S> D;    // [R]      dO_c . O_c
  Vec<S> lse;  // [R]      the forward's log-sum-exp
};

// dS = s P (dP - D) in place of dP, and P = exp(S - lse) in place of the scores S, for the keys
// [a, b) of row r; zeros elsewhere (keys the row does not see). Whole segments, so that Eigen's
// vectorised exp is used (a scalar exp per entry made the backward pass ~20% slower).
template <class S, class Row>
void softmax_backward_row(Row srow, Row dprow, int64_t a, int64_t b, S lse, S D, S scale) {
  const int64_t n = srow.size();
  b = std::max(a, b);
  srow.head(a).setZero();
  dprow.head(a).setZero();
  srow.tail(n - b).setZero();
  dprow.tail(n - b).setZero();
  auto p = srow.segment(a, b - a).array();
  p = (p - lse).exp();
  dprow.segment(a, b - a).array() = scale * p * (dprow.segment(a, b - a).array() - D);
}

// Backward of the tile's softmax attention over the keys [lo(t), t] of one head (the forward's
// attend_causal_range), in chunks of kKeyChunk keys. Qs = s Q. K, V point at the head's first row
// of the sequence (row strides ks, vs). Adds into dQ [R, dk] and into buf, which covers
// [lo(t0), t1).
template <class S, class Lo>
void attend_range_backward(const Mat<S>& Q, const Mat<S>& Qs, const BranchRows<S>& br, const TileRows& tr, Lo lo,
                           const S* K, int64_t ks, const S* V, int64_t vs, S scale, Mat<S>& dQ, KvGrad<S>& buf) {
  const int64_t R = tr.rows(), dk = Q.cols(), dv = br.dO.cols();
  const int64_t first = lo(tr.t0), last = tr.t1;
  Mat<S> P, dS;
  for (int64_t c0 = first; c0 < last; c0 += kKeyChunk) {
    const int64_t bk = std::min(kKeyChunk, last - c0);
    Eigen::Map<const Mat<S>, 0, Eigen::OuterStride<>> Kc(K + c0 * ks, bk, dk, Eigen::OuterStride<>(ks));
    Eigen::Map<const Mat<S>, 0, Eigen::OuterStride<>> Vc(V + c0 * vs, bk, dv, Eigen::OuterStride<>(vs));
    P.noalias() = Qs * Kc.transpose();
    dS.noalias() = br.dO * Vc.transpose();
    for (int64_t r = 0; r < R; ++r) {
      const int64_t t = tr.pos(r);
      const int64_t a = std::max(lo(t), c0) - c0, b = std::min(t + 1, c0 + bk) - c0;
      softmax_backward_row<S>(P.row(r), dS.row(r), a, b, br.lse[r], br.D[r], scale);
    }
    dQ.noalias() += dS * Kc;
    buf.dK.middleRows(c0 - buf.k0, bk).noalias() += dS.transpose() * Q;
    buf.dV.middleRows(c0 - buf.k0, bk).noalias() += P.transpose() * br.dO;
  }
}

// dq rows of the tile: its own, written once.
template <class S>
void scatter_dq(const Mat<S>& dQ, int64_t row0, const TileRows& tr, int64_t g, Tensor<S>& dq) {
  for (int64_t t = tr.t0; t < tr.t1; ++t)
    Eigen::Map<Mat<S>>(dq.row(row0 + t, g * tr.G), tr.G, dQ.cols()) = dQ.middleRows((t - tr.t0) * tr.G, tr.G);
}

// The tile's rows of branch c: dO_c = g_c dL/do, D = g_c <dL/do, O_c> = g_c dL/dg_c, and the lse.
template <class S>
BranchRows<S> branch_rows(const Mat<S>& dOt, const Tensor<S>& gates, const Tensor<S>& dgates,
                          const Tensor<S>& lse, int c, int64_t row0, const TileRows& tr, int64_t g) {
  const int64_t R = tr.rows(), G = tr.G;
  BranchRows<S> br{dOt, Vec<S>(R), Vec<S>(R)};
  for (int64_t r = 0; r < R; ++r) {
    const int64_t row = row0 + tr.pos(r), h = g * G + r % G;
    const S gc = gates(row, h, c);
    br.dO.row(r) *= gc;
    br.D[r] = gc * dgates(row, h, c);
    br.lse[r] = lse(row, h);
  }
  return br;
}

// The three branches' backward for one tile; dq is written, key gradients go to the chunk's
// buffers kv[c].
template <class S>
void nsa_tile_backward(const Config& cfg, const Inputs<S>& in, const ForwardResult<S>& fwd, const Tensor<S>& dO,
                       const TileRows& tr, int64_t g, int64_t row0, int64_t cmp0, BackwardResult<S>& r,
                       std::array<KvGrad<S>, kBranches>& kv) {
  const int64_t Hkv = cfg.Hkv, G = cfg.G(), dk = cfg.dk, dv = cfg.dv, ls = cfg.slc_len;
  const S scale = static_cast<S>(cfg.softmax_scale());
  const Mat<S> Q = gather_queries(in.q, row0, tr, g, dk);
  // The scores as (s Q) K^T: Eigen writes a plain product straight into its destination, but
  // evaluates (Q K^T) s into a fresh temporary first (MBs per call, page faults included); the
  // plain product made the backward pass ~12% faster.
  const Mat<S> Qs = Q * scale;
  const Mat<S> dOt = gather_queries(dO, row0, tr, g, dv);
  Mat<S> dQ = Mat<S>::Zero(tr.rows(), dk);
  Mat<S> P, dS;

  // ---- Compression branch: every visible compressed key at once ----
  const int64_t nvmax = cfg.cmp_visible(tr.t1 - 1);
  if (nvmax > 0) {
    const BranchRows<S> br = branch_rows(dOt, fwd.gates, r.dgates, fwd.lse[0], 0, row0, tr, g);
    auto Kc = head_rows(fwd.k_cmp_compressed.data() + cmp0 * Hkv * dk, Hkv, dk, g, 0, nvmax);
    auto Vc = head_rows(fwd.v_cmp_compressed.data() + cmp0 * Hkv * dv, Hkv, dv, g, 0, nvmax);
    P.noalias() = Qs * Kc.transpose();
    dS.noalias() = br.dO * Vc.transpose();
    for (int64_t rr = 0; rr < tr.rows(); ++rr)
      softmax_backward_row<S>(P.row(rr), dS.row(rr), 0, cfg.cmp_visible(tr.pos(rr)), br.lse[rr], br.D[rr], scale);
    dQ.noalias() += dS * Kc;
    kv[0].dK.topRows(nvmax).noalias() += dS.transpose() * Q;
    kv[0].dV.topRows(nvmax).noalias() += P.transpose() * br.dO;
  }

  // ---- Selection branch: per position, the group's selected tokens u <= t (held fixed) ----
  {
    const BranchRows<S> br = branch_rows(dOt, fwd.gates, r.dgates, fwd.lse[1], 1, row0, tr, g);
    const Tensor<S>& Ks = in.key(Branch::Slc);
    const Tensor<S>& Vs = in.value(Branch::Slc);
    Mat<S> Kg, Vg, dKg, dVg;
    std::vector<int32_t> sel;
    for (int64_t t = tr.t0; t < tr.t1; ++t) {
      sel.clear();
      for (int64_t m = 0; m < cfg.slc_count; ++m)
        if (fwd.block_idx(row0 + t, g, m) >= 0) sel.push_back(fwd.block_idx(row0 + t, g, m));
      int64_t cnt = 0;
      for (int32_t j : sel) cnt += std::min((j + 1) * ls, t + 1) - j * ls;
      Kg.resize(cnt, dk);
      Vg.resize(cnt, dv);
      int64_t m = 0;
      for (int32_t j : sel) {
        const int64_t u0 = j * ls, len = std::min((j + 1) * ls, t + 1) - u0;
        Kg.middleRows(m, len) = head_rows(Ks.data(), Hkv, dk, g, row0 + u0, len);
        Vg.middleRows(m, len) = head_rows(Vs.data(), Hkv, dv, g, row0 + u0, len);
        m += len;
      }
      const int64_t r0 = (t - tr.t0) * G;
      P.noalias() = Qs.middleRows(r0, G) * Kg.transpose();
      dS.noalias() = br.dO.middleRows(r0, G) * Vg.transpose();
      for (int64_t hi = 0; hi < G; ++hi)
        softmax_backward_row<S>(P.row(hi), dS.row(hi), 0, cnt, br.lse[r0 + hi], br.D[r0 + hi], scale);
      dQ.middleRows(r0, G).noalias() += dS * Kg;
      dKg.noalias() = dS.transpose() * Q.middleRows(r0, G);
      dVg.noalias() = P.transpose() * br.dO.middleRows(r0, G);
      m = 0;
      for (int32_t j : sel) {  // kv[1] covers the sequence's keys [0, chunk end)
        const int64_t u0 = j * ls, len = std::min((j + 1) * ls, t + 1) - u0;
        kv[1].dK.middleRows(u0, len) += dKg.middleRows(m, len);
        kv[1].dV.middleRows(u0, len) += dVg.middleRows(m, len);
        m += len;
      }
    }
  }

  // ---- Sliding window: keys [max(0, t-w+1), t] ----
  {
    const BranchRows<S> br = branch_rows(dOt, fwd.gates, r.dgates, fwd.lse[2], 2, row0, tr, g);
    const Tensor<S>& Kw = in.key(Branch::Win);
    const Tensor<S>& Vw = in.value(Branch::Win);
    attend_range_backward(
        Q, Qs, br, tr, [&](int64_t t) { return cfg.win_start(t); }, Kw.row(row0, g), Hkv * dk, Vw.row(row0, g), Hkv * dv,
        scale, dQ, kv[2]);
  }
  scatter_dq(dQ, row0, tr, g, r.dq);
}

template <class S>
void backward_fast(const Config& cfg, const Inputs<S>& in, const ForwardResult<S>& fwd, const Tensor<S>& dO,
                   const std::vector<int64_t>& cu, BackwardResult<S>& r) {
  const int64_t N = in.N(), Hq = cfg.Hq, Hkv = cfg.Hkv, dk = cfg.dk, dv = cfg.dv;
  // Section 7: dL/dg_c = <dL/do, O_c>; the tiles need it for D.
#pragma omp parallel for schedule(static)
  for (int64_t t = 0; t < N; ++t)
    for (int64_t h = 0; h < Hq; ++h)
      for (int c = 0; c < kBranches; ++c) {
        Eigen::Map<const Vec<S>> d(dO.row(t, h), dv), o(fwd.o_branch[c].row(t, h), dv);
        r.dgates(t, h, c) = d.dot(o);
      }

  const int64_t B = int64_t(cu.size()) - 1;
  int64_t Tmax = 0;
  for (int64_t b = 0; b < B; ++b) Tmax = std::max(Tmax, cu[b + 1] - cu[b]);
  const double per_query = double(cfg.G()) * double(std::max<int64_t>(cfg.num_cmp_blocks(Tmax), 1)) * sizeof(S);
  const int64_t Bq = std::clamp<int64_t>(int64_t(kCmpTileBytes / per_query), 1, kTileQueries);
  const std::vector<Chunk> chunks = make_chunks(cu, Hkv, Bq);
  const int64_t nch = int64_t(chunks.size());
  std::vector<std::array<KvGrad<S>, kBranches>> parts(static_cast<size_t>(nch));
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t i = nch - 1; i >= 0; --i) {  // later chunks see more compressed keys: start them first
    const Chunk& ch = chunks[size_t(i)];
    auto& kv = parts[size_t(i)];
    kv[0].init(0, cfg.cmp_visible(ch.t1 - 1), dk, dv);
    kv[1].init(0, ch.t1, dk, dv);
    kv[2].init(cfg.win_start(ch.t0), ch.t1, dk, dv);
    for (int64_t t0 = ch.t0; t0 < ch.t1; t0 += Bq)
      nsa_tile_backward(cfg, in, fwd, dO, TileRows{t0, std::min(ch.t1, t0 + Bq), cfg.G()}, ch.g, cu[ch.b],
                        fwd.cu_cmp[ch.b], r, kv);
  }
  // Every (sequence, group): its chunks' buffers, summed in chunk order.
  for (int64_t i = 0; i < nch;) {
    const Chunk& first = chunks[size_t(i)];
    int64_t e = i;
    while (e < nch && chunks[size_t(e)].b == first.b && chunks[size_t(e)].g == first.g) ++e;
    const int64_t row0 = cu[first.b], T = cu[first.b + 1] - row0, g = first.g;
    for (int c = 0; c < kBranches; ++c) {
      std::vector<const KvGrad<S>*> ps;
      for (int64_t k = i; k < e; ++k) ps.push_back(&parts[size_t(k)][c]);
      if (c == 0) {
        const int64_t c0 = fwd.cu_cmp[first.b];
        reduce_chunks(ps, fwd.cu_cmp[first.b + 1] - c0, r.dk_cmp_compressed.row(c0, g), Hkv * dk,
                      r.dv_cmp_compressed.row(c0, g), Hkv * dv);
      } else {
        reduce_chunks(ps, T, r.dk_branch[c].row(row0, g), Hkv * dk, r.dv_branch[c].row(row0, g), Hkv * dv);
      }
    }
    i = e;
  }
  // Through phi (Eq. 7), sequence by sequence so the parameters' sums have a fixed order.
  for (int64_t b = 0; b < B; ++b) {
    const int64_t T = cu[b + 1] - cu[b];
    phi_backward(cfg, in.key(Branch::Cmp).row(cu[b], 0), T, dk, in.phi.k, cfg.hidden_k(),
                      r.dk_cmp_compressed.row(fwd.cu_cmp[b], 0), r.dk_branch[0].row(cu[b], 0), r.dphi.k, Path::Fast);
    phi_backward(cfg, in.value(Branch::Cmp).row(cu[b], 0), T, dv, in.phi.v, cfg.hidden_v(),
                      r.dv_cmp_compressed.row(fwd.cu_cmp[b], 0), r.dv_branch[0].row(cu[b], 0), r.dphi.v, Path::Fast);
  }
}

// The gate MLP's backward as products (the oracle's loops in oracle_gate_mlp_backward):
// dZ = dg g (1 - g); dW = hid^T dZ, db = colsum dZ, dhid = dZ W^T; with the hidden layer
// da = dhid act'(a), dW0 = x^T da, db0 = colsum da, dx = da W0^T, else dx = dhid.
template <class S>
void gate_mlp_backward_fast(const Config& cfg, const GateMlp<S>& m, const Tensor<S>& gates, BackwardResult<S>& r) {
  using RowV = Eigen::Matrix<S, 1, Eigen::Dynamic>;
  const int64_t N = m.x.dim(0), dm = m.x.dim(1), Z = 3 * cfg.Hq;
  Eigen::Map<const Mat<S>> X(m.x.data(), N, dm), W(m.w.data(), m.w.dim(0), Z), g(gates.data(), N, Z),
      dg(r.dgates.data(), N, Z);
  const Mat<S> dZ = dg.array() * g.array() * (S(1) - g.array());
  GateMlpGrads<S>& d = r.dgate_mlp;
  d.x = Tensor<S>({N, dm});
  d.w = Tensor<S>({m.w.dim(0), Z});
  d.b = Tensor<S>({Z});
  Eigen::Map<RowV>(d.b.data(), Z) = dZ.colwise().sum();
  const Mat<S> dHid = dZ * W.transpose();
  if (m.w0.empty()) {
    Eigen::Map<Mat<S>>(d.w.data(), dm, Z).noalias() = X.transpose() * dZ;
    Eigen::Map<Mat<S>>(d.x.data(), N, dm) = dHid;
    return;
  }
  const int64_t dh = m.w0.dim(1);
  Eigen::Map<const Mat<S>> W0(m.w0.data(), dm, dh);
  Mat<S> A = X * W0;
  A.rowwise() += Eigen::Map<const RowV>(m.b0.data(), dh);
  const Mat<S> Hid = A.unaryExpr([a = m.act](S z) { return activate(a, z); });
  Eigen::Map<Mat<S>>(d.w.data(), dh, Z).noalias() = Hid.transpose() * dZ;
  const Mat<S> dA = dHid.array() * A.unaryExpr([a = m.act](S z) { return activate_grad(a, z); }).array();
  d.w0 = Tensor<S>({dm, dh});
  d.b0 = Tensor<S>({dh});
  Eigen::Map<Mat<S>>(d.w0.data(), dm, dh).noalias() = X.transpose() * dA;
  Eigen::Map<RowV>(d.b0.data(), dh) = dA.colwise().sum();
  Eigen::Map<Mat<S>>(d.x.data(), N, dm).noalias() = dA * W0.transpose();
}

template <class S>
PhiParams<S> zeros_like(const PhiParams<S>& p) {
  return {zeros_like(p.pe), zeros_like(p.w), zeros_like(p.b), zeros_like(p.w1),
          zeros_like(p.b1), zeros_like(p.w2), zeros_like(p.b2)};
}

}  // namespace

template <class S>
void check_output_grad(const Config& cfg, const Inputs<S>& in, const Tensor<S>& dO, bool allow_nonfinite,
                       const RoleNamer& namer) {
  const std::string name = namer ? namer("do") : "do";
  const Shape want{in.N(), cfg.Hq, cfg.dv};
  if (dO.shape() != want)
    throw InputError(cat(name, ": shape ", shape_str(dO.shape()), ", expected ", shape_str(want),
                         " ([N, Hq, dv], dL/do for the output o)"));
  if (allow_nonfinite) return;
  for (int64_t i = 0; i < dO.numel(); ++i)
    if (!std::isfinite(dO[i]))
      throw InputError(cat(name, ": non-finite value ", dO[i], " at flat index ", i,
                           " (pass --allow-nonfinite to let NaN/Inf through)"));
}

template <class S>
BackwardResult<S> backward(const Config& cfg, const Inputs<S>& in, const ForwardResult<S>& fwd, const Tensor<S>& dO,
                           Path path) {
  const std::vector<int64_t> cu = in.seqlens_or_single();
  const int64_t N = in.N();
  BackwardResult<S> r;
  r.dq = Tensor<S>({N, cfg.Hq, cfg.dk});
  for (int c = 0; c < kBranches; ++c) {
    r.dk_branch[c] = Tensor<S>({N, cfg.Hkv, cfg.dk});
    r.dv_branch[c] = Tensor<S>({N, cfg.Hkv, cfg.dv});
  }
  r.dgates = Tensor<S>({N, cfg.Hq, 3});
  r.dphi = {zeros_like(in.phi.k), zeros_like(in.phi.v)};
  r.dk_cmp_compressed = zeros_like(fwd.k_cmp_compressed);
  r.dv_cmp_compressed = zeros_like(fwd.v_cmp_compressed);
  const bool gate_mlp = in.gates.empty() && in.gate_mlp.given();  // as compute_gates decides
  if (path == Path::Oracle) {
    for (size_t b = 0; b + 1 < cu.size(); ++b)
      oracle_backward_seq(cfg, in, fwd, dO, cu[b], cu[b + 1] - cu[b], fwd.cu_cmp[b], r);
    if (gate_mlp) oracle_gate_mlp_backward(cfg, in.gate_mlp, fwd.gates, r);
  } else {
    backward_fast(cfg, in, fwd, dO, cu, r);
    if (gate_mlp) gate_mlp_backward_fast(cfg, in.gate_mlp, fwd.gates, r);
  }
  // The shared k and v collect the gradients of every branch that reads them.
  for (int c = 0; c < kBranches; ++c) {
    auto add = [](Tensor<S>& sum, const Tensor<S>& part) {
      if (sum.empty()) {
        sum = part;
        return;
      }
      for (int64_t i = 0; i < sum.numel(); ++i) sum[i] += part[i];
    };
    if (in.k_own[c].empty()) add(r.dk, r.dk_branch[c]);
    if (in.v_own[c].empty()) add(r.dv, r.dv_branch[c]);
  }
  return r;
}

template <class S>
FullGrads<S> full_attention_backward(const Config& cfg, const Tensor<S>& q, const Tensor<S>& k, const Tensor<S>& v,
                                     const FullResult<S>& fwd, const Tensor<S>& dO,
                                     const std::vector<int64_t>& cu_in, Path path) {
  const int64_t N = q.dim(0), Hkv = cfg.Hkv, dk = cfg.dk, dv = cfg.dv, G = cfg.G();
  const std::vector<int64_t> cu = cu_in.empty() ? std::vector<int64_t>{0, N} : cu_in;
  FullGrads<S> r{Tensor<S>({N, cfg.Hq, dk}), Tensor<S>({N, Hkv, dk}), Tensor<S>({N, Hkv, dv})};
  if (path == Path::Oracle) {
    for (size_t b = 0; b + 1 < cu.size(); ++b) oracle_full_backward_seq(cfg, q, k, v, dO, cu[b], cu[b + 1] - cu[b], r);
    return r;
  }
  const S scale = static_cast<S>(cfg.softmax_scale());
  const std::vector<Chunk> chunks = make_chunks(cu, Hkv, kTileQueries);
  const int64_t nch = int64_t(chunks.size());
  std::vector<KvGrad<S>> parts(static_cast<size_t>(nch));
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t i = nch - 1; i >= 0; --i) {  // later chunks see more keys: start them first
    const Chunk& ch = chunks[size_t(i)];
    const int64_t row0 = cu[ch.b];
    parts[size_t(i)].init(0, ch.t1, dk, dv);
    for (int64_t t0 = ch.t0; t0 < ch.t1; t0 += kTileQueries) {
      const TileRows tr{t0, std::min(ch.t1, t0 + kTileQueries), G};
      const Mat<S> Q = gather_queries(q, row0, tr, ch.g, dk);
      const Mat<S> Qs = Q * scale;
      BranchRows<S> br{gather_queries(dO, row0, tr, ch.g, dv), Vec<S>(tr.rows()), Vec<S>(tr.rows())};
      const Mat<S> O = gather_queries(fwd.o, row0, tr, ch.g, dv);
      for (int64_t rr = 0; rr < tr.rows(); ++rr) {
        br.D[rr] = br.dO.row(rr).dot(O.row(rr));
        br.lse[rr] = fwd.lse(row0 + tr.pos(rr), ch.g * G + rr % G);
      }
      Mat<S> dQ = Mat<S>::Zero(tr.rows(), dk);
      attend_range_backward(
          Q, Qs, br, tr, [](int64_t) { return int64_t(0); }, k.row(row0, ch.g), Hkv * dk, v.row(row0, ch.g), Hkv * dv,
          scale, dQ, parts[size_t(i)]);
      scatter_dq(dQ, row0, tr, ch.g, r.dq);
    }
  }
  for (int64_t i = 0; i < nch;) {
    int64_t e = i;
    while (e < nch && chunks[size_t(e)].b == chunks[size_t(i)].b && chunks[size_t(e)].g == chunks[size_t(i)].g) ++e;
    std::vector<const KvGrad<S>*> ps;
    for (int64_t j = i; j < e; ++j) ps.push_back(&parts[size_t(j)]);
    const Chunk& ch = chunks[size_t(i)];
    reduce_chunks(ps, cu[ch.b + 1] - cu[ch.b], r.dk.row(cu[ch.b], ch.g), Hkv * dk, r.dv.row(cu[ch.b], ch.g), Hkv * dv);
    i = e;
  }
  return r;
}

template void check_output_grad<double>(const Config&, const Inputs<double>&, const Tensor<double>&, bool,
                                        const RoleNamer&);
template void check_output_grad<float>(const Config&, const Inputs<float>&, const Tensor<float>&, bool,
                                       const RoleNamer&);
template BackwardResult<double> backward<double>(const Config&, const Inputs<double>&, const ForwardResult<double>&,
                                                 const Tensor<double>&, Path);
template BackwardResult<float> backward<float>(const Config&, const Inputs<float>&, const ForwardResult<float>&,
                                               const Tensor<float>&, Path);
template FullGrads<double> full_attention_backward<double>(const Config&, const Tensor<double>&,
                                                           const Tensor<double>&, const Tensor<double>&,
                                                           const FullResult<double>&, const Tensor<double>&,
                                                           const std::vector<int64_t>&, Path);
template FullGrads<float> full_attention_backward<float>(const Config&, const Tensor<float>&, const Tensor<float>&,
                                                         const Tensor<float>&, const FullResult<float>&,
                                                         const Tensor<float>&, const std::vector<int64_t>&, Path);

}  // namespace nsa::ref
