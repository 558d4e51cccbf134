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

Config paper(int64_t Hq, int64_t Hkv, int64_t dk, int64_t dv) {
  Config c;
  c.Hq = Hq, c.Hkv = Hkv, c.dk = dk, c.dv = dv;
  c.cmp_len = 32, c.cmp_stride = 16, c.slc_len = 64, c.slc_count = 16, c.window = 512;
  c.compress = CompressKind::Mlp;
  return c;
}

struct GpuCase {
  std::string name;
  test::Case k;
  Precision prec = Precision::BF16;
  int kernel = -1;           // -1: the choice function's
  bool exact_select = false;  // no near-ties possible: block lists must equal the reference's
};

void run_case(const GpuCase& gc) {
  const Config& c = gc.k.cfg;
  INFO(gc.name);
  if (gc.kernel == 4 && !cuda::v1_compiled(int(c.dk), int(c.dv))) {
    MESSAGE("skipped " << gc.name << ": dk = " << c.dk << ", dv = " << c.dv
                       << " are not compiled for the tensor-core kernels in this build (NSA_CUDA_DIMS=paper)");
    return;
  }
  const auto in_d = test::make_inputs<double>(gc.k);
  const ref::Inputs<float> in_f = cuda::round_to(gc.prec, in_d.cast<float>());
  const ref::Inputs<double> in = in_f.cast<double>();
  ref::check_inputs(c, in);
  const auto r = ref::forward(c, in);
  cuda::Options opt;
  opt.dtype = gc.prec;
  opt.kernel = gc.kernel;
  cuda::Plan plan(c, in_f.N(), in_f.cu_seqlens, opt);
  plan.upload(in_f);
  plan.run();
  const auto gpu = plan.download();
  const std::string tag = cat(gc.name, " ", cuda::to_string(gc.prec), " v", plan.kernel());
  const auto tl = test::tol::for_precision(gc.prec);
  using test::rel_l2;

  // compress_fwd
  const double e_kc = rel_l2(gpu.k_cmp_compressed, r.k_cmp_compressed);
  const double e_vc = rel_l2(gpu.v_cmp_compressed, r.v_cmp_compressed);
  CHECK(gpu.cu_cmp == r.cu_cmp);
  CHECK(e_kc <= tl.compress);
  CHECK(e_vc <= tl.compress);
  // gates
  const double e_g = rel_l2(gpu.gates, r.gates);
  CHECK(e_g <= test::tol::kGates);
  // cmp_fwd
  const double e_oc = rel_l2(gpu.o_branch[0], r.o_branch[0]), e_lc = rel_l2(gpu.lse[0], r.lse[0]);
  CHECK(e_oc <= tl.attn);
  CHECK(e_lc <= tl.lse);
  // select_fwd
  const double e_sc = rel_l2(gpu.block_scores, r.block_scores);
  CHECK(e_sc <= tl.scores);
  const SelectCheck sel = check_selection(c, in.seqlens_or_single(), gpu, r, tl.tie);
  CHECK(sel.self_bad == 0);
  CHECK(sel.bad == 0);
  if (gc.exact_select) CHECK(sel.differ == 0);
  // slc_fwd, against the twin fed the device's lists
  Tensor<double> o_s, lse_s;
  slc_twin(c, in, gpu.block_idx, o_s, lse_s);
  const double e_os = rel_l2(gpu.o_branch[1], o_s), e_ls = rel_l2(gpu.lse[1], lse_s);
  CHECK(e_os <= tl.attn);
  CHECK(e_ls <= tl.lse);
  // win_fwd
  const double e_ow = rel_l2(gpu.o_branch[2], r.o_branch[2]), e_lw = rel_l2(gpu.lse[2], r.lse[2]);
  CHECK(e_ow <= tl.attn);
  CHECK(e_lw <= tl.lse);
  // combine_fwd: Eq. 5 with the reference's gates and branches (selection from the twin)
  Tensor<double> o_want(r.o.shape());
  for (int64_t i = 0; i < o_want.numel(); ++i) {
    const int64_t th = i / c.dv;
    o_want[i] = r.gates[th * 3] * r.o_branch[0][i] + r.gates[th * 3 + 1] * o_s[i] + r.gates[th * 3 + 2] * r.o_branch[2][i];
  }
  const double e_o = rel_l2(gpu.o, o_want);
  CHECK(e_o <= tl.attn);

  MESSAGE(tag << "\n  compress_fwd  k " << e_kc << "  v " << e_vc << "  (tol " << tl.compress << ")"
              << "\n  cmp_fwd       o " << e_oc << "  lse " << e_lc << "  (tol " << tl.attn << ", " << tl.lse << ")"
              << "\n  select_fwd    scores " << e_sc << " (tol " << tl.scores << "); lists equal "
              << sel.rows - sel.differ << "/" << sel.rows << ", near-ties " << sel.near_ties << ", wrong "
              << sel.bad << ", off own scores " << sel.self_bad << "\n  slc_fwd       o " << e_os << "  lse " << e_ls
              << "\n  win_fwd       o " << e_ow << "  lse " << e_lw << "\n  combine_fwd   o " << e_o << "  gates "
              << e_g);
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
    GpuCase g = make("T=500 G=4 dk=dv=128 kernel v0 on bf16 storage", paper(8, 2, 128, 128), {500});
    g.kernel = 0;
    cases.push_back(g);
  }
  cases.push_back(make("T=300 G=3 (v0 fallback) dk=dv=64", paper(6, 2, 64, 64), {300}));
  for (int64_t G : {1, 4, 16}) {  // the tensor-core kernels on the tile edges
    GpuCase g = make(cat("packed T={1,63,64,65,130} G=", G, " dk=dv=64 kernel v4"), paper(G, 1, 64, 64),
                     {1, 63, 64, 65, 130});
    g.kernel = 4;
    cases.push_back(g);
  }
  cases.push_back(make("T=400 G=16 fp32 (v0) dk=192 dv=128", paper(16, 1, 192, 128), {400}, Precision::FP32));
  for (const auto& gc : cases) run_case(gc);
}

// compute-sanitizer racecheck runs this set: mean phi and given gates, so that only our kernels
// run (cuBLAS's GEMM kernels synchronise through mbarriers that racecheck reports as hazards).
TEST_CASE("cuda racecheck set: the tensor-core kernels on tile edges, no cuBLAS") {
  std::vector<GpuCase> cases;
  for (int64_t G : {1, 4, 16}) {
    Config c = paper(G, 1, 64, 64);
    c.compress = CompressKind::Mean;
    GpuCase g = make(cat("packed T={1,63,64,65,300} G=", G, " dk=dv=64 mean kernel v4"), c, {1, 63, 64, 65, 300});
    g.kernel = 4;
    cases.push_back(g);
  }
  // v4's two kernels at the paper's head dims (compiled in every build): one and several key
  // tiles (T = 1100 sees 67 compressed keys, so a selection block straddles two tiles).
  for (int64_t G : {1, 4, 16}) {
    Config c = paper(G, 1, 128, 128);
    c.compress = CompressKind::Mean;
    GpuCase g = make(cat("packed T={1,63,64,65,300,1100} G=", G, " dk=dv=128 mean kernel v4"), c,
                     {1, 63, 64, 65, 300, 1100});
    g.kernel = 4;
    cases.push_back(g);
  }
  {  // v4's general Eq. 9 mapping (not the paper's stencil) with two positions per warp
    Config c = paper(16, 2, 128, 128);
    c.compress = CompressKind::Mean;
    c.cmp_len = 32, c.cmp_stride = 8, c.slc_len = 32, c.slc_count = 6;
    GpuCase g = make("T=700 l=32 d=8 l'=32 n=6 G=8 dk=dv=128 mean kernel v4", c, {700});
    g.kernel = 4;
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
    GpuCase g = make("T=3000 G=16 dk=192 dv=128 mlp kernel v4", paper(16, 1, 192, 128), {3000});
    g.kernel = 4;
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

TEST_CASE("cuda select: exactly tied scores go to the lower block index, as in the reference") {
  // Constant keys make every compressed key equal, so every interior block gets exactly the same
  // score in any summation order; the picks must be the lowest indices.
  for (int kernel : {0, 4}) {
    Config c = paper(16, 1, 128, 128);
    c.compress = CompressKind::Mean;
    GpuCase g = make(cat("T=1500 constant keys, kernel ", kernel), c, {1500});
    g.kernel = kernel;
    g.exact_select = true;
    const auto in_d = test::make_inputs<double>(g.k);
    ref::Inputs<float> in_f = cuda::round_to(Precision::BF16, in_d.cast<float>());
    in_f.k.fill(0.5f);
    cuda::Options opt;
    opt.kernel = kernel;
    const auto gpu = cuda::forward(c, in_f, opt);
    const auto r = ref::forward(c, in_f.cast<double>());
    INFO(g.name);
    CHECK(gpu.block_idx.vec() == r.block_idx.vec());
  }
}

TEST_CASE("cuda errors: a kernel override that cannot run says why") {
  Config c = paper(16, 1, 128, 128);
  cuda::Options opt;
  opt.kernel = 4;
  opt.dtype = Precision::FP32;
  CHECK_THROWS_AS(cuda::choose_kernel(c, opt), ConfigError);
  opt.dtype = Precision::BF16;
  c.Hq = 12, c.Hkv = 4;  // G = 3
  CHECK_THROWS_WITH_AS(cuda::choose_kernel(c, opt), doctest::Contains("G = 3"), ConfigError);
  opt.kernel = 7;
  CHECK_THROWS_AS(cuda::choose_kernel(c, opt), ConfigError);
  opt.kernel = 2;  // retired: the message names the commit that still has it
  CHECK_THROWS_WITH_AS(cuda::choose_kernel(c, opt), doctest::Contains("retired"), ConfigError);
  opt.kernel = -1;
  std::string why;
  CHECK(cuda::choose_kernel(c, opt, &why) == 0);
  CHECK(why.find("G = 3") != std::string::npos);
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
  CHECK(res.stages.size() == 4);
  const auto out = plan.download();
  for (float x : out.o.vec()) REQUIRE(std::isfinite(x));
  CHECK(out.o_branch[2].empty());  // O_win fused away when intermediates are off
}
