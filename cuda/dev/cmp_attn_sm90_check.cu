// cmp_attn_sm90_check: the Hopper compression-attention kernel (cmp_attn_sm90.cu) against today's
// FlashAttention-2 kernel (cmp_fa_v4, through its launcher cmp_attn_v4) on random inputs, plus a
// double-precision check of sampled rows, and both timed (docs/cuda_sm90.md).
//
//   cmp_attn_sm90_check            the full set: correctness cases, then timings at 8k and 64k
//   cmp_attn_sm90_check --quick    the small correctness cases only (for compute-sanitizer)
//   --persistent 0|1               only the variants with a grid of one CTA per item (0) or per SM (1)
//
// O_cmp is compared as relative L2 and max |diff| over every element; lse as max |diff| over the
// finite entries, and both must agree on which rows are -inf (no visible block). Outputs are
// poisoned with NaN before each run, so an unwritten element fails. Timing: median of `reps`
// launches after warm-up, the L2 flushed by a 256 MiB write before each, CUDA events around the
// launch alone; TFLOP/s of the useful FLOPs, 2 (dk + dv) per (row, visible key).
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
#include "cmp_attn_sm90.hpp"
#include "kernels.hpp"
#include "plan.hpp"

using namespace nsa::cuda;

namespace {

// 16-bit element stores and loads of either precision (the buffers are raw uint16_t).
__device__ __host__ inline uint16_t to_elem(float x, bool fp16) {
  if (fp16) return __half_as_ushort(__float2half_rn(x));
  return __bfloat16_as_ushort(__float2bfloat16_rn(x));
}
__device__ __host__ inline float from_elem(uint16_t h, bool fp16) {
  return fp16 ? __half2float(__ushort_as_half(h)) : __bfloat162float(__ushort_as_bfloat16(h));
}

__global__ void fill_random(uint16_t* x, int64_t n, uint64_t seed, bool fp16) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    uint64_t h = (uint64_t(i) + seed) * 0x9E3779B97F4A7C15ull;
    h ^= h >> 31, h *= 0xBF58476D1CE4E5B9ull, h ^= h >> 29;
    // Sum of 4 uniforms: mean 0, variance 1/3 * 4 / 4 ~ roughly normal, never exactly 0 en masse.
    float u = 0;
    for (int k = 0; k < 4; ++k) u += float((h >> (16 * k)) & 0xFFFF) / 65535.0f - 0.5f;
    x[i] = to_elem(u * 1.7320508f, fp16);
  }
}

__global__ void fill_u16(uint16_t* x, int64_t n, uint16_t v) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) x[i] = v;
}
__global__ void fill_f32(float* x, int64_t n, float v) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) x[i] = v;
}

struct Cmp {  // accumulated on the device
  double d2, r2;           // sum (a - b)^2, sum b^2 over O
  unsigned max_o_bits;     // max |a - b| over O (float bits)
  unsigned max_l_bits;     // max |a - b| over finite lse
  unsigned long long bad;  // non-finite O in a, or lse -inf/finite mismatch, or NaN lse
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
    if (isnan(x) || isnan(y) || (isinf(x) != isinf(y))) { ++bad; continue; }
    if (!isinf(x)) ml = fmaxf(ml, fabsf(x - y));
  }
  atomicAdd(&out->d2, d2), atomicAdd(&out->r2, r2);
  atomicMax(&out->max_o_bits, __float_as_uint(mo)), atomicMax(&out->max_l_bits, __float_as_uint(ml));
  atomicAdd(&out->bad, bad);
}

int visible(int t, int l, int d) { return t + 1 >= l ? (t + 1 - l) / d + 1 : 0; }

struct Case {
  std::vector<int> Ts;  // sequence lengths (packed)
  int Hq, Hkv, dk, dv;
  bool time;
  bool fp16 = false;
};

struct Bufs {
  int64_t N = 0, Nc = 0;
  std::vector<int64_t> cu, cuc;
  int64_t *cu_d = nullptr, *cuc_d = nullptr;
  uint16_t *q = nullptr, *kc = nullptr, *vc = nullptr, *o_ref = nullptr, *o_new = nullptr;  // elem
  float *lse_ref = nullptr, *lse_new = nullptr;
  int32_t* block_idx = nullptr;
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

// Double-precision O and lse of sampled rows from the device's own (rounded) inputs.
bool sampled_double_check(const Case& c, const Bufs& B, const FwdParams& p, int samples, double* worst_o,
                          double* worst_l) {
  std::vector<uint16_t> kc(size_t(B.Nc) * c.Hkv * c.dk), vc(size_t(B.Nc) * c.Hkv * c.dv);
  if (B.Nc) {
    NSA_CUDA_CHECK(cudaMemcpy(kc.data(), B.kc, kc.size() * 2, cudaMemcpyDeviceToHost));
    NSA_CUDA_CHECK(cudaMemcpy(vc.data(), B.vc, vc.size() * 2, cudaMemcpyDeviceToHost));
  }
  auto f = [&](uint16_t h) { return double(from_elem(h, c.fp16)); };
  uint64_t rng = 12345;
  *worst_o = 0, *worst_l = 0;
  bool ok = true;
  for (int s = 0; s < samples; ++s) {
    rng = rng * 6364136223846793005ull + 1442695040888963407ull;
    const int64_t row = int64_t((rng >> 33) % uint64_t(B.N));
    const int h = int((rng >> 13) % uint64_t(c.Hq));
    int b = 0;
    while (B.cu[b + 1] <= row) ++b;
    const int t = int(row - B.cu[b]), nv = visible(t, p.cmp_len, p.cmp_stride), g = h / (c.Hq / c.Hkv);
    std::vector<uint16_t> q(c.dk), o(c.dv);
    float lse = 0;
    NSA_CUDA_CHECK(cudaMemcpy(q.data(), B.q + (row * c.Hq + h) * c.dk, c.dk * 2, cudaMemcpyDeviceToHost));
    NSA_CUDA_CHECK(cudaMemcpy(o.data(), B.o_new + (row * c.Hq + h) * c.dv, c.dv * 2, cudaMemcpyDeviceToHost));
    NSA_CUDA_CHECK(cudaMemcpy(&lse, B.lse_new + row * c.Hq + h, 4, cudaMemcpyDeviceToHost));
    if (nv == 0) {
      bool z = std::isinf(lse) && lse < 0;
      for (int e = 0; e < c.dv; ++e) z = z && f(o[e]) == 0.0;
      if (!z) ok = false, std::printf("    row %lld head %d sees no block but O/lse are not 0/-inf\n", (long long)row, h);
      continue;
    }
    std::vector<double> sc(nv), acc(c.dv, 0.0);
    double mx = -1e300;
    for (int i = 0; i < nv; ++i) {
      const uint16_t* kr = kc.data() + ((B.cuc[b] + i) * c.Hkv + g) * c.dk;
      double dot = 0;
      for (int e = 0; e < c.dk; ++e) dot += f(q[e]) * f(kr[e]);
      sc[i] = dot * p.scale, mx = std::max(mx, sc[i]);
    }
    double sum = 0;
    for (int i = 0; i < nv; ++i) {
      const double w = std::exp(sc[i] - mx);
      sum += w;
      const uint16_t* vr = vc.data() + ((B.cuc[b] + i) * c.Hkv + g) * c.dv;
      for (int e = 0; e < c.dv; ++e) acc[e] += w * f(vr[e]);
    }
    double d2 = 0, r2 = 0;
    for (int e = 0; e < c.dv; ++e) {
      const double ref = acc[e] / sum;
      d2 += (f(o[e]) - ref) * (f(o[e]) - ref), r2 += ref * ref;
    }
    const double rel = std::sqrt(d2 / std::max(r2, 1e-300)), dl = std::fabs(double(lse) - (mx + std::log(sum)));
    *worst_o = std::max(*worst_o, rel), *worst_l = std::max(*worst_l, dl);
  }
  return ok;
}

float median(std::vector<float> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  bool quick = false;
  int persistent_only = -1;  // --persistent 0|1: only the variants with that grid; default both
  for (int a = 1; a < argc; ++a) {
    if (std::strcmp(argv[a], "--quick") == 0) quick = true;
    else if (std::strcmp(argv[a], "--persistent") == 0 && a + 1 < argc) persistent_only = std::atoi(argv[++a]);
    else {
      std::fprintf(stderr, "usage: %s [--quick] [--persistent 0|1]\n", argv[0]);
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
  const int optin = device_info(0).smem_optin;

  std::vector<Case> cases = {
      {{4097}, 64, 4, 128, 128, false},
      {{3000, 1100}, 64, 4, 128, 128, false},  // packed: the second sequence's compressed rows start mid-tile
      {{31, 33, 700}, 64, 4, 128, 128, false}, // rows that see no block, a sequence of one block
      {{1000}, 64, 8, 128, 128, false},        // G = 8
      {{777}, 16, 16, 128, 128, false},        // G = 1
      {{2049, 300}, 64, 16, 128, 128, false},  // G = 4
      {{4097}, 64, 4, 192, 128, false},
      {{3000, 1100}, 64, 4, 128, 128, false, true},  // fp16
      {{4097}, 64, 4, 192, 128, false, true},
  };
  if (!quick) {
    cases.push_back({{8192}, 64, 4, 128, 128, true});
    cases.push_back({{65536}, 64, 4, 128, 128, true});
    cases.push_back({{8192}, 64, 4, 192, 128, true});
    cases.push_back({{65536}, 64, 4, 192, 128, true});
  }
  struct Var { int block_n, stages; bool overlap, persistent, q_async = false; };
  std::vector<Var> vars;
  // block_n = stages = 0: the default of the head dims (cmp_attn_sm90_resolve); the rest compare.
  // q_async (qa=1): the experimental Q loader, not yet measured when added.
  for (const Var& v : std::vector<Var>{{0, 0, true, true}, {0, 0, true, false}, {128, 2, false, true},
                                       {128, 2, true, true}, {0, 0, true, true, true}, {0, 0, true, false, true}})
    if (persistent_only < 0 || int(v.persistent) == persistent_only) vars.push_back(v);
  const int l = 32, d = 16, reps = 30;

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
    Bufs B;
    B.cu = {0}, B.cuc = {0};
    int Tmax = 0;
    for (int T : c.Ts) B.cu.push_back(B.cu.back() + T), B.cuc.push_back(B.cuc.back() + visible(T - 1, l, d)),
        Tmax = std::max(Tmax, T);
    B.N = B.cu.back(), B.Nc = B.cuc.back();
    B.cu_d = upload_i64(B.cu), B.cuc_d = upload_i64(B.cuc);
    const int G = c.Hq / c.Hkv;
    const int64_t nq = B.N * c.Hq, no = nq * c.dv;
    NSA_CUDA_CHECK(cudaMalloc(&B.q, nq * c.dk * 2));
    NSA_CUDA_CHECK(cudaMalloc(&B.kc, std::max<int64_t>(1, B.Nc * c.Hkv * c.dk) * 2));
    NSA_CUDA_CHECK(cudaMalloc(&B.vc, std::max<int64_t>(1, B.Nc * c.Hkv * c.dv) * 2));
    NSA_CUDA_CHECK(cudaMalloc(&B.o_ref, no * 2));
    NSA_CUDA_CHECK(cudaMalloc(&B.o_new, no * 2));
    NSA_CUDA_CHECK(cudaMalloc(&B.lse_ref, nq * 4));
    NSA_CUDA_CHECK(cudaMalloc(&B.lse_new, nq * 4));
    NSA_CUDA_CHECK(cudaMalloc(&B.block_idx, B.N * c.Hkv * 16 * 4));
    fill_random<<<1024, 256, 0, s>>>(B.q, nq * c.dk, 1, c.fp16);
    fill_random<<<1024, 256, 0, s>>>(B.kc, B.Nc * c.Hkv * c.dk, 2ull << 40, c.fp16);
    fill_random<<<1024, 256, 0, s>>>(B.vc, B.Nc * c.Hkv * c.dv, 3ull << 41, c.fp16);
    NSA_CUDA_CHECK(cudaGetLastError());

    // Today's kernel: FwdParams as the Plan fills them, the FA kernel isolated from the score
    // kernel by capturing cmp_attn_v4 into a graph and removing every node but the first.
    FwdParams p;
    p.B = int(c.Ts.size()), p.N = B.N, p.Nc = B.Nc, p.Tmax = Tmax, p.Hq = c.Hq, p.Hkv = c.Hkv, p.G = G;
    p.dk = c.dk, p.dv = c.dv, p.cmp_len = l, p.cmp_stride = d, p.slc_len = 64, p.slc_count = 16, p.init_blocks = 1, p.local_blocks = 2;
    p.window = 512, p.NB = (Tmax + 63) / 64, p.scale = float(1.0 / std::sqrt(double(c.dk)));
    p.cu_seqlens = B.cu_d, p.cu_cmp = B.cuc_d, p.q = B.q, p.kc = B.kc, p.vc = B.vc;
    p.o_cmp = B.o_ref, p.lse_cmp = B.lse_ref, p.block_idx = B.block_idx;
    const int fa_warps = 2 * (cmp_attn_mma_smem(p, 4) + prop.reservedSharedMemPerBlock) <= prop.sharedMemPerMultiprocessor ? 4 : 8;
    int score_warps = 8;
    while (score_warps > 1 && topn_mma_smem(p, score_warps) > size_t(optin)) score_warps /= 2;
    const std::vector<int64_t> fa_tiles = tile_prefix(B.cu, 32 * fa_warps / G), sc_tiles = tile_prefix(B.cu, 16 * score_warps / G);
    TileMap tm_fa{upload_i64(fa_tiles), fa_tiles.back(), 32 * fa_warps / G};
    TileMap tm_sc{upload_i64(sc_tiles), sc_tiles.back(), 16 * score_warps / G};
    cudaGraph_t graph;
    NSA_CUDA_CHECK(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal));
    cmp_attn_mma(c.fp16 ? Precision::FP16 : Precision::BF16, p, tm_fa, fa_warps, s);
    topn_mma(c.fp16 ? Precision::FP16 : Precision::BF16, p, tm_sc, score_warps, s);
    NSA_CUDA_CHECK(cudaStreamEndCapture(s, &graph));
    cudaGraphExec_t branch_exec;  // both kernels: the branch as the Plan runs it today
    NSA_CUDA_CHECK(cudaGraphInstantiate(&branch_exec, graph, 0));
    size_t nroots = 1;
    cudaGraphNode_t root;
    NSA_CUDA_CHECK(cudaGraphGetRootNodes(graph, &root, &nroots));
    size_t nnodes = 0;
    NSA_CUDA_CHECK(cudaGraphGetNodes(graph, nullptr, &nnodes));
    std::vector<cudaGraphNode_t> nodes(nnodes);
    NSA_CUDA_CHECK(cudaGraphGetNodes(graph, nodes.data(), &nnodes));
    for (auto n : nodes)
      if (n != root) NSA_CUDA_CHECK(cudaGraphDestroyNode(n));
    cudaGraphExec_t fa_exec;
    NSA_CUDA_CHECK(cudaGraphInstantiate(&fa_exec, graph, 0));

    // The new kernel's parameters.
    CmpAttnSm90Params q;
    q.B = p.B, q.N = p.N, q.Nc = p.Nc, q.Hq = c.Hq, q.Hkv = c.Hkv, q.G = G, q.dk = c.dk, q.dv = c.dv, q.l = l,
    q.d = d, q.scale = p.scale, q.elem = c.fp16 ? Sm90Elem::FP16 : Sm90Elem::BF16, q.cu_seqlens = B.cu_d, q.cu_cmp = B.cuc_d;
    const std::vector<int64_t> new_tiles = tile_prefix(B.cu, cmp_attn_sm90_tile_positions(G));
    q.cu_tiles = upload_i64(new_tiles), q.tiles = new_tiles.back();
    q.q = B.q, q.kc = B.kc, q.vc = B.vc, q.o_cmp = B.o_new, q.lse_cmp = B.lse_new;

    double useful = 0;  // FLOPs
    for (size_t b = 0; b + 1 < B.cu.size(); ++b)
      for (int64_t t = 0; t < B.cu[b + 1] - B.cu[b]; ++t) useful += double(visible(int(t), l, d));
    useful *= 2.0 * c.Hq * (c.dk + c.dv);

    std::string shape;
    for (int T : c.Ts) shape += (shape.empty() ? "" : "+") + std::to_string(T);
    shape += std::string(c.fp16 ? " fp16" : "") + " Hq=" + std::to_string(c.Hq) + " Hkv=" + std::to_string(c.Hkv) + " dk=" + std::to_string(c.dk) +
             " dv=" + std::to_string(c.dv);
    auto poison = [&](void* o, float* lse) {
      fill_u16<<<1024, 256, 0, s>>>(static_cast<uint16_t*>(o), no, c.fp16 ? 0x7E01 : 0x7FC1);  // NaN
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

    poison(B.o_ref, B.lse_ref);
    NSA_CUDA_CHECK(cudaGraphLaunch(fa_exec, s));
    NSA_CUDA_CHECK(cudaStreamSynchronize(s));
    float ms_ref = 0;
    if (c.time) ms_ref = time_it([&] { NSA_CUDA_CHECK(cudaGraphLaunch(fa_exec, s)); });
    if (c.time) {
      char line[256];
      std::snprintf(line, sizeof line, "%-34s %-16s %9.3f ms %7.1f TFLOP/s %5.1f%% of 781", shape.c_str(),
                    "cmp_fa_v4", ms_ref, useful / ms_ref * 1e-9, useful / ms_ref * 1e-9 / 781 * 100);
      table.push_back(line);
      // Context: today's whole branch (FA + scores/top-n) in the same run; the scores kernel's
      // share is the difference, which a Hopper cmp_attn leaves as it is.
      const float ms_branch = time_it([&] { NSA_CUDA_CHECK(cudaGraphLaunch(branch_exec, s)); });
      std::snprintf(line, sizeof line, "%-34s %-16s %9.3f ms (cmp_score_v4's share: %.3f ms)", shape.c_str(),
                    "cmp_attn_v4 both", ms_branch, ms_branch - ms_ref);
      table.push_back(line);
    }

    for (const Var& v : vars) {
      q.block_n = v.block_n, q.stages = v.stages, q.overlap = v.overlap, q.persistent = v.persistent, q.q_async = v.q_async;
      CmpAttnSm90Params dflt = q;
      dflt.block_n = dflt.stages = 0;
      dflt = cmp_attn_sm90_resolve(dflt);
      const CmpAttnSm90Params rq = cmp_attn_sm90_resolve(q);
      if (v.block_n != 0 && v.overlap && v.persistent && !v.q_async && rq.block_n == dflt.block_n && rq.stages == dflt.stages)
        continue;  // the default again
      const Var shown{rq.block_n, rq.stages, v.overlap, v.persistent, v.q_async};
      std::string why;
      if (!cmp_attn_sm90_supported(q, &why)) {
        std::printf("%s  bn=%d st=%d ov=%d ps=%d qa=%d: not compiled\n", shape.c_str(), shown.block_n, shown.stages, int(v.overlap),
                    int(v.persistent), int(v.q_async));
        continue;
      }
      poison(B.o_new, B.lse_new);
      cmp_attn_sm90(q, s);
      NSA_CUDA_CHECK(cudaStreamSynchronize(s));
      NSA_CUDA_CHECK(cudaMemsetAsync(cmp_d, 0, sizeof(Cmp), s));
      compare<<<1024, 256, 0, s>>>(B.o_new, B.o_ref, c.fp16, no, B.lse_new, B.lse_ref, nq, cmp_d);
      NSA_CUDA_CHECK(cudaGetLastError());
      Cmp r{};
      NSA_CUDA_CHECK(cudaMemcpyAsync(&r, cmp_d, sizeof(Cmp), cudaMemcpyDeviceToHost, s));
      NSA_CUDA_CHECK(cudaStreamSynchronize(s));
      float mo, ml;
      std::memcpy(&mo, &r.max_o_bits, 4), std::memcpy(&ml, &r.max_l_bits, 4);
      const double rel = std::sqrt(r.d2 / std::max(r.r2, 1e-300));
      double so = 0, sl = 0;
      const bool samp_ok = sampled_double_check(c, B, p, 48, &so, &sl);
      // bf16 rounding of O (2^-8 relative) bounds the two kernels' difference: both round once.
      const bool ok = r.bad == 0 && rel < 8e-3 && ml < 1e-3 && samp_ok && so < 8e-3 && sl < 1e-3;
      failures += !ok;
      std::printf("%-34s bn=%3d st=%d ov=%d ps=%d qa=%d  vs cmp_fa_v4: O rel L2 %.2e max|d| %.2e, lse max|d| %.2e, bad %llu;"
                  "  vs double (48 rows): O rel L2 <= %.2e, lse |d| <= %.2e  %s\n",
                  shape.c_str(), shown.block_n, shown.stages, int(v.overlap), int(v.persistent), int(v.q_async), rel, mo, ml, (unsigned long long)r.bad, so, sl,
                  ok ? "ok" : "FAIL");
      if (c.time) {
        const float ms = time_it([&] { cmp_attn_sm90(q, s); });
        char line[256];
        std::snprintf(line, sizeof line, "%-34s sm90 bn=%3d st=%d ov=%d ps=%d qa=%d %8.3f ms %7.1f TFLOP/s %5.1f%% of 781  %.2fx", shape.c_str(),
                      shown.block_n, shown.stages, int(v.overlap), int(v.persistent), int(v.q_async), ms, useful / ms * 1e-9, useful / ms * 1e-9 / 781 * 100, ms_ref / ms);
        table.push_back(line);
      }
    }
    NSA_CUDA_CHECK(cudaGraphExecDestroy(fa_exec));
    NSA_CUDA_CHECK(cudaGraphExecDestroy(branch_exec));
    NSA_CUDA_CHECK(cudaGraphDestroy(graph));
    for (void* ptr : {(void*)B.cu_d, (void*)B.cuc_d, (void*)B.q, (void*)B.kc, (void*)B.vc, (void*)B.o_ref,
                      (void*)B.o_new, (void*)B.lse_ref, (void*)B.lse_new, (void*)B.block_idx,
                      (void*)tm_fa.cu_tiles, (void*)tm_sc.cu_tiles, (void*)q.cu_tiles})
      NSA_CUDA_CHECK(cudaFree(ptr));
    std::fflush(stdout);
  }
  if (!table.empty()) {
    std::printf("\ntimings (median of %d, L2 flushed, bf16, l = %d, d = %d; useful TFLOP/s = 2 (dk + dv) per row and visible key):\n", reps, l, d);
    for (auto& line : table) std::printf("%s\n", line.c_str());
  }
  std::printf("%s: %d failing case(s)\n", failures ? "FAIL" : "PASS", failures);
  return failures ? 1 : 0;
}
