// topn (docs/spec.md 4, Eq. 8-11) on tensor cores: with lse_cmp known (cmp_attn ran), the
// probabilities p = exp(s q.k - lse) of the compressed keys in one pass: q.k once more, p summed
// over the group's heads (Eq. 10) and mapped onto the selection blocks (Eq. 9), then the top-n
// with the forced blocks and the tie rule (Eq. 11). CUDA twin of reference/topn.cpp and of the
// score part of reference/forward.cpp's nsa_tile. (The fp32 variant is fused into cmp_attn's fp32
// kernel, cmp_attn.cu.)
//
// It holds neither V nor O: half the registers of a fused attention + score kernel and two CTAs per
// SM, Q straight from global memory into registers, K alone through shared memory. For the
// paper's l = 32, d = 16, l' = 64 the mapping is a fixed 5-term stencil per block (kPaperMap); the
// top-n filters candidates before its rounds (select_warp_filtered).
#include <climits>

#include "check.hpp"
#include "attn_tile.cuh"
#include "device.cuh"
#include "kernels.hpp"
#include "topn.cuh"

namespace nsa::cuda {

namespace {

using namespace dev;

// Compressed keys stream through shared memory in tiles of 64, three stages.
constexpr int kKeys = 64;
constexpr int kScoreStages = 3;

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
// topn_mma's shared memory (bytes): sK [3][64, DK] elem | sCs [BT][kCs] f32: slot 0 the
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

// The per-tile work of topn_mma: for each of the warp's positions, the sum over its G heads
// of p = exp2(s q.k log2e - lse) for every key of the tile, into sCs[pos * kCs + 1 + key]
// (Eq. 10). Layout: the 16 (position, head) rows on the MMA's M dimension, the keys on N, the
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
    nvA = okA ? cmp_visible(tA, p.cmp_len, p.cmp_stride) : 0, nvB = okB ? cmp_visible(tB, p.cmp_len, p.cmp_stride) : 0;
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
__global__ void __launch_bounds__(256, 2) topn_mma_kernel(FwdParams p, TileMap tm) {
  extern __shared__ __align__(16) unsigned char smem[];
  const int nw = blockDim.x / 32, R = 16 * nw, G = p.G, BT = R / G;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const ScoreSmem L(BT, nw, DK, p.NB, p.slc_count, sizeof(T));
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
  const int nv_max = cmp_visible(t_last, p.cmp_len, p.cmp_stride);
  const int nb_tile = slc_valid(t_last, p.slc_len);
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
      // Eq. 9, general overlaps: ascending i onto the running score.
      const float inv_d = 1.0f / float(p.cmp_stride);
      const int iend = min(i0 + kKeys, nv_w);
      const int jlo = i0 * p.cmp_stride / p.slc_len, jhi = ((iend - 1) * p.cmp_stride + p.cmp_len - 1) / p.slc_len, nj = jhi - jlo + 1;
      for (int e = lane; e < wpn * nj; e += 32) {
        const int pos = wp0 + e / nj, j = jlo + e % nj;
        const int lo_num = j * p.slc_len - p.cmp_len + 1;
        const int ia = max(i0, lo_num > 0 ? (lo_num + p.cmp_stride - 1) / p.cmp_stride : 0);
        const int ib = min(iend - 1, ((j + 1) * p.slc_len - 1) / p.cmp_stride);
        float acc = sBlk[pos * p.NB + j];
        for (int i = ia; i <= ib; ++i) {
          const int ov = min(i * p.cmp_stride + p.cmp_len, (j + 1) * p.slc_len) - max(i * p.cmp_stride, j * p.slc_len);
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
      const int valid = slc_valid(t, p.slc_len);
      for (int j = lane; j < p.NB; j += 32) p.block_scores[gr * p.NB + j] = j < valid ? P[j] : 0.0f;
    }
    select_warp_filtered(P, t, p, sList + pos * p.slc_count, sCand, kCand, p.block_idx + gr * p.slc_count, lane);
  }
}
template <class T>
void launch_mma(const FwdParams& p, const TileMap& tm, int nwarps, cudaStream_t s) {
  const size_t smem = topn_mma_smem(p, nwarps);
  const bool paper_map = p.cmp_len == 32 && p.cmp_stride == 16 && p.slc_len == 64;
  const bool ok = dispatch_dims(p.dk, p.dv, [&](auto DK, auto) {
    constexpr int A = decltype(DK)::value;
    auto sc = paper_map ? topn_mma_kernel<T, A, true> : topn_mma_kernel<T, A, false>;
    NSA_CUDA_CHECK(cudaFuncSetAttribute(sc, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
    sc<<<dim3(unsigned(tm.total), unsigned(p.Hkv)), 32 * nwarps, smem, s>>>(p, tm);
    NSA_CUDA_CHECK_LAUNCH("topn_mma_kernel");
  });
  if (!ok) throw ConfigError(cat("topn mma: head dims dk = ", p.dk, ", dv = ", p.dv, " are not compiled"));
}

}  // namespace

size_t topn_mma_smem(const FwdParams& p, int nwarps) {
  return ScoreSmem(16 * nwarps / p.G, nwarps, p.dk, p.NB, p.slc_count, 2).total;
}

void topn_mma(Precision prec, const FwdParams& p, const TileMap& tm, int nwarps, cudaStream_t s) {
  if (tm.total == 0) return;
  for_mma_precision(prec, "topn mma", [&](auto t) { launch_mma<decltype(t)>(p, tm, nwarps, s); });
}

}  // namespace nsa::cuda
