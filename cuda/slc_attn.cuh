// The group-centric walk of the selection kernels (slc_attn.cu forward, slc_attn_bwd.cu dq): a
// warp's positions' sorted block lists merged into one ascending walk, chunk by chunk, and the
// copy of a chunk of K and V into shared memory.
#pragma once

#include <climits>

#include "device.cuh"

namespace nsa::cuda::dev {

constexpr int kSlcChunk = 32;  // tokens per pipeline stage

struct Item {
  int j;          // selection block; INT_MAX: no more
  unsigned mask;  // bit p: position t0 + p selected block j
  int c;          // chunk of the block: tokens j l' + c*32 + [0, 32)
};

// The warp-uniform walk over the union of the P sorted block lists of a warp's positions, chunk by
// chunk: lane p < P holds a cursor into position t0 + p's list; each new block is the minimum of
// the lanes' heads, and the lanes holding it advance. head(cursor) is the calling lane's list
// entry (INT_MAX past the end or at -1 padding).
struct BlockUnion {
  int hv = INT_MAX, cursor = 0, blk_j = -1, blk_chunks = 0, next_c = 0;
  unsigned blk_mask = 0;
  template <class Head>
  __device__ __forceinline__ Item next(Head&& head, int ls, int t_maxw) {
    if (blk_j >= 0 && next_c < blk_chunks) return {blk_j, blk_mask, next_c++};
    int jm = hv;
    for (int o = 16; o > 0; o /= 2) jm = min(jm, __shfl_xor_sync(0xffffffffu, jm, o));
    if (jm == INT_MAX) return {INT_MAX, 0u, 0};
    const unsigned mask = __ballot_sync(0xffffffffu, hv == jm);
    if (hv == jm) hv = head(++cursor);
    // Tokens past the warp's last position are masked for every row: not loaded.
    const int len = min((jm + 1) * ls, t_maxw + 1) - jm * ls;
    blk_j = jm, blk_mask = mask, blk_chunks = (len + kSlcChunk - 1) / kSlcChunk, next_c = 1;
    return {jm, mask, 0};
  }
};

// Copies chunk `it` (tokens [u0, u_end) of group g's K and V; zeros past u_end) into one stage,
// with the warp's 32 lanes. kStrided: from a row base and stride (the forward), else row by row
// (the backward's dq kernel).
template <class T, int DK, int DV, bool kStrided>
__device__ __forceinline__ void load_chunk(T* sKs, T* sVs, const Item& it, const T* K, const T* V, int64_t row0,
                                           int Hkv, int g, int ls, int t_maxw, int lane) {
  const int u0 = it.j * ls + it.c * kSlcChunk, u_end = min((it.j + 1) * ls, t_maxw + 1);
  if constexpr (kStrided) {
    load_rows_async<DK>(sKs, kSlcChunk, K + ((row0 + u0) * Hkv + g) * DK, int64_t(Hkv) * DK, u_end - u0, lane, 32);
    load_rows_async<DV>(sVs, kSlcChunk, V + ((row0 + u0) * Hkv + g) * DV, int64_t(Hkv) * DV, u_end - u0, lane, 32);
  } else {
    load_tile_async<DK>(
        sKs, kSlcChunk,
        [&](int r) -> const T* { return u0 + r < u_end ? K + ((row0 + u0 + r) * Hkv + g) * DK : nullptr; }, K, lane,
        32);
    load_tile_async<DV>(
        sVs, kSlcChunk,
        [&](int r) -> const T* { return u0 + r < u_end ? V + ((row0 + u0 + r) * Hkv + g) * DV : nullptr; }, V, lane,
        32);
  }
}

}  // namespace nsa::cuda::dev
