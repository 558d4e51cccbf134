// Building blocks of the mma (tensor-core) attention kernels: one warp's 16 query rows against a
// tile of keys in shared memory, in the mma.sync m16n8k16 layouts (device.cuh). A thread holds
// rows A = lane / 4 and B = A + 8 of the warp; s[nt][0..1] are row A's scores of keys
// nt * 8 + 2 * (lane % 4) + {0, 1}, s[nt][2..3] row B's.
#pragma once

#include "device.cuh"

namespace nsa::cuda::dev {

// The warp's Q rows as A fragments, from a swizzled [rows, DK] tile (the warp's rows start at row0).
template <int DK, class T>
__device__ __forceinline__ void load_q_smem(uint32_t (&qa)[DK / 16][4], const T* sQ, int row0, int lane) {
#pragma unroll
  for (int ks = 0; ks < DK / 16; ++ks)
    ldmatrix_x4(qa[ks], sQ + SwizzledTile<DK>::offset(row0 + (lane & 15), ks * 2 + (lane >> 4)));
}

// The warp's Q rows as A fragments straight from global memory: rows A and B at qA, qB (zeros
// where the row is not a real query).
template <int DK, class T>
__device__ __forceinline__ void load_q_global(uint32_t (&qa)[DK / 16][4], const T* qA, const T* qB, bool okA, bool okB,
                                              int lane) {
#pragma unroll
  for (int ks = 0; ks < DK / 16; ++ks) {
    const int c = ks * 16 + 2 * (lane & 3);
    qa[ks][0] = okA ? *reinterpret_cast<const uint32_t*>(qA + c) : 0u;
    qa[ks][1] = okB ? *reinterpret_cast<const uint32_t*>(qB + c) : 0u;
    qa[ks][2] = okA ? *reinterpret_cast<const uint32_t*>(qA + c + 8) : 0u;
    qa[ks][3] = okB ? *reinterpret_cast<const uint32_t*>(qB + c + 8) : 0u;
  }
}

// S = Q K^T for the warp's 16 rows and KEYS keys of a swizzled [KEYS, DK] tile.
template <class T, int DK, int KEYS>
__device__ __forceinline__ void qk_tile(float (&s)[KEYS / 8][4], const uint32_t (&qa)[DK / 16][4], const T* sK,
                                        int lane) {
  using Tile = SwizzledTile<DK>;
#pragma unroll
  for (int nt = 0; nt < KEYS / 8; ++nt) s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0;
#pragma unroll
  for (int ks = 0; ks < DK / 16; ++ks)
#pragma unroll
    for (int np = 0; np < KEYS / 16; ++np) {
      uint32_t bk[4];
      ldmatrix_x4(bk, sK + Tile::offset(np * 16 + (lane & 7) + ((lane >> 4) << 3), ks * 2 + ((lane >> 3) & 1)));
      mma16816<T>(s[2 * np], qa[ks], bk[0], bk[1]);
      mma16816<T>(s[2 * np + 1], qa[ks], bk[2], bk[3]);
    }
}

// O += P V for KEYS keys of a swizzled [KEYS, DV] tile; P in the D layout of S, rounded to T
// (two adjacent key tiles of D are one k16 A fragment).
template <class T, int DV, int KEYS>
__device__ __forceinline__ void pv_tile(float (&oacc)[DV / 8][4], const float (&p)[KEYS / 8][4], const T* sV,
                                        int lane) {
#pragma unroll
  for (int kk = 0; kk < KEYS / 16; ++kk) {
    const uint32_t pa[4] = {pack2<T>(p[2 * kk][0], p[2 * kk][1]), pack2<T>(p[2 * kk][2], p[2 * kk][3]),
                            pack2<T>(p[2 * kk + 1][0], p[2 * kk + 1][1]), pack2<T>(p[2 * kk + 1][2], p[2 * kk + 1][3])};
#pragma unroll
    for (int nd = 0; nd < DV / 16; ++nd) {
      uint32_t bv[4];
      ldmatrix_x4_trans(bv, sV + SwizzledTile<DV>::offset(kk * 16 + (lane & 7) + (((lane >> 3) & 1) << 3),
                                                         nd * 2 + (lane >> 4)));
      mma16816<T>(oacc[2 * nd], pa, bv[0], bv[1]);
      mma16816<T>(oacc[2 * nd + 1], pa, bv[2], bv[3]);
    }
  }
}

// The same products for MT m16 tiles per warp (FlashAttention-2's 32 rows per warp with MT = 2):
// each K or V fragment read from shared memory feeds MT products, and the MT tiles' chains are
// independent work for the scheduler. Q is read from its swizzled tile (the warp's rows start at
// row0, tile m at row0 + 16 m) one k16 slice at a time instead of being held in registers.
template <class T, int DK, int KEYS, int MT>
__device__ __forceinline__ void qk_tile_mt(float (&s)[MT][KEYS / 8][4], const T* sQ, int row0, const T* sK,
                                           int lane) {
  using Tile = SwizzledTile<DK>;
#pragma unroll
  for (int m = 0; m < MT; ++m)
#pragma unroll
    for (int nt = 0; nt < KEYS / 8; ++nt) s[m][nt][0] = s[m][nt][1] = s[m][nt][2] = s[m][nt][3] = 0;
#pragma unroll
  for (int ks = 0; ks < DK / 16; ++ks) {
    uint32_t qa[MT][4];
#pragma unroll
    for (int m = 0; m < MT; ++m)
      ldmatrix_x4(qa[m], sQ + Tile::offset(row0 + 16 * m + (lane & 15), ks * 2 + (lane >> 4)));
#pragma unroll
    for (int np = 0; np < KEYS / 16; ++np) {
      uint32_t bk[4];
      ldmatrix_x4(bk, sK + Tile::offset(np * 16 + (lane & 7) + ((lane >> 4) << 3), ks * 2 + ((lane >> 3) & 1)));
#pragma unroll
      for (int m = 0; m < MT; ++m) {
        mma16816<T>(s[m][2 * np], qa[m], bk[0], bk[1]);
        mma16816<T>(s[m][2 * np + 1], qa[m], bk[2], bk[3]);
      }
    }
  }
}

template <class T, int DV, int KEYS, int MT>
__device__ __forceinline__ void pv_tile_mt(float (&oacc)[MT][DV / 8][4], const float (&p)[MT][KEYS / 8][4],
                                           const T* sV, int lane) {
#pragma unroll
  for (int kk = 0; kk < KEYS / 16; ++kk) {
    uint32_t pa[MT][4];
#pragma unroll
    for (int m = 0; m < MT; ++m) {
      pa[m][0] = pack2<T>(p[m][2 * kk][0], p[m][2 * kk][1]);
      pa[m][1] = pack2<T>(p[m][2 * kk][2], p[m][2 * kk][3]);
      pa[m][2] = pack2<T>(p[m][2 * kk + 1][0], p[m][2 * kk + 1][1]);
      pa[m][3] = pack2<T>(p[m][2 * kk + 1][2], p[m][2 * kk + 1][3]);
    }
#pragma unroll
    for (int nd = 0; nd < DV / 16; ++nd) {
      uint32_t bv[4];
      ldmatrix_x4_trans(bv, sV + SwizzledTile<DV>::offset(kk * 16 + (lane & 7) + (((lane >> 3) & 1) << 3),
                                                         nd * 2 + (lane >> 4)));
#pragma unroll
      for (int m = 0; m < MT; ++m) {
        mma16816<T>(oacc[m][2 * nd], pa[m], bv[0], bv[1]);
        mma16816<T>(oacc[m][2 * nd + 1], pa[m], bv[2], bv[3]);
      }
    }
  }
}

// The row maxima of A and B over the quad that shares a row.
__device__ __forceinline__ void quad_max(float& xa, float& xb) {
  for (int o = 1; o < 4; o *= 2) {
    xa = fmaxf(xa, __shfl_xor_sync(0xffffffffu, xa, o));
    xb = fmaxf(xb, __shfl_xor_sync(0xffffffffu, xb, o));
  }
}

// One online-softmax step (FlashAttention-2) on scores already in the log2 domain, -inf where
// masked: updates the running maxima m and sums l, turns s into p = exp2(s - m), and returns the
// factors by which the caller's O accumulators must be rescaled.
template <int NT>
__device__ __forceinline__ float2 softmax_step_masked(float (&s)[NT][4], float& mA, float& mB, float& lA, float& lB) {
  float xa = -INFINITY, xb = -INFINITY;
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      xa = fmaxf(xa, s[nt][e]);
      xb = fmaxf(xb, s[nt][2 + e]);
    }
  quad_max(xa, xb);
  const float nA = fmaxf(mA, xa), nB = fmaxf(mB, xb);
  // With no visible key yet the maxima stay -inf: use 0 as the offset so that no -inf - -inf
  // appears (every exp2 below is then exp2(-inf) = 0).
  const float cA = nA == -INFINITY ? 0.0f : nA, cB = nB == -INFINITY ? 0.0f : nB;
  const float alA = exp2f(mA - cA), alB = exp2f(mB - cB);
  lA *= alA;
  lB *= alB;
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      s[nt][e] = exp2f(s[nt][e] - cA);
      s[nt][2 + e] = exp2f(s[nt][2 + e] - cB);
      lA += s[nt][e];
      lB += s[nt][2 + e];
    }
  mA = nA, mB = nB;
  return {alA, alB};
}

// The same step on raw scores that every row sees in full: no masks, the scale sl2
// (> 0, so it commutes with the maximum) folded into one FFMA and one ex2.approx per element.
template <int NT>
__device__ __forceinline__ float2 softmax_step_full(float (&s)[NT][4], float sl2, float& mA, float& mB, float& lA,
                                                    float& lB) {
  float xa = -INFINITY, xb = -INFINITY;
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    xa = fmaxf(xa, fmaxf(s[nt][0], s[nt][1]));
    xb = fmaxf(xb, fmaxf(s[nt][2], s[nt][3]));
  }
  quad_max(xa, xb);
  const float nA = fmaxf(mA, xa * sl2), nB = fmaxf(mB, xb * sl2);
  const float alA = fast_exp2(mA - nA), alB = fast_exp2(mB - nB);
  lA *= alA;
  lB *= alB;
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      s[nt][e] = fast_exp2(fmaf(s[nt][e], sl2, -nA));
      s[nt][2 + e] = fast_exp2(fmaf(s[nt][2 + e], sl2, -nB));
      lA += s[nt][e];
      lB += s[nt][2 + e];
    }
  mA = nA, mB = nB;
  return {alA, alB};
}

template <int DV>
__device__ __forceinline__ void rescale(float (&oacc)[DV / 8][4], float2 al) {
#pragma unroll
  for (int nd = 0; nd < DV / 8; ++nd) {
    oacc[nd][0] *= al.x, oacc[nd][1] *= al.x;
    oacc[nd][2] *= al.y, oacc[nd][3] *= al.y;
  }
}

// Sums of a row's partial sums over its quad (each thread summed its own columns).
__device__ __forceinline__ void quad_sum(float& lA, float& lB) {
  for (int o = 1; o < 4; o *= 2) {
    lA += __shfl_xor_sync(0xffffffffu, lA, o);
    lB += __shfl_xor_sync(0xffffffffu, lB, o);
  }
}

// Writes the warp's rows A and B of O, times iA and iB, to out + offA and out + offB (the rows'
// first elements), as pairs of elements.
template <class T, int DV>
__device__ __forceinline__ void store_rows(T* out, int64_t offA, int64_t offB, bool okA, bool okB,
                                           const float (&oacc)[DV / 8][4], float iA, float iB, int lane) {
#pragma unroll
  for (int nd = 0; nd < DV / 8; ++nd) {
    const int c = nd * 8 + 2 * (lane & 3);
    if (okA) *reinterpret_cast<uint32_t*>(out + offA + c) = pack2<T>(oacc[nd][0] * iA, oacc[nd][1] * iA);
    if (okB) *reinterpret_cast<uint32_t*>(out + offB + c) = pack2<T>(oacc[nd][2] * iB, oacc[nd][3] * iB);
  }
}

}  // namespace nsa::cuda::dev
