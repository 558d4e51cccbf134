// win_attn_sm90_check: the Hopper window + combine kernel (win_attn_sm90.cu) against today's window
// kernel (win_attn_v2 with the lean masks, i.e. "v3", as the Plan runs it, through its launcher) on
// random inputs, plus a double-precision check of sampled rows, and both timed (docs/cuda_sm90.md).
//
//   win_attn_sm90_check            the full set: correctness cases, then timings at 8k and 64k
//   win_attn_sm90_check --quick    small correctness cases, default variant only (for compute-sanitizer)
//
// Inputs: q, k_win, v_win, O_cmp, O_slc random (never zeros), gates ~ U(0, 1). Each case runs twice
// per kernel: without O_win (the Plan's default) and with it (intermediates asked for). o and O_win
// are compared by relative L2 and max |diff| over every element, lse_win by max |diff| (every row
// sees key t: all finite). Outputs are poisoned with NaN before each run, so an unwritten element
// fails. Timing (no O_win): median of `reps` launches after warm-up, the L2 flushed by a 256 MiB
// write before each, CUDA events around the launch alone; TFLOP/s of the useful FLOPs, 2 (dk + dv)
// per (row, key in its window).
// Exit status: 0 when every case passes, 1 when one fails, 77 without a Hopper GPU.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "check.hpp"
#include "kernels.hpp"
#include "win_attn_sm90.hpp"

using namespace nsa::cuda;

namespace {

__device__ __host__ inline uint16_t to_elem(float x, bool fp16) {
  if (fp16) return __half_as_ushort(__float2half_rn(x));
  return __bfloat16_as_ushort(__float2bfloat16_rn(x));
}
__device__ __host__ inline float from_elem(uint16_t h, bool fp16) {
  return fp16 ? __half2float(__ushort_as_half(h)) : __bfloat162float(__ushort_as_bfloat16(h));
}

__device__ inline uint64_t mix(uint64_t i, uint64_t seed) {
  uint64_t h = (i + seed) * 0x9E3779B97F4A7C15ull;
  h ^= h >> 31, h *= 0xBF58476D1CE4E5B9ull, h ^= h >> 29;
  return h;
}

__global__ void fill_random(uint16_t* x, int64_t n, uint64_t seed, bool fp16) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const uint64_t h = mix(uint64_t(i), seed);
    // Sum of 4 uniforms: roughly normal, variance 1 after the factor.
    float u = 0;
    for (int k = 0; k < 4; ++k) u += float((h >> (16 * k)) & 0xFFFF) / 65535.0f - 0.5f;
    x[i] = to_elem(u * 1.7320508f, fp16);
  }
}
__global__ void fill_uniform01(float* x, int64_t n, uint64_t seed) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    x[i] = (float((mix(uint64_t(i), seed) >> 40) & 0xFFFFFF) + 0.5f) / 16777216.0f;  // (0, 1)
}
__global__ void fill_u16(uint16_t* x, int64_t n, uint16_t v) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) x[i] = v;
}
__global__ void fill_f32(float* x, int64_t n, float v) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) x[i] = v;
}

struct Cmp {  // accumulated on the device
  double d2, r2;           // sum (a - b)^2, sum b^2
  unsigned max_o_bits;     // max |a - b| (float bits)
  unsigned max_l_bits;     // max |a - b| over lse
  unsigned long long bad;  // non-finite element or lse in either
};

__global__ void compare(const uint16_t* a, const uint16_t* b, bool fp16, int64_t n, const float* la, const float* lb,
                        int64_t nl, Cmp* out) {
  double d2 = 0, r2 = 0;
  float mo = 0, ml = 0;
  unsigned long long bad = 0;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const float x = from_elem(a[i], fp16), y = from_elem(b[i], fp16);
    if (!isfinite(x) || !isfinite(y)) { ++bad; continue; }
    d2 += double(x - y) * double(x - y), r2 += double(y) * double(y);
    mo = fmaxf(mo, fabsf(x - y));
  }
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < nl; i += int64_t(gridDim.x) * blockDim.x) {
    const float x = la[i], y = lb[i];
    if (!isfinite(x) || !isfinite(y)) { ++bad; continue; }
    ml = fmaxf(ml, fabsf(x - y));
  }
  atomicAdd(&out->d2, d2), atomicAdd(&out->r2, r2);
  atomicMax(&out->max_o_bits, __float_as_uint(mo)), atomicMax(&out->max_l_bits, __float_as_uint(ml));
  atomicAdd(&out->bad, bad);
}

struct Case {
  std::vector<int> Ts;  // sequence lengths (packed)
  int Hq, Hkv, dk, dv, w;
  bool time;
  bool fp16 = false;
};

int64_t* upload_i64(const std::vector<int64_t>& v) {
  int64_t* d = nullptr;
  NSA_CUDA_CHECK(cudaMalloc(&d, v.size() * sizeof(int64_t)));
  NSA_CUDA_CHECK(cudaMemcpy(d, v.data(), v.size() * sizeof(int64_t), cudaMemcpyHostToDevice));
  return d;
}

std::vector<int64_t> tile_prefix(const std::vector<int64_t>& cu, int BT) {
  std::vector<int64_t> t{0};
  for (size_t b = 0; b + 1 < cu.size(); ++b) t.push_back(t.back() + (cu[b + 1] - cu[b] + BT - 1) / BT);
  return t;
}

template <class T>
std::vector<T> download(const T* d, size_t n) {
  std::vector<T> h(n);
  if (n) NSA_CUDA_CHECK(cudaMemcpy(h.data(), d, n * sizeof(T), cudaMemcpyDeviceToHost));
  return h;
}

float median(std::vector<float> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  bool quick = false;
  for (int a = 1; a < argc; ++a) {
    if (std::strcmp(argv[a], "--quick") == 0) quick = true;
    else {
      std::fprintf(stderr, "usage: %s [--quick]\n", argv[0]);
      return 2;
    }
  }
  int ndev = 0;
  if (cudaGetDeviceCount(&ndev) != cudaSuccess || ndev == 0) {
    std::printf("SKIP: no CUDA device\n");
    return 77;
  }
  cudaDeviceProp prop{};
  NSA_CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
  std::printf("device: %s, cc %d.%d, %d SMs, L2 %d MiB\n", prop.name, prop.major, prop.minor, prop.multiProcessorCount,
              prop.l2CacheSize >> 20);
  if (prop.major != 9) {
    std::printf("SKIP: not a Hopper GPU\n");
    return 77;
  }

  std::vector<Case> cases;
  if (quick) {
    cases = {
        {{1000, 300, 45}, 64, 4, 128, 128, 256, false},  // packed, band longer than a tile, short sequences
        {{600}, 64, 4, 128, 128, 1, false},               // w = 1: each row sees itself
        {{500}, 8, 8, 128, 128, 512, false},              // G = 1, w >= T
        {{700}, 64, 4, 192, 128, 512, false},             // dk = 192
        {{600, 70}, 64, 8, 128, 128, 100, false, true},   // fp16, G = 8
    };
  } else {
    cases = {
        {{4097}, 64, 4, 128, 128, 512, false},
        {{4097}, 64, 4, 128, 128, 8192, false},               // w >= T: every causal key
        {{4097}, 64, 4, 128, 128, 1, false},                  // w = 1
        {{3000, 1100, 77}, 64, 4, 128, 128, 512, false},      // packed: tiles start mid-band, a short sequence
        {{1000}, 64, 8, 128, 128, 512, false},                // G = 8
        {{777}, 16, 16, 128, 128, 512, false},                // G = 1
        {{2049, 300}, 64, 16, 128, 128, 512, false},          // G = 4
        {{4097}, 64, 4, 192, 128, 512, false},                // dk = 192
        {{3000, 1100}, 64, 4, 128, 128, 512, false, true},    // fp16
        {{4097}, 64, 4, 192, 128, 512, false, true},          // fp16, dk = 192
        {{8192}, 64, 4, 128, 128, 512, true},
        {{65536}, 64, 4, 128, 128, 512, true},
        {{65536}, 64, 4, 192, 128, 512, true},
        {{65536}, 64, 16, 128, 128, 512, true},   // G = 4
        {{65536}, 16, 16, 128, 128, 512, true},   // G = 1
    };
  }
  struct Var { int block_n, stages; bool persistent; };
  std::vector<Var> vars = {{0, 0, true}};
  if (!quick) vars.insert(vars.end(), {{0, 0, false}, {64, 3, true}, {64, 4, true}});
  const int reps = 25, ref_warps = 8;

  void* flush = nullptr;
  const size_t flush_bytes = size_t(256) << 20;
  NSA_CUDA_CHECK(cudaMalloc(&flush, flush_bytes));
  Cmp* cmp_d = nullptr;
  NSA_CUDA_CHECK(cudaMalloc(&cmp_d, sizeof(Cmp)));
  cudaEvent_t e0, e1;
  NSA_CUDA_CHECK(cudaEventCreate(&e0));
  NSA_CUDA_CHECK(cudaEventCreate(&e1));
  cudaStream_t s;
  NSA_CUDA_CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  int failures = 0;
  std::vector<std::string> table;

  for (const Case& c : cases) {
    std::vector<int64_t> cu{0};
    int Tmax = 0;
    for (int T : c.Ts) cu.push_back(cu.back() + T), Tmax = std::max(Tmax, T);
    const int64_t N = cu.back();
    const int G = c.Hq / c.Hkv;
    const int64_t nq = N * c.Hq, no = nq * c.dv;
    int64_t* cu_d = upload_i64(cu);
    uint16_t *q, *k, *v, *ocmp, *oslc, *o_ref, *o_new, *ow_ref, *ow_new;
    float *gates, *lse_ref, *lse_new;
    NSA_CUDA_CHECK(cudaMalloc(&q, nq * c.dk * 2));
    NSA_CUDA_CHECK(cudaMalloc(&k, N * c.Hkv * c.dk * 2));
    NSA_CUDA_CHECK(cudaMalloc(&v, N * c.Hkv * c.dv * 2));
    for (uint16_t** b : {&ocmp, &oslc, &o_ref, &o_new, &ow_ref, &ow_new}) NSA_CUDA_CHECK(cudaMalloc(b, no * 2));
    NSA_CUDA_CHECK(cudaMalloc(&gates, nq * 3 * 4));
    NSA_CUDA_CHECK(cudaMalloc(&lse_ref, nq * 4));
    NSA_CUDA_CHECK(cudaMalloc(&lse_new, nq * 4));
    fill_random<<<1024, 256, 0, s>>>(q, nq * c.dk, 1, c.fp16);
    fill_random<<<1024, 256, 0, s>>>(k, N * c.Hkv * c.dk, 2ull << 40, c.fp16);
    fill_random<<<1024, 256, 0, s>>>(v, N * c.Hkv * c.dv, 3ull << 41, c.fp16);
    fill_random<<<1024, 256, 0, s>>>(ocmp, no, 5ull << 42, c.fp16);
    fill_random<<<1024, 256, 0, s>>>(oslc, no, 7ull << 43, c.fp16);
    fill_uniform01<<<1024, 256, 0, s>>>(gates, nq * 3, 11ull << 44);
    NSA_CUDA_CHECK(cudaGetLastError());

    // Today's kernel: FwdParams as the Plan fills them for the window stage of v3/v4.
    FwdParams p;
    p.B = int(c.Ts.size()), p.N = N, p.Tmax = Tmax, p.Hq = c.Hq, p.Hkv = c.Hkv, p.G = G, p.dk = c.dk, p.dv = c.dv;
    p.window = c.w, p.scale = float(1.0 / std::sqrt(double(c.dk))), p.cu_seqlens = cu_d;
    p.q = q, p.k_win = k, p.v_win = v, p.gates = gates, p.o_cmp = ocmp, p.o_slc = oslc;
    p.o = o_ref, p.lse_win = lse_ref, p.o_win = nullptr;
    const Precision prec = c.fp16 ? Precision::FP16 : Precision::BF16;
    const std::vector<int64_t> ref_tiles = tile_prefix(cu, 16 * ref_warps / G);
    TileMap tm{upload_i64(ref_tiles), ref_tiles.back(), 16 * ref_warps / G};

    WinAttnSm90Params a;
    a.B = p.B, a.N = N, a.Hq = c.Hq, a.Hkv = c.Hkv, a.G = G, a.dk = c.dk, a.dv = c.dv, a.w = c.w, a.scale = p.scale;
    a.elem = c.fp16 ? Sm90Elem::FP16 : Sm90Elem::BF16, a.cu_seqlens = cu_d;
    const std::vector<int64_t> new_tiles = tile_prefix(cu, win_attn_sm90_tile_positions(G));
    a.cu_tiles = upload_i64(new_tiles), a.tiles = new_tiles.back();
    a.q = q, a.k_win = k, a.v_win = v, a.gates = gates, a.o_cmp = ocmp, a.o_slc = oslc;
    a.o = o_new, a.lse_win = lse_new, a.o_win = nullptr;

    double useful = 0;  // FLOPs
    for (size_t b = 0; b + 1 < cu.size(); ++b)
      for (int64_t t = 0; t < cu[b + 1] - cu[b]; ++t) useful += double(std::min<int64_t>(t + 1, c.w));
    useful *= 2.0 * c.Hq * (c.dk + c.dv);

    std::string shape;
    for (int T : c.Ts) shape += (shape.empty() ? "" : "+") + std::to_string(T);
    shape += std::string(c.fp16 ? " fp16" : "") + " G=" + std::to_string(G) + " Hkv=" + std::to_string(c.Hkv) +
             " dk=" + std::to_string(c.dk) + " w=" + std::to_string(c.w);
    const uint16_t nan16 = c.fp16 ? 0x7E01 : 0x7FC1;
    auto poison = [&](uint16_t* o, uint16_t* ow, float* lse) {
      fill_u16<<<1024, 256, 0, s>>>(o, no, nan16);
      fill_u16<<<1024, 256, 0, s>>>(ow, no, nan16);
      fill_f32<<<1024, 256, 0, s>>>(lse, nq, NAN);
    };
    auto time_it = [&](auto&& launch) {
      for (int w = 0; w < 3; ++w) launch();
      std::vector<float> ms;
      for (int r = 0; r < reps; ++r) {
        NSA_CUDA_CHECK(cudaMemsetAsync(flush, r & 0xFF, flush_bytes, s));
        NSA_CUDA_CHECK(cudaEventRecord(e0, s));
        launch();
        NSA_CUDA_CHECK(cudaEventRecord(e1, s));
        NSA_CUDA_CHECK(cudaEventSynchronize(e1));
        float t = 0;
        NSA_CUDA_CHECK(cudaEventElapsedTime(&t, e0, e1));
        ms.push_back(t);
      }
      return median(ms);
    };
    auto cmp = [&](const uint16_t* x, const uint16_t* y, const float* lx, const float* ly) {
      NSA_CUDA_CHECK(cudaMemsetAsync(cmp_d, 0, sizeof(Cmp), s));
      compare<<<1024, 256, 0, s>>>(x, y, c.fp16, no, lx, ly, lx ? nq : 0, cmp_d);
      NSA_CUDA_CHECK(cudaGetLastError());
      Cmp r{};
      NSA_CUDA_CHECK(cudaMemcpyAsync(&r, cmp_d, sizeof(Cmp), cudaMemcpyDeviceToHost, s));
      NSA_CUDA_CHECK(cudaStreamSynchronize(s));
      return r;
    };
    auto maxbits = [](unsigned b) {
      float f;
      std::memcpy(&f, &b, 4);
      return f;
    };

    // Reference outputs: o and lse without O_win, then O_win from a second run with it.
    poison(o_ref, ow_ref, lse_ref);
    win_attn_mma(prec, p, tm, ref_warps, s);
    NSA_CUDA_CHECK(cudaStreamSynchronize(s));
    {
      FwdParams p2 = p;
      p2.o_win = ow_ref;
      uint16_t* o2 = nullptr;
      NSA_CUDA_CHECK(cudaMalloc(&o2, no * 2));
      p2.o = o2;
      win_attn_mma(prec, p2, tm, ref_warps, s);
      NSA_CUDA_CHECK(cudaStreamSynchronize(s));
      NSA_CUDA_CHECK(cudaFree(o2));
    }
    float ms_ref = 0;
    if (c.time) {
      ms_ref = time_it([&] { win_attn_mma(prec, p, tm, ref_warps, s); });
      char line[256];
      std::snprintf(line, sizeof line, "%-40s %-22s %8.3f ms %7.1f TFLOP/s %5.1f%% of 781", shape.c_str(),
                    "win_attn_v2 (v3, ref)", ms_ref, useful / ms_ref * 1e-9, useful / ms_ref * 1e-9 / 781 * 100);
      table.push_back(line);
    }

    // Host copies for the double-precision check of sampled rows.
    const int samples = 32;
    std::vector<uint16_t> hk, hv, hq, hc, hs;
    std::vector<float> hg;
    if (N <= 16384) {
      hk = download(k, size_t(N) * c.Hkv * c.dk), hv = download(v, size_t(N) * c.Hkv * c.dv);
      hq = download(q, size_t(nq) * c.dk), hc = download(ocmp, size_t(no)), hs = download(oslc, size_t(no));
      hg = download(gates, size_t(nq) * 3);
    }

    for (const Var& var : vars) {
      a.block_n = var.block_n, a.stages = var.stages, a.persistent = var.persistent;
      const WinAttnSm90Params ra = win_attn_sm90_resolve(a);
      WinAttnSm90Params dflt = a;
      dflt.block_n = dflt.stages = 0;
      dflt = win_attn_sm90_resolve(dflt);
      if (var.block_n != 0 && ra.block_n == dflt.block_n && ra.stages == dflt.stages) continue;  // the default again
      std::string why;
      if (!win_attn_sm90_supported(a, &why)) {
        if (var.block_n == 0) {  // the defaults must run on a Hopper build
          std::printf("%s  default: %s  FAIL\n", shape.c_str(), why.c_str());
          ++failures;
        }
        continue;  // other variants are compiled for bf16 dk = 128 only
      }
      char tag[64];
      std::snprintf(tag, sizeof tag, "bn=%3d st=%d ps=%d", ra.block_n, ra.stages, int(var.persistent));
      // Run 1: no O_win. Run 2: with O_win (its o must equal run 1's).
      poison(o_new, ow_new, lse_new);
      win_attn_sm90(a, s);
      NSA_CUDA_CHECK(cudaStreamSynchronize(s));
      const Cmp r1 = cmp(o_new, o_ref, lse_new, lse_ref);
      WinAttnSm90Params a2 = a;
      a2.o_win = ow_new;
      poison(o_new, ow_new, lse_new);
      win_attn_sm90(a2, s);
      NSA_CUDA_CHECK(cudaStreamSynchronize(s));
      const Cmp r2 = cmp(o_new, o_ref, lse_new, lse_ref);
      const Cmp r3 = cmp(ow_new, ow_ref, nullptr, nullptr);
      const double rel1 = std::sqrt(r1.d2 / std::max(r1.r2, 1e-300)), rel2 = std::sqrt(r2.d2 / std::max(r2.r2, 1e-300));
      const double rel3 = std::sqrt(r3.d2 / std::max(r3.r2, 1e-300));

      // Double twin of sampled rows (o and lse of the last run) from the rounded inputs.
      double so = 0, sl = 0, sw = 0;
      if (!hk.empty()) {
        const std::vector<uint16_t> ho = download(o_new, size_t(no)), hw = download(ow_new, size_t(no));
        const std::vector<float> hl = download(lse_new, size_t(nq));
        auto f = [&](uint16_t h) { return double(from_elem(h, c.fp16)); };
        uint64_t rng = 12345;
        for (int si = 0; si < samples; ++si) {
          rng = rng * 6364136223846793005ull + 1442695040888963407ull;
          const int64_t row = int64_t((rng >> 33) % uint64_t(N));
          const int h = int((rng >> 13) % uint64_t(c.Hq)), g = h / G;
          int b = 0;
          while (cu[b + 1] <= row) ++b;
          const int t = int(row - cu[b]), lo = std::max(0, t - c.w + 1);
          const int64_t th = row * c.Hq + h;
          std::vector<double> sc(t + 1 - lo), acc(c.dv, 0.0);
          double mx = -1e300;
          for (int u = lo; u <= t; ++u) {
            double dot = 0;
            for (int e = 0; e < c.dk; ++e) dot += f(hq[th * c.dk + e]) * f(hk[((cu[b] + u) * c.Hkv + g) * c.dk + e]);
            sc[u - lo] = dot * p.scale, mx = std::max(mx, sc[u - lo]);
          }
          double sum = 0;
          for (int u = lo; u <= t; ++u) {
            const double wt = std::exp(sc[u - lo] - mx);
            sum += wt;
            for (int e = 0; e < c.dv; ++e) acc[e] += wt * f(hv[((cu[b] + u) * c.Hkv + g) * c.dv + e]);
          }
          double d2 = 0, r2 = 0, dw2 = 0, rw2 = 0;
          for (int e = 0; e < c.dv; ++e) {
            const double ow = acc[e] / sum;
            const double ref = hg[th * 3] * f(hc[th * c.dv + e]) + hg[th * 3 + 1] * f(hs[th * c.dv + e]) + hg[th * 3 + 2] * ow;
            d2 += (f(ho[th * c.dv + e]) - ref) * (f(ho[th * c.dv + e]) - ref), r2 += ref * ref;
            dw2 += (f(hw[th * c.dv + e]) - ow) * (f(hw[th * c.dv + e]) - ow), rw2 += ow * ow;
          }
          so = std::max(so, std::sqrt(d2 / std::max(r2, 1e-300)));
          sw = std::max(sw, std::sqrt(dw2 / std::max(rw2, 1e-300)));
          sl = std::max(sl, std::fabs(double(hl[th]) - (mx + std::log(sum))));
        }
      }
      // bf16 rounding of the outputs (2^-8 relative) bounds the kernels' difference.
      const bool ok = r1.bad == 0 && r2.bad == 0 && r3.bad == 0 && rel1 < 8e-3 && rel2 < 8e-3 && rel3 < 8e-3 &&
                      maxbits(r1.max_l_bits) < 1e-3 && maxbits(r2.max_l_bits) < 1e-3 && so < 8e-3 && sw < 8e-3 &&
                      sl < 1e-3;
      failures += !ok;
      std::printf("%-40s %s  vs v2: o rel L2 %.2e max|d| %.2e, lse max|d| %.2e, O_win rel L2 %.2e max|d| %.2e, "
                  "bad %llu/%llu/%llu; vs double (%s): o %.2e, O_win %.2e, lse %.2e  %s\n",
                  shape.c_str(), tag, rel1, maxbits(r1.max_o_bits), maxbits(r1.max_l_bits), rel3,
                  maxbits(r3.max_o_bits), (unsigned long long)r1.bad, (unsigned long long)r2.bad,
                  (unsigned long long)r3.bad, hk.empty() ? "skipped, N > 16384" : "32 rows", so, sw, sl,
                  ok ? "ok" : "FAIL");
      std::fflush(stdout);
      if (c.time) {
        const float ms = time_it([&] { win_attn_sm90(a, s); });
        char line[256];
        std::snprintf(line, sizeof line, "%-40s sm90 %-17s %8.3f ms %7.1f TFLOP/s %5.1f%% of 781  %.2fx", shape.c_str(),
                      tag, ms, useful / ms * 1e-9, useful / ms * 1e-9 / 781 * 100, ms_ref / ms);
        table.push_back(line);
      }
    }
    for (void* ptr : {(void*)cu_d, (void*)q, (void*)k, (void*)v, (void*)ocmp, (void*)oslc, (void*)o_ref, (void*)o_new,
                      (void*)ow_ref, (void*)ow_new, (void*)gates, (void*)lse_ref, (void*)lse_new, (void*)tm.cu_tiles,
                      (void*)a.cu_tiles})
      NSA_CUDA_CHECK(cudaFree(ptr));
  }
  if (!table.empty()) {
    std::printf("\ntimings (median of %d, L2 flushed, no O_win; useful TFLOP/s = 2 (dk + dv) per row and key in its window):\n",
                reps);
    for (auto& line : table) std::printf("%s\n", line.c_str());
  }
  std::printf("%s: %d failing case(s)\n", failures ? "FAIL" : "PASS", failures);
  return failures ? 1 : 0;
}
