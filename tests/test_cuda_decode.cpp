// The CUDA decode step against the double reference (STYLE 4): decode_fwd, the twin of
// ref::decode_step. The reference runs in double on the very inputs the device sees (rounded to
// its precision first); tolerances are tests/tolerances.hpp's (the step adds only fp32 roundings
// to the forward kernels' rounding path: see there).
//
// Two kinds of test:
//   workload   cuda::decode_workload (prefill through the CUDA forward pass, then steps) against
//              ref::decode_workload: every per-position output, compressed K/V, the traffic of
//              every step and the cache at the end, checked like the forward pass (selection up
//              to recorded near-ties, the tie rule on the device's own scores, the selection
//              attention against a double twin fed the device's lists);
//   steps      one cache (ref::prefill in double, compressed rows rounded to the precision)
//              uploaded to the device, then ref::decode_step and Decoder::step side by side, step
//              by step, with sequences of different lengths dropping out.
// The corners are named in the cases: t < l (no compressed row yet), n >= valid blocks, w >= the
// length, G = 1 and 16, dk != dv, compressed-row emission every d steps, rings of branches with
// keys/values of their own, batches of different lengths.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <string>

#include "cuda_checks.hpp"
#include "decode.hpp"
#include "helpers.hpp"
#include "tolerances.hpp"

using namespace nsa;
using namespace nsa::test;
using cuda::Precision;

namespace {

Config paper(int64_t Hq, int64_t Hkv, int64_t dk, int64_t dv) { return test::paper_config(Hq, Hkv, dk, dv); }

struct DecCase {
  std::string name;
  test::Case k;                 // config, sequence lengths, separate K/V, gates, seed
  std::vector<int64_t> prefix;  // tokens of each sequence put in by the prefill
  Precision prec = Precision::BF16;
  bool constant_keys = false;   // every key 0.5: exactly tied scores, the selection must be exact
  int kernel = -1;              // the split kernel's version (Options::decode_kernel)
};

DecCase make(std::string name, Config c, std::vector<int64_t> seqlens, std::vector<int64_t> prefix,
             Precision prec = Precision::BF16) {
  DecCase d;
  d.name = std::move(name);
  d.k.cfg = c;
  d.k.seqlens = std::move(seqlens);
  d.prefix = std::move(prefix);
  d.prec = prec;
  return d;
}

std::string tag(const DecCase& dc) { return dc.kernel == -1 ? std::string(" (default kernel)") : cat(" kernel v", dc.kernel); }

DecCase with_kernel(DecCase d, int kernel) {
  d.kernel = kernel;
  return d;
}

bool compiled(const DecCase& dc) {
  if (cuda::mma_compiled(int(dc.k.cfg.dk), int(dc.k.cfg.dv))) return true;
  MESSAGE("skipped " << dc.name << ": dk = " << dc.k.cfg.dk << ", dv = " << dc.k.cfg.dv
                     << " are not compiled in this build (NSA_CUDA_DIMS=paper)");
  return false;
}

// The inputs both sides see: drawn in double, rounded to the precision.
ref::Inputs<float> device_inputs(const DecCase& dc) {
  ref::Inputs<float> in = cuda::round_to(dc.prec, make_inputs<double>(dc.k).cast<float>());
  if (dc.constant_keys) in.k.fill(0.5f);
  return in;
}

// A case's device inputs and their double copy for the reference, checked.
std::pair<ref::Inputs<float>, ref::Inputs<double>> checked_inputs(const DecCase& dc) {
  ref::Inputs<float> f = device_inputs(dc);
  ref::Inputs<double> d = f.cast<double>();
  ref::check_inputs(dc.k.cfg, d);
  return {std::move(f), std::move(d)};
}

template <class U, class S>
ref::DecodeCache<U> cast_cache(const ref::DecodeCache<S>& c) {
  ref::DecodeCache<U> o;
  o.cfg = c.cfg, o.share = c.share, o.capacity = c.capacity, o.len = c.len;
  o.k_cmp = c.k_cmp.template cast<U>(), o.v_cmp = c.v_cmp.template cast<U>();
  o.k_tail = c.k_tail.template cast<U>(), o.v_tail = c.v_tail.template cast<U>();
  o.k_slc = c.k_slc.template cast<U>(), o.v_slc = c.v_slc.template cast<U>();
  o.k_win = c.k_win.template cast<U>(), o.v_win = c.v_win.template cast<U>();
  return o;
}

// The raw rows of two caches (history and rings) must be equal: both hold the rounded inputs.
template <class A, class B>
bool raw_rows_equal(const ref::DecodeCache<A>& a, const ref::DecodeCache<B>& b) {
  auto eq = [](const Tensor<A>& x, const Tensor<B>& y) {
    if (x.numel() != y.numel()) return false;
    for (int64_t i = 0; i < x.numel(); ++i)
      if (double(x[i]) != double(y[i])) return false;
    return true;
  };
  return a.len == b.len && eq(a.k_slc, b.k_slc) && eq(a.v_slc, b.v_slc) && eq(a.k_tail, b.k_tail) &&
         eq(a.v_tail, b.v_tail) && eq(a.k_win, b.k_win) && eq(a.v_win, b.v_win);
}

// The compressed rows a cache holds (rows [0, Nc(len[b])) of each sequence), packed.
template <class S>
Tensor<double> held_cmp_rows(const ref::DecodeCache<S>& c, bool values) {
  const int64_t D = values ? c.cfg.dv : c.cfg.dk, row = c.cfg.Hkv * D;
  std::vector<double> out;
  for (int64_t b = 0; b < c.B(); ++b) {
    const S* p = values ? c.cmp_value(b, 0) : c.cmp_key(b, 0);
    out.insert(out.end(), p, p + c.cfg.num_cmp_blocks(c.len[size_t(b)]) * row);
  }
  return Tensor<double>({int64_t(out.size())}, out);
}

// ---- the whole workload ----------------------------------------------------------------------
void run_workload(const DecCase& dc) {
  const Config& c = dc.k.cfg;
  INFO(dc.name);
  if (!compiled(dc)) return;
  const auto [in_f, in] = checked_inputs(dc);
  const auto want = ref::decode_workload(c, in, dc.prefix);
  cuda::Options opt;
  opt.dtype = dc.prec;
  opt.decode_kernel = dc.kernel;
  const auto got = cuda::decode_workload(c, in_f, dc.prefix, opt);
  const ref::ForwardResult<double>& r = want.out;
  const ref::ForwardResult<float>& gpu = got.out;
  const auto tl = tol::for_precision(dc.prec);

  // every stage (prefill: the forward pass's phi; steps: the emitted rows)
  const StageErrors e = check_stages(c, in, gpu, r, tl);
  if (dc.constant_keys) CHECK(gpu.block_idx.vec() == r.block_idx.vec());
  // what every step read, and the cache at the end
  REQUIRE(got.steps.size() == want.steps.size());
  int64_t tok_bad = 0;
  for (size_t i = 0; i < got.steps.size(); ++i) {
    const auto &a = got.steps[i], &b = want.steps[i];
    tok_bad += a.seq != b.seq || a.pos != b.pos || a.tokens.cmp != b.tokens.cmp || a.tokens.win != b.tokens.win ||
               a.tokens.emit != b.tokens.emit || a.tokens.full != b.tokens.full;
  }
  CHECK(tok_bad == 0);
  CHECK(got.step_calls == want.step_calls);
  CHECK(raw_rows_equal(got.cache, want.cache));

  MESSAGE(dc.name << " " << std::string(cuda::to_string(dc.prec)) << tag(dc) << ", " << got.steps.size()
                  << " steps in " << got.step_calls << " calls" << stage_report(e, tl));
}

// ---- step by step from one uploaded cache ----------------------------------------------------
// rel_l2 accumulated over many tensors (test::rel_l2's rule: equal entries count in the norm
// only, a non-finite difference is infinite).
struct RelErr {
  double num = 0, den = 0;
  bool inf = false;
  template <class A, class B>
  void add(const A* a, const B* b, int64_t n) {
    for (int64_t i = 0; i < n; ++i) {
      const double x = double(a[i]), y = double(b[i]);
      if (x == y) {
        if (std::isfinite(y)) den += y * y;
        continue;
      }
      if (!std::isfinite(x) || !std::isfinite(y)) inf = true;
      num += (x - y) * (x - y);
      den += y * y;
    }
  }
  double rel() const { return inf ? INFINITY : den > 0 ? std::sqrt(num / den) : std::sqrt(num); }
};

void run_steps(const DecCase& dc) {
  const Config& c = dc.k.cfg;
  INFO(dc.name);
  if (!compiled(dc)) return;
  const auto [in_f, in] = checked_inputs(dc);
  const std::vector<int64_t> cu = in.seqlens_or_single();
  const int64_t B = int64_t(cu.size()) - 1;
  int64_t Tmax = 0;
  for (int64_t b = 0; b < B; ++b) Tmax = std::max(Tmax, cu[b + 1] - cu[b]);
  const auto tl = tol::for_precision(dc.prec);

  // The reference cache after the prompts, its compressed rows rounded to the precision: the
  // cache both sides start from.
  ref::RowGather<double> gd(in);
  ref::RowGather<float> gf(in_f);
  ref::DecodeCache<double> cache_d = ref::make_cache<double>(c, ref::kv_sharing(in), B, Tmax);
  std::vector<int64_t> rows, cu_p{0}, pre;
  for (int64_t b = 0; b < B; ++b) {
    if (dc.prefix[size_t(b)] == 0) continue;
    for (int64_t t = 0; t < dc.prefix[size_t(b)]; ++t) rows.push_back(cu[b] + t);
    cu_p.push_back(int64_t(rows.size()));
    pre.push_back(b);
  }
  if (!rows.empty()) ref::prefill(cache_d, gd.take(rows, cu_p), pre);
  ref::DecodeCache<float> cache_f = cast_cache<float>(cache_d);
  cache_f.k_cmp = cuda::round_to(dc.prec, cache_f.k_cmp);
  cache_f.v_cmp = cuda::round_to(dc.prec, cache_f.v_cmp);
  cache_d = cast_cache<double>(cache_f);
  cuda::Options opt;
  opt.dtype = dc.prec;
  opt.decode_kernel = dc.kernel;
  cuda::Decoder dec(c, ref::kv_sharing(in), B, Tmax, opt);
  dec.upload(cache_f);
  CHECK(raw_rows_equal(dec.download(), cache_d));

  RelErr e_oc, e_lc, e_ow, e_lw, e_sc, e_os, e_ls, e_o, e_g;
  SelectCheck sel;
  int64_t steps = 0, tok_bad = 0, pos_bad = 0;
  for (int64_t k = 0;; ++k) {
    std::vector<int64_t> active;
    rows.clear();
    for (int64_t b = 0; b < B; ++b)
      if (dc.prefix[size_t(b)] + k < cu[b + 1] - cu[b]) active.push_back(b), rows.push_back(cu[b] + dc.prefix[size_t(b)] + k);
    if (active.empty()) break;
    const ref::StepResult<double> r = ref::decode_step(cache_d, gd.take(rows), active);
    const ref::StepResult<float> g = dec.step(gf.take(rows), active);
    ++steps;
    pos_bad += g.pos != r.pos;
    REQUIRE(g.block_scores.shape() == r.block_scores.shape());
    const int64_t Bs = int64_t(rows.size()), HD = c.Hq * c.dv;
    e_oc.add(g.o_branch[0].data(), r.o_branch[0].data(), Bs * HD);
    e_lc.add(g.lse[0].data(), r.lse[0].data(), Bs * c.Hq);
    e_ow.add(g.o_branch[2].data(), r.o_branch[2].data(), Bs * HD);
    e_lw.add(g.lse[2].data(), r.lse[2].data(), Bs * c.Hq);
    e_sc.add(g.block_scores.data(), r.block_scores.data(), r.block_scores.numel());
    e_g.add(g.gates.data(), r.gates.data(), r.gates.numel());
    const SelectCheck s = check_lists(c, r.pos, g.block_idx, g.block_scores, r.block_idx, r.block_scores, tl.tie);
    sel.rows += s.rows, sel.differ += s.differ, sel.near_ties += s.near_ties, sel.bad += s.bad, sel.self_bad += s.self_bad;
    for (int64_t i = 0; i < Bs; ++i) {
      const auto &a = g.tokens[size_t(i)], &b = r.tokens[size_t(i)];
      const bool same_lists = std::equal(g.block_idx.row(i, 0), g.block_idx.row(i, 0) + c.Hkv * c.slc_count,
                                         r.block_idx.row(i, 0));
      tok_bad += a.cmp != b.cmp || a.win != b.win || a.emit != b.emit || a.full != b.full ||
                 (same_lists && a.slc != b.slc);
      if (!same_lists) continue;  // the selection branch where both selected the same blocks
      e_os.add(g.o_branch[1].row(i, 0), r.o_branch[1].row(i, 0), HD);
      e_ls.add(&g.lse[1](i, 0), &r.lse[1](i, 0), c.Hq);
      e_o.add(g.o.row(i, 0), r.o.row(i, 0), HD);
    }
  }
  CHECK(pos_bad == 0);
  CHECK(tok_bad == 0);
  CHECK(e_oc.rel() <= tl.attn);
  CHECK(e_lc.rel() <= tl.lse);
  CHECK(e_ow.rel() <= tl.attn);
  CHECK(e_lw.rel() <= tl.lse);
  CHECK(e_sc.rel() <= tl.scores);
  CHECK(e_os.rel() <= tl.attn);
  CHECK(e_ls.rel() <= tl.lse);
  CHECK(e_o.rel() <= tl.attn);
  CHECK(e_g.rel() <= tol::kGates);
  CHECK(sel.self_bad == 0);
  CHECK(sel.bad == 0);
  // The caches at the end: the same raw rows; the emitted compressed rows within phi's tolerance.
  const ref::DecodeCache<float> end = dec.download();
  CHECK(raw_rows_equal(end, cache_d));
  const double e_kc = rel_l2(held_cmp_rows(end, false), held_cmp_rows(cache_d, false));
  const double e_vc = rel_l2(held_cmp_rows(end, true), held_cmp_rows(cache_d, true));
  CHECK(e_kc <= tl.compress);
  CHECK(e_vc <= tl.compress);
  MESSAGE(dc.name << " " << std::string(cuda::to_string(dc.prec)) << tag(dc) << ", " << steps
                  << " step calls from an uploaded cache"
                  << "\n  cache     compressed k " << e_kc << "  v " << e_vc << "  (tol " << tl.compress << ")"
                  << "\n  cmp       o " << e_oc.rel() << "  lse " << e_lc.rel() << "\n  select    scores " << e_sc.rel()
                  << "; lists equal " << sel.rows - sel.differ << "/" << sel.rows << ", near-ties " << sel.near_ties
                  << ", wrong " << sel.bad << ", off own scores " << sel.self_bad << "\n  slc       o " << e_os.rel()
                  << "  lse " << e_ls.rel() << " (rows with equal lists)\n  win       o " << e_ow.rel() << "  lse "
                  << e_lw.rel() << "\n  combine   o " << e_o.rel() << "  gates " << e_g.rel());
}

}  // namespace

TEST_CASE("cuda decode: small cases (the sanitizer set)") {
  std::vector<DecCase> ws;
  // Paper blocks, G = 16; sequences of different lengths: one from the empty cache (t < l, the
  // first emission at t = 31, n >= valid blocks, w >= length), one prefilled across a block edge.
  ws.push_back(make("packed T={50,100} prefix {0,70} G=16 dk=dv=128 mlp", paper(16, 1, 128, 128), {50, 100}, {0, 70}));
  {
    Config c = paper(2, 2, 128, 128);
    c.window = 40, c.slc_count = 4;
    ws.push_back(make("T=110 prefix 60 G=1 (MHA) dk=dv=128 w=40 n=4", c, {110}, {60}));
  }
  {
    Config c = paper(8, 2, 192, 128);
    c.compress = CompressKind::Linear;
    DecCase d = make("packed T={90,77} prefix {70,55} G=4 dk=192 dv=128 linear, separate K/V per branch", c,
                     {90, 77}, {70, 55}, Precision::FP16);
    d.k.separate_kv = true;
    ws.push_back(d);
  }
  for (const auto& d : ws) run_workload(d);
  for (int kernel : {1, 3}) run_workload(with_kernel(ws[0], kernel));  // the other split kernel versions
  {
    DecCase d = make("packed T={110,64,40} prefix {100,33,0} G=16 dk=dv=128 mlp, gate MLP", paper(16, 1, 128, 128),
                     {110, 64, 40}, {100, 33, 0});
    d.k.gates = GateMode::Mlp;
    run_steps(d);
  }
}

// compute-sanitizer racecheck runs this set: mean phi and given gates, so that only our kernels
// run (cuBLAS's GEMM kernels synchronise through mbarriers that racecheck reports as hazards).
TEST_CASE("cuda decode racecheck set: G = 1, 4, 16, every split kernel, no cuBLAS") {
  for (int64_t G : {1, 4, 16})
    for (int kernel : {1, 2, 3}) {
      Config c = paper(G, 1, 128, 128);
      c.compress = CompressKind::Mean;
      c.window = 64;
      run_workload(with_kernel(make(cat("T=100 prefix 80 G=", G, " dk=dv=128 mean w=64"), c, {100}, {80}), kernel));
    }
  // l = 32, d = 2: 7 selection blocks per CTA of the selection kernel, so an item's block scores
  // come from two CTAs and the last to finish runs the top-n; the shorter sequence's item has
  // fewer blocks than the step's widest (a CTA with no block of its own).
  Config c = paper(16, 1, 128, 128);
  c.compress = CompressKind::Mean;
  c.window = 64, c.cmp_stride = 2, c.slc_count = 6;
  run_workload(make("packed T={520,200} prefix {470,150} l=32 d=2 l'=64 n=6 mean w=64 (2 selection CTAs per item)", c,
                    {520, 200}, {470, 150}));
}

TEST_CASE("cuda decode vs reference: many steps") {
  const DecCase packed = make("packed T={700,650,60} prefix {600,560,0} G=16 dk=dv=128 mlp", paper(16, 1, 128, 128),
                              {700, 650, 60}, {600, 560, 0});
  for (int kernel : {1, 2, 3}) run_workload(with_kernel(packed, kernel));
  const DecCase wide = make("T=1100 prefix 1000 G=16 dk=192 dv=128 mlp Hkv=2", paper(32, 2, 192, 128), {1100}, {1000});
  run_workload(wide);
  run_workload(with_kernel(wide, 3));
  run_workload(make("T=900 prefix 850 G=16 dk=dv=128 mlp fp16", paper(16, 1, 128, 128), {900}, {850},
                    Precision::FP16));
  {
    Config c = paper(16, 1, 128, 128);
    c.cmp_len = c.cmp_stride = c.slc_len = 16, c.slc_count = 8;
    run_workload(make("T=400 prefix 300 l=d=l'=16 (identity map) n=8 G=16", c, {400}, {300}));
  }
  {
    Config c = paper(16, 2, 128, 128);
    c.cmp_len = 32, c.cmp_stride = 8, c.slc_len = 32, c.slc_count = 6, c.init_blocks = 0, c.local_blocks = 0;
    DecCase d = make("T=500 prefix 380 l=32 d=8 l'=32 n=6 no forced blocks G=8, gate MLP", c, {500}, {380});
    d.k.gates = GateMode::Mlp;
    run_workload(d);
  }
  {
    Config c = paper(16, 1, 128, 128);
    c.compress = CompressKind::Mean;
    DecCase d = make("T=1500 prefix 1380 constant keys: exactly tied scores go to the lower block", c, {1500}, {1380});
    d.constant_keys = true;
    run_workload(d);
    run_workload(with_kernel(d, 3));
  }
  {
    Config c = paper(16, 1, 128, 128);
    c.compress = CompressKind::Mean;
    c.cmp_stride = 2;
    DecCase d = make("T=1500 prefix 1400 l=32 d=2 constant keys: exact ties across 4 selection CTAs per item", c,
                     {1500}, {1400});
    d.constant_keys = true;
    run_workload(d);
  }
  {
    // The paper's blocks at a length where an item's 68 blocks take two selection CTAs (63 each).
    Config c = paper(16, 1, 128, 128);
    c.compress = CompressKind::Mean;
    run_steps(make("packed T={4300,1200} prefix {4250,1150} paper blocks mean (2 selection CTAs per item)", c,
                   {4300, 1200}, {4250, 1150}));
  }
  {
    DecCase d = make("packed T={2100,1500,300,30} prefix {2000,1450,200,0} G=16 dk=dv=128 mlp",
                     paper(16, 1, 128, 128), {2100, 1500, 300, 30}, {2000, 1450, 200, 0});
    run_steps(d);
  }
  {
    Config c = paper(8, 2, 192, 128);
    c.compress = CompressKind::Linear;
    DecCase d = make("packed T={600,350} prefix {520,300} G=4 dk=192 dv=128 linear, separate K/V (rings)", c,
                     {600, 350}, {520, 300});
    d.k.separate_kv = true;
    run_steps(d);
  }
}

TEST_CASE("cuda decode: refusals name the problem") {
  Config c = paper(16, 1, 128, 128);
  cuda::Options opt;
  opt.dtype = Precision::FP32;
  CHECK_THROWS_WITH_AS(cuda::Decoder(c, {}, 1, 100, opt), doctest::Contains("fp32"), ConfigError);
  opt.dtype = Precision::BF16;
  Config big = paper(64, 2, 128, 128);  // G = 32
  CHECK_THROWS_WITH_AS(cuda::Decoder(big, {}, 1, 100, opt), doctest::Contains("G = 32"), ConfigError);
  cuda::Decoder dec(c, {}, 2, 40, opt);
  DecCase d = make("refusals", c, {41}, {0});
  const ref::Inputs<float> in = device_inputs(d);
  ref::RowGather<float> g(in);
  CHECK_THROWS_AS(dec.step(g.take({0}), {2}), InputError);     // no such sequence
  CHECK_THROWS_AS(dec.step(g.take({0, 1}), {1, 1}), InputError);  // addressed twice
  std::vector<int64_t> rows(40);
  for (int64_t i = 0; i < 40; ++i) rows[size_t(i)] = i;
  dec.prefill(g.take(rows, {0, 40}), {0});
  CHECK(dec.lengths()[0] == 40);
  CHECK_THROWS_AS(dec.step(g.take({40}), {0}), ResourceError);  // beyond the capacity
  CHECK_THROWS_AS(dec.prefill(g.take(rows, {0, 40}), {0}), InputError);  // not empty
}

TEST_CASE("cuda decode bench: a timed step is finite and every stage is timed") {
  Config c = paper(16, 1, 128, 128);
  const cuda::DecodeBench b = cuda::bench_decode(c, 2, 3000, cuda::Options{}, 1, 3);
  CHECK(b.step.ms > 0);
  CHECK(b.emit.ms > 0);
  CHECK(b.step.stages.size() == 4);  // cmp_attn+win_attn (splits), topn, slc_attn (splits), combine (merges, Eq. 5)
  CHECK(b.step.kernel >= 1);  // the default version
  CHECK(b.step.kernel <= 3);
  CHECK(b.emit.stages.size() == 5);  // + append and phi
  CHECK(b.pos == 3000);
  CHECK((b.pos_emit + 1 - c.cmp_len) % c.cmp_stride == 0);
}
