// The decode step's kernels (docs/spec.md 8): the CUDA twin of the attention part of
// ref::decode_step (reference/decode.cpp). One step computes one new token per sequence, so its
// work is the keys it reads; the kernels are built to stream them at the card's memory rate even
// at batch 1, where a step has only Bs * Hkv items (an item = one token's KV group):
//
//   split    (dec_split_kernel) each branch's key list of an item is cut into splits, one CTA
//            each (flash-decoding): the compressed rows and the window in one launch (they do not
//            depend on the selection), the selected blocks in a second. A CTA holds the item's G
//            query heads as the 16 rows of mma.sync m16n8k16 tiles (group-centric: every K/V row
//            is loaded once for all G heads); its warps stream 32-key tiles through their own
//            double-buffered shared memory (cp.async), keep an online softmax, and the CTA writes
//            one partial (max, sum, unnormalised O) per query row. The compression CTAs also
//            write every score s q.k (Eq. 8 needs them normalised by the final lse, which no split
//            knows), and the first CTA of each item appends the new token's rows to the cache.
//   select   (dec_select_kernel) per (chunk of selection blocks, item): merges the compression
//            partials' statistics into each head's lse, forms p = exp(s q.k - lse) of the rows
//            the chunk's blocks overlap, sums it over the group's heads (Eq. 10) and maps it onto
//            the blocks (Eq. 9); the item's last CTA runs the top-n (Eq. 11, select_cta in
//            cuda/topn.cuh: a radix select with every thread of the CTA).
//   combine  (dec_combine_kernel) per (item, head): merges the three branches' partials into
//            O_cmp, O_win, O_slc and their lse, and forms o = g_cmp O_cmp + g_slc O_slc + g_win O_win
//            (Eq. 5).
// The merges spread their loads over lanes and issue them together: the first version looped over
// the splits (and heads) in one thread, one dependent L2 load after another, and took 30-200 us
// per step whatever the batch (H100, docs/cuda_decode.md).
// A step that completes a compressed block first appends (dec_append_kernel) and runs phi on the
// block's l raw rows (dec_emit_*; the mlp/linear products through phi.cu's cuBLAS path).
#include <algorithm>
#include <climits>
#include <utility>

#include "attn_tile.cuh"
#include "check.hpp"
#include "device.cuh"
#include "kernels.hpp"
#include "topn.cuh"

namespace nsa::cuda {

namespace {

using namespace dev;

// The split kernel's shapes per version: keys per warp tile (lane i computes key i's row
// addresses in the general path) and warps per CTA. Every version holds two stages of a K and a V
// tile per warp, 2 x 2 x 32 or 4 x 2 x 16 keys x (dk + dv) bf16 = 64 KB at dk = dv = 128, so 3 CTAs
// share an SM and one's merge overlaps the others' streaming; v3 has twice v2's warps per SM
// (12 against 6) on tiles of half the size.
template <int V>
struct SplitShape {
  static constexpr bool kLean = V >= 2;
  static constexpr int kTile = V == 3 ? 16 : 32;
  static constexpr int kWarps = V == 3 ? 4 : 2;
};
static_assert(kDecTile % 32 == 0, "split sizes must be whole tiles of every version");
constexpr int kRows = 16;  // query rows of an item: heads g*G .. g*G + G - 1, zero rows past G
enum Kind { kCmp = 0, kWin = 1, kSlc = 2 };

// Programmatic dependent launch (sm_90): a kernel launched with it (dec_launch, pdl) may start
// while the previous kernel of the stream still runs; pdl_wait() returns once that kernel has
// completed and its writes are visible (at once without it). A kernel reads what the previous
// one wrote, and writes anything, only after pdl_wait(); pdl_release() lets the next kernel's
// CTAs start on SMs this one leaves free (its tail), where they run up to their own pdl_wait().
__device__ __forceinline__ void pdl_wait() {
#if __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_release() {
#if __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// The [Hkv, D] row of token u of cache sequence b as a branch with a ring sees it: the ring
// (slot u % period) when the branch keeps one, else the history.
template <class T>
__device__ __forceinline__ const T* raw_row(const DecParams& p, const void* ring, int ring_rows, int period,
                                            const void* hist, int64_t b, int u, int D) {
  return ring ? static_cast<const T*>(ring) + (b * ring_rows + u % period) * p.Hkv * D
              : static_cast<const T*>(hist) + (b * p.capacity + u) * p.Hkv * D;
}

// Copies D elements (D * sizeof(T) a multiple of 16 bytes) with the threads [tid, nth).
template <class T>
__device__ __forceinline__ void copy_vec(T* dst, const T* src, int D, int tid, int nth) {
  const int n16 = D * int(sizeof(T)) / 16;
  for (int i = tid; i < n16; i += nth) reinterpret_cast<uint4*>(dst)[i] = reinterpret_cast<const uint4*>(src)[i];
}

// The new token of row r enters the cache (group g's slices): the history always, the rings
// where a branch keeps its own keys/values (decode.hpp's store_raw).
template <class T>
__device__ void append_group(const DecParams& p, int r, int g, int tid, int nth) {
  const int64_t b = p.seq[r];
  const int t = p.pos[r];
  const int64_t H = p.Hkv;
  const int64_t nk = (int64_t(r) * H + g) * p.dk, nvv = (int64_t(r) * H + g) * p.dv;
  auto k_in = [&](int c) { return static_cast<const T*>(p.k_new[c]) + nk; };
  auto v_in = [&](int c) { return static_cast<const T*>(p.v_new[c]) + nvv; };
  copy_vec(static_cast<T*>(p.k_slc) + ((b * p.capacity + t) * H + g) * p.dk, k_in(1), p.dk, tid, nth);
  copy_vec(static_cast<T*>(p.v_slc) + ((b * p.capacity + t) * H + g) * p.dv, v_in(1), p.dv, tid, nth);
  if (p.k_tail) copy_vec(static_cast<T*>(p.k_tail) + ((b * p.L + t % p.cmp_len) * H + g) * p.dk, k_in(0), p.dk, tid, nth);
  if (p.v_tail) copy_vec(static_cast<T*>(p.v_tail) + ((b * p.L + t % p.cmp_len) * H + g) * p.dv, v_in(0), p.dv, tid, nth);
  if (p.k_win) copy_vec(static_cast<T*>(p.k_win) + ((b * p.W + t % p.window) * H + g) * p.dk, k_in(2), p.dk, tid, nth);
  if (p.v_win) copy_vec(static_cast<T*>(p.v_win) + ((b * p.W + t % p.window) * H + g) * p.dv, v_in(2), p.dv, tid, nth);
}

// Key x of an item's list for a branch -> its K and V rows (nullptr: masked). Compression: the
// compressed row x. Window: token u = ws + x. Selection: token u = j l' + x % l' of the
// (x / l')-th selected block j, masked when there is none (-1) or u > t. The new token (u = t)
// comes from the step's inputs: the cache row is written by the same launch.
template <class T, int DK, int DV>
__device__ __forceinline__ void key_rows(const DecParams& p, int kind, int r, int g, int64_t b, int t, int ws,
                                         const int* sList, int x, const T*& kp, const T*& vp) {
  const int64_t H = p.Hkv;
  if (kind == kCmp) {
    const int64_t row = (b * p.Ncap + x) * H + g;
    kp = static_cast<const T*>(p.k_cmp) + row * DK;
    vp = static_cast<const T*>(p.v_cmp) + row * DV;
    return;
  }
  int u = ws + x;
  if (kind == kSlc) {
    const int j = sList[x / p.slc_len];
    u = j * p.slc_len + x % p.slc_len;
    if (j < 0 || u > t) {
      kp = vp = nullptr;
      return;
    }
  }
  if (u == t) {
    const int c = kind == kWin ? 2 : 1;
    kp = static_cast<const T*>(p.k_new[c]) + (int64_t(r) * H + g) * DK;
    vp = static_cast<const T*>(p.v_new[c]) + (int64_t(r) * H + g) * DV;
    return;
  }
  const bool win = kind == kWin;
  kp = raw_row<T>(p, win ? p.k_win : nullptr, p.W, p.window, p.k_slc, b, u, DK) + g * DK;
  vp = raw_row<T>(p, win ? p.v_win : nullptr, p.W, p.window, p.v_slc, b, u, DV) + g * DV;
}

// The L2 policy of the cache's K/V tile loads. A step reads each cached row once, and its later
// kernels read again what the first one wrote (the compression scores, the partials): with
// evict_first on the streamed rows those stay in L2 instead of being pushed out by the stream.
// evict_normal (DecParams::evict_first false) is the plain loads' policy.
__device__ __forceinline__ uint64_t stream_policy(bool evict_first) {
  uint64_t pol;
  if (evict_first) asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;\n" : "=l"(pol));
  else asm volatile("createpolicy.fractional.L2::evict_normal.b64 %0, 1.0;\n" : "=l"(pol));
  return pol;
}

// cp_async_16 under an L2 policy.
__device__ __forceinline__ void cp_async_16_pol(void* smem, const void* gmem, bool valid, uint64_t pol) {
  const int src_bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global.L2::cache_hint [%0], [%1], 16, %2, %3;\n" ::"r"(smem_addr(smem)), "l"(gmem),
               "r"(src_bytes), "l"(pol));
}

// One warp copies a tile of kTile rows into a swizzled [kTile, D] tile with cp.async: lane i
// computed the address of row i (nullptr: zero-filled), the others take it by a shuffle.
template <int D, int kTile, class T>
__device__ __forceinline__ void copy_tile(T* tile, const T* my_row, const T* fallback, int lane, uint64_t pol) {
  constexpr int C = D / 8;
  const unsigned long long mine = reinterpret_cast<unsigned long long>(my_row);
  for (int c = lane; c < kTile * C; c += 32) {
    const int rr = c / C, ch = c - rr * C;
    const T* src = reinterpret_cast<const T*>(__shfl_sync(0xffffffffu, mine, rr));
    cp_async_16_pol(tile + SwizzledTile<D>::offset(rr, ch), src ? src + ch * 8 : fallback, src != nullptr, pol);
  }
}

// load_rows_async (device.cuh: rows [0, rows) at base + r * stride, rows >= valid zero-filled)
// under an L2 policy, with the warp's lanes.
template <int D, class T>
__device__ __forceinline__ void load_rows_pol(T* tile, int rows, const T* base, int64_t stride, int valid, int lane,
                                              uint64_t pol) {
  constexpr int C = SwizzledTile<D>::kChunks;
  for (int c = lane; c < rows * C; c += 32) {
    const int r = c / C, ch = c - r * C;
    const bool ok = r < valid;
    cp_async_16_pol(tile + SwizzledTile<D>::offset(r, ch), base + (ok ? r * stride + ch * 8 : 0), ok, pol);
  }
}

// Shared memory of a split CTA: per warp two stages of a K and a V tile, then the selection
// CTAs' block list. The warps' partials reuse the stages after the loop.
template <int V>
__host__ __device__ constexpr size_t split_stage_bytes(int dk, int dv, int esize) {
  return size_t(SplitShape<V>::kWarps) * 2 * SplitShape<V>::kTile * (dk + dv) * esize;
}

// grid (splits, Bs * Hkv): first == kCmp: splits [0, sc) of the compression branch, then sw of
// the window; first == kSlc: ss splits of the selection branch (after dec_select).
// kLean (v2): a tile whose rows are evenly strided in the cache (every compression tile; window
// and selection tiles inside the history that do not hold the new token) is copied from a base
// and a stride, without the per-row addresses and shuffles of the general path, and a tile whose
// keys are all visible takes the unmasked softmax step (one FFMA + ex2.approx per score). v1
// takes the general path for every tile. Measured on the H100: docs/cuda_decode.md.
// v3: 16-key tiles and 4 warps per CTA (the register budget of 3 CTAs per SM asked for where
// dk <= 128).
template <class T, int DK, int DV, int V>
__global__ void __launch_bounds__(SplitShape<V>::kWarps * 32, (V == 3 && DK <= 128) ? 3 : 1)
    dec_split_kernel(DecParams p, int first) {
  constexpr bool kLean = SplitShape<V>::kLean;
  constexpr int kTile = SplitShape<V>::kTile, kWarps = SplitShape<V>::kWarps;
  constexpr unsigned kFull = kTile == 32 ? 0xffffffffu : (1u << kTile) - 1u;
  extern __shared__ __align__(16) unsigned char smem[];
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int item = blockIdx.y, r = item / p.Hkv, g = item % p.Hkv;
  const int64_t b = p.seq[r];
  const int t = p.pos[r], G = p.G;
  int kind = first, split = blockIdx.x;
  if (kind == kCmp && split >= p.sc) kind = kWin, split -= p.sc;
  int count, R, slot;
  if (kind == kCmp) {
    count = cmp_visible(t, p.cmp_len, p.cmp_stride), R = p.rc, slot = split;
  } else if (kind == kWin) {
    count = t - win_start(t, p.window) + 1, R = p.rw, slot = p.sc + split;
  } else {
    count = min(p.slc_count, slc_valid(t, p.slc_len)) * p.slc_len, R = p.rs, slot = p.sc + p.sw + split;
  }
  const int x0 = split * R, x1 = min(x0 + R, count);
  const int ntiles = x1 > x0 ? (x1 - x0 + kTile - 1) / kTile : 0;
  const int ws = win_start(t, p.window);

  // The item's query rows: rows A = lane / 4 and B = A + 8 of the mma layout are heads g*G + A, + B.
  // Their loads (step inputs) are issued before the wait for the selection kernel, and before the
  // block list's loads.
  const int rA = lane >> 2, rB = rA + 8;
  const T* q = static_cast<const T*>(p.q) + (int64_t(r) * p.Hq + g * G) * DK;
  uint32_t qa[DK / 16][4];
  load_q_global<DK>(qa, q + rA * DK, q + rB * DK, rA < G, rB < G, lane);
  pdl_release();
  pdl_wait();

  if (first == kCmp && blockIdx.x == 0 && p.append) append_group<T>(p, r, g, tid, blockDim.x);
  int* sList = reinterpret_cast<int*>(smem + split_stage_bytes<V>(DK, DV, sizeof(T)));
  if (kind == kSlc) {
    for (int i = tid; i < p.slc_count; i += blockDim.x) sList[i] = p.block_idx[int64_t(item) * p.slc_count + i];
    __syncthreads();
  }

  T* sK = reinterpret_cast<T*>(smem) + size_t(warp) * 2 * kTile * (DK + DV);
  T* sV = sK + 2 * kTile * DK;
  const T* fallback = static_cast<const T*>(p.k_slc);
  const uint64_t pol = stream_policy(p.evict_first);
  // Regular tiles (kLean): the K and V rows of keys [xt, xt + kTile) at kb + i * sk, vb + i * sv.
  const int64_t H = p.Hkv;
  auto regular = [&](int xt, int valid, const T*& kb, const T*& vb) -> bool {
    int64_t row;  // (sequence, token or compressed row) of key xt, in rows of H heads
    if (kind == kCmp) {
      row = b * p.Ncap + xt;
      kb = static_cast<const T*>(p.k_cmp) + (row * H + g) * DK;
      vb = static_cast<const T*>(p.v_cmp) + (row * H + g) * DV;
      return true;
    }
    int u0 = ws + xt;
    if (kind == kWin) {
      if (p.k_win || p.v_win) return false;  // a ring of its own: rows wrap
    } else {
      if (p.slc_len % kTile) return false;  // a tile may span two blocks
      const int j = sList[xt / p.slc_len];
      if (j < 0) return false;
      u0 = j * p.slc_len + xt % p.slc_len;
    }
    if (u0 + valid - 1 >= t) return false;  // holds the new token (from the inputs) or keys past t
    row = b * p.capacity + u0;
    kb = static_cast<const T*>(p.k_slc) + (row * H + g) * DK;
    vb = static_cast<const T*>(p.v_slc) + (row * H + g) * DV;
    return true;
  };
  // Starts the copy of a tile into stage st; returns its mask (bit i: key i is visible).
  auto load = [&](int tile, int st) {
    if (kLean) {
      const int xt = x0 + tile * kTile, valid = min(kTile, x1 - xt);
      const T* kb;
      const T* vb;
      if (regular(xt, valid, kb, vb)) {
        load_rows_pol<DK>(sK + st * kTile * DK, kTile, kb, H * DK, valid, lane, pol);
        load_rows_pol<DV>(sV + st * kTile * DV, kTile, vb, H * DV, valid, lane, pol);
        return valid == kTile ? kFull : (1u << valid) - 1u;
      }
    }
    const int x = x0 + tile * kTile + lane;
    const T* kp = nullptr;
    const T* vp = nullptr;
    if (lane < kTile && x < x1) key_rows<T, DK, DV>(p, kind, r, g, b, t, ws, sList, x, kp, vp);
    copy_tile<DK, kTile>(sK + st * kTile * DK, kp, fallback, lane, pol);
    copy_tile<DV, kTile>(sV + st * kTile * DV, vp, fallback, lane, pol);
    return __ballot_sync(0xffffffffu, kp != nullptr);
  };

  const float sl2 = p.scale * kLog2e;  // scores in the log2 domain: exp(s x) = exp2(s log2e x)
  float* scores = p.scores + int64_t(item) * G * p.Ncs;
  float mA = -INFINITY, mB = -INFINITY, lA = 0, lB = 0;
  float oacc[DV / 8][4];
#pragma unroll
  for (int nd = 0; nd < DV / 8; ++nd) oacc[nd][0] = oacc[nd][1] = oacc[nd][2] = oacc[nd][3] = 0;

  // Warp w takes tiles w, w + kWarps, ...: its own pipeline, no CTA barrier in the loop.
  unsigned vm = warp < ntiles ? load(warp, 0) : 0u, vm_next = 0u;
  cp_async_commit();
  for (int k = 0, tile = warp; tile < ntiles; ++k, tile += kWarps) {
    const int st = k & 1;
    const bool more = tile + kWarps < ntiles;
    if (more) vm_next = load(tile + kWarps, st ^ 1);
    cp_async_commit();
    if (more) cp_async_wait<1>();
    else cp_async_wait<0>();
    __syncwarp();
    float s[kTile / 8][4];
    qk_tile<T, DK, kTile>(s, qa, sK + st * kTile * DK, lane);
    const int xt = x0 + tile * kTile;
    if (kLean && vm == kFull) {
      if (kind == kCmp)  // Eq. 8 needs every score once the lse is known (dec_select)
#pragma unroll
        for (int nt = 0; nt < kTile / 8; ++nt) {
          const int col = xt + nt * 8 + 2 * (lane & 3);  // even; Ncs is a multiple of 4
          if (rA < G) *reinterpret_cast<float2*>(scores + int64_t(rA) * p.Ncs + col) = {s[nt][0] * sl2, s[nt][1] * sl2};
          if (rB < G) *reinterpret_cast<float2*>(scores + int64_t(rB) * p.Ncs + col) = {s[nt][2] * sl2, s[nt][3] * sl2};
        }
      rescale<DV>(oacc, softmax_step_full(s, sl2, mA, mB, lA, lB));
    } else {
#pragma unroll
      for (int nt = 0; nt < kTile / 8; ++nt)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int col = nt * 8 + 2 * (lane & 3) + e;
          const bool ok = (vm >> col) & 1u;
          s[nt][e] = ok ? s[nt][e] * sl2 : -INFINITY;
          s[nt][2 + e] = ok ? s[nt][2 + e] * sl2 : -INFINITY;
          if (kind == kCmp && ok) {
            if (rA < G) scores[int64_t(rA) * p.Ncs + xt + col] = s[nt][e];
            if (rB < G) scores[int64_t(rB) * p.Ncs + xt + col] = s[nt][2 + e];
          }
        }
      rescale<DV>(oacc, softmax_step_masked(s, mA, mB, lA, lB));
    }
    pv_tile<T, DV, kTile>(oacc, s, sV + st * kTile * DV, lane);
    vm = vm_next;
    __syncwarp();  // the next iteration's copy overwrites this stage
  }
  quad_sum(lA, lB);

  // The CTA's partial: the warps' (m, l, O) merged in shared memory (the stages are free now).
  // O rows are padded to DV + 8 floats, so that the float2 stores of a half-warp (rows A 0-3 or
  // 4-7, four column pairs each) fall in distinct banks; each row's factors exp2(m_w - M) are
  // formed once.
  constexpr int kPad = DV + 8;
  static_assert(size_t(kWarps) * kRows * (3 + kPad) * 4 <= split_stage_bytes<V>(DK, DV, sizeof(T)),
                "the warps' partials fit in the stages");
  __syncthreads();
  float* sM = reinterpret_cast<float*>(smem);  // [kWarps][16]
  float* sL = sM + kWarps * kRows;              // [kWarps][16]
  float* sF = sL + kWarps * kRows;              // [kWarps][16] exp2(m_w - M) of each row
  float* sO = sF + kWarps * kRows;              // [kWarps][16][kPad]
  if ((lane & 3) == 0) {
    sM[warp * kRows + rA] = mA, sM[warp * kRows + rB] = mB;
    sL[warp * kRows + rA] = lA, sL[warp * kRows + rB] = lB;
  }
#pragma unroll
  for (int nd = 0; nd < DV / 8; ++nd) {
    const int c = nd * 8 + 2 * (lane & 3);
    *reinterpret_cast<float2*>(sO + (warp * kRows + rA) * kPad + c) = {oacc[nd][0], oacc[nd][1]};
    *reinterpret_cast<float2*>(sO + (warp * kRows + rB) * kPad + c) = {oacc[nd][2], oacc[nd][3]};
  }
  __syncthreads();
  const int S = p.sc + p.sw + p.ss;
  const int64_t part = int64_t(item) * S + slot;
  if (tid < kRows) {
    float M = -INFINITY, Lsum = 0;
    for (int w = 0; w < kWarps; ++w) M = fmaxf(M, sM[w * kRows + tid]);
    for (int w = 0; w < kWarps; ++w) {
      const float f = M == -INFINITY ? 0.0f : exp2f(sM[w * kRows + tid] - M);
      sF[w * kRows + tid] = f;
      Lsum += f * sL[w * kRows + tid];
    }
    p.part_ml[part * 2 * kRows + tid] = M;
    p.part_ml[part * 2 * kRows + kRows + tid] = Lsum;
  }
  __syncthreads();
  for (int e = tid; e < kRows * DV; e += blockDim.x) {
    const int row = e / DV, c = e - row * DV;
    float acc = 0;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) acc += sF[w * kRows + row] * sO[(w * kRows + row) * kPad + c];
    p.part_o[part * kRows * DV + e] = acc;
  }
}

__device__ __forceinline__ float warp_max(float x) {
  for (int o = 16; o > 0; o /= 2) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}
__device__ __forceinline__ float warp_sum(float x) {
  for (int o = 16; o > 0; o /= 2) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

// One warp: the lse (log2 domain; -inf when no key was seen) of query row h over the partials of
// slots [0, ns) at ml (an item's part_ml from its first slot of the branch), the lanes striding
// over the slots (a few dependent loads per lane, not one chain of ns).
__device__ __forceinline__ float warp_lse(const float* ml, int ns, int h, int lane) {
  float M = -INFINITY;
  for (int s = lane; s < ns; s += 32) M = fmaxf(M, ml[s * 2 * kRows + h]);
  M = warp_max(M);
  float Lsum = 0;
  for (int s = lane; s < ns; s += 32) {
    const float m = ml[s * 2 * kRows + h];
    if (m != -INFINITY) Lsum += ml[s * 2 * kRows + kRows + h] * exp2f(m - M);
  }
  Lsum = warp_sum(Lsum);
  return Lsum > 0 ? M + log2f(Lsum) : -INFINITY;
}

// grid (chunks, Bs * Hkv), kSelectThreads threads: Eq. 8-10 for the selection blocks
// [chunk * jb, chunk * jb + jb) of an item, into block_scores; the item's last CTA to finish
// (an arrival count per item) reads all its block scores back and runs the top-n (Eq. 11). The
// chunks spread the score reads over many SMs even at batch 1, where a step has only Hkv items.
// Shared memory: sLse [16] | sCol [jb l'/d + l/d + 2]; the top-n reuses it as P [NBs] | hist [290].
constexpr int kSelectThreads = 256;
__global__ void __launch_bounds__(kSelectThreads) dec_select_kernel(DecParams p) {
  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ bool last;
  const int tid = threadIdx.x, nth = blockDim.x, warp = tid / 32, lane = tid % 32;
  const int item = blockIdx.y, r = item / p.Hkv, t = p.pos[r], G = p.G;
  const int nv = cmp_visible(t, p.cmp_len, p.cmp_stride), valid = slc_valid(t, p.slc_len);
  const int ns = nv > 0 ? (nv + p.rc - 1) / p.rc : 0;  // compression splits that saw keys
  const int j0 = blockIdx.x * p.jb, j1 = min(valid, j0 + p.jb);
  // The compressed rows [ia, ib] that overlap blocks [j0, j1) (empty when ib < ia).
  const int ia = j0 < j1 ? overlap_first(j0, p.cmp_len, p.cmp_stride, p.slc_len) : 0;
  const int ib = j0 < j1 ? min(nv - 1, overlap_last(j1 - 1, p.cmp_stride, p.slc_len)) : -1;
  pdl_release();
  pdl_wait();  // the compression splits' scores and statistics
  float* sLse = reinterpret_cast<float*>(smem);
  float* sCol = sLse + kRows;
  const float* sc = p.scores + int64_t(item) * G * p.Ncs;

  // This thread's first row: its G scores are loaded before the lse is known (no dependence).
  float v[kRows];
  const int i0 = ia + tid;
#pragma unroll
  for (int h = 0; h < kRows; ++h) v[h] = h < G && i0 <= ib ? sc[int64_t(h) * p.Ncs + i0] : 0.0f;
  const int S = p.sc + p.sw + p.ss;
  for (int h = warp; h < G; h += nth / 32) {
    const float lse = warp_lse(p.part_ml + int64_t(item) * S * 2 * kRows, ns, h, lane);
    if (lane == 0) sLse[h] = lse;
  }
  __syncthreads();
  // Eq. 8 and 10: p = exp(s q.k - lse) of every compressed row, summed over the group's heads in
  // ascending order; each column by the same operations, so equal keys give equal sums.
  for (int i = i0; i <= ib; i += nth) {
    if (i != i0)
#pragma unroll
      for (int h = 0; h < kRows; ++h) v[h] = h < G ? sc[int64_t(h) * p.Ncs + i] : 0.0f;
    float a = 0;
#pragma unroll
    for (int h = 0; h < kRows; ++h)
      if (h < G) a += exp2f(v[h] - sLse[h]);
    sCol[i - ia] = a;
  }
  __syncthreads();
  // Eq. 9: each block's overlapping compressed rows in ascending order (a sequential sum that is
  // the same whatever the chunks, so exactly tied blocks stay tied, as in the forward kernels).
  float* P = p.block_scores + int64_t(item) * p.NBs;
  for (int j = j0 + tid; j < min(j0 + p.jb, p.NBs); j += nth) {
    float acc = 0;
    if (j < valid) {
      const int a = overlap_first(j, p.cmp_len, p.cmp_stride, p.slc_len), b = min(nv - 1, overlap_last(j, p.cmp_stride, p.slc_len));
      for (int i = a; i <= b; ++i) acc += sCol[i - ia] * overlap_weight(i, j, p.cmp_len, p.cmp_stride, p.slc_len);
    }
    P[j] = acc;
  }

  // The last CTA of the item: every chunk's scores are written (each CTA fences before it counts).
  __threadfence();
  __syncthreads();
  if (tid == 0) {
    last = atomicAdd(p.sel_arrive + item, 1) == int(gridDim.x) - 1;
    if (last) p.sel_arrive[item] = 0;  // ready for the next step
  }
  __syncthreads();
  if (!last) return;
  __threadfence();
  float* sP = reinterpret_cast<float*>(smem);
  for (int j = tid; j < valid; j += nth) sP[j] = __ldcg(P + j);  // L2: other SMs wrote them
  __syncthreads();
  select_cta(sP, t, p, reinterpret_cast<int*>(sP + p.NBs), p.block_idx + int64_t(item) * p.slc_count, tid, nth);
}

// sum_s f[s] * x[s * stride] in ascending s, eight loads in flight at a time.
__device__ __forceinline__ float weighted_sum(const float* f, const float* x, int64_t stride, int ns) {
  float acc = 0;
  int s = 0;
  for (; s + 8 <= ns; s += 8) {
    float v[8];
#pragma unroll
    for (int k = 0; k < 8; ++k) v[k] = x[(s + k) * stride];
#pragma unroll
    for (int k = 0; k < 8; ++k) acc += f[s + k] * v[k];
  }
  for (; s < ns; ++s) acc += f[s] * x[s * stride];
  return acc;
}

// grid (Bs * Hkv, G), 128 threads: one query head of an item. Warps 0-2 merge the statistics of
// the compression, window and selection partials into lse and per-slot weights exp2(m_s - lse);
// then each thread forms its output columns of O_cmp, O_win, O_slc and Eq. 5.
// Shared memory: sF [S] | sLse [3].
template <class T>
__global__ void __launch_bounds__(128) dec_combine_kernel(DecParams p) {
  extern __shared__ __align__(16) unsigned char smem[];
  const int tid = threadIdx.x, nth = blockDim.x, warp = tid / 32, lane = tid % 32;
  const int item = blockIdx.x, h = blockIdx.y, r = item / p.Hkv, g = item % p.Hkv, t = p.pos[r];
  const int S = p.sc + p.sw + p.ss;
  float* sF = reinterpret_cast<float*>(smem);
  float* sLse = sF + S;
  // The branches' slots: first slot and the number that saw keys.
  const int nv = cmp_visible(t, p.cmp_len, p.cmp_stride);
  const int s0[3] = {0, p.sc, p.sc + p.sw};
  const int ns[3] = {nv > 0 ? (nv + p.rc - 1) / p.rc : 0, (t - win_start(t, p.window) + 1 + p.rw - 1) / p.rw,
                     (min(p.slc_count, slc_valid(t, p.slc_len)) * p.slc_len + p.rs - 1) / p.rs};
  const float* ml = p.part_ml + int64_t(item) * S * 2 * kRows;
  pdl_wait();  // the selection splits' partials (and, through them, every earlier kernel's)
  if (warp < 3) {
    const float* mlb = ml + s0[warp] * 2 * kRows;
    const float lse = warp_lse(mlb, ns[warp], h, lane);
    for (int s = lane; s < ns[warp]; s += 32) {
      const float m = mlb[s * 2 * kRows + h];
      sF[s0[warp] + s] = m == -INFINITY || lse == -INFINITY ? 0.0f : exp2f(m - lse);
    }
    if (lane == 0) sLse[warp] = lse;
  }
  __syncthreads();
  const int64_t th = int64_t(r) * p.Hq + g * p.G + h;  // (token, head) row
  if (tid < 3) {
    float* lse_out = tid == 0 ? p.lse_cmp : tid == 1 ? p.lse_win : p.lse_slc;
    lse_out[th] = sLse[tid] == -INFINITY ? -INFINITY : sLse[tid] * kLn2;
  }
  const float* po = p.part_o + (int64_t(item) * S * kRows + h) * p.dv;  // slot s at po + s * 16 * dv
  const int64_t stride = int64_t(kRows) * p.dv;
  T* oc = static_cast<T*>(p.o_cmp) + th * p.dv;
  T* ow = static_cast<T*>(p.o_win) + th * p.dv;
  T* os = static_cast<T*>(p.o_slc) + th * p.dv;
  T* o = static_cast<T*>(p.o) + th * p.dv;
  const float* gt = p.gates + th * 3;
  for (int c = tid; c < p.dv; c += nth) {
    const T vc = from_f<T>(weighted_sum(sF, po + c, stride, ns[0]));
    const T vw = from_f<T>(weighted_sum(sF + s0[1], po + s0[1] * stride + c, stride, ns[1]));
    const T vs = from_f<T>(weighted_sum(sF + s0[2], po + s0[2] * stride + c, stride, ns[2]));
    oc[c] = vc, ow[c] = vw, os[c] = vs;
    o[c] = from_f<T>(gt[0] * to_f(vc) + gt[1] * to_f(vs) + gt[2] * to_f(vw));  // Eq. 5 on the stored outputs
  }
}

// grid (Bs, Hkv): the new tokens' rows into the cache, before a compressed row is emitted.
template <class T>
__global__ void dec_append_kernel(DecParams p) {
  append_group<T>(p, blockIdx.x, blockIdx.y, threadIdx.x, blockDim.x);
}

// phi = mean for the emitted blocks: grid (M, Hkv); the fp32 sum of the l rows divided by l
// (ref::compress's order). emit: [3, M] = sequence b, first token u0, destination row b*Ncap + i.
template <class T>
__global__ void dec_emit_mean_kernel(DecParams p, DecEmit em, bool values) {
  const int e = blockIdx.x, h = blockIdx.y, M = em.M;
  const int64_t b = em.rows[e], u0 = em.rows[M + e], dst = em.rows[2 * M + e];
  const int D = values ? p.dv : p.dk;
  const void* tail = values ? p.v_tail : p.k_tail;
  const void* hist = values ? p.v_slc : p.k_slc;
  T* out = static_cast<T*>(values ? p.v_cmp : p.k_cmp) + (dst * p.Hkv + h) * D;
  for (int c = threadIdx.x; c < D; c += blockDim.x) {
    float s = 0;
    for (int rr = 0; rr < p.cmp_len; ++rr) s += to_f(raw_row<T>(p, tail, p.L, p.cmp_len, hist, b, int(u0 + rr), D)[h * D + c]);
    out[c] = from_f<T>(s / float(p.cmp_len));
  }
}

// linear/mlp: X[h, e, rr*D + c] = raw(b, u0 + rr)[h, c] + pe[h, rr, c]; grid (M, Hkv).
template <class T>
__global__ void dec_emit_gather_kernel(DecParams p, DecEmit em, bool values, const float* __restrict__ pe,
                                       T* __restrict__ X) {
  const int e = blockIdx.x, h = blockIdx.y, M = em.M;
  const int64_t b = em.rows[e], u0 = em.rows[M + e];
  const int D = values ? p.dv : p.dk;
  const void* tail = values ? p.v_tail : p.k_tail;
  const void* hist = values ? p.v_slc : p.k_slc;
  const int64_t lD = int64_t(p.cmp_len) * D;
  T* dst = X + (int64_t(h) * M + e) * lD;
  for (int64_t x = threadIdx.x; x < lD; x += blockDim.x) {
    const int rr = int(x / D), c = int(x % D);
    dst[x] = from_f<T>(to_f(raw_row<T>(p, tail, p.L, p.cmp_len, hist, b, int(u0 + rr), D)[h * D + c]) +
                       pe[(int64_t(h) * p.cmp_len + rr) * D + c]);
  }
}

template <class Fn>
void dispatch_elem(Precision prec, Fn&& fn) {
  if (prec == Precision::BF16) fn(__nv_bfloat16{});
  else if (prec == Precision::FP16) fn(__half{});
  else throw ConfigError("the decode kernels take bf16 or fp16 operands (fp32 has no decode step)");
}

// kernel<<<grid, block, smem, s>>>(args...), with programmatic dependent launch when pdl.
template <class... Params, class... Args>
void dec_launch(void (*kernel)(Params...), dim3 grid, int block, size_t smem, cudaStream_t s, bool pdl,
                Args&&... args) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid, cfg.blockDim = dim3(unsigned(block)), cfg.dynamicSmemBytes = smem, cfg.stream = s;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr, cfg.numAttrs = pdl ? 1 : 0;
  NSA_CUDA_CHECK(cudaLaunchKernelEx(&cfg, kernel, std::forward<Args>(args)...));
}

}  // namespace

size_t dec_split_smem(const DecParams& p, Precision prec) {
  const size_t stages = p.kernel == 3   ? split_stage_bytes<3>(p.dk, p.dv, element_size(prec))
                        : p.kernel == 2 ? split_stage_bytes<2>(p.dk, p.dv, element_size(prec))
                                        : split_stage_bytes<1>(p.dk, p.dv, element_size(prec));
  return stages + size_t(p.slc_count) * 4;
}

int dec_split_threads(const DecParams& p) {
  return 32 * (p.kernel == 3 ? SplitShape<3>::kWarps : p.kernel == 2 ? SplitShape<2>::kWarps : SplitShape<1>::kWarps);
}

// Calls fn(kernel) with the split kernel of the precision, head dims and version.
template <class Fn>
void with_split_kernel(Precision prec, const DecParams& p, Fn&& fn) {
  dispatch_elem(prec, [&](auto e) {
    using T = decltype(e);
    const bool ok = dispatch_dims(p.dk, p.dv, [&](auto DK, auto DV) {
      constexpr int A = decltype(DK)::value, B = decltype(DV)::value;
      if (p.kernel == 1) fn(dec_split_kernel<T, A, B, 1>);
      else if (p.kernel == 2) fn(dec_split_kernel<T, A, B, 2>);
      else fn(dec_split_kernel<T, A, B, 3>);
    });
    if (!ok) throw ConfigError(cat("dk = ", p.dk, ", dv = ", p.dv, " are not compiled for the decode kernels (NSA_CUDA_DIMS)"));
  });
}

int dec_init(Precision prec, const DecParams& p, int optin) {
  // The attribute is the kernel's, process-wide: the device's limit serves every Decoder, and the
  // launches need no call of their own (they would be host time in every step).
  // The dynamic limit is what the kernel's static shared memory leaves of `optin`.
  auto allow = [optin](const void* k) {
    cudaFuncAttributes a{};
    NSA_CUDA_CHECK(cudaFuncGetAttributes(&a, k));
    NSA_CUDA_CHECK(cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, optin - int(a.sharedSizeBytes)));
  };
  int ctas = 0;
  const size_t smem = dec_split_smem(p, prec);
  with_split_kernel(prec, p, [&](auto* k) {
    allow(reinterpret_cast<const void*>(k));
    NSA_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&ctas, k, dec_split_threads(p), smem));
  });
  allow(reinterpret_cast<const void*>(dec_select_kernel));
  return ctas;
}

void dec_split(Precision prec, const DecParams& p, bool selection, bool pdl, cudaStream_t s) {
  const size_t smem = dec_split_smem(p, prec);
  const dim3 grid(unsigned(selection ? p.ss : p.sc + p.sw), unsigned(p.Bs * p.Hkv));
  with_split_kernel(prec, p, [&](auto* k) {
    dec_launch(k, grid, dec_split_threads(p), smem, s, pdl, p, int(selection ? kSlc : kCmp));
  });
}

int dec_select_blocks_per_cta(const DecParams& p) {
  // The rows of jb blocks, (jb l' + l) / d + 2 at most, fit one per thread.
  return std::max(1, ((kSelectThreads - 2) * p.cmp_stride - p.cmp_len) / p.slc_len);
}

size_t dec_select_smem(const DecParams& p, int NBcap) {
  const size_t cols = size_t(p.jb) * p.slc_len / p.cmp_stride + size_t(p.cmp_len) / p.cmp_stride + 2;
  return std::max(size_t(kRows) + cols, size_t(NBcap) + 256 + 32 + 2) * 4;
}

void dec_select(const DecParams& p, int NBcap, bool pdl, cudaStream_t s) {
  const dim3 grid(unsigned((p.NBs + p.jb - 1) / p.jb), unsigned(p.Bs * p.Hkv));
  dec_launch(dec_select_kernel, grid, kSelectThreads, dec_select_smem(p, NBcap), s, pdl, p);
}

size_t dec_combine_smem(const DecParams& p) { return (size_t(p.sc + p.sw + p.ss) + 4) * 4; }

void dec_combine(Precision prec, const DecParams& p, bool pdl, cudaStream_t s) {
  dispatch_elem(prec, [&](auto e) {
    using T = decltype(e);
    dec_launch(dec_combine_kernel<T>, dim3(unsigned(p.Bs * p.Hkv), unsigned(p.G)), 128, dec_combine_smem(p), s, pdl, p);
  });
}

void dec_append(Precision prec, const DecParams& p, cudaStream_t s) {
  dispatch_elem(prec, [&](auto e) {
    using T = decltype(e);
    dec_append_kernel<T><<<dim3(unsigned(p.Bs), unsigned(p.Hkv)), 64, 0, s>>>(p);
  });
  NSA_CUDA_CHECK_LAUNCH("dec_append_kernel");
}

void dec_emit_mean(Precision prec, const DecParams& p, const DecEmit& em, bool values, cudaStream_t s) {
  dispatch_elem(prec, [&](auto e) {
    using T = decltype(e);
    dec_emit_mean_kernel<T><<<dim3(unsigned(em.M), unsigned(p.Hkv)), 128, 0, s>>>(p, em, values);
  });
  NSA_CUDA_CHECK_LAUNCH("dec_emit_mean_kernel");
}

void dec_emit_gather(Precision prec, const DecParams& p, const DecEmit& em, bool values, const float* pe, void* X,
                     cudaStream_t s) {
  dispatch_elem(prec, [&](auto e) {
    using T = decltype(e);
    dec_emit_gather_kernel<T><<<dim3(unsigned(em.M), unsigned(p.Hkv)), 256, 0, s>>>(p, em, values, pe,
                                                                                    static_cast<T*>(X));
  });
  NSA_CUDA_CHECK_LAUNCH("dec_emit_gather_kernel");
}

}  // namespace nsa::cuda
