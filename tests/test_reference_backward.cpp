// The reference backward pass (docs/spec.md 7): central finite differences of L = <dL/do, o> for
// every gradient tensor, oracle = fast path, the shared-key sums, identities with full attention,
// thread independence, float against double.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <string>

#include "helpers.hpp"

using namespace nsa;
using test::Case;
using test::GateMode;
using test::rel_l2;

namespace {

using In = ref::Inputs<double>;
using Grads = ref::BackwardResult<double>;

ref::ForwardResult<double> fwd(const Config& c, const In& in, ref::Path p = ref::Path::Fast) {
  ref::check_inputs(c, in);
  return ref::forward(c, in, p);
}

// An input tensor and the gradient the backward pass claims for it.
struct Target {
  std::string name;
  Tensor<double>* x;
  const Tensor<double>* grad;
};

// Every input the forward pass reads (for the case's configuration) and its gradient.
std::vector<Target> targets(const Config& c, In& in, const Grads& g) {
  std::vector<Target> t{{"q", &in.q, &g.dq}};
  const bool k_shared = std::any_of(in.k_own.begin(), in.k_own.end(), [](auto& x) { return x.empty(); });
  const bool v_shared = std::any_of(in.v_own.begin(), in.v_own.end(), [](auto& x) { return x.empty(); });
  if (k_shared) t.push_back({"k", &in.k, &g.dk});
  if (v_shared) t.push_back({"v", &in.v, &g.dv});
  for (int b = 0; b < kBranches; ++b) {
    const std::string s = branch_name(Branch(b));
    if (!in.k_own[b].empty()) t.push_back({"k_" + s, &in.k_own[b], &g.dk_branch[b]});
    if (!in.v_own[b].empty()) t.push_back({"v_" + s, &in.v_own[b], &g.dv_branch[b]});
  }
  if (!in.gates.empty()) t.push_back({"gates", &in.gates, &g.dgates});
  if (in.gates.empty() && in.gate_mlp.given()) {
    auto& m = in.gate_mlp;
    t.push_back({"gate_x", &m.x, &g.dgate_mlp.x});
    t.push_back({"gate_w", &m.w, &g.dgate_mlp.w});
    t.push_back({"gate_b", &m.b, &g.dgate_mlp.b});
    if (!m.w0.empty()) {
      t.push_back({"gate_w0", &m.w0, &g.dgate_mlp.w0});
      t.push_back({"gate_b0", &m.b0, &g.dgate_mlp.b0});
    }
  }
  for (int kv = 0; kv < 2; ++kv) {
    auto& p = kv ? in.phi.v : in.phi.k;
    const auto& d = kv ? g.dphi.v : g.dphi.k;
    const std::string sfx = kv ? "_v" : "_k";
    if (c.compress == CompressKind::Linear) {
      t.push_back({"pe" + sfx, &p.pe, &d.pe});
      t.push_back({"w" + sfx, &p.w, &d.w});
      t.push_back({"b" + sfx, &p.b, &d.b});
    } else if (c.compress == CompressKind::Mlp) {
      t.push_back({"pe" + sfx, &p.pe, &d.pe});
      t.push_back({"w1" + sfx, &p.w1, &d.w1});
      t.push_back({"b1" + sfx, &p.b1, &d.b1});
      t.push_back({"w2" + sfx, &p.w2, &d.w2});
      t.push_back({"b2" + sfx, &p.b2, &d.b2});
    }
  }
  return t;
}

// Central difference of L = <dO, o> in entry i of *x: (L(x + h) - L(x - h)) / 2h, with the
// difference of the outputs taken before the dot product (L itself is large; its change is not).
// `noise` is the difference quotient's round-off: every output carries a relative error of a few
// eps, so the quotient is uncertain by about eps ||dO * o||_2 / 2h (random-walk sum), taken 10x.
// Returns false if either perturbation changes the selected blocks (the gradient treats them as
// fixed, so such an entry cannot be checked this way).
template <class Eval>
bool central_difference(Tensor<double>& x, int64_t i, const Tensor<double>& dO, const Tensor<int32_t>& idx,
                        Eval eval, double& fd, double& noise) {
  const double x0 = x[i], h = 1e-6 * std::max(1.0, std::abs(x0));
  x[i] = x0 + h;
  const auto plus = eval();
  x[i] = x0 - h;
  const auto minus = eval();
  x[i] = x0;
  if (plus.second.vec() != idx.vec() || minus.second.vec() != idx.vec()) return false;
  double s = 0, mag = 0;
  for (int64_t e = 0; e < dO.numel(); ++e) {
    s += dO[e] * (plus.first[e] - minus.first[e]);
    mag += dO[e] * dO[e] * plus.first[e] * plus.first[e];
  }
  const double two_h = (x0 + h) - (x0 - h);
  fd = s / two_h;
  noise = 10 * std::numeric_limits<double>::epsilon() * std::sqrt(mag) / two_h;
  return true;
}

constexpr double kFdRelTol = 1e-6;
constexpr int kSamples = 6;  // entries per gradient tensor

// The error of a finite difference against the backward value, relative to the value, or to the
// difference quotient's round-off / kFdRelTol where the value is smaller than that (gradients
// that are zero or nearly so: then no relative bound on the entry itself can hold).
double fd_error(double fd, double an, double noise) {
  return std::abs(fd - an) / std::max({std::abs(an), noise / kFdRelTol, 1e-300});
}

double l2(const Tensor<double>& t) {
  double s = 0;
  for (double v : t.vec()) s += v * v;
  return std::sqrt(s);
}

// Checks kSamples entries of every gradient tensor of the case against central differences; the
// entry of largest gradient is always among them. Returns the worst relative error seen.
double check_fd(const Config& c, In in, const Grads& g, const Tensor<double>& dO, uint64_t seed) {
  const auto base = fwd(c, in);
  const auto eval = [&] {
    auto r = ref::forward(c, in);
    return std::make_pair(std::move(r.o), std::move(r.block_idx));
  };
  Rng rng(seed);
  double worst = 0;
  for (const Target& t : targets(c, in, g)) {
    INFO("gradient of " << t.name);
    REQUIRE(t.grad->shape() == t.x->shape());
    const int64_t n = t.x->numel();
    int64_t argmax = 0;
    for (int64_t i = 0; i < n; ++i)
      if (std::abs((*t.grad)[i]) > std::abs((*t.grad)[argmax])) argmax = i;
    int checked = 0, tries = 0;
    for (; checked < kSamples && tries < 20 * kSamples; ++tries) {
      const int64_t i = checked == 0 ? argmax : int64_t(rng.below(uint64_t(n)));
      double fd = 0, noise = 0;
      if (!central_difference(*t.x, i, dO, base.block_idx, eval, fd, noise)) continue;
      const double err = fd_error(fd, (*t.grad)[i], noise);
      INFO("entry " << i << ": finite difference " << fd << ", backward " << (*t.grad)[i]);
      CHECK(err <= kFdRelTol);
      worst = std::max(worst, err);
      ++checked;
    }
    CHECK(checked == kSamples);  // enough entries whose perturbation keeps the selection
  }
  return worst;
}

void check_same(const Grads& a, const Grads& b, double tol) {
  CHECK(rel_l2(a.dq, b.dq) <= tol);
  for (int c = 0; c < kBranches; ++c) {
    INFO("branch " << std::string(branch_name(Branch(c))));
    CHECK(rel_l2(a.dk_branch[c], b.dk_branch[c]) <= tol);
    CHECK(rel_l2(a.dv_branch[c], b.dv_branch[c]) <= tol);
  }
  CHECK(a.dk.shape() == b.dk.shape());
  if (!a.dk.empty()) CHECK(rel_l2(a.dk, b.dk) <= tol);
  if (!a.dv.empty()) CHECK(rel_l2(a.dv, b.dv) <= tol);
  CHECK(rel_l2(a.dgates, b.dgates) <= tol);
  CHECK(rel_l2(a.dk_cmp_compressed, b.dk_cmp_compressed) <= tol);
  CHECK(rel_l2(a.dv_cmp_compressed, b.dv_cmp_compressed) <= tol);
  // Some of phi's gradients are zero in exact arithmetic (see the test on shifts of compressed
  // keys below) and round-off in both paths: those are measured against the size of the gradient
  // that flows into phi.
  const ref::PhiParams<double>* pa[] = {&a.dphi.k, &a.dphi.v};
  const ref::PhiParams<double>* pb[] = {&b.dphi.k, &b.dphi.v};
  for (int kv = 0; kv < 2; ++kv) {
    INFO("phi of " << std::string(kv ? "values" : "keys"));
    const double floor = l2(kv ? b.dv_cmp_compressed : b.dk_cmp_compressed);
    for (auto m : {&ref::PhiParams<double>::pe, &ref::PhiParams<double>::w, &ref::PhiParams<double>::b,
                   &ref::PhiParams<double>::w1, &ref::PhiParams<double>::b1, &ref::PhiParams<double>::w2,
                   &ref::PhiParams<double>::b2}) {
      const auto &x = pa[kv]->*m, &y = pb[kv]->*m;
      REQUIRE(x.shape() == y.shape());
      Tensor<double> diff(x.shape());
      for (int64_t i = 0; i < x.numel(); ++i) diff[i] = x[i] - y[i];
      CHECK(l2(diff) <= tol * std::max(l2(y), floor));
    }
  }
  const auto& ma = a.dgate_mlp;
  const auto& mb = b.dgate_mlp;
  CHECK(ma.x.shape() == mb.x.shape());
  CHECK(ma.w0.shape() == mb.w0.shape());
  CHECK(rel_l2(ma.x, mb.x) <= tol);
  CHECK(rel_l2(ma.w0, mb.w0) <= tol);
  CHECK(rel_l2(ma.b0, mb.b0) <= tol);
  CHECK(rel_l2(ma.w, mb.w) <= tol);
  CHECK(rel_l2(ma.b, mb.b) <= tol);
}

struct Named {
  std::string name;
  Case k;
};

// The cases of the issue: t < l, w >= T, G = 1 and G > 1, dk != dv, shared and separate keys and
// values, the three phi kinds, gates given and computed (with and without the hidden layer),
// packed sequences, and a real choice among blocks (more valid blocks than n).
std::vector<Named> cases() {
  std::vector<Named> out;
  auto add = [&](const char* name, auto mutate) {
    Case k;
    k.cfg = test::small_config();  // G = 2, dk = 12 != dv = 8, l = 8, d = 4, l' = 8, n = 4, w = 16
    k.seqlens = {44};
    mutate(k);
    out.push_back({name, k});
  };
  add("G=2 dk!=dv, mlp phi, shared kv, given gates", [](Case&) {});
  add("G=1, linear phi, separate kv, gate MLP with hidden layer", [](Case& k) {
    k.cfg.Hq = k.cfg.Hkv = 2;
    k.cfg.compress = CompressKind::Linear;
    k.separate_kv = true;
    k.gates = GateMode::Mlp;
  });
  add("MQA G=4, mean phi, w >= T, gate MLP without hidden layer", [](Case& k) {
    k.cfg.Hkv = 1;
    k.cfg.compress = CompressKind::Mean;
    k.cfg.window = 64;
    k.gates = GateMode::Mlp;
    k.seed = 3;
  });
  add("T < l: no compressed block (mlp)", [](Case& k) { k.seqlens = {6}; });
  add("packed sequences, l=7 d=3 l'=10, silu, hidden 5, separate kv", [](Case& k) {
    k.cfg.cmp_len = 7, k.cfg.cmp_stride = 3, k.cfg.slc_len = 10, k.cfg.cmp_act = Activation::Silu;
    k.cfg.cmp_hidden = 5;
    k.separate_kv = true;
    k.seqlens = {23, 0, 41};
  });
  add("n >= blocks, dk == dv, linear, gates ones", [](Case& k) {
    k.cfg.dv = k.cfg.dk;
    k.cfg.slc_count = 8;
    k.cfg.compress = CompressKind::Linear;
    k.gates = GateMode::Ones;
  });
  return out;
}

// dL/do: standard normal entries, [N, Hq, dv].
Tensor<double> make_do(const Config& c, int64_t N, uint64_t seed) {
  Rng rng(seed);
  return test::randn<double>({N, c.Hq, c.dv}, rng);
}

}  // namespace

// Runs the enclosed code on one thread: the finite differences run hundreds of forward passes of
// a few dozen tokens, where OpenMP's start-up costs more than it gains.
struct OneThread {
  OneThread() { ref::set_threads(1); }
  ~OneThread() { ref::set_threads(0); }
};

TEST_CASE("backward: central finite differences agree with every gradient tensor to 1e-6") {
  const OneThread one;
  for (const auto& nc : cases()) {
    INFO(nc.name);
    In in = test::make_inputs(nc.k);
    const auto f = fwd(nc.k.cfg, in);
    const auto dO = make_do(nc.k.cfg, in.N(), nc.k.seed + 7);
    ref::check_output_grad(nc.k.cfg, in, dO);
    const auto g = ref::backward(nc.k.cfg, in, f, dO);
    const double worst = check_fd(nc.k.cfg, in, g, dO, nc.k.seed + 11);
    MESSAGE(nc.name << ": worst finite-difference error " << worst);
  }
}

TEST_CASE("finite differences: a perturbation that changes the selection is detected and not used") {
  // Constant keys make every interior block score exactly equal (ties go to the lower index);
  // nudging one key of a later block breaks the tie in its favour or against it.
  Case k;
  k.cfg = test::small_config();  // l' = 8, n = 4
  k.cfg.compress = CompressKind::Mean;
  k.seqlens = {64};
  In in = test::make_inputs(k);
  in.k.fill(0.5);
  const auto base = fwd(k.cfg, in);
  const auto dO = make_do(k.cfg, in.N(), 1);
  const auto eval = [&] {
    auto r = ref::forward(k.cfg, in);
    return std::make_pair(std::move(r.o), std::move(r.block_idx));
  };
  REQUIRE(base.block_idx(63, 0, 1) == 1);  // forced 0, 6, 7 and the tie's winner, block 1
  double fd = 0, noise = 0;
  CHECK_FALSE(central_difference(in.k, (8 * 3 + 2) * k.cfg.Hkv * k.cfg.dk, dO, base.block_idx, eval, fd, noise));
  CHECK(central_difference(in.q, 5, dO, base.block_idx, eval, fd, noise));  // q moves every score alike here
}

TEST_CASE("backward: oracle and fast path agree to 1e-12 in double") {
  auto all = cases();
  auto add = [&](const char* name, auto mutate) {
    Case k;
    k.cfg = test::small_config();
    mutate(k);
    all.push_back({name, k});
  };
  add("T = 256, several chunks, mlp", [](Case&) {});
  add("tile edges: T = 63, 64, 65, 129, separate kv", [](Case& k) {
    k.seqlens = {63, 64, 65, 129};
    k.separate_kv = true;
  });
  add("no forced blocks, scale 0.3, gelu_tanh, T = 301", [](Case& k) {
    k.cfg.init_blocks = 0, k.cfg.local_blocks = 0, k.cfg.scale = 0.3, k.cfg.cmp_act = Activation::GeluTanh;
    k.seqlens = {301};
  });
  for (const auto& nc : all) {
    INFO(nc.name);
    const In in = test::make_inputs(nc.k);
    const auto dO = make_do(nc.k.cfg, in.N(), 5);
    const auto fo = fwd(nc.k.cfg, in, ref::Path::Oracle);
    const auto ff = fwd(nc.k.cfg, in, ref::Path::Fast);
    REQUIRE(fo.block_idx.vec() == ff.block_idx.vec());
    const auto a = ref::backward(nc.k.cfg, in, ff, dO, ref::Path::Fast);
    const auto b = ref::backward(nc.k.cfg, in, fo, dO, ref::Path::Oracle);
    check_same(a, b, 1e-12);
    CHECK(rel_l2(a.dq, Tensor<double>(a.dq.shape())) > 0);  // not all zero
  }
}

TEST_CASE("backward: the shared k, v get the sum of the branches' gradients") {
  Case k;
  k.cfg = test::small_config();
  k.seqlens = {50};
  const In shared = test::make_inputs(k);
  In separate = shared;
  for (int c = 0; c < kBranches; ++c) separate.k_own[c] = shared.k, separate.v_own[c] = shared.v;
  const auto dO = make_do(k.cfg, shared.N(), 2);
  const auto gs = ref::backward(k.cfg, shared, fwd(k.cfg, shared), dO);
  const auto gp = ref::backward(k.cfg, separate, fwd(k.cfg, separate), dO);
  CHECK(gp.dk.empty());
  CHECK(gp.dv.empty());
  REQUIRE(!gs.dk.empty());
  Tensor<double> sk(gs.dk.shape()), sv(gs.dv.shape());
  for (int c = 0; c < kBranches; ++c) {
    CHECK(gs.dk_branch[c].vec() == gp.dk_branch[c].vec());
    CHECK(rel_l2(gs.dk_branch[c], Tensor<double>(sk.shape())) > 0.01);  // every branch contributes
    for (int64_t i = 0; i < sk.numel(); ++i) sk[i] += gp.dk_branch[c][i];
    for (int64_t i = 0; i < sv.numel(); ++i) sv[i] += gp.dv_branch[c][i];
  }
  CHECK(gs.dk.vec() == sk.vec());
  CHECK(gs.dv.vec() == sv.vec());
  // One branch with keys of its own: the shared k collects the other two.
  In mixed = shared;
  mixed.k_own[1] = shared.k;
  const auto gm = ref::backward(k.cfg, mixed, fwd(k.cfg, mixed), dO);
  for (int64_t i = 0; i < sk.numel(); ++i) CHECK(gm.dk[i] == gp.dk_branch[0][i] + gp.dk_branch[2][i]);
  CHECK(gm.dv.vec() == gs.dv.vec());
}

TEST_CASE("backward: the gate gradient is <dL/do, O_c>, and zero gates send nothing to a branch") {
  Case k;
  k.cfg = test::small_config();
  k.seqlens = {60};
  In in = test::make_inputs(k);
  for (int64_t t = 0; t < 60; ++t)
    for (int64_t h = 0; h < k.cfg.Hq; ++h) in.gates(t, h, 0) = 0;  // compression branch off
  const auto f = fwd(k.cfg, in);
  const auto dO = make_do(k.cfg, in.N(), 3);
  for (auto path : {ref::Path::Fast, ref::Path::Oracle}) {
    const auto g = ref::backward(k.cfg, in, f, dO, path);
    for (int64_t t = 0; t < 60; t += 9)
      for (int64_t h = 0; h < k.cfg.Hq; ++h)
        for (int c = 0; c < 3; ++c) {
          double s = 0;
          for (int64_t e = 0; e < k.cfg.dv; ++e) s += dO(t, h, e) * f.o_branch[c](t, h, e);
          CHECK(g.dgates(t, h, c) == doctest::Approx(s).epsilon(1e-13));
        }
    CHECK(std::all_of(g.dk_branch[0].vec().begin(), g.dk_branch[0].vec().end(), [](double x) { return x == 0; }));
    CHECK(std::all_of(g.dphi.k.w1.vec().begin(), g.dphi.k.w1.vec().end(), [](double x) { return x == 0; }));
    CHECK(rel_l2(g.dgates, Tensor<double>(g.dgates.shape())) > 0);
  }
}

TEST_CASE("backward: a shift common to all compressed keys is invisible, so its parameters get no gradient") {
  // q.(k_i + c) = q.k_i + q.c for every compressed block i: the compression softmax, and with it
  // everything downstream (the selection scores too), does not change. Hence dL/db2_k = 0 for the
  // mlp phi and dL/db_k = dL/dpe_k = 0 for the linear phi (pe enters linearly), exactly; the
  // same parameters for values are not invariant (O_cmp moves with a shift of every value).
  for (auto kind : {CompressKind::Mlp, CompressKind::Linear}) {
    INFO(std::string(to_string(kind)));
    Case k;
    k.cfg = test::small_config();
    k.cfg.compress = kind;
    k.seqlens = {60};
    const In in = test::make_inputs(k);
    const auto dO = make_do(k.cfg, in.N(), 12);
    for (auto path : {ref::Path::Fast, ref::Path::Oracle}) {
      const auto g = ref::backward(k.cfg, in, fwd(k.cfg, in), dO, path);
      const double flow = l2(g.dk_cmp_compressed);
      REQUIRE(flow > 1e-3);
      if (kind == CompressKind::Mlp) {
        CHECK(l2(g.dphi.k.b2) < 1e-14 * flow);
        CHECK(l2(g.dphi.k.pe) > 1e-3 * flow);  // through the nonlinearity pe is not a shift
        CHECK(l2(g.dphi.v.b2) > 1e-3 * l2(g.dv_cmp_compressed));
      } else {
        CHECK(l2(g.dphi.k.b) < 1e-14 * flow);
        CHECK(l2(g.dphi.k.pe) < 1e-14 * flow);
        CHECK(l2(g.dphi.v.b) > 1e-3 * l2(g.dv_cmp_compressed));
      }
    }
  }
}

TEST_CASE("identity: the selection's and the window's gradients are full attention's when they see everything") {
  Case k;
  k.cfg = test::small_config();
  k.cfg.slc_count = 32;  // >= ceil(T / l') = 19 blocks
  k.cfg.window = 150;
  k.seqlens = {150};
  k.separate_kv = true;
  In in = test::make_inputs(k);
  const auto dO = make_do(k.cfg, in.N(), 4);
  for (int branch : {1, 2}) {
    INFO("branch " << std::string(branch_name(Branch(branch))));
    in.gates.fill(0);
    for (int64_t t = 0; t < 150; ++t)
      for (int64_t h = 0; h < k.cfg.Hq; ++h) in.gates(t, h, branch) = 1;
    const auto& kb = in.k_own[branch];
    const auto& vb = in.v_own[branch];
    const auto full = ref::full_attention(k.cfg, in.q, kb, vb, {});
    for (auto path : {ref::Path::Fast, ref::Path::Oracle}) {
      const auto fg = ref::full_attention_backward(k.cfg, in.q, kb, vb, full, dO, {}, path);
      const auto g = ref::backward(k.cfg, in, fwd(k.cfg, in), dO, path);
      CHECK(rel_l2(g.dq, fg.dq) < 1e-13);
      CHECK(rel_l2(g.dk_branch[branch], fg.dk) < 1e-13);
      CHECK(rel_l2(g.dv_branch[branch], fg.dv) < 1e-13);
    }
  }
}

TEST_CASE("full attention backward: finite differences, and oracle = fast path") {
  const OneThread one;
  Config c = test::small_config();
  c.Hq = 6, c.Hkv = 2;
  Rng rng(8);
  const std::vector<int64_t> cu{0, 70, 70, 101};  // packed, one sequence empty
  const int64_t N = 101;
  auto q = test::randn<double>({N, c.Hq, c.dk}, rng), k = test::randn<double>({N, c.Hkv, c.dk}, rng),
       v = test::randn<double>({N, c.Hkv, c.dv}, rng);
  const auto dO = test::randn<double>({N, c.Hq, c.dv}, rng);
  const auto f = ref::full_attention(c, q, k, v, cu);
  const auto a = ref::full_attention_backward(c, q, k, v, f, dO, cu, ref::Path::Fast);
  const auto b = ref::full_attention_backward(c, q, k, v, f, dO, cu, ref::Path::Oracle);
  CHECK(rel_l2(a.dq, b.dq) < 1e-12);
  CHECK(rel_l2(a.dk, b.dk) < 1e-12);
  CHECK(rel_l2(a.dv, b.dv) < 1e-12);
  const Tensor<int32_t> none;
  auto eval = [&] { return std::make_pair(ref::full_attention(c, q, k, v, cu).o, none); };
  for (auto [name, x, g] : {std::tuple{"q", &q, &a.dq}, std::tuple{"k", &k, &a.dk}, std::tuple{"v", &v, &a.dv}}) {
    INFO("gradient of " << name);
    for (int s = 0; s < 2 * kSamples; ++s) {
      const int64_t i = int64_t(rng.below(uint64_t(x->numel())));
      double fd = 0, noise = 0;
      REQUIRE(central_difference(*x, i, dO, none, eval, fd, noise));
      CHECK(fd_error(fd, (*g)[i], noise) <= kFdRelTol);
    }
  }
}

TEST_CASE("backward: results are bitwise identical for 1 and 2 threads") {
  Case k;
  k.cfg = test::small_config();
  k.seqlens = {333, 90};
  k.gates = GateMode::Mlp;
  const In in = test::make_inputs(k);
  const auto f = fwd(k.cfg, in);
  const auto dO = make_do(k.cfg, in.N(), 6);
  ref::set_threads(1);
  const auto a = ref::backward(k.cfg, in, f, dO);
  const auto fa = ref::full_attention_backward(k.cfg, in.q, in.k, in.v, ref::full_attention(k.cfg, in.q, in.k, in.v,
                                               in.cu_seqlens), dO, in.cu_seqlens);
  ref::set_threads(2);
  const auto b = ref::backward(k.cfg, in, f, dO);
  const auto fb = ref::full_attention_backward(k.cfg, in.q, in.k, in.v, ref::full_attention(k.cfg, in.q, in.k, in.v,
                                               in.cu_seqlens), dO, in.cu_seqlens);
  ref::set_threads(0);
  CHECK(a.dq.vec() == b.dq.vec());
  for (int c = 0; c < kBranches; ++c) {
    CHECK(a.dk_branch[c].vec() == b.dk_branch[c].vec());
    CHECK(a.dv_branch[c].vec() == b.dv_branch[c].vec());
  }
  CHECK(a.dphi.k.w1.vec() == b.dphi.k.w1.vec());
  CHECK(a.dgate_mlp.x.vec() == b.dgate_mlp.x.vec());
  CHECK(fa.dk.vec() == fb.dk.vec());
  CHECK(fa.dq.vec() == fb.dq.vec());
}

TEST_CASE("backward: float agrees with double to float round-off") {
  Case k;
  k.cfg = test::small_config();
  k.seqlens = {256};
  k.gates = GateMode::Mlp;
  const In in = test::make_inputs(k);
  const auto dO = make_do(k.cfg, in.N(), 9);
  const auto fd = fwd(k.cfg, in);
  const auto gd = ref::backward(k.cfg, in, fd, dO);
  const auto inf = in.cast<float>();
  const auto ff = ref::forward(k.cfg, inf);
  REQUIRE(ff.block_idx.vec() == fd.block_idx.vec());  // no near-tie at this seed
  const auto gf = ref::backward(k.cfg, inf, ff, dO.cast<float>());
  CHECK(rel_l2(gf.dq, gd.dq) < 1e-4);
  CHECK(rel_l2(gf.dk, gd.dk) < 1e-4);
  CHECK(rel_l2(gf.dv, gd.dv) < 1e-4);
  CHECK(rel_l2(gf.dphi.k.w1, gd.dphi.k.w1) < 1e-4);
  CHECK(rel_l2(gf.dgate_mlp.w0, gd.dgate_mlp.w0) < 1e-4);
  CHECK(rel_l2(gf.dq, gd.dq) > 1e-9);  // it really ran in float
}

TEST_CASE("backward: dL/do of the wrong shape or with NaN is refused, naming the tensor") {
  Case k;
  k.cfg = test::small_config();
  const In in = test::make_inputs(k);
  Tensor<double> bad({in.N(), k.cfg.Hq, k.cfg.dk});  // dk = 12 instead of dv = 8
  CHECK_THROWS_WITH_AS(ref::check_output_grad(k.cfg, in, bad), doctest::Contains("do: shape [256, 4, 12]"),
                       InputError);
  Tensor<double> nan({in.N(), k.cfg.Hq, k.cfg.dv});
  nan[17] = std::nan("");
  CHECK_THROWS_WITH_AS(ref::check_output_grad(k.cfg, in, nan, false, [](const std::string& r) { return r + ".npy"; }),
                       doctest::Contains("do.npy: non-finite value"), InputError);
  CHECK_NOTHROW(ref::check_output_grad(k.cfg, in, nan, true));
}
