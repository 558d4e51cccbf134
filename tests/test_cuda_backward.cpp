// The CUDA backward pass against the double reference (docs/spec.md 7), every gradient tensor
// (STYLE 4): dq, each branch's dk_c and dv_c, the shared k/v's dk and dv, dgates, the compressed
// keys' and values' gradients, phi's parameters, the gate MLP's. The reference runs ref::backward
// in double on the very inputs and dL/do the device sees (rounded to its precision first) and on
// the device's own selected blocks (the gradient holds them fixed; the selection branch's forward
// output and lse are recomputed on those lists by the double twin), so near-ties in the selection
// cannot make a difference. Tolerances: tolerances.hpp (grad_tol).
//
// Every case runs in both modes: the fast one (fp32 atomics where work items meet on a key) and
// the deterministic one, which runs twice and must be bitwise identical. Sizes straddle the tile
// edges (T = 1, 7, 31-33, 63-65, 130, 300, 1025, 2049, 4097, packed batches) and the corners
// appear: t < l, w >= T, n >= blocks, G = 1, 3, 16, dk != dv, l' = 16, 32, 128, no forced blocks,
// shared and separate K/V, mean/linear/mlp phi, gates given and computed, fp16 and fp32.
#include <doctest/doctest.h>

#include <cmath>
#include <cstring>
#include <functional>
#include <string>

#include "cuda_twins.hpp"
#include "helpers.hpp"
#include "tolerances.hpp"

using namespace nsa;
using cuda::Precision;

namespace {

Config paper_cfg(int64_t Hq, int64_t Hkv, int64_t dk, int64_t dv) { return test::paper_config(Hq, Hkv, dk, dv); }

struct BwdCase {
  std::string name;
  test::Case k;
  Precision prec = Precision::BF16;
  cuda::Variant bwd_variant = cuda::Variant::Auto;  // Auto: choose_kernels'
};

BwdCase make(std::string name, Config c, std::vector<int64_t> seqlens, Precision prec = Precision::BF16) {
  BwdCase b;
  b.name = std::move(name);
  b.k.cfg = c;
  b.k.seqlens = std::move(seqlens);
  b.prec = prec;
  return b;
}

// Calls f(name, device tensor, reference tensor, scale) for every gradient tensor; scale > 0 is
// the norm the error is measured against when the reference is zero in exact arithmetic.
void for_each_grad(const ref::BackwardResult<float>& g, const ref::BackwardResult<double>& r,
                   const std::function<void(const std::string&, const Tensor<float>&, const Tensor<double>&, double)>& f) {
  auto norm = [](const Tensor<double>& t) {
    double s = 0;
    for (double x : t.vec()) s += x * x;
    return std::sqrt(s);
  };
  f("dq", g.dq, r.dq, 0);
  for (int c = 0; c < kBranches; ++c) {
    f(cat("dk_", branch_name(Branch(c))), g.dk_branch[c], r.dk_branch[c], 0);
    f(cat("dv_", branch_name(Branch(c))), g.dv_branch[c], r.dv_branch[c], 0);
  }
  f("dk", g.dk, r.dk, 0);
  f("dv", g.dv, r.dv, 0);
  f("dgates", g.dgates, r.dgates, 0);
  f("dk_cmp_compressed", g.dk_cmp_compressed, r.dk_cmp_compressed, 0);
  f("dv_cmp_compressed", g.dv_cmp_compressed, r.dv_cmp_compressed, 0);
  const double zero_scale = norm(r.dk_cmp_compressed);  // see tolerances.hpp
  for (int kv = 0; kv < 2; ++kv) {
    const ref::PhiParams<float>& a = kv ? g.dphi.v : g.dphi.k;
    const ref::PhiParams<double>& b = kv ? r.dphi.v : r.dphi.k;
    const std::string sfx = kv ? "_v" : "_k";
    const double zs = kv ? 0 : zero_scale;
    f("dpe" + sfx, a.pe, b.pe, zs);
    f("dw" + sfx, a.w, b.w, 0);
    f("db" + sfx, a.b, b.b, zs);
    f("dw1" + sfx, a.w1, b.w1, 0);
    f("db1" + sfx, a.b1, b.b1, 0);
    f("dw2" + sfx, a.w2, b.w2, 0);
    f("db2" + sfx, a.b2, b.b2, zs);
  }
  f("dgate_x", g.dgate_mlp.x, r.dgate_mlp.x, 0);
  f("dgate_w0", g.dgate_mlp.w0, r.dgate_mlp.w0, 0);
  f("dgate_b0", g.dgate_mlp.b0, r.dgate_mlp.b0, 0);
  f("dgate_w", g.dgate_mlp.w, r.dgate_mlp.w, 0);
  f("dgate_b", g.dgate_mlp.b, r.dgate_mlp.b, 0);
}

double err_against(const Tensor<float>& a, const Tensor<double>& b, double scale) {
  double num = 0, den = 0;
  for (int64_t i = 0; i < a.numel(); ++i) {
    const double d = double(a[i]) - b[i];
    if (!std::isfinite(d)) return std::numeric_limits<double>::infinity();
    num += d * d;
    den += b[i] * b[i];
  }
  den = std::max(std::sqrt(den), scale);
  return den > 0 ? std::sqrt(num) / den : std::sqrt(num);
}

bool bitwise_equal(const Tensor<float>& a, const Tensor<float>& b) {
  return a.shape() == b.shape() && std::memcmp(a.data(), b.data(), size_t(a.numel()) * sizeof(float)) == 0;
}

void run_case(const BwdCase& bc) {
  const Config& c = bc.k.cfg;
  INFO(bc.name);
  const auto in_d = test::make_inputs<double>(bc.k);
  const ref::Inputs<float> in_f = cuda::round_to(bc.prec, in_d.cast<float>());
  const ref::Inputs<double> in = in_f.cast<double>();
  ref::check_inputs(c, in);
  Rng rng(bc.k.seed + 7);
  const Tensor<float> dO_f = cuda::round_to(bc.prec, test::randn<float>({in.N(), c.Hq, c.dv}, rng));
  const Tensor<double> dO = dO_f.cast<double>();
  const double tol = test::tol::grad_tol(bc.prec);

  for (bool det : {false, true}) {
    cuda::Options opt;
    opt.dtype = bc.prec;
    opt.bwd_variant = bc.bwd_variant;
    opt.deterministic = det;
    ref::ForwardResult<float> gfwd;
    const ref::BackwardResult<float> g = cuda::backward(c, in_f, dO_f, opt, &gfwd);
    // The reference on the device's selection: its lists, and the selection's output and lse on them.
    ref::ForwardResult<double> fwd = ref::forward(c, in);
    fwd.block_idx = gfwd.block_idx;
    test::slc_twin(c, in, gfwd.block_idx, fwd.o_branch[1], fwd.lse[1]);
    const ref::BackwardResult<double> r = ref::backward(c, in, fwd, dO);
    std::string report;
    int compared = 0;
    for_each_grad(g, r, [&](const std::string& name, const Tensor<float>& a, const Tensor<double>& b, double scale) {
      INFO(name);
      REQUIRE(a.empty() == b.empty());
      if (b.empty()) return;
      REQUIRE(a.shape() == b.shape());
      const double e = err_against(a, b, scale);
      CHECK(e <= tol);
      ++compared;
      report += cat("  ", name, " ", e, e <= tol ? "" : " FAIL");
    });
    // Built with cat: doctest's MESSAGE prints a const char* operand as a pointer.
    opt.backward = true;
    MESSAGE(cat(bc.name, " ", cuda::to_string(bc.prec), " backward ",
                cuda::to_string(cuda::choose_kernels(c, in_f.N(), cuda::device_caps(0), opt).backward.variant),
                det ? " deterministic" : " fast", ": ", compared, " tensors (tol ", tol, ")\n", report));
    if (det) {  // bitwise repeatable
      const ref::BackwardResult<float> g2 = cuda::backward(c, in_f, dO_f, opt);
      int same = 0, all = 0;
      auto cmp = [&](const Tensor<float>& a, const Tensor<float>& b) {
        ++all;
        same += bitwise_equal(a, b);
      };
      cmp(g.dq, g2.dq);
      for (int br = 0; br < kBranches; ++br) cmp(g.dk_branch[br], g2.dk_branch[br]), cmp(g.dv_branch[br], g2.dv_branch[br]);
      cmp(g.dk, g2.dk), cmp(g.dv, g2.dv), cmp(g.dgates, g2.dgates);
      cmp(g.dk_cmp_compressed, g2.dk_cmp_compressed), cmp(g.dv_cmp_compressed, g2.dv_cmp_compressed);
      for (const auto* ph : {&g.dphi.k, &g.dphi.v}) {
        const auto* ph2 = ph == &g.dphi.k ? &g2.dphi.k : &g2.dphi.v;
        cmp(ph->pe, ph2->pe), cmp(ph->w, ph2->w), cmp(ph->b, ph2->b), cmp(ph->w1, ph2->w1), cmp(ph->b1, ph2->b1);
        cmp(ph->w2, ph2->w2), cmp(ph->b2, ph2->b2);
      }
      cmp(g.dgate_mlp.x, g2.dgate_mlp.x), cmp(g.dgate_mlp.w, g2.dgate_mlp.w), cmp(g.dgate_mlp.b, g2.dgate_mlp.b);
      cmp(g.dgate_mlp.w0, g2.dgate_mlp.w0), cmp(g.dgate_mlp.b0, g2.dgate_mlp.b0);
      CHECK(same == all);
      MESSAGE(bc.name << ": deterministic mode, second run bitwise equal in " << same << " of " << all << " tensors");
    }
  }
}

}  // namespace

TEST_CASE("cuda backward vs reference: small cases (the sanitizer set)") {
  std::vector<BwdCase> cases;
  cases.push_back(make("packed T={1,7,63,64,65,31,32,33,300} G=2 dk=dv=128 mlp", paper_cfg(4, 2, 128, 128),
                       {1, 7, 63, 64, 65, 31, 32, 33, 300}));
  cases.push_back(make("T=20 < l: no compressed block, G=16", paper_cfg(16, 1, 128, 128), {20}));
  {
    Config c = paper_cfg(8, 2, 64, 64);
    c.window = 1000;
    cases.push_back(make("T=300 w >= T, n >= blocks, G=4 dk=dv=64", c, {300}));
  }
  {
    Config c = paper_cfg(16, 1, 128, 128);
    c.cmp_len = c.cmp_stride = c.slc_len = 16, c.slc_count = 8;
    cases.push_back(make("T=600 l=d=l'=16 n=8 G=16", c, {600}));
  }
  {
    Config c = paper_cfg(16, 2, 128, 128);
    c.cmp_len = 32, c.cmp_stride = 8, c.slc_len = 32, c.slc_count = 6, c.init_blocks = 0, c.local_blocks = 0;
    BwdCase b = make("T=700 l=32 d=8 l'=32 n=6 no forced blocks G=8, gate MLP", c, {700});
    b.k.gates = test::GateMode::Mlp;
    cases.push_back(b);
  }
  {
    Config c = paper_cfg(8, 2, 128, 128);
    c.compress = CompressKind::Linear;
    BwdCase b = make("T=1000 G=4 linear, separate K/V per branch", c, {1000}, Precision::FP16);
    b.k.separate_kv = true;
    cases.push_back(b);
  }
  {
    Config c = paper_cfg(2, 2, 192, 128);
    c.slc_len = 128, c.slc_count = 4;
    cases.push_back(make("T=700 G=1 (MHA) dk=192 dv=128 l'=128 (two key sub-tiles)", c, {700}));
  }
  {
    BwdCase b = make("T=500 G=4 dk=dv=128 backward fp32 on bf16", paper_cfg(8, 2, 128, 128), {500});
    b.bwd_variant = cuda::Variant::Fp32;
    cases.push_back(b);
  }
  {
    BwdCase b = make("T=300 G=3 (fp32 fallback) dk=dv=64 gates all ones", paper_cfg(6, 2, 64, 64), {300});
    b.k.gates = test::GateMode::Ones;
    cases.push_back(b);
  }
  cases.push_back(make("T=400 G=16 fp32 dk=192 dv=128", paper_cfg(16, 1, 192, 128), {400}, Precision::FP32));
  for (const auto& bc : cases) run_case(bc);
}

// compute-sanitizer racecheck runs this set: mean phi and given gates, so that only our kernels
// run (cuBLAS's GEMM kernels synchronise through mbarriers that racecheck reports as hazards).
TEST_CASE("cuda backward racecheck set: tensor cores on tile edges, no cuBLAS") {
  std::vector<BwdCase> cases;
  for (int64_t G : {1, 16}) {
    Config c = paper_cfg(G, 1, 128, 128);
    c.compress = CompressKind::Mean;
    cases.push_back(make(cat("packed T={1,63,64,65,300} G=", G, " dk=dv=128 mean"), c, {1, 63, 64, 65, 300}));
  }
  for (const auto& bc : cases) run_case(bc);
}

TEST_CASE("cuda backward vs reference: paper-sized cases") {
  std::vector<BwdCase> cases;
  cases.push_back(make("T=4097 G=16 dk=dv=128 l=32 d=16 l'=64 n=16 w=512 mlp", paper_cfg(16, 1, 128, 128), {4097}));
  cases.push_back(make("T=2049 G=16 dk=192 dv=128 mlp", paper_cfg(16, 1, 192, 128), {2049}));
  cases.push_back(make("packed T={2000,65,1} G=4 dk=192 dv=128", paper_cfg(16, 4, 192, 128), {2000, 65, 1}));
  {
    Config c = paper_cfg(16, 1, 128, 128);
    c.compress = CompressKind::Linear;
    cases.push_back(make("T=1025 G=16 dk=dv=128 linear fp16", c, {1025}, Precision::FP16));
  }
  cases.push_back(make("T=1100 G=16 dk=dv=128 fp32", paper_cfg(16, 1, 128, 128), {1100}, Precision::FP32));
  for (const auto& bc : cases) run_case(bc);
}

TEST_CASE("cuda backward errors: a backward override that cannot run says why") {
  Config c = paper_cfg(16, 1, 128, 128);
  const cuda::DeviceCaps dev = cuda::device_caps(0);
  cuda::Options opt;
  opt.backward = true;
  opt.bwd_variant = cuda::Variant::Mma;
  opt.dtype = Precision::FP32;
  CHECK_THROWS_AS(cuda::choose_kernels(c, 1024, dev, opt), ConfigError);
  opt.dtype = Precision::BF16;
  c.Hq = 12, c.Hkv = 4;  // G = 3
  CHECK_THROWS_WITH_AS(cuda::choose_kernels(c, 1024, dev, opt), doctest::Contains("G = 3"), ConfigError);
  opt.bwd_variant = cuda::Variant::Cublas;
  CHECK_THROWS_AS(cuda::choose_kernels(c, 1024, dev, opt), ConfigError);
  opt.bwd_variant = cuda::Variant::Auto;
  const cuda::StageChoice b = cuda::choose_kernels(c, 1024, dev, opt).backward;
  CHECK(b.variant == cuda::Variant::Fp32);
  CHECK(b.why.find("G = 3") != std::string::npos);
  // A plan made without Options::backward holds no gradients.
  cuda::Plan plan(paper_cfg(16, 1, 128, 128), 64, {}, cuda::Options{});
  CHECK_THROWS_AS(plan.run_backward(), ConfigError);
}

TEST_CASE("cuda bench backward: timed runs on random device inputs are finite, every stage timed") {
  Config c = paper_cfg(16, 1, 128, 128);
  for (bool det : {false, true}) {
    cuda::Options opt;
    opt.intermediates = false;
    opt.backward = true;
    opt.deterministic = det;
    cuda::Plan plan(c, 2048, {}, opt);
    plan.randomize(3);
    plan.randomize_grad(4);
    const auto res = cuda::bench_backward(plan, 1, 3);
    CHECK(res.fwd_bwd_ms > res.bwd_ms);
    CHECK(res.bwd_ms > 0);
    std::vector<std::string> names;
    for (const auto& st : res.stages) names.push_back(st.stage);
    CHECK(names == std::vector<std::string>{"combine_bwd", "slc_attn_bwd.lists", "cmp_attn_bwd", "slc_attn_bwd",
                                            "win_attn_bwd", "phi_bwd", "sum_kv"});
    CHECK(res.kernels.backward.variant == cuda::Variant::Mma);
    CHECK(res.deterministic == det);
    const auto g = plan.download_grads();
    for (const Tensor<float>* t : {&g.dq, &g.dk, &g.dv, &g.dgates, &g.dphi.k.w1, &g.dphi.v.w2})
      for (float x : t->vec()) REQUIRE(std::isfinite(x));
  }
}
