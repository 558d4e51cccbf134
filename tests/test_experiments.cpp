// The experiments' machinery: the synthetic workloads plant what they say, and the sweep's grid,
// keys, CSV round trip and per-point metrics behave as documented, and training learns (docs/experiments.md).
#include <doctest/doctest.h>

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>

#include "npy.hpp"
#include "rng.hpp"
#include "sweep.hpp"
#include "train.hpp"
#include "workloads.hpp"

using namespace nsa;
using namespace nsa::cli;

namespace {

GenSpec needle_spec() {
  GenSpec s;
  s.workload = "needle";
  s.T = 2000, s.Hq = 4, s.Hkv = 2, s.dk = 32, s.dv = 16;
  s.depths = {0.0, 0.3, 1.0};
  s.needle_len = 10, s.questions = 5, s.needle_strength = 6;
  s.seed = 7;
  return s;
}

// s q.k for sequence b, query t, head h against key u of KV head g.
double logit(const Generated& w, const GenSpec& s, int64_t b, int64_t t, int64_t h, int64_t u, int64_t g) {
  const auto& q = w.at("q");
  const auto& k = w.at("k");
  const double* qr = q.data() + ((b * s.T + t) * s.Hq + h) * s.dk;
  const double* kr = k.data() + ((b * s.T + u) * s.Hkv + g) * s.dk;
  double d = 0;
  for (int64_t e = 0; e < s.dk; ++e) d += qr[e] * kr[e];
  return d / std::sqrt(double(s.dk));
}

}  // namespace

TEST_CASE("workload random: the seeded stream of N(0, 1) draws, q first") {
  GenSpec s;
  s.T = 5, s.Hq = 2, s.Hkv = 1, s.dk = 3, s.dv = 3, s.seed = 11;
  const Generated g = generate(s);
  Rng rng(11);
  CHECK(g.at("q")[0] == rng.normal());
  CHECK(g.at("q")[1] == rng.normal());
  CHECK(g.at("q").shape() == Shape{5, 2, 3});
  CHECK(g.size() == 3);
}

TEST_CASE("workload needle: layout, one sequence per depth, the planted margin and answer") {
  const GenSpec s = needle_spec();
  const NeedleLayout lay = needle_layout(s);
  // span = T - questions - needle_len = 1985: depth 0 -> 0, 0.3 -> round(595.5) = 596, 1 -> 1985.
  CHECK(lay.start == std::vector<int64_t>{0, 596, 1985});
  CHECK(lay.first_question == 1995);
  const Generated g = generate(s);
  CHECK(g.at("q").shape() == Shape{3, 2000, 4, 32});
  CHECK(g.at("needle_value").shape() == Shape{3, 2, 16});
  const int64_t G = s.Hq / s.Hkv;
  for (int64_t b = 0; b < 3; ++b)
    for (int64_t h = 0; h < s.Hq; ++h) {
      const int64_t grp = h / G, t = s.T - 1;
      // Needle tokens: logit N(strength, 1); haystack tokens: N(0, 1).
      double needle = 0, hay = 0, hay2 = 0;
      int64_t nh = 0;
      for (int64_t u = 0; u < lay.first_question; ++u) {
        const double x = logit(g, s, b, t, h, u, grp);
        if (u >= lay.start[size_t(b)] && u < lay.start[size_t(b)] + lay.len) {
          needle += x / double(lay.len);
        } else {
          hay += x, hay2 += x * x, ++nh;
        }
      }
      hay /= double(nh);
      const double sd = std::sqrt(hay2 / double(nh) - hay * hay);
      INFO("sequence " << b << " head " << h);
      CHECK(std::abs(needle - s.needle_strength) < 1.3);  // mean of 10 N(0, 1): 4 sigma
      CHECK(std::abs(hay) < 0.15);
      CHECK(sd == doctest::Approx(1.0).epsilon(0.1));
      // The needle's values are the answer; the questions of a group are identical.
      const auto& v = g.at("v");
      const double* vr = v.data() + ((b * s.T + lay.start[size_t(b)] + 3) * s.Hkv + grp) * s.dv;
      const double* ans = g.at("needle_value").data() + (b * s.Hkv + grp) * s.dv;
      CHECK(std::equal(vr, vr + s.dv, ans));
    }
}

TEST_CASE("workload needle: bad settings are refused naming the field") {
  GenSpec s = needle_spec();
  s.depths = {0.5, 1.5};
  CHECK_THROWS_WITH_AS(generate(s), doctest::Contains("depth = 1.5"), ConfigError);
  s = needle_spec();
  s.B = 2;
  CHECK_THROWS_WITH_AS(generate(s), doctest::Contains("one sequence per depth"), ConfigError);
  s = needle_spec();
  s.T = 14;
  CHECK_THROWS_WITH_AS(generate(s), doctest::Contains("needle_len + questions = 15"), ConfigError);
}

TEST_CASE("workload clustered: the keys' correlation along the sequence decays as exp(-lag / corr_len)") {
  GenSpec s;
  s.workload = "clustered";
  s.T = 8192, s.Hq = 1, s.Hkv = 1, s.dk = 64, s.dv = 4;
  s.corr_len = 32, s.cluster_strength = 2;
  const Generated g = generate(s);
  const auto& k = g.at("k");
  auto corr = [&](int64_t lag) {
    double xy = 0, xx = 0;
    for (int64_t t = 0; t + lag < s.T; ++t)
      for (int64_t e = 0; e < s.dk; ++e) {
        xy += k(t, 0, e) * k(t + lag, 0, e);
        xx += k(t, 0, e) * k(t, 0, e);
      }
    return xy / xx;
  };
  // Var k = a^2 + 1 = 5, Cov(k[t], k[t+L]) = a^2 exp(-L / corr_len).
  CHECK(corr(0) == doctest::Approx(1.0));
  CHECK(corr(1) == doctest::Approx(0.8 * std::exp(-1.0 / 32)).epsilon(0.06));
  CHECK(corr(32) == doctest::Approx(0.8 * std::exp(-1.0)).epsilon(0.15));
  CHECK(std::abs(corr(320)) < 0.05);
  s.corr_len = 0;  // independent tokens
  const Generated g0 = generate(s);
  double xy = 0, xx = 0;
  for (int64_t t = 0; t + 1 < s.T; ++t)
    for (int64_t e = 0; e < s.dk; ++e) xy += g0.at("k")(t, 0, e) * g0.at("k")(t + 1, 0, e), xx += g0.at("k")(t, 0, e) * g0.at("k")(t, 0, e);
  CHECK(std::abs(xy / xx) < 0.02);
}

namespace {

SweepAxes small_axes() {
  SweepAxes a;
  a.spec.workload = "needle";
  a.spec.Hq = 4, a.spec.Hkv = 2, a.spec.dk = 16, a.spec.dv = 8;
  a.spec.needle_len = 8, a.spec.questions = 4;
  a.context = {300};
  a.depth = {0.0, 0.5};
  a.needle_strength = {8};
  a.corr_len = {64};
  a.cmp_len = {8}, a.cmp_stride = {4}, a.slc_len = {16, 32}, a.slc_count = {4}, a.window = {16};
  a.init_blocks = {1}, a.local_blocks = {2};
  a.compress = {"mean", "mlp"};
  a.selector = {"nsa"};
  a.precision = {"double"};
  return a;
}

}  // namespace

TEST_CASE("sweep: the grid is the cartesian product, in axis order, and bad points are named") {
  SweepAxes a = small_axes();
  auto pts = expand(a);
  REQUIRE(pts.size() == 2 * 2 * 2);
  CHECK(pts[0].spec.depths[0] == 0.0);
  CHECK(pts[0].cfg.slc_len == 16);
  CHECK(to_string(pts[0].cfg.compress) == std::string("mean"));
  CHECK(to_string(pts[1].cfg.compress) == std::string("mlp"));
  CHECK(pts[2].cfg.slc_len == 32);
  CHECK(pts[4].spec.depths[0] == 0.5);
  // corr_len does not apply to the needle workload: it does not multiply the grid.
  a.corr_len = {1, 2, 3};
  CHECK(expand(a).size() == 8);
  a.slc_count = {2};  // init 1 + local 2 > n = 2
  CHECK_THROWS_WITH_AS(expand(a), doctest::Contains("slc_len=16;slc_count=2"), ConfigError);
}

TEST_CASE("sweep: rows survive the CSV round trip with the same keys and types") {
  const auto pts = expand(small_axes());
  std::vector<json> rows;
  for (const auto& p : pts) {
    json r = point_params(p);
    r["rel_error"] = 0.125;
    r["needle_found"] = nullptr;
    r["queries"] = 4;
    rows.push_back(r);
  }
  const auto path = (std::filesystem::temp_directory_path() / "nsa_test_sweep.csv").string();
  write_file_atomic(path, sweep_csv(rows));
  const auto back = read_sweep_csv(path);
  std::remove(path.c_str());
  REQUIRE(back.size() == rows.size());
  for (size_t i = 0; i < rows.size(); ++i) {
    CHECK(row_key(back[i]) == row_key(rows[i]));
    CHECK(back[i]["rel_error"].get<double>() == 0.125);
    CHECK(back[i]["queries"].is_number_integer());
    CHECK(back[i]["needle_found"].is_null());
    CHECK(back[i]["corr_len"].is_null());  // not a needle parameter
  }
  // Distinct points have distinct keys.
  CHECK(row_key(rows[0]) != row_key(rows[1]));
}

TEST_CASE("sweep: a point's metrics; identities that pin rel_error and needle_found") {
  SweepAxes a = small_axes();
  a.depth = {0.5};
  a.slc_len = {16};
  a.compress = {"mean"};
  auto pts = expand(a);
  REQUIRE(pts.size() == 1);
  SweepPoint p = pts[0];
  const WorkloadData w = load_workload_data(p);
  CHECK(w.rows.size() == 4);
  CHECK(w.rows.front() == 296);
  // Strength 8 with mean compression: the needle's block wins the selection for every question.
  json r = evaluate(p, w, Timing{});
  CHECK(r["needle_found"].get<double>() == 1.0);
  CHECK(r["queries"].get<int64_t>() == 4);
  CHECK(r["flop_ratio"].get<double>() > 1.0);
  CHECK(r["ms_nsa"].is_null());
  // A window that covers the whole sequence is full attention; so is selecting every block.
  p.cfg.window = 300;
  p.cfg.slc_count = 19;  // ceil(300 / 16)
  r = evaluate(p, w, Timing{});
  CHECK(r["rel_error_win"].get<double>() < 1e-12);
  CHECK(r["rel_error_slc"].get<double>() < 1e-12);
  CHECK(r["rel_error"].get<double>() == doctest::Approx(r["rel_error_cmp"].get<double>() / 3).epsilon(1e-9));
  // Without forced blocks and with n = 1, the needle (depth 0.5: tokens 144..151, in block 9)
  // wins the single slot for every question.
  CHECK(w.needle->start.at(0) == 144);
  p.cfg.window = 16, p.cfg.slc_count = 1, p.cfg.init_blocks = 0, p.cfg.local_blocks = 0;
  r = evaluate(p, w, Timing{});
  CHECK(r["needle_found"].get<double>() == 1.0);
  // A needle straddling two blocks needs both: with n = 1 it is not found.
  SweepPoint q = p;
  q.spec.depths = {0.5};
  q.spec.needle_len = 24;
  const WorkloadData w2 = load_workload_data(q);
  CHECK(w2.needle->start.at(0) == 136);  // tokens 136..159: blocks 8 and 9
  CHECK(evaluate(q, w2, Timing{})["needle_found"].get<double>() == 0.0);
}

TEST_CASE("train: learning phi makes the selection find the needle; the gates alone cannot") {
  TrainSpec s;
  Config& c = s.cfg;
  c.Hq = 2, c.Hkv = 1, c.dk = 8, c.dv = 8;
  c.cmp_len = 8, c.cmp_stride = 4, c.slc_len = 16, c.slc_count = 5, c.window = 16, c.cmp_hidden = 32;
  s.data.T = 256;
  s.batch = 8;
  s.steps = 60;
  s.lr = 1e-2;
  auto mean = [](const std::vector<StepLog>& log, size_t a, size_t b, double StepLog::*f) {
    double m = 0;
    for (size_t i = a; i < b; ++i) m += log[i].*f;
    return m / double(b - a);
  };
  // Measured: loss 0.61 -> 0.03, needle_found 0.29 -> 0.97 (first 10 steps -> last 20).
  const TrainResult r = train(s);
  REQUIRE(r.log.size() == 60);
  CHECK(mean(r.log, 40, 60, &StepLog::loss) < 0.15 * mean(r.log, 0, 10, &StepLog::loss));
  CHECK(mean(r.log, 40, 60, &StepLog::needle_found) > 0.85);
  CHECK(mean(r.log, 0, 10, &StepLog::needle_found) < 0.5);
  CHECK(r.log.back().gate[int(Branch::Slc)] > r.log.back().gate[int(Branch::Win)]);
  // Control: phi frozen at its random draw, the selection stays near chance (measured 0.45).
  s.learn_phi = false;
  const TrainResult g = train(s);
  CHECK(mean(g.log, 40, 60, &StepLog::needle_found) < 0.7);
  // Step 0 sees the same data and the same initial parameters in both runs.
  CHECK(g.log[0].loss == r.log[0].loss);
}

TEST_CASE("train: bad settings are refused naming the field") {
  TrainSpec s;
  s.cfg.Hq = 2, s.cfg.Hkv = 1, s.cfg.dk = 8, s.cfg.dv = 8;
  s.cfg.slc_len = 16, s.cfg.slc_count = 5, s.cfg.window = 16, s.cfg.cmp_len = 8, s.cfg.cmp_stride = 4;
  s.data.T = 256;
  s.depth_max = 1.5;
  CHECK_THROWS_WITH_AS(train(s), doctest::Contains("depth_max = 1.5"), ConfigError);
  s.depth_max = 0.8;
  s.learn_phi = s.learn_gates = false;
  CHECK_THROWS_WITH_AS(train(s), doctest::Contains("nothing to learn"), ConfigError);
}
