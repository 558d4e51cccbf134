// The sliding-window branch (docs/spec.md 5): query t attends over keys [max(0, t-w+1), t]; the
// CUDA twin of the window part of reference/forward.cpp's nsa_tile. The mma kernel also forms the gated sum
// of Eq. 5 in its epilogue (it runs last, so O_cmp and O_slc are ready): o_win then need not be
// stored, and o costs one pass instead of a separate kernel reading three outputs.
#include <climits>

#include "check.hpp"
#include "attn_tile.cuh"
#include "device.cuh"
#include "kernels.hpp"

namespace nsa::cuda {

namespace {

using namespace dev;

// ============================== fp32: CUDA cores ==============================
template <class T>
__global__ void win_attn_fp32_kernel(FwdParams p) {
  const auto [row, row0, g, t, nw, warp, lane] = token_cta(p.cu_seqlens, p.B);
  const T* K = static_cast<const T*>(p.k_win);
  const T* V = static_cast<const T*>(p.v_win);
  for (int hi = warp; hi < p.G; hi += nw) {
    const int h = g * p.G + hi;
    const T* q = static_cast<const T*>(p.q) + (row * p.Hq + h) * p.dk;
    Fp32Softmax sm;
    for (int u = win_start(t, p.window); u <= t; ++u)
      sm.add(q, K + ((row0 + u) * p.Hkv + g) * p.dk, V + ((row0 + u) * p.Hkv + g) * p.dv, p, lane);
    T* out = static_cast<T*>(p.o_win) + (row * p.Hq + h) * p.dv;
#pragma unroll
    for (int k2 = 0; k2 < 8; ++k2)
      if (lane + 32 * k2 < p.dv) out[lane + 32 * k2] = from_f<T>(sm.o[k2] / sm.sum);
    if (lane == 0) p.lse_win[row * p.Hq + h] = sm.m + logf(sm.sum);  // the window holds t itself: sum > 0
  }
}

// The mma kernel's epilogue for one row th = token * Hq + head (half 0: the thread's row A, 1: row B):
// O_win normalised (stored only when asked for), lse_win, and Eq. 5 o = g_cmp O_cmp + g_slc O_slc
// + g_win O_win, reading the other branches' outputs (they ran before).
template <class T, int DV>
__device__ __forceinline__ void epilogue(const FwdParams& p, int64_t th, float m, float l, float inv,
                                         const float (&acc)[DV / 8][4], int half, int lane) {
  const T* ocmp = static_cast<const T*>(p.o_cmp);
  const T* oslc = static_cast<const T*>(p.o_slc);
  T* owin = static_cast<T*>(p.o_win);
  T* o = static_cast<T*>(p.o);
  const float g0 = p.gates[th * 3], g1 = p.gates[th * 3 + 1], g2 = p.gates[th * 3 + 2];
#pragma unroll
  for (int nd = 0; nd < DV / 8; ++nd) {
    const int64_t e = th * DV + nd * 8 + 2 * (lane & 3);
    const float w0 = acc[nd][2 * half] * inv, w1 = acc[nd][2 * half + 1] * inv;
    if (owin) *reinterpret_cast<uint32_t*>(owin + e) = pack2<T>(w0, w1);
    const float o0 = g0 * to_f(ocmp[e]) + g1 * to_f(oslc[e]) + g2 * w0;
    const float o1 = g0 * to_f(ocmp[e + 1]) + g1 * to_f(oslc[e + 1]) + g2 * w1;
    *reinterpret_cast<uint32_t*>(o + e) = pack2<T>(o0, o1);
  }
  if ((lane & 3) == 0) p.lse_win[th] = l > 0 ? (m + log2f(l)) * kLn2 : -INFINITY;
}

// ============================== mma: tensor cores (mma.sync) ==============================
// FlashAttention-2 style over the band: one CTA per (tile of BT = 16 * nwarps / G positions,
// group), nwarps warps x 16 rows (row r = position r / G, head r % G), key tiles of 64 from
// max(0, t0 - w + 1) to the tile's last position, three shared-memory stages and one barrier per
// key tile; a warp skips the tiles that lie outside all of its rows' windows, and tiles inside
// every row's window skip the masks and use one FFMA + ex2.approx per element.
// Shared memory: sQ [16 nwarps, DK] | sK [3][64, DK] | sV [3][64, DV].
constexpr int kKeys = 64;
constexpr int kStages2 = 3;

template <class T, int DK, int DV>
__global__ void __launch_bounds__(256, 1) win_attn_mma_kernel(FwdParams p, TileMap tm) {
  extern __shared__ __align__(16) unsigned char smem[];
  const int nw = blockDim.x / 32, R = 16 * nw, G = p.G, BT = R / G;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  T* sQ = reinterpret_cast<T*>(smem);
  T* sK = sQ + R * DK;
  T* sV = sK + kStages2 * kKeys * DK;

  const int64_t x = blockIdx.x;
  const int g = blockIdx.y;
  const int b = find_seq(tm.cu_tiles, p.B, x);
  const int t0 = int(x - tm.cu_tiles[b]) * BT;
  const int64_t row0 = p.cu_seqlens[b];
  const int T_b = int(p.cu_seqlens[b + 1] - row0);
  const int t_last = min(t0 + BT, T_b) - 1;
  const int k_begin = win_start(t0, p.window), nkeys = t_last + 1 - k_begin;
  const int ntiles = (nkeys + kKeys - 1) / kKeys;
  const int Hkv = p.Hkv;

  const T* q = static_cast<const T*>(p.q);
  const T* K = static_cast<const T*>(p.k_win);
  const T* V = static_cast<const T*>(p.v_win);
  auto load_kv = [&](int kt) {
    const int u0 = k_begin + kt * kKeys, st = kt % kStages2;
    load_rows_async<DK>(sK + st * kKeys * DK, kKeys, K + ((row0 + u0) * Hkv + g) * DK, int64_t(Hkv) * DK,
                        t_last + 1 - u0, tid, int(blockDim.x));
    load_rows_async<DV>(sV + st * kKeys * DV, kKeys, V + ((row0 + u0) * Hkv + g) * DV, int64_t(Hkv) * DV,
                        t_last + 1 - u0, tid, int(blockDim.x));
  };
  load_tile_async<DK>(
      sQ, R,
      [&](int r) -> const T* {
        const int t = t0 + r / G;
        return t < T_b ? q + ((row0 + t) * p.Hq + g * G + r % G) * DK : nullptr;
      },
      q, tid, int(blockDim.x));
  load_kv(0);
  cp_async_commit();
  if (ntiles > 1) load_kv(1);
  cp_async_commit();
  cp_async_wait<1>();
  __syncthreads();

  const int rA = 16 * warp + (lane >> 2), rB = rA + 8;
  const int tA = t0 + rA / G, tB = t0 + rB / G;
  const bool okA = tA < T_b, okB = tB < T_b;
  const int loA = win_start(tA, p.window), loB = win_start(tB, p.window);
  const int hA = g * G + rA % G, hB = g * G + rB % G;
  // Keys any row of the warp sees: [win_start(first position), last valid position].
  const int w_lo = win_start(min(t0 + 16 * warp / G, t_last), p.window);
  const int w_hi = min(t0 + (16 * warp + 15) / G, t_last);
  // Keys every row of the warp sees (all its positions valid): [win_start(last), first].
  const int w_first = t0 + 16 * warp / G, w_last = t0 + (16 * warp + 15) / G;
  const int all_lo = w_last < T_b ? win_start(w_last, p.window) : INT_MAX, all_hi = w_first;
  const float sl2 = p.scale * kLog2e;
  float mA = -INFINITY, mB = -INFINITY, lA = 0, lB = 0;
  float oacc[DV / 8][4];
#pragma unroll
  for (int nd = 0; nd < DV / 8; ++nd) oacc[nd][0] = oacc[nd][1] = oacc[nd][2] = oacc[nd][3] = 0;
  uint32_t qa[DK / 16][4];
  load_q_smem<DK>(qa, sQ, 16 * warp, lane);

  for (int kt = 0; kt < ntiles; ++kt) {
    if (kt > 0) {
      cp_async_wait<1>();
      __syncthreads();
    }
    if (kt + 2 < ntiles) load_kv(kt + 2);
    cp_async_commit();
    const int u0 = k_begin + kt * kKeys;
    if (u0 + kKeys - 1 < w_lo || u0 > w_hi) continue;
    const T* sKt = sK + (kt % kStages2) * kKeys * DK;
    const T* sVt = sV + (kt % kStages2) * kKeys * DV;
    float s[8][4];
    qk_tile<T, DK, kKeys>(s, qa, sKt, lane);
    if (u0 >= all_lo && u0 + kKeys - 1 <= all_hi) {
      // Every row sees the whole tile: no masks, the scale folded into one multiply-add.
      rescale<DV>(oacc, softmax_step_full(s, sl2, mA, mB, lA, lB));
    } else {
#pragma unroll
      for (int nt = 0; nt < 8; ++nt)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int u = u0 + nt * 8 + 2 * (lane & 3) + e;
          s[nt][e] = okA && u >= loA && u <= tA ? s[nt][e] * sl2 : -INFINITY;
          s[nt][2 + e] = okB && u >= loB && u <= tB ? s[nt][2 + e] * sl2 : -INFINITY;
        }
      rescale<DV>(oacc, softmax_step_masked(s, mA, mB, lA, lB));
    }
    pv_tile<T, DV, kKeys>(oacc, s, sVt, lane);
  }

  quad_sum(lA, lB);
  const float iA = lA > 0 ? 1.0f / lA : 0.0f, iB = lB > 0 ? 1.0f / lB : 0.0f;
  if (okA) epilogue<T, DV>(p, (row0 + tA) * p.Hq + hA, mA, lA, iA, oacc, 0, lane);
  if (okB) epilogue<T, DV>(p, (row0 + tB) * p.Hq + hB, mB, lB, iB, oacc, 1, lane);
}

template <class T>
void launch_fp32(const FwdParams& p, cudaStream_t s) {
  const int nw = p.G < 4 ? p.G : 4;
  win_attn_fp32_kernel<T><<<dim3(unsigned(p.N), unsigned(p.Hkv)), 32 * nw, 0, s>>>(p);
  NSA_CUDA_CHECK_LAUNCH("win_attn_fp32_kernel");
}

template <class T>
void launch_mma(const FwdParams& p, const TileMap& tm, int nw, cudaStream_t s) {
  const size_t smem = win_attn_mma_smem(p, nw);
  const bool ok = dispatch_dims(p.dk, p.dv, [&](auto DK, auto DV) {
    auto kernel = win_attn_mma_kernel<T, decltype(DK)::value, decltype(DV)::value>;
    NSA_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
    kernel<<<dim3(unsigned(tm.total), unsigned(p.Hkv)), 32 * nw, smem, s>>>(p, tm);
    NSA_CUDA_CHECK_LAUNCH("win_attn_mma_kernel");
  });
  if (!ok) throw ConfigError(cat("win_attn mma: head dims dk = ", p.dk, ", dv = ", p.dv, " are not compiled"));
}

}  // namespace

size_t win_attn_mma_smem(const FwdParams& p, int nwarps) {
  return (size_t(16 * nwarps) * p.dk + size_t(kStages2) * kKeys * (p.dk + p.dv)) * 2;
}

void win_attn_mma(Precision prec, const FwdParams& p, const TileMap& tm, int nwarps, cudaStream_t s) {
  if (tm.total == 0) return;
  for_mma_precision(prec, "win_attn mma", [&](auto t) { launch_mma<decltype(t)>(p, tm, nwarps, s); });
}

void win_attn_fp32(Precision prec, const FwdParams& p, cudaStream_t s) {
  if (p.N == 0) return;
  for_precision(prec, [&](auto t) { launch_fp32<decltype(t)>(p, s); });
}

}  // namespace nsa::cuda
