// Top-n block selection (docs/spec.md 4, Eq. 11), the CUDA twin of ref::select_blocks: given the
// group scores P[j] of query t's valid blocks, the forced blocks (the first init_blocks and the
// local_blocks ending at t's own block) plus the highest-scoring others, n in all, ascending,
// -1 padding. Ranking: higher score first, exactly equal scores to the lower index, NaN last.
//
// select_serial and select_warp pick the others one at a time as "the best block ranked strictly
// after the previous pick", which needs no marks and reproduces the reference's strict order
// exactly; select_cta (the decode step) finds the n-th best key by a radix select instead.
#pragma once

#include <climits>

#include "device.cuh"

namespace nsa::cuda::dev {

struct Forced {
  int init, lo, own;  // forced: j < init, or lo <= j <= own
  __device__ bool has(int j) const { return j < init || (j >= lo && j <= own); }
  // Number of forced blocks (the two ranges may overlap).
  __device__ int count() const {
    const int a = lo > init ? lo : init;
    return init + (own >= a ? own - a + 1 : 0);
  }
};

__device__ __forceinline__ Forced forced_blocks(const LayerParams& p, int t) {
  const int own = t / p.slc_len, lo = own - p.local_blocks + 1;
  return {p.init_blocks, lo > 0 ? lo : 0, own};  // init_blocks <= n < valid whenever it is used
}

// One thread (the fp32 kernel): writes out[0, n) in global memory.
__device__ inline void select_serial(const float* P, int t, const LayerParams& p, int32_t* out) {
  const int valid = slc_valid(t, p.slc_len), n = p.slc_count;
  if (valid <= n) {  // every valid block fits
    for (int m = 0; m < n; ++m) out[m] = m < valid ? m : -1;
    return;
  }
  const Forced f = forced_blocks(p, t);
  int m = 0;
  for (int j = 0; j < valid; ++j)
    if (f.has(j)) out[m++] = j;
  int prev = -1;
  float prev_key = INFINITY;
  for (; m < n; ++m) {
    int best = -1;
    float best_key = 0;
    for (int j = 0; j < valid; ++j) {
      if (f.has(j)) continue;
      const float k = rank_key(P[j]);
      if (prev >= 0 && !ranks_before(prev_key, prev, k, j)) continue;  // already picked
      if (best < 0 || ranks_before(k, j, best_key, best)) best = j, best_key = k;
    }
    out[m] = best;
    prev = best, prev_key = best_key;
  }
  for (int a = 1; a < n; ++a) {  // ascending
    const int32_t x = out[a];
    int b = a - 1;
    for (; b >= 0 && out[b] > x; --b) out[b + 1] = out[b];
    out[b + 1] = x;
  }
}

// One warp: P in shared memory, list[n] shared scratch; writes out[0, n) in global
// memory. Each round scans the valid blocks lane-strided and reduces (key, index) over the warp.
__device__ inline void select_warp(const float* P, int t, const LayerParams& p, int* list, int32_t* out, int lane) {
  const int valid = slc_valid(t, p.slc_len), n = p.slc_count;
  if (valid <= n) {
    for (int m = lane; m < n; m += 32) out[m] = m < valid ? m : -1;
    return;
  }
  const Forced f = forced_blocks(p, t);
  const int nf = f.count();
  if (lane == 0) {
    int m = 0;
    for (int j = 0; j < f.init; ++j) list[m++] = j;
    for (int j = f.lo > f.init ? f.lo : f.init; j <= f.own; ++j) list[m++] = j;
  }
  float prev_key = INFINITY;
  int prev = -1;
  for (int r = nf; r < n; ++r) {
    float bk = -INFINITY;
    int bi = INT_MAX;  // none yet
    for (int j = lane; j < valid; j += 32) {
      if (f.has(j)) continue;
      const float k = rank_key(P[j]);
      if (!ranks_before(prev_key, prev, k, j)) continue;  // already picked
      if (bi == INT_MAX || ranks_before(k, j, bk, bi)) bk = k, bi = j;
    }
    for (int o = 16; o > 0; o /= 2) {
      const float ok = __shfl_xor_sync(0xffffffffu, bk, o);
      const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
      if (oi != INT_MAX && (bi == INT_MAX || ranks_before(ok, oi, bk, bi))) bk = ok, bi = oi;
    }
    prev_key = bk, prev = bi;
    if (lane == 0) list[r] = bi;
  }
  __syncwarp();
  if (lane == 0)
    for (int a = 1; a < n; ++a) {
      const int x = list[a];
      int b = a - 1;
      for (; b >= 0 && list[b] > x; --b) list[b + 1] = list[b];
      list[b + 1] = x;
    }
  __syncwarp();
  for (int m = lane; m < n; m += 32) out[m] = list[m];
  __syncwarp();
}

// One warp (topn_mma): select_warp's result with far fewer passes over the scores. select_warp
// rescans all valid blocks in each of its n - nf rounds (13 rounds over up to 1024 blocks at T =
// 64k). Here K = n - nf <= 32 (else: select_warp): each lane finds the best block of its strided
// share; tau = the K-th best of those 32 lane maxima, so at least K blocks have key >= tau and
// every one of the K best has key >= tau. Those candidates are compacted in ascending order into
// cand[cap] (shared scratch), and select_warp's rounds run over them alone. With more than cap
// candidates (e.g. many exactly tied scores) it falls back to select_warp. list[n] shared scratch.
__device__ inline void select_warp_filtered(const float* P, int t, const LayerParams& p, int* list, int* cand, int cap,
                                            int32_t* out, int lane) {
  const int valid = slc_valid(t, p.slc_len), n = p.slc_count;
  const Forced f = forced_blocks(p, t);
  const int nf = valid <= n ? 0 : f.count(), K = n - nf;
  if (valid <= n || K <= 0 || K > 32) return select_warp(P, t, p, list, out, lane);
  float lk = -INFINITY;  // the lane's best (key, index); INT_MAX: the lane has no block
  int li = INT_MAX;
  for (int j = lane; j < valid; j += 32) {
    if (f.has(j)) continue;
    const float k = rank_key(P[j]);
    if (li == INT_MAX || ranks_before(k, j, lk, li)) lk = k, li = j;
  }
  int rank = 0;  // lanes whose best ranks before this lane's
  for (int o = 1; o < 32; ++o) {
    const float ok = __shfl_xor_sync(0xffffffffu, lk, o);
    const int oi = __shfl_xor_sync(0xffffffffu, li, o);
    rank += oi != INT_MAX && (li == INT_MAX || ranks_before(ok, oi, lk, li));
  }
  const unsigned at = __ballot_sync(0xffffffffu, li != INT_MAX && rank == K - 1);
  const float tau = at ? __shfl_sync(0xffffffffu, lk, __ffs(at) - 1) : -INFINITY;
  int c = 0;
  for (int j0 = 0; j0 < valid; j0 += 32) {
    const int j = j0 + lane;
    const bool take = j < valid && !f.has(j) && rank_key(P[j]) >= tau;
    const unsigned m = __ballot_sync(0xffffffffu, take);
    const int at_c = c + __popc(m & ((1u << lane) - 1));
    if (take && at_c < cap) cand[at_c] = j;
    c += __popc(m);
  }
  if (c > cap) return select_warp(P, t, p, list, out, lane);
  __syncwarp();
  if (lane == 0) {
    int m = 0;
    for (int j = 0; j < f.init; ++j) list[m++] = j;
    for (int j = f.lo > f.init ? f.lo : f.init; j <= f.own; ++j) list[m++] = j;
  }
  float prev_key = INFINITY;
  int prev = -1;
  for (int r = nf; r < n; ++r) {  // select_warp's rounds over the candidates
    float bk = -INFINITY;
    int bi = INT_MAX;
    for (int e = lane; e < c; e += 32) {
      const int j = cand[e];
      const float k = rank_key(P[j]);
      if (!ranks_before(prev_key, prev, k, j)) continue;  // already picked
      if (bi == INT_MAX || ranks_before(k, j, bk, bi)) bk = k, bi = j;
    }
    for (int o = 16; o > 0; o /= 2) {
      const float ok = __shfl_xor_sync(0xffffffffu, bk, o);
      const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
      if (oi != INT_MAX && (bi == INT_MAX || ranks_before(ok, oi, bk, bi))) bk = ok, bi = oi;
    }
    prev_key = bk, prev = bi;
    if (lane == 0) list[r] = bi;
  }
  __syncwarp();
  if (lane == 0)
    for (int a = 1; a < n; ++a) {
      const int x = list[a];
      int b = a - 1;
      for (; b >= 0 && list[b] > x; --b) list[b + 1] = list[b];
      list[b + 1] = x;
    }
  __syncwarp();
  for (int m = lane; m < n; m += 32) out[m] = list[m];
  __syncwarp();
}

// ---- the decode step's top-n: one query, up to thousands of blocks, all threads of a CTA ----

// rank_key as an unsigned integer of the same order: a ranks above b (by score) exactly when
// rank_bits(a) > rank_bits(b). -0 and +0 are one key (ranks_before compares values); NaN is -inf.
// Every key is > 0, so 0 is free to mark "not a candidate".
__device__ __forceinline__ uint32_t rank_bits(float s) {
  float k = rank_key(s);
  if (k == 0.0f) k = 0.0f;
  const uint32_t u = __float_as_uint(k);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// Exclusive prefix sum of v over the CTA's threads in thread order (nth a multiple of 32, at
// most 1024); *total gets the sum. sw: 32 ints of shared scratch. Every thread must call it.
__device__ __forceinline__ int cta_exclusive_scan(int v, int* sw, int* total, int tid, int nth) {
  const int lane = tid & 31, warp = tid >> 5, nw = nth >> 5;
  int x = v;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int y = __shfl_up_sync(0xffffffffu, x, o);
    if (lane >= o) x += y;
  }
  if (lane == 31) sw[warp] = x;
  __syncthreads();
  if (warp == 0) {
    int s = lane < nw ? sw[lane] : 0;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const int y = __shfl_up_sync(0xffffffffu, s, o);
      if (lane >= o) s += y;
    }
    sw[lane] = s;  // inclusive sums of the warps
  }
  __syncthreads();
  const int base = warp > 0 ? sw[warp - 1] : 0;
  *total = sw[nw - 1];
  __syncthreads();  // sw is free again
  return base + x - v;
}

// select_warp's result with every thread of a CTA: the forced blocks plus the K = n - nf best
// others, ascending. A radix select finds the K-th best key T of the non-forced blocks (8 bits a
// pass, most significant first, a shared histogram per pass): the others above T are taken, and
// of those equal to T the lowest indices, as many as are still wanted (the tie rule). Then one
// prefix sum over the blocks in index order places the chosen ones in ascending order.
// P [valid] in shared memory is overwritten by the keys; hist [256 + 32 + 2] ints of shared
// scratch; out [n] global. Threads own contiguous runs of blocks, so the scans run in index order.
__device__ inline void select_cta(float* P, int t, const LayerParams& p, int* hist, int32_t* out, int tid, int nth) {
  const int valid = slc_valid(t, p.slc_len), n = p.slc_count;
  if (valid <= n) {  // every valid block fits
    for (int m = tid; m < n; m += nth) out[m] = m < valid ? m : -1;
    return;
  }
  const Forced f = forced_blocks(p, t);
  const int K = n - f.count();
  const int lane = tid & 31;
  int* sw = hist + 256;  // [32] scan scratch
  int* sel = sw + 32;    // [2] the chosen digit and the count still wanted
  uint32_t* key = reinterpret_cast<uint32_t*>(P);
  const int per = (valid + nth - 1) / nth, j0 = min(valid, tid * per), j1 = min(valid, j0 + per);
  for (int j = j0; j < j1; ++j) key[j] = f.has(j) ? 0u : rank_bits(P[j]);  // own run: no barrier needed

  uint32_t T = 0xffffffffu;  // no K-th key when K = 0: nothing ranks above it
  int need = 0;
  if (K > 0) {
    uint32_t prefix = 0, mask = 0;
    need = K;
    for (int shift = 24; shift >= 0; shift -= 8) {
      for (int i = tid; i < 256; i += nth) hist[i] = 0;
      __syncthreads();
      // Candidates under the prefix, by digit; lanes holding the same digit add once (the keys of
      // neighbouring blocks often share their high bits).
      for (int k = 0; k < per; ++k) {
        const int j = j0 + k;
        const uint32_t u = j < j1 ? key[j] : 0u;
        const bool ok = u != 0u && (u & mask) == prefix;
        const int bin = ok ? int((u >> shift) & 0xffu) : 256;
        const unsigned peers = __match_any_sync(0xffffffffu, bin);
        if (ok && lane == __ffs(peers) - 1) atomicAdd(&hist[bin], __popc(peers));
      }
      __syncthreads();
      if (tid < 32) {  // the digit d with (candidates above d) < need <= (those) + hist[d]
        int c[8], sum = 0;
#pragma unroll
        for (int k = 0; k < 8; ++k) sum += (c[k] = hist[255 - (lane * 8 + k)]);
        int incl = sum;
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
          const int y = __shfl_up_sync(0xffffffffu, incl, o);
          if (lane >= o) incl += y;
        }
        int above = incl - sum;
        if (above < need && need <= incl)
#pragma unroll
          for (int k = 0; k < 8; ++k) {
            if (need <= above + c[k]) {
              sel[0] = 255 - (lane * 8 + k), sel[1] = need - above;
              break;
            }
            above += c[k];
          }
      }
      __syncthreads();
      prefix |= uint32_t(sel[0]) << shift, mask |= 0xffu << shift;
      need = sel[1];
    }
    T = prefix;
  }
  // Of the blocks whose key is T, the first `need` in index order; then every chosen block's place.
  int eq = 0;
  for (int j = j0; j < j1; ++j) eq += key[j] == T;
  int total = 0;
  int eq_before = cta_exclusive_scan(eq, sw, &total, tid, nth);
  int mine = 0;
  for (int j = j0; j < j1; ++j) {
    const uint32_t u = key[j];
    mine += u == 0u || u > T || (u == T && eq_before++ < need);  // key 0: a forced block
  }
  int at = cta_exclusive_scan(mine, sw, &total, tid, nth);
  eq_before -= eq;
  for (int j = j0; j < j1; ++j) {
    const uint32_t u = key[j];
    if (u == 0u || u > T || (u == T && eq_before++ < need)) out[at++] = j;
  }
}

}  // namespace nsa::cuda::dev
