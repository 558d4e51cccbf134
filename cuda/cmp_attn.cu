// The compression branch's attention (Eq. 7: softmax over the visible compressed keys) fused with
// the selection scores (Eq. 8-10) and the top-n (Eq. 11). CUDA twin of the compression part of
// reference/forward.cpp's nsa_tile, overlap_map and select_blocks.
//
// The scores need normalised probabilities p = exp(s q.k - lse) summed over the group's heads, so
// both versions make two passes over the compressed keys: the first finds each row's lse, the
// second forms p exactly once, uses it for O = p V and maps it onto the selection blocks (Eq. 9)
// in shared memory. Neither the [T, Nc] probabilities nor (unless asked) the [T, NB] block scores
// are written to device memory.
#include <climits>

#include "check.hpp"
#include "attn_tile.cuh"
#include "device.cuh"
#include "kernels.hpp"
#include "select.cuh"

namespace nsa::cuda {

namespace {

using namespace dev;

// ============================== v0: fp32 CUDA cores ==============================
// One CTA per (token, KV group); warp w handles heads w, w + nwarps, ... of the group, one key at
// a time (lanes split the head dims). Shared memory: per-warp mapped probabilities [nwarps][NB],
// then the group scores [NB].
template <class T>
__global__ void cmp_attn_v0_kernel(FwdParams p) {
  extern __shared__ float sm[];
  const int64_t row = blockIdx.x;
  const int g = blockIdx.y;
  const int b = find_seq(p.cu_seqlens, p.B, row);
  const int t = int(row - p.cu_seqlens[b]);
  const int64_t cmp0 = p.cu_cmp[b];
  const int nw = blockDim.x / 32, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int nv = cmp_visible(t, p.l, p.d), valid = slc_valid(t, p.ls);
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
        for (int j = i * p.d / p.ls; j <= (i * p.d + p.l - 1) / p.ls; ++j)
          pw[j] += pr * overlap_weight(i, j, p.l, p.d, p.ls);
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
  if (threadIdx.x == 0) select_serial(P, t, p, p.block_idx + (row * p.Hkv + g) * p.n);
}

// ============================== mma: tensor cores (mma.sync) ==============================
// Compressed keys stream through shared memory in tiles of 64.
constexpr int kKeys = 64;

// Eq. 10 before Eq. 9 (both are sums): column sums of p over the G rows of each position, into
// sCs[position * stride + key]. Rows lane / 4 and lane / 4 + 8 of the warp belong to positions posA, posB;
// the G rows of one position are the lanes whose lane / 4 differ in the low log2(G) bits
// (G = 16: all of them, both rows). G <= 16.
__device__ __forceinline__ void column_sums(const float (&s)[8][4], float* sCs, int stride, int posA, int posB, int G,
                                            int lane) {
#pragma unroll
  for (int nt = 0; nt < 8; ++nt)
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const int col = nt * 8 + 2 * (lane & 3) + e;
      float a = s[nt][e], c = s[nt][2 + e];
      if (G == 16) {
        a += c;
        a += __shfl_xor_sync(0xffffffffu, a, 4);
        a += __shfl_xor_sync(0xffffffffu, a, 8);
        a += __shfl_xor_sync(0xffffffffu, a, 16);
        if (lane < 4) sCs[posA * stride + col] = a;
      } else {
        for (int o = 4; o < 4 * G; o *= 2) {
          a += __shfl_xor_sync(0xffffffffu, a, o);
          c += __shfl_xor_sync(0xffffffffu, c, o);
        }
        if ((lane >> 2) % G == 0) {
          sCs[posA * stride + col] = a;
          sCs[posB * stride + col] = c;
        }
      }
    }
}

// Shared-memory stages of the topn (score) kernel's key tiles.
constexpr int kScoreStages = 3;

// ============================== v4: the branch in two kernels ==============================
// v3 makes two passes over the compressed keys in one kernel, so its 8 warps hold Q, O and the
// scores at once (234 registers, 2 warps per scheduler) and each key tile costs QK twice, PV once
// and the score work, at the latency of 2 warps. v4 splits the branch the way the public NSA
// kernels do:
//   1. cmp_fa_v4: FlashAttention-2 over the visible compressed keys in one pass (online softmax):
//      O_cmp and lse, no score work;
//   2. cmp_score_v4: with lse known, p = exp(s q.k - lse) is one pass: q.k once more, p summed over
//      the group's heads (Eq. 10) and mapped onto the selection blocks (Eq. 9), then the top-n
//      (Eq. 11). It holds neither V nor O: half the registers of v3 and two CTAs per SM, Q straight
//      from global memory into registers, K alone through shared memory. For the paper's l = 32,
//      d = 16, l' = 64 the mapping is a fixed 5-term stencil per block (kPaperMap); the top-n
//      filters candidates before its rounds (select_warp_filtered).
// cmp_fa_v4: MT m16 tiles per warp (WR = 16 MT rows), nwarps warps, two shared-memory stages
// (the prefetch of tile kt + 1 overwrites tile kt - 1, which every warp finished before the
// barrier of iteration kt). Shared memory: sQ [R, DK] | sK [2][64, DK] | sV [2][64, DV] elem.
constexpr int kFaStages = 2;
// FlashAttention-2's 32 rows per warp: measured 32.6 ms for the branch at T = 64k against 37.2 ms
// with 16 rows per warp (MT = 1, 188 registers and no spill instead of 255 and a 36-byte spill).
constexpr int kFaMT = 2;

template <class T, int DK, int DV, int MT>
__global__ void __launch_bounds__(256, 1) cmp_fa_v4_kernel(FwdParams p, TileMap tm) {
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
  const int nv_max = cmp_visible(t_last, p.l, p.d);
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
    nvA[m] = tA < T_b ? cmp_visible(tA, p.l, p.d) : 0;
    nvB[m] = tB < T_b ? cmp_visible(tB, p.l, p.d) : 0;
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

// cmp_score_v4's shared memory (bytes): sK [3][64, DK] elem | sCs [BT][kCs] f32: slot 0 the
// previous tile's last column sum (the stencil's carry), slots 1..64 this tile's | sBlk [BT][NB]
// f32 group scores | sList [BT][n] int top-n | sCand [nwarps][kCand] int top-n candidates.
constexpr int kCs = kKeys + 1;
constexpr int kCand = 64;
struct ScoreSmem {
  size_t k, cs, blk, list, cand, total;
  __host__ __device__ ScoreSmem(int BT, int nwarps, int DK, int NB, int n, int esize) {
    k = 0;
    cs = k + size_t(kScoreStages) * kKeys * DK * esize;
    blk = cs + (size_t(BT) * kCs * 4 + 15) / 16 * 16;
    list = blk + size_t(BT) * NB * 4;
    cand = list + size_t(BT) * n * 4;
    total = cand + size_t(nwarps) * kCand * 4;
  }
};

// The per-tile work of cmp_score_v4: for each of the warp's positions, the sum over its G heads
// of p = exp2(s q.k log2e - lse) for every key of the tile, into sCs[pos * kCs + 1 + key]
// (Eq. 10). v3's layout: the 16 (position, head) rows on the MMA's M dimension, the keys on N, the
// head sum by column_sums' shuffles across the rows. (Measured against the transposed layout,
// S^T = K Q^T with the heads on N and the head sum in-thread plus two quad shuffles: that was
// 1.1 ms slower at T = 64k, 32.6 vs 31.5 ms for the branch.)
template <class T, int DK>
struct ScoreRowsOnM {
  uint32_t qa[DK / 16][4];
  float lseA, lseB;  // log2 domain; -inf where the row sees no key (it is masked)
  int nvA, nvB, posA, posB;
  __device__ __forceinline__ ScoreRowsOnM(const FwdParams& p, int64_t row0, int t0, int T_b, int g, int warp,
                                          int lane) {
    const int G = p.G, rA = 16 * warp + (lane >> 2), rB = rA + 8;
    posA = rA / G, posB = rB / G;
    const int tA = t0 + posA, tB = t0 + posB;
    const bool okA = tA < T_b, okB = tB < T_b;
    const int hA = g * G + rA % G, hB = g * G + rB % G;
    nvA = okA ? cmp_visible(tA, p.l, p.d) : 0, nvB = okB ? cmp_visible(tB, p.l, p.d) : 0;
    lseA = okA ? p.lse_cmp[(row0 + tA) * p.Hq + hA] * kLog2e : -INFINITY;
    lseB = okB ? p.lse_cmp[(row0 + tB) * p.Hq + hB] * kLog2e : -INFINITY;
    const T* q = static_cast<const T*>(p.q);
    load_q_global<DK>(qa, okA ? q + ((row0 + tA) * p.Hq + hA) * DK : q, okB ? q + ((row0 + tB) * p.Hq + hB) * DK : q,
                      okA, okB, lane);
  }
  __device__ __forceinline__ int nv_lo() const { return min(nvA, nvB); }
  __device__ __forceinline__ int nv_hi() const { return max(nvA, nvB); }
  // Keys i0 .. i0 + 63 of the tile sKt; full: every row sees them all.
  __device__ __forceinline__ void tile(const T* sKt, int i0, bool full, float sl2, float* sCs, int G, int lane) {
    float s[8][4];
    qk_tile<T, DK, kKeys>(s, qa, sKt, lane);
    if (full) {
#pragma unroll
      for (int nt = 0; nt < 8; ++nt)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          s[nt][e] = fast_exp2(fmaf(s[nt][e], sl2, -lseA));
          s[nt][2 + e] = fast_exp2(fmaf(s[nt][2 + e], sl2, -lseB));
        }
    } else {
#pragma unroll
      for (int nt = 0; nt < 8; ++nt)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int ci = i0 + nt * 8 + 2 * (lane & 3) + e;
          s[nt][e] = ci < nvA ? exp2f(s[nt][e] * sl2 - lseA) : 0.0f;
          s[nt][2 + e] = ci < nvB ? exp2f(s[nt][2 + e] * sl2 - lseB) : 0.0f;
        }
    }
    column_sums(s, sCs + 1, kCs, posA, posB, G, lane);
  }
};

template <class T, int DK, bool kPaperMap>
__global__ void __launch_bounds__(256, 2) cmp_score_v4_kernel(FwdParams p, TileMap tm) {
  extern __shared__ __align__(16) unsigned char smem[];
  const int nw = blockDim.x / 32, R = 16 * nw, G = p.G, BT = R / G;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const ScoreSmem L(BT, nw, DK, p.NB, p.n, sizeof(T));
  T* sK = reinterpret_cast<T*>(smem + L.k);
  float* sCs = reinterpret_cast<float*>(smem + L.cs);
  float* sBlk = reinterpret_cast<float*>(smem + L.blk);
  int* sList = reinterpret_cast<int*>(smem + L.list);
  int* sCand = reinterpret_cast<int*>(smem + L.cand) + warp * kCand;

  const int64_t x = tm.total - 1 - blockIdx.x;  // longest tiles first
  const int g = blockIdx.y;
  const int b = find_seq(tm.cu_tiles, p.B, x);
  const int t0 = int(x - tm.cu_tiles[b]) * BT;
  const int64_t row0 = p.cu_seqlens[b], cmp0 = p.cu_cmp[b];
  const int T_b = int(p.cu_seqlens[b + 1] - row0);
  const int t_last = min(t0 + BT, T_b) - 1;
  const int nv_max = cmp_visible(t_last, p.l, p.d);
  const int nb_tile = slc_valid(t_last, p.ls);
  const int ntiles = (nv_max + kKeys - 1) / kKeys;
  const int Hkv = p.Hkv;
  const T* kc = static_cast<const T*>(p.kc);
  auto load_k = [&](int kt) {  // only for kt < ntiles
    load_rows_async<DK>(sK + (kt % kScoreStages) * kKeys * DK, kKeys, kc + ((cmp0 + kt * kKeys) * Hkv + g) * DK,
                        int64_t(Hkv) * DK, nv_max - kt * kKeys, tid, int(blockDim.x));
  };
  if (ntiles > 0) load_k(0);
  cp_async_commit();
  if (ntiles > 1) load_k(1);
  cp_async_commit();

  // The warp's positions [wp0, wp0 + wpn) of the tile; only this warp touches their scores.
  const int wp0 = 16 * warp / G, wpn = 16 / G;
  for (int e = lane; e < wpn * nb_tile; e += 32) sBlk[(wp0 + e / nb_tile) * p.NB + e % nb_tile] = 0;
  for (int e = lane; e < wpn; e += 32) sCs[(wp0 + e) * kCs] = 0;  // no key before the first tile

  // Q in registers, kernel 1's lse (back in the log2 domain) and the visible keys of the thread's pairs.
  ScoreRowsOnM<T, DK> lay(p, row0, t0, T_b, g, warp, lane);
  int nv_w = lay.nv_hi(), nv_min = lay.nv_lo();  // keys some / every pair of the warp sees
  for (int o = 16; o > 0; o /= 2) {
    nv_w = max(nv_w, __shfl_xor_sync(0xffffffffu, nv_w, o));
    nv_min = min(nv_min, __shfl_xor_sync(0xffffffffu, nv_min, o));
  }
  const float sl2 = p.scale * kLog2e;

  for (int kt = 0; kt < ntiles; ++kt) {
    cp_async_wait<1>();
    __syncthreads();  // tile kt landed for every thread; every warp is done with tile kt - 1
    if (kt + 2 < ntiles) load_k(kt + 2);
    cp_async_commit();
    if (kt * kKeys >= nv_w) continue;  // p = 0 for all the warp's pairs
    const int i0 = kt * kKeys;
    // Eq. 10, into slots 1..64 of the warp's positions; full: no masks (every pair sees every key).
    lay.tile(sK + (kt % kScoreStages) * kKeys * DK, i0, (kt + 1) * kKeys <= nv_min, sl2, sCs, G, lane);
    __syncwarp();
    if constexpr (kPaperMap) {
      // Eq. 9 for l = 32, d = 16, l' = 64: block j gathers compressed blocks i = 4j - 1 .. 4j + 3
      // with the weights |[16 i, 16 i + 32) ∩ [64 j, 64 j + 64)| / 16 = 1, 2, 2, 2, 1. The tile
      // holds i = 64 kt .. 64 kt + 63, so it completes blocks 16 kt .. 16 kt + 15 with the carried
      // i = 64 kt - 1 (slot 0); every block is the same 5-term sum, so exactly equal inputs give
      // exactly equal scores (the tie rule relies on it).
      for (int e = lane; e < wpn * 16; e += 32) {
        const int pos = wp0 + e / 16, jj = e % 16, j = kt * 16 + jj;
        const float* c = sCs + pos * kCs + 4 * jj;
        const float sc = c[0] + 2.0f * c[1] + 2.0f * c[2] + 2.0f * c[3] + c[4];
        if (j < nb_tile) sBlk[pos * p.NB + j] = sc;
      }
      __syncwarp();
      for (int e = lane; e < wpn; e += 32) sCs[(wp0 + e) * kCs] = sCs[(wp0 + e) * kCs + kKeys];  // the carry
    } else {
      // Eq. 9, general overlaps: v2's mapping, ascending i onto the running score.
      const float inv_d = 1.0f / float(p.d);
      const int iend = min(i0 + kKeys, nv_w);
      const int jlo = i0 * p.d / p.ls, jhi = ((iend - 1) * p.d + p.l - 1) / p.ls, nj = jhi - jlo + 1;
      for (int e = lane; e < wpn * nj; e += 32) {
        const int pos = wp0 + e / nj, j = jlo + e % nj;
        const int lo_num = j * p.ls - p.l + 1;
        const int ia = max(i0, lo_num > 0 ? (lo_num + p.d - 1) / p.d : 0);
        const int ib = min(iend - 1, ((j + 1) * p.ls - 1) / p.d);
        float acc = sBlk[pos * p.NB + j];
        for (int i = ia; i <= ib; ++i) {
          const int ov = min(i * p.d + p.l, (j + 1) * p.ls) - max(i * p.d, j * p.ls);
          acc += sCs[pos * kCs + 1 + (i - i0)] * (float(ov) * inv_d);
        }
        sBlk[pos * p.NB + j] = acc;
      }
    }
    __syncwarp();  // the next tile's column sums overwrite sCs
  }
  if constexpr (kPaperMap) {
    // The block after the warp's last tile has one nonzero term, the carried i (itself 0 where
    // that key is not visible): the 5-term sum with four zeros, i.e. exactly that term. Later
    // blocks see no key and keep their 0.
    const int j = 16 * ((nv_w + kKeys - 1) / kKeys);
    for (int e = lane; e < wpn; e += 32)
      if (j < nb_tile) sBlk[(wp0 + e) * p.NB + j] = sCs[(wp0 + e) * kCs];
  }
  __syncwarp();  // the scores (and, with no tile at all, their zeros) are complete for every lane

  // ---- Eq. 11 for the warp's positions ----
  for (int pos = wp0; pos < wp0 + wpn; ++pos) {
    const int t = t0 + pos;
    if (t >= T_b) break;
    const float* P = sBlk + pos * p.NB;
    const int64_t gr = (row0 + t) * p.Hkv + g;
    if (p.block_scores) {
      const int valid = slc_valid(t, p.ls);
      for (int j = lane; j < p.NB; j += 32) p.block_scores[gr * p.NB + j] = j < valid ? P[j] : 0.0f;
    }
    select_warp_filtered(P, t, p, sList + pos * p.n, sCand, kCand, p.block_idx + gr * p.n, lane);
  }
}

template <class T>
void launch_v0(const FwdParams& p, cudaStream_t s) {
  const int nw = p.G < 4 ? p.G : 4;
  const size_t smem = cmp_attn_v0_smem(p, nw);
  NSA_CUDA_CHECK(cudaFuncSetAttribute(cmp_attn_v0_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
  cmp_attn_v0_kernel<T><<<dim3(unsigned(p.N), unsigned(p.Hkv)), 32 * nw, smem, s>>>(p);
  NSA_CUDA_CHECK_LAUNCH("cmp_attn_v0_kernel");
}

template <class T>
void launch_v4(const FwdParams& p, const TileMap& tm_fa, int fa_warps, const TileMap& tm_score, int score_warps,
               cudaStream_t s) {
  const size_t smem_fa = cmp_fa_v4_smem(p, fa_warps), smem_sc = cmp_score_v4_smem(p, score_warps);
  const bool paper_map = p.l == 32 && p.d == 16 && p.ls == 64;
  const bool ok = dispatch_dims(p.dk, p.dv, [&](auto DK, auto DV) {
    constexpr int A = decltype(DK)::value, B = decltype(DV)::value;
    auto fa = cmp_fa_v4_kernel<T, A, B, kFaMT>;
    NSA_CUDA_CHECK(cudaFuncSetAttribute(fa, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem_fa)));
    fa<<<dim3(unsigned(tm_fa.total), unsigned(p.Hkv)), 32 * fa_warps, smem_fa, s>>>(p, tm_fa);
    NSA_CUDA_CHECK_LAUNCH("cmp_fa_v4_kernel");
    auto sc = paper_map ? cmp_score_v4_kernel<T, A, true> : cmp_score_v4_kernel<T, A, false>;
    NSA_CUDA_CHECK(cudaFuncSetAttribute(sc, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem_sc)));
    sc<<<dim3(unsigned(tm_score.total), unsigned(p.Hkv)), 32 * score_warps, smem_sc, s>>>(p, tm_score);
    NSA_CUDA_CHECK_LAUNCH("cmp_score_v4_kernel");
  });
  if (!ok) throw ConfigError(cat("cmp_attn v4: head dims dk = ", p.dk, ", dv = ", p.dv, " are not compiled"));
}

}  // namespace

size_t cmp_attn_v0_smem(const FwdParams& p, int nwarps) { return size_t(nwarps + 1) * p.NB * sizeof(float); }

size_t cmp_fa_v4_smem(const FwdParams& p, int nwarps) {
  return (size_t(16 * kFaMT * nwarps) * p.dk + size_t(kFaStages) * kKeys * (p.dk + p.dv)) * 2;
}

size_t cmp_score_v4_smem(const FwdParams& p, int nwarps) {
  return ScoreSmem(16 * nwarps / p.G, nwarps, p.dk, p.NB, p.n, 2).total;
}

void cmp_attn_v4(Precision prec, const FwdParams& p, const TileMap& tm_fa, int fa_warps, const TileMap& tm_score,
                 int score_warps, cudaStream_t s) {
  if (tm_fa.total == 0) return;
  if (prec == Precision::BF16) launch_v4<__nv_bfloat16>(p, tm_fa, fa_warps, tm_score, score_warps, s);
  else if (prec == Precision::FP16) launch_v4<__half>(p, tm_fa, fa_warps, tm_score, score_warps, s);
  else throw ConfigError("cmp_attn v4 needs bf16 or fp16 operands (fp32 runs kernel v0)");
}

void cmp_attn_v0(Precision prec, const FwdParams& p, cudaStream_t s) {
  if (p.N == 0) return;
  switch (prec) {
    case Precision::BF16: launch_v0<__nv_bfloat16>(p, s); break;
    case Precision::FP16: launch_v0<__half>(p, s); break;
    case Precision::FP32: launch_v0<float>(p, s); break;
  }
}

}  // namespace nsa::cuda
