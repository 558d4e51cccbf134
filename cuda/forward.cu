// The NSA forward pass on the device (docs/spec.md 1-5): buffers, the choice of kernel version,
// and the stages in the spec's order: gates, phi (Eq. 7), compression attention with the scores
// and top-n (Eq. 7-11), selection attention (Eq. 12), window attention with the gated sum (Eq. 5).
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <functional>

#include "check.hpp"
#include "device.cuh"
#include "kernels.hpp"
#include "nsa_cuda.hpp"
#include "plan.hpp"

namespace nsa::cuda {

// ---------------------------------------------------------------- precision helpers
const char* to_string(Precision p) {
  return p == Precision::BF16 ? "bf16" : p == Precision::FP16 ? "fp16" : "fp32";
}

Precision parse_precision(const std::string& s) {
  if (s == "bf16") return Precision::BF16;
  if (s == "fp16") return Precision::FP16;
  if (s == "fp32") return Precision::FP32;
  throw ConfigError(cat("dtype = '", s, "' is not one of: bf16, fp16, fp32"));
}

int element_size(Precision p) { return p == Precision::FP32 ? 4 : 2; }

float round_to(Precision p, float x) {
  switch (p) {
    case Precision::BF16: return __bfloat162float(__float2bfloat16_rn(x));
    case Precision::FP16: return __half2float(__float2half_rn(x));
    case Precision::FP32: return x;
  }
  return x;
}

Tensor<float> round_to(Precision p, const Tensor<float>& t) {
  if (t.empty()) return t;
  Tensor<float> r = t;
  for (auto& x : r.vec()) x = round_to(p, x);
  return r;
}

ref::Inputs<float> round_to(Precision p, const ref::Inputs<float>& in) {
  ref::Inputs<float> r = in;
  r.q = round_to(p, in.q);
  r.k = round_to(p, in.k);
  r.v = round_to(p, in.v);
  for (int c = 0; c < kBranches; ++c) {
    r.k_own[c] = round_to(p, in.k_own[c]);
    r.v_own[c] = round_to(p, in.v_own[c]);
  }
  for (auto* ph : {&r.phi.k, &r.phi.v})
    for (auto* t : {&ph->pe, &ph->w, &ph->b, &ph->w1, &ph->b1, &ph->w2, &ph->b2}) *t = round_to(p, *t);
  return r;  // gates and the gate MLP stay fp32 on the device
}

// ---------------------------------------------------------------- device queries
bool available(std::string* why) {
  int n = 0;
  const cudaError_t e = cudaGetDeviceCount(&n);
  if (e != cudaSuccess) {
    if (why) *why = cat("no usable CUDA device: ", cudaGetErrorString(e));
    cudaGetLastError();
    return false;
  }
  if (n == 0) {
    if (why) *why = "no CUDA device present";
    return false;
  }
  return true;
}

const DeviceInfo& device_info(int device) {
  static DeviceInfo info[16];
  static bool done[16] = {};
  if (device < 0 || device >= 16) throw ConfigError(cat("device = ", device, " is invalid: expected 0..15"));
  if (!done[device]) {
    NSA_CUDA_CHECK(cudaGetDeviceProperties(&info[device].prop, device));
    NSA_CUDA_CHECK(cudaDeviceGetAttribute(&info[device].smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
    done[device] = true;
  }
  return info[device];
}

// Kernel-tuning knobs for experiments (documented in docs/cuda.md), e.g. NSA_SLC_WARPS=1.
int env_int(const char* name, int fallback) {
  const char* s = std::getenv(name);
  return s && *s ? std::atoi(s) : fallback;
}

std::string device_name() {
  const DeviceInfo& d = device_info(0);
  return cat(d.prop.name, " (sm_", d.prop.major, d.prop.minor, ", ", d.prop.multiProcessorCount, " SMs)");
}

// Why kernels v1 and v2 cannot run cfg at this precision on this device (empty: it can).
std::string v1_obstacle(const Config& cfg, const Options& opt) {
  const int64_t G = cfg.G();
  if (opt.dtype == Precision::FP32) return "fp32 runs on CUDA cores (kernel v0; v1-v3 need bf16 or fp16 operands)";
  if (G != 1 && G != 2 && G != 4 && G != 8 && G != 16) return cat("G = ", G, " is not one of 1, 2, 4, 8, 16");
  if (!v1_has_dims(int(cfg.dk), int(cfg.dv)))
    return cat("head dims dk = ", cfg.dk, ", dv = ", cfg.dv, " are not compiled for v1/v2 (NSA_CUDA_DIMS)");
  const DeviceInfo& d = device_info(opt.device);
  if (d.prop.major < 8) return cat("the device is sm_", d.prop.major, d.prop.minor, "; v1 and v2 need sm_80 or newer");
  return "";
}

bool v1_has_dims(int dk, int dv) {
  return dispatch_dims(dk, dv, [](auto, auto) {});
}

bool v1_compiled(int dk, int dv) { return v1_has_dims(dk, dv); }

int choose_kernel(const Config& cfg, const Options& opt, std::string* why) {
  const std::string obstacle = v1_obstacle(cfg, opt);
  if (opt.kernel == 0) {
    if (why) *why = "v0 requested";
    return 0;
  }
  if (opt.kernel >= 1 && opt.kernel <= 3)
    throw ConfigError(cat("kernel = ", opt.kernel, " was retired (git history: commit 8456aed; docs/cuda.md keeps its "
                          "numbers): expected 0, 4 or -1 (auto)"));
  if (opt.kernel == 4) {
    if (!obstacle.empty()) throw ConfigError(cat("kernel ", opt.kernel, " cannot run this config: ", obstacle));
    if (why) *why = cat("v", opt.kernel, " requested");
    return opt.kernel;
  }
  if (opt.kernel != -1)
    throw ConfigError(cat("kernel = ", opt.kernel, " is invalid: expected 0, 4 or -1 (auto)"));
  if (why) *why = obstacle.empty() ? "v4: tensor cores, the fastest measured version" : "v0: " + obstacle;
  return obstacle.empty() ? 4 : 0;
}

// ---------------------------------------------------------------- the plan
// Host float -> device elements of the precision (rounded to nearest even).
std::vector<char> to_elems(Precision prec, const float* x, size_t n) {
  std::vector<char> out(n * size_t(element_size(prec)));
  if (prec == Precision::FP32) {
    std::memcpy(out.data(), x, n * sizeof(float));
  } else if (prec == Precision::BF16) {
    auto* o = reinterpret_cast<__nv_bfloat16*>(out.data());
    for (size_t i = 0; i < n; ++i) o[i] = __float2bfloat16_rn(x[i]);
  } else {
    auto* o = reinterpret_cast<__half*>(out.data());
    for (size_t i = 0; i < n; ++i) o[i] = __float2half_rn(x[i]);
  }
  return out;
}

void from_elems(Precision prec, const char* src, size_t n, float* out) {
  if (prec == Precision::FP32) {
    std::memcpy(out, src, n * sizeof(float));
  } else if (prec == Precision::BF16) {
    auto* s = reinterpret_cast<const __nv_bfloat16*>(src);
    for (size_t i = 0; i < n; ++i) out[i] = __bfloat162float(s[i]);
  } else {
    auto* s = reinterpret_cast<const __half*>(src);
    for (size_t i = 0; i < n; ++i) out[i] = __half2float(s[i]);
  }
}

namespace {

// Deterministic pseudo-random fills for benchmarks (splitmix64 of the index).
__device__ __forceinline__ uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}
__device__ __forceinline__ float unit(uint64_t z) { return float(mix64(z) >> 40) * (1.0f / 16777216.0f); }

template <class T>
__global__ void fill_normal(T* x, int64_t n, uint64_t seed) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const uint64_t base = seed * 0x9E3779B97F4A7C15ull + uint64_t(i) * 2;
    const float u1 = fmaxf(unit(base), 1e-7f), u2 = unit(base + 1);
    x[i] = dev::from_f<T>(sqrtf(-2.0f * logf(u1)) * cospif(2.0f * u2));  // Box-Muller
  }
}
// Reads `passes` times over n 16-byte words (a buffer that fits in L2); the xor keeps the loads.
__global__ void l2_read_kernel(const uint4* __restrict__ x, int64_t n, int passes, uint4* sink) {
  uint32_t acc = 0;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int pass = 0; pass < passes; ++pass)
    for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += stride) {
      const uint4 v = x[i];
      acc ^= v.x ^ v.y ^ v.z ^ v.w;
    }
  if (acc == 0x12345678u) sink->x = acc;  // practically never: the loads must not be removed
}

__global__ void fill_uniform(float* x, int64_t n, uint64_t seed) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    x[i] = unit(seed * 0x9E3779B97F4A7C15ull + uint64_t(i));
}

}  // namespace

void fill_normal_elems(Precision prec, void* x, int64_t n, uint64_t seed) {
  if (n == 0) return;
  switch (prec) {
    case Precision::BF16: fill_normal<<<1024, 256>>>(static_cast<__nv_bfloat16*>(x), n, seed); break;
    case Precision::FP16: fill_normal<<<1024, 256>>>(static_cast<__half*>(x), n, seed); break;
    case Precision::FP32: fill_normal<<<1024, 256>>>(static_cast<float*>(x), n, seed); break;
  }
  NSA_CUDA_CHECK_LAUNCH("fill_normal");
}

void fill_uniform_floats(float* x, int64_t n, uint64_t seed) {
  if (n == 0) return;
  fill_uniform<<<1024, 256>>>(x, n, seed);
  NSA_CUDA_CHECK_LAUNCH("fill_uniform");
}

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
    I.version = choose_kernel(cfg, opt);
    const DeviceInfo& dinfo = device_info(opt.device);
    if (cfg.dv > 256 && I.version == 0)
      throw ConfigError(cat("dv = ", cfg.dv, " is invalid for the CUDA path: expected <= 256"));

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
    p.Hq = int(cfg.Hq), p.Hkv = int(cfg.Hkv), p.G = int(cfg.G()), p.dk = int(cfg.dk), p.dv = int(cfg.dv);
    p.l = int(cfg.cmp_len), p.d = int(cfg.cmp_stride), p.ls = int(cfg.slc_len), p.n = int(cfg.slc_count);
    p.init_blocks = int(cfg.init_blocks), p.local_blocks = int(cfg.local_blocks), p.w = int(cfg.window);
    p.NB = int(cfg.num_slc_blocks(Tmax));
    p.scale = float(cfg.softmax_scale());

    // Shared memory: the per-position block scores (BT x NB floats) must fit in one CTA; the
    // compression kernel takes the most warps (rows) that fit, capped by NSA_CMP_WARPS.
    const size_t optin = size_t(dinfo.smem_optin);
    auto pick_warps = [&](auto smem_of, int most, const char* env) {
      int nw = std::min(most, std::max(1, env_int(env, most)));
      while (nw > 1 && smem_of(nw) > optin) nw /= 2;
      return smem_of(nw) <= optin ? nw : 0;
    };
    if (I.version == 4) {
      // FlashAttention-2's shape: warps of 32 rows, 4 per CTA where two CTAs fit in an SM's
      // shared memory (dk = dv = 128), else 8 (dk = 192), so that an SM holds 8 warps either
      // way (4 or 8 measure the same at 64k, 32.6 / 32.5 ms); NSA_CMP_WARPS overrides (1 to 8).
      const size_t sm_smem = dinfo.prop.sharedMemPerMultiprocessor;
      const size_t reserved = dinfo.prop.reservedSharedMemPerBlock;
      const int fw0 = 2 * (cmp_fa_v4_smem(p, 4) + reserved) <= sm_smem ? 4 : 8;
      int fw = std::min(8, std::max(1, env_int("NSA_CMP_WARPS", fw0)));
      while (fw > 1 && cmp_fa_v4_smem(p, fw) > optin) fw /= 2;
      I.cmp_warps = cmp_fa_v4_smem(p, fw) <= optin ? fw : 0;
      I.score_warps = pick_warps([&](int nw) { return cmp_score_v4_smem(p, nw); }, 8, "NSA_SCORE_WARPS");
      I.slc_warps = pick_warps([&](int nw) { return slc_attn_v1_smem(p, nw); }, 2, "NSA_SLC_WARPS");
      I.win_warps = pick_warps([&](int nw) { return win_attn_v2_smem(p, nw); }, 8, "NSA_WIN_WARPS");
      if (!(I.cmp_warps && I.slc_warps && I.win_warps && I.score_warps)) {
        const std::string msg = cat("kernel v4 needs more shared memory than the device's ", optin,
                                    " bytes per block (sequence of ", Tmax, " tokens: ", p.NB,
                                    " selection blocks per position)");
        if (opt.kernel == 4) throw ResourceError(msg);
        I.version = 0;  // v0 needs less
      }
    }
    if (I.version == 0 && cmp_attn_v0_smem(p, std::min(p.G, 4)) > optin)
      throw ResourceError(cat("sequence of ", Tmax, " tokens: ", p.NB, " selection blocks per position need ",
                              cmp_attn_v0_smem(p, std::min(p.G, 4)), " bytes of shared memory, more than the ",
                              optin, " bytes of one block"));

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
    // v0 combines in a separate kernel, so it always stores O_win; the backward pass reads it.
    p.o_win = opt.intermediates || I.version == 0 || opt.backward ? I.alloc_e(NHq * p.dv, "o_win") : nullptr;
    p.lse_cmp = I.alloc_t<float>(NHq, "lse_cmp");
    p.lse_slc = I.alloc_t<float>(NHq, "lse_slc");
    p.lse_win = I.alloc_t<float>(NHq, "lse_win");
    p.block_idx = I.alloc_t<int32_t>(N * p.Hkv * p.n, "block_idx");
    p.block_scores = opt.intermediates ? I.alloc_t<float>(N * p.Hkv * p.NB, "block_scores") : nullptr;
    // Poison every output (NaN bytes; block indices far out of range) so that an element a kernel
    // fails to write cannot pass a test.
    const size_t es = size_t(element_size(opt.dtype));
    auto poison = [](void* ptr, size_t bytes, int byte) {
      if (ptr && bytes) NSA_CUDA_CHECK(cudaMemset(ptr, byte, bytes));
    };
    for (void* o : {p.o, p.o_cmp, p.o_slc, p.o_win}) poison(o, size_t(NHq) * p.dv * es, 0xff);
    for (float* l : {p.lse_cmp, p.lse_slc, p.lse_win}) poison(l, size_t(NHq) * 4, 0xff);
    poison(p.block_idx, size_t(N) * p.Hkv * p.n * 4, 0x7f);
    poison(p.block_scores, size_t(N) * p.Hkv * p.NB * 4, 0xff);
    poison(p.kc, size_t(p.Nc) * p.Hkv * p.dk * es, 0xff);
    poison(p.vc, size_t(p.Nc) * p.Hkv * p.dv * es, 0xff);
    if (cfg.compress != CompressKind::Mean && p.Nc > 0) {
      const int64_t D = std::max(p.dk, p.dv), hc = std::max(cfg.hidden_k(), cfg.hidden_v());
      I.ws.X = I.alloc_e(int64_t(p.Hkv) * p.Nc * p.l * D, "phi workspace X");
      I.ws.H = I.alloc_t<float>(int64_t(p.Hkv) * p.Nc * std::max(hc, D), "phi workspace H");
      I.ws.Hb = I.alloc_e(int64_t(p.Hkv) * p.Nc * hc, "phi workspace Hb");
      I.ws.Y = I.alloc_t<float>(p.Nc * p.Hkv * D, "phi workspace Y");
    }
    if (I.version == 4) {
      I.tm_cmp = I.tile_map(32 * I.cmp_warps / p.G, "cmp tiles");
      I.tm_score = I.tile_map(16 * I.score_warps / p.G, "cmp score tiles");
      I.tm_slc = I.tile_map(16 / p.G, "slc tiles");
      I.tm_win = I.tile_map(16 * I.win_warps / p.G, "win tiles");
    }
    I.blas.create();
    if (opt.backward) setup_backward(I);
    NSA_CUDA_CHECK(cudaDeviceSynchronize());
  } catch (...) {
    delete impl_;
    throw;
  }
}

Plan::~Plan() { delete impl_; }

int Plan::kernel() const { return impl_->version; }
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
  fill_uniform<<<1024, 256>>>(const_cast<float*>(p.gates), I.N * p.Hq * 3, seed + 3);
  NSA_CUDA_CHECK_LAUNCH("fill_uniform");
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

// The stages in order; run_timed records an event after each.
static std::vector<std::pair<const char*, std::function<void(cudaStream_t)>>> stages(Plan::Impl& I) {
  std::vector<std::pair<const char*, std::function<void(cudaStream_t)>>> st;
  if (I.gate_source == Plan::Impl::GateSource::Mlp)
    st.push_back({"gates", [&I](cudaStream_t s) {
                    I.blas.set_stream(s);
                    gates_from_mlp(I.p, I.gate_mlp, const_cast<float*>(I.p.gates), I.blas.handle, s);
                  }});
  st.push_back({"compress", [&I](cudaStream_t s) {
                  I.blas.set_stream(s);
                  compress_phi(I.cfg, I.p, I.opt.dtype, I.p.k_cmp, I.p.dk, int(I.cfg.hidden_k()), I.phi_k, I.ws,
                               I.p.kc, I.blas.handle, s);
                  compress_phi(I.cfg, I.p, I.opt.dtype, I.p.v_cmp, I.p.dv, int(I.cfg.hidden_v()), I.phi_v, I.ws,
                               I.p.vc, I.blas.handle, s);
                }});
  if (I.version == 0) {
    st.push_back({"cmp_attn+select", [&I](cudaStream_t s) { cmp_attn_v0(I.opt.dtype, I.p, s); }});
    st.push_back({"slc_attn", [&I](cudaStream_t s) { slc_attn_v0(I.opt.dtype, I.p, s); }});
    st.push_back({"win_attn", [&I](cudaStream_t s) { win_attn_v0(I.opt.dtype, I.p, s); }});
    st.push_back({"combine", [&I](cudaStream_t s) { combine_v0(I.opt.dtype, I.p, s); }});
  } else {
    st.push_back({"cmp_attn+select", [&I](cudaStream_t s) {
                    cmp_attn_v4(I.opt.dtype, I.p, I.tm_cmp, I.cmp_warps, I.tm_score, I.score_warps, s);
                  }});
    st.push_back({"slc_attn", [&I](cudaStream_t s) { slc_attn_v1(I.opt.dtype, I.p, I.tm_slc, I.slc_warps, s); }});
    st.push_back(
        {"win_attn+combine", [&I](cudaStream_t s) { win_attn_v2(I.opt.dtype, I.p, I.tm_win, I.win_warps, s); }});
  }
  return st;
}

void Plan::run(CUstream_st* stream) {
  for (auto& [name, fn] : stages(*impl_)) fn(stream);
}

std::vector<StageTime> Plan::run_timed() {
  auto st = stages(*impl_);
  std::vector<cudaEvent_t> ev(st.size() + 1);
  for (auto& e : ev) NSA_CUDA_CHECK(cudaEventCreate(&e));
  NSA_CUDA_CHECK(cudaEventRecord(ev[0], nullptr));
  for (size_t i = 0; i < st.size(); ++i) {
    st[i].second(nullptr);
    NSA_CUDA_CHECK(cudaEventRecord(ev[i + 1], nullptr));
  }
  NSA_CUDA_CHECK(cudaEventSynchronize(ev.back()));
  std::vector<StageTime> out;
  for (size_t i = 0; i < st.size(); ++i) {
    float ms = 0;
    NSA_CUDA_CHECK(cudaEventElapsedTime(&ms, ev[i], ev[i + 1]));
    out.push_back({st[i].first, double(ms)});
  }
  for (auto& e : ev) cudaEventDestroy(e);
  return out;
}

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
  r.block_idx = Tensor<int32_t>({N, p.Hkv, p.n});
  if (r.block_idx.numel())
    NSA_CUDA_CHECK(cudaMemcpy(r.block_idx.data(), p.block_idx, size_t(r.block_idx.numel()) * sizeof(int32_t),
                              cudaMemcpyDeviceToHost));
  if (p.block_scores) r.block_scores = get_f(p.block_scores, {N, p.Hkv, p.NB});
  r.k_cmp_compressed = get_e(p.kc, {p.Nc, p.Hkv, p.dk});
  r.v_cmp_compressed = get_e(p.vc, {p.Nc, p.Hkv, p.dv});
  r.cu_cmp = I.cu_cmp;
  return r;
}

ref::ForwardResult<float> forward(const Config& cfg, const ref::Inputs<float>& in, const Options& opt) {
  Plan plan(cfg, in.N(), in.cu_seqlens, opt);
  plan.upload(in);
  plan.run();
  NSA_CUDA_CHECK(cudaDeviceSynchronize());
  return plan.download();
}

BenchResult bench(Plan& plan, int warmup, int reps) {
  Plan::Impl& I = *plan.impl_;
  if (!I.flush) {  // twice the L2 size, written before each repeat so that no input stays cached
    I.flush_bytes = size_t(std::max(device_info(I.opt.device).prop.l2CacheSize, 1 << 20)) * 2;
    NSA_CUDA_CHECK(cudaMalloc(&I.flush, I.flush_bytes));
  }
  for (int i = 0; i < warmup; ++i) plan.run();
  NSA_CUDA_CHECK(cudaDeviceSynchronize());
  cudaEvent_t a, b;
  NSA_CUDA_CHECK(cudaEventCreate(&a));
  NSA_CUDA_CHECK(cudaEventCreate(&b));
  std::vector<double> times;
  for (int r = 0; r < reps; ++r) {
    NSA_CUDA_CHECK(cudaMemsetAsync(I.flush, r & 0xff, I.flush_bytes, nullptr));
    NSA_CUDA_CHECK(cudaEventRecord(a, nullptr));
    plan.run();
    NSA_CUDA_CHECK(cudaEventRecord(b, nullptr));
    NSA_CUDA_CHECK(cudaEventSynchronize(b));
    float ms = 0;
    NSA_CUDA_CHECK(cudaEventElapsedTime(&ms, a, b));
    times.push_back(ms);
  }
  cudaEventDestroy(a);
  cudaEventDestroy(b);
  auto median = [](std::vector<double> v) {
    std::sort(v.begin(), v.end());
    return v.empty() ? 0.0 : v.size() % 2 ? v[v.size() / 2] : 0.5 * (v[v.size() / 2 - 1] + v[v.size() / 2]);
  };
  BenchResult res;
  res.ms = median(times);
  res.kernel = I.version;
  std::vector<std::vector<double>> per;
  std::vector<std::string> names;
  for (int r = 0; r < reps; ++r) {
    NSA_CUDA_CHECK(cudaMemsetAsync(I.flush, r & 0xff, I.flush_bytes, nullptr));
    const auto st = plan.run_timed();
    if (names.empty())
      for (const auto& s : st) names.push_back(s.stage), per.emplace_back();
    for (size_t i = 0; i < st.size(); ++i) per[i].push_back(st[i].ms);
  }
  for (size_t i = 0; i < names.size(); ++i) res.stages.push_back({names[i], median(per[i])});
  return res;
}

Ceilings measure_ceilings(Precision prec, int device) {
  NSA_CUDA_CHECK(cudaSetDevice(device));
  const int n = 8192;
  const size_t es = size_t(element_size(prec));
  void *a = nullptr, *b = nullptr;
  float* c = nullptr;
  NSA_CUDA_CHECK(cudaMalloc(&a, size_t(n) * n * es));
  NSA_CUDA_CHECK(cudaMalloc(&b, size_t(n) * n * es));
  NSA_CUDA_CHECK(cudaMalloc(&c, size_t(n) * n * sizeof(float)));
  // Random operands: a tensor core multiplies zeros faster than real data.
  switch (prec) {
    case Precision::BF16: fill_normal<<<1024, 256>>>((__nv_bfloat16*)a, int64_t(n) * n, 11), fill_normal<<<1024, 256>>>((__nv_bfloat16*)b, int64_t(n) * n, 12); break;
    case Precision::FP16: fill_normal<<<1024, 256>>>((__half*)a, int64_t(n) * n, 11), fill_normal<<<1024, 256>>>((__half*)b, int64_t(n) * n, 12); break;
    case Precision::FP32: fill_normal<<<1024, 256>>>((float*)a, int64_t(n) * n, 11), fill_normal<<<1024, 256>>>((float*)b, int64_t(n) * n, 12); break;
  }
  NSA_CUDA_CHECK_LAUNCH("fill_normal");
  cublasHandle_t blas;
  NSA_CUBLAS_CHECK(cublasCreate(&blas));
  cudaEvent_t e0, e1;
  NSA_CUDA_CHECK(cudaEventCreate(&e0));
  NSA_CUDA_CHECK(cudaEventCreate(&e1));
  auto median_ms = [&](auto&& fn, int reps) {
    for (int i = 0; i < 3; ++i) fn();
    std::vector<float> t;
    for (int i = 0; i < reps; ++i) {
      NSA_CUDA_CHECK(cudaEventRecord(e0));
      fn();
      NSA_CUDA_CHECK(cudaEventRecord(e1));
      NSA_CUDA_CHECK(cudaEventSynchronize(e1));
      float ms = 0;
      NSA_CUDA_CHECK(cudaEventElapsedTime(&ms, e0, e1));
      t.push_back(ms);
    }
    std::sort(t.begin(), t.end());
    return double(t[t.size() / 2]);
  };
  Ceilings r;
  const double mm = median_ms([&] { gemm(blas, prec, false, 1, n, n, n, a, n, 0, b, n, 0, c, n, 0); }, 10);
  r.matmul_tflops = 2.0 * n * n * double(n) / mm / 1e9;
  const size_t bytes = size_t(n) * n * es;
  const double cp = median_ms([&] { NSA_CUDA_CHECK(cudaMemcpyAsync(b, a, bytes, cudaMemcpyDeviceToDevice)); }, 10);
  r.copy_tbps = 2.0 * double(bytes) / cp / 1e9;
  // L2: a quarter of the cache, read 20 times per launch by 4 CTAs of 512 threads per SM.
  const DeviceInfo& d = device_info(device);
  const int64_t l2_words = std::max<int64_t>(d.prop.l2CacheSize / 4 / 16, 1 << 16);
  const int passes = 20;
  const double l2 = median_ms(
      [&] {
        l2_read_kernel<<<4 * d.prop.multiProcessorCount, 512>>>(static_cast<const uint4*>(a), l2_words, passes,
                                                                static_cast<uint4*>(b));
      },
      10);
  NSA_CUDA_CHECK_LAUNCH("l2_read_kernel");
  r.l2_read_tbps = double(l2_words) * 16 * passes / l2 / 1e9;
  cudaEventDestroy(e0);
  cudaEventDestroy(e1);
  cublasDestroy(blas);
  cudaFree(a);
  cudaFree(b);
  cudaFree(c);
  return r;
}

}  // namespace nsa::cuda
