// cmp_attn (docs/spec.md 3): the compression branch's attention, softmax over the visible
// compressed keys: O_cmp and lse_cmp. CUDA twin of the compression part of reference/forward.cpp's
// nsa_tile.
//
// fp32: one kernel that also computes the top-n (Eq. 8-11, the topn stage): two passes over the
// compressed keys, the first for each row's lse, the second forming p = exp(s q.k - lse) once for
// O = p V and for the block scores (Eq. 9-10) in shared memory, then the top-n.
// mma: FlashAttention-2 over the visible compressed keys in one pass (online softmax), O_cmp and
// lse only; the topn stage (topn.cu) then recomputes q.k with lse known. Splitting the branch the
// way the public NSA kernels do costs the same MMAs as one two-pass kernel (q.k twice, p V once)
// but gives each kernel its own shape (docs/cuda.md has the measurements).
// Neither the [T, Nc] probabilities nor (unless asked) the [T, NB] block scores reach device memory.
#include <climits>

#include "check.hpp"
#include "attn_tile.cuh"
#include "device.cuh"
#include "kernels.hpp"
#include "topn.cuh"

namespace nsa::cuda {

namespace {

using namespace dev;

// ============================== fp32: CUDA cores, fused with topn ==============================
// One CTA per (token, KV group); warp w handles heads w, w + nwarps, ... of the group, one key at
// a time (lanes split the head dims). Shared memory: per-warp mapped probabilities [nwarps][NB],
// then the group scores [NB].
template <class T>
__global__ void cmp_attn_fp32_kernel(FwdParams p) {
  extern __shared__ float sm[];
  const int64_t row = blockIdx.x;
  const int g = blockIdx.y;
  const int b = find_seq(p.cu_seqlens, p.B, row);
  const int t = int(row - p.cu_seqlens[b]);
  const int64_t cmp0 = p.cu_cmp[b];
  const int nw = blockDim.x / 32, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int nv = cmp_visible(t, p.cmp_len, p.cmp_stride), valid = slc_valid(t, p.slc_len);
  float* pw = sm + warp * p.NB;
  for (int j = lane; j < valid; j += 32) pw[j] = 0;
  __syncwarp();
  const T* kc = static_cast<const T*>(p.kc);
  const T* vc = static_cast<const T*>(p.vc);
  for (int hi = warp; hi < p.G; hi += nw) {
    const int h = g * p.G + hi;
    const T* q = static_cast<const T*>(p.q) + (row * p.Hq + h) * p.dk;
    auto score = [&](int i) {  // s q.k_i, the same in every lane
      const T* k = kc + ((cmp0 + i) * p.Hkv + g) * p.dk;
      float s = 0;
      for (int c = lane; c < p.dk; c += 32) s += to_f(q[c]) * to_f(k[c]);
      for (int o = 16; o > 0; o /= 2) s += __shfl_xor_sync(0xffffffffu, s, o);
      return s * p.scale;
    };
    float m = -INFINITY, sum = 0;  // pass 1: lse
    for (int i = 0; i < nv; ++i) {
      const float s = score(i), mn = fmaxf(m, s);
      sum = sum * expf(m - mn) + expf(s - mn);
      m = mn;
    }
    const float lse = nv > 0 ? m + logf(sum) : -INFINITY;
    float o[8] = {0, 0, 0, 0, 0, 0, 0, 0};  // lane's dims c = lane + 32 k, dv <= 256
    for (int i = 0; i < nv; ++i) {            // pass 2: O and Eq. 9 for this head
      const float pr = expf(score(i) - lse);
      const T* v = vc + ((cmp0 + i) * p.Hkv + g) * p.dv;
#pragma unroll
      for (int k = 0; k < 8; ++k)
        if (lane + 32 * k < p.dv) o[k] += pr * to_f(v[lane + 32 * k]);
      if (lane == 0)
        for (int j = i * p.cmp_stride / p.slc_len; j <= (i * p.cmp_stride + p.cmp_len - 1) / p.slc_len; ++j)
          pw[j] += pr * overlap_weight(i, j, p.cmp_len, p.cmp_stride, p.slc_len);
    }
    T* out = static_cast<T*>(p.o_cmp) + (row * p.Hq + h) * p.dv;
#pragma unroll
    for (int k = 0; k < 8; ++k)
      if (lane + 32 * k < p.dv) out[lane + 32 * k] = from_f<T>(o[k]);
    if (lane == 0) p.lse_cmp[row * p.Hq + h] = lse;
  }
  __syncthreads();
  float* P = sm + nw * p.NB;  // Eq. 10: the group's score, warps summed in order
  for (int j = threadIdx.x; j < valid; j += blockDim.x) {
    float s = 0;
    for (int w = 0; w < nw; ++w) s += sm[w * p.NB + j];
    P[j] = s;
  }
  __syncthreads();
  if (p.block_scores)
    for (int j = threadIdx.x; j < p.NB; j += blockDim.x)
      p.block_scores[(row * p.Hkv + g) * p.NB + j] = j < valid ? P[j] : 0.0f;
  if (threadIdx.x == 0) select_serial(P, t, p, p.block_idx + (row * p.Hkv + g) * p.slc_count);
}
// ============================== mma: tensor cores (mma.sync) ==============================
// Compressed keys stream through shared memory in tiles of 64.
constexpr int kKeys = 64;
// MT m16 tiles per warp (WR = 16 MT rows), nwarps warps, two shared-memory stages (the prefetch of
// tile kt + 1 overwrites tile kt - 1, which every warp finished before the barrier of iteration
// kt). Shared memory: sQ [R, DK] | sK [2][64, DK] | sV [2][64, DV] elem.
constexpr int kFaStages = 2;
// FlashAttention-2's 32 rows per warp: measured 32.6 ms for the branch at T = 64k against 37.2 ms
// with 16 rows per warp (MT = 1, 188 registers and no spill instead of 255 and a 36-byte spill).
constexpr int kFaMT = 2;

template <class T, int DK, int DV, int MT>
__global__ void __launch_bounds__(256, 1) cmp_attn_mma_kernel(FwdParams p, TileMap tm) {
  extern __shared__ __align__(16) unsigned char smem[];
  constexpr int WR = 16 * MT;
  const int nw = blockDim.x / 32, R = WR * nw, G = p.G, BT = R / G;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  T* sQ = reinterpret_cast<T*>(smem);
  T* sK = sQ + R * DK;
  T* sV = sK + kFaStages * kKeys * DK;

  const int64_t x = tm.total - 1 - blockIdx.x;  // longest tiles first
  const int g = blockIdx.y;
  const int b = find_seq(tm.cu_tiles, p.B, x);
  const int t0 = int(x - tm.cu_tiles[b]) * BT;
  const int64_t row0 = p.cu_seqlens[b], cmp0 = p.cu_cmp[b];
  const int T_b = int(p.cu_seqlens[b + 1] - row0);
  const int t_last = min(t0 + BT, T_b) - 1;
  const int nv_max = cmp_visible(t_last, p.cmp_len, p.cmp_stride);
  const int ntiles = (nv_max + kKeys - 1) / kKeys;
  const int Hkv = p.Hkv;

  const T* q = static_cast<const T*>(p.q);
  const T* kc = static_cast<const T*>(p.kc);
  const T* vc = static_cast<const T*>(p.vc);
  auto load_kv = [&](int kt) {  // only for kt < ntiles: row 0 of the tile is a real key
    const int c0 = kt * kKeys, st = kt % kFaStages;
    load_rows_async<DK>(sK + st * kKeys * DK, kKeys, kc + ((cmp0 + c0) * Hkv + g) * DK, int64_t(Hkv) * DK,
                        nv_max - c0, tid, int(blockDim.x));
    load_rows_async<DV>(sV + st * kKeys * DV, kKeys, vc + ((cmp0 + c0) * Hkv + g) * DV, int64_t(Hkv) * DV,
                        nv_max - c0, tid, int(blockDim.x));
  };
  load_tile_async<DK>(
      sQ, R,
      [&](int r) -> const T* {
        const int t = t0 + r / G;
        return t < T_b ? q + ((row0 + t) * p.Hq + g * G + r % G) * DK : nullptr;
      },
      q, tid, int(blockDim.x));
  if (ntiles > 0) load_kv(0);
  cp_async_commit();

  // Rows of tile m: A = WR warp + 16 m + lane / 4 (position t0 + A / G, head A % G), B = A + 8.
  auto row_t = [&](int m, int b8) { return t0 + (WR * warp + 16 * m + (lane >> 2) + b8) / G; };
  int nvA[MT], nvB[MT];
  int nv_w = 0, nv_min = INT_MAX;  // keys some / every row of the warp sees
#pragma unroll
  for (int m = 0; m < MT; ++m) {
    const int tA = row_t(m, 0), tB = row_t(m, 8);
    nvA[m] = tA < T_b ? cmp_visible(tA, p.cmp_len, p.cmp_stride) : 0;
    nvB[m] = tB < T_b ? cmp_visible(tB, p.cmp_len, p.cmp_stride) : 0;
    nv_w = max(nv_w, max(nvA[m], nvB[m]));
    nv_min = min(nv_min, min(nvA[m], nvB[m]));
  }
  for (int o = 16; o > 0; o /= 2) {
    nv_w = max(nv_w, __shfl_xor_sync(0xffffffffu, nv_w, o));
    nv_min = min(nv_min, __shfl_xor_sync(0xffffffffu, nv_min, o));
  }
  const float sl2 = p.scale * kLog2e;
  float mA[MT], mB[MT], lA[MT], lB[MT];
  float oacc[MT][DV / 8][4];
#pragma unroll
  for (int m = 0; m < MT; ++m) {
    mA[m] = mB[m] = -INFINITY, lA[m] = lB[m] = 0;
#pragma unroll
    for (int nd = 0; nd < DV / 8; ++nd) oacc[m][nd][0] = oacc[m][nd][1] = oacc[m][nd][2] = oacc[m][nd][3] = 0;
  }

  for (int kt = 0; kt < ntiles; ++kt) {
    cp_async_wait<0>();
    __syncthreads();  // tile kt (and Q) landed for every thread; every warp is done with tile kt - 1
    if (kt + 1 < ntiles) load_kv(kt + 1);  // into the buffer of tile kt - 1
    cp_async_commit();
    if (kt * kKeys >= nv_w) continue;
    float s[MT][8][4];
    qk_tile_mt<T, DK, kKeys, MT>(s, sQ, WR * warp, sK + (kt % kFaStages) * kKeys * DK, lane);
    const bool full = (kt + 1) * kKeys <= nv_min;
#pragma unroll
    for (int m = 0; m < MT; ++m) {
      float2 al;
      if (full) {
        al = softmax_step_full(s[m], sl2, mA[m], mB[m], lA[m], lB[m]);
      } else {
#pragma unroll
        for (int nt = 0; nt < 8; ++nt)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int ci = kt * kKeys + nt * 8 + 2 * (lane & 3) + e;
            s[m][nt][e] = ci < nvA[m] ? s[m][nt][e] * sl2 : -INFINITY;
            s[m][nt][2 + e] = ci < nvB[m] ? s[m][nt][2 + e] * sl2 : -INFINITY;
          }
        al = softmax_step_masked(s[m], mA[m], mB[m], lA[m], lB[m]);
      }
      // Once the running maxima settle the factors are exactly 1: skip the multiplies then.
      if (__any_sync(0xffffffffu, al.x != 1.0f || al.y != 1.0f)) rescale<DV>(oacc[m], al);
    }
    pv_tile_mt<T, DV, kKeys, MT>(oacc, s, sV + (kt % kFaStages) * kKeys * DV, lane);
  }
  cp_async_wait<0>();  // no copy outlives the kernel (ntiles = 0: Q was never waited for)

#pragma unroll
  for (int m = 0; m < MT; ++m) {
    quad_sum(lA[m], lB[m]);
    const float lseA = lA[m] > 0 ? mA[m] + log2f(lA[m]) : -INFINITY;  // log2 domain; -inf: no visible key
    const float lseB = lB[m] > 0 ? mB[m] + log2f(lB[m]) : -INFINITY;
    const float iA = lA[m] > 0 ? 1.0f / lA[m] : 0.0f, iB = lB[m] > 0 ? 1.0f / lB[m] : 0.0f;
    const int rA = WR * warp + 16 * m + (lane >> 2), tA = row_t(m, 0), tB = row_t(m, 8);
    const int hA = g * G + rA % G, hB = g * G + (rA + 8) % G;
    const bool okA = tA < T_b, okB = tB < T_b;
    store_rows<T, DV>(static_cast<T*>(p.o_cmp), ((row0 + tA) * p.Hq + hA) * DV, ((row0 + tB) * p.Hq + hB) * DV, okA,
                     okB, oacc[m], iA, iB, lane);
    if ((lane & 3) == 0) {
      if (okA) p.lse_cmp[(row0 + tA) * p.Hq + hA] = lseA * kLn2;
      if (okB) p.lse_cmp[(row0 + tB) * p.Hq + hB] = lseB * kLn2;
    }
  }
}
template <class T>
void launch_fp32(const FwdParams& p, cudaStream_t s) {
  const int nw = p.G < 4 ? p.G : 4;
  const size_t smem = cmp_attn_fp32_smem(p, nw);
  NSA_CUDA_CHECK(cudaFuncSetAttribute(cmp_attn_fp32_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
  cmp_attn_fp32_kernel<T><<<dim3(unsigned(p.N), unsigned(p.Hkv)), 32 * nw, smem, s>>>(p);
  NSA_CUDA_CHECK_LAUNCH("cmp_attn_fp32_kernel");
}
template <class T>
void launch_mma(const FwdParams& p, const TileMap& tm, int nwarps, cudaStream_t s) {
  const size_t smem = cmp_attn_mma_smem(p, nwarps);
  const bool ok = dispatch_dims(p.dk, p.dv, [&](auto DK, auto DV) {
    constexpr int A = decltype(DK)::value, B = decltype(DV)::value;
    auto fa = cmp_attn_mma_kernel<T, A, B, kFaMT>;
    NSA_CUDA_CHECK(cudaFuncSetAttribute(fa, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
    fa<<<dim3(unsigned(tm.total), unsigned(p.Hkv)), 32 * nwarps, smem, s>>>(p, tm);
    NSA_CUDA_CHECK_LAUNCH("cmp_attn_mma_kernel");
  });
  if (!ok) throw ConfigError(cat("cmp_attn mma: head dims dk = ", p.dk, ", dv = ", p.dv, " are not compiled"));
}

}  // namespace

size_t cmp_attn_fp32_smem(const FwdParams& p, int nwarps) { return size_t(nwarps + 1) * p.NB * sizeof(float); }

size_t cmp_attn_mma_smem(const FwdParams& p, int nwarps) {
  return (size_t(16 * kFaMT * nwarps) * p.dk + size_t(kFaStages) * kKeys * (p.dk + p.dv)) * 2;
}

void cmp_attn_mma(Precision prec, const FwdParams& p, const TileMap& tm, int nwarps, cudaStream_t s) {
  if (tm.total == 0) return;
  for_mma_precision(prec, "cmp_attn mma", [&](auto t) { launch_mma<decltype(t)>(p, tm, nwarps, s); });
}

void cmp_attn_fp32(Precision prec, const FwdParams& p, cudaStream_t s) {
  if (p.N == 0) return;
  for_precision(prec, [&](auto t) { launch_fp32<decltype(t)>(p, s); });
}

}  // namespace nsa::cuda
