// Host-side helpers of the CUDA path: precision conversions, device queries, and the random fills
// of the benchmarks' device-resident inputs.
#include <algorithm>
#include <cmath>
#include <cstring>

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

DeviceCaps device_caps(int device) {
  const DeviceInfo& d = device_info(device);
  DeviceCaps c;
  c.major = d.prop.major, c.minor = d.prop.minor;
  c.smem_optin = size_t(d.smem_optin);
  c.smem_per_sm = d.prop.sharedMemPerMultiprocessor;
  c.smem_reserved = d.prop.reservedSharedMemPerBlock;
#ifdef NSA_HAS_SM90A
  c.wgmma = c.major == 9 && c.minor == 0;
#endif
  return c;
}

std::string device_name() {
  const DeviceInfo& d = device_info(0);
  return cat(d.prop.name, " (sm_", d.prop.major, d.prop.minor, ", ", d.prop.multiProcessorCount, " SMs)");
}

bool mma_compiled(int dk, int dv) {
  return dispatch_dims(dk, dv, [](auto, auto) {});
}

// ---------------------------------------------------------------- host <-> device elements
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

}  // namespace nsa::cuda
