// The analysis library: recall against plain-loop exact attention and its identities, locality on
// workloads with known answers, the traffic model against the paper's table and our forward pass.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <set>

#include "cost.hpp"
#include "decode.hpp"
#include "helpers.hpp"
#include "locality.hpp"
#include "recall.hpp"
#include "traffic.hpp"

using namespace nsa;
using analysis::RecallOptions;
using analysis::Selector;
using test::Case;

namespace {

struct Run {
  Config cfg;
  ref::Inputs<double> in;
  ref::ForwardResult<double> fwd;
};

Run make_run(const Case& k) {
  Run r{k.cfg, test::make_inputs(k), {}};
  ref::check_inputs(r.cfg, r.in);
  r.fwd = ref::forward(r.cfg, r.in);
  return r;
}

// Exact causal attention probabilities of one head at one position, in plain loops.
std::vector<double> exact_probs(const Config& c, const ref::Inputs<double>& in, int64_t row0, int64_t t, int64_t h) {
  const Tensor<double>& K = in.key(Branch::Slc);
  const int64_t g = h / c.G();
  std::vector<double> p(size_t(t + 1));
  double mx = -1e300;
  for (int64_t u = 0; u <= t; ++u) {
    double d = 0;
    for (int64_t a = 0; a < c.dk; ++a) d += in.q(row0 + t, h, a) * K(row0 + u, g, a);
    p[size_t(u)] = c.softmax_scale() * d;
    mx = std::max(mx, p[size_t(u)]);
  }
  double z = 0;
  for (double& x : p) z += (x = std::exp(x - mx));
  for (double& x : p) x /= z;
  return p;
}

std::set<int32_t> selection(const analysis::RecallMaps& m, int64_t row, int64_t g) {
  std::set<int32_t> s;
  for (int64_t i = 0; i < m.idx.dim(2); ++i)
    if (m.idx(row, g, i) >= 0) s.insert(m.idx(row, g, i));
  return s;
}

}  // namespace

TEST_CASE("recall: block masses, recall and masses equal plain-loop exact attention") {
  struct Named {
    const char* name;
    int64_t ls, n, w;
    std::vector<int64_t> seqlens;
  };
  // l' = 24 does not divide the 256-key chunk; l' = 300 is longer than it; two packed sequences.
  for (const Named& nc : {Named{"l'=8 n=4 w=16 packed", 8, 4, 16, {150, 77}}, Named{"l'=24 n=3 w=40", 24, 3, 40, {301}},
                          Named{"l'=300 n=1 w=5", 300, 1, 5, {700}}}) {
    INFO(nc.name);
    Case k;
    k.cfg = test::small_config();
    k.cfg.slc_len = nc.ls, k.cfg.slc_count = nc.n, k.cfg.window = nc.w;
    k.cfg.init_blocks = nc.n >= 3 ? 1 : 0;
    k.cfg.local_blocks = nc.n >= 3 ? 2 : 1;
    k.seqlens = nc.seqlens;
    k.separate_kv = true;  // exact attention must use the selection branch's keys
    const Run r = make_run(k);
    RecallOptions o;
    o.keep_block_mass = o.keep_selections = true;
    const auto res = analysis::recall(r.cfg, r.in, r.fwd, o);
    const Config& c = r.cfg;
    double worst = 0;
    const auto cu = r.in.seqlens_or_single();
    for (size_t b = 0; b + 1 < cu.size(); ++b)
      for (int64_t t = 0; t < cu[b + 1] - cu[b]; t += 3)
        for (int64_t g = 0; g < c.Hkv; ++g) {
          const int64_t row = cu[b] + t, valid = c.slc_valid(t);
          std::vector<double> A(size_t(valid), 0.0), tok(size_t(t + 1), 0.0);  // group-average mass
          for (int64_t h = g * c.G(); h < (g + 1) * c.G(); ++h) {
            const auto p = exact_probs(c, r.in, cu[b], t, h);
            for (int64_t u = 0; u <= t; ++u) {
              A[size_t(u / c.slc_len)] += p[size_t(u)] / double(c.G());
              tok[size_t(u)] += p[size_t(u)] / double(c.G());
            }
          }
          for (int64_t j = 0; j < res.block_mass.dim(2); ++j)
            worst = std::max(worst, std::abs(res.block_mass(row, g, j) - (j < valid ? A[size_t(j)] : 0.0)));
          // The oracle: the n heaviest blocks (no forced ones), by an independent sort.
          std::vector<int32_t> order(static_cast<size_t>(valid));
          for (int32_t j = 0; j < valid; ++j) order[size_t(j)] = j;
          std::stable_sort(order.begin(), order.end(), [&](int32_t a, int32_t bb) { return A[size_t(a)] > A[size_t(bb)]; });
          const std::set<int32_t> O(order.begin(), order.begin() + std::min<int64_t>(valid, c.slc_count));
          CHECK(selection(res.map(Selector::Oracle), row, g) == O);
          for (const auto& m : res.maps) {
            INFO("selector " << analysis::to_string(m.selector) << " t=" << t);
            const std::set<int32_t> S = selection(m, row, g);
            if (m.selector == Selector::Nsa) {
              std::set<int32_t> nsa;
              for (int64_t i = 0; i < c.slc_count; ++i)
                if (r.fwd.block_idx(row, g, i) >= 0) nsa.insert(r.fwd.block_idx(row, g, i));
              CHECK(S == nsa);
            }
            int64_t hit = 0;
            for (int32_t j : S) hit += O.count(j);
            double mass = 0, mw = 0;
            for (int64_t u = 0; u <= t; ++u) {
              const bool in_s = S.count(int32_t(u / c.slc_len)) > 0, in_w = u >= t - c.window + 1;
              if (in_s) mass += tok[size_t(u)];
              if (in_s || in_w) mw += tok[size_t(u)];
            }
            CHECK(m.recall(row, g) == doctest::Approx(double(hit) / double(O.size())).epsilon(1e-15));
            CHECK(m.mass(row, g) == doctest::Approx(mass).epsilon(1e-11));
            CHECK(m.mass_with_window(row, g) == doctest::Approx(mw).epsilon(1e-11));
          }
        }
    CHECK(worst < 1e-13);
  }
}

TEST_CASE("recall: selecting every block gives recall 1 and mass 1 for every selector") {
  Case k;
  k.cfg = test::small_config();
  k.cfg.slc_count = 40;  // >= ceil(300 / 8) = 38 blocks
  k.seqlens = {300};
  const Run r = make_run(k);
  RecallOptions o;
  o.include_trivial = true;  // here every position is trivial
  const auto res = analysis::recall(r.cfg, r.in, r.fwd, o);
  for (const auto& m : res.maps) {
    INFO(analysis::to_string(m.selector));
    for (int64_t i = 0; i < m.recall.numel(); ++i) {
      REQUIRE(m.recall[i] == 1.0);
      REQUIRE(m.mass[i] == doctest::Approx(1.0).epsilon(1e-13));
      REQUIRE(m.mass_with_window[i] == doctest::Approx(1.0).epsilon(1e-13));
    }
    const auto s = res.overall(m.selector);
    CHECK(s.positions == 300 * r.cfg.Hkv);
    CHECK(s.recall == 1.0);
    CHECK(s.mass == doctest::Approx(1.0).epsilon(1e-13));
  }
  // Without include_trivial no position is aggregated: the aggregates are NaN, not 1.
  const auto none = analysis::recall(r.cfg, r.in, r.fwd, RecallOptions{});
  CHECK(none.overall(Selector::Nsa).positions == 0);
  CHECK(std::isnan(none.overall(Selector::Nsa).recall));
}

TEST_CASE("recall: the oracle's recall is 1 and no selector holds more mass than it") {
  Case k;
  k.cfg = test::small_config();
  k.seqlens = {400};
  const Run r = make_run(k);
  const auto res = analysis::recall(r.cfg, r.in, r.fwd, RecallOptions{});
  const auto& oracle = res.map(Selector::Oracle);
  for (int64_t i = 0; i < oracle.recall.numel(); ++i) REQUIRE(oracle.recall[i] == 1.0);
  CHECK(res.overall(Selector::Oracle).recall == 1.0);
  for (const auto& m : res.maps)
    for (int64_t i = 0; i < m.mass.numel(); ++i) {
      REQUIRE(m.mass[i] <= oracle.mass[i] + 1e-12);
      REQUIRE(m.mass_with_window[i] >= m.mass[i] - 1e-15);
      REQUIRE(m.recall[i] >= 0.0);
      REQUIRE(m.recall[i] <= 1.0);
    }
  // On random data the other selectors really miss blocks (the test could fail).
  CHECK(res.overall(Selector::Random).recall < 0.9);
  CHECK(res.overall(Selector::Oracle).mass > res.overall(Selector::Random).mass);
}

TEST_CASE("recall: the aggregates are the means of the maps over non-trivial positions, per bucket and group") {
  Case k;
  k.cfg = test::small_config();  // n = 4, l' = 8: positions t < 32 are trivial
  k.seqlens = {200, 130};
  const Run r = make_run(k);
  RecallOptions o;
  o.buckets = 3;
  const auto res = analysis::recall(r.cfg, r.in, r.fwd, o);
  CHECK(res.bucket_width == 67);  // ceil(200 / 3)
  CHECK(res.rows.size() == o.selectors.size() * 4 * 3);  // (3 buckets + all) x (2 groups + all)
  const auto& m = res.map(Selector::Quest);
  for (const auto& row : res.rows) {
    if (row.selector != Selector::Quest) continue;
    INFO("bucket " << row.bucket << " group " << row.group);
    double sum = 0, sum_m = 0;
    int64_t cnt = 0;
    for (auto [row0, T] : {std::pair<int64_t, int64_t>{0, 200}, {200, 130}})
      for (int64_t t = std::max<int64_t>(32, row.t_lo); t < std::min(T, row.t_hi); ++t)
        for (int64_t g = 0; g < 2; ++g)
          if (row.group < 0 || row.group == g) {
            sum += m.recall(row0 + t, g), sum_m += m.mass(row0 + t, g);
            ++cnt;
          }
    CHECK(row.stats.positions == cnt);
    CHECK(row.stats.recall == doctest::Approx(sum / double(cnt)).epsilon(1e-14));
    CHECK(row.stats.mass == doctest::Approx(sum_m / double(cnt)).epsilon(1e-14));
  }
  CHECK(res.overall(Selector::Quest).positions == (200 - 32 + 130 - 32) * 2);
}

TEST_CASE("recall: a planted needle is recalled by NSA and the oracle, and carries most of the mass") {
  Case k;
  k.cfg = test::small_config();  // l' = 8, n = 4 (1 initial + 2 local), G = 2
  k.cfg.compress = CompressKind::Mean;
  k.seqlens = {512};
  auto in = test::make_inputs(k);
  // Every query of group 0 has a component along e0; the needle key at u = 203 points along e0
  // strongly, every other key is small: the needle dominates attention for t >= 203.
  const int64_t needle = 203, nb = needle / 8;
  for (int64_t t = 0; t < 512; ++t)
    for (int64_t h = 0; h < 2; ++h) in.q(t, h, 0) = 3.0;
  for (auto& x : in.k.vec()) x *= 0.1;
  in.k(needle, 0, 0) = 8.0;
  ref::check_inputs(k.cfg, in);
  const auto fwd = ref::forward(k.cfg, in);
  RecallOptions o;
  o.keep_selections = true;
  const auto res = analysis::recall(k.cfg, in, fwd, o);
  int64_t checked = 0;
  for (int64_t t = needle + 24; t < 512; ++t) {  // the needle's block is neither local nor forced
    CHECK(selection(res.map(Selector::Oracle), t, 0).count(int32_t(nb)) == 1);
    CHECK(selection(res.map(Selector::Nsa), t, 0).count(int32_t(nb)) == 1);
    CHECK(selection(res.map(Selector::Quest), t, 0).count(int32_t(nb)) == 1);
    CHECK(res.map(Selector::Nsa).mass(t, 0) > 0.5);
    ++checked;
  }
  CHECK(checked == 512 - needle - 24);
  // The random selector usually misses it: its mass is far lower.
  double nsa = 0, rnd = 0;
  for (int64_t t = needle + 24; t < 512; ++t) nsa += res.map(Selector::Nsa).mass(t, 0), rnd += res.map(Selector::Random).mass(t, 0);
  CHECK(rnd < 0.5 * nsa);
}

TEST_CASE("recall: the random selector's recall matches its expectation") {
  Case k;
  k.cfg = test::small_config();
  k.cfg.Hkv = 1, k.cfg.Hq = 2;
  k.cfg.slc_count = 6;  // 1 initial + 2 local + 3 random
  k.seqlens = {2048};
  const Run r = make_run(k);
  RecallOptions o;
  o.selectors = {Selector::Oracle, Selector::Random};
  o.keep_selections = true;
  o.seed = 7;
  const auto res = analysis::recall(r.cfg, r.in, r.fwd, o);
  const Config& c = r.cfg;
  // Per position: the forced set F, the rest R (|R| = V - |F|), m = n - |F| drawn from R without
  // replacement; |S ∩ O| - |O ∩ F| is hypergeometric with K = |O \ F| successes in R.
  double expect = 0, var = 0, got = 0;
  int64_t cnt = 0;
  for (int64_t t = 0; t < 2048; ++t) {
    const int64_t V = c.slc_valid(t), own = t / c.slc_len;
    if (V <= c.slc_count) continue;
    const std::set<int32_t> F{0, int32_t(own - 1), int32_t(own)};
    const auto O = selection(res.map(Selector::Oracle), t, 0);
    int64_t of = 0;
    for (int32_t j : O) of += F.count(j);
    const double Kd = double(int64_t(O.size()) - of), Nr = double(V - 3), m = 3, no = double(O.size());
    expect += (double(of) + m * Kd / Nr) / no;
    var += m * (Kd / Nr) * ((Nr - Kd) / Nr) * ((Nr - m) / (Nr - 1)) / (no * no);
    got += res.map(Selector::Random).recall(t, 0);
    ++cnt;
  }
  const double sd = std::sqrt(var) / double(cnt);
  MESSAGE("random recall " << got / cnt << ", expected " << expect / cnt << " +- " << sd);
  CHECK(std::abs(got - expect) / double(cnt) < 4 * sd);
  CHECK(sd < 0.01);  // the test has power
  // Another seed draws other blocks.
  o.seed = 8;
  const auto res2 = analysis::recall(r.cfg, r.in, r.fwd, o);
  CHECK(res2.map(Selector::Random).recall.vec() != res.map(Selector::Random).recall.vec());
}

TEST_CASE("recall: quest and meanpool rank exactly when keys are constant within blocks (G = 1)") {
  Case k;
  k.cfg = test::small_config();
  k.cfg.Hq = k.cfg.Hkv = 2;  // G = 1: scores per head, no sum over heads
  k.cfg.init_blocks = k.cfg.local_blocks = 0;
  k.seqlens = {400};
  auto in = test::make_inputs(k);
  for (int64_t u = 0; u < 400; ++u)  // every key equals its block's first key
    for (int64_t g = 0; g < 2; ++g)
      for (int64_t a = 0; a < k.cfg.dk; ++a) in.k(u, g, a) = in.k(u / 8 * 8, g, a);
  ref::check_inputs(k.cfg, in);
  const auto fwd = ref::forward(k.cfg, in);
  const auto res = analysis::recall(k.cfg, in, fwd, RecallOptions{});
  int64_t checked = 0;
  for (int64_t t = 39; t < 400; t += 8)  // last token of a block: every valid block is whole
    for (int64_t g = 0; g < 2; ++g) {
      CHECK(res.map(Selector::Quest).recall(t, g) == 1.0);
      CHECK(res.map(Selector::Meanpool).recall(t, g) == 1.0);
      ++checked;
    }
  CHECK(checked == 2 * 46);
  CHECK(res.overall(Selector::Random).recall < 0.9);  // not trivially 1
}

TEST_CASE("recall: meanpool selects as NSA with mean compression over l = d = l' blocks (G = 1)") {
  // NSA's Eq. 8-10 with phi = mean and l = d = l' scores block j by softmax(s q . mean_j); with one
  // head per group the softmax does not change the order, so both select the same blocks (the own,
  // partial block is forced in both).
  Case k;
  k.cfg = test::small_config();
  k.cfg.Hq = k.cfg.Hkv = 2;
  k.cfg.compress = CompressKind::Mean;
  k.cfg.cmp_len = k.cfg.cmp_stride = k.cfg.slc_len = 8;
  k.seqlens = {500};
  const Run r = make_run(k);
  RecallOptions o;
  o.selectors = {Selector::Nsa, Selector::Meanpool};
  o.keep_selections = true;
  const auto res = analysis::recall(r.cfg, r.in, r.fwd, o);
  CHECK(res.map(Selector::Nsa).idx.vec() == res.map(Selector::Meanpool).idx.vec());
  CHECK(res.map(Selector::Nsa).recall.vec() == res.map(Selector::Meanpool).recall.vec());
  CHECK(res.overall(Selector::Nsa).recall < 0.9);  // a real selection, not everything
}

TEST_CASE("recall: results are bitwise identical for 1 and 2 threads") {
  Case k;
  k.cfg = test::small_config();
  k.seqlens = {333, 90};
  const Run r = make_run(k);
  RecallOptions o;
  o.keep_block_mass = true;
  ref::set_threads(1);
  const auto a = analysis::recall(r.cfg, r.in, r.fwd, o);
  ref::set_threads(2);
  const auto b = analysis::recall(r.cfg, r.in, r.fwd, o);
  ref::set_threads(0);
  CHECK(a.block_mass.vec() == b.block_mass.vec());
  for (size_t s = 0; s < a.maps.size(); ++s) {
    CHECK(a.maps[s].recall.vec() == b.maps[s].recall.vec());
    CHECK(a.maps[s].mass_with_window.vec() == b.maps[s].mass_with_window.vec());
  }
}

TEST_CASE("recall: bad options and mismatched forward results are refused") {
  Case k;
  k.cfg = test::small_config();
  k.seqlens = {64};
  const Run r = make_run(k);
  RecallOptions o;
  o.selectors = {Selector::Nsa, Selector::Nsa};
  CHECK_THROWS_WITH_AS(analysis::recall(r.cfg, r.in, r.fwd, o), "recall: selector 'nsa' is given twice", ConfigError);
  o = RecallOptions{};
  o.buckets = 0;
  CHECK_THROWS_AS(analysis::recall(r.cfg, r.in, r.fwd, o), ConfigError);
  CHECK_THROWS_AS(analysis::recall(r.cfg, r.in, ref::ForwardResult<double>{}, RecallOptions{}), InputError);
  o = RecallOptions{};
  o.selectors = {Selector::Oracle};  // no NSA: the forward result is not needed
  CHECK(analysis::recall(r.cfg, r.in, ref::ForwardResult<double>{}, o).overall(Selector::Oracle).recall == 1.0);
  CHECK_THROWS_AS(analysis::parse_selector("topk"), ConfigError);
}

// ---- Locality ----------------------------------------------------------------------------------

namespace {
ref::Inputs<double> scalar_inputs(int64_t T, double q, const std::function<double(int64_t)>& key) {
  ref::Inputs<double> in;
  in.q = Tensor<double>({T, 1, 1}, q);
  in.k = Tensor<double>({T, 1, 1});
  in.v = Tensor<double>({T, 1, 1}, 1.0);
  for (int64_t u = 0; u < T; ++u) in.k(u, 0, 0) = key(u);
  return in;
}
Config scalar_config() {
  Config c;
  c.Hq = c.Hkv = c.dk = c.dv = 1;
  c.scale = 1;
  return c;
}
}  // namespace

TEST_CASE("locality: attention spread one token per 8 has block/token ratio 1/8") {
  const Config c = scalar_config();
  // Logits 50 at every 8th key, 0 elsewhere: the mass sits on P = t/8 + 1 peaks, one per 8-block.
  const auto in = scalar_inputs(4096, 1.0, [](int64_t u) { return u % 8 == 0 ? 50.0 : 0.0; });
  analysis::LocalityOptions o;
  o.block_sizes = {8, 16, 64};
  o.ks = {1, 2};
  o.queries = 4;  // t = 1023, 2047, 3071, 4095: at least 128 peaks each
  const auto r = analysis::locality(c, in, o);
  CHECK(r.rows == 4);
  CHECK(r.positions == std::vector<int64_t>{1023, 2047, 3071, 4095});
  for (const auto& x : r.topk) {
    INFO("B=" << x.block_size << " k=" << x.k);
    CHECK(x.rows == 4);
    CHECK(x.ratio == doctest::Approx(1.0 / 8).epsilon(1e-12));
  }
  // Logits alternating +-1 (period 2): autocorrelation -1 at odd lags, +1 at even ones.
  const auto alt = scalar_inputs(1024, 1.0, [](int64_t u) { return u % 2 ? -1.0 : 1.0; });
  analysis::LocalityOptions oa;
  oa.lags = {1, 2, 3};
  oa.queries = 2;  // t = 511, 1023: an even number of keys, mean 0
  const auto ra = analysis::locality(c, alt, oa);
  REQUIRE(ra.autocorr.size() == 3);
  CHECK(ra.autocorr[0].autocorr == doctest::Approx(-1.0).epsilon(1e-12));
  CHECK(ra.autocorr[1].autocorr == doctest::Approx(1.0).epsilon(1e-12));
  CHECK(ra.autocorr[2].autocorr == doctest::Approx(-1.0).epsilon(1e-12));
}

TEST_CASE("locality: attention on the query's own token is at distance 0 and perfectly blockwise") {
  Case k;
  k.cfg = test::small_config();
  k.cfg.dk = 64;
  k.seqlens = {1000};
  auto in = test::make_inputs(k);
  const Config& c = k.cfg;
  for (int64_t t = 0; t < 1000; ++t)  // q = 200 * k_t / |k_t|^2: logit 200/sqrt(dk) on itself, ~0 elsewhere
    for (int64_t h = 0; h < c.Hq; ++h) {
      const int64_t g = h / c.G();
      double n2 = 0;
      for (int64_t a = 0; a < c.dk; ++a) n2 += in.k(t, g, a) * in.k(t, g, a);
      for (int64_t a = 0; a < c.dk; ++a) in.q(t, h, a) = 8.0 * 200 * in.k(t, g, a) / n2;
    }
  analysis::LocalityOptions o;
  o.queries = 10;
  const auto r = analysis::locality(c, in, o);
  CHECK(r.rows == 10 * c.Hq);
  REQUIRE(r.distance.size() == 11);  // [0,1), [1,2), ..., [512,1024)
  CHECK(r.distance[0].mass == doctest::Approx(1.0).epsilon(1e-9));
  double total = 0;
  for (const auto& d : r.distance) total += d.mass;
  CHECK(total == doctest::Approx(1.0).epsilon(1e-13));
  int64_t counted = 0;
  for (const auto& x : r.topk)
    if (x.rows > 0) {  // (B, k) with k*B < t+1 at some sampled position
      CHECK(x.ratio == doctest::Approx(1.0).epsilon(1e-9));
      ++counted;
    } else {
      CHECK(std::isnan(x.ratio));
    }
  CHECK(counted == 22);  // all but k*B = 1024, 1024, 2048 (B = 64, k = 16; B = 128, k = 8, 16) >= 1000 tokens
  CHECK(std::abs(r.autocorr[0].autocorr) < 0.2);  // one spike in random logits: barely correlated
  o.block_sizes = {0};
  CHECK_THROWS_AS(analysis::locality(c, in, o), ConfigError);
}

// ---- Traffic -----------------------------------------------------------------------------------

namespace {
Config paper_config() {
  Config c;  // defaults: l = 32, d = 16, l' = 64, n = 16, w = 512
  c.Hq = 64, c.Hkv = 4, c.dk = 192, c.dv = 128;
  return c;
}
}  // namespace

TEST_CASE("traffic: the paper convention reproduces the paper's decode table") {
  const Config c = paper_config();
  const struct {
    int64_t s, tokens;
    double speedup;  // as printed in the paper, one decimal
  } table[] = {{8192, 2048, 4.0}, {16384, 2560, 6.4}, {32768, 3584, 9.1}, {65536, 5632, 11.6}};
  for (const auto& row : table) {
    const auto t = analysis::decode_traffic(c, row.s, 1, 2, analysis::Convention::Paper);
    CHECK(t.full.tokens == row.s);
    CHECK(t.nsa().tokens == row.tokens);
    CHECK(std::round(t.expected_speedup() * 10) / 10 == doctest::Approx(row.speedup).epsilon(1e-12));
    // K/V bytes only, shared by the group's 16 heads: 2 FLOPs per byte per head in bf16.
    CHECK(t.nsa().bytes == double(row.tokens) * 4 * (192 + 128) * 2);
    CHECK(t.full.intensity() == doctest::Approx(16.0));
  }
}

TEST_CASE("traffic: the exact convention counts what the reference forward reads") {
  Config c = test::small_config();  // l = 8, d = 4, l' = 8, n = 4, w = 16
  Case k;
  k.cfg = c;
  k.seqlens = {300};
  const Run r = make_run(k);
  for (int64_t s : {1, 7, 8, 9, 31, 32, 33, 100, 300}) {
    INFO("s = " << s);
    const int64_t t = s - 1;
    const auto tr = analysis::decode_traffic(c, s, 1, 4, analysis::Convention::Exact);
    int64_t slc = 0;
    for (int64_t m = 0; m < c.slc_count; ++m) {
      const int32_t j = r.fwd.block_idx(t, 0, m);
      if (j >= 0) slc += std::min<int64_t>((j + 1) * 8, s) - j * 8;
    }
    int64_t cmp = 0;  // compressed blocks wholly in [0, t]
    for (int64_t i = 0; i * 4 + 8 - 1 <= t; ++i) ++cmp;
    CHECK(tr.slc.tokens == slc);
    CHECK(tr.cmp.tokens == cmp);
    CHECK(tr.win.tokens == std::min<int64_t>(16, s));
    CHECK(tr.full.tokens == s);
    CHECK(tr.phi.tokens == 2.0);  // l/d raw rows per step
    // FLOPs: 2 (dk + dv) per key and query head.
    CHECK(tr.slc.flops == double(slc) * 2 * (12 + 8) * 4);
  }
  // phi is amortised: over any d consecutive steps the decode path emits once (l raw rows and
  // phi's parameters in, reference/decode.hpp), and the model adds the compressed row written.
  for (int64_t s0 : {8, 50, 301}) {
    double emit_bytes = 0;
    for (int64_t s = s0; s < s0 + 4; ++s) {
      const auto b = ref::step_bytes(c, ref::step_tokens(c, s), 4);
      emit_bytes += b.emit + b.phi;
    }
    const double row = 2.0 * (12 + 8) * 4;  // one compressed key and value row, Hkv = 2, fp32
    CHECK(analysis::decode_traffic(c, s0, 1, 4).phi.bytes == doctest::Approx((emit_bytes + row) / 4));
  }
}

TEST_CASE("traffic: per-head loading moves G times the K/V bytes for the same FLOPs") {
  const Config c = paper_config();
  analysis::TrafficOptions head;
  head.loading = analysis::Loading::PerHead;
  for (bool decode : {true, false}) {
    INFO((decode ? "decode" : "prefill"));
    const auto g = decode ? analysis::decode_traffic(c, 4096, 3, 2, analysis::Convention::Paper)
                          : analysis::prefill_traffic(c, 4096, 3, 2);
    const auto h = decode ? analysis::decode_traffic(c, 4096, 3, 2, analysis::Convention::Paper, head)
                          : analysis::prefill_traffic(c, 4096, 3, 2, head);
    const double io = decode ? 0 : 3.0 * 4096 * 64 * (192 + 128) * 2;  // q read, o written per kernel
    for (auto [a, b] : {std::pair{g.slc, h.slc}, {g.cmp, h.cmp}, {g.win, h.win}, {g.full, h.full}}) {
      CHECK(b.flops == a.flops);
      CHECK(b.bytes - io == doctest::Approx(16 * (a.bytes - io)));
    }
  }
  // Batch scales bytes and FLOPs linearly.
  const auto b1 = analysis::prefill_traffic(c, 2048, 1, 2), b4 = analysis::prefill_traffic(c, 2048, 4, 2);
  CHECK(b4.nsa().flops == doctest::Approx(4 * b1.nsa().flops));
  CHECK(b4.slc.bytes == doctest::Approx(4 * b1.slc.bytes));
}

TEST_CASE("traffic: prefill counts tiles, FLOPs match the cost model, roofline is the slower bound") {
  const Config c = paper_config();
  analysis::TrafficOptions one_tile;
  one_tile.q_tile = 1000;
  const auto t = analysis::prefill_traffic(c, 1000, 1, 2, one_tile);
  CHECK(t.full.tokens == 1000);  // one tile reads every key once
  CHECK(t.win.tokens == 1000);
  CHECK(t.full.flops == doctest::Approx(analysis::full_forward_flops(c, 1000)));
  const auto f = analysis::nsa_forward_flops(c, 1000);
  CHECK(t.nsa().flops == doctest::Approx(f.total()));
  CHECK(t.phi.flops == doctest::Approx(f.phi));
  const auto t64 = analysis::prefill_traffic(c, 1000, 1, 2);
  CHECK(t64.full.tokens == 64.0 * (1 + 2 + 3 + 4 + 5 + 6 + 7 + 8 + 9 + 10 + 11 + 12 + 13 + 14 + 15) + 1000);
  const analysis::Device d{"test", 1e15, 1e12};
  CHECK(analysis::roofline_ms(1e12, 1e6, d) == doctest::Approx(1.0));  // compute-bound: 1 ms
  CHECK(analysis::roofline_ms(1e6, 2e9, d) == doctest::Approx(2.0));   // memory-bound: 2 ms
  CHECK(analysis::device_preset("h100").bytes_per_s == 3.35e12);
  CHECK_THROWS_AS(analysis::device_preset("tpu"), ConfigError);
  CHECK_THROWS_AS(analysis::decode_traffic(c, 0, 1, 2), ConfigError);
}
