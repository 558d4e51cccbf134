// The selection branch's attention (Eq. 12): query t attends over the tokens u <= t of the n
// blocks its group selected (block_idx, written by cmp_attn). CUDA twin of the selection part of
// reference/forward.cpp's nsa_tile.
//
// mma: group-centric as the paper designs it, extended to small groups: one warp owns 16 rows,
// all G heads of 16 / G consecutive positions (G = 16: one position). It walks the union of those
// positions' block lists in ascending order (a merge done by the warp, one lane per position) and
// streams each block's K and V contiguously through shared memory in chunks of 32 tokens with
// cp.async double buffering; a row masks the blocks its position did not select. For G = 16 this
// is exactly the paper's kernel; for G < 16 a block shared by adjacent positions (always the
// initial and local ones) is read once for all of them instead of once per position, and the
// m16 rows of the tensor-core tile are all real heads instead of padding.
#include <climits>

#include "check.hpp"
#include "attn_tile.cuh"
#include "device.cuh"
#include "kernels.hpp"
#include "slc_attn.cuh"

namespace nsa::cuda {

namespace {

using namespace dev;

// ============================== fp32: CUDA cores ==============================
// One CTA per (token, group); warps over the group's heads; one key at a time, online softmax.
template <class T>
__global__ void slc_attn_fp32_kernel(FwdParams p) {
  const auto [row, row0, g, t, nw, warp, lane] = token_cta(p.cu_seqlens, p.B);
  const int32_t* sel = p.block_idx + (row * p.Hkv + g) * p.slc_count;
  const T* K = static_cast<const T*>(p.k_slc);
  const T* V = static_cast<const T*>(p.v_slc);
  for (int hi = warp; hi < p.G; hi += nw) {
    const int h = g * p.G + hi;
    const T* q = static_cast<const T*>(p.q) + (row * p.Hq + h) * p.dk;
    Fp32Softmax sm;
    for (int mm = 0; mm < p.slc_count; ++mm) {
      const int j = sel[mm];
      if (j < 0) break;
      const int u1 = min((j + 1) * p.slc_len, t + 1);
      for (int u = j * p.slc_len; u < u1; ++u)
        sm.add(q, K + ((row0 + u) * p.Hkv + g) * p.dk, V + ((row0 + u) * p.Hkv + g) * p.dv, p, lane);
    }
    T* out = static_cast<T*>(p.o_slc) + (row * p.Hq + h) * p.dv;
#pragma unroll
    for (int k2 = 0; k2 < 8; ++k2)
      if (lane + 32 * k2 < p.dv) out[lane + 32 * k2] = from_f<T>(sm.sum > 0 ? sm.o[k2] / sm.sum : 0.0f);
    if (lane == 0) p.lse_slc[row * p.Hq + h] = sm.sum > 0 ? sm.m + logf(sm.sum) : -INFINITY;
  }
}

// ============================== mma: tensor cores (mma.sync) ==============================
constexpr int kChunk = kSlcChunk;  // tokens per pipeline stage

// Shared memory of one warp: two stages of K and V chunks, then the block lists of
// the warp's P <= 16 positions, read once instead of one global load per block.
__host__ __device__ inline size_t slc_mma_warp_bytes(int dk, int dv, int n) {
  return size_t(2) * kChunk * (dk + dv) * 2 + size_t(16) * n * 4;
}

template <class T, int DK, int DV>
__global__ void __launch_bounds__(128) slc_attn_mma_kernel(FwdParams p, TileMap tm) {
  extern __shared__ __align__(16) unsigned char smem[];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t wi = int64_t(blockIdx.x) * (blockDim.x / 32) + warp;
  if (wi >= int64_t(p.Hkv) * tm.total) return;  // whole warps only: no CTA-wide barrier follows
  // KV group outermost, so the warps resident at one time read one group's K/V (L2 locality).
  const int g = int(wi / tm.total);
  const int64_t x = wi % tm.total;
  const int G = p.G, P = tm.BT;  // P = 16 / G positions per warp
  const int b = find_seq(tm.cu_tiles, p.B, x);
  const int t0 = int(x - tm.cu_tiles[b]) * P;
  const int64_t row0 = p.cu_seqlens[b];
  const int T_b = int(p.cu_seqlens[b + 1] - row0);
  const int t_maxw = min(t0 + P, T_b) - 1;  // last position of the warp
  const int Hkv = p.Hkv;
  const unsigned all_pos = P == 32 ? 0xffffffffu : (1u << P) - 1;  // every position of the warp

  T* sK = reinterpret_cast<T*>(smem + size_t(warp) * slc_mma_warp_bytes(DK, DV, p.slc_count));  // [2][32, DK]
  T* sV = sK + 2 * kChunk * DK;                                                          // [2][32, DV]
  int* sL = reinterpret_cast<int*>(sV + 2 * kChunk * DV);  // [P][n] block lists
  for (int e = lane; e < P * p.slc_count; e += 32) {
    const int t = t0 + e / p.slc_count;
    sL[e] = t < T_b ? p.block_idx[((row0 + t) * Hkv + g) * p.slc_count + e % p.slc_count] : -1;
  }
  __syncwarp();

  // This thread's rows A = lane / 4 and B = A + 8 of the warp: (position r / G, head r % G).
  const int rA = lane >> 2, rB = rA + 8;
  const int posA = rA / G, posB = rB / G;
  const int tA = t0 + posA, tB = t0 + posB;
  const bool okA = tA < T_b, okB = tB < T_b;
  const int hA = g * G + rA % G, hB = g * G + rB % G;

  // Q as mma A fragments straight from global memory (16 rows x DK, read once).
  const T* q = static_cast<const T*>(p.q);
  const T* qA = q + ((row0 + (okA ? tA : 0)) * p.Hq + hA) * DK;
  const T* qB = q + ((row0 + (okB ? tB : 0)) * p.Hq + hB) * DK;
  uint32_t qa[DK / 16][4];
  load_q_global<DK>(qa, qA, qB, okA, okB, lane);

  // The union of the P block lists (read from shared memory); lane i < P holds position t0 + i's.
  const bool has_list = lane < P && t0 + lane < T_b;
  auto head = [&](int c) -> int {
    if (!has_list || c >= p.slc_count) return INT_MAX;
    const int j = sL[lane * p.slc_count + c];
    return j >= 0 ? j : INT_MAX;  // -1 padding ends the list
  };
  BlockUnion walk;
  walk.hv = head(0);
  auto next = [&]() { return walk.next(head, p.slc_len, t_maxw); };
  const T* K = static_cast<const T*>(p.k_slc);
  const T* V = static_cast<const T*>(p.v_slc);
  auto issue = [&](const Item& it, int stage) {
    load_chunk<T, DK, DV, true>(sK + stage * kChunk * DK, sV + stage * kChunk * DV, it, K, V, row0, Hkv, g, p.slc_len,
                                 t_maxw, lane);
  };

  const float sl2 = p.scale * kLog2e;
  float mA = -INFINITY, mB = -INFINITY, lA = 0, lB = 0;
  float oacc[DV / 8][4];
#pragma unroll
  for (int nd = 0; nd < DV / 8; ++nd) oacc[nd][0] = oacc[nd][1] = oacc[nd][2] = oacc[nd][3] = 0;

  Item cur = next();
  if (cur.j != INT_MAX) issue(cur, 0);
  cp_async_commit();
  int stage = 0;
  while (cur.j != INT_MAX) {
    const Item nx = next();
    if (nx.j != INT_MAX) issue(nx, stage ^ 1);
    cp_async_commit();
    cp_async_wait<1>();
    __syncwarp();

    const T* sKs = sK + stage * kChunk * DK;
    const T* sVs = sV + stage * kChunk * DV;
    float s[4][4];
    qk_tile<T, DK, kChunk>(s, qa, sKs, lane);
    // Row masks: the position selected this block, and u <= t (the block end for the last chunk).
    const int u0 = cur.j * p.slc_len + cur.c * kChunk, blk_end = (cur.j + 1) * p.slc_len;
    const bool selA = okA && ((cur.mask >> posA) & 1u), selB = okB && ((cur.mask >> posB) & 1u);
    // A chunk inside its block, before the warp's first position, selected by all of the warp's
    // positions, is seen whole by every row: no masks, one FFMA + ex2 per element.
    if (u0 + kChunk <= blk_end && u0 + kChunk - 1 <= t0 && t0 + P <= T_b && cur.mask == all_pos) {
      rescale<DV>(oacc, softmax_step_full(s, sl2, mA, mB, lA, lB));
    } else {
#pragma unroll
      for (int nt = 0; nt < 4; ++nt)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int u = u0 + nt * 8 + 2 * (lane & 3) + e;
          const bool in_blk = u < blk_end;
          s[nt][e] = selA && in_blk && u <= tA ? s[nt][e] * sl2 : -INFINITY;
          s[nt][2 + e] = selB && in_blk && u <= tB ? s[nt][2 + e] * sl2 : -INFINITY;
        }
      rescale<DV>(oacc, softmax_step_masked(s, mA, mB, lA, lB));
    }
    pv_tile<T, DV, kChunk>(oacc, s, sVs, lane);
    __syncwarp();  // every lane is done with this stage before the next issue overwrites it
    cur = nx;
    stage ^= 1;
  }

  quad_sum(lA, lB);
  const float iA = lA > 0 ? 1.0f / lA : 0.0f, iB = lB > 0 ? 1.0f / lB : 0.0f;
  store_rows<T, DV>(static_cast<T*>(p.o_slc), ((row0 + tA) * p.Hq + hA) * DV, ((row0 + tB) * p.Hq + hB) * DV, okA,
                   okB, oacc, iA, iB, lane);
  if ((lane & 3) == 0) {
    if (okA) p.lse_slc[(row0 + tA) * p.Hq + hA] = lA > 0 ? (mA + log2f(lA)) * kLn2 : -INFINITY;
    if (okB) p.lse_slc[(row0 + tB) * p.Hq + hB] = lB > 0 ? (mB + log2f(lB)) * kLn2 : -INFINITY;
  }
}


template <class T>
void launch_fp32(const FwdParams& p, cudaStream_t s) {
  const int nw = p.G < 4 ? p.G : 4;
  slc_attn_fp32_kernel<T><<<dim3(unsigned(p.N), unsigned(p.Hkv)), 32 * nw, 0, s>>>(p);
  NSA_CUDA_CHECK_LAUNCH("slc_attn_fp32_kernel");
}

template <class T>
void launch_mma(const FwdParams& p, const TileMap& tm, int nw, cudaStream_t s) {
  const size_t smem = slc_attn_mma_smem(p, nw);
  const int64_t warps = int64_t(p.Hkv) * tm.total;
  const bool ok = dispatch_dims(p.dk, p.dv, [&](auto DK, auto DV) {
    auto kernel = slc_attn_mma_kernel<T, decltype(DK)::value, decltype(DV)::value>;
    NSA_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
    kernel<<<unsigned((warps + nw - 1) / nw), 32 * nw, smem, s>>>(p, tm);
    NSA_CUDA_CHECK_LAUNCH("slc_attn_mma_kernel");
  });
  if (!ok) throw ConfigError(cat("slc_attn mma: head dims dk = ", p.dk, ", dv = ", p.dv, " are not compiled"));
}

}  // namespace

size_t slc_attn_mma_smem(const FwdParams& p, int nwarps) {
  return size_t(nwarps) * slc_mma_warp_bytes(p.dk, p.dv, p.slc_count);
}

void slc_attn_fp32(Precision prec, const FwdParams& p, cudaStream_t s) {
  if (p.N == 0) return;
  for_precision(prec, [&](auto t) { launch_fp32<decltype(t)>(p, s); });
}

void slc_attn_mma(Precision prec, const FwdParams& p, const TileMap& tm, int nwarps, cudaStream_t s) {
  if (tm.total == 0) return;
  for_mma_precision(prec, "slc_attn mma", [&](auto t) { launch_mma<decltype(t)>(p, tm, nwarps, s); });
}

}  // namespace nsa::cuda
