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

// Eq. 9: |[i d, i d + l) ∩ [j l', (j+1) l')| / d.
__device__ __forceinline__ float overlap_weight(int i, int j, int l, int d, int ls) {
  const int a = max(i * d, j * ls), b = min(i * d + l, (j + 1) * ls);
  return b > a ? float(b - a) / float(d) : 0.0f;
}

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

// ============================== v1: tensor cores ==============================
// One CTA per (tile of BT positions, KV group): R = 16 * nwarps rows, row r = (position r / G,
// head r % G), so each warp's 16 rows are the m16 of its mma tiles and hold all G heads of
// 16 / G positions (G <= 16). Compressed keys stream through shared memory in tiles of 64,
// double-buffered with cp.async. Shared memory (bytes):
//   sQ [R, DK] elem | sK [2][64, DK] elem | sV [2][64, DV] elem | sCs [BT][64] f32 column sums
//   over the group's heads | sBlk [BT][NB] f32 group scores (Eq. 10) | sList [BT][n] int top-n
constexpr int kKeys = 64;

// Eq. 10 before Eq. 9 (both are sums): column sums of p over the G rows of each position, into
// sCs[position][key]. Rows lane / 4 and lane / 4 + 8 of the warp belong to positions posA, posB;
// the G rows of one position are the lanes whose lane / 4 differ in the low log2(G) bits
// (G = 16: all of them, both rows). G <= 16.
__device__ __forceinline__ void column_sums(const float (&s)[8][4], float* sCs, int posA, int posB, int G, int lane) {
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
        if (lane < 4) sCs[posA * kKeys + col] = a;
      } else {
        for (int o = 4; o < 4 * G; o *= 2) {
          a += __shfl_xor_sync(0xffffffffu, a, o);
          c += __shfl_xor_sync(0xffffffffu, c, o);
        }
        if ((lane >> 2) % G == 0) {
          sCs[posA * kKeys + col] = a;
          sCs[posB * kKeys + col] = c;
        }
      }
    }
}

struct CmpSmem {
  size_t q, k, v, cs, blk, list, total;
  __host__ __device__ CmpSmem(int R, int BT, int DK, int DV, int NB, int n, int esize, int stages = 2) {
    q = 0;
    k = q + size_t(R) * DK * esize;
    v = k + size_t(stages) * kKeys * DK * esize;
    cs = v + size_t(stages) * kKeys * DV * esize;
    blk = cs + size_t(BT) * kKeys * 4;
    list = blk + size_t(BT) * NB * 4;
    total = list + size_t(BT) * n * 4;
  }
};

template <class T, int DK, int DV>
__global__ void __launch_bounds__(128) cmp_attn_v1_kernel(FwdParams p, TileMap tm) {
  extern __shared__ __align__(16) unsigned char smem[];
  const int nw = blockDim.x / 32, R = 16 * nw, G = p.G, BT = R / G;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const CmpSmem L(R, BT, DK, DV, p.NB, p.n, sizeof(T));
  T* sQ = reinterpret_cast<T*>(smem + L.q);
  T* sK = reinterpret_cast<T*>(smem + L.k);
  T* sV = reinterpret_cast<T*>(smem + L.v);
  float* sCs = reinterpret_cast<float*>(smem + L.cs);
  float* sBlk = reinterpret_cast<float*>(smem + L.blk);
  int* sList = reinterpret_cast<int*>(smem + L.list);

  // Longest tiles first: later positions see more compressed keys.
  const int64_t x = tm.total - 1 - blockIdx.x;
  const int g = blockIdx.y;
  const int b = find_seq(tm.cu_tiles, p.B, x);
  const int t0 = int(x - tm.cu_tiles[b]) * BT;
  const int64_t row0 = p.cu_seqlens[b], cmp0 = p.cu_cmp[b];
  const int T_b = int(p.cu_seqlens[b + 1] - row0);
  const int t_last = min(t0 + BT, T_b) - 1;
  const int nv_max = cmp_visible(t_last, p.l, p.d);
  const int nb_tile = slc_valid(t_last, p.ls);  // blocks any position of the tile can select

  const T* q = static_cast<const T*>(p.q);
  const T* kc = static_cast<const T*>(p.kc);
  const T* vc = static_cast<const T*>(p.vc);
  auto q_row = [&](int r) -> const T* {
    const int pos = r / G, t = t0 + pos;
    return pos < BT && t < T_b ? q + ((row0 + t) * p.Hq + g * G + r % G) * DK : nullptr;
  };
  const int Hkv = p.Hkv;
  auto k_src = [=](int ci) -> const T* { return ci < nv_max ? kc + ((cmp0 + ci) * Hkv + g) * DK : nullptr; };
  auto v_src = [=](int ci) -> const T* { return ci < nv_max ? vc + ((cmp0 + ci) * Hkv + g) * DV : nullptr; };
  auto load_k = [&](int kt) {
    load_tile_async<DK>(sK + (kt & 1) * kKeys * DK, kKeys, [&](int i) { return k_src(kt * kKeys + i); }, kc, tid,
                        int(blockDim.x));
  };
  auto load_v = [&](int kt) {
    load_tile_async<DV>(sV + (kt & 1) * kKeys * DV, kKeys, [&](int i) { return v_src(kt * kKeys + i); }, vc, tid,
                        int(blockDim.x));
  };

  load_tile_async<DK>(sQ, R, q_row, q, tid, int(blockDim.x));
  const int ntiles = (nv_max + kKeys - 1) / kKeys;
  if (ntiles > 0) load_k(0);
  cp_async_commit();
  for (int e = tid; e < BT * nb_tile; e += blockDim.x) sBlk[(e / nb_tile) * p.NB + e % nb_tile] = 0;
  cp_async_wait<0>();
  __syncthreads();

  // This thread's two rows (mma D layout): A = 16 warp + lane / 4, B = A + 8.
  const int rA = 16 * warp + (lane >> 2), rB = rA + 8;
  const int posA = rA / G, posB = rB / G;
  const int tA = t0 + posA, tB = t0 + posB;
  const bool okA = posA < BT && tA < T_b, okB = posB < BT && tB < T_b;
  const int nvA = okA ? cmp_visible(tA, p.l, p.d) : 0, nvB = okB ? cmp_visible(tB, p.l, p.d) : 0;
  int nv_w = max(nvA, nvB);  // keys any row of this warp sees
  for (int o = 16; o > 0; o /= 2) nv_w = max(nv_w, __shfl_xor_sync(0xffffffffu, nv_w, o));
  const float sl2 = p.scale * kLog2e;  // scores in the log2 domain: exp(s x) = exp2(s log2e x)

  uint32_t qa[DK / 16][4];
  load_q_smem<DK>(qa, sQ, 16 * warp, lane);

  // ---- pass 1: row max and sum of exp, i.e. lse ----
  float mA = -INFINITY, mB = -INFINITY, lA = 0, lB = 0;
  for (int kt = 0; kt < ntiles; ++kt) {
    const bool more = kt + 1 < ntiles;
    if (more) load_k(kt + 1);
    cp_async_commit();
    if (more) cp_async_wait<1>();
    else cp_async_wait<0>();
    __syncthreads();
    if (kt * kKeys < nv_w) {
      float s[8][4];
      qk_tile<T, DK, kKeys>(s, qa, sK + (kt & 1) * kKeys * DK, lane);
#pragma unroll
      for (int nt = 0; nt < 8; ++nt)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int ci = kt * kKeys + nt * 8 + 2 * (lane & 3) + e;
          s[nt][e] = ci < nvA ? s[nt][e] * sl2 : -INFINITY;
          s[nt][2 + e] = ci < nvB ? s[nt][2 + e] * sl2 : -INFINITY;
        }
      softmax_step_masked(s, mA, mB, lA, lB);  // p is not needed in pass 1
    }
    __syncthreads();
  }
  quad_sum(lA, lB);
  const float lseA = lA > 0 ? mA + log2f(lA) : -INFINITY;  // log2 domain
  const float lseB = lB > 0 ? mB + log2f(lB) : -INFINITY;

  // ---- pass 2: p = exp2(x - lse); O = p V; column sums of p over the group's heads -> Eq. 9 ----
  float oacc[DV / 8][4];
#pragma unroll
  for (int nd = 0; nd < DV / 8; ++nd) oacc[nd][0] = oacc[nd][1] = oacc[nd][2] = oacc[nd][3] = 0;
  if (ntiles > 0) {
    load_k(0);
    load_v(0);
  }
  cp_async_commit();
  for (int kt = 0; kt < ntiles; ++kt) {
    const bool more = kt + 1 < ntiles;
    if (more) {
      load_k(kt + 1);
      load_v(kt + 1);
    }
    cp_async_commit();
    if (more) cp_async_wait<1>();
    else cp_async_wait<0>();
    __syncthreads();
    const bool active = kt * kKeys < nv_w;
    float s[8][4];
    if (active) {
      qk_tile<T, DK, kKeys>(s, qa, sK + (kt & 1) * kKeys * DK, lane);
#pragma unroll
      for (int nt = 0; nt < 8; ++nt)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int ci = kt * kKeys + nt * 8 + 2 * (lane & 3) + e;
          s[nt][e] = ci < nvA ? exp2f(s[nt][e] * sl2 - lseA) : 0.0f;
          s[nt][2 + e] = ci < nvB ? exp2f(s[nt][2 + e] * sl2 - lseB) : 0.0f;
        }
      pv_tile<T, DV, kKeys>(oacc, s, sV + (kt & 1) * kKeys * DV, lane);
    } else {
#pragma unroll
      for (int nt = 0; nt < 8; ++nt) s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0;
    }
    column_sums(s, sCs, posA, posB, G, lane);  // Eq. 10, into the CTA's sCs
    __syncthreads();
    // Eq. 9: selection block j gathers the tile's compressed blocks i that overlap it. One thread
    // per (position, j) adds them in ascending i onto the running score, so every score is the
    // same sequential sum whatever the tiling (exactly equal inputs give exactly equal scores,
    // which the tie rule relies on).
    {
      const int i0 = kt * kKeys, iend = min(i0 + kKeys, nv_max);
      const int jlo = i0 * p.d / p.ls, jhi = ((iend - 1) * p.d + p.l - 1) / p.ls, nj = jhi - jlo + 1;
      for (int e = tid; e < BT * nj; e += blockDim.x) {
        const int pos = e / nj, j = jlo + e % nj;
        const int lo_num = j * p.ls - p.l + 1;  // i d + l > j l'
        const int ia = max(i0, lo_num > 0 ? (lo_num + p.d - 1) / p.d : 0);
        const int ib = min(iend - 1, ((j + 1) * p.ls - 1) / p.d);  // i d < (j+1) l'
        float acc = sBlk[pos * p.NB + j];
        for (int i = ia; i <= ib; ++i) acc += sCs[pos * kKeys + (i - i0)] * overlap_weight(i, j, p.l, p.d, p.ls);
        sBlk[pos * p.NB + j] = acc;
      }
    }
    __syncthreads();
  }

  // ---- outputs of the branch: O (already normalised), lse ----
  const int hA = g * G + rA % G, hB = g * G + rB % G;
  store_rows<T, DV>(static_cast<T*>(p.o_cmp), ((row0 + tA) * p.Hq + hA) * DV, ((row0 + tB) * p.Hq + hB) * DV, okA,
                   okB, oacc, 1.0f, 1.0f, lane);
  if ((lane & 3) == 0) {
    if (okA) p.lse_cmp[(row0 + tA) * p.Hq + hA] = lseA * kLn2;
    if (okB) p.lse_cmp[(row0 + tB) * p.Hq + hB] = lseB * kLn2;
  }

  // ---- Eq. 11: one warp per position ----
  for (int pos = warp; pos < BT; pos += nw) {
    const int t = t0 + pos;
    if (t >= T_b) break;
    const float* P = sBlk + pos * p.NB;
    const int64_t gr = (row0 + t) * p.Hkv + g;
    if (p.block_scores) {
      const int valid = slc_valid(t, p.ls);
      for (int j = lane; j < p.NB; j += 32) p.block_scores[gr * p.NB + j] = j < valid ? P[j] : 0.0f;
    }
    select_warp(P, t, p, sList + pos * p.n, p.block_idx + gr * p.n, lane);
  }
}


// ============================== v2: v1 with the tile latency hidden ==============================
// Measured on the H100 (T = 64k, G = 16): v1 spends ~15k cycles per 64-key tile and CTA, several
// times its MMAs: it waits on each tile with only one prefetch in flight and three CTA barriers
// per tile. v2 keeps v1's algorithm and numerics and changes the schedule:
//   - 8 warps x 16 rows = 128 rows per CTA (BT = 128 / G positions), so each K/V tile brought on
//     chip serves twice the rows;
//   - 3 shared-memory stages: the tile a prefetch overwrites was read in the previous iteration,
//     before this iteration's barrier, so one barrier per tile suffices;
//   - Eq. 9 mapped by each warp for its own positions (G <= 16 keeps all heads of a position in
//     one warp): no barrier between the column sums and the mapping, a warp skips the tiles none
//     of its rows sees, and the top-n follows in the same warp without a CTA barrier.
//
// v3 is v2 with kLean: the measured v2 (ncu, T = 16k) issues ~15 instructions per mma, its warps
// stalled on dependent arithmetic with 2 warps per scheduler. kLean trims the per-element work:
// tiles every row of the warp sees in full skip the masks and take exp2 as one multiply-add and
// one MUFU (ex2.approx.ftz); tiles are copied from a row base and stride.
constexpr int kStages2 = 3;

template <class T, int DK, int DV, bool kLean>
__global__ void __launch_bounds__(256, 1) cmp_attn_v2_kernel(FwdParams p, TileMap tm) {
  extern __shared__ __align__(16) unsigned char smem[];
  const int nw = blockDim.x / 32, R = 16 * nw, G = p.G, BT = R / G;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const CmpSmem L(R, BT, DK, DV, p.NB, p.n, sizeof(T), kStages2);
  T* sQ = reinterpret_cast<T*>(smem + L.q);
  T* sK = reinterpret_cast<T*>(smem + L.k);
  T* sV = reinterpret_cast<T*>(smem + L.v);
  float* sCs = reinterpret_cast<float*>(smem + L.cs);
  float* sBlk = reinterpret_cast<float*>(smem + L.blk);
  int* sList = reinterpret_cast<int*>(smem + L.list);

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

  const T* q = static_cast<const T*>(p.q);
  const T* kc = static_cast<const T*>(p.kc);
  const T* vc = static_cast<const T*>(p.vc);
  const int Hkv = p.Hkv;
  auto q_row = [&](int r) -> const T* {
    const int t = t0 + r / G;
    return t < T_b ? q + ((row0 + t) * p.Hq + g * G + r % G) * DK : nullptr;
  };
  auto k_src = [=](int ci) -> const T* { return ci < nv_max ? kc + ((cmp0 + ci) * Hkv + g) * DK : nullptr; };
  auto v_src = [=](int ci) -> const T* { return ci < nv_max ? vc + ((cmp0 + ci) * Hkv + g) * DV : nullptr; };
  auto load_k = [&](int kt) {
    if constexpr (kLean)
      load_rows_async<DK>(sK + (kt % kStages2) * kKeys * DK, kKeys, kc + ((cmp0 + kt * kKeys) * Hkv + g) * DK,
                          int64_t(Hkv) * DK, nv_max - kt * kKeys, tid, int(blockDim.x));
    else
      load_tile_async<DK>(sK + (kt % kStages2) * kKeys * DK, kKeys, [&](int i) { return k_src(kt * kKeys + i); },
                          kc, tid, int(blockDim.x));
  };
  auto load_v = [&](int kt) {
    if constexpr (kLean)
      load_rows_async<DV>(sV + (kt % kStages2) * kKeys * DV, kKeys, vc + ((cmp0 + kt * kKeys) * Hkv + g) * DV,
                          int64_t(Hkv) * DV, nv_max - kt * kKeys, tid, int(blockDim.x));
    else
      load_tile_async<DV>(sV + (kt % kStages2) * kKeys * DV, kKeys, [&](int i) { return v_src(kt * kKeys + i); },
                          vc, tid, int(blockDim.x));
  };

  // The warp's positions [wp0, wp0 + wpn) of the tile; only this warp touches their scores.
  const int wp0 = 16 * warp / G, wpn = 16 / G;
  for (int e = lane; e < wpn * nb_tile; e += 32) sBlk[(wp0 + e / nb_tile) * p.NB + e % nb_tile] = 0;

  load_tile_async<DK>(sQ, R, q_row, q, tid, int(blockDim.x));
  if (ntiles > 0) load_k(0);
  cp_async_commit();
  if (ntiles > 1) load_k(1);
  cp_async_commit();
  cp_async_wait<1>();
  __syncthreads();

  const int rA = 16 * warp + (lane >> 2), rB = rA + 8;
  const int posA = rA / G, posB = rB / G;
  const int tA = t0 + posA, tB = t0 + posB;
  const bool okA = tA < T_b, okB = tB < T_b;
  const int nvA = okA ? cmp_visible(tA, p.l, p.d) : 0, nvB = okB ? cmp_visible(tB, p.l, p.d) : 0;
  int nv_w = max(nvA, nvB), nv_min = min(nvA, nvB);  // keys some / every row of the warp sees
  for (int o = 16; o > 0; o /= 2) {
    nv_w = max(nv_w, __shfl_xor_sync(0xffffffffu, nv_w, o));
    nv_min = min(nv_min, __shfl_xor_sync(0xffffffffu, nv_min, o));
  }
  const float sl2 = p.scale * kLog2e;
  const float inv_d = 1.0f / float(p.d);

  uint32_t qa[DK / 16][4];
  load_q_smem<DK>(qa, sQ, 16 * warp, lane);

  // ---- pass 1: lse ----
  float mA = -INFINITY, mB = -INFINITY, lA = 0, lB = 0;
  for (int kt = 0; kt < ntiles; ++kt) {
    if (kt > 0) {
      cp_async_wait<1>();
      __syncthreads();  // tile kt landed for every thread; every warp is done with tile kt - 1
    }
    if (kt + 2 < ntiles) load_k(kt + 2);  // into the buffer of tile kt - 1
    cp_async_commit();
    if (kt * kKeys >= nv_w) continue;
    float s[8][4];
    qk_tile<T, DK, kKeys>(s, qa, sK + (kt % kStages2) * kKeys * DK, lane);
    if (kLean && (kt + 1) * kKeys <= nv_min) {
      // Every row sees the whole tile: no masks, and the scale folded into one multiply-add.
      softmax_step_full(s, sl2, mA, mB, lA, lB);
      continue;
    }
#pragma unroll
    for (int nt = 0; nt < 8; ++nt)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int ci = kt * kKeys + nt * 8 + 2 * (lane & 3) + e;
        s[nt][e] = ci < nvA ? s[nt][e] * sl2 : -INFINITY;
        s[nt][2 + e] = ci < nvB ? s[nt][2 + e] * sl2 : -INFINITY;
      }
    softmax_step_masked(s, mA, mB, lA, lB);  // p is not needed in pass 1
  }
  quad_sum(lA, lB);
  const float lseA = lA > 0 ? mA + log2f(lA) : -INFINITY;
  const float lseB = lB > 0 ? mB + log2f(lB) : -INFINITY;

  // ---- pass 2: p, O = p V, Eq. 10 then Eq. 9 per warp ----
  float oacc[DV / 8][4];
#pragma unroll
  for (int nd = 0; nd < DV / 8; ++nd) oacc[nd][0] = oacc[nd][1] = oacc[nd][2] = oacc[nd][3] = 0;
  __syncthreads();  // every warp is done with pass 1's buffers
  if (ntiles > 0) load_k(0), load_v(0);
  cp_async_commit();
  if (ntiles > 1) load_k(1), load_v(1);
  cp_async_commit();
  for (int kt = 0; kt < ntiles; ++kt) {
    cp_async_wait<1>();
    __syncthreads();
    if (kt + 2 < ntiles) load_k(kt + 2), load_v(kt + 2);
    cp_async_commit();
    if (kt * kKeys >= nv_w) continue;  // p = 0 for all the warp's rows: nothing to add anywhere
    float s[8][4];
    qk_tile<T, DK, kKeys>(s, qa, sK + (kt % kStages2) * kKeys * DK, lane);
    if (kLean && (kt + 1) * kKeys <= nv_min) {
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
          const int ci = kt * kKeys + nt * 8 + 2 * (lane & 3) + e;
          s[nt][e] = ci < nvA ? exp2f(s[nt][e] * sl2 - lseA) : 0.0f;
          s[nt][2 + e] = ci < nvB ? exp2f(s[nt][2 + e] * sl2 - lseB) : 0.0f;
        }
    }
    const T* sVt = sV + (kt % kStages2) * kKeys * DV;
    pv_tile<T, DV, kKeys>(oacc, s, sVt, lane);
    column_sums(s, sCs, posA, posB, G, lane);  // Eq. 10, into this warp's rows of sCs
    __syncwarp();
    // Eq. 9 for the warp's positions, one lane per (position, block), ascending i onto the
    // running score as in v1.
    {
      const int i0 = kt * kKeys, iend = min(i0 + kKeys, nv_w);
      const int jlo = i0 * p.d / p.ls, jhi = ((iend - 1) * p.d + p.l - 1) / p.ls, nj = jhi - jlo + 1;
      for (int e = lane; e < wpn * nj; e += 32) {
        const int pos = wp0 + e / nj, j = jlo + e % nj;
        const int lo_num = j * p.ls - p.l + 1;
        const int ia = max(i0, lo_num > 0 ? (lo_num + p.d - 1) / p.d : 0);
        const int ib = min(iend - 1, ((j + 1) * p.ls - 1) / p.d);
        float acc = sBlk[pos * p.NB + j];
        for (int i = ia; i <= ib; ++i) {
          const int ov = min(i * p.d + p.l, (j + 1) * p.ls) - max(i * p.d, j * p.ls);
          acc += sCs[pos * kKeys + (i - i0)] * (float(ov) * inv_d);
        }
        sBlk[pos * p.NB + j] = acc;
      }
    }
    __syncwarp();  // the next tile's column sums overwrite sCs
  }

  const int hA = g * G + rA % G, hB = g * G + rB % G;
  store_rows<T, DV>(static_cast<T*>(p.o_cmp), ((row0 + tA) * p.Hq + hA) * DV, ((row0 + tB) * p.Hq + hB) * DV, okA,
                   okB, oacc, 1.0f, 1.0f, lane);
  if ((lane & 3) == 0) {
    if (okA) p.lse_cmp[(row0 + tA) * p.Hq + hA] = lseA * kLn2;
    if (okB) p.lse_cmp[(row0 + tB) * p.Hq + hB] = lseB * kLn2;
  }
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
    select_warp(P, t, p, sList + pos * p.n, p.block_idx + gr * p.n, lane);
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
void launch_v1(const FwdParams& p, const TileMap& tm, int nw, cudaStream_t s) {
  const size_t smem = cmp_attn_v1_smem(p, nw);
  const bool ok = dispatch_dims(p.dk, p.dv, [&](auto DK, auto DV) {
    auto kernel = cmp_attn_v1_kernel<T, decltype(DK)::value, decltype(DV)::value>;
    NSA_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
    kernel<<<dim3(unsigned(tm.total), unsigned(p.Hkv)), 32 * nw, smem, s>>>(p, tm);
    NSA_CUDA_CHECK_LAUNCH("cmp_attn_v1_kernel");
  });
  if (!ok) throw ConfigError(cat("cmp_attn v1: head dims dk = ", p.dk, ", dv = ", p.dv, " are not compiled"));
}

template <class T, bool kLean>
void launch_v2(const FwdParams& p, const TileMap& tm, int nw, cudaStream_t s) {
  const size_t smem = cmp_attn_v2_smem(p, nw);
  const bool ok = dispatch_dims(p.dk, p.dv, [&](auto DK, auto DV) {
    auto kernel = cmp_attn_v2_kernel<T, decltype(DK)::value, decltype(DV)::value, kLean>;
    NSA_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
    kernel<<<dim3(unsigned(tm.total), unsigned(p.Hkv)), 32 * nw, smem, s>>>(p, tm);
    NSA_CUDA_CHECK_LAUNCH("cmp_attn_v2_kernel");
  });
  if (!ok) throw ConfigError(cat("cmp_attn v2: head dims dk = ", p.dk, ", dv = ", p.dv, " are not compiled"));
}

}  // namespace

size_t cmp_attn_v0_smem(const FwdParams& p, int nwarps) { return size_t(nwarps + 1) * p.NB * sizeof(float); }

size_t cmp_attn_v1_smem(const FwdParams& p, int nwarps) {
  const int R = 16 * nwarps;
  return CmpSmem(R, R / p.G, p.dk, p.dv, p.NB, p.n, 2).total;
}

size_t cmp_attn_v2_smem(const FwdParams& p, int nwarps) {
  const int R = 16 * nwarps;
  return CmpSmem(R, R / p.G, p.dk, p.dv, p.NB, p.n, 2, kStages2).total;
}

void cmp_attn_v2(Precision prec, const FwdParams& p, const TileMap& tm, int nwarps, bool lean, cudaStream_t s) {
  if (tm.total == 0) return;
  if (prec == Precision::BF16) lean ? launch_v2<__nv_bfloat16, true>(p, tm, nwarps, s) : launch_v2<__nv_bfloat16, false>(p, tm, nwarps, s);
  else if (prec == Precision::FP16) lean ? launch_v2<__half, true>(p, tm, nwarps, s) : launch_v2<__half, false>(p, tm, nwarps, s);
  else throw ConfigError("cmp_attn v2/v3 needs bf16 or fp16 operands (fp32 runs kernel v0)");
}

void cmp_attn_v0(Precision prec, const FwdParams& p, cudaStream_t s) {
  if (p.N == 0) return;
  switch (prec) {
    case Precision::BF16: launch_v0<__nv_bfloat16>(p, s); break;
    case Precision::FP16: launch_v0<__half>(p, s); break;
    case Precision::FP32: launch_v0<float>(p, s); break;
  }
}

void cmp_attn_v1(Precision prec, const FwdParams& p, const TileMap& tm, int nwarps, cudaStream_t s) {
  if (tm.total == 0) return;
  if (prec == Precision::BF16) launch_v1<__nv_bfloat16>(p, tm, nwarps, s);
  else if (prec == Precision::FP16) launch_v1<__half>(p, tm, nwarps, s);
  else throw ConfigError("cmp_attn v1 needs bf16 or fp16 operands (fp32 runs kernel v0)");
}

}  // namespace nsa::cuda
