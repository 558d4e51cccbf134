// The reference forward pass: oracle = fast path, the spec's identities, hand-worked cases.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <set>

#include "helpers.hpp"

using namespace nsa;
using test::Case;
using test::GateMode;
using test::rel_l2;

namespace {

template <class S>
void check_same(const ref::ForwardResult<S>& a, const ref::ForwardResult<S>& b, double tol) {
  CHECK(rel_l2(a.o, b.o) <= tol);
  for (int c = 0; c < kBranches; ++c) {
    INFO("branch " << branch_name(Branch(c)));
    CHECK(rel_l2(a.o_branch[c], b.o_branch[c]) <= tol);
    CHECK(rel_l2(a.lse[c], b.lse[c]) <= tol);
  }
  CHECK(rel_l2(a.block_scores, b.block_scores) <= tol);
  CHECK(rel_l2(a.k_cmp_compressed, b.k_cmp_compressed) <= tol);
  CHECK(rel_l2(a.v_cmp_compressed, b.v_cmp_compressed) <= tol);
  CHECK(rel_l2(a.gates, b.gates) <= tol);
  CHECK(a.block_idx.vec() == b.block_idx.vec());
}

ref::ForwardResult<double> run(const Config& c, const ref::Inputs<double>& in, ref::Path p = ref::Path::Fast) {
  ref::check_inputs(c, in);
  return ref::forward(c, in, p);
}

}  // namespace

TEST_CASE("forward: oracle and fast path agree to 1e-12 in double") {
  struct Named {
    const char* name;
    Case k;
  };
  std::vector<Named> cases;
  auto add = [&](const char* name, auto mutate) {
    Case k;
    k.cfg = test::small_config();
    mutate(k);
    cases.push_back({name, k});
  };
  add("G=2 dk!=dv mlp random gates", [](Case&) {});
  add("G=1 MHA", [](Case& k) { k.cfg.Hq = k.cfg.Hkv = 3; });
  add("MQA Hkv=1 G=4", [](Case& k) { k.cfg.Hkv = 1; });
  add("linear phi, separate kv", [](Case& k) {
    k.cfg.compress = CompressKind::Linear;
    k.separate_kv = true;
  });
  add("mean phi, gate MLP", [](Case& k) {
    k.cfg.compress = CompressKind::Mean;
    k.gates = GateMode::Mlp;
  });
  add("T not a multiple of any block, l=12 d=5 l'=16", [](Case& k) {
    k.cfg.cmp_len = 12, k.cfg.cmp_stride = 5, k.cfg.slc_len = 16, k.seqlens = {301};
  });
  add("d does not divide l', l'=10 l=7 d=3, silu", [](Case& k) {
    k.cfg.cmp_len = 7, k.cfg.cmp_stride = 3, k.cfg.slc_len = 10, k.cfg.cmp_act = Activation::Silu;
  });
  add("T < l: no compressed block", [](Case& k) { k.seqlens = {5}; });
  add("w >= T, n >= blocks", [](Case& k) {
    k.cfg.window = 1000, k.cfg.slc_count = 40, k.seqlens = {200};
  });
  add("packed sequences incl. an empty one", [](Case& k) { k.seqlens = {70, 0, 1, 129}; });
  add("tile edges: T = 63, 64, 65, 129", [](Case& k) { k.seqlens = {63, 64, 65, 129}; });
  add("no forced blocks, hidden 5, scale 0.3", [](Case& k) {
    k.cfg.init_blocks = 0, k.cfg.local_blocks = 0, k.cfg.cmp_hidden = 5, k.cfg.scale = 0.3;
  });
  for (const auto& nc : cases) {
    INFO(nc.name);
    const auto in = test::make_inputs(nc.k);
    check_same(run(nc.k.cfg, in, ref::Path::Fast), run(nc.k.cfg, in, ref::Path::Oracle), 1e-12);
  }
}

TEST_CASE("identity: selecting every block is full attention") {
  Case k;
  k.cfg = test::small_config();
  k.cfg.slc_count = 32;  // >= ceil(T / l') = 25 blocks
  k.seqlens = {200};
  k.gates = GateMode::Ones;
  auto in = test::make_inputs(k);
  in.gates = Tensor<double>({200, k.cfg.Hq, 3});
  for (int64_t t = 0; t < 200; ++t)
    for (int64_t h = 0; h < k.cfg.Hq; ++h) in.gates(t, h, 1) = 1;  // only the selection branch
  const auto full = ref::full_attention(k.cfg, in.q, in.k, in.v, {});
  for (auto path : {ref::Path::Fast, ref::Path::Oracle}) {
    const auto r = run(k.cfg, in, path);
    CHECK(rel_l2(r.o_branch[1], full.o) < 1e-13);
    CHECK(rel_l2(r.lse[1], full.lse) < 1e-13);
    CHECK(rel_l2(r.o, full.o) < 1e-13);
  }
}

TEST_CASE("identity: a window covering everything is full attention") {
  Case k;
  k.cfg = test::small_config();
  k.cfg.window = 150;
  k.seqlens = {150};
  const auto in = test::make_inputs(k);
  const auto full = ref::full_attention(k.cfg, in.q, in.k, in.v, {});
  const auto full_oracle = ref::full_attention(k.cfg, in.q, in.k, in.v, {}, ref::Path::Oracle);
  CHECK(rel_l2(full.o, full_oracle.o) < 1e-13);
  CHECK(rel_l2(full.lse, full_oracle.lse) < 1e-13);
  for (auto path : {ref::Path::Fast, ref::Path::Oracle}) {
    const auto r = run(k.cfg, in, path);
    CHECK(rel_l2(r.o_branch[2], full.o) < 1e-13);
    CHECK(rel_l2(r.lse[2], full.lse) < 1e-13);
  }
}

TEST_CASE("identity: mean compression with l = d = 1 is full attention") {
  Case k;
  k.cfg = test::small_config();
  k.cfg.compress = CompressKind::Mean;
  k.cfg.cmp_len = k.cfg.cmp_stride = 1;
  k.seqlens = {130};
  const auto in = test::make_inputs(k);
  const auto full = ref::full_attention(k.cfg, in.q, in.k, in.v, {});
  for (auto path : {ref::Path::Fast, ref::Path::Oracle}) {
    const auto r = run(k.cfg, in, path);
    CHECK(rel_l2(r.o_branch[0], full.o) < 1e-13);
    CHECK(rel_l2(r.lse[0], full.lse) < 1e-13);
    CHECK(rel_l2(r.k_cmp_compressed, in.k) == 0);
  }
}

TEST_CASE("the output is the gated sum of the three branches") {
  Case k;
  k.cfg = test::small_config();
  k.gates = GateMode::Mlp;
  const auto in = test::make_inputs(k);
  const auto r = run(k.cfg, in);
  // The gates are sigmoid(act(x W0 + b0) W + b), recomputed here independently.
  const auto& m = in.gate_mlp;
  for (int64_t t = 0; t < in.N(); t += 37)
    for (int64_t h = 0; h < k.cfg.Hq; ++h)
      for (int c = 0; c < 3; ++c) {
        double z = m.b[h * 3 + c];
        for (int64_t a = 0; a < m.w0.dim(1); ++a) {
          double y = m.b0[a];
          for (int64_t i = 0; i < m.x.dim(1); ++i) y += m.x(t, i) * m.w0(i, a);
          z += 0.5 * y * (1 + std::erf(y / std::sqrt(2.0))) * m.w(a, h * 3 + c);
        }
        CHECK(r.gates(t, h, c) == doctest::Approx(1 / (1 + std::exp(-z))).epsilon(1e-12));
      }
  double worst = 0;
  for (int64_t t = 0; t < in.N(); ++t)
    for (int64_t h = 0; h < k.cfg.Hq; ++h)
      for (int64_t c = 0; c < k.cfg.dv; ++c) {
        double s = 0;
        for (int b = 0; b < 3; ++b) s += r.gates(t, h, b) * r.o_branch[b](t, h, c);
        worst = std::max(worst, std::abs(s - r.o(t, h, c)));
      }
  CHECK(worst < 1e-14);
}

TEST_CASE("causality: changing future tokens never changes a past output") {
  Case k;
  k.cfg = test::small_config();
  k.seqlens = {160};
  k.gates = GateMode::Mlp;
  const auto in = test::make_inputs(k);
  const int64_t p = 77;  // rows <= p must not move
  auto in2 = in;
  Rng rng(99);
  for (auto* t : {&in2.q, &in2.k, &in2.v, &in2.gate_mlp.x})
    for (int64_t i = (p + 1) * t->numel() / t->dim(0); i < t->numel(); ++i) (*t)[i] = 5 * rng.normal();
  for (auto path : {ref::Path::Fast, ref::Path::Oracle}) {
    const auto a = run(k.cfg, in, path), b = run(k.cfg, in2, path);
    auto same_prefix = [&](const auto& x, const auto& y) {
      const int64_t n = (p + 1) * x.numel() / x.dim(0);
      return std::equal(x.vec().begin(), x.vec().begin() + n, y.vec().begin());
    };
    CHECK(same_prefix(a.o, b.o));
    for (int c = 0; c < 3; ++c) {
      CHECK(same_prefix(a.o_branch[c], b.o_branch[c]));
      CHECK(same_prefix(a.lse[c], b.lse[c]));
    }
    CHECK(same_prefix(a.block_idx, b.block_idx));
    CHECK(same_prefix(a.block_scores, b.block_scores));
    CHECK(!same_prefix(a.o.reshaped({1, a.o.numel()}), b.o.reshaped({1, b.o.numel()})));  // the future did change
  }
}

TEST_CASE("a case worked out by hand: T = 3, scalar heads, l = 2, d = 1, l' = 1, n = 2, w = 2") {
  Config c;
  c.Hq = c.Hkv = c.dk = c.dv = 1;
  c.cmp_len = 2, c.cmp_stride = 1, c.slc_len = 1, c.slc_count = 2, c.init_blocks = 0, c.local_blocks = 1;
  c.window = 2, c.scale = 1, c.compress = CompressKind::Mean;
  ref::Inputs<double> in;
  in.q = Tensor<double>({3, 1, 1}, 1.0);
  in.k = Tensor<double>({3, 1, 1}, {0.0, std::log(2.0), std::log(3.0)});
  in.v = Tensor<double>({3, 1, 1}, {10.0, 20.0, 40.0});
  for (auto path : {ref::Path::Fast, ref::Path::Oracle}) {
    const auto r = run(c, in, path);
    // Window of t = 2: keys 1, 2 with weights 2/5, 3/5.
    CHECK(r.o_branch[2](2, 0, 0) == doctest::Approx((2 * 20.0 + 3 * 40.0) / 5));
    CHECK(r.lse[2](2, 0) == doctest::Approx(std::log(5.0)));
    CHECK(r.o_branch[2](0, 0, 0) == doctest::Approx(10.0));
    // Compression: block 0 = mean(k0, k1) = ln 2 / 2, block 1 = (ln 2 + ln 3) / 2; t = 2 sees both,
    // with weights sqrt 2 : sqrt 6; values 15 and 30. t = 0 sees none (t < l - 1).
    const double w0 = std::sqrt(2.0) / (std::sqrt(2.0) + std::sqrt(6.0)), w1 = 1 - w0;
    CHECK(r.k_cmp_compressed(1, 0, 0) == doctest::Approx((std::log(2.0) + std::log(3.0)) / 2));
    CHECK(r.o_branch[0](2, 0, 0) == doctest::Approx(w0 * 15 + w1 * 30));
    CHECK(r.lse[0](2, 0) == doctest::Approx(std::log(std::sqrt(2.0) + std::sqrt(6.0))));
    CHECK(r.lse[0](0, 0) == -std::numeric_limits<double>::infinity());
    CHECK(r.o_branch[0](0, 0, 0) == 0);
    CHECK(r.o_branch[0](1, 0, 0) == doctest::Approx(15.0));
    // Scores (Eq. 9 with l = 2, d = 1, l' = 1): p_slc[0] = p0, p_slc[1] = p0 + p1 = 1, p_slc[2] = p1.
    CHECK(r.block_scores(2, 0, 0) == doctest::Approx(w0));
    CHECK(r.block_scores(2, 0, 1) == doctest::Approx(1.0));
    CHECK(r.block_scores(2, 0, 2) == doctest::Approx(w1));
    CHECK(r.block_scores(1, 0, 2) == 0);  // invalid for t = 1
    // Selection at t = 2: own block 2 forced, then the best of {0, 1} is 1: tokens 1 and 2.
    CHECK(r.block_idx(2, 0, 0) == 1);
    CHECK(r.block_idx(2, 0, 1) == 2);
    CHECK(r.o_branch[1](2, 0, 0) == doctest::Approx((2 * 20.0 + 3 * 40.0) / 5));
    // t = 0: one valid block, one selected, -1 padding.
    CHECK(r.block_idx(0, 0, 0) == 0);
    CHECK(r.block_idx(0, 0, 1) == -1);
    // Gates default to ones: o is the plain sum.
    CHECK(r.o(2, 0, 0) == doctest::Approx(r.o_branch[0](2, 0, 0) + r.o_branch[1](2, 0, 0) + r.o_branch[2](2, 0, 0)));
  }
}

TEST_CASE("GQA: a group's scores are the sum of its heads' mapped probabilities, and all its heads use its blocks") {
  Case k;
  k.cfg = test::small_config();
  k.cfg.Hq = 6, k.cfg.Hkv = 2;  // G = 3
  k.seqlens = {120};
  const auto in = test::make_inputs(k);
  const auto r = run(k.cfg, in);
  const Config& c = k.cfg;
  const int64_t G = c.G();
  const double s = c.softmax_scale();
  for (int64_t t = 0; t < 120; t += 7)
    for (int64_t g = 0; g < c.Hkv; ++g) {
      // p_cmp from the returned compressed keys, per head, then Eq. 9 and 10 by hand.
      std::vector<double> P(size_t(c.num_slc_blocks(120)), 0.0);
      const int64_t nv = c.cmp_visible(t);
      for (int64_t h = g * G; h < (g + 1) * G; ++h) {
        std::vector<double> e(static_cast<size_t>(nv));
        double z = 0;
        for (int64_t i = 0; i < nv; ++i) {
          double d = 0;
          for (int64_t a = 0; a < c.dk; ++a) d += in.q(t, h, a) * r.k_cmp_compressed(i, g, a);
          z += (e[size_t(i)] = std::exp(s * d));
        }
        for (int64_t i = 0; i < nv; ++i)
          for (int64_t j = 0; j < int64_t(P.size()); ++j) {
            const int64_t ov = std::min(i * 4 + 8, (j + 1) * 8) - std::max(i * 4, j * 8);
            if (ov > 0) P[size_t(j)] += e[size_t(i)] / z * double(ov) / 4;
          }
      }
      for (int64_t j = 0; j < c.slc_valid(t); ++j) CHECK(r.block_scores(t, g, j) == doctest::Approx(P[size_t(j)]));
      // Every head of the group attends over the group's tokens.
      for (int64_t h = g * G; h < (g + 1) * G; ++h) {
        double z = 0, o0 = 0;
        for (int64_t m = 0; m < c.slc_count; ++m) {
          const int32_t j = r.block_idx(t, g, m);
          if (j < 0) continue;
          for (int64_t u = j * 8; u < std::min<int64_t>((j + 1) * 8, t + 1); ++u) {
            double d = 0;
            for (int64_t a = 0; a < c.dk; ++a) d += in.q(t, h, a) * in.k(u, g, a);
            z += std::exp(s * d);
            o0 += std::exp(s * d) * in.v(u, g, 0);
          }
        }
        CHECK(r.o_branch[1](t, h, 0) == doctest::Approx(o0 / z).epsilon(1e-10));
      }
    }
}

TEST_CASE("forced blocks are always selected and indices are ascending with -1 padding") {
  Case k;
  k.cfg = test::small_config();
  k.seqlens = {300};
  const auto in = test::make_inputs(k);
  const auto r = run(k.cfg, in);
  const Config& c = k.cfg;
  for (int64_t t = 0; t < 300; ++t)
    for (int64_t g = 0; g < c.Hkv; ++g) {
      std::set<int32_t> sel;
      int32_t prev = -1;
      bool padding = false;
      for (int64_t m = 0; m < c.slc_count; ++m) {
        const int32_t j = r.block_idx(t, g, m);
        if (j < 0) {
          padding = true;
          continue;
        }
        REQUIRE_FALSE(padding);  // no index after the padding
        REQUIRE(j > prev);
        prev = j;
        sel.insert(j);
      }
      const int64_t own = t / c.slc_len;
      CHECK(sel.size() == size_t(std::min(c.slc_count, c.slc_valid(t))));
      CHECK(sel.count(0));
      CHECK(sel.count(int32_t(own)));
      if (own >= 1) CHECK(sel.count(int32_t(own - 1)));
    }
}

TEST_CASE("top-n ties go to the lower block index") {
  Config c = test::small_config();  // l' = 8, n = 4, 1 initial + 2 local
  // t = 63: blocks 0..7 valid; forced 0, 6, 7; one more from 1..5.
  std::vector<double> P(8, 0.25);
  CHECK(ref::select_blocks(c, 63, P.data()) == std::vector<int32_t>{0, 1, 6, 7});
  P[3] = 0.5;
  CHECK(ref::select_blocks(c, 63, P.data()) == std::vector<int32_t>{0, 3, 6, 7});
  P[2] = 0.5;  // tie between 2 and 3: the lower index wins
  CHECK(ref::select_blocks(c, 63, P.data()) == std::vector<int32_t>{0, 2, 6, 7});
  P[1] = std::nan("");  // NaN ranks last
  CHECK(ref::select_blocks(c, 63, P.data()) == std::vector<int32_t>{0, 2, 6, 7});
  // At most n valid blocks: all selected.
  CHECK(ref::select_blocks(c, 31, P.data()) == std::vector<int32_t>{0, 1, 2, 3});
  // Constant keys make every interior score exactly equal: both paths pick the lowest indices.
  Case k;
  k.cfg = c;
  k.cfg.compress = CompressKind::Mean;
  k.seqlens = {128};
  auto in = test::make_inputs(k);
  in.k.fill(0.5);
  // Every position, not just the last: both paths must see the same exact ties.
  CHECK(run(k.cfg, in, ref::Path::Fast).block_idx.vec() == run(k.cfg, in, ref::Path::Oracle).block_idx.vec());
  for (auto path : {ref::Path::Fast, ref::Path::Oracle}) {
    const auto r = run(k.cfg, in, path);
    CHECK(r.block_idx(127, 0, 0) == 0);
    CHECK(r.block_idx(127, 0, 1) == 1);
    CHECK(r.block_idx(127, 0, 2) == 14);
    CHECK(r.block_idx(127, 0, 3) == 15);
  }
}

TEST_CASE("queries before the first compressed block see nothing in the compression branch") {
  Case k;
  k.cfg = test::small_config();  // l = 8
  const auto in = test::make_inputs(k);
  const auto r = run(k.cfg, in);
  for (int64_t t = 0; t < 7; ++t)
    for (int64_t h = 0; h < k.cfg.Hq; ++h) {
      CHECK(r.lse[0](t, h) == -std::numeric_limits<double>::infinity());
      CHECK(r.o_branch[0](t, h, 0) == 0);
      CHECK(std::isfinite(r.o(t, h, 0)));
    }
  CHECK(std::isfinite(r.lse[0](7, 0)));
}

TEST_CASE("a batch of packed sequences equals each sequence run alone") {
  Case k;
  k.cfg = test::small_config();
  k.seqlens = {100, 37, 0, 64};
  const auto in = test::make_inputs(k);
  const auto all = run(k.cfg, in);
  for (size_t b = 0; b < k.seqlens.size(); ++b) {
    const int64_t t0 = in.cu_seqlens[b], T = k.seqlens[b];
    auto slice = [&](const Tensor<double>& x) {
      Shape s = x.shape();
      s[0] = T;
      const int64_t row = x.numel() / std::max<int64_t>(x.dim(0), 1);
      return Tensor<double>(s, std::vector<double>(x.vec().begin() + t0 * row, x.vec().begin() + (t0 + T) * row));
    };
    ref::Inputs<double> one;
    one.q = slice(in.q), one.k = slice(in.k), one.v = slice(in.v), one.gates = slice(in.gates), one.phi = in.phi;
    const auto r = run(k.cfg, one);
    CHECK(slice(all.o).vec() == r.o.vec());
    for (int c = 0; c < 3; ++c) CHECK(slice(all.lse[c]).vec() == r.lse[c].vec());
    for (int64_t t = 0; t < T; ++t)
      for (int64_t g = 0; g < k.cfg.Hkv; ++g) {
        for (int64_t m = 0; m < k.cfg.slc_count; ++m) CHECK(all.block_idx(t0 + t, g, m) == r.block_idx(t, g, m));
        for (int64_t j = 0; j < r.block_scores.dim(2); ++j)
          CHECK(all.block_scores(t0 + t, g, j) == r.block_scores(t, g, j));
      }
    const int64_t c0 = all.cu_cmp[b], nc = all.cu_cmp[b + 1] - c0;
    CHECK(nc == r.k_cmp_compressed.dim(0));
    CHECK(std::equal(r.k_cmp_compressed.vec().begin(), r.k_cmp_compressed.vec().end(),
                     all.k_cmp_compressed.vec().begin() + c0 * k.cfg.Hkv * k.cfg.dk));
  }
}

TEST_CASE("float agrees with double to float round-off") {
  Case k;
  k.cfg = test::small_config();
  k.seqlens = {256};
  const auto in = test::make_inputs(k);
  const auto d = run(k.cfg, in);
  const auto inf = in.cast<float>();
  ref::check_inputs(k.cfg, inf);
  const auto f = ref::forward(k.cfg, inf);
  int64_t differ = 0;
  for (int64_t i = 0; i < d.block_idx.numel(); ++i) differ += d.block_idx[i] != f.block_idx[i];
  CHECK(differ == 0);  // no near-tie at this seed
  CHECK(rel_l2(f.o, d.o) < 1e-5);
  for (int c = 0; c < 3; ++c) CHECK(rel_l2(f.o_branch[c], d.o_branch[c]) < 1e-5);
  CHECK(rel_l2(f.block_scores, d.block_scores) < 1e-5);
  CHECK(rel_l2(f.o, d.o) > 1e-9);  // it really ran in float
  const auto ff = ref::full_attention(k.cfg, inf.q, inf.k, inf.v, {});
  const auto fd = ref::full_attention(k.cfg, in.q, in.k, in.v, {});
  CHECK(rel_l2(ff.o, fd.o) < 1e-5);
}

namespace {
// Every output of two runs, bit for bit.
template <class S>
void check_bitwise(const ref::ForwardResult<S>& a, const ref::ForwardResult<S>& b) {
  CHECK(a.o.vec() == b.o.vec());
  for (int c = 0; c < kBranches; ++c) {
    CHECK(a.o_branch[c].vec() == b.o_branch[c].vec());
    CHECK(a.lse[c].vec() == b.lse[c].vec());
  }
  CHECK(a.gates.vec() == b.gates.vec());
  CHECK(a.block_idx.vec() == b.block_idx.vec());
  CHECK(a.block_scores.vec() == b.block_scores.vec());
  CHECK(a.k_cmp_compressed.vec() == b.k_cmp_compressed.vec());
  CHECK(a.v_cmp_compressed.vec() == b.v_cmp_compressed.vec());
}

template <class S>
void check_thread_counts(const Case& k) {
  const auto in = test::make_inputs<S>(k);
  ref::check_inputs(k.cfg, in);
  ref::set_threads(1);
  const auto a = ref::forward(k.cfg, in);
  const auto fa = ref::full_attention(k.cfg, in.q, in.k, in.v, in.cu_seqlens);
  for (int threads : {2, 3}) {
    INFO(threads << " threads");
    ref::set_threads(threads);
    check_bitwise(a, ref::forward(k.cfg, in));
    const auto fb = ref::full_attention(k.cfg, in.q, in.k, in.v, in.cu_seqlens);
    CHECK(fa.o.vec() == fb.o.vec());
    CHECK(fa.lse.vec() == fb.lse.vec());
  }
  ref::set_threads(0);
}
}  // namespace

TEST_CASE("results are bitwise identical for 1, 2 and 3 threads, in double and float") {
  Case k;
  k.cfg = test::small_config();
  k.seqlens = {333, 90, 0, 17};
  k.gates = GateMode::Mlp;
  k.separate_kv = true;
  check_thread_counts<double>(k);
  check_thread_counts<float>(k);
  k.cfg.compress = CompressKind::Linear;
  k.seqlens = {700};
  check_thread_counts<double>(k);
}
