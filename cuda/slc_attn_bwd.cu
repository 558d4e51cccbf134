// The selection branch's backward (docs/spec.md 4, 7): the selected blocks are held fixed, so the
// branch is attention over given token sets; dq by query, dK/dV by key. The CUDA twin of the
// selection part of reference/backward.cpp's nsa_tile_backward.
//
// A key receives gradient from the queries whose group selected its block. Scanning every later
// query for every block would cost O(T^2 / l'); instead the block lists of the forward (block_idx,
// [N, Hkv, n]) are inverted once into per-(sequence, group, block) lists of the positions that
// selected the block, by a counting sort without atomics (so the lists are in position order and
// identical from run to run):
//   count: one warp per (chunk of QS positions, group) walks its positions in order and counts,
//          per block, the positions that selected it (a position's n blocks are distinct, so the
//          lanes never touch one counter at the same time); slot (b, g, j, chunk) = the count;
//   scan:  exclusive prefix sums over the slots, in the order (b, g, j, chunk): each list is the
//          run of its chunks' slots, in position order;
//   fill:  the same walk writes each position at its slot's offset plus the running count.
// dq (mma) is the forward's group-centric kernel run backwards: a warp owns all G heads of 16 / G
// positions and walks the union of their block lists chunk by chunk. dK/dV (mma) is key-centric
// over the lists: a work item is a segment of S positions of one list against one sub-tile of 64
// of the block's tokens; the blocks every query selects (the initial and local ones) have lists as
// long as the sequence, so long lists are cut into several items, whose sums the fast mode adds
// with fp32 atomics and the deterministic mode writes as partial sums added in item order.
#include <cub/device/device_scan.cuh>

#include "bwd_tile.cuh"
#include "check.hpp"
#include "kernels.hpp"
#include "slc_attn.cuh"

namespace nsa::cuda {

namespace {

using namespace dev;

// Count (kFill = false) or fill (kFill = true) the lists, one warp per (chunk, group); see the
// file's comment. Shared memory: [NB] counters, then the chunk's [QS, n] block_idx rows.
template <bool kFill>
__global__ void lists_kernel(FwdParams p, BwdParams bp) {
  extern __shared__ int sm[];
  const int64_t x = blockIdx.x;
  const int g = blockIdx.y, lane = threadIdx.x, n = p.slc_count;
  const int b = find_seq(bp.cu_chunks, p.B, x);
  const int64_t row0 = p.cu_seqlens[b];
  const int T_b = int(p.cu_seqlens[b + 1] - row0);
  const int c = int(x - bp.cu_chunks[b]);
  const int NB_b = (T_b + p.slc_len - 1) / p.slc_len, nch = (T_b + bp.QS - 1) / bp.QS;
  const int t0 = c * bp.QS, t1 = min(t0 + bp.QS, T_b);
  int* cnt = sm;
  int* rows = sm + p.NB;
  for (int j = lane; j < NB_b; j += 32) cnt[j] = 0;
  for (int e = lane; e < (t1 - t0) * n; e += 32) rows[e] = p.block_idx[((row0 + t0 + e / n) * p.Hkv + g) * n + e % n];
  __syncwarp();
  const int64_t s0 = bp.cu_slots[b] + int64_t(g) * NB_b * nch + c;  // slot (b, g, j, c) = s0 + j * nch
  for (int t = t0; t < t1; ++t) {
    for (int m = lane; m < n; m += 32) {
      const int j = rows[(t - t0) * n + m];
      if (j < 0 || j >= NB_b) continue;  // -1 padding
      if (kFill) bp.list[bp.slot_off[s0 + int64_t(j) * nch] + cnt[j]] = t;
      ++cnt[j];
    }
    __syncwarp();
  }
  if (!kFill)
    for (int j = lane; j < NB_b; j += 32) bp.slot_cnt[s0 + int64_t(j) * nch] = cnt[j];
}

// mma: the work items of list L, ceil(len / S). One thread per list.
__global__ void items_kernel(FwdParams p, BwdParams bp) {
  const int64_t L = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (L >= bp.nlists) return;
  const int b = find_seq(bp.cu_lists, p.B, L);
  const int T_b = int(p.cu_seqlens[b + 1] - p.cu_seqlens[b]);
  const int NB_b = (T_b + p.slc_len - 1) / p.slc_len, Lloc = int(L - bp.cu_lists[b]);
  int e0, e1;
  slc_list_range(p, bp, b, T_b, Lloc / NB_b, Lloc % NB_b, e0, e1);
  bp.item_cnt[L] = (e1 - e0 + bp.S - 1) / bp.S;
}

// Deterministic mode: dk_slc, dv_slc of token row (group blockIdx.y) = the sum, in item order, of
// the partial sums of the items of its block's list (zero when no query selected the block).
__global__ void reduce_kernel(FwdParams p, BwdParams bp, int nsub) {
  const int64_t row = blockIdx.x;
  const int g = blockIdx.y;
  const int b = find_seq(p.cu_seqlens, p.B, row);
  const int T_b = int(p.cu_seqlens[b + 1] - p.cu_seqlens[b]);
  const int u = int(row - p.cu_seqlens[b]), j = u / p.slc_len, NB_b = (T_b + p.slc_len - 1) / p.slc_len;
  const int sub = (u - j * p.slc_len) / kBwdKeys, slot = (u - j * p.slc_len) % kBwdKeys;
  const int64_t L = bp.cu_lists[b] + int64_t(g) * NB_b + j;
  const int i0 = bp.item_off[L], i1 = bp.item_off[L + 1];
  for (int c = threadIdx.x; c < p.dk + p.dv; c += blockDim.x) {
    const bool isk = c < p.dk;
    const int D = isk ? p.dk : p.dv, col = isk ? c : c - p.dk;
    const float* part = isk ? bp.part_k : bp.part_v;
    float s = 0;
    for (int i = i0; i < i1; ++i) s += part[((int64_t(i) * nsub + sub) * kBwdKeys + slot) * D + col];
    (isk ? bp.dk[kSlc] : bp.dv[kSlc])[(row * p.Hkv + g) * D + col] = s;
  }
}

// ---- dq, mma: the forward's group-centric walk (slc_attn.cu) with the softmax run backwards ----
constexpr int kDqWarps = 2;  // warps per CTA (each its own rows and stages)

__host__ __device__ constexpr size_t slc_dq_warp_bytes(int dk, int dv) {
  return size_t(2) * kSlcChunk * (dk + dv) * 2;  // two stages of K and V chunks
}

template <class T, int DK, int DV>
__global__ void __launch_bounds__(32 * kDqWarps) slc_dq_mma_kernel(FwdParams p, BwdParams bp, TileMap tm) {
  extern __shared__ __align__(16) unsigned char smem[];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t wi = int64_t(blockIdx.x) * kDqWarps + warp;
  if (wi >= int64_t(p.Hkv) * tm.total) return;  // whole warps only: no CTA-wide barrier follows
  const int g = int(wi / tm.total);
  const int64_t x = wi % tm.total;
  const int G = p.G, P = tm.BT;  // P = 16 / G positions per warp
  const int b = find_seq(tm.cu_tiles, p.B, x);
  const int t0 = int(x - tm.cu_tiles[b]) * P;
  const int64_t row0 = p.cu_seqlens[b];
  const int T_b = int(p.cu_seqlens[b + 1] - row0);
  const int t_maxw = min(t0 + P, T_b) - 1;
  const int Hkv = p.Hkv;
  T* sK = reinterpret_cast<T*>(smem + size_t(warp) * slc_dq_warp_bytes(DK, DV));  // [2][32, DK]
  T* sV = sK + 2 * kSlcChunk * DK;                                               // [2][32, DV]

  const int rA = lane >> 2, rB = rA + 8;
  const int posA = rA / G, posB = rB / G;
  const int tA = t0 + posA, tB = t0 + posB;
  const bool okA = tA < T_b, okB = tB < T_b;
  const int64_t thA = (row0 + (okA ? tA : 0)) * p.Hq + g * G + rA % G;
  const int64_t thB = (row0 + (okB ? tB : 0)) * p.Hq + g * G + rB % G;
  uint32_t qa[DK / 16][4], da[DV / 16][4];
  load_q_global<DK>(qa, static_cast<const T*>(p.q) + thA * DK, static_cast<const T*>(p.q) + thB * DK, okA, okB, lane);
  load_q_global<DV>(da, static_cast<const T*>(bp.dO) + thA * DV, static_cast<const T*>(bp.dO) + thB * DV, okA, okB,
                    lane);
  const int64_t NHq = p.N * p.Hq;
  const float lA = okA ? p.lse_slc[thA] * kLog2e : 0.0f, lB = okB ? p.lse_slc[thB] * kLog2e : 0.0f;
  const float DA = okA ? bp.delta[kSlc * NHq + thA] : 0.0f, DB = okB ? bp.delta[kSlc * NHq + thB] : 0.0f;
  const float gA = okA ? p.gates[thA * 3 + kSlc] : 0.0f, gB = okB ? p.gates[thB * 3 + kSlc] : 0.0f;

  const int32_t* mylist = lane < P && t0 + lane < T_b ? p.block_idx + ((row0 + t0 + lane) * Hkv + g) * p.slc_count : nullptr;
  auto head = [&](int c) -> int {
    if (!mylist || c >= p.slc_count) return INT_MAX;
    const int j = mylist[c];
    return j >= 0 ? j : INT_MAX;  // -1 padding ends the list
  };
  BlockUnion walk;
  walk.hv = head(0);
  auto next = [&]() { return walk.next(head, p.slc_len, t_maxw); };
  const T* K = static_cast<const T*>(p.k_slc);
  const T* V = static_cast<const T*>(p.v_slc);
  auto issue = [&](const Item& it, int stage) {
    load_chunk<T, DK, DV, false>(sK + stage * kSlcChunk * DK, sV + stage * kSlcChunk * DV, it, K, V, row0, Hkv, g,
                                 p.slc_len, t_maxw, lane);
  };
  const float sl2 = p.scale * kLog2e;
  float dq[DK / 8][4];
  zero_acc(dq);

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
    const T* sKs = sK + stage * kSlcChunk * DK;
    const T* sVs = sV + stage * kSlcChunk * DV;
    float s[4][4], dp[4][4];
    qk_tile<T, DK, kSlcChunk>(s, qa, sKs, lane);
    qk_tile<T, DV, kSlcChunk>(dp, da, sVs, lane);
    const int u0 = cur.j * p.slc_len + cur.c * kSlcChunk, blk_end = (cur.j + 1) * p.slc_len;
    const bool selA = okA && ((cur.mask >> posA) & 1u), selB = okB && ((cur.mask >> posB) & 1u);
#pragma unroll
    for (int nt = 0; nt < 4; ++nt)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int u = u0 + nt * 8 + 2 * (lane & 3) + e;
        const bool in_blk = u < blk_end;
        const bool vA = selA && in_blk && u <= tA, vB = selB && in_blk && u <= tB;
        s[nt][e] = vA ? fast_exp2(fmaf(s[nt][e], sl2, -lA)) * (gA * dp[nt][e] - DA) : 0.0f;
        s[nt][2 + e] = vB ? fast_exp2(fmaf(s[nt][2 + e], sl2, -lB)) * (gB * dp[nt][2 + e] - DB) : 0.0f;
      }
    pv_tile<T, DK, kSlcChunk>(dq, s, sKs, lane);  // dq += dS K
    __syncwarp();  // every lane is done with this stage before the next issue overwrites it
    cur = nx;
    stage ^= 1;
  }

#pragma unroll
  for (int nd = 0; nd < DK / 8; ++nd) {
    const int c = nd * 8 + 2 * (lane & 3);
    if (okA) {
      float2* d = reinterpret_cast<float2*>(bp.dq + thA * DK + c);
      const float2 o = *d;
      *d = make_float2(o.x + p.scale * dq[nd][0], o.y + p.scale * dq[nd][1]);
    }
    if (okB) {
      float2* d = reinterpret_cast<float2*>(bp.dq + thB * DK + c);
      const float2 o = *d;
      *d = make_float2(o.x + p.scale * dq[nd][2], o.y + p.scale * dq[nd][3]);
    }
  }
}

template <class T>
void launch_fp32(const FwdParams& p, const BwdParams& bp, cudaStream_t s) {
  const int nw = p.G < 4 ? p.G : 4;
  dq_fp32_kernel<T, kSlc><<<dim3(unsigned(p.N), unsigned(p.Hkv)), 32 * nw, 0, s>>>(p, bp);
  NSA_CUDA_CHECK_LAUNCH("dq_fp32_kernel<slc>");
  dkdv_fp32_kernel<T, kSlc><<<dim3(unsigned(p.N), unsigned(p.Hkv)), 32 * nw, size_t(nw) * (p.dk + p.dv) * 4, s>>>(p,
                                                                                                                 bp);
  NSA_CUDA_CHECK_LAUNCH("dkdv_fp32_kernel<slc>");
}

template <class T>
void launch_mma(const FwdParams& p, const BwdParams& bp, const TileMap& tm, int64_t items, cudaStream_t s) {
  const int nsub = (p.slc_len + kBwdKeys - 1) / kBwdKeys;
  const bool ok = dispatch_dims(p.dk, p.dv, [&](auto DK_, auto DV_) {
    constexpr int DK = decltype(DK_)::value, DV = decltype(DV_)::value;
    auto dq = slc_dq_mma_kernel<T, DK, DV>;
    const size_t dq_smem = kDqWarps * slc_dq_warp_bytes(DK, DV);
    NSA_CUDA_CHECK(cudaFuncSetAttribute(dq, cudaFuncAttributeMaxDynamicSharedMemorySize, int(dq_smem)));
    const int64_t warps = int64_t(p.Hkv) * tm.total;
    dq<<<unsigned((warps + kDqWarps - 1) / kDqWarps), 32 * kDqWarps, dq_smem, s>>>(p, bp, tm);
    NSA_CUDA_CHECK_LAUNCH("slc_dq_mma_kernel");
    if (!bp.deterministic) {  // the items add into zeros
      NSA_CUDA_CHECK(cudaMemsetAsync(bp.dk[kSlc], 0, size_t(p.N) * p.Hkv * DK * 4, s));
      NSA_CUDA_CHECK(cudaMemsetAsync(bp.dv[kSlc], 0, size_t(p.N) * p.Hkv * DV * 4, s));
    }
    auto kv = dkdv_mma_kernel<T, DK, DV, kSlc>;
    NSA_CUDA_CHECK(cudaFuncSetAttribute(kv, cudaFuncAttributeMaxDynamicSharedMemorySize, int(dkdv_mma_bytes(DK, DV))));
    kv<<<dim3(unsigned(items), unsigned(nsub)), 128, dkdv_mma_bytes(DK, DV), s>>>(p, bp, TileMap{});
    NSA_CUDA_CHECK_LAUNCH("dkdv_mma_kernel<slc>");
    if (bp.deterministic) {
      reduce_kernel<<<dim3(unsigned(p.N), unsigned(p.Hkv)), 128, 0, s>>>(p, bp, nsub);
      NSA_CUDA_CHECK_LAUNCH("slc reduce_kernel");
    }
  });
  if (!ok) throw ConfigError(cat("slc_attn_bwd mma: head dims dk = ", p.dk, ", dv = ", p.dv, " are not compiled"));
}

}  // namespace

size_t slc_lists_scan_bytes(int64_t slots, int64_t lists) {
  size_t a = 0, b = 0;
  NSA_CUDA_CHECK(cub::DeviceScan::ExclusiveSum(nullptr, a, static_cast<int32_t*>(nullptr),
                                               static_cast<int32_t*>(nullptr), int(slots + 1)));
  NSA_CUDA_CHECK(cub::DeviceScan::ExclusiveSum(nullptr, b, static_cast<int32_t*>(nullptr),
                                               static_cast<int32_t*>(nullptr), int(lists + 1)));
  return a > b ? a : b;
}

size_t slc_lists_smem(const FwdParams& p, const BwdParams& bp) {
  return (size_t(p.NB) + size_t(bp.QS) * p.slc_count) * sizeof(int);
}

void build_slc_lists(const FwdParams& p, const BwdParams& bp, int64_t chunks, int64_t slots, bool items, void* tmp,
                     size_t tmp_bytes, cudaStream_t s) {
  if (p.N == 0) return;
  const size_t smem = slc_lists_smem(p, bp);
  NSA_CUDA_CHECK(cudaFuncSetAttribute(lists_kernel<false>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
  NSA_CUDA_CHECK(cudaFuncSetAttribute(lists_kernel<true>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
  NSA_CUDA_CHECK(cudaMemsetAsync(bp.slot_cnt + slots, 0, sizeof(int32_t), s));  // the end of the last list
  const dim3 grid(unsigned(chunks), unsigned(p.Hkv));
  lists_kernel<false><<<grid, 32, smem, s>>>(p, bp);
  NSA_CUDA_CHECK_LAUNCH("lists_kernel<count>");
  size_t bytes = tmp_bytes;
  NSA_CUDA_CHECK(cub::DeviceScan::ExclusiveSum(tmp, bytes, bp.slot_cnt, bp.slot_off, int(slots + 1), s));
  lists_kernel<true><<<grid, 32, smem, s>>>(p, bp);
  NSA_CUDA_CHECK_LAUNCH("lists_kernel<fill>");
  if (!items) return;
  NSA_CUDA_CHECK(cudaMemsetAsync(bp.item_cnt + bp.nlists, 0, sizeof(int32_t), s));
  items_kernel<<<unsigned((bp.nlists + 255) / 256), 256, 0, s>>>(p, bp);
  NSA_CUDA_CHECK_LAUNCH("items_kernel");
  bytes = tmp_bytes;
  NSA_CUDA_CHECK(cub::DeviceScan::ExclusiveSum(tmp, bytes, bp.item_cnt, bp.item_off, int(bp.nlists + 1), s));
}

void slc_attn_bwd_fp32(Precision prec, const FwdParams& p, const BwdParams& bp, cudaStream_t s) {
  if (p.N == 0) return;
  for_precision(prec, [&](auto t) { launch_fp32<decltype(t)>(p, bp, s); });
}

void slc_attn_bwd_mma(Precision prec, const FwdParams& p, const BwdParams& bp, const TileMap& tm_slc, int64_t slc_items,
                cudaStream_t s) {
  if (p.N == 0) return;
  for_mma_precision(prec, "slc_attn_bwd mma", [&](auto t) { launch_mma<decltype(t)>(p, bp, tm_slc, slc_items, s); });
}

size_t bwd_mma_smem(const FwdParams& p) {
  const size_t a = dq_mma_bytes(p.dk, p.dv), b = dkdv_mma_bytes(p.dk, p.dv), c = kDqWarps * slc_dq_warp_bytes(p.dk, p.dv);
  return a > b ? (a > c ? a : c) : (b > c ? b : c);
}

}  // namespace nsa::cuda
