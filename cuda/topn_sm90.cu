// Selection scores and top-n (NSA-SPEC.md 4, Eq. 8-11) on Hopper (sm_90a): the twin of
// cmp_score_v4 (cmp_attn.cu) with cmp_attn_sm90's structure (docs/cuda_sm90.md).
//
// Work item = 128 query rows (positions x the G heads of one KV group g, row r: position
// t0 + r / G, head g G + r % G) x the visible compressed keys of group g. A CTA of 384 threads, one
// per SM, walks the items longest first:
//   warpgroup 0, the producer (setmaxnreg 56): one thread streams the K tiles (kN rows of the
//     group's compressed keys) by TMA into a kStages ring of swizzled shared memory that runs on
//     across items; warps 1-3 store each item's Q into one of two buffers.
//   warpgroups 1 and 2, the consumers (setmaxnreg 224), 64 rows each: S = Q K^T by wgmma (both
//     operands in shared memory), two accumulators so that the product of tile k + 1 runs while
//     the CUDA cores turn tile k into scores: p = exp2(s scale log2e - lse log2e) (Eq. 8, lse
//     given), the sum over the G heads of each position by shuffles across the accumulator's rows
//     (Eq. 10; the same rows per warp and the same order as cmp_score_v4's column_sums), the column
//     sums into shared memory, then Eq. 9 onto the position's block scores (shared memory,
//     128 / G positions x NB floats): the fixed 5-term stencil 1,2,2,2,1 for l = 32, d = 16,
//     l' = 64, the general overlap weights otherwise. Each warp owns 16 / G positions (its rows),
//     so the scores need no barrier beyond the warp's; at the end of the item each warp runs the
//     top-n of its positions (topn.cuh's select_warp_filtered, the code cmp_score_v4 runs) while
//     the producer already loads the next item's tiles.
#include "topn_sm90.hpp"

#include <cute/tensor.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/arch/reg_reconfig.h>
#include <cutlass/numeric_types.h>

#include <algorithm>
#include <cmath>

#include "check.hpp"
#include "errors.hpp"
#include "topn.cuh"

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define NSA_SM90A_BODY 1
#elif defined(__CUDA_ARCH__)
#pragma nv_diag_suppress 177
#endif

namespace nsa::cuda {
namespace {

using namespace cute;

constexpr int kRows = 128;
constexpr int kThreads = 384;
constexpr int kCand = 64;  // select_warp_filtered's candidate slots per warp (cmp_score_v4's)
constexpr float kLog2eF = 1.4426950408889634f;

template <class T, int DK, int kN, int kStages>
struct Cfg {
  static constexpr int kQBufs = 2;
  using LayoutQ =
      decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<T>{}, Shape<Int<kRows>, Int<DK>, Int<kQBufs>>{}));
  using LayoutK = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<T>{}, Shape<Int<kN>, Int<DK>, Int<kStages>>{}));
  using MmaQK = decltype(make_tiled_mma(GMMA::ss_op_selector<T, T, float, Shape<_64, Int<kN>, Int<DK>>>(),
                                        Layout<Shape<_2, _1, _1>>{}));
  struct Smem {
    alignas(1024) cute::ArrayEngine<T, cosize_v<LayoutQ>> q;
    alignas(1024) cute::ArrayEngine<T, cosize_v<LayoutK>> k;
    alignas(8) uint64_t full_k[kStages];
    uint64_t empty_k[kStages];
    uint64_t full_q[kQBufs];
    uint64_t empty_q[kQBufs];
  };
  static constexpr uint32_t kBytesK = uint32_t(kN) * DK * sizeof(T);
  static constexpr int kCs = kN + 1;  // column-sum slots per position: slot 0 the carried key
  // After Smem: sCs [BT][kCs] f32 | sBlk [BT][NB] f32 | sList [BT][n] int | sCand [8][kCand] int.
  static size_t smem_bytes(int BT, int NB, int n) {
    return sizeof(Smem) + size_t(BT) * kCs * 4 + size_t(BT) * NB * 4 + size_t(BT) * n * 4 + 8 * kCand * 4;
  }
};

template <class T, int D, int kN, class SmemLayout>
auto make_k_tma(const T* x, int Nc, int Hkv, SmemLayout sl) {
  Tensor m = make_tensor(make_gmem_ptr(x), make_shape(Nc, Int<D>{}, Hkv),
                         make_stride(int64_t(Hkv) * D, _1{}, int64_t(D)));
  return make_tma_copy(SM90_TMA_LOAD{}, m, sl, Shape<Int<kN>, Int<D>>{}, _1{});
}

template <class Mma, class TA, class TB, class TC>
__device__ __forceinline__ void wg_issue(Mma& mma, TA& A, TB const& B, TC& C) {
  warpgroup_fence_operand(C);
  warpgroup_arrive();
  mma.accumulate_ = GMMA::ScaleOut::Zero;
  CUTE_UNROLL
  for (int kb = 0; kb < size<2>(A); ++kb) {
    cute::gemm(mma, A(_, _, kb), B(_, _, kb), C);
    mma.accumulate_ = GMMA::ScaleOut::One;
  }
  warpgroup_commit_batch();
}

template <class T, int DK, int kN, int kStages, class TmaK>
__global__ void __launch_bounds__(kThreads, 1)
    topn_sm90_kernel(const __grid_constant__ TopnSm90Params p, const __grid_constant__ TmaK tma_k) {
#if defined(NSA_SM90A_BODY)
  using C = Cfg<T, DK, kN, kStages>;
  constexpr int kQBufs = C::kQBufs, kCs = C::kCs;
  using FullBar = cutlass::arch::ClusterTransactionBarrier;
  using Bar = cutlass::arch::ClusterBarrier;
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  auto& sm = *reinterpret_cast<typename C::Smem*>(smem_raw);
  Tensor sQ = make_tensor(make_smem_ptr(sm.q.begin()), typename C::LayoutQ{});
  Tensor sK = make_tensor(make_smem_ptr(sm.k.begin()), typename C::LayoutK{});
  const int G = p.G, BT = kRows / G;
  float* sCs = reinterpret_cast<float*>(smem_raw + sizeof(typename C::Smem));
  float* sBlk = sCs + BT * kCs;
  int* sList = reinterpret_cast<int*>(sBlk + size_t(BT) * p.NB);
  int* sCandAll = sList + BT * p.n;

  const int64_t items = p.tiles * p.Hkv;
  struct Item {
    int g, t0, T_b, cmp0, ntiles;
    int64_t row0;
  };
  auto decode = [&](int64_t i) {
    Item w;
    const int64_t x = p.tiles - 1 - i / p.Hkv;  // longest tiles first
    w.g = int(i % p.Hkv);
    const int b = dev::find_seq(p.cu_tiles, p.B, x);
    w.t0 = int(x - p.cu_tiles[b]) * BT;
    w.row0 = p.cu_seqlens[b];
    w.cmp0 = int(p.cu_cmp[b]);
    w.T_b = int(p.cu_seqlens[b + 1] - w.row0);
    const int t_last = min(w.t0 + BT, w.T_b) - 1;
    w.ntiles = (dev::cmp_visible(t_last, p.l, p.d) + kN - 1) / kN;
    return w;
  };
  const int wg = int(threadIdx.x) / 128;

  if (threadIdx.x == 0) {
    for (int s = 0; s < kStages; ++s) {
      FullBar::init(&sm.full_k[s], 1);
      Bar::init(&sm.empty_k[s], 2 * 128);
    }
    for (int s = 0; s < kQBufs; ++s) {
      Bar::init(&sm.full_q[s], 96);
      Bar::init(&sm.empty_q[s], 2 * 128);
    }
    cutlass::arch::fence_barrier_init();
  }
  __syncthreads();

  if (wg == 0) {  // ---------------- producer ----------------
    cutlass::arch::warpgroup_reg_dealloc<56>();
    const int warp = int(threadIdx.x) / 32;
    if (warp == 0) {
      if (cute::elect_one_sync()) {
        Tensor mK = tma_k.get_tma_tensor(make_shape(int(p.Nc), Int<DK>{}, p.Hkv));
        int it = 0;
        for (int64_t i = blockIdx.x; i < items; i += gridDim.x) {
          const Item w = decode(i);
          Tensor gK = local_tile(domain_offset(make_coord(w.cmp0, _0{}), mK(_, _, w.g)), Shape<Int<kN>, Int<DK>>{},
                                 make_coord(_, _0{}));
          auto [tKgK, tKsK] =
              tma_partition(tma_k, Int<0>{}, Layout<_1>{}, group_modes<0, 2>(sK), group_modes<0, 2>(gK));
          for (int kt = 0; kt < w.ntiles; ++kt, ++it) {
            const int st = it % kStages;
            if (it >= kStages) Bar::wait(&sm.empty_k[st], ((it / kStages) + 1) & 1);
            FullBar::arrive_and_expect_tx(&sm.full_k[st], C::kBytesK);
            copy(tma_k.with(sm.full_k[st]), tKgK(_, kt), tKsK(_, st));
          }
        }
      }
    } else {
      // Q by warps 1-3 (cmp_attn_sm90's loader): 16-byte loads into the swizzled tile, zeros past
      // the sequence; a proxy fence before the arrival (wgmma reads through the async proxy).
      const int qt = int(threadIdx.x) - 32;  // 0..95
      const T* q = static_cast<const T*>(p.q);
      constexpr int kChunks = DK / 8;
      int k = 0;
      for (int64_t i = blockIdx.x; i < items; i += gridDim.x, ++k) {
        const Item w = decode(i);
        const int qb = k % kQBufs, use = k / kQBufs;
        if (use > 0) Bar::wait(&sm.empty_q[qb], (use - 1) & 1);
        if (p.q_async) {
          // Every 16-byte copy of the tile in flight at once (one memory latency per item, which
          // matters where items are short, e.g. 8k), rows past the sequence zero-filled.
          for (int c = qt; c < kRows * kChunks; c += 96) {
            const int r = c / kChunks, e = (c % kChunks) * 8;
            const int t = w.t0 + r / G;
            const bool ok = t < w.T_b;
            const T* src = q + ((w.row0 + (ok ? t : 0)) * p.Hq + w.g * G + r % G) * DK + e;
            const uint32_t dst = cute::cast_smem_ptr_to_uint(&sQ(r, e, qb));
            asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(ok ? 16 : 0)
                         : "memory");
          }
          asm volatile("cp.async.wait_all;\n" ::: "memory");
        } else {
#pragma unroll 4
          for (int c = qt; c < kRows * kChunks; c += 96) {
            const int r = c / kChunks, e = (c % kChunks) * 8;
            const int t = w.t0 + r / G;
            uint4 v = make_uint4(0, 0, 0, 0);
            if (t < w.T_b) v = *reinterpret_cast<const uint4*>(q + ((w.row0 + t) * p.Hq + w.g * G + r % G) * DK + e);
            *reinterpret_cast<uint4*>(&sQ(r, e, qb)) = v;
          }
        }
        cutlass::arch::fence_view_async_shared();
        Bar::arrive(&sm.full_q[qb]);
      }
    }
  } else {  // ---------------- consumers ----------------
    cutlass::arch::warpgroup_reg_alloc<224>();
    const int ctid = int(threadIdx.x) - 128;  // 0..255
    const int cwg = ctid / 128, lane = ctid % 32, warp = (ctid % 128) / 32;
    const int W = 4 * cwg + warp;  // the warp among the 8 consumer warps: rows 16 W .. 16 W + 15

    typename C::MmaQK mma;
    auto thr = mma.get_thread_slice(ctid);
    Tensor tSrQ = thr.partition_fragment_A(sQ);  // (MMA, 1, DK/16, kQBufs)
    Tensor tSrK = thr.partition_fragment_B(sK);  // (MMA, 1, DK/16, stages)
    Tensor S0 = partition_fragment_C(mma, Shape<Int<kRows>, Int<kN>>{});  // ((2, 2, kN/8), 1, 1) fp32
    Tensor S1 = partition_fragment_C(mma, Shape<Int<kRows>, Int<kN>>{});

    // The thread's rows (accumulator layout): A = 16 W + lane / 4, B = A + 8; the same rows per
    // warp as cmp_score_v4's m16n8k16 tiles, so the head sums below add in its order.
    const int rA = 16 * W + lane / 4, rB = rA + 8;
    const int posA = rA / G, posB = rB / G;  // tile-local positions
    const int wp0 = 16 * W / G, wpn = 16 / G;
    const int c_lane = 2 * (lane & 3);
    const float sl2 = p.scale * kLog2eF;
    const bool paper_map = p.l == 32 && p.d == 16 && p.ls == 64;
    int* sCand = sCandAll + W * kCand;
    LayerParams sel;  // the fields topn.cuh's selection reads
    sel.slc_len = p.ls, sel.slc_count = p.n, sel.init_blocks = p.init_blocks, sel.local_blocks = p.local_blocks;
    int it = 0, k = 0;

    for (int64_t i = blockIdx.x; i < items; i += gridDim.x, ++k) {
      const Item w = decode(i);
      const int qb = k % kQBufs;
      const int tA = w.t0 + posA, tB = w.t0 + posB;
      const bool okA = tA < w.T_b, okB = tB < w.T_b;
      const int hA = w.g * G + rA % G, hB = w.g * G + rB % G;
      const int nvA = okA ? dev::cmp_visible(tA, p.l, p.d) : 0, nvB = okB ? dev::cmp_visible(tB, p.l, p.d) : 0;
      const float lseA = okA ? p.lse_cmp[(w.row0 + tA) * p.Hq + hA] * kLog2eF : -INFINITY;
      const float lseB = okB ? p.lse_cmp[(w.row0 + tB) * p.Hq + hB] * kLog2eF : -INFINITY;
      int nv_w = max(nvA, nvB), nv_min = min(nvA, nvB);  // keys some / every row of the warp sees
      for (int o = 16; o > 0; o /= 2) {
        nv_w = max(nv_w, __shfl_xor_sync(0xffffffffu, nv_w, o));
        nv_min = min(nv_min, __shfl_xor_sync(0xffffffffu, nv_min, o));
      }
      const int t_last = min(w.t0 + BT, w.T_b) - 1;
      const int nb_tile = dev::slc_valid(t_last, p.ls);
      // The previous item's top-n of these positions read sBlk / sCs: the warp's own, so a warp
      // barrier orders them.
      __syncwarp();
      for (int e = lane; e < wpn * nb_tile; e += 32) sBlk[(wp0 + e / nb_tile) * p.NB + e % nb_tile] = 0;
      for (int e = lane; e < wpn; e += 32) sCs[(wp0 + e) * kCs] = 0;  // no key before the first tile
      __syncwarp();

      // Tile kt's scores into block scores; S holds its product.
      auto process = [&](auto& S, int kt) {
        const int i0 = kt * kN;
        if (i0 >= nv_w) return;  // p = 0 for all the warp's rows (cmp_score_v4 skips these tiles too)
        if ((kt + 1) * kN <= nv_min) {
          CUTE_UNROLL
          for (int j = 0; j < kN / 8; ++j)
            CUTE_UNROLL
            for (int c = 0; c < 2; ++c) {
              S(c + 4 * j) = dev::fast_exp2(fmaf(S(c + 4 * j), sl2, -lseA));
              S(c + 2 + 4 * j) = dev::fast_exp2(fmaf(S(c + 2 + 4 * j), sl2, -lseB));
            }
        } else {
          CUTE_UNROLL
          for (int j = 0; j < kN / 8; ++j)
            CUTE_UNROLL
            for (int c = 0; c < 2; ++c) {
              const int ci = i0 + 8 * j + c_lane + c;
              S(c + 4 * j) = ci < nvA ? exp2f(S(c + 4 * j) * sl2 - lseA) : 0.0f;
              S(c + 2 + 4 * j) = ci < nvB ? exp2f(S(c + 2 + 4 * j) * sl2 - lseB) : 0.0f;
            }
        }
        // Eq. 10: column sums over the G rows of each position, in cmp_score_v4's order (column_sums
        // of cmp_attn.cu: rows A + B, then the lanes xor 4, 8, 16), so the sums are the same bits.
        if (G == 16) {
          // A reduce-scatter instead of cmp_score_v4's all-reduce: at each step a lane keeps half of
          // its columns and sends the other half to its partner, so 16 + 8 + 4 shuffles per 32
          // columns (kN = 128) instead of 96, independent of each other within a step; floating
          // addition is commutative, so each column still adds the same pairs in the same tree.
          constexpr int kM = kN / 4;  // the thread's columns: m = 2 j + c is column 8 j + c_lane + c
          float x[kM];
          CUTE_UNROLL
          for (int j = 0; j < kN / 8; ++j)
            CUTE_UNROLL
            for (int c = 0; c < 2; ++c) x[2 * j + c] = S(c + 4 * j) + S(c + 2 + 4 * j);
          const bool b2 = lane & 4, b3 = lane & 8, b4 = lane & 16;
          CUTE_UNROLL
          for (int i = 0; i < kM / 2; ++i) {  // xor 4: keep the upper half where lane bit 2 is set
            const float send = b2 ? x[i] : x[kM / 2 + i], keep = b2 ? x[kM / 2 + i] : x[i];
            x[i] = keep + __shfl_xor_sync(0xffffffffu, send, 4);
          }
          CUTE_UNROLL
          for (int i = 0; i < kM / 4; ++i) {  // xor 8
            const float send = b3 ? x[i] : x[kM / 4 + i], keep = b3 ? x[kM / 4 + i] : x[i];
            x[i] = keep + __shfl_xor_sync(0xffffffffu, send, 8);
          }
          CUTE_UNROLL
          for (int i = 0; i < kM / 8; ++i) {  // xor 16
            const float send = b4 ? x[i] : x[kM / 8 + i], keep = b4 ? x[kM / 8 + i] : x[i];
            x[i] = keep + __shfl_xor_sync(0xffffffffu, send, 16);
          }
          // x[i] is column m = i + (kM / 8) b4 + (kM / 4) b3 + (kM / 2) b2 of the position.
          const int mb = (b4 ? kM / 8 : 0) + (b3 ? kM / 4 : 0) + (b2 ? kM / 2 : 0);
          CUTE_UNROLL
          for (int i = 0; i < kM / 8; ++i) {
            const int m = mb + i;
            sCs[posA * kCs + 1 + 8 * (m / 2) + c_lane + (m % 2)] = x[i];
          }
        } else {
          CUTE_UNROLL
          for (int j = 0; j < kN / 8; ++j)
            CUTE_UNROLL
            for (int c = 0; c < 2; ++c) {
              const int col = 8 * j + c_lane + c;
              float a = S(c + 4 * j), b = S(c + 2 + 4 * j);
              for (int o = 4; o < 4 * G; o *= 2) {
                a += __shfl_xor_sync(0xffffffffu, a, o);
                b += __shfl_xor_sync(0xffffffffu, b, o);
              }
              if ((lane >> 2) % G == 0) {
                sCs[posA * kCs + 1 + col] = a;
                sCs[posB * kCs + 1 + col] = b;
              }
            }
        }
        __syncwarp();
        if (paper_map) {
          // Block j gathers compressed blocks 4j - 1 .. 4j + 3 with weights 1, 2, 2, 2, 1: the
          // tile completes blocks kt kN / 4 .. + kN / 4 - 1 with the carried i = kt kN - 1 (slot 0).
          constexpr int kJ = kN / 4;
          for (int e = lane; e < wpn * kJ; e += 32) {
            const int pos = wp0 + e / kJ, jj = e % kJ, j = kt * kJ + jj;
            const float* cs = sCs + pos * kCs + 4 * jj;
            const float sc = cs[0] + 2.0f * cs[1] + 2.0f * cs[2] + 2.0f * cs[3] + cs[4];
            if (j < nb_tile) sBlk[pos * p.NB + j] = sc;
          }
          __syncwarp();
          for (int e = lane; e < wpn; e += 32) sCs[(wp0 + e) * kCs] = sCs[(wp0 + e) * kCs + kN];  // the carry
        } else {
          // General overlaps, ascending i onto the running score (cmp_score_v4's order).
          const float inv_d = 1.0f / float(p.d);
          const int iend = min(i0 + kN, nv_w);
          const int jlo = i0 * p.d / p.ls, jhi = ((iend - 1) * p.d + p.l - 1) / p.ls, nj = jhi - jlo + 1;
          for (int e = lane; e < wpn * nj; e += 32) {
            const int pos = wp0 + e / nj, j = jlo + e % nj;
            if (j >= p.NB) continue;
            const int lo_num = j * p.ls - p.l + 1;
            const int ia = max(i0, lo_num > 0 ? (lo_num + p.d - 1) / p.d : 0);
            const int ib = min(iend - 1, ((j + 1) * p.ls - 1) / p.d);
            float acc = sBlk[pos * p.NB + j];
            for (int ii = ia; ii <= ib; ++ii) {
              const int ov = min(ii * p.d + p.l, (j + 1) * p.ls) - max(ii * p.d, j * p.ls);
              acc += sCs[pos * kCs + 1 + (ii - i0)] * (float(ov) * inv_d);
            }
            sBlk[pos * p.NB + j] = acc;
          }
        }
        __syncwarp();  // the next tile's column sums overwrite sCs
      };

      auto tQ = tSrQ(_, _, _, qb);
      auto issue = [&](auto& S, int kt) {
        const int st = (it + kt) % kStages;
        FullBar::wait(&sm.full_k[st], ((it + kt) / kStages) & 1);
        wg_issue(mma, tQ, tSrK(_, _, _, st), S);
      };
      auto finish = [&](auto& S, int kt) {  // S's product has landed
        warpgroup_fence_operand(S);
        Bar::arrive(&sm.empty_k[(it + kt) % kStages]);
        if (kt == w.ntiles - 1) Bar::arrive(&sm.empty_q[qb]);  // Q's last reader is done
        process(S, kt);
      };
      if (w.ntiles == 0) {
        Bar::wait(&sm.full_q[qb], (k / kQBufs) & 1);
        Bar::arrive(&sm.empty_q[qb]);
      } else {
        Bar::wait(&sm.full_q[qb], (k / kQBufs) & 1);
        issue(S0, 0);
        for (int kt = 0; kt < w.ntiles; kt += 2) {
          if (kt + 1 < w.ntiles) {
            issue(S1, kt + 1);
            warpgroup_wait<1>();
          } else {
            warpgroup_wait<0>();
          }
          finish(S0, kt);
          if (kt + 1 < w.ntiles) {
            if (kt + 2 < w.ntiles) {
              issue(S0, kt + 2);
              warpgroup_wait<1>();
            } else {
              warpgroup_wait<0>();
            }
            finish(S1, kt + 1);
          }
        }
      }
      it += w.ntiles;
      if (paper_map) {
        // The block after the warp's last tile has one nonzero term, the carried i (0 where not
        // visible); later blocks see no key and keep their 0.
        const int j = (kN / 4) * ((nv_w + kN - 1) / kN);
        for (int e = lane; e < wpn; e += 32)
          if (j < nb_tile) sBlk[(wp0 + e) * p.NB + j] = sCs[(wp0 + e) * kCs];
      }
      __syncwarp();

      // ---- Eq. 11 for the warp's positions ----
      for (int pos = wp0; pos < wp0 + wpn; ++pos) {
        const int t = w.t0 + pos;
        if (t >= w.T_b) break;
        const float* P = sBlk + pos * p.NB;
        const int64_t gr = (w.row0 + t) * p.Hkv + w.g;
        if (p.block_scores) {
          const int valid = dev::slc_valid(t, p.ls);
          for (int j = lane; j < p.NB; j += 32) p.block_scores[gr * p.NB + j] = j < valid ? P[j] : 0.0f;
        }
        if (p.select) dev::select_warp_filtered(P, t, sel, sList + pos * p.n, sCand, kCand, p.block_idx + gr * p.n, lane);
      }
    }
  }
#endif
}

template <class T, int DK, int kN, int kStages>
struct Launcher {
  using C = Cfg<T, DK, kN, kStages>;
  static auto tma(const TopnSm90Params& p) {
    const bool none = p.Nc == 0;  // no compressed row: q stands in for a real address
    const T* kc = static_cast<const T*>(none ? p.q : p.kc);
    return make_k_tma<T, DK, kN>(kc, none ? 1 : int(p.Nc), p.Hkv, take<0, 2>(typename C::LayoutK{}));
  }
  using TmaK = decltype(tma(TopnSm90Params{}));
  static const void* kernel() { return reinterpret_cast<const void*>(&topn_sm90_kernel<T, DK, kN, kStages, TmaK>); }
  static size_t smem(const TopnSm90Params& p) { return C::smem_bytes(kRows / p.G, p.NB, p.n); }
  static void run(const TopnSm90Params& p, cudaStream_t s) {
    auto tk = tma(p);
    auto k = &topn_sm90_kernel<T, DK, kN, kStages, TmaK>;
    const int bytes = int(smem(p));
    NSA_CUDA_CHECK(cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
    int dev = 0, sms = 0;
    NSA_CUDA_CHECK(cudaGetDevice(&dev));
    NSA_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
    const int64_t grid = std::min<int64_t>(p.tiles * p.Hkv, sms);
    k<<<unsigned(grid), kThreads, bytes, s>>>(p, tk);
    NSA_CUDA_CHECK_LAUNCH("topn_sm90_kernel");
  }
};

#define NSA_TOPN_SM90_VARIANTS(X)                          \
  X(cutlass::bfloat16_t, Sm90Elem::BF16, 128, 128, 2)      \
  X(cutlass::bfloat16_t, Sm90Elem::BF16, 128, 128, 3)      \
  X(cutlass::bfloat16_t, Sm90Elem::BF16, 128, 64, 4)       \
  X(cutlass::bfloat16_t, Sm90Elem::BF16, 192, 64, 3)       \
  X(cutlass::half_t, Sm90Elem::FP16, 128, 128, 2)          \
  X(cutlass::half_t, Sm90Elem::FP16, 192, 64, 3)

template <class Fn>
bool dispatch(const TopnSm90Params& p, Fn&& fn) {
#define NSA_TOPN_CASE(T_, E_, DK_, N_, S_)                                      \
  if (p.elem == E_ && p.dk == DK_ && p.block_n == N_ && p.stages == S_) {      \
    fn(Launcher<T_, DK_, N_, S_>{});                                            \
    return true;                                                                \
  }
  NSA_TOPN_SM90_VARIANTS(NSA_TOPN_CASE)
#undef NSA_TOPN_CASE
  return false;
}

}  // namespace

int topn_sm90_tile_positions(int G) { return G > 0 && kRows % G == 0 ? kRows / G : 0; }

TopnSm90Params topn_sm90_resolve(const TopnSm90Params& p) {
  TopnSm90Params r = p;
  if (r.block_n == 0) r.block_n = r.dk <= 128 ? 128 : 64;
  if (r.stages == 0) r.stages = r.dk <= 128 ? 2 : 3;
  return r;
}

size_t topn_sm90_smem(const TopnSm90Params& p_in) {
  const TopnSm90Params p = topn_sm90_resolve(p_in);
  size_t bytes = 0;
  if (topn_sm90_tile_positions(p.G) == 0) return 0;
  dispatch(p, [&](auto L) { bytes = decltype(L)::smem(p); });
  return bytes;
}

bool topn_sm90_supported(const TopnSm90Params& p_in, std::string* why) {
  const TopnSm90Params p = topn_sm90_resolve(p_in);
  auto no = [&](std::string msg) {
    if (why) *why = "topn_sm90: " + std::move(msg);
    return false;
  };
  if (!(p.G == 1 || p.G == 2 || p.G == 4 || p.G == 8 || p.G == 16) || p.Hq != p.G * p.Hkv)
    return no(cat("G = Hq / Hkv = ", p.Hq, " / ", p.Hkv, " is not supported (expected 1, 2, 4, 8 or 16)"));
  if (p.Nc >= (int64_t(1) << 31)) return no(cat("Nc = ", p.Nc, " compressed rows exceed TMA's int32 coordinates"));
  if (p.n <= 0 || p.ls <= 0 || p.l <= 0 || p.d <= 0 || p.NB <= 0)
    return no(cat("bad shapes: n = ", p.n, ", l' = ", p.ls, ", l = ", p.l, ", d = ", p.d, ", NB = ", p.NB));
  const void* kern = nullptr;
  if (!dispatch(p, [&](auto L) { kern = decltype(L)::kernel(); }))
    return no(cat("no compiled variant for ", p.elem == Sm90Elem::BF16 ? "bf16" : "fp16", ", dk = ", p.dk,
                  ", block_n = ", p.block_n, ", stages = ", p.stages, " (compiled: topn_sm90.cu's NSA_TOPN_SM90_VARIANTS)"));
  int dev = 0, major = 0, minor = 0, optin = 0;
  if (cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) != cudaSuccess) {
    cudaGetLastError();
    return no("no CUDA device");
  }
  if (major != 9 || minor != 0) return no(cat("needs compute capability 9.0 (Hopper), the device has ", major, ".", minor));
  const size_t bytes = topn_sm90_smem(p);
  if (bytes > size_t(optin))
    return no(cat("the block scores of ", kRows / p.G, " positions x NB = ", p.NB, " blocks need ", bytes,
                  " bytes of shared memory with the K ring, the device allows ", optin));
  cudaFuncAttributes attr{};
  if (cudaFuncGetAttributes(&attr, kern) != cudaSuccess) {
    cudaGetLastError();
    return no("this build has no sm_90a code (NSA_CUDA_ARCHS must contain 90a)");
  }
  return true;
}

void topn_sm90(const TopnSm90Params& p_in, cudaStream_t s) {
  const TopnSm90Params p = topn_sm90_resolve(p_in);
  std::string why;
  if (!topn_sm90_supported(p, &why)) throw ConfigError(why);
  if (p.tiles == 0 || p.Hkv == 0) return;
  dispatch(p, [&](auto L) { decltype(L)::run(p, s); });
}

}  // namespace nsa::cuda
