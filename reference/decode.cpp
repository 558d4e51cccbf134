// Decoding with a KV cache (docs/spec.md 8); the layout is described in decode.hpp.
//
// A step is the forward pass of one query position computed from the cache alone, with the same
// stages (compress, overlap_map, select_blocks, compute_gates) and the order of forward.cpp's
// tile where it matters for the selection: the probabilities of the compressed blocks, Eq. 9
// summed over the blocks ascending, Eq. 10 over the group's heads ascending. So the block scores
// agree with the prefill to round-off and the selections are the same blocks. Work is split over
// (sequence, KV group) items: the G heads of a group share one gather of the selected rows.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <numeric>

#include "common.hpp"
#include "decode.hpp"

namespace nsa::ref {

template <class S>
KvSharing kv_sharing(const Inputs<S>& in) {
  const int c = int(Branch::Cmp), s = int(Branch::Slc), w = int(Branch::Win);
  KvSharing sh;
  sh.cmp_k = in.k_own[c].empty() && in.k_own[s].empty();
  sh.cmp_v = in.v_own[c].empty() && in.v_own[s].empty();
  sh.win_k = in.k_own[w].empty() && in.k_own[s].empty();
  sh.win_v = in.v_own[w].empty() && in.v_own[s].empty();
  return sh;
}

template <class S>
DecodeCache<S> make_cache(const Config& cfg, const KvSharing& share, int64_t B, int64_t capacity) {
  cfg.validate();
  if (B < 0 || capacity < 0)
    throw ConfigError(cat("decode cache: B = ", B, " sequences and capacity = ", capacity, " tokens must be >= 0"));
  DecodeCache<S> c;
  c.cfg = cfg;
  c.share = share;
  c.capacity = capacity;
  c.len.assign(static_cast<size_t>(B), 0);
  const int64_t H = cfg.Hkv, dk = cfg.dk, dv = cfg.dv;
  const int64_t Nc = c.cmp_rows(), L = c.tail_rows(), W = c.win_rows();
  c.k_cmp = Tensor<S>({B, Nc, H, dk});
  c.v_cmp = Tensor<S>({B, Nc, H, dv});
  if (!share.cmp_k) c.k_tail = Tensor<S>({B, L, H, dk});
  if (!share.cmp_v) c.v_tail = Tensor<S>({B, L, H, dv});
  c.k_slc = Tensor<S>({B, capacity, H, dk});
  c.v_slc = Tensor<S>({B, capacity, H, dv});
  if (!share.win_k) c.k_win = Tensor<S>({B, W, H, dk});
  if (!share.win_v) c.v_win = Tensor<S>({B, W, H, dv});
  return c;
}

namespace {

// A step runs its (sequence, group) items on several threads above this many multiply-adds
// (about keys seen * Hq * (dk + dv)).
constexpr double kParallelFlops = 2e6;

// The cache sequences a call addresses: `seqs`, or all B in order; checked to be distinct and in
// range, and to match the `count` sequences (or rows) of the inputs.
template <class S>
std::vector<int64_t> resolve_seqs(const DecodeCache<S>& cache, const std::vector<int64_t>& seqs, int64_t count,
                                  const char* what) {
  std::vector<int64_t> out = seqs;
  if (out.empty()) {
    out.resize(static_cast<size_t>(cache.B()));
    std::iota(out.begin(), out.end(), 0);
  }
  if (int64_t(out.size()) != count)
    throw InputError(cat(what, ": the inputs hold ", count, " sequence(s) but ", out.size(),
                         " cache sequence(s) are addressed (B = ", cache.B(), ")"));
  std::vector<char> seen(static_cast<size_t>(cache.B()), 0);
  for (int64_t b : out) {
    if (b < 0 || b >= cache.B()) throw InputError(cat(what, ": sequence ", b, " is not in the cache (B = ", cache.B(), ")"));
    if (seen[static_cast<size_t>(b)]++) throw InputError(cat(what, ": sequence ", b, " is addressed twice"));
  }
  return out;
}

template <class S>
void check_sharing(const DecodeCache<S>& cache, const Inputs<S>& in, const char* what) {
  const KvSharing s = kv_sharing(in);
  if (s != cache.share)
    throw InputError(cat(what, ": the inputs' per-branch keys/values (cmp k/v shared: ", s.cmp_k, "/", s.cmp_v,
                         ", win k/v shared: ", s.win_k, "/", s.win_v, ") differ from the cache's (", cache.share.cmp_k,
                         "/", cache.share.cmp_v, ", ", cache.share.win_k, "/", cache.share.win_v, ")"));
}

template <class S>
void check_room(const DecodeCache<S>& cache, int64_t b, int64_t add, const char* what) {
  if (cache.len[static_cast<size_t>(b)] + add > cache.capacity)
    throw ResourceError(cat(what, ": sequence ", b, " holds ", cache.len[static_cast<size_t>(b)], " tokens; ", add,
                            " more exceed the cache's capacity of ", cache.capacity));
}

template <class S>
S* row_of(Tensor<S>& t, int64_t b, int64_t rows, int64_t r, int64_t row_len) {
  return t.data() + (b * rows + r) * row_len;
}

// Stores the raw rows of tokens [s0, s0 + T) of sequence b, taken from rows [r0, r0 + T) of `in`:
// the history always, the rings where a branch keeps its own (only the tokens they retain).
template <class S>
void store_raw(DecodeCache<S>& c, const Inputs<S>& in, int64_t b, int64_t s0, int64_t r0, int64_t T) {
  const Config& cfg = c.cfg;
  const int64_t rk = cfg.Hkv * cfg.dk, rv = cfg.Hkv * cfg.dv, l = cfg.cmp_len, w = cfg.window;
  auto put = [](const S* src, int64_t n, S* dst) { std::copy(src, src + n, dst); };
  for (int64_t i = 0; i < T; ++i) {
    const int64_t u = s0 + i, r = r0 + i;
    put(in.key(Branch::Slc).row(r, 0), rk, row_of(c.k_slc, b, c.capacity, u, rk));
    put(in.value(Branch::Slc).row(r, 0), rv, row_of(c.v_slc, b, c.capacity, u, rv));
    if (u >= s0 + T - l) {
      if (!c.share.cmp_k) put(in.key(Branch::Cmp).row(r, 0), rk, row_of(c.k_tail, b, c.tail_rows(), u % l, rk));
      if (!c.share.cmp_v) put(in.value(Branch::Cmp).row(r, 0), rv, row_of(c.v_tail, b, c.tail_rows(), u % l, rv));
    }
    if (u >= s0 + T - w) {
      if (!c.share.win_k) put(in.key(Branch::Win).row(r, 0), rk, row_of(c.k_win, b, c.win_rows(), u % w, rk));
      if (!c.share.win_v) put(in.value(Branch::Win).row(r, 0), rv, row_of(c.v_win, b, c.win_rows(), u % w, rv));
    }
  }
}

// Appends tokens [s0, s0 + T) of sequence b (rows [r0, r0 + T) of `in`) and emits the compressed
// rows Nc(s0) .. Nc(s0 + T) - 1 they complete (Eq. 7). Block i0 = Nc(s0) starts at a = i0*d, and
// s0 - l < a <= s0 (it is not complete at s0, and d <= l), so its rows before s0 are in the tail:
// they are gathered before the new rows overwrite the ring, then phi runs once on [a, s0 + T).
// Returns the number of compressed rows emitted.
template <class S>
int64_t append_seq(DecodeCache<S>& c, const Inputs<S>& in, int64_t b, int64_t r0, int64_t T) {
  const Config& cfg = c.cfg;
  const int64_t H = cfg.Hkv, s0 = c.len[static_cast<size_t>(b)], s1 = s0 + T;
  const int64_t i0 = cfg.num_cmp_blocks(s0), i1 = cfg.num_cmp_blocks(s1), a = i0 * cfg.cmp_stride;
  std::vector<S> kbuf, vbuf;
  if (i1 > i0) {
    kbuf.resize(static_cast<size_t>((s1 - a) * H * cfg.dk));
    vbuf.resize(static_cast<size_t>((s1 - a) * H * cfg.dv));
    for (int64_t u = a; u < s1; ++u) {
      const bool held = u < s0;
      const S* kr = held ? c.key(Branch::Cmp, b, u) : in.key(Branch::Cmp).row(r0 + u - s0, 0);
      const S* vr = held ? c.value(Branch::Cmp, b, u) : in.value(Branch::Cmp).row(r0 + u - s0, 0);
      std::copy(kr, kr + H * cfg.dk, kbuf.data() + (u - a) * H * cfg.dk);
      std::copy(vr, vr + H * cfg.dv, vbuf.data() + (u - a) * H * cfg.dv);
    }
  }
  store_raw(c, in, b, s0, r0, T);
  c.len[static_cast<size_t>(b)] = s1;
  if (i1 == i0) return 0;
  const Tensor<S> kc = compress(cfg, kbuf.data(), s1 - a, cfg.dk, in.phi.k, cfg.hidden_k(), Path::Fast);
  const Tensor<S> vc = compress(cfg, vbuf.data(), s1 - a, cfg.dv, in.phi.v, cfg.hidden_v(), Path::Fast);
  std::copy(kc.vec().begin(), kc.vec().end(), row_of(c.k_cmp, b, c.cmp_rows(), i0, H * cfg.dk));
  std::copy(vc.vec().begin(), vc.vec().end(), row_of(c.v_cmp, b, c.cmp_rows(), i0, H * cfg.dv));
  return i1 - i0;
}

// In-place row softmax of scores; lse[r] = ln sum exp (the scores are already scaled).
template <class S>
void softmax_rows(Mat<S>& P, S* lse) {
  for (int64_t r = 0; r < P.rows(); ++r) {
    auto row = P.row(r);
    const S mx = row.maxCoeff();
    row = (row.array() - mx).exp();
    const S s = row.sum();
    row /= s;
    lse[r] = mx + std::log(s);
  }
}

// Writes an Eigen-owned result into a tensor's rows. Products go into Eigen's own (aligned)
// matrices first: into a Map over a tensor, Eigen peels scalar iterations up to the first
// aligned address, and the scalar and vector paths round differently (FMA), so results would
// depend on where malloc put the tensor (seen: a window output changing between runs).
template <class S>
void store(const Mat<S>& X, S* dst) {
  Eigen::Map<Mat<S>>(dst, X.rows(), X.cols()) = X;
}

// Softmax attention of the group's G queries over the token rows `us` of one KV head, gathered
// from the cache through `key`/`value` (row pointers [Hkv, D]). Writes O [G, dv] and lse [G].
template <class S, class KeyRow, class ValueRow>
void attend_rows(const Mat<S>& Q, const std::vector<int64_t>& us, KeyRow key, ValueRow value, int64_t g,
                 int64_t dk, int64_t dv, S scale, S* o, S* lse) {
  const int64_t G = Q.rows(), n = int64_t(us.size());
  if (n == 0) {
    std::fill(o, o + G * dv, S(0));
    std::fill(lse, lse + G, neg_inf<S>());
    return;
  }
  Mat<S> K(n, dk), V(n, dv);
  for (int64_t m = 0; m < n; ++m) {
    K.row(m) = Eigen::Map<const Eigen::Matrix<S, 1, Eigen::Dynamic>>(key(us[size_t(m)]) + g * dk, dk);
    V.row(m) = Eigen::Map<const Eigen::Matrix<S, 1, Eigen::Dynamic>>(value(us[size_t(m)]) + g * dv, dv);
  }
  Mat<S> P = (Q * K.transpose()) * scale;
  softmax_rows(P, lse);
  const Mat<S> O = P * V;
  store(O, o);
}

}  // namespace

template <class S>
void append(DecodeCache<S>& cache, const Inputs<S>& in, const std::vector<int64_t>& seqs_in) {
  const std::vector<int64_t> cu = in.seqlens_or_single();
  const std::vector<int64_t> seqs = resolve_seqs(cache, seqs_in, int64_t(cu.size()) - 1, "decode append");
  check_sharing(cache, in, "decode append");
  for (size_t i = 0; i < seqs.size(); ++i) check_room(cache, seqs[i], cu[i + 1] - cu[i], "decode append");
#pragma omp parallel for schedule(dynamic, 1)
  for (size_t i = 0; i < seqs.size(); ++i) append_seq(cache, in, seqs[i], cu[i], cu[i + 1] - cu[i]);
}

template <class S>
ForwardResult<S> prefill(DecodeCache<S>& cache, const Inputs<S>& in, const std::vector<int64_t>& seqs_in, Path path) {
  const std::vector<int64_t> cu = in.seqlens_or_single();
  const std::vector<int64_t> seqs = resolve_seqs(cache, seqs_in, int64_t(cu.size()) - 1, "decode prefill");
  check_sharing(cache, in, "decode prefill");
  for (size_t i = 0; i < seqs.size(); ++i) {
    if (cache.len[static_cast<size_t>(seqs[i])] != 0)
      throw InputError(cat("decode prefill: sequence ", seqs[i], " already holds ", cache.len[size_t(seqs[i])],
                           " tokens (prefill fills empty sequences; append extends held ones)"));
    check_room(cache, seqs[i], cu[i + 1] - cu[i], "decode prefill");
  }
  ForwardResult<S> r = forward(cache.cfg, in, path);
  const int64_t H = cache.cfg.Hkv, dk = cache.cfg.dk, dv = cache.cfg.dv;
  for (size_t i = 0; i < seqs.size(); ++i) {
    const int64_t b = seqs[i], T = cu[i + 1] - cu[i], c0 = r.cu_cmp[i], nc = r.cu_cmp[i + 1] - c0;
    store_raw(cache, in, b, 0, cu[i], T);
    cache.len[static_cast<size_t>(b)] = T;
    std::copy(r.k_cmp_compressed.row(c0, 0), r.k_cmp_compressed.row(c0, 0) + nc * H * dk,
              row_of(cache.k_cmp, b, cache.cmp_rows(), 0, H * dk));
    std::copy(r.v_cmp_compressed.row(c0, 0), r.v_cmp_compressed.row(c0, 0) + nc * H * dv,
              row_of(cache.v_cmp, b, cache.cmp_rows(), 0, H * dv));
  }
  return r;
}

template <class S>
StepResult<S> decode_step(DecodeCache<S>& cache, const Inputs<S>& in, const std::vector<int64_t>& seqs_in) {
  const Config& cfg = cache.cfg;
  const int64_t Bs = in.N(), Hq = cfg.Hq, Hkv = cfg.Hkv, G = cfg.G(), dk = cfg.dk, dv = cfg.dv;
  const int64_t n = cfg.slc_count, ls = cfg.slc_len;
  if (!in.cu_seqlens.empty())
    throw InputError("decode step: the inputs hold one token per stepped sequence; cu_seqlens must be empty");
  const std::vector<int64_t> seqs = resolve_seqs(cache, seqs_in, Bs, "decode step");
  check_sharing(cache, in, "decode step");
  for (int64_t b : seqs) check_room(cache, b, 1, "decode step");

  StepResult<S> res;
  res.pos.resize(static_cast<size_t>(Bs));
  int64_t NBs = 0, nvmax = 0;
  for (int64_t r = 0; r < Bs; ++r) {
    const int64_t t = cache.len[static_cast<size_t>(seqs[size_t(r)])];
    res.pos[size_t(r)] = t;
    NBs = std::max(NBs, cfg.slc_valid(t));
    nvmax = std::max(nvmax, cfg.cmp_visible(t));
  }
  res.gates = compute_gates(cfg, in);
  res.o = Tensor<S>({Bs, Hq, dv});
  for (int c = 0; c < kBranches; ++c) {
    res.o_branch[c] = Tensor<S>({Bs, Hq, dv});
    res.lse[c] = Tensor<S>({Bs, Hq}, neg_inf<S>());
  }
  res.block_idx = Tensor<int32_t>({Bs, Hkv, n}, -1);
  res.block_scores = Tensor<S>({Bs, Hkv, NBs});
  res.tokens.resize(static_cast<size_t>(Bs));

  // Threads only pay off on real work split into several items: a small step's parallel region
  // costs more than the step (measured on a loaded 2-core machine: 90 steps of the tests' small
  // config, 26 ms on 2 threads, 0.8 ms on one; a batch-1, Hkv = 1 step at 3.8k tokens, 22 ms
  // with a region around its single item, 1.4 ms without).
  double work = 0;
  for (int64_t t : res.pos) work += double(cfg.cmp_visible(t) + n * ls + cfg.window);
  const bool parallel = Bs * Hkv > 1 && work * double(Hq * (dk + dv)) > kParallelFlops;
  // The new tokens enter the cache first (and complete a compressed row every d steps), so the
  // token attends to itself in the selection and window branches, as in the prefill.
  std::vector<int64_t> emitted(static_cast<size_t>(Bs));
#pragma omp parallel for schedule(dynamic, 1) if (parallel)
  for (int64_t r = 0; r < Bs; ++r) emitted[size_t(r)] = append_seq(cache, in, seqs[size_t(r)], r, 1);

  const auto ovmap = overlap_map(cfg, nvmax);
  const S scale = static_cast<S>(cfg.softmax_scale());
  std::vector<double> slc_count(static_cast<size_t>(Bs * Hkv));
#pragma omp parallel for schedule(dynamic, 1) if (parallel)
  for (int64_t item = 0; item < Bs * Hkv; ++item) {
    const int64_t r = item / Hkv, g = item % Hkv, b = seqs[size_t(r)], t = res.pos[size_t(r)];
    const Mat<S> Q = Eigen::Map<const Mat<S>>(in.q.row(r, g * G), G, dk);  // a group's heads are adjacent
    std::vector<S> lse(static_cast<size_t>(G));
    auto scatter_lse = [&](int c) {
      for (int64_t hi = 0; hi < G; ++hi) res.lse[c](r, g * G + hi) = lse[size_t(hi)];
    };

    // ---- Compression branch (Eq. 7) over the Nc(t+1) rows the token sees ----
    const int64_t nv = cfg.cmp_visible(t);
    Mat<S> P;  // [G, nv] p_cmp (Eq. 8)
    if (nv > 0) {
      // Scores and exponentials one key at a time, each by the same sequence of operations, so
      // equal compressed keys get exactly equal probabilities and exactly tied block scores stay
      // tied (a product kernel or a vectorised exp may round a column differently from its
      // neighbour). The probabilities feed the selection; the output product may use Eigen.
      P.resize(G, nv);
      for (int64_t hi = 0; hi < G; ++hi) {
        const S* q = in.q.row(r, g * G + hi);
        S mx = neg_inf<S>();
        for (int64_t i = 0; i < nv; ++i) {
          const S* k = cache.cmp_key(b, i) + g * dk;
          S dot = 0;
          for (int64_t a = 0; a < dk; ++a) dot += q[a] * k[a];
          P(hi, i) = dot * scale;
          mx = std::max(mx, P(hi, i));
        }
        S sum = 0;
        for (int64_t i = 0; i < nv; ++i) sum += (P(hi, i) = std::exp(P(hi, i) - mx));
        for (int64_t i = 0; i < nv; ++i) P(hi, i) /= sum;
        lse[size_t(hi)] = mx + std::log(sum);
      }
      const Mat<S> Vc = head_rows(cache.cmp_value(b, 0), Hkv, dv, g, 0, nv);
      const Mat<S> O = P * Vc;
      store(O, res.o_branch[0].row(r, g * G));
      scatter_lse(0);
    }

    // ---- Eq. 9 per head (compressed blocks ascending), Eq. 10 over the group's heads ----
    const int64_t valid = cfg.slc_valid(t);
    Mat<S> pslc = Mat<S>::Zero(G, valid);
    for (int64_t hi = 0; hi < G; ++hi)
      for (int64_t i = 0; i < nv; ++i)
        for (const OverlapTerm& ot : ovmap[static_cast<size_t>(i)]) pslc(hi, ot.j) += P(hi, i) * static_cast<S>(ot.w);
    S* Pg = &res.block_scores(r, g, 0);
    for (int64_t j = 0; j < valid; ++j) {
      S s = 0;
      for (int64_t hi = 0; hi < G; ++hi) s += pslc(hi, j);
      Pg[j] = s;
    }

    // ---- Selection branch (Eq. 11-12): the tokens u <= t of the group's blocks, from the history ----
    const std::vector<int32_t> sel = select_blocks(cfg, t, Pg);
    std::vector<int64_t> us;
    for (size_t m = 0; m < sel.size(); ++m) {
      res.block_idx(r, g, int64_t(m)) = sel[m];
      for (int64_t u = sel[m] * ls; u < std::min<int64_t>((sel[m] + 1) * ls, t + 1); ++u) us.push_back(u);
    }
    slc_count[size_t(item)] = double(us.size());
    attend_rows(
        Q, us, [&](int64_t u) { return cache.key(Branch::Slc, b, u); },
        [&](int64_t u) { return cache.value(Branch::Slc, b, u); }, g, dk, dv, scale, res.o_branch[1].row(r, g * G),
        lse.data());
    scatter_lse(1);

    // ---- Sliding window: [max(0, t-w+1), t], from the ring or the history ----
    us.clear();
    for (int64_t u = cfg.win_start(t); u <= t; ++u) us.push_back(u);
    attend_rows(
        Q, us, [&](int64_t u) { return cache.key(Branch::Win, b, u); },
        [&](int64_t u) { return cache.value(Branch::Win, b, u); }, g, dk, dv, scale, res.o_branch[2].row(r, g * G),
        lse.data());
    scatter_lse(2);
  }

  // Eq. 5, and what each row's step read.
  for (int64_t r = 0; r < Bs; ++r) {
    combine_row(res, r, Hq, dv);
    const int64_t t = res.pos[size_t(r)];
    StepTokens& tok = res.tokens[size_t(r)];
    tok.cmp = double(cfg.cmp_visible(t));
    double slc = 0;
    for (int64_t g = 0; g < Hkv; ++g) slc += slc_count[size_t(r * Hkv + g)];
    tok.slc = slc / double(Hkv);
    tok.win = double(t - cfg.win_start(t) + 1);
    tok.emit = emitted[size_t(r)] ? double(cfg.cmp_len) : 0.0;
    tok.full = double(t + 1);
  }
  return res;
}

template <class S>
RowGather<S>::RowGather(const Inputs<S>& all) : all_(all) {
  out_.phi = all.phi;
  const GateMlp<S>& m = all.gate_mlp;
  out_.gate_mlp.w0 = m.w0, out_.gate_mlp.b0 = m.b0, out_.gate_mlp.w = m.w, out_.gate_mlp.b = m.b;
  out_.gate_mlp.act = m.act;
}

template <class S>
const Inputs<S>& RowGather<S>::take(const std::vector<int64_t>& rows, const std::vector<int64_t>& cu) {
  auto pick = [&](const Tensor<S>& src) {
    if (src.empty()) return Tensor<S>();
    Shape shape = src.shape();
    const int64_t row = src.numel() / std::max<int64_t>(shape[0], 1);
    shape[0] = int64_t(rows.size());
    Tensor<S> dst(shape);
    for (size_t i = 0; i < rows.size(); ++i)
      std::copy(src.data() + rows[i] * row, src.data() + (rows[i] + 1) * row, dst.data() + int64_t(i) * row);
    return dst;
  };
  out_.q = pick(all_.q);
  out_.k = pick(all_.k);
  out_.v = pick(all_.v);
  for (int c = 0; c < kBranches; ++c) {
    out_.k_own[c] = pick(all_.k_own[c]);
    out_.v_own[c] = pick(all_.v_own[c]);
  }
  out_.gates = pick(all_.gates);
  out_.gate_mlp.x = pick(all_.gate_mlp.x);
  out_.cu_seqlens = cu;
  return out_;
}

template <class S>
ForwardResult<S> decode_outputs(const Config& cfg, const Inputs<S>& in, const std::vector<int64_t>& prefix,
                                int64_t* Tmax) {
  const std::vector<int64_t> cu = in.seqlens_or_single();
  const int64_t B = int64_t(cu.size()) - 1, N = in.N(), H = cfg.Hkv;
  if (int64_t(prefix.size()) != B)
    throw InputError(cat("decode: ", prefix.size(), " prefix lengths given for ", B, " sequence(s)"));
  int64_t NB = 0;
  *Tmax = 0;
  ForwardResult<S> out;
  out.cu_cmp.assign(1, 0);
  for (int64_t b = 0; b < B; ++b) {
    const int64_t T = cu[b + 1] - cu[b];
    if (prefix[size_t(b)] < 0 || prefix[size_t(b)] > T)
      throw InputError(cat("decode: prefix ", prefix[size_t(b)], " of sequence ", b, " is outside [0, T = ", T, "]"));
    *Tmax = std::max(*Tmax, T);
    NB = std::max(NB, cfg.num_slc_blocks(T));
    out.cu_cmp.push_back(out.cu_cmp.back() + cfg.num_cmp_blocks(T));
  }
  out.o = Tensor<S>({N, cfg.Hq, cfg.dv});
  for (int c = 0; c < kBranches; ++c) {
    out.o_branch[c] = Tensor<S>({N, cfg.Hq, cfg.dv});
    out.lse[c] = Tensor<S>({N, cfg.Hq}, neg_inf<S>());
  }
  out.gates = Tensor<S>({N, cfg.Hq, 3});
  out.block_idx = Tensor<int32_t>({N, H, cfg.slc_count}, -1);
  out.block_scores = Tensor<S>({N, H, NB});
  return out;
}


template <class S>
DecodeRun<S> decode_workload(const Config& cfg, const Inputs<S>& in, const std::vector<int64_t>& prefix, Path path) {
  const std::vector<int64_t> cu = in.seqlens_or_single();
  const int64_t B = int64_t(cu.size()) - 1;
  int64_t Tmax = 0;
  ForwardResult<S> out = decode_outputs(cfg, in, prefix, &Tmax);

  DecodeRun<S> run;
  run.cache = make_cache<S>(cfg, kv_sharing(in), B, Tmax);
  RowGather<S> gather(in);
  std::vector<int64_t> rows, cu_p{0};
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t t = 0; t < prefix[size_t(b)]; ++t) rows.push_back(cu[b] + t);
    cu_p.push_back(int64_t(rows.size()));
  }
  using clock = std::chrono::steady_clock;
  const auto t0 = clock::now();
  const ForwardResult<S> pre = prefill(run.cache, gather.take(rows, cu_p), {}, path);
  run.prefill_seconds = std::chrono::duration<double>(clock::now() - t0).count();
  for (size_t i = 0; i < rows.size(); ++i) copy_outputs(pre, int64_t(i), out, rows[i]);

  std::vector<int64_t> active;
  for (int64_t k = 0; next_step(cu, prefix, k, active, rows); ++k) {
    const Inputs<S>& step_in = gather.take(rows);
    const auto t1 = clock::now();
    const StepResult<S> step = decode_step(run.cache, step_in, active);
    run.step_seconds += std::chrono::duration<double>(clock::now() - t1).count();
    ++run.step_calls;
    for (size_t i = 0; i < rows.size(); ++i) {
      copy_outputs(step, int64_t(i), out, rows[i]);
      run.steps.push_back({active[i], step.pos[i], step.tokens[i]});
    }
  }

  compressed_from_cache(run.cache, out);
  run.out = std::move(out);
  return run;
}

StepTokens step_tokens(const Config& cfg, int64_t s) {
  const int64_t t = s - 1, l = cfg.cmp_len;
  StepTokens tok;
  tok.cmp = double(cfg.cmp_visible(t));
  if (cfg.slc_valid(t) <= cfg.slc_count)
    tok.slc = double(s);
  else if (cfg.local_blocks >= 1)
    tok.slc = double((cfg.slc_count - 1) * cfg.slc_len + t % cfg.slc_len + 1);
  else
    tok.slc = double(cfg.slc_count * cfg.slc_len);
  tok.win = double(std::min(cfg.window, s));
  tok.emit = s >= l && (s - l) % cfg.cmp_stride == 0 ? double(l) : 0.0;
  tok.full = double(s);
  return tok;
}

CacheBytes cache_bytes(const Config& cfg, const KvSharing& sh, int64_t s, int elem) {
  const double rk = double(cfg.Hkv * cfg.dk) * elem, rv = double(cfg.Hkv * cfg.dv) * elem;
  CacheBytes c;
  c.cmp = double(cfg.num_cmp_blocks(s)) * (rk + rv);
  c.tail = double(std::min(s, cfg.cmp_len)) * ((sh.cmp_k ? 0 : rk) + (sh.cmp_v ? 0 : rv));
  c.slc = double(s) * (rk + rv);
  c.win = double(std::min(s, cfg.window)) * ((sh.win_k ? 0 : rk) + (sh.win_v ? 0 : rv));
  c.full = double(s) * (rk + rv);
  return c;
}

double phi_param_bytes(const Config& cfg, int elem) {
  const double l = double(cfg.cmp_len);
  double params = 0;
  for (const auto& [D, h] : {std::pair{double(cfg.dk), double(cfg.hidden_k())}, {double(cfg.dv), double(cfg.hidden_v())}}) {
    switch (cfg.compress) {
      case CompressKind::Mean: break;
      case CompressKind::Linear: params += l * D + D * l * D + D; break;            // pe, w, b
      case CompressKind::Mlp: params += l * D + h * l * D + h + D * h + D; break;  // pe, w1, b1, w2, b2
    }
  }
  return params * double(cfg.Hkv) * elem;
}

StepBytes step_bytes(const Config& cfg, const StepTokens& tok, int elem) {
  const double row = double(cfg.Hkv * (cfg.dk + cfg.dv)) * elem;
  StepBytes b;
  b.cmp = tok.cmp * row;
  b.slc = tok.slc * row;
  b.win = tok.win * row;
  b.emit = tok.emit * row;
  b.phi = tok.emit > 0 ? phi_param_bytes(cfg, elem) : 0.0;
  b.full = tok.full * row;
  return b;
}

#define NSA_DECODE_INSTANTIATE(S)                                                                                  \
  template KvSharing kv_sharing<S>(const Inputs<S>&);                                                              \
  template DecodeCache<S> make_cache<S>(const Config&, const KvSharing&, int64_t, int64_t);                        \
  template void append<S>(DecodeCache<S>&, const Inputs<S>&, const std::vector<int64_t>&);                          \
  template ForwardResult<S> prefill<S>(DecodeCache<S>&, const Inputs<S>&, const std::vector<int64_t>&, Path);        \
  template StepResult<S> decode_step<S>(DecodeCache<S>&, const Inputs<S>&, const std::vector<int64_t>&);            \
  template DecodeRun<S> decode_workload<S>(const Config&, const Inputs<S>&, const std::vector<int64_t>&, Path);       \
  template ForwardResult<S> decode_outputs<S>(const Config&, const Inputs<S>&, const std::vector<int64_t>&, int64_t*); \
  template class RowGather<S>;
NSA_DECODE_INSTANTIATE(double)
NSA_DECODE_INSTANTIATE(float)
#undef NSA_DECODE_INSTANTIATE

}  // namespace nsa::ref
