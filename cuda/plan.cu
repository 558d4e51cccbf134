// The Plan (nsa_cuda.hpp): the forward pass on the device (docs/spec.md 1-5): buffers sized for one
// config and packing, the kernels choose_kernels picked (choice.cu), and the stages in the spec's
// order: the gates, phi (Eq. 7), cmp_attn, topn (Eq. 8-11), slc_attn (Eq. 12), win_attn and
// combine (Eq. 5). The backward stages are in backward.cu, the benchmarks in measure.cu.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>

#include "check.hpp"
#include "cmp_attn_sm90.hpp"
#include "kernels.hpp"
#include "measure.hpp"
#include "nsa_cuda.hpp"
#include "plan.hpp"
#include "win_attn_sm90.hpp"

namespace nsa::cuda {

Plan::Plan(const Config& cfg, int64_t N, std::vector<int64_t> cu_seqlens, const Options& opt) : impl_(new Impl) {
  Impl& I = *impl_;
  try {
    cfg.validate();
    std::string why;
    if (!available(&why)) throw CudaError(why);
    NSA_CUDA_CHECK(cudaSetDevice(opt.device));
    I.cfg = cfg;
    I.opt = opt;
    I.N = N;
    I.cu = cu_seqlens.empty() ? std::vector<int64_t>{0, N} : std::move(cu_seqlens);
    if (I.cu.front() != 0 || I.cu.back() != N)
      throw InputError(cat("cu_seqlens must start at 0 and end at N = ", N));
    FwdParams& p = I.p;
    p.B = int(I.cu.size()) - 1;
    p.N = N;
    int64_t Tmax = 0;
    I.cu_cmp.assign(1, 0);
    for (int b = 0; b < p.B; ++b) {
      const int64_t T = I.cu[b + 1] - I.cu[b];
      if (T < 0) throw InputError("cu_seqlens must not decrease");
      Tmax = std::max(Tmax, T);
      I.cu_cmp.push_back(I.cu_cmp.back() + cfg.num_cmp_blocks(T));
    }
    if (Tmax > (int64_t(1) << 30)) throw ConfigError(cat("a sequence of ", Tmax, " tokens is too long (max 2^30)"));
    p.Nc = I.cu_cmp.back();
    p.Tmax = int(Tmax);
    static_cast<LayerParams&>(p) = layer_params(cfg);
    p.NB = int(cfg.num_slc_blocks(Tmax));

    // The kernel of each stage (choice.cu): shared memory for the block scores of the longest
    // sequence included.
    I.kernels = choose_kernels(cfg, Tmax, device_caps(opt.device), opt);

    // Buffers.
    auto* cu_d = I.alloc_t<int64_t>(int64_t(I.cu.size()), "cu_seqlens");
    I.put(cu_d, I.cu.data(), I.cu.size() * sizeof(int64_t));
    auto* cc_d = I.alloc_t<int64_t>(int64_t(I.cu_cmp.size()), "cu_cmp");
    I.put(cc_d, I.cu_cmp.data(), I.cu_cmp.size() * sizeof(int64_t));
    p.cu_seqlens = cu_d;
    p.cu_cmp = cc_d;
    const int64_t NHq = N * p.Hq;
    p.q = I.alloc_e(NHq * p.dk, "q");
    I.k_shared = I.alloc_e(N * p.Hkv * p.dk, "k");
    I.v_shared = I.alloc_e(N * p.Hkv * p.dv, "v");
    p.k_cmp = p.k_slc = p.k_win = I.k_shared;
    p.v_cmp = p.v_slc = p.v_win = I.v_shared;
    float* gates = I.alloc_t<float>(NHq * 3, "gates");
    p.gates = gates;
    fill(gates, NHq * 3, 1.0f, nullptr);
    p.kc = I.alloc_e(p.Nc * p.Hkv * p.dk, "compressed keys");
    p.vc = I.alloc_e(p.Nc * p.Hkv * p.dv, "compressed values");
    p.o = I.alloc_e(NHq * p.dv, "o");
    p.o_cmp = I.alloc_e(NHq * p.dv, "o_cmp");
    p.o_slc = I.alloc_e(NHq * p.dv, "o_slc");
    // The fp32 combine is a kernel of its own, reading O_win; the backward pass reads it too.
    p.o_win = opt.intermediates || I.kernels[Stage::Combine].fused_into < 0 || opt.backward ? I.alloc_e(NHq * p.dv, "o_win") : nullptr;
    p.lse_cmp = I.alloc_t<float>(NHq, "lse_cmp");
    p.lse_slc = I.alloc_t<float>(NHq, "lse_slc");
    p.lse_win = I.alloc_t<float>(NHq, "lse_win");
    p.block_idx = I.alloc_t<int32_t>(N * p.Hkv * p.slc_count, "block_idx");
    p.block_scores = opt.intermediates ? I.alloc_t<float>(N * p.Hkv * p.NB, "block_scores") : nullptr;
    // Poison every output (NaN bytes; block indices far out of range) so that an element a kernel
    // fails to write cannot pass a test.
    const size_t es = size_t(element_size(opt.dtype));
    auto poison = [](void* ptr, size_t bytes, int byte) {
      if (ptr && bytes) NSA_CUDA_CHECK(cudaMemset(ptr, byte, bytes));
    };
    for (void* o : {p.o, p.o_cmp, p.o_slc, p.o_win}) poison(o, size_t(NHq) * p.dv * es, 0xff);
    for (float* l : {p.lse_cmp, p.lse_slc, p.lse_win}) poison(l, size_t(NHq) * 4, 0xff);
    poison(p.block_idx, size_t(N) * p.Hkv * p.slc_count * 4, 0x7f);
    poison(p.block_scores, size_t(N) * p.Hkv * p.NB * 4, 0xff);
    poison(p.kc, size_t(p.Nc) * p.Hkv * p.dk * es, 0xff);
    poison(p.vc, size_t(p.Nc) * p.Hkv * p.dv * es, 0xff);
    if (cfg.compress != CompressKind::Mean && p.Nc > 0) {
      const int64_t D = std::max(p.dk, p.dv), hc = std::max(cfg.hidden_k(), cfg.hidden_v());
      I.ws.X = I.alloc_e(int64_t(p.Hkv) * p.Nc * p.cmp_len * D, "phi workspace X");
      I.ws.H = I.alloc_t<float>(int64_t(p.Hkv) * p.Nc * std::max(hc, D), "phi workspace H");
      I.ws.Hb = I.alloc_e(int64_t(p.Hkv) * p.Nc * hc, "phi workspace Hb");
      I.ws.Y = I.alloc_t<float>(p.Nc * p.Hkv * D, "phi workspace Y");
    }
    if (I.mma(Stage::CmpAttn)) I.tm_cmp = I.tile_map(32 * I.warps(Stage::CmpAttn) / p.G, "cmp_attn tiles");
    if (I.mma(Stage::Topn)) I.tm_topn = I.tile_map(16 * I.warps(Stage::Topn) / p.G, "topn tiles");
    if (I.mma(Stage::SlcAttn)) I.tm_slc = I.tile_map(16 / p.G, "slc_attn tiles");
    if (I.mma(Stage::WinAttn)) I.tm_win = I.tile_map(16 * I.warps(Stage::WinAttn) / p.G, "win_attn tiles");
    if (I.wgmma(Stage::CmpAttn)) I.tm_cmp = I.tile_map(cmp_attn_sm90_tile_positions(p.G), "cmp_attn tiles");
    if (I.wgmma(Stage::WinAttn)) I.tm_win = I.tile_map(win_attn_sm90_tile_positions(p.G), "win_attn tiles");
    I.blas.create();
    if (opt.backward) setup_backward(I);
    NSA_CUDA_CHECK(cudaDeviceSynchronize());
  } catch (...) {
    delete impl_;
    throw;
  }
}

Plan::~Plan() { delete impl_; }

const KernelChoice& Plan::kernels() const { return impl_->kernels; }
const Config& Plan::config() const { return impl_->cfg; }
size_t Plan::device_bytes() const {
  size_t s = 0;
  for (const auto& b : impl_->buffers) s += b.bytes;
  return s;
}

void Plan::upload(const ref::Inputs<float>& in) {
  Impl& I = *impl_;
  FwdParams& p = I.p;
  if (in.N() != I.N) throw InputError(cat("inputs hold ", in.N(), " tokens, the plan was made for ", I.N));
  if (in.seqlens_or_single() != I.cu) throw InputError("inputs' cu_seqlens differ from the plan's");
  auto put_e = [&](const void* dst, const Tensor<float>& t) {
    const std::vector<char> e = to_elems(I.opt.dtype, t.data(), size_t(t.numel()));
    I.put(const_cast<void*>(dst), e.data(), e.size());
  };
  put_e(p.q, in.q);
  put_e(I.k_shared, in.k);
  put_e(I.v_shared, in.v);
  const void** ks[3] = {&p.k_cmp, &p.k_slc, &p.k_win};
  const void** vs[3] = {&p.v_cmp, &p.v_slc, &p.v_win};
  for (int c = 0; c < kBranches; ++c) {
    *ks[c] = in.k_own[c].empty() ? I.k_shared : I.upload_e(in.k_own[c], "k of a branch");
    *vs[c] = in.v_own[c].empty() ? I.v_shared : I.upload_e(in.v_own[c], "v of a branch");
  }
  float* gates = const_cast<float*>(p.gates);
  if (!in.gates.empty()) {
    I.gate_source = Impl::GateSource::Given;
    I.put(gates, in.gates.data(), size_t(in.gates.numel()) * sizeof(float));
  } else if (in.gate_mlp.given()) {
    I.gate_source = Impl::GateSource::Mlp;
    const auto& m = in.gate_mlp;
    GateMlpDevice& d = I.gate_mlp;
    d.x = I.upload_f(m.x, "gate_x");
    d.w0 = I.upload_f(m.w0, "gate_w0");
    d.b0 = I.upload_f(m.b0, "gate_b0");
    d.w = I.upload_f(m.w, "gate_w");
    d.b = I.upload_f(m.b, "gate_b");
    d.dm = int(m.x.dim(1));
    d.dh = m.w0.empty() ? 0 : int(m.w0.dim(1));
    d.act = m.act;
    d.hidden = d.dh ? I.alloc_t<float>(I.N * d.dh, "gate hidden") : nullptr;
  } else {
    I.gate_source = Impl::GateSource::Ones;
    fill(gates, I.N * p.Hq * 3, 1.0f, nullptr);
  }
  if (I.cfg.compress != CompressKind::Mean) {
    I.phi_k = I.upload_phi(in.phi.k);
    I.phi_v = I.upload_phi(in.phi.v);
  }
  if (I.has_bwd) backward_inputs_changed(I, &in.phi);
  NSA_CUDA_CHECK(cudaDeviceSynchronize());
}

void Plan::randomize(uint64_t seed) {
  Impl& I = *impl_;
  FwdParams& p = I.p;
  auto normal = [&](const void* x, int64_t n, uint64_t s) {
    fill_normal_elems(I.opt.dtype, const_cast<void*>(x), n, s);
  };
  normal(p.q, I.N * p.Hq * p.dk, seed);
  normal(I.k_shared, I.N * p.Hkv * p.dk, seed + 1);
  normal(I.v_shared, I.N * p.Hkv * p.dv, seed + 2);
  p.k_cmp = p.k_slc = p.k_win = I.k_shared;
  p.v_cmp = p.v_slc = p.v_win = I.v_shared;
  fill_uniform_floats(const_cast<float*>(p.gates), I.N * p.Hq * 3, seed + 3);
  I.gate_source = Impl::GateSource::Given;
  if (I.cfg.compress != CompressKind::Mean) {
    const ref::CompressParams<float> phi = ref::random_compress_params<float>(I.cfg, seed);
    I.phi_k = I.upload_phi(phi.k);
    I.phi_v = I.upload_phi(phi.v);
    if (I.has_bwd) backward_inputs_changed(I, &phi);
  } else if (I.has_bwd) {
    backward_inputs_changed(I, nullptr);
  }
  NSA_CUDA_CHECK(cudaDeviceSynchronize());
}

// The stages in order, each labelled by its stage (or the stages one kernel runs together);
// run_timed records an event after each.
// The Hopper kernels' parameters (cmp_attn_sm90.hpp, win_attn_sm90.hpp) from the plan's, at each
// run: a plan bound to caller memory (bind_device) changes its pointers between runs.
static Sm90Elem sm90_elem(Precision prec) { return prec == Precision::FP16 ? Sm90Elem::FP16 : Sm90Elem::BF16; }

static CmpAttnSm90Params cmp_attn_sm90_params(const Plan::Impl& I) {
  const FwdParams& p = I.p;
  CmpAttnSm90Params a;
  a.B = p.B, a.N = p.N, a.Nc = p.Nc, a.Hq = p.Hq, a.Hkv = p.Hkv, a.G = p.G, a.dk = p.dk, a.dv = p.dv;
  a.l = p.cmp_len, a.d = p.cmp_stride, a.scale = p.scale, a.elem = sm90_elem(I.opt.dtype);
  a.cu_seqlens = p.cu_seqlens, a.cu_cmp = p.cu_cmp, a.cu_tiles = I.tm_cmp.cu_tiles, a.tiles = I.tm_cmp.total;
  a.q = p.q, a.kc = p.kc, a.vc = p.vc, a.o_cmp = p.o_cmp, a.lse_cmp = p.lse_cmp;
  a.persistent = p.Tmax > 8192;  // choice.cu says why
  return a;
}

static WinAttnSm90Params win_attn_sm90_params(const Plan::Impl& I) {
  const FwdParams& p = I.p;
  WinAttnSm90Params a;
  a.B = p.B, a.N = p.N, a.Hq = p.Hq, a.Hkv = p.Hkv, a.G = p.G, a.dk = p.dk, a.dv = p.dv, a.w = p.window;
  a.scale = p.scale, a.elem = sm90_elem(I.opt.dtype);
  a.cu_seqlens = p.cu_seqlens, a.cu_tiles = I.tm_win.cu_tiles, a.tiles = I.tm_win.total;
  a.q = p.q, a.k_win = p.k_win, a.v_win = p.v_win, a.gates = p.gates, a.o_cmp = p.o_cmp, a.o_slc = p.o_slc;
  a.o = p.o, a.lse_win = p.lse_win, a.o_win = p.o_win;
  return a;
}

static StageList stages(Plan::Impl& I) {
  StageList st;
  const Precision prec = I.opt.dtype;
  if (I.gate_source == Plan::Impl::GateSource::Mlp)
    st.push_back({"combine.gates", [&I](cudaStream_t s) {
                    I.blas.set_stream(s);
                    gates_from_mlp(I.p, I.gate_mlp, const_cast<float*>(I.p.gates), I.blas.handle, s);
                  }});
  st.push_back({"phi", [&I, prec](cudaStream_t s) {
                  I.blas.set_stream(s);
                  phi_forward(I.cfg, I.p, prec, I.p.k_cmp, I.p.dk, int(I.cfg.hidden_k()), I.phi_k, I.ws, I.p.kc,
                              I.blas.handle, s);
                  phi_forward(I.cfg, I.p, prec, I.p.v_cmp, I.p.dv, int(I.cfg.hidden_v()), I.phi_v, I.ws, I.p.vc,
                              I.blas.handle, s);
                }});
  if (I.wgmma(Stage::CmpAttn)) {
    st.push_back({"cmp_attn", [&I](cudaStream_t s) { cmp_attn_sm90(cmp_attn_sm90_params(I), s); }});
    st.push_back({"topn", [&I, prec](cudaStream_t s) { topn_mma(prec, I.p, I.tm_topn, I.warps(Stage::Topn), s); }});
  } else if (I.mma(Stage::CmpAttn)) {
    st.push_back({"cmp_attn", [&I, prec](cudaStream_t s) {
                    cmp_attn_mma(prec, I.p, I.tm_cmp, I.warps(Stage::CmpAttn), s);
                  }});
    st.push_back({"topn", [&I, prec](cudaStream_t s) { topn_mma(prec, I.p, I.tm_topn, I.warps(Stage::Topn), s); }});
  } else {
    st.push_back({"cmp_attn+topn", [&I, prec](cudaStream_t s) { cmp_attn_fp32(prec, I.p, s); }});
  }
  if (I.mma(Stage::SlcAttn))
    st.push_back({"slc_attn", [&I, prec](cudaStream_t s) {
                    slc_attn_mma(prec, I.p, I.tm_slc, I.warps(Stage::SlcAttn), s);
                  }});
  else
    st.push_back({"slc_attn", [&I, prec](cudaStream_t s) { slc_attn_fp32(prec, I.p, s); }});
  if (I.wgmma(Stage::WinAttn)) {
    st.push_back({"win_attn+combine", [&I](cudaStream_t s) { win_attn_sm90(win_attn_sm90_params(I), s); }});
  } else if (I.mma(Stage::WinAttn)) {
    st.push_back({"win_attn+combine", [&I, prec](cudaStream_t s) {
                    win_attn_mma(prec, I.p, I.tm_win, I.warps(Stage::WinAttn), s);
                  }});
  } else {
    st.push_back({"win_attn", [&I, prec](cudaStream_t s) { win_attn_fp32(prec, I.p, s); }});
    st.push_back({"combine", [&I, prec](cudaStream_t s) { combine_fp32(prec, I.p, s); }});
  }
  return st;
}

void Plan::run(CUstream_st* stream) {
  for (auto& [name, fn] : stages(*impl_)) fn(stream);
}

std::vector<StageTime> Plan::run_timed() { return run_stages_timed(stages(*impl_), nullptr); }

ref::ForwardResult<float> Plan::download() const {
  const Impl& I = *impl_;
  const FwdParams& p = I.p;
  NSA_CUDA_CHECK(cudaDeviceSynchronize());
  const int64_t N = I.N;
  auto get_e = [&](const void* src, Shape shape) {
    Tensor<float> t(std::move(shape));
    if (!src || t.numel() == 0) return t;
    std::vector<char> buf(size_t(t.numel()) * element_size(I.opt.dtype));
    NSA_CUDA_CHECK(cudaMemcpy(buf.data(), src, buf.size(), cudaMemcpyDeviceToHost));
    from_elems(I.opt.dtype, buf.data(), size_t(t.numel()), t.data());
    return t;
  };
  auto get_f = [&](const float* src, Shape shape) {
    Tensor<float> t(std::move(shape));
    if (t.numel()) NSA_CUDA_CHECK(cudaMemcpy(t.data(), src, size_t(t.numel()) * sizeof(float), cudaMemcpyDeviceToHost));
    return t;
  };
  ref::ForwardResult<float> r;
  r.o = get_e(p.o, {N, p.Hq, p.dv});
  r.o_branch[0] = get_e(p.o_cmp, {N, p.Hq, p.dv});
  r.o_branch[1] = get_e(p.o_slc, {N, p.Hq, p.dv});
  if (p.o_win) r.o_branch[2] = get_e(p.o_win, {N, p.Hq, p.dv});
  r.lse[0] = get_f(p.lse_cmp, {N, p.Hq});
  r.lse[1] = get_f(p.lse_slc, {N, p.Hq});
  r.lse[2] = get_f(p.lse_win, {N, p.Hq});
  r.gates = get_f(p.gates, {N, p.Hq, 3});
  r.block_idx = Tensor<int32_t>({N, p.Hkv, p.slc_count});
  if (r.block_idx.numel())
    NSA_CUDA_CHECK(cudaMemcpy(r.block_idx.data(), p.block_idx, size_t(r.block_idx.numel()) * sizeof(int32_t),
                              cudaMemcpyDeviceToHost));
  if (p.block_scores) r.block_scores = get_f(p.block_scores, {N, p.Hkv, p.NB});
  r.k_cmp_compressed = get_e(p.kc, {p.Nc, p.Hkv, p.dk});
  r.v_cmp_compressed = get_e(p.vc, {p.Nc, p.Hkv, p.dv});
  r.cu_cmp = I.cu_cmp;
  return r;
}

ref::ForwardResult<float> forward(const Config& cfg, const ref::Inputs<float>& in, const Options& opt,
                                  KernelChoice* ran) {
  Plan plan(cfg, in.N(), in.cu_seqlens, opt);
  plan.upload(in);
  plan.run();
  NSA_CUDA_CHECK(cudaDeviceSynchronize());
  if (ran) *ran = plan.kernels();
  return plan.download();
}

}  // namespace nsa::cuda
