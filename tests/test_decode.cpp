// Decoding with a KV cache: every output of every decode step equals the prefill forward pass at
// that position (docs/spec.md 8), the cache holds what the layout says, and the traffic model
// matches what the steps read.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <numeric>

#include "cost.hpp"
#include "decode.hpp"
#include "helpers.hpp"

using namespace nsa;
using test::Case;
using test::GateMode;

namespace {

// Decode and prefill compute each position with different summation orders (a step's products
// are [G, keys] against the forward's [Bq*G, keys] tiles, the window in one softmax against
// 256-key chunks, phi on one block against all blocks), so they agree to round-off, not bitwise.
// Metric, per position: relative L2 error of each [dv] output row (and each [Hkv, NB] row of
// block scores); absolute error of lse relative to max(|lse|, 1), as lse may be near 0.
constexpr double kDecodeTol = 1e-12;

// Largest error over the rows of two per-token tensors [N, ...] restricted to rows in `want`.
template <class S>
double worst_row_error(const Tensor<S>& a, const Tensor<S>& b, const std::vector<char>& rows, bool lse) {
  const int64_t n = a.numel() / std::max<int64_t>(a.dim(0), 1);
  double worst = 0;
  for (int64_t r = 0; r < a.dim(0); ++r) {
    if (!rows[size_t(r)]) continue;
    double num = 0, den = 0;
    if (!test::diff_norms(a, b, r * n, (r + 1) * n, num, den)) return std::numeric_limits<double>::infinity();
    const double err = lse ? std::sqrt(num) / std::max(std::sqrt(den), 1.0) : (den > 0 ? std::sqrt(num / den) : std::sqrt(num));
    worst = std::max(worst, err);
  }
  return worst;
}

// Every per-position output of `got` equals `want` on the rows marked, block_idx exactly.
template <class S>
void check_positions(const ref::ForwardResult<S>& got, const ref::ForwardResult<S>& want, const std::vector<char>& rows,
                     double tol) {
  CHECK(worst_row_error(got.o, want.o, rows, false) <= tol);
  for (int c = 0; c < kBranches; ++c) {
    INFO("branch " << branch_name(Branch(c)));
    CHECK(worst_row_error(got.o_branch[c], want.o_branch[c], rows, false) <= tol);
    CHECK(worst_row_error(got.lse[c], want.lse[c], rows, true) <= tol);
  }
  CHECK(worst_row_error(got.gates, want.gates, rows, false) <= tol);
  CHECK(worst_row_error(got.block_scores, want.block_scores, rows, false) <= tol);
  REQUIRE(got.block_idx.shape() == want.block_idx.shape());
  int64_t differ = 0;
  const int64_t n = got.block_idx.numel() / std::max<int64_t>(got.block_idx.dim(0), 1);
  for (int64_t i = 0; i < got.block_idx.numel(); ++i) differ += rows[size_t(i / n)] && got.block_idx[i] != want.block_idx[i];
  CHECK(differ == 0);
}

std::vector<char> all_rows(int64_t N) { return std::vector<char>(size_t(N), 1); }

struct Named {
  const char* name;
  Case k;
  std::vector<int64_t> prefix;  // per sequence
};

std::vector<Named> decode_cases() {
  std::vector<Named> cases;
  auto add = [&](const char* name, std::vector<int64_t> prefix, auto mutate) {
    Case k;
    k.cfg = test::small_config();  // G = 2, dk = 12 != dv = 8, l = 8, d = 4, l' = 8, n = 4, w = 16
    k.seqlens = {90};
    mutate(k);
    cases.push_back({name, k, std::move(prefix)});
  };
  add("G=2 dk!=dv mlp, random gates, no prefill", {0}, [](Case&) {});
  add("prefill 37 then decode", {37}, [](Case&) {});
  add("G=1 MHA, prefill 5 < l", {5}, [](Case& k) { k.cfg.Hq = k.cfg.Hkv = 3; });
  add("MQA Hkv=1 G=4, gate MLP", {20}, [](Case& k) {
    k.cfg.Hkv = 1;
    k.gates = GateMode::Mlp;
  });
  add("linear phi, separate k/v per branch", {11}, [](Case& k) {
    k.cfg.compress = CompressKind::Linear;
    k.separate_kv = true;
  });
  add("mean phi, gates all ones", {0}, [](Case& k) {
    k.cfg.compress = CompressKind::Mean;
    k.gates = GateMode::Ones;
  });
  add("T not a multiple of l, d, l': l=12 d=5 l'=16, T=101", {30}, [](Case& k) {
    k.cfg.cmp_len = 12, k.cfg.cmp_stride = 5, k.cfg.slc_len = 16, k.seqlens = {101};
  });
  add("d does not divide l': l=7 d=3 l'=10, silu", {0}, [](Case& k) {
    k.cfg.cmp_len = 7, k.cfg.cmp_stride = 3, k.cfg.slc_len = 10, k.cfg.cmp_act = Activation::Silu;
  });
  add("d = l = l' (no overlap)", {9}, [](Case& k) { k.cfg.cmp_len = k.cfg.cmp_stride = 8; });
  add("T < l: no compressed block ever", {2}, [](Case& k) { k.seqlens = {6}; });
  add("w >= T, n >= blocks", {13}, [](Case& k) { k.cfg.window = 500, k.cfg.slc_count = 20; });
  add("no forced blocks, hidden 5, scale 0.3", {40}, [](Case& k) {
    k.cfg.init_blocks = 0, k.cfg.local_blocks = 0, k.cfg.cmp_hidden = 5, k.cfg.scale = 0.3;
  });
  add("packed batch of different lengths and prefixes, incl. empty and full", {30, 0, 0, 1, 64, 7},
      [](Case& k) { k.seqlens = {70, 0, 1, 45, 64, 33}; });
  add("packed batch, separate k/v, gate MLP, linear", {3, 17}, [](Case& k) {
    k.seqlens = {40, 77};
    k.separate_kv = true;
    k.gates = GateMode::Mlp;
    k.cfg.compress = CompressKind::Linear;
  });
  return cases;
}

}  // namespace

TEST_CASE("decode = prefill forward at every position (double, 1e-12), blocks included") {
  for (const auto& nc : decode_cases()) {
    INFO(nc.name);
    const auto in = test::make_inputs(nc.k);
    ref::check_inputs(nc.k.cfg, in);
    const auto want = ref::forward(nc.k.cfg, in);
    const auto run = ref::decode_workload(nc.k.cfg, in, nc.prefix);
    check_positions(run.out, want, all_rows(in.N()), kDecodeTol);
    // The cache's compressed rows are the forward pass's phi(k_cmp), phi(v_cmp).
    CHECK(run.out.cu_cmp == want.cu_cmp);
    CHECK(test::rel_l2(run.out.k_cmp_compressed, want.k_cmp_compressed) <= kDecodeTol);
    CHECK(test::rel_l2(run.out.v_cmp_compressed, want.v_cmp_compressed) <= kDecodeTol);
    // One step per token after the prefix; every sequence complete.
    int64_t steps = 0;
    for (size_t b = 0; b < nc.k.seqlens.size(); ++b) {
      steps += nc.k.seqlens[b] - nc.prefix[b];
      CHECK(run.cache.len[b] == nc.k.seqlens[b]);
    }
    CHECK(int64_t(run.steps.size()) == steps);
  }
}

TEST_CASE("decode: per-branch keys/values for some branches only (mixed sharing)") {
  Case k;
  k.cfg = test::small_config();
  k.seqlens = {60, 41};
  auto in = test::make_inputs(k);
  Rng rng(7);
  const int64_t N = in.N();
  // Compression keys and window values of their own; everything else shared.
  in.k_own[int(Branch::Cmp)] = test::randn<double>({N, k.cfg.Hkv, k.cfg.dk}, rng);
  in.v_own[int(Branch::Win)] = test::randn<double>({N, k.cfg.Hkv, k.cfg.dv}, rng);
  ref::check_inputs(k.cfg, in);
  const ref::KvSharing sh = ref::kv_sharing(in);
  CHECK(!sh.cmp_k);
  CHECK(sh.cmp_v);
  CHECK(sh.win_k);
  CHECK(!sh.win_v);
  const auto run = ref::decode_workload(k.cfg, in, {10, 0});
  check_positions(run.out, ref::forward(k.cfg, in), all_rows(N), kDecodeTol);
  CHECK(!run.cache.k_tail.empty());
  CHECK(run.cache.v_tail.empty());
  CHECK(run.cache.k_win.empty());
  CHECK(!run.cache.v_win.empty());
  // Selection keys of their own: now no branch shares keys with it.
  in.k_own[int(Branch::Slc)] = test::randn<double>({N, k.cfg.Hkv, k.cfg.dk}, rng);
  ref::check_inputs(k.cfg, in);
  CHECK(!ref::kv_sharing(in).win_k);
  const auto run2 = ref::decode_workload(k.cfg, in, {0, 25});
  check_positions(run2.out, ref::forward(k.cfg, in), all_rows(N), kDecodeTol);
}

TEST_CASE("decode: append in chunks, then steps of a subset of sequences, equal the prefill") {
  // append() (phi recomputed on the tail, cache already holding tokens) instead of prefill().
  Case k;
  k.cfg = test::small_config();
  k.cfg.cmp_len = 6, k.cfg.cmp_stride = 4;  // a block straddles chunk edges
  k.seqlens = {50, 70};
  k.separate_kv = true;
  k.gates = GateMode::Mlp;
  const auto in = test::make_inputs(k);
  ref::check_inputs(k.cfg, in);
  const auto want = ref::forward(k.cfg, in);
  auto cache = ref::make_cache<double>(k.cfg, ref::kv_sharing(in), 2, 70);
  ref::RowGather<double> gather(in);
  auto rows = [](int64_t a, int64_t b) {
    std::vector<int64_t> r;
    for (int64_t i = a; i < b; ++i) r.push_back(i);
    return r;
  };
  // Sequence 1 (rows 50..119): 9 tokens, then 14 more; sequence 0 (rows 0..49): 3 tokens.
  ref::append(cache, gather.take(rows(50, 59), {0, 9}), {1});
  ref::append(cache, gather.take(rows(59, 73), {0, 14}), {1});
  ref::append(cache, gather.take(rows(0, 3), {0, 3}), {0});
  CHECK(cache.len == std::vector<int64_t>{3, 23});
  ref::ForwardResult<double> got = want;  // rows not decoded keep the reference's values
  std::vector<char> decoded(size_t(in.N()), 0);
  auto record = [&](const ref::StepResult<double>& s, const std::vector<int64_t>& r) {
    for (size_t i = 0; i < r.size(); ++i) {
      const int64_t row = r[i];
      decoded[size_t(row)] = 1;
      std::copy(s.o.row(int64_t(i), 0), s.o.row(int64_t(i), 0) + k.cfg.Hq * k.cfg.dv, got.o.row(row, 0));
      for (int c = 0; c < 3; ++c) {
        std::copy(s.o_branch[c].row(int64_t(i), 0), s.o_branch[c].row(int64_t(i), 0) + k.cfg.Hq * k.cfg.dv,
                  got.o_branch[c].row(row, 0));
        for (int64_t h = 0; h < k.cfg.Hq; ++h) got.lse[c](row, h) = s.lse[c](int64_t(i), h);
      }
      for (int64_t h = 0; h < k.cfg.Hq; ++h)
        for (int c = 0; c < 3; ++c) got.gates(row, h, c) = s.gates(int64_t(i), h, c);
      for (int64_t g = 0; g < k.cfg.Hkv; ++g) {
        for (int64_t m = 0; m < k.cfg.slc_count; ++m) got.block_idx(row, g, m) = s.block_idx(int64_t(i), g, m);
        for (int64_t j = 0; j < got.block_scores.dim(2); ++j)
          got.block_scores(row, g, j) = j < s.block_scores.dim(2) ? s.block_scores(int64_t(i), g, j) : 0.0;
      }
    }
  };
  // Only sequence 0 steps until it reaches 23 tokens, then both step together, then sequence 1 alone.
  for (int64_t t = 3; t < 23; ++t) {
    const auto s = ref::decode_step(cache, gather.take({t}), {0});
    CHECK(s.pos == std::vector<int64_t>{t});
    record(s, {t});
  }
  for (int64_t t = 23; t < 50; ++t) {
    const std::vector<int64_t> r{50 + t, t};  // sequence 1's row first: rows follow `seqs`, not b
    const auto s = ref::decode_step(cache, gather.take(r), {1, 0});
    record(s, r);
  }
  for (int64_t t = 50; t < 70; ++t) record(ref::decode_step(cache, gather.take({50 + t}), {1}), {50 + t});
  CHECK(std::count(decoded.begin(), decoded.end(), 1) == (50 - 3) + (70 - 23));
  check_positions(got, want, decoded, kDecodeTol);
  // Compressed rows: recomputed by append over chunk edges and by the steps, equal to the forward's.
  for (int64_t b = 0; b < 2; ++b) {
    const int64_t c0 = want.cu_cmp[b], nc = want.cu_cmp[b + 1] - c0;
    double worst = 0;
    for (int64_t i = 0; i < nc * k.cfg.Hkv * k.cfg.dk; ++i)
      worst = std::max(worst, std::abs(cache.cmp_key(b, 0)[i] - want.k_cmp_compressed.row(c0, 0)[i]));
    CHECK(worst < 1e-13);
  }
}

TEST_CASE("decode: float steps agree with the float forward pass to float round-off") {
  Case k;
  k.cfg = test::small_config();
  k.seqlens = {80, 33};
  const auto in = test::make_inputs(k).cast<float>();
  ref::check_inputs(k.cfg, in);
  const auto want = ref::forward(k.cfg, in);
  const auto run = ref::decode_workload(k.cfg, in, {20, 0});
  CHECK(test::rel_l2(run.out.o, want.o) < 1e-5);
  CHECK(test::rel_l2(run.out.block_scores, want.block_scores) < 1e-5);
  CHECK(run.out.block_idx.vec() == want.block_idx.vec());  // no near-tie at this seed
}

TEST_CASE("decode: exactly tied block scores go to the lower index, as in the prefill") {
  Case k;
  k.cfg = test::small_config();  // l' = 8, n = 4: 1 initial + 2 local + 1 chosen among ties
  k.cfg.compress = CompressKind::Mean;
  k.seqlens = {128};
  auto in = test::make_inputs(k);
  in.k.fill(0.5);  // every compressed key equal: interior scores tie exactly
  const auto want = ref::forward(k.cfg, in);
  const auto run = ref::decode_workload(k.cfg, in, {0});
  CHECK(run.out.block_idx.vec() == want.block_idx.vec());
  CHECK(run.out.block_idx(127, 0, 1) == 1);
}

TEST_CASE("decode: results do not depend on the thread count") {
  Case k;
  k.cfg = test::small_config();
  k.seqlens = {60, 45, 30};
  const auto in = test::make_inputs(k);
  ref::set_threads(1);
  const auto a = ref::decode_workload(k.cfg, in, {5, 0, 12});
  ref::set_threads(2);
  const auto b = ref::decode_workload(k.cfg, in, {5, 0, 12});
  ref::set_threads(0);
  CHECK(a.out.o.vec() == b.out.o.vec());
  CHECK(a.out.block_scores.vec() == b.out.block_scores.vec());
}

TEST_CASE("cache layout: rings of min(l, capacity) and min(w, capacity) rows, none when shared; size = model") {
  Config c = test::small_config();  // l = 8, w = 16
  for (bool separate : {false, true}) {
    INFO("separate k/v: " << separate);
    const ref::KvSharing sh{!separate, !separate, !separate, !separate};
    for (int64_t cap : {0, 5, 12, 100}) {
      INFO("capacity " << cap);
      const auto cache = ref::make_cache<double>(c, sh, 3, cap);
      CHECK(cache.k_cmp.shape() == Shape{3, c.num_cmp_blocks(cap), c.Hkv, c.dk});
      CHECK(cache.v_slc.shape() == Shape{3, cap, c.Hkv, c.dv});
      CHECK(cache.k_tail.empty() == !separate);
      CHECK(cache.v_win.empty() == !separate);
      if (separate) {
        CHECK(cache.k_tail.dim(1) == std::min<int64_t>(cap, 8));
        CHECK(cache.v_win.dim(1) == std::min<int64_t>(cap, 16));
      }
      double held = 0;
      for (const auto* t : {&cache.k_cmp, &cache.v_cmp, &cache.k_tail, &cache.v_tail, &cache.k_slc, &cache.v_slc,
                            &cache.k_win, &cache.v_win})
        held += double(t->numel()) * sizeof(double);
      CHECK(held == 3 * ref::cache_bytes(c, sh, cap, sizeof(double)).total());
    }
  }
  // Shared k, v: the history and the compressed rows, nothing else; bigger than full attention's
  // cache by the compressed rows (NSA saves traffic per step, not cache size).
  const auto cb = ref::cache_bytes(c, ref::KvSharing{}, 100, 2);
  CHECK(cb.tail == 0);
  CHECK(cb.win == 0);
  CHECK(cb.slc == cb.full);
  CHECK(cb.cmp == double(c.num_cmp_blocks(100)) * c.Hkv * (c.dk + c.dv) * 2);
}

TEST_CASE("cache contents: the rings hold the last l and w raw rows at slot u % l, u % w") {
  Case k;
  k.cfg = test::small_config();  // l = 8, w = 16
  k.seqlens = {45};
  k.separate_kv = true;
  const auto in = test::make_inputs(k);
  const auto run = ref::decode_workload(k.cfg, in, {20});
  const auto& cache = run.cache;
  const int64_t rk = k.cfg.Hkv * k.cfg.dk;
  for (int64_t u = 0; u < 45; ++u) {
    CHECK(std::equal(cache.key(Branch::Slc, 0, u), cache.key(Branch::Slc, 0, u) + rk, in.k_own[1].row(u, 0)));
    if (u >= 45 - 8) CHECK(std::equal(cache.key(Branch::Cmp, 0, u), cache.key(Branch::Cmp, 0, u) + rk, in.k_own[0].row(u, 0)));
    if (u >= 45 - 16) CHECK(std::equal(cache.key(Branch::Win, 0, u), cache.key(Branch::Win, 0, u) + rk, in.k_own[2].row(u, 0)));
  }
  CHECK(cache.key(Branch::Win, 0, 44) == cache.k_win.data() + (44 % 16) * rk);
}

TEST_CASE("traffic: the steps read what the model says; the paper's decode ratios") {
  for (int64_t local : {2, 0}) {
    INFO("local_blocks " << local);
    Case k;
    k.cfg = test::small_config();  // l = 8, d = 4, l' = 8, n = 4, w = 16
    k.cfg.local_blocks = local;
    k.cfg.init_blocks = local ? 1 : 0;
    k.cfg.Hkv = 2, k.cfg.Hq = 4;
    k.seqlens = {100};
    const auto in = test::make_inputs(k);
    const auto run = ref::decode_workload(k.cfg, in, {0});
    int64_t emits = 0;
    for (const auto& st : run.steps) {
      const ref::StepTokens m = ref::step_tokens(k.cfg, st.pos + 1);
      CHECK(st.tokens.cmp == m.cmp);
      CHECK(st.tokens.win == m.win);
      CHECK(st.tokens.emit == m.emit);
      CHECK(st.tokens.full == m.full);
      // The own block, partly filled, is always selected when local >= 1: then exact.
      if (local) CHECK(st.tokens.slc == m.slc);
      else CHECK(st.tokens.slc <= m.slc);
      // The same count as the cost model's selection keys.
      CHECK(m.slc == double(analysis::slc_tokens(k.cfg, st.pos)));
      emits += st.tokens.emit > 0;
    }
    CHECK(emits == k.cfg.num_cmp_blocks(100));  // one emission per compressed block: (100 - 8)/4 + 1
  }
  // The paper's settings (docs/spec.md 9), Section 5.2: tokens read at 8k..64k against full.
  Config p;
  p.Hq = 64, p.Hkv = 4, p.dk = 192, p.dv = 128;  // l = 32, d = 16, l' = 64, n = 16, w = 512
  const std::vector<std::pair<int64_t, double>> paper = {{8192, 4.0}, {16384, 6.4}, {32768, 9.1}, {65536, 11.6}};
  for (const auto& [s, ratio] : paper) {
    const ref::StepTokens m = ref::step_tokens(p, s);
    CHECK(m.cmp == double((s - 32) / 16 + 1));
    CHECK(m.slc == 16 * 64);
    CHECK(m.win == 512);
    CHECK(m.full / m.attended() == doctest::Approx(ratio).epsilon(0.01));
  }
  CHECK(ref::step_tokens(p, 65536).attended() == 5631);
  // Bytes: bf16 at 64k, 4 KV heads of dk + dv = 320: 5631 * 4 * 320 * 2 bytes.
  const ref::StepBytes b = ref::step_bytes(p, ref::step_tokens(p, 65536), 2);
  CHECK(b.cmp + b.slc + b.win == 5631.0 * 4 * 320 * 2);
  CHECK(b.full == 65536.0 * 4 * 320 * 2);
  CHECK(b.emit == 32.0 * 4 * 320 * 2);  // 65536 - 32 is a multiple of 16: this step emits
  CHECK(b.phi == ref::phi_param_bytes(p, 2));
  CHECK(ref::step_bytes(p, ref::step_tokens(p, 65535), 2).phi == 0);
}

TEST_CASE("decode: errors name the problem") {
  Case k;
  k.cfg = test::small_config();
  k.seqlens = {20};
  const auto in = test::make_inputs(k);
  ref::RowGather<double> gather(in);
  auto cache = ref::make_cache<double>(k.cfg, ref::kv_sharing(in), 2, 10);
  CHECK_THROWS_AS(ref::append(cache, gather.take({0, 1, 2}, {0, 3}), {2}), InputError);       // no sequence 2
  CHECK_THROWS_AS(ref::decode_step(cache, gather.take({0, 1}), {0, 0}), InputError);           // twice
  CHECK_THROWS_AS(ref::decode_step(cache, gather.take({0, 1}, {0, 1, 2}), {0, 1}), InputError); // cu_seqlens
  std::vector<int64_t> eleven(11);
  std::iota(eleven.begin(), eleven.end(), 0);
  CHECK_THROWS_AS(ref::append(cache, gather.take(eleven, {0, 11}), {0}), ResourceError);        // capacity 10
  ref::prefill(cache, gather.take({0, 1}, {0, 2}), {1});
  CHECK_THROWS_AS(ref::prefill(cache, gather.take({0}, {0, 1}), {1}), InputError);             // not empty
  auto sep = in;
  sep.k_own[0] = in.k;  // a compression key tensor of its own: the cache shares
  ref::RowGather<double> gs(sep);
  CHECK_THROWS_AS(ref::decode_step(cache, gs.take({2}), {1}), InputError);
  CHECK(cache.len == std::vector<int64_t>{0, 2});  // refused calls change nothing
}
