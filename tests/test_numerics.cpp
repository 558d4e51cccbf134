// Numerics at the edges: logits large enough to saturate every softmax, constant inputs with
// outputs known exactly, and queries that see nothing in the compression branch. No NaN or Inf
// may appear, and each limit is the one the spec implies.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "helpers.hpp"

using namespace nsa;
using test::Case;
using test::GateMode;

namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();

template <class S>
ref::ForwardResult<S> run(const Config& c, const ref::Inputs<S>& in, ref::Path p = ref::Path::Fast) {
  ref::check_inputs(c, in);
  return ref::forward(c, in, p);
}

// Every value finite, except lse = -inf where `empty_lse` allows it (a branch that sees nothing).
template <class S>
bool all_finite(const Tensor<S>& t, bool empty_lse = false) {
  for (int64_t i = 0; i < t.numel(); ++i)
    if (!std::isfinite(t[i]) && !(empty_lse && t[i] == -std::numeric_limits<S>::infinity())) return false;
  return true;
}

template <class S>
void check_all_finite(const ref::ForwardResult<S>& r) {
  CHECK(all_finite(r.o));
  for (int c = 0; c < kBranches; ++c) {
    INFO("branch " << branch_name(Branch(c)));
    CHECK(all_finite(r.o_branch[c]));
    CHECK(all_finite(r.lse[c], /*empty_lse=*/c == 0));
  }
  CHECK(all_finite(r.block_scores));
  CHECK(all_finite(r.k_cmp_compressed));
  CHECK(all_finite(r.v_cmp_compressed));
}

// Softmax of q over keys that saturates: the argmax key's value and score, when the best score
// beats the second by more than `margin` (then the others' weights sum below n e^-margin).
struct Saturation {
  int checked = 0, rows = 0;
  double worst_o = 0, worst_lse = 0;
  // keys/vals: row pointers; o: the output row [dv]; lse: its lse.
  template <class S>
  void add(const S* q, const std::vector<const S*>& keys, const std::vector<const S*>& vals, int64_t dk, int64_t dv,
           double scale, const S* o, double lse, double margin) {
    ++rows;
    double best = -kInf, second = -kInf;
    size_t arg = 0;
    for (size_t u = 0; u < keys.size(); ++u) {
      double s = 0;
      for (int64_t a = 0; a < dk; ++a) s += double(q[a]) * double(keys[u][a]);
      s *= scale;
      if (s > best) second = best, best = s, arg = u;
      else second = std::max(second, s);
    }
    if (best - second <= margin) return;
    ++checked;
    for (int64_t c = 0; c < dv; ++c)
      worst_o = std::max(worst_o, std::abs(double(o[c]) - double(vals[arg][c])) / (std::abs(double(vals[arg][c])) + 1));
    worst_lse = std::max(worst_lse, std::abs(lse - best) / std::abs(best));
  }
};

}  // namespace

TEST_CASE("large logits: q scaled by 1e4 (and 1e200 in double) saturates every softmax to its argmax key") {
  Case k;
  k.cfg = test::small_config();  // l = 8, d = 4, l' = 8, n = 4, w = 16, G = 2
  k.seqlens = {200};
  for (const double factor : {1e4, 1e200}) {
    auto in = test::make_inputs(k);
    for (auto& x : in.q.vec()) x *= factor;
    const Config& c = k.cfg;
    const double s = c.softmax_scale();
    for (auto path : {ref::Path::Fast, ref::Path::Oracle}) {
      const std::string what = cat("factor ", factor, path == ref::Path::Fast ? " fast" : " oracle");
      INFO(what);
      const auto r = run(c, in, path);
      check_all_finite(r);
      // Each branch's output is its argmax key's value; its lse is that key's score.
      Saturation win, cmp, slc;
      std::vector<const double*> ks, vs;
      for (int64_t t = 0; t < 200; ++t)
        for (int64_t h = 0; h < c.Hq; ++h) {
          const int64_t g = h / c.G();
          ks.clear(), vs.clear();
          for (int64_t u = c.win_start(t); u <= t; ++u) ks.push_back(in.k.row(u, g)), vs.push_back(in.v.row(u, g));
          win.add(in.q.row(t, h), ks, vs, c.dk, c.dv, s, r.o_branch[2].row(t, h), r.lse[2](t, h), 40);
          ks.clear(), vs.clear();
          for (int64_t i = 0; i < c.cmp_visible(t); ++i)
            ks.push_back(r.k_cmp_compressed.row(i, g)), vs.push_back(r.v_cmp_compressed.row(i, g));
          if (!ks.empty()) cmp.add(in.q.row(t, h), ks, vs, c.dk, c.dv, s, r.o_branch[0].row(t, h), r.lse[0](t, h), 40);
          ks.clear(), vs.clear();
          for (int64_t m = 0; m < c.slc_count; ++m) {
            const int32_t j = r.block_idx(t, g, m);
            for (int64_t u = j * c.slc_len; j >= 0 && u < std::min((j + 1) * c.slc_len, t + 1); ++u)
              ks.push_back(in.k.row(u, g)), vs.push_back(in.v.row(u, g));
          }
          slc.add(in.q.row(t, h), ks, vs, c.dk, c.dv, s, r.o_branch[1].row(t, h), r.lse[1](t, h), 40);
        }
      for (const Saturation* b : {&win, &cmp, &slc}) {
        CHECK(b->checked > b->rows * 9 / 10);  // near-ties below the margin are the rare exception
        CHECK(b->worst_o < 1e-12);
        CHECK(b->worst_lse < 1e-12);
      }
      // Eq. 9-10 at saturation: each head's p_cmp is one-hot, and a group's scores still add up
      // to G * l / d over the valid blocks (every visible compressed block maps its whole
      // probability, times l/d, into valid selection blocks).
      double worst = 0;
      for (int64_t t = c.cmp_len - 1; t < 200; ++t)
        for (int64_t g = 0; g < c.Hkv; ++g) {
          double sum = 0;
          for (int64_t j = 0; j < c.slc_valid(t); ++j) sum += r.block_scores(t, g, j);
          worst = std::max(worst, std::abs(sum - double(c.G() * c.cmp_len) / double(c.cmp_stride)));
        }
      CHECK(worst < 1e-12);
    }
  }
  // float: logits of ~1e4 stay finite, and the window still returns the argmax key's value.
  auto in = test::make_inputs(k);
  for (auto& x : in.q.vec()) x *= 1e4;
  const auto inf = in.cast<float>();
  const auto r = run(k.cfg, inf);
  check_all_finite(r);
  Saturation win;
  std::vector<const float*> ks, vs;
  for (int64_t t = 0; t < 200; ++t)
    for (int64_t h = 0; h < k.cfg.Hq; ++h) {
      ks.clear(), vs.clear();
      for (int64_t u = k.cfg.win_start(t); u <= t; ++u) ks.push_back(inf.k.row(u, h / 2)), vs.push_back(inf.v.row(u, h / 2));
      win.add(inf.q.row(t, h), ks, vs, k.cfg.dk, k.cfg.dv, k.cfg.softmax_scale(), r.o_branch[2].row(t, h),
              double(r.lse[2](t, h)), 40);
    }
  CHECK(win.checked > win.rows * 9 / 10);
  CHECK(win.worst_o < 1e-6);
  CHECK(win.worst_lse < 1e-5);  // float round-off of a 12-term dot product of magnitude 1e4
  // And full attention, both paths.
  for (auto path : {ref::Path::Fast, ref::Path::Oracle}) {
    const auto f = ref::full_attention(k.cfg, in.q, in.k, in.v, {}, path);
    CHECK(all_finite(f.o));
    CHECK(all_finite(f.lse));
  }
}

TEST_CASE("constant keys: every softmax is uniform, outputs are plain means with lse = s q.k + ln(count)") {
  Case k;
  k.cfg = test::small_config();
  k.cfg.compress = CompressKind::Mean;
  k.seqlens = {100};
  k.gates = GateMode::Ones;
  auto in = test::make_inputs(k);
  const Config& c = k.cfg;
  // k[t, g, :] = k[0, g, :] for every t: every key of a group is the same vector.
  for (int64_t t = 1; t < 100; ++t)
    for (int64_t g = 0; g < c.Hkv; ++g) std::copy(in.k.row(0, g), in.k.row(0, g) + c.dk, in.k.row(t, g));
  const double s = c.softmax_scale();
  for (auto path : {ref::Path::Fast, ref::Path::Oracle}) {
    const auto r = run(c, in, path);
    check_all_finite(r);
    double worst_o = 0, worst_lse = 0;
    auto expect = [&](const double* o, double lse, int64_t t, int64_t h, const std::vector<int64_t>& tokens,
                      const Tensor<double>& vals, const Tensor<double>& keys) {
      const int64_t g = h / c.G();
      double qk = 0;
      for (int64_t a = 0; a < c.dk; ++a) qk += in.q(t, h, a) * keys(tokens[0], g, a);
      worst_lse = std::max(worst_lse, std::abs(lse - (s * qk + std::log(double(tokens.size())))));
      for (int64_t e = 0; e < c.dv; ++e) {
        double mean = 0;
        for (int64_t u : tokens) mean += vals(u, g, e);
        mean /= double(tokens.size());
        worst_o = std::max(worst_o, std::abs(o[e] - mean));
      }
    };
    for (int64_t t = 0; t < 100; ++t)
      for (int64_t h = 0; h < c.Hq; ++h) {
        const int64_t g = h / c.G();
        std::vector<int64_t> win, cmp, slc;
        for (int64_t u = c.win_start(t); u <= t; ++u) win.push_back(u);
        for (int64_t i = 0; i < c.cmp_visible(t); ++i) cmp.push_back(i);
        for (int64_t m = 0; m < c.slc_count; ++m)
          for (int64_t j = r.block_idx(t, g, m), u = j * c.slc_len; j >= 0 && u < std::min((j + 1) * c.slc_len, t + 1); ++u)
            slc.push_back(u);
        expect(r.o_branch[2].row(t, h), r.lse[2](t, h), t, h, win, in.v, in.k);
        expect(r.o_branch[1].row(t, h), r.lse[1](t, h), t, h, slc, in.v, in.k);
        if (!cmp.empty()) expect(r.o_branch[0].row(t, h), r.lse[0](t, h), t, h, cmp, r.v_cmp_compressed, r.k_cmp_compressed);
      }
    CHECK(worst_o < 1e-13);
    CHECK(worst_lse < 1e-13);
  }
}

TEST_CASE("constant everything: q, k, v, gates constant give o = (g_cmp + g_slc + g_win) v") {
  Config c = test::small_config();
  c.compress = CompressKind::Mean;
  const int64_t T = 70;
  ref::Inputs<double> in;
  // The expected outputs are exact numbers; the oracle's weights 1/n round (n = 3 keys), so the
  // comparison allows a few ulp.
  in.q = Tensor<double>({T, c.Hq, c.dk}, 0.25);
  in.k = Tensor<double>({T, c.Hkv, c.dk}, 0.5);
  in.v = Tensor<double>({T, c.Hkv, c.dv}, 2.0);
  in.gates = Tensor<double>({T, c.Hq, 3}, 0.5);
  for (auto path : {ref::Path::Fast, ref::Path::Oracle}) {
    const auto r = run(c, in, path);
    for (int64_t t = 0; t < T; ++t)
      for (int64_t h = 0; h < c.Hq; ++h) {
        const bool sees_cmp = c.cmp_visible(t) > 0;
        for (int b = 0; b < 3; ++b) CHECK(r.o_branch[b](t, h, 0) == doctest::Approx(b == 0 && !sees_cmp ? 0.0 : 2.0).epsilon(1e-15));
        CHECK(r.o(t, h, 0) == doctest::Approx(sees_cmp ? 3.0 : 2.0).epsilon(1e-15));
        CHECK(r.o(t, h, c.dv - 1) == doctest::Approx(sees_cmp ? 3.0 : 2.0).epsilon(1e-15));
        // lse: every score is s q.k = 1/sqrt(12) * 12 * 0.125 over the branch's keys.
        const double qk = c.softmax_scale() * double(c.dk) * 0.125;
        CHECK(r.lse[2](t, h) == doctest::Approx(qk + std::log(double(t - c.win_start(t) + 1))).epsilon(1e-15));
        if (sees_cmp) CHECK(r.lse[0](t, h) == doctest::Approx(qk + std::log(double(c.cmp_visible(t)))).epsilon(1e-15));
      }
    // Equal scores everywhere: the forced blocks plus the lowest-indexed others (ties go low).
    CHECK(r.block_idx(69, 0, 0) == 0);
    CHECK(r.block_idx(69, 0, 1) == 1);
    CHECK(r.block_idx(69, 0, 2) == 7);
    CHECK(r.block_idx(69, 0, 3) == 8);
  }
}

TEST_CASE("queries that see no compressed block: O_cmp = 0, lse_cmp = -inf, and the gated output is finite") {
  for (const int64_t T : {int64_t(5), int64_t(40)}) {  // all of the sequence before l - 1 = 7, or its start
    Case k;
    k.cfg = test::small_config();  // l = 8
    k.seqlens = {T};
    k.gates = GateMode::Random;
    auto in = test::make_inputs(k);
    for (auto& x : in.q.vec()) x *= 1e4;  // large logits where a branch sees something
    const Config& c = k.cfg;
    for (auto path : {ref::Path::Fast, ref::Path::Oracle}) {
      const std::string what = cat("T = ", T, path == ref::Path::Fast ? " fast" : " oracle");
      INFO(what);
      const auto r = run(c, in, path);
      check_all_finite(r);
      CHECK(r.k_cmp_compressed.dim(0) == c.num_cmp_blocks(T));
      for (int64_t t = 0; t < std::min<int64_t>(T, c.cmp_len - 1); ++t)
        for (int64_t h = 0; h < c.Hq; ++h) {
          CHECK(r.lse[0](t, h) == -kInf);
          for (int64_t e = 0; e < c.dv; ++e) {
            CHECK(r.o_branch[0](t, h, e) == 0);
            // Eq. 5 with O_cmp = 0: the cmp gate contributes nothing (up to FMA contraction).
            const double a = r.gates(t, h, 1) * r.o_branch[1](t, h, e), b = r.gates(t, h, 2) * r.o_branch[2](t, h, e);
            CHECK(std::abs(r.o(t, h, e) - (a + b)) <= 1e-15 * (std::abs(a) + std::abs(b)));
          }
        }
      // Nothing seen, nothing mapped: the block scores of those queries are 0.
      for (int64_t t = 0; t < std::min<int64_t>(T, c.cmp_len - 1); ++t)
        for (int64_t j = 0; j < r.block_scores.dim(2); ++j) CHECK(r.block_scores(t, 0, j) == 0);
    }
    const auto f = run(k.cfg, in.cast<float>());
    check_all_finite(f);
    CHECK(f.lse[0](0, 0) == -std::numeric_limits<float>::infinity());
  }
}
