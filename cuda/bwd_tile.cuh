// Kernel templates of the backward pass (docs/spec.md 7), shared by the branches and specialised
// in cmp_attn_bwd.cu, slc_attn_bwd.cu and win_attn_bwd.cu, which differ only in the keys a query sees.
//
// Per branch c, with the forward's lse and branch output kept (no softmax is redone):
//   P = exp(s q.k - lse),  dP = dO_c . v,  dS = P (dP - D),  D = dO_c . O_c,  dO_c = g_c dL/do,
//   dq += s dS k,   dk += s dS q,   dv += P dO_c   (reference/backward.cpp)
// dO_c is never stored: a kernel reads dL/do and the gate g_c of the row, so dP = g_c (dL/do . v)
// and P dO_c = (g_c P) dL/do.
//
// fp32 (CUDA cores, the obviously-right version and the fp32 debug mode): dq by one warp per
// (token, head) over the keys the query sees; dK/dV by one CTA per (key, group) over the queries
// that see the key, its warps splitting the group's heads and summed in warp order. No atomics.
//
// mma (tensor cores, mma.sync m16n8k16, fp32 accumulation), FlashAttention-2's split:
//   dq_mma:   query-centric (cmp, win): 4 warps x 16 rows (position, head) against key tiles of 64,
//            double-buffered: S = Q K^T, dP = dO V^T, dS, dq += dS K;
//   dkdv_mma: key-centric (every branch): 4 warps x 16 keys (a tile of 64 keys) against the rows of
//            the queries that see them in tiles of 32, double-buffered: S^T = K Q^T, dP^T = V dO^T,
//            dS^T, dK += dS^T Q, dV += (g P)^T dO. The row sources are the branch's: the window's
//            w + 63 positions, a chunk of positions for the compressed keys, a segment of a
//            selection block's list of the positions that selected it.
// P and dS are rounded to the operand precision for their products, as the forward rounds P.
#pragma once

#include <climits>

#include "attn_tile.cuh"
#include "device.cuh"
#include "kernels.hpp"

namespace nsa::cuda::dev {

constexpr int kCmp = 0, kSlc = 1, kWin = 2;  // branch indices, the order of the gate tensor

// ============================== fp32: CUDA cores ==============================

// dq[row, h] (+)= s sum over the keys of branch kBr of dS k, one warp per head of the group; the
// compression branch runs first and writes, the others add (each element has one writer).
// Grid (N, Hkv); dk, dv <= 256 (8 elements per lane).
template <class T, int kBr>
__global__ void dq_fp32_kernel(FwdParams p, BwdParams bp) {
  const int64_t row = blockIdx.x;
  const int g = blockIdx.y;
  const int b = find_seq(p.cu_seqlens, p.B, row);
  const int64_t row0 = p.cu_seqlens[b];
  const int t = int(row - row0);
  const int nw = blockDim.x / 32, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t NHq = p.N * p.Hq;
  const float* lse_c = kBr == kCmp ? p.lse_cmp : kBr == kSlc ? p.lse_slc : p.lse_win;
  for (int hi = warp; hi < p.G; hi += nw) {
    const int64_t th = row * p.Hq + g * p.G + hi;
    const T* q = static_cast<const T*>(p.q) + th * p.dk;
    const T* dO = static_cast<const T*>(bp.dO) + th * p.dv;
    float qv[8], dov[8], acc[8];
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      const int c = lane + 32 * k;
      qv[k] = c < p.dk ? to_f(q[c]) : 0.0f;
      dov[k] = c < p.dv ? to_f(dO[c]) : 0.0f;
      acc[k] = 0;
    }
    const float lse = lse_c[th], D = bp.delta[kBr * NHq + th], gc = p.gates[th * 3 + kBr];
    auto key = [&](const T* k, const T* v) {
      float s = 0, dp = 0;
#pragma unroll
      for (int kk = 0; kk < 8; ++kk) {
        const int c = lane + 32 * kk;
        if (c < p.dk) s += qv[kk] * to_f(k[c]);
        if (c < p.dv) dp += dov[kk] * to_f(v[c]);
      }
      for (int o = 16; o > 0; o /= 2) {
        s += __shfl_xor_sync(0xffffffffu, s, o);
        dp += __shfl_xor_sync(0xffffffffu, dp, o);
      }
      const float ds = expf(s * p.scale - lse) * (gc * dp - D);
#pragma unroll
      for (int kk = 0; kk < 8; ++kk)
        if (lane + 32 * kk < p.dk) acc[kk] += ds * to_f(k[lane + 32 * kk]);
    };
    if constexpr (kBr == kCmp) {
      const int64_t cmp0 = p.cu_cmp[b];
      const T* kc = static_cast<const T*>(p.kc);
      const T* vc = static_cast<const T*>(p.vc);
      for (int i = 0; i < cmp_visible(t, p.cmp_len, p.cmp_stride); ++i)
        key(kc + ((cmp0 + i) * p.Hkv + g) * p.dk, vc + ((cmp0 + i) * p.Hkv + g) * p.dv);
    } else if constexpr (kBr == kSlc) {
      const T* K = static_cast<const T*>(p.k_slc);
      const T* V = static_cast<const T*>(p.v_slc);
      const int32_t* sel = p.block_idx + (row * p.Hkv + g) * p.slc_count;
      for (int m = 0; m < p.slc_count; ++m) {
        const int j = sel[m];
        if (j < 0) break;
        for (int u = j * p.slc_len; u < min((j + 1) * p.slc_len, t + 1); ++u)
          key(K + ((row0 + u) * p.Hkv + g) * p.dk, V + ((row0 + u) * p.Hkv + g) * p.dv);
      }
    } else {
      const T* K = static_cast<const T*>(p.k_win);
      const T* V = static_cast<const T*>(p.v_win);
      for (int u = win_start(t, p.window); u <= t; ++u)
        key(K + ((row0 + u) * p.Hkv + g) * p.dk, V + ((row0 + u) * p.Hkv + g) * p.dv);
    }
    float* dq = bp.dq + th * p.dk;
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      const int c = lane + 32 * k;
      if (c < p.dk) dq[c] = (kBr == kCmp ? 0.0f : dq[c]) + p.scale * acc[k];
    }
  }
}

// The list of the positions of sequence b that selected block j for group g: entries [e0, e1) of
// bp.list (slc_attn_bwd.cu builds it).
__device__ __forceinline__ void slc_list_range(const FwdParams& p, const BwdParams& bp, int b, int T_b, int g, int j,
                                               int& e0, int& e1) {
  const int NB_b = (T_b + p.slc_len - 1) / p.slc_len, nch = (T_b + bp.QS - 1) / bp.QS;
  const int64_t s0 = bp.cu_slots[b] + (int64_t(g) * NB_b + j) * nch;
  e0 = bp.slot_off[s0];
  e1 = bp.slot_off[s0 + nch];
}

// dK, dV of one key (a compressed row for kCmp, a token otherwise) and group: one CTA, its warps
// splitting the group's heads, each summing over the positions that see the key in order; the
// warps' sums are then added in warp order. Grid (keys, Hkv); shared memory nw x (dk + dv) floats.
template <class T, int kBr>
__global__ void dkdv_fp32_kernel(FwdParams p, BwdParams bp) {
  extern __shared__ float red[];
  const int64_t key = blockIdx.x;
  const int g = blockIdx.y;
  const int nw = blockDim.x / 32, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t NHq = p.N * p.Hq;
  const int b = find_seq(kBr == kCmp ? p.cu_cmp : p.cu_seqlens, p.B, key);
  const int64_t row0 = p.cu_seqlens[b];
  const int T_b = int(p.cu_seqlens[b + 1] - row0);
  const T* kp;
  const T* vp;
  float* out_k;
  float* out_v;
  int t_first, t_end, e0 = 0, e1 = 0;  // positions [t_first, t_end), or the list entries [e0, e1)
  int u = 0;
  if constexpr (kBr == kCmp) {
    const int i = int(key - p.cu_cmp[b]);
    kp = static_cast<const T*>(p.kc) + (key * p.Hkv + g) * p.dk;
    vp = static_cast<const T*>(p.vc) + (key * p.Hkv + g) * p.dv;
    out_k = bp.dkc + (key * p.Hkv + g) * p.dk;
    out_v = bp.dvc + (key * p.Hkv + g) * p.dv;
    t_first = i * p.cmp_stride + p.cmp_len - 1, t_end = T_b;  // the positions that see block i
  } else {
    u = int(key - row0);
    const T* K = static_cast<const T*>(kBr == kSlc ? p.k_slc : p.k_win);
    const T* V = static_cast<const T*>(kBr == kSlc ? p.v_slc : p.v_win);
    kp = K + (key * p.Hkv + g) * p.dk;
    vp = V + (key * p.Hkv + g) * p.dv;
    out_k = bp.dk[kBr] + (key * p.Hkv + g) * p.dk;
    out_v = bp.dv[kBr] + (key * p.Hkv + g) * p.dv;
    t_first = u, t_end = kBr == kWin ? min(T_b, u + p.window) : 0;
    if (kBr == kSlc) slc_list_range(p, bp, b, T_b, g, u / p.slc_len, e0, e1);
  }
  const float* lse_c = kBr == kCmp ? p.lse_cmp : kBr == kSlc ? p.lse_slc : p.lse_win;
  float kv[8], vv[8], ak[8], av[8];
#pragma unroll
  for (int k = 0; k < 8; ++k) {
    const int c = lane + 32 * k;
    kv[k] = c < p.dk ? to_f(kp[c]) : 0.0f;
    vv[k] = c < p.dv ? to_f(vp[c]) : 0.0f;
    ak[k] = av[k] = 0;
  }
  auto query = [&](int t) {
    for (int hi = warp; hi < p.G; hi += nw) {
      const int64_t th = (row0 + t) * p.Hq + g * p.G + hi;
      const T* q = static_cast<const T*>(p.q) + th * p.dk;
      const T* dO = static_cast<const T*>(bp.dO) + th * p.dv;
      float s = 0, dp = 0;
#pragma unroll
      for (int k = 0; k < 8; ++k) {
        const int c = lane + 32 * k;
        if (c < p.dk) s += kv[k] * to_f(q[c]);
        if (c < p.dv) dp += vv[k] * to_f(dO[c]);
      }
      for (int o = 16; o > 0; o /= 2) {
        s += __shfl_xor_sync(0xffffffffu, s, o);
        dp += __shfl_xor_sync(0xffffffffu, dp, o);
      }
      const float gc = p.gates[th * 3 + kBr];
      const float pr = expf(s * p.scale - lse_c[th]);
      const float ds = pr * (gc * dp - bp.delta[kBr * NHq + th]);
#pragma unroll
      for (int k = 0; k < 8; ++k) {
        const int c = lane + 32 * k;
        if (c < p.dk) ak[k] += ds * to_f(q[c]);
        if (c < p.dv) av[k] += pr * gc * to_f(dO[c]);
      }
    }
  };
  if constexpr (kBr == kSlc) {
    for (int e = e0; e < e1; ++e) {
      const int t = bp.list[e];
      if (t >= u) query(t);
    }
  } else {
    for (int t = t_first; t < t_end; ++t) query(t);
  }
  float* mine = red + warp * (p.dk + p.dv);
#pragma unroll
  for (int k = 0; k < 8; ++k) {
    const int c = lane + 32 * k;
    if (c < p.dk) mine[c] = ak[k];
    if (c < p.dv) mine[p.dk + c] = av[k];
  }
  __syncthreads();
  for (int c = threadIdx.x; c < p.dk + p.dv; c += blockDim.x) {
    float s = 0;
    for (int w = 0; w < nw; ++w) s += red[w * (p.dk + p.dv) + c];
    if (c < p.dk) out_k[c] = p.scale * s;
    else out_v[c - p.dk] = s;
  }
}

// ============================== mma: tensor cores ==============================
constexpr int kDqRows = 64;   // rows of a dq CTA: 4 warps x 16 (position, head) rows
constexpr int kBwdKeys = 64;  // keys per tile: of a dq step, of a key-centric CTA (4 warps x 16)
constexpr int kKcRows = 32;   // query rows per step of a key-centric CTA

// S = A B^T for the 16 rows of a swizzled [*, D] tile sA starting at row a0 (its A fragments read
// from shared memory per k step, not held in registers) and the KEYS rows of a swizzled [KEYS, D]
// tile sB: qk_tile with the warp's operand in shared memory.
template <class T, int D, int KEYS>
__device__ __forceinline__ void qk_tile_sA(float (&s)[KEYS / 8][4], const T* sA, int a0, const T* sB, int lane) {
  using Tile = SwizzledTile<D>;
#pragma unroll
  for (int nt = 0; nt < KEYS / 8; ++nt) s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0;
#pragma unroll
  for (int ks = 0; ks < D / 16; ++ks) {
    uint32_t a[4];
    ldmatrix_x4(a, sA + Tile::offset(a0 + (lane & 15), ks * 2 + (lane >> 4)));
#pragma unroll
    for (int np = 0; np < KEYS / 16; ++np) {
      uint32_t bk[4];
      ldmatrix_x4(bk, sB + Tile::offset(np * 16 + (lane & 7) + ((lane >> 4) << 3), ks * 2 + ((lane >> 3) & 1)));
      mma16816<T>(s[2 * np], a, bk[0], bk[1]);
      mma16816<T>(s[2 * np + 1], a, bk[2], bk[3]);
    }
  }
}

template <int N>
__device__ __forceinline__ void zero_acc(float (&a)[N][4]) {
#pragma unroll
  for (int i = 0; i < N; ++i) a[i][0] = a[i][1] = a[i][2] = a[i][3] = 0;
}

// Shared memory of dq_mma (bytes): sQ [64, DK] | sdO [64, DV] | sK [2][64, DK] | sV [2][64, DV].
__host__ __device__ constexpr size_t dq_mma_bytes(int dk, int dv) {
  return (size_t(kDqRows) * (dk + dv) + 2 * size_t(kBwdKeys) * (dk + dv)) * 2;
}

// Query-centric dq of the compression (kCmp) or window (kWin) branch: one CTA per (tile of
// 64 / G positions, group), key tiles of 64 over the keys any row of the tile sees. The
// compression branch runs first and writes dq, the window adds (after the selection).
template <class T, int DK, int DV, int kBr>
__global__ void __launch_bounds__(128) dq_mma_kernel(FwdParams p, BwdParams bp, TileMap tm) {
  static_assert(kBr == kCmp || kBr == kWin, "dq_mma covers the contiguous branches");
  extern __shared__ __align__(16) unsigned char smem[];
  const int G = p.G, BT = kDqRows / G;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  T* sQ = reinterpret_cast<T*>(smem);
  T* sdO = sQ + kDqRows * DK;
  T* sK = sdO + kDqRows * DV;
  T* sV = sK + 2 * kBwdKeys * DK;

  // Compression: longest tiles first (later positions see more compressed keys).
  const int64_t x = kBr == kCmp ? tm.total - 1 - blockIdx.x : blockIdx.x;
  const int g = blockIdx.y;
  const int b = find_seq(tm.cu_tiles, p.B, x);
  const int t0 = int(x - tm.cu_tiles[b]) * BT;
  const int64_t row0 = p.cu_seqlens[b];
  const int T_b = int(p.cu_seqlens[b + 1] - row0);
  const int t_last = min(t0 + BT, T_b) - 1;
  const int Hkv = p.Hkv;
  // Keys k_begin + [0, nkeys): compressed rows of the sequence, or tokens of the window band.
  const int k_begin = kBr == kCmp ? 0 : win_start(t0, p.window);
  const int nkeys = kBr == kCmp ? cmp_visible(t_last, p.cmp_len, p.cmp_stride) : t_last + 1 - k_begin;
  const int ntiles = (nkeys + kBwdKeys - 1) / kBwdKeys;
  const T* Kb = kBr == kCmp ? static_cast<const T*>(p.kc) + (p.cu_cmp[b] * Hkv + g) * DK
                            : static_cast<const T*>(p.k_win) + (row0 * Hkv + g) * DK;
  const T* Vb = kBr == kCmp ? static_cast<const T*>(p.vc) + (p.cu_cmp[b] * Hkv + g) * DV
                            : static_cast<const T*>(p.v_win) + (row0 * Hkv + g) * DV;
  const T* q = static_cast<const T*>(p.q);
  const T* dO = static_cast<const T*>(bp.dO);
  auto row_src = [&](const T* base, int D, int r) -> const T* {
    const int t = t0 + r / G;
    return t < T_b ? base + ((row0 + t) * p.Hq + g * G + r % G) * D : nullptr;
  };
  load_tile_async<DK>(sQ, kDqRows, [&](int r) { return row_src(q, DK, r); }, q, tid, 128);
  load_tile_async<DV>(sdO, kDqRows, [&](int r) { return row_src(dO, DV, r); }, dO, tid, 128);
  auto load_kv = [&](int kt) {
    const int k0 = k_begin + kt * kBwdKeys;
    load_rows_async<DK>(sK + (kt & 1) * kBwdKeys * DK, kBwdKeys, Kb + int64_t(k0) * Hkv * DK, int64_t(Hkv) * DK,
                        k_begin + nkeys - k0, tid, 128);
    load_rows_async<DV>(sV + (kt & 1) * kBwdKeys * DV, kBwdKeys, Vb + int64_t(k0) * Hkv * DV, int64_t(Hkv) * DV,
                        k_begin + nkeys - k0, tid, 128);
  };
  if (ntiles > 0) load_kv(0);
  cp_async_commit();

  // This thread's rows A = 16 warp + lane / 4 and B = A + 8: (position r / G, head r % G).
  const int rA = 16 * warp + (lane >> 2), rB = rA + 8;
  const int tA = t0 + rA / G, tB = t0 + rB / G;
  const bool okA = tA < T_b, okB = tB < T_b;
  const int64_t thA = (row0 + tA) * p.Hq + g * G + rA % G, thB = (row0 + tB) * p.Hq + g * G + rB % G;
  const float* lse_c = kBr == kCmp ? p.lse_cmp : p.lse_win;
  const int64_t NHq = p.N * p.Hq;
  // lse in the log2 domain; rows that see no key (lse = -inf) are masked below.
  const float lA = okA && isfinite(lse_c[thA]) ? lse_c[thA] * kLog2e : 0.0f;
  const float lB = okB && isfinite(lse_c[thB]) ? lse_c[thB] * kLog2e : 0.0f;
  const float DA = okA ? bp.delta[kBr * NHq + thA] : 0.0f, DB = okB ? bp.delta[kBr * NHq + thB] : 0.0f;
  const float gA = okA ? p.gates[thA * 3 + kBr] : 0.0f, gB = okB ? p.gates[thB * 3 + kBr] : 0.0f;
  // The keys a row sees: [loX, hiX] (compression: [0, visible - 1]).
  const int loA = kBr == kCmp ? 0 : win_start(tA, p.window), loB = kBr == kCmp ? 0 : win_start(tB, p.window);
  const int hiA = !okA ? -1 : kBr == kCmp ? cmp_visible(tA, p.cmp_len, p.cmp_stride) - 1 : tA;
  const int hiB = !okB ? -1 : kBr == kCmp ? cmp_visible(tB, p.cmp_len, p.cmp_stride) - 1 : tB;
  const float sl2 = p.scale * kLog2e;
  float dq[DK / 8][4];
  zero_acc(dq);

  for (int kt = 0; kt < ntiles; ++kt) {
    const bool more = kt + 1 < ntiles;
    if (more) load_kv(kt + 1);
    cp_async_commit();
    if (more) cp_async_wait<1>();
    else cp_async_wait<0>();
    __syncthreads();
    const T* sKt = sK + (kt & 1) * kBwdKeys * DK;
    const T* sVt = sV + (kt & 1) * kBwdKeys * DV;
    float s[8][4], dp[8][4];
    qk_tile_sA<T, DK, kBwdKeys>(s, sQ, 16 * warp, sKt, lane);
    qk_tile_sA<T, DV, kBwdKeys>(dp, sdO, 16 * warp, sVt, lane);
#pragma unroll
    for (int nt = 0; nt < 8; ++nt)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int k = k_begin + kt * kBwdKeys + nt * 8 + 2 * (lane & 3) + e;
        const bool vA = k >= loA && k <= hiA, vB = k >= loB && k <= hiB;
        s[nt][e] = vA ? fast_exp2(fmaf(s[nt][e], sl2, -lA)) * (gA * dp[nt][e] - DA) : 0.0f;
        s[nt][2 + e] = vB ? fast_exp2(fmaf(s[nt][2 + e], sl2, -lB)) * (gB * dp[nt][2 + e] - DB) : 0.0f;
      }
    pv_tile<T, DK, kBwdKeys>(dq, s, sKt, lane);  // dq += dS K
    __syncthreads();
  }

#pragma unroll
  for (int nd = 0; nd < DK / 8; ++nd) {
    const int c = nd * 8 + 2 * (lane & 3);
    if (okA) {
      float2* d = reinterpret_cast<float2*>(bp.dq + thA * DK + c);
      const float2 o = kBr == kCmp ? make_float2(0.0f, 0.0f) : *d;
      *d = make_float2(o.x + p.scale * dq[nd][0], o.y + p.scale * dq[nd][1]);
    }
    if (okB) {
      float2* d = reinterpret_cast<float2*>(bp.dq + thB * DK + c);
      const float2 o = kBr == kCmp ? make_float2(0.0f, 0.0f) : *d;
      *d = make_float2(o.x + p.scale * dq[nd][2], o.y + p.scale * dq[nd][3]);
    }
  }
}

// Shared memory of dkdv_mma (bytes): sK [64, DK] | sV [64, DV] | sQ [2][32, DK] | sdO [2][32, DV]
// elements, then per row of the two row tiles: position (int), lse * log2 e, D, g (floats).
__host__ __device__ constexpr size_t dkdv_mma_bytes(int dk, int dv) {
  return (size_t(kBwdKeys) * (dk + dv) + 2 * size_t(kKcRows) * (dk + dv)) * 2 + 2 * size_t(kKcRows) * 16;
}

// The work of one key-centric CTA: keys k0 + [0, nk) of sequence b (tokens, or compressed rows
// for kCmp) in group g, against the rows (position, head) of the positions pos(0 .. npos-1),
// G rows each; positions are t_first + i, or list[e0 + i] for the selection.
struct KeyWork {
  bool active = false;
  int b = 0, g = 0, T_b = 0;
  int64_t row0 = 0;
  int k0 = 0, nk = 0;
  int npos = 0, t_first = 0, e0 = 0;
  int64_t part = 0;  // index of the partial sums (deterministic mode; kCmp, kSlc)
};

// The item of this CTA, per branch (see KeyWork):
//   kWin: tiles of 64 tokens (tm), positions [k0, min(T_b, k0 + nk - 1 + w));
//   kCmp: item x = cu_cmp_items[b] + kt * nch + c: compressed tile kt, the positions of chunk c
//         (QC positions) that see its first key; chunks before that are empty;
//   kSlc: item i of list L (item_off), sub-tile blockIdx.y of 64 tokens of block j; the item's
//         S positions of the list.
template <int kBr>
__device__ __forceinline__ KeyWork key_work(const FwdParams& p, const BwdParams& bp, const TileMap& tm) {
  KeyWork w;
  if constexpr (kBr == kWin) {
    const int64_t x = blockIdx.x;
    w.g = blockIdx.y;
    w.b = find_seq(tm.cu_tiles, p.B, x);
    w.row0 = p.cu_seqlens[w.b];
    w.T_b = int(p.cu_seqlens[w.b + 1] - w.row0);
    w.k0 = int(x - tm.cu_tiles[w.b]) * kBwdKeys;
    w.nk = min(kBwdKeys, w.T_b - w.k0);
    w.t_first = w.k0;
    w.npos = min(w.T_b, w.k0 + w.nk - 1 + p.window) - w.t_first;
    w.active = w.nk > 0;
  } else if constexpr (kBr == kCmp) {
    const int64_t x = blockIdx.x;
    w.g = blockIdx.y;
    w.b = find_seq(bp.cu_cmp_items, p.B, x);
    w.row0 = p.cu_seqlens[w.b];
    w.T_b = int(p.cu_seqlens[w.b + 1] - w.row0);
    const int nch = (w.T_b + bp.QC - 1) / bp.QC;
    const int local = int(x - bp.cu_cmp_items[w.b]), kt = local / nch, c = local % nch;
    const int Nc_b = int(p.cu_cmp[w.b + 1] - p.cu_cmp[w.b]);
    w.k0 = kt * kBwdKeys;
    w.nk = min(kBwdKeys, Nc_b - w.k0);
    const int t_min = w.k0 * p.cmp_stride + p.cmp_len - 1;  // the first position that sees key k0
    w.t_first = max(c * bp.QC, t_min);
    w.npos = min((c + 1) * bp.QC, w.T_b) - w.t_first;
    w.part = x * p.Hkv + w.g;
    w.active = w.nk > 0 && w.npos > 0;
  } else {
    const int64_t i = blockIdx.x;
    const int64_t nl = bp.nlists;
    if (i >= bp.item_off[nl]) return w;
    int64_t lo = 0, hi = nl - 1;  // the list L holding item i: the largest L with item_off[L] <= i
    while (lo < hi) {
      const int64_t mid = (lo + hi + 1) / 2;
      if (bp.item_off[mid] <= i) lo = mid;
      else hi = mid - 1;
    }
    const int64_t L = lo;
    w.b = find_seq(bp.cu_lists, p.B, L);
    w.row0 = p.cu_seqlens[w.b];
    w.T_b = int(p.cu_seqlens[w.b + 1] - w.row0);
    const int NB_b = (w.T_b + p.slc_len - 1) / p.slc_len;
    const int Lloc = int(L - bp.cu_lists[w.b]);
    w.g = Lloc / NB_b;
    const int j = Lloc % NB_b;
    int e0, e1;
    slc_list_range(p, bp, w.b, w.T_b, w.g, j, e0, e1);
    w.e0 = e0 + int(i - bp.item_off[L]) * bp.S;
    w.npos = min(e1, w.e0 + bp.S) - w.e0;
    w.k0 = j * p.slc_len + int(blockIdx.y) * kBwdKeys;
    w.nk = min(kBwdKeys, min((j + 1) * p.slc_len, w.T_b) - w.k0);
    w.part = i * int64_t(gridDim.y) + blockIdx.y;
    w.active = w.nk > 0 && w.npos > 0;
  }
  return w;
}

// Writes the rows A = kA and B = kB of a key tile's accumulator times mul, as pairs of columns:
// mode 0 stores into `direct` (key row r at direct + r Hkv D), 1 stores the item's partial sums
// (part + (pidx * 64 + r) D), 2 adds into `direct` with fp32 atomics.
template <int D>
__device__ __forceinline__ void emit_key_rows(const float (&acc)[D / 8][4], float mul, bool okA, bool okB, int kA,
                                              int kB, int Hkv, float* direct, float* part, int64_t pidx, int mode,
                                              int lane) {
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int kr = half ? kB : kA;
    if (!(half ? okB : okA)) continue;
#pragma unroll
    for (int nd = 0; nd < D / 8; ++nd) {
      const int c = nd * 8 + 2 * (lane & 3);
      const float x0 = mul * acc[nd][2 * half], x1 = mul * acc[nd][2 * half + 1];
      float* dst = direct + int64_t(kr) * Hkv * D + c;
      if (mode == 0) {
        *reinterpret_cast<float2*>(dst) = make_float2(x0, x1);
      } else if (mode == 1) {
        *reinterpret_cast<float2*>(part + (pidx * kBwdKeys + kr) * D + c) = make_float2(x0, x1);
      } else {
        atomicAdd(dst, x0);
        atomicAdd(dst + 1, x1);
      }
    }
  }
}

// Key-centric dK, dV of branch kBr (see key_work for the items). Outputs: kWin writes dk[2],
// dv[2]; kCmp and kSlc add into dkc/dvc or dk[1]/dv[1] with fp32 atomics (fast mode) or write
// the item's partial sums (deterministic mode), added in item order by the reduction kernels.
template <class T, int DK, int DV, int kBr>
__global__ void __launch_bounds__(128) dkdv_mma_kernel(FwdParams p, BwdParams bp, TileMap tm) {
  extern __shared__ __align__(16) unsigned char smem[];
  const KeyWork w = key_work<kBr>(p, bp, tm);
  if (!w.active) return;  // uniform over the CTA: before any barrier
  const int G = p.G, Hkv = p.Hkv, g = w.g;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  T* sK = reinterpret_cast<T*>(smem);
  T* sV = sK + kBwdKeys * DK;
  T* sQ = sV + kBwdKeys * DV;                // [2][32, DK]
  T* sdO = sQ + 2 * kKcRows * DK;            // [2][32, DV]
  int* sPos = reinterpret_cast<int*>(sdO + 2 * kKcRows * DV);  // [2][32]
  float* sL = reinterpret_cast<float*>(sPos + 2 * kKcRows);     // [2][32] lse * log2 e
  float* sD = sL + 2 * kKcRows;                                 // [2][32]
  float* sG = sD + 2 * kKcRows;                                 // [2][32]

  const T* Kb = kBr == kCmp ? static_cast<const T*>(p.kc) + ((p.cu_cmp[w.b] + w.k0) * Hkv + g) * DK
                            : static_cast<const T*>(kBr == kSlc ? p.k_slc : p.k_win) + ((w.row0 + w.k0) * Hkv + g) * DK;
  const T* Vb = kBr == kCmp ? static_cast<const T*>(p.vc) + ((p.cu_cmp[w.b] + w.k0) * Hkv + g) * DV
                            : static_cast<const T*>(kBr == kSlc ? p.v_slc : p.v_win) + ((w.row0 + w.k0) * Hkv + g) * DV;
  load_rows_async<DK>(sK, kBwdKeys, Kb, int64_t(Hkv) * DK, w.nk, tid, 128);
  load_rows_async<DV>(sV, kBwdKeys, Vb, int64_t(Hkv) * DV, w.nk, tid, 128);

  const T* q = static_cast<const T*>(p.q);
  const T* dO = static_cast<const T*>(bp.dO);
  const float* lse_c = kBr == kCmp ? p.lse_cmp : kBr == kSlc ? p.lse_slc : p.lse_win;
  const int64_t NHq = p.N * p.Hq;
  const int rows = w.npos * G, nrt = (rows + kKcRows - 1) / kKcRows;
  auto pos = [&](int i) { return kBr == kSlc ? int(bp.list[w.e0 + i]) : w.t_first + i; };
  // Row r of row tile rt is (position pos((32 rt + r) / G), head (32 rt + r) % G).
  auto load_rows = [&](int rt) {
    const int st = rt & 1, r0 = rt * kKcRows;
    auto src = [&](const T* base, int D, int r) -> const T* {
      const int rr = r0 + r;
      return rr < rows ? base + ((w.row0 + pos(rr / G)) * p.Hq + g * G + rr % G) * D : nullptr;
    };
    load_tile_async<DK>(sQ + st * kKcRows * DK, kKcRows, [&](int r) { return src(q, DK, r); }, q, tid, 128);
    load_tile_async<DV>(sdO + st * kKcRows * DV, kKcRows, [&](int r) { return src(dO, DV, r); }, dO, tid, 128);
    if (tid < kKcRows) {
      const int rr = r0 + tid;
      int t = -1;
      float l2 = 0, D = 0, gc = 0;
      if (rr < rows) {
        t = pos(rr / G);
        const int64_t th = (w.row0 + t) * p.Hq + g * G + rr % G;
        l2 = lse_c[th] * kLog2e;  // finite: every row here sees at least one key
        D = bp.delta[kBr * NHq + th];
        gc = p.gates[th * 3 + kBr];
      }
      sPos[st * kKcRows + tid] = t;
      sL[st * kKcRows + tid] = l2;
      sD[st * kKcRows + tid] = D;
      sG[st * kKcRows + tid] = gc;
    }
  };
  load_rows(0);
  cp_async_commit();

  // This thread's keys A = 16 warp + lane / 4 and B = A + 8 of the tile.
  const int kA = 16 * warp + (lane >> 2), kB = kA + 8;
  const int keyA = w.k0 + kA, keyB = w.k0 + kB;  // sequence-local key index
  const bool okA = kA < w.nk, okB = kB < w.nk;
  // The first position that sees the key (compression: its block ends there), and the last.
  auto first_pos = [&](int key) { return kBr == kCmp ? key * p.cmp_stride + p.cmp_len - 1 : key; };
  const int fA = first_pos(keyA), fB = first_pos(keyB);
  const int lastA = kBr == kWin ? keyA + p.window - 1 : INT_MAX, lastB = kBr == kWin ? keyB + p.window - 1 : INT_MAX;
  const float sl2 = p.scale * kLog2e;
  float dk[DK / 8][4], dv[DV / 8][4];
  zero_acc(dk);
  zero_acc(dv);

  for (int rt = 0; rt < nrt; ++rt) {
    const bool more = rt + 1 < nrt;
    if (more) load_rows(rt + 1);
    cp_async_commit();
    if (more) cp_async_wait<1>();
    else cp_async_wait<0>();
    __syncthreads();
    const int st = rt & 1;
    const T* sQt = sQ + st * kKcRows * DK;
    const T* sdOt = sdO + st * kKcRows * DV;
    float s[kKcRows / 8][4], dp[kKcRows / 8][4];
    qk_tile_sA<T, DK, kKcRows>(s, sK, 16 * warp, sQt, lane);   // S^T = K Q^T
    qk_tile_sA<T, DV, kKcRows>(dp, sV, 16 * warp, sdOt, lane);  // dP^T = V dO^T (before the gate)
#pragma unroll
    for (int nt = 0; nt < kKcRows / 8; ++nt)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int col = st * kKcRows + nt * 8 + 2 * (lane & 3) + e;
        const int t = sPos[col];
        const float l2 = sL[col], D = sD[col], gc = sG[col];
        const bool vA = okA && t >= fA && t <= lastA, vB = okB && t >= fB && t <= lastB;
        const float pA = vA ? fast_exp2(fmaf(s[nt][e], sl2, -l2)) : 0.0f;
        const float pB = vB ? fast_exp2(fmaf(s[nt][2 + e], sl2, -l2)) : 0.0f;
        s[nt][e] = pA * (gc * dp[nt][e] - D);  // dS^T
        s[nt][2 + e] = pB * (gc * dp[nt][2 + e] - D);
        dp[nt][e] = pA * gc;  // (g P)^T
        dp[nt][2 + e] = pB * gc;
      }
    pv_tile<T, DV, kKcRows>(dv, dp, sdOt, lane);  // dV += (g P)^T dO
    pv_tile<T, DK, kKcRows>(dk, s, sQt, lane);    // dK += dS^T Q
    __syncthreads();
  }

  // Outputs: dK times the scale (dS was formed without it). Row 0 of the tile in the gradient
  // tensor: the compressed rows, or the branch's tokens.
  const int64_t out_row0 = kBr == kCmp ? p.cu_cmp[w.b] + w.k0 : w.row0 + w.k0;
  float* out_k = (kBr == kCmp ? bp.dkc : bp.dk[kBr]) + (out_row0 * Hkv + g) * DK;
  float* out_v = (kBr == kCmp ? bp.dvc : bp.dv[kBr]) + (out_row0 * Hkv + g) * DV;
  const int mode = kBr == kWin ? 0 : bp.deterministic ? 1 : 2;
  emit_key_rows<DK>(dk, p.scale, okA, okB, kA, kB, Hkv, out_k, bp.part_k, w.part, mode, lane);
  emit_key_rows<DV>(dv, 1.0f, okA, okB, kA, kB, Hkv, out_v, bp.part_v, w.part, mode, lane);
}

}  // namespace nsa::cuda::dev
