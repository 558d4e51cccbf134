// The NSA backward pass on the device (docs/spec.md 7): the backward state of a Plan and its
// stages in order, each labelled by its stage (timing labels, results files):
//   combine_bwd          dL/dg_c = <dL/do, O_c> and D_c = g_c dL/dg_c          (combine_bwd.cu)
//   combine_bwd.gates    through the sigmoid and the gate MLP, when the gates are computed
//   slc_attn_bwd.lists   per (sequence, group, block) lists of the positions that selected it
//   cmp_attn_bwd         dq (written), dL/dphi(k_cmp), dL/dphi(v_cmp)          (cmp_attn_bwd.cu)
//   slc_attn_bwd         dq (added), dk_slc, dv_slc                            (slc_attn_bwd.cu)
//   win_attn_bwd         dq (added), dk_win, dv_win                            (win_attn_bwd.cu)
//   phi_bwd              through phi: dk_cmp, dv_cmp, phi's parameters         (phi_bwd.cu)
//   sum_kv               dk, dv of the shared k, v: the branches reading them, in branch order
// The variant (fp32 or mma, for every stage) is choose_kernels' (choice.cu).
// It recomputes from what the forward kept (lse per branch, branch outputs, block_idx, the
// compressed K/V, the gates), as the reference's fast path does; gradients are fp32.
#include <algorithm>
#include <climits>
#include <functional>

#include "check.hpp"
#include "kernels.hpp"
#include "measure.hpp"
#include "nsa_cuda.hpp"
#include "plan.hpp"

namespace nsa::cuda {

namespace {

// out = a (+ b) (+ c): the shared k's (v's) gradient, the branches that read it in branch order,
// as the reference adds them; absent branches are nullptr.
__global__ void sum_kernel(float* out, const float* a, const float* b, const float* c, int64_t n) {
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < n; e += int64_t(gridDim.x) * blockDim.x) {
    float s = a[e];
    if (b) s += b[e];
    if (c) s += c[e];
    out[e] = s;
  }
}

}  // namespace

void setup_backward(Plan::Impl& I) {
  const Config& cfg = I.cfg;
  FwdParams& p = I.p;
  BwdState& W = I.bw;
  BwdParams& bp = W.bp;
  W.mma = I.kernels.backward.variant == Variant::Mma;
  const int64_t N = I.N, NHq = N * p.Hq, Hkv = p.Hkv;
  if (N * Hkv * p.slc_count >= INT_MAX)
    throw ResourceError(cat("the selection lists hold N Hkv n = ", N * Hkv * p.slc_count, " entries; at most ", INT_MAX - 1,
                            " fit their int32 offsets"));
  bp.deterministic = I.opt.deterministic;
  bp.dO = I.alloc_e(NHq * p.dv, "dL/do");
  bp.delta = I.alloc_t<float>(3 * NHq, "backward deltas");
  bp.dgates = I.alloc_t<float>(NHq * 3, "dgates");
  bp.dq = I.alloc_t<float>(NHq * p.dk, "dq");
  for (int c = 0; c < kBranches; ++c) {
    bp.dk[c] = I.alloc_t<float>(N * Hkv * p.dk, "dk of a branch");
    bp.dv[c] = I.alloc_t<float>(N * Hkv * p.dv, "dv of a branch");
  }
  bp.dkc = I.alloc_t<float>(p.Nc * Hkv * p.dk, "dL/d compressed keys");
  bp.dvc = I.alloc_t<float>(p.Nc * Hkv * p.dv, "dL/d compressed values");
  W.dk_sum = I.alloc_t<float>(N * Hkv * p.dk, "dk");
  W.dv_sum = I.alloc_t<float>(N * Hkv * p.dv, "dv");

  // Selection lists: chunks of QS positions, at most 256 per sequence (the slots grow with
  // chunks x blocks).
  bp.QS = 256;
  while (int64_t(bp.QS) * 256 < p.Tmax) bp.QS *= 2;
  std::vector<int64_t> cu_chunks{0}, cu_slots{0}, cu_lists{0};
  for (size_t b = 0; b + 1 < I.cu.size(); ++b) {
    const int64_t T = I.cu[b + 1] - I.cu[b], NB = cfg.num_slc_blocks(T), nch = (T + bp.QS - 1) / bp.QS;
    cu_chunks.push_back(cu_chunks.back() + nch);
    cu_slots.push_back(cu_slots.back() + Hkv * NB * nch);
    cu_lists.push_back(cu_lists.back() + Hkv * NB);
  }
  W.chunks = cu_chunks.back(), W.slots = cu_slots.back(), bp.nlists = cu_lists.back();
  if (W.slots >= INT_MAX) throw ResourceError(cat("the selection lists need ", W.slots, " counting slots (max 2^31)"));
  bp.cu_chunks = I.upload_i64(cu_chunks, "list chunks");
  bp.cu_slots = I.upload_i64(cu_slots, "list slots");
  bp.cu_lists = I.upload_i64(cu_lists, "lists");
  bp.slot_cnt = I.alloc_t<int32_t>(W.slots + 1, "list slot counts");
  bp.slot_off = I.alloc_t<int32_t>(W.slots + 1, "list slot offsets");
  bp.list = I.alloc_t<int32_t>(std::max<int64_t>(1, N * Hkv * p.slc_count), "selection lists");
  const size_t optin = size_t(device_info(I.opt.device).smem_optin);
  if (slc_lists_smem(p, bp) > optin)
    throw ResourceError(cat("the selection lists of a sequence of ", p.Tmax, " tokens need ", slc_lists_smem(p, bp),
                            " bytes of shared memory per block, more than the device's ", optin));
  if (W.mma) {
    // Selection items: up to S positions (16384 rows) of one list each.
    bp.S = std::max<int>(1, 16384 / p.G);
    bp.item_cnt = I.alloc_t<int32_t>(bp.nlists + 1, "selection item counts");
    bp.item_off = I.alloc_t<int32_t>(bp.nlists + 1, "selection item offsets");
    W.slc_items_max = N * Hkv * p.slc_count / bp.S + bp.nlists + 1;
    // Compression items: (tile of 64 compressed keys, chunk of QC positions); QC is halved until
    // there are some thousands of items in all (about half of them hold positions).
    auto cmp_items = [&](int qc) {
      int64_t s = 0;
      for (size_t b = 0; b + 1 < I.cu.size(); ++b) {
        const int64_t T = I.cu[b + 1] - I.cu[b];
        s += (cfg.num_cmp_blocks(T) + 63) / 64 * ((T + qc - 1) / qc);
      }
      return s;
    };
    bp.QC = 8192;
    while (bp.QC > 256 && cmp_items(bp.QC) * Hkv < 4096) bp.QC /= 2;
    std::vector<int64_t> cu_items{0};
    for (size_t b = 0; b + 1 < I.cu.size(); ++b) {
      const int64_t T = I.cu[b + 1] - I.cu[b];
      cu_items.push_back(cu_items.back() + (cfg.num_cmp_blocks(T) + 63) / 64 * ((T + bp.QC - 1) / bp.QC));
    }
    W.cmp_items = cu_items.back();
    bp.cu_cmp_items = I.upload_i64(cu_items, "compression items");
    W.tm_dq = I.tile_map(64 / p.G, "backward dq tiles");
    W.tm_slc_dq = I.tile_map(16 / p.G, "backward selection dq tiles");
    W.tm_keys = I.tile_map(64, "backward key tiles");
    // Partial sums of the deterministic mode, for the larger of the two branches' item sets.
    const int64_t nsub = (p.slc_len + 63) / 64;
    const int64_t part_rows = std::max(W.cmp_items * Hkv, W.slc_items_max * nsub) * 64;
    bp.part_k = I.alloc_t<float>(part_rows * p.dk, "backward partial dK");
    bp.part_v = I.alloc_t<float>(part_rows * p.dv, "backward partial dV");
  }
  W.scan_tmp_bytes = slc_lists_scan_bytes(W.slots, bp.nlists);
  W.scan_tmp = I.alloc(W.scan_tmp_bytes, "prefix-sum scratch");

  // phi's backward: gradients of the configured kind's parameters, and its workspace.
  const int64_t l = p.cmp_len, Nc = p.Nc;
  for (int kv = 0; kv < 2; ++kv) {
    const int64_t D = kv ? p.dv : p.dk, hc = kv ? cfg.hidden_v() : cfg.hidden_k();
    PhiBwdDevice& g = kv ? W.phi_v : W.phi_k;
    if (cfg.compress == CompressKind::Mean) continue;
    g.dpe = I.alloc_t<float>(Hkv * l * D, "dpe");
    if (cfg.compress == CompressKind::Linear) {
      g.dw = I.alloc_t<float>(Hkv * D * l * D, "dw");
      g.db = I.alloc_t<float>(Hkv * D, "db");
    } else {
      g.dw1 = I.alloc_t<float>(Hkv * hc * l * D, "dw1");
      g.db1 = I.alloc_t<float>(Hkv * hc, "db1");
      g.dw2 = I.alloc_t<float>(Hkv * D * hc, "dw2");
      g.db2 = I.alloc_t<float>(Hkv * D, "db2");
    }
  }
  if (cfg.compress != CompressKind::Mean && Nc > 0) {
    const int64_t D = std::max(p.dk, p.dv), hc = std::max(cfg.hidden_k(), cfg.hidden_v());
    W.phi_ws.X = I.alloc_t<float>(Hkv * Nc * l * D, "phi backward X");
    W.phi_ws.dX = I.alloc_t<float>(Hkv * Nc * l * D, "phi backward dX");
    if (cfg.compress == CompressKind::Mlp) {
      W.phi_ws.A = I.alloc_t<float>(Hkv * Nc * hc, "phi backward A");
      W.phi_ws.Hb = I.alloc_t<float>(Hkv * Nc * hc, "phi backward H");
      W.phi_ws.dA = I.alloc_t<float>(Hkv * Nc * hc, "phi backward dA");
    }
  }
  I.has_bwd = true;
}

void backward_inputs_changed(Plan::Impl& I, const ref::CompressParams<float>* phi) {
  BwdState& W = I.bw;
  const FwdParams& p = I.p;
  const void* ks[kBranches] = {p.k_cmp, p.k_slc, p.k_win};
  const void* vs[kBranches] = {p.v_cmp, p.v_slc, p.v_win};
  for (int c = 0; c < kBranches; ++c) {
    W.k_shared[c] = ks[c] == I.k_shared;
    W.v_shared[c] = vs[c] == I.v_shared;
  }
  if (phi && I.cfg.compress != CompressKind::Mean) {
    // fp32 copies of the weights as the device holds them (rounded), for the fp32 products.
    auto f32 = [&](const Tensor<float>& t, const char* what) -> const float* {
      return t.empty() ? nullptr : I.upload_f(round_to(I.opt.dtype, t), what);
    };
    W.phi_k.w = f32(phi->k.w, "phi.w (fp32)"), W.phi_k.w1 = f32(phi->k.w1, "phi.w1 (fp32)");
    W.phi_k.w2 = f32(phi->k.w2, "phi.w2 (fp32)");
    W.phi_v.w = f32(phi->v.w, "phi.w (fp32)"), W.phi_v.w1 = f32(phi->v.w1, "phi.w1 (fp32)");
    W.phi_v.w2 = f32(phi->v.w2, "phi.w2 (fp32)");
  }
  if (I.gate_source == Plan::Impl::GateSource::Mlp) {
    const GateMlpDevice& m = I.gate_mlp;
    const int64_t N = I.N, Z = 3 * p.Hq, din = m.dh ? m.dh : m.dm;
    GateMlpGradDevice& g = W.gate;
    g.dz = I.alloc_t<float>(N * Z, "gate dz");
    g.dx = I.alloc_t<float>(N * m.dm, "dgate_x");
    g.dw = I.alloc_t<float>(din * Z, "dgate_w");
    g.db = I.alloc_t<float>(Z, "dgate_b");
    if (m.dh) {
      g.a = I.alloc_t<float>(N * m.dh, "gate hidden pre-activation");
      g.dhid = I.alloc_t<float>(N * m.dh, "gate dhidden");
      g.dw0 = I.alloc_t<float>(int64_t(m.dm) * m.dh, "dgate_w0");
      g.db0 = I.alloc_t<float>(m.dh, "dgate_b0");
    }
  }
}

// The backward stages in order; run_backward_timed records an event after each.
static StageList bwd_stages(Plan::Impl& I) {
  StageList st;
  const Precision prec = I.opt.dtype;
  st.push_back({"combine_bwd", [&I, prec](cudaStream_t s) { combine_bwd(prec, I.p, I.bw.bp, s); }});
  if (I.gate_source == Plan::Impl::GateSource::Mlp)
    st.push_back({"combine_bwd.gates", [&I](cudaStream_t s) {
                    I.blas.set_stream(s);
                    gate_mlp_backward(I.p, I.gate_mlp, I.bw.bp.dgates, I.bw.gate, I.blas.handle, s);
                  }});
  st.push_back({"slc_attn_bwd.lists", [&I](cudaStream_t s) {
                  build_slc_lists(I.p, I.bw.bp, I.bw.chunks, I.bw.slots, I.bw.mma, I.bw.scan_tmp,
                                  I.bw.scan_tmp_bytes, s);
                }});
  if (!I.bw.mma) {
    st.push_back({"cmp_attn_bwd", [&I, prec](cudaStream_t s) { cmp_attn_bwd_fp32(prec, I.p, I.bw.bp, s); }});
    st.push_back({"slc_attn_bwd", [&I, prec](cudaStream_t s) { slc_attn_bwd_fp32(prec, I.p, I.bw.bp, s); }});
    st.push_back({"win_attn_bwd", [&I, prec](cudaStream_t s) { win_attn_bwd_fp32(prec, I.p, I.bw.bp, s); }});
  } else {
    st.push_back({"cmp_attn_bwd", [&I, prec](cudaStream_t s) {
                    cmp_attn_bwd_mma(prec, I.p, I.bw.bp, I.bw.tm_dq, I.bw.cmp_items, s);
                  }});
    st.push_back({"slc_attn_bwd", [&I, prec](cudaStream_t s) {
                    slc_attn_bwd_mma(prec, I.p, I.bw.bp, I.bw.tm_slc_dq, I.bw.slc_items_max, s);
                  }});
    st.push_back({"win_attn_bwd", [&I, prec](cudaStream_t s) {
                    win_attn_bwd_mma(prec, I.p, I.bw.bp, I.bw.tm_dq, I.bw.tm_keys, s);
                  }});
  }
  st.push_back({"phi_bwd", [&I, prec](cudaStream_t s) {
                  I.blas.set_stream(s);
                  const BwdParams& bp = I.bw.bp;
                  phi_backward(I.cfg, I.p, prec, I.p.k_cmp, I.p.dk, int(I.cfg.hidden_k()), I.phi_k, I.bw.phi_k,
                                    I.bw.phi_ws, bp.dkc, bp.dk[0], I.blas.handle, s);
                  phi_backward(I.cfg, I.p, prec, I.p.v_cmp, I.p.dv, int(I.cfg.hidden_v()), I.phi_v, I.bw.phi_v,
                                    I.bw.phi_ws, bp.dvc, bp.dv[0], I.blas.handle, s);
                }});
  const BwdState& W = I.bw;
  const bool any_k = W.k_shared[0] || W.k_shared[1] || W.k_shared[2];
  const bool any_v = W.v_shared[0] || W.v_shared[1] || W.v_shared[2];
  if (any_k || any_v)
    st.push_back({"sum_kv", [&I](cudaStream_t s) {
                    const BwdState& W = I.bw;
                    auto sum = [&](float* out, float* const* br, const bool* use, int64_t n) {
                      const float* parts[kBranches] = {nullptr, nullptr, nullptr};
                      int m = 0;
                      for (int c = 0; c < kBranches; ++c)
                        if (use[c]) parts[m++] = br[c];
                      if (m == 0 || n == 0) return;
                      const int64_t blocks = std::min<int64_t>((n + 255) / 256, 4096);
                      sum_kernel<<<unsigned(blocks), 256, 0, s>>>(out, parts[0], parts[1], parts[2], n);
                      NSA_CUDA_CHECK_LAUNCH("sum_kernel");
                    };
                    sum(W.dk_sum, W.bp.dk, W.k_shared, I.N * I.p.Hkv * I.p.dk);
                    sum(W.dv_sum, W.bp.dv, W.v_shared, I.N * I.p.Hkv * I.p.dv);
                  }});
  return st;
}

void require_backward(const Plan::Impl& I) {
  if (!I.has_bwd) throw ConfigError("the plan was made without Options::backward: it holds no gradients");
}

void Plan::upload_grad(const Tensor<float>& dO) {
  Impl& I = *impl_;
  require_backward(I);
  const Shape want{I.N, I.p.Hq, I.p.dv};
  if (dO.shape() != want)
    throw InputError(cat("dL/do: shape ", shape_str(dO.shape()), ", expected ", shape_str(want), " ([N, Hq, dv])"));
  const std::vector<char> e = to_elems(I.opt.dtype, dO.data(), size_t(dO.numel()));
  I.put(const_cast<void*>(I.bw.bp.dO), e.data(), e.size());
}

void Plan::randomize_grad(uint64_t seed) {
  Impl& I = *impl_;
  require_backward(I);
  fill_normal_elems(I.opt.dtype, const_cast<void*>(I.bw.bp.dO), I.N * I.p.Hq * I.p.dv, seed);
  NSA_CUDA_CHECK(cudaDeviceSynchronize());
}

void Plan::set_deterministic(bool on) {
  require_backward(*impl_);
  impl_->opt.deterministic = on;
  impl_->bw.bp.deterministic = on;
}

void Plan::run_backward(CUstream_st* stream) {
  require_backward(*impl_);
  for (auto& [name, fn] : bwd_stages(*impl_)) fn(stream);
}

std::vector<StageTime> Plan::run_backward_timed() {
  require_backward(*impl_);
  return run_stages_timed(bwd_stages(*impl_), nullptr);
}

ref::BackwardResult<float> Plan::download_grads() const {
  const Impl& I = *impl_;
  require_backward(I);
  const FwdParams& p = I.p;
  const BwdState& W = I.bw;
  const BwdParams& bp = W.bp;
  NSA_CUDA_CHECK(cudaDeviceSynchronize());
  const int64_t N = I.N, Hkv = p.Hkv, l = p.cmp_len;
  auto get = [&](const float* src, Shape shape) {
    Tensor<float> t(std::move(shape));
    if (t.numel()) NSA_CUDA_CHECK(cudaMemcpy(t.data(), src, size_t(t.numel()) * 4, cudaMemcpyDeviceToHost));
    return t;
  };
  ref::BackwardResult<float> r;
  r.dq = get(bp.dq, {N, p.Hq, p.dk});
  for (int c = 0; c < kBranches; ++c) {
    r.dk_branch[c] = get(bp.dk[c], {N, Hkv, p.dk});
    r.dv_branch[c] = get(bp.dv[c], {N, Hkv, p.dv});
  }
  if (W.k_shared[0] || W.k_shared[1] || W.k_shared[2]) r.dk = get(W.dk_sum, {N, Hkv, p.dk});
  if (W.v_shared[0] || W.v_shared[1] || W.v_shared[2]) r.dv = get(W.dv_sum, {N, Hkv, p.dv});
  r.dgates = get(bp.dgates, {N, p.Hq, 3});
  for (int kv = 0; kv < 2; ++kv) {
    const int64_t D = kv ? p.dv : p.dk, hc = kv ? I.cfg.hidden_v() : I.cfg.hidden_k();
    const PhiBwdDevice& g = kv ? W.phi_v : W.phi_k;
    ref::PhiParams<float>& d = kv ? r.dphi.v : r.dphi.k;
    if (I.cfg.compress == CompressKind::Mean) continue;
    d.pe = get(g.dpe, {Hkv, l, D});
    if (I.cfg.compress == CompressKind::Linear) {
      d.w = get(g.dw, {Hkv, D, l * D});
      d.b = get(g.db, {Hkv, D});
    } else {
      d.w1 = get(g.dw1, {Hkv, hc, l * D});
      d.b1 = get(g.db1, {Hkv, hc});
      d.w2 = get(g.dw2, {Hkv, D, hc});
      d.b2 = get(g.db2, {Hkv, D});
    }
  }
  if (I.gate_source == Impl::GateSource::Mlp) {
    const GateMlpDevice& m = I.gate_mlp;
    const int64_t Z = 3 * p.Hq, din = m.dh ? m.dh : m.dm;
    r.dgate_mlp.x = get(W.gate.dx, {N, m.dm});
    r.dgate_mlp.w = get(W.gate.dw, {din, Z});
    r.dgate_mlp.b = get(W.gate.db, {Z});
    if (m.dh) {
      r.dgate_mlp.w0 = get(W.gate.dw0, {m.dm, m.dh});
      r.dgate_mlp.b0 = get(W.gate.db0, {m.dh});
    }
  }
  r.dk_cmp_compressed = get(bp.dkc, {p.Nc, Hkv, p.dk});
  r.dv_cmp_compressed = get(bp.dvc, {p.Nc, Hkv, p.dv});
  return r;
}

ref::BackwardResult<float> backward(const Config& cfg, const ref::Inputs<float>& in, const Tensor<float>& dO,
                                    const Options& opt_in, ref::ForwardResult<float>* fwd) {
  Options opt = opt_in;
  opt.backward = true;
  Plan plan(cfg, in.N(), in.cu_seqlens, opt);
  plan.upload(in);
  plan.run();
  plan.upload_grad(dO);
  plan.run_backward();
  NSA_CUDA_CHECK(cudaDeviceSynchronize());
  if (fwd) *fwd = plan.download();
  return plan.download_grads();
}

}  // namespace nsa::cuda
