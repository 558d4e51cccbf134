// The CUDA forward pass against the double reference, every stage and intermediate (STYLE 4):
// compress_fwd (phi), cmp_fwd (compression attention), select_fwd (scores and top-n), slc_fwd
// (selection attention), win_fwd (window), combine_fwd (gates and o). The reference runs in double
// on the very inputs the device sees (rounded to its precision first); tolerances are in
// tolerances.hpp. Sizes straddle tile edges (T = 1, 7, 63, 64, 65, l-1, l, l+1, 4097, ...) and the
// named corners appear: t < l, n >= blocks, w >= T, G = 1, dk != dv, packed sequences.
//
// Selected blocks must equal the reference's except at near-ties; the device's selection is also
// checked exactly against ref::select_blocks applied to the device's own scores (the tie rule).
// The selection attention is checked against a double twin fed the device's block lists, so a
// near-tie difference in the lists cannot hide or excuse an error in the attention itself.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <set>
#include <string>

#include "cuda_checks.hpp"
#include "cuda_twins.hpp"
#include "helpers.hpp"
#include "tolerances.hpp"

using namespace nsa;
using cuda::Precision;
using test::check_selection;
using test::SelectCheck;
using test::seq_of;
using test::slc_twin;

namespace {

Config paper(int64_t Hq, int64_t Hkv, int64_t dk, int64_t dv) { return test::paper_config(Hq, Hkv, dk, dv); }

struct GpuCase {
  std::string name;
  test::Case k;
  Precision prec = Precision::BF16;
  cuda::Variant variant = cuda::Variant::Auto;  // of every stage but phi (Auto: choose_kernels')
  std::function<void(cuda::Options&)> tweak;    // per-stage overrides, applied after `variant`
  bool exact_select = false;  // no near-ties possible: block lists must equal the reference's
};

void run_case(const GpuCase& gc) {
  const Config& c = gc.k.cfg;
  INFO(gc.name);
  if (gc.variant == cuda::Variant::Mma && !cuda::mma_compiled(int(c.dk), int(c.dv))) {
    MESSAGE("skipped " << gc.name << ": dk = " << c.dk << ", dv = " << c.dv
                       << " are not compiled for the mma kernels in this build (NSA_CUDA_DIMS=paper)");
    return;
  }
  const auto in_d = test::make_inputs<double>(gc.k);
  const ref::Inputs<float> in_f = cuda::round_to(gc.prec, in_d.cast<float>());
  const ref::Inputs<double> in = in_f.cast<double>();
  ref::check_inputs(c, in);
  const auto r = ref::forward(c, in);
  cuda::Options opt;
  opt.dtype = gc.prec;
  opt.set_variant(gc.variant);
  if (gc.tweak) gc.tweak(opt);
  cuda::Plan plan(c, in_f.N(), in_f.cu_seqlens, opt);
  plan.upload(in_f);
  plan.run();
  const auto gpu = plan.download();
  const std::string tag = cat(gc.name, " ", cuda::to_string(gc.prec), " ", plan.kernels().summary());
  const auto tl = test::tol::for_precision(gc.prec);
  using test::rel_l2;

  const test::StageErrors e = test::check_stages(c, in, gpu, r, tl);
  if (gc.exact_select) CHECK(e.sel.differ == 0);
  MESSAGE(tag << test::stage_report(e, tl));
}

GpuCase make(std::string name, Config c, std::vector<int64_t> seqlens, Precision prec = Precision::BF16) {
  GpuCase g;
  g.name = std::move(name);
  g.k.cfg = c;
  g.k.seqlens = std::move(seqlens);
  g.prec = prec;
  return g;
}

}  // namespace

TEST_CASE("cuda forward vs reference: small cases (the sanitizer set)") {
  std::vector<GpuCase> cases;
  {
    Config c = paper(8, 2, 128, 64);
    c.compress = CompressKind::Mean;
    cases.push_back(make("T=777 G=4 dk=128 dv=64 mean", c, {777}));
  }
  cases.push_back(make("packed T={1,7,63,64,65,31,32,33,300} G=2 dk=64 dv=128 mlp", paper(4, 2, 64, 128),
                       {1, 7, 63, 64, 65, 31, 32, 33, 300}));
  cases.push_back(make("T=513 G=1 (MHA) dk=dv=128 mlp", paper(2, 2, 128, 128), {513}));
  cases.push_back(make("T=20 < l: no compressed block, G=16", paper(16, 1, 128, 128), {20}));
  {
    Config c = paper(8, 2, 64, 64);
    c.window = 1000, c.slc_count = 16;
    cases.push_back(make("T=300 w >= T, n >= blocks, G=4 dk=dv=64", c, {300}));
  }
  {
    Config c = paper(16, 1, 128, 128);
    c.cmp_len = c.cmp_stride = c.slc_len = 16, c.slc_count = 8;
    cases.push_back(make("T=600 l=d=l'=16 (identity map) n=8 G=16", c, {600}));
  }
  {
    Config c = paper(16, 2, 64, 64);
    c.cmp_len = 32, c.cmp_stride = 8, c.slc_len = 32, c.slc_count = 6, c.init_blocks = 0, c.local_blocks = 0;
    GpuCase g = make("T=700 l=32 d=8 l'=32 n=6 no forced blocks G=8, gate MLP", c, {700});
    g.k.gates = test::GateMode::Mlp;
    cases.push_back(g);
  }
  {
    Config c = paper(8, 2, 128, 128);
    c.compress = CompressKind::Linear;
    GpuCase g = make("T=1000 G=4 linear, separate K/V per branch", c, {1000}, Precision::FP16);
    g.k.separate_kv = true;
    cases.push_back(g);
  }
  {
    GpuCase g = make("T=500 G=4 dk=dv=128 fp32 kernels on bf16 storage", paper(8, 2, 128, 128), {500});
    g.variant = cuda::Variant::Fp32;
    cases.push_back(g);
  }
  cases.push_back(make("T=300 G=3 (fp32 fallback) dk=dv=64", paper(6, 2, 64, 64), {300}));
  for (int64_t G : {1, 4, 16}) {  // the tensor-core kernels on the tile edges
    GpuCase g = make(cat("packed T={1,63,64,65,130} G=", G, " dk=dv=64 mma"), paper(G, 1, 64, 64),
                     {1, 63, 64, 65, 130});
    g.variant = cuda::Variant::Mma;
    cases.push_back(g);
  }
  cases.push_back(make("T=400 G=16 fp32 dk=192 dv=128", paper(16, 1, 192, 128), {400}, Precision::FP32));
  // Stages of different variants in one run (--variant STAGE=V): each reads what the other wrote.
  {
    GpuCase g = make("T=777 G=4 dk=dv=128 cmp_attn+topn mma, slc_attn fp32, win_attn+combine mma",
                     paper(8, 2, 128, 128), {777});
    g.tweak = [](cuda::Options& o) { o.variant[size_t(cuda::Stage::SlcAttn)] = cuda::Variant::Fp32; };
    cases.push_back(g);
    g.name = "T=777 G=4 dk=dv=128 cmp_attn+topn fp32, slc_attn mma, win_attn+combine fp32";
    g.tweak = [](cuda::Options& o) {
      o.variant[size_t(cuda::Stage::CmpAttn)] = cuda::Variant::Fp32;
      o.variant[size_t(cuda::Stage::SlcAttn)] = cuda::Variant::Mma;
      o.variant[size_t(cuda::Stage::WinAttn)] = cuda::Variant::Fp32;
    };
    cases.push_back(g);
  }
  for (const auto& gc : cases) run_case(gc);
}

// compute-sanitizer racecheck runs this set: mean phi and given gates, so that only our kernels
// run (cuBLAS's GEMM kernels synchronise through mbarriers that racecheck reports as hazards).
TEST_CASE("cuda racecheck set: the tensor-core kernels on tile edges, no cuBLAS") {
  std::vector<GpuCase> cases;
  for (int64_t G : {1, 4, 16}) {
    Config c = paper(G, 1, 64, 64);
    c.compress = CompressKind::Mean;
    GpuCase g = make(cat("packed T={1,63,64,65,300} G=", G, " dk=dv=64 mean mma"), c, {1, 63, 64, 65, 300});
    g.variant = cuda::Variant::Mma;
    cases.push_back(g);
  }
  // cmp_attn's and topn's mma kernels at the paper's head dims (compiled in every build): one and several key
  // tiles (T = 1100 sees 67 compressed keys, so a selection block straddles two tiles).
  for (int64_t G : {1, 4, 16}) {
    Config c = paper(G, 1, 128, 128);
    c.compress = CompressKind::Mean;
    GpuCase g = make(cat("packed T={1,63,64,65,300,1100} G=", G, " dk=dv=128 mean mma"), c,
                     {1, 63, 64, 65, 300, 1100});
    g.variant = cuda::Variant::Mma;
    cases.push_back(g);
  }
  {  // topn mma's general Eq. 9 mapping (not the paper's stencil) with two positions per warp
    Config c = paper(16, 2, 128, 128);
    c.compress = CompressKind::Mean;
    c.cmp_len = 32, c.cmp_stride = 8, c.slc_len = 32, c.slc_count = 6;
    GpuCase g = make("T=700 l=32 d=8 l'=32 n=6 G=8 dk=dv=128 mean mma", c, {700});
    g.variant = cuda::Variant::Mma;
    cases.push_back(g);
  }
  for (const auto& gc : cases) run_case(gc);
}

TEST_CASE("cuda forward vs reference: paper-sized cases") {
  std::vector<GpuCase> cases;
  cases.push_back(make("T=4097 G=16 dk=dv=128 l=32 d=16 l'=64 n=16 w=512 mlp", paper(16, 1, 128, 128), {4097}));
  cases.push_back(make("T=1025 G=16 dk=192 dv=128 mlp", paper(32, 2, 192, 128), {1025}));
  cases.push_back(make("T=2049 G=16 dk=dv=128 mlp", paper(16, 1, 128, 128), {2049}, Precision::FP16));
  {
    GpuCase g = make("T=3000 G=16 dk=192 dv=128 mlp mma", paper(16, 1, 192, 128), {3000});
    g.variant = cuda::Variant::Mma;
    cases.push_back(g);
  }
  {
    Config c = paper(16, 2, 64, 64);
    GpuCase g = make("T=1000 G=8 dk=dv=64 linear separate K/V", c, {1000});
    g.k.cfg.compress = CompressKind::Linear;
    g.k.separate_kv = true;
    cases.push_back(g);
  }
  cases.push_back(make("T=1100 G=16 dk=dv=128 fp32 (v0)", paper(16, 1, 128, 128), {1100}, Precision::FP32));
  cases.push_back(make("packed T={2000,65,1} G=4 dk=192 dv=128", paper(16, 4, 192, 128), {2000, 65, 1}));
  for (const auto& gc : cases) run_case(gc);
}

TEST_CASE("cuda topn: exactly tied scores go to the lower block index, as in the reference") {
  // Constant keys make every compressed key equal, so every interior block gets exactly the same
  // score in any summation order; the picks must be the lowest indices.
  for (cuda::Variant v : {cuda::Variant::Fp32, cuda::Variant::Mma}) {
    Config c = paper(16, 1, 128, 128);
    c.compress = CompressKind::Mean;
    GpuCase g = make(cat("T=1500 constant keys, ", cuda::to_string(v)), c, {1500});
    g.variant = v;
    g.exact_select = true;
    const auto in_d = test::make_inputs<double>(g.k);
    ref::Inputs<float> in_f = cuda::round_to(Precision::BF16, in_d.cast<float>());
    in_f.k.fill(0.5f);
    cuda::Options opt;
    opt.set_variant(v);
    const auto gpu = cuda::forward(c, in_f, opt);
    const auto r = ref::forward(c, in_f.cast<double>());
    INFO(g.name);
    CHECK(gpu.block_idx.vec() == r.block_idx.vec());
  }
}

TEST_CASE("cuda errors: a kernel override that cannot run says why") {
  // On this device (the choice function's own tests, on made-up devices: test_choice.cpp).
  Config c = paper(16, 1, 128, 128);
  const cuda::DeviceCaps dev = cuda::device_caps(0);
  cuda::Options opt;
  opt.set_variant(cuda::Variant::Mma);
  opt.dtype = Precision::FP32;
  CHECK_THROWS_AS(cuda::choose_kernels(c, 1024, dev, opt), ConfigError);
  opt.dtype = Precision::BF16;
  c.Hq = 12, c.Hkv = 4;  // G = 3
  CHECK_THROWS_WITH_AS(cuda::choose_kernels(c, 1024, dev, opt), doctest::Contains("G = 3"), ConfigError);
  CHECK_THROWS_WITH_AS(cuda::Plan(c, 1024, {}, opt), doctest::Contains("G = 3"), ConfigError);
  opt.set_variant(cuda::Variant::Auto);
  opt.warps[size_t(cuda::Stage::SlcAttn)] = 9;
  CHECK_THROWS_WITH_AS(cuda::choose_kernels(c, 1024, dev, opt), doctest::Contains("warps of slc_attn = 9"), ConfigError);
  opt.warps[size_t(cuda::Stage::SlcAttn)] = 0;
  const cuda::KernelChoice k = cuda::choose_kernels(c, 1024, dev, opt);
  CHECK(k[cuda::Stage::CmpAttn].variant == cuda::Variant::Fp32);
  CHECK(k[cuda::Stage::CmpAttn].why.find("G = 3") != std::string::npos);
}

TEST_CASE("cuda errors: a plan beyond the device's memory is refused by name, and the device stays usable") {
  // 64 packed sequences of 64k tokens (shared memory is sized by the longest: fine), 64 heads of
  // 128 bf16 values: q is 64 GiB, o, o_cmp and o_slc as much each, more than any GPU holds; the
  // refusal comes after the first buffers were allocated.
  const Config c = paper(64, 4, 128, 128);
  cuda::Options opt;
  std::vector<int64_t> cu;
  for (int64_t b = 0; b <= 64; ++b) cu.push_back(b << 16);
  try {
    cuda::Plan big(c, cu.back(), cu, opt);
    FAIL("a 256 GiB plan was allocated");
  } catch (const ResourceError& e) {
    const std::string msg = e.what();
    INFO(msg);
    CHECK(msg.find("out of device memory") != std::string::npos);
    CHECK(msg.find("MiB free of") != std::string::npos);
  }
  // Nothing of the failed plan stays allocated and no error is left pending: a small plan runs.
  cuda::Plan small(paper(16, 1, 128, 128), 256, {}, opt);
  small.randomize(1);
  small.run();
  const auto out = small.download();
  for (float x : out.o.vec()) REQUIRE(std::isfinite(x));
}

TEST_CASE("cuda bench: a timed run on random device inputs is finite and every stage is timed") {
  Config c = paper(16, 1, 128, 128);
  cuda::Options opt;
  opt.intermediates = false;
  cuda::Plan plan(c, 2048, {}, opt);
  plan.randomize(3);
  const auto res = cuda::bench(plan, 1, 3);
  CHECK(res.ms > 0);
  std::vector<std::string> names;
  for (const auto& st : res.stages) names.push_back(st.stage);
  CHECK(names == std::vector<std::string>{"phi", "cmp_attn", "topn", "slc_attn", "win_attn+combine"});
  CHECK(res.kernels.summary() == plan.kernels().summary());
  const auto out = plan.download();
  for (float x : out.o.vec()) REQUIRE(std::isfinite(x));
  CHECK(out.o_branch[2].empty());  // O_win fused away when intermediates are off
}
