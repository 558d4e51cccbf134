// Compression attention on Hopper (sm_90a): O_cmp and lse over the visible compressed keys
// (NSA-SPEC.md 3), FlashAttention-3's structure built from CuTe (CUTLASS 4.2). docs/cuda_sm90.md
// says what was measured and why the shapes below.
//
// Work item = 128 query rows x the keys of one KV group g: rows are positions x the G heads of
// the group (row r: position t0 + r / G, head g G + r % G), so that every K/V tile loaded feeds all
// G heads. A CTA (384 threads; one per SM when `persistent`, walking the items longest first):
//   warpgroup 0, the producer (setmaxnreg 56): one thread of warp 0 streams the K and V tiles of
//     the group's compressed rows (kc [Nc, Hkv, dk], row stride Hkv dk) by TMA into a
//     kStages-deep ring of swizzled shared memory that runs on across items; each stage has
//     mbarriers full_k / full_v (bytes landed) and empty_k / empty_v (both consumer warpgroups
//     done with it). Warps 1-3 store each item's Q into one of kQBufs buffers (full_q / empty_q).
//   warpgroups 1 and 2, the consumers (setmaxnreg 224), 64 rows each: S = Q K^T by wgmma with
//     both operands in shared memory, the online softmax in registers (exp2 with the scale folded
//     in, the running max per row), then O += P V by wgmma with P from registers (the fp32
//     accumulator layout of S is the register-A layout of the second product, element for
//     element) and V read MN-major from the same swizzled tile; with kOverlap the softmax of one
//     tile runs under the P V product of the previous one.
// Row t sees compressed block i iff i d + l - 1 <= t, i.e. the first cmp_visible(t) rows of its
// sequence; keys past a row's count (and rows of the next sequence, or the zero rows TMA fills
// past Nc) are masked to -inf, so they add exactly 0. A row that sees no block gets O = 0 and
// lse = -inf, as the reference.
#include "cmp_attn_sm90.hpp"

#include <cute/tensor.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/arch/reg_reconfig.h>
#include <cutlass/numeric_conversion.h>
#include <cutlass/numeric_types.h>

#include <algorithm>
#include <cmath>

#include "check.hpp"
#include "errors.hpp"

// The kernel body exists only in the sm_90a device pass (wgmma and setmaxnreg need the "a"
// target); any other pass (sm_80) compiles an empty body, and the host side refuses to launch
// where the device has no sm_90a image (cmp_attn_sm90_supported).
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define NSA_SM90A_BODY 1
#elif defined(__CUDA_ARCH__)
// The empty body leaves the kernel's constants unreferenced in that pass: nothing to warn about.
#pragma nv_diag_suppress 177
#endif

namespace nsa::cuda {
namespace {

using namespace cute;

constexpr int kRows = 128;     // query rows per CTA: two consumer warpgroups of 64
constexpr int kThreads = 384;  // producer warpgroup + 2 consumer warpgroups
constexpr float kLog2eF = 1.4426950408889634f;
constexpr float kLn2F = 0.6931471805599453f;

template <class T, int DK, int DV, int kN, int kStages>
struct Cfg {
  // Q [128, DK], K [kN, DK] per stage, V [kN, DV] per stage; K-major (the head dim contiguous),
  // 128-byte swizzle: what TMA writes and wgmma reads without bank conflicts.
  // Two Q buffers (the next item's Q loads during this item's products) where they fit beside
  // the K/V ring in the 227 KiB of shared memory a CTA may have, else one.
  static constexpr int kQBufs =
      2 * kRows * DK * 2 + kStages * kN * (DK + DV) * 2 + 1024 <= 227 * 1024 ? 2 : 1;
  using LayoutQ =
      decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<T>{}, Shape<Int<kRows>, Int<DK>, Int<kQBufs>>{}));
  using LayoutK = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<T>{}, Shape<Int<kN>, Int<DK>, Int<kStages>>{}));
  using LayoutV = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<T>{}, Shape<Int<kN>, Int<DV>, Int<kStages>>{}));
  // V^T (dv, key, stage): the same bytes seen with dv as the contiguous (MN) mode, the B operand
  // of O += P V.
  using LayoutVt = decltype(composition(
      LayoutV{}, make_ordered_layout(Shape<Int<DV>, Int<kN>, Int<kStages>>{}, Step<_2, _1, _3>{})));
  // Each product: one 64-row wgmma atom per consumer warpgroup, the two stacked on M.
  using MmaQK = decltype(make_tiled_mma(GMMA::ss_op_selector<T, T, float, Shape<_64, Int<kN>, Int<DK>>>(),
                                        Layout<Shape<_2, _1, _1>>{}));
  using MmaPV = decltype(make_tiled_mma(
      GMMA::rs_op_selector<T, T, float, Shape<_64, Int<DV>, Int<kN>>, GMMA::Major::K, GMMA::Major::MN>(),
      Layout<Shape<_2, _1, _1>>{}));
  struct Smem {
    alignas(1024) cute::ArrayEngine<T, cosize_v<LayoutQ>> q;
    alignas(1024) cute::ArrayEngine<T, cosize_v<LayoutK>> k;
    alignas(1024) cute::ArrayEngine<T, cosize_v<LayoutV>> v;
    alignas(8) uint64_t full_k[kStages];
    uint64_t full_v[kStages];
    uint64_t empty_k[kStages];  // both consumer warpgroups are done reading K (resp. V) of the stage
    uint64_t empty_v[kStages];
    uint64_t full_q[kQBufs];   // the producer's Q warps stored the item's Q
    uint64_t empty_q[kQBufs];  // both consumer warpgroups are done with it (their last S product)
  };
  static constexpr uint32_t kBytesK = uint32_t(kN) * DK * sizeof(T);
  static constexpr uint32_t kBytesV = uint32_t(kN) * DV * sizeof(T);
};

// The TMA descriptor of one operand: the group's rows of x [Nc, Hkv, D] as a (Nc, D, Hkv) tensor,
// boxes of kN rows x D.
template <class T, int D, int kN, class SmemLayout>
auto make_kv_tma(const T* x, int Nc, int Hkv, SmemLayout sl) {
  Tensor m = make_tensor(make_gmem_ptr(x), make_shape(Nc, Int<D>{}, Hkv),
                         make_stride(int64_t(Hkv) * D, _1{}, int64_t(D)));
  return make_tma_copy(SM90_TMA_LOAD{}, m, sl, Shape<Int<kN>, Int<D>>{}, _1{});
}

__device__ __forceinline__ float ex2(float x) {  // 2^x; ex2.approx of -inf is +0
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

__device__ __forceinline__ int visible(int t, int l, int d) { return t + 1 >= l ? (t + 1 - l) / d + 1 : 0; }

// One warpgroup product C (+)= A B, issued and waited for (the operands are fenced so that the
// compiler keeps the accumulator registers in place across the asynchronous wgmma).
// wg_issue only issues (one commit group); the caller waits (warpgroup_wait) and fences.
template <bool kZero, bool kRegA, class Mma, class TA, class TB, class TC>
__device__ __forceinline__ void wg_issue(Mma& mma, TA& A, TB const& B, TC& C) {
  warpgroup_fence_operand(C);
  if constexpr (kRegA) warpgroup_fence_operand(A);
  warpgroup_arrive();
  if constexpr (kZero) mma.accumulate_ = GMMA::ScaleOut::Zero;
  CUTE_UNROLL
  for (int kb = 0; kb < size<2>(A); ++kb) {
    cute::gemm(mma, A(_, _, kb), B(_, _, kb), C);
    mma.accumulate_ = GMMA::ScaleOut::One;
  }
  warpgroup_commit_batch();
}
template <bool kZero, bool kRegA, class Mma, class TA, class TB, class TC>
__device__ __forceinline__ void wg_gemm(Mma& mma, TA& A, TB const& B, TC& C) {
  wg_issue<kZero, kRegA>(mma, A, B, C);
  warpgroup_wait<0>();
  warpgroup_fence_operand(C);
  if constexpr (kRegA) warpgroup_fence_operand(A);
}

template <class T, int DK, int DV, int kN, int kStages, bool kOverlap, class TmaK, class TmaV>
__global__ void __launch_bounds__(kThreads, 1)
    cmp_attn_sm90_kernel(const __grid_constant__ CmpAttnSm90Params p, const __grid_constant__ TmaK tma_k,
                         const __grid_constant__ TmaV tma_v) {
#if defined(NSA_SM90A_BODY)
  using C = Cfg<T, DK, DV, kN, kStages>;
  constexpr int kQBufs = C::kQBufs;
  using FullBar = cutlass::arch::ClusterTransactionBarrier;
  using Bar = cutlass::arch::ClusterBarrier;
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  auto& sm = *reinterpret_cast<typename C::Smem*>(smem_raw);
  Tensor sQ = make_tensor(make_smem_ptr(sm.q.begin()), typename C::LayoutQ{});  // (128, DK, kQBufs)
  Tensor sK = make_tensor(make_smem_ptr(sm.k.begin()), typename C::LayoutK{});
  Tensor sV = make_tensor(make_smem_ptr(sm.v.begin()), typename C::LayoutV{});
  Tensor sVt = make_tensor(make_smem_ptr(sm.v.begin()), typename C::LayoutVt{});

  // Work items: (tile of positions, group), longest tiles first (a tile's work grows with its
  // positions). CTA c takes items c, c + gridDim.x, ...: one item per CTA when the grid covers
  // them all, several when it is persistent (one CTA per SM), so that the loads of an item's
  // K/V and Q overlap the previous item's last products and its epilogue.
  const int64_t items = p.tiles * p.Hkv;
  const int G = p.G, BT = kRows / G;
  struct Item {
    int g, t0, T_b, cmp0, nv_min, ntiles;
    int64_t row0;
  };
  auto decode = [&](int64_t i) {
    Item w;
    const int64_t x = p.tiles - 1 - i / p.Hkv;
    w.g = int(i % p.Hkv);
    int lo = 0, hi = p.B - 1;
    while (lo < hi) {
      const int mid = (lo + hi + 1) / 2;
      if (p.cu_tiles[mid] <= x) lo = mid;
      else hi = mid - 1;
    }
    w.t0 = int(x - p.cu_tiles[lo]) * BT;
    w.row0 = p.cu_seqlens[lo];
    w.cmp0 = int(p.cu_cmp[lo]);
    w.T_b = int(p.cu_seqlens[lo + 1] - w.row0);
    const int t_last = min(w.t0 + BT, w.T_b) - 1;
    w.nv_min = visible(w.t0, p.l, p.d);
    w.ntiles = (visible(t_last, p.l, p.d) + kN - 1) / kN;
    return w;
  };
  const int wg = int(threadIdx.x) / 128;

  if (threadIdx.x == 0) {
    for (int s = 0; s < kStages; ++s) {
      FullBar::init(&sm.full_k[s], 1);
      FullBar::init(&sm.full_v[s], 1);
      Bar::init(&sm.empty_k[s], 2 * 128);
      Bar::init(&sm.empty_v[s], 2 * 128);
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
      // K/V by TMA: one thread issues, the ring's stage and parity run on over the items.
      if (cute::elect_one_sync()) {
        Tensor mK = tma_k.get_tma_tensor(make_shape(int(p.Nc), Int<DK>{}, p.Hkv));
        Tensor mV = tma_v.get_tma_tensor(make_shape(int(p.Nc), Int<DV>{}, p.Hkv));
        int it = 0;
        for (int64_t i = blockIdx.x; i < items; i += gridDim.x) {
          const Item w = decode(i);
          // (kN, D, tile): tile kt = the sequence's compressed rows [kt kN, kt kN + kN).
          Tensor gK = local_tile(domain_offset(make_coord(w.cmp0, _0{}), mK(_, _, w.g)), Shape<Int<kN>, Int<DK>>{},
                                 make_coord(_, _0{}));
          Tensor gV = local_tile(domain_offset(make_coord(w.cmp0, _0{}), mV(_, _, w.g)), Shape<Int<kN>, Int<DV>>{},
                                 make_coord(_, _0{}));
          auto [tKgK, tKsK] =
              tma_partition(tma_k, Int<0>{}, Layout<_1>{}, group_modes<0, 2>(sK), group_modes<0, 2>(gK));
          auto [tVgV, tVsV] =
              tma_partition(tma_v, Int<0>{}, Layout<_1>{}, group_modes<0, 2>(sV), group_modes<0, 2>(gV));
          for (int kt = 0; kt < w.ntiles; ++kt, ++it) {
            const int st = it % kStages;
            // Stage st was last used kStages tiles ago: wait until both consumers released it
            // (K and V separately: with kOverlap, K of a tile is released one product before V).
            const uint32_t parity = ((it / kStages) + 1) & 1;
            if (it >= kStages) Bar::wait(&sm.empty_k[st], parity);
            FullBar::arrive_and_expect_tx(&sm.full_k[st], C::kBytesK);
            copy(tma_k.with(sm.full_k[st]), tKgK(_, kt), tKsK(_, st));
            if (it >= kStages) Bar::wait(&sm.empty_v[st], parity);
            FullBar::arrive_and_expect_tx(&sm.full_v[st], C::kBytesV);
            copy(tma_v.with(sm.full_v[st]), tVgV(_, kt), tVsV(_, st));
          }
        }
      }
    } else {
      // Q by warps 1-3: the item's 128 rows (position t0 + r / G, head g G + r % G) with 16-byte
      // loads into the swizzled tile (16-byte groups of the head dim stay contiguous under the
      // 128-byte swizzle); rows past the sequence are zeros. Ordinary stores read next by wgmma
      // (the async proxy): each thread fences before it arrives.
      const int qt = int(threadIdx.x) - 32;  // 0..95
      const T* q = static_cast<const T*>(p.q);
      constexpr int kChunks = DK / 8;
      int k = 0;
      for (int64_t i = blockIdx.x; i < items; i += gridDim.x, ++k) {
        const Item w = decode(i);
        const int qb = k % kQBufs, use = k / kQBufs;
        if (use > 0) Bar::wait(&sm.empty_q[qb], (use - 1) & 1);
        if (p.q_async) {
          // cp.async: every 16-byte copy of the tile in flight at once (one memory latency per
          // item), rows past the sequence zero-filled (source size 0); then wait for all of them.
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
          // Measured path: one 16-byte load and store at a time (the loads are not batched, so
          // an item's Q costs about kRows * kChunks / 96 memory latencies).
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

    typename C::MmaQK mma_qk;
    typename C::MmaPV mma_pv;
    auto thr_qk = mma_qk.get_thread_slice(ctid);
    auto thr_pv = mma_pv.get_thread_slice(ctid);
    Tensor tSrQ = thr_qk.partition_fragment_A(sQ);   // (MMA, 1, DK/16, kQBufs) descriptors
    Tensor tSrK = thr_qk.partition_fragment_B(sK);   // (MMA, 1, DK/16, stages)
    Tensor tOrV = thr_pv.partition_fragment_B(sVt);  // (MMA, 1, kN/16, stages)
    Tensor tSrS = partition_fragment_C(mma_qk, Shape<Int<kRows>, Int<kN>>{});  // ((2, 2, kN/8), 1, 1) fp32
    Tensor tOrO = partition_fragment_C(mma_pv, Shape<Int<kRows>, Int<DV>>{});  // ((2, 2, DV/8), 1, 1) fp32
    // P as the A operand of the second product: ((2, 2, 2), 1, kN/16), element i of S is element i
    // of P (value (c, r, c8) of k-block kb is accumulator value (c, r, 2 kb + c8)).
    Tensor tOrP = make_tensor<T>(Layout<Shape<Shape<_2, _2, _2>, _1, Int<kN / 16>>>{});
    static_assert(decltype(size(tSrS))::value == kN / 2 && decltype(size(tOrP))::value == kN / 2);

    // This thread's rows (the accumulator layout): A = 64 cwg + 16 warp + lane / 4, B = A + 8.
    const int rA = 64 * cwg + 16 * warp + lane / 4, rB = rA + 8;
    const int c_lane = 2 * (lane & 3);
    const float sl2 = p.scale * kLog2eF;
    T* o = static_cast<T*>(p.o_cmp);
    int it = 0, k = 0;  // tiles and items consumed so far (the rings' positions)

    for (int64_t i = blockIdx.x; i < items; i += gridDim.x, ++k) {
      const Item w = decode(i);
      const int tA = w.t0 + rA / G, tB = w.t0 + rB / G;
      const int nvA = tA < w.T_b ? visible(tA, p.l, p.d) : 0, nvB = tB < w.T_b ? visible(tB, p.l, p.d) : 0;
      const int qb = k % kQBufs;
      float mA = -INFINITY, mB = -INFINITY, lA = 0.f, lB = 0.f;  // running max (raw score), sum
      clear(tOrO);
      Bar::wait(&sm.full_q[qb], (k / kQBufs) & 1);

      // Masks tile kt's scores past each row's visible count, updates the running max and sum,
      // and turns S into exp2(s sl2 - max sl2) in place; returns the factors (alA, alB) that
      // rescale O from the previous max to the new one.
      auto softmax = [&](int kt) {
        if ((kt + 1) * kN > w.nv_min) {  // some row of the item does not see the whole tile
          CUTE_UNROLL
          for (int j = 0; j < kN / 8; ++j)
            CUTE_UNROLL
            for (int c = 0; c < 2; ++c) {
              const int col = kt * kN + 8 * j + c_lane + c;
              if (col >= nvA) tSrS(c + 4 * j) = -INFINITY;
              if (col >= nvB) tSrS(c + 2 + 4 * j) = -INFINITY;
            }
        }
        float xA = mA, xB = mB;
        CUTE_UNROLL
        for (int j = 0; j < kN / 8; ++j)
          CUTE_UNROLL
          for (int c = 0; c < 2; ++c) xA = fmaxf(xA, tSrS(c + 4 * j)), xB = fmaxf(xB, tSrS(c + 2 + 4 * j));
        // The four threads of a quad hold one row between them.
        xA = fmaxf(xA, __shfl_xor_sync(0xffffffffu, xA, 1));
        xA = fmaxf(xA, __shfl_xor_sync(0xffffffffu, xA, 2));
        xB = fmaxf(xB, __shfl_xor_sync(0xffffffffu, xB, 1));
        xB = fmaxf(xB, __shfl_xor_sync(0xffffffffu, xB, 2));
        // Scaled maxima; a row with no visible key yet keeps -inf and subtracts 0 (every p is 0).
        const float sA = xA == -INFINITY ? 0.f : xA * sl2, sB = xB == -INFINITY ? 0.f : xB * sl2;
        const float alA = ex2(mA * sl2 - sA), alB = ex2(mB * sl2 - sB);
        mA = xA, mB = xB;
        float sumA = 0.f, sumB = 0.f;
        CUTE_UNROLL
        for (int j = 0; j < kN / 8; ++j)
          CUTE_UNROLL
          for (int c = 0; c < 2; ++c) {
            tSrS(c + 4 * j) = ex2(fmaf(tSrS(c + 4 * j), sl2, -sA));
            tSrS(c + 2 + 4 * j) = ex2(fmaf(tSrS(c + 2 + 4 * j), sl2, -sB));
            sumA += tSrS(c + 4 * j), sumB += tSrS(c + 2 + 4 * j);
          }
        lA = lA * alA + sumA, lB = lB * alB + sumB;
        return make_float2(alA, alB);
      };
      auto rescale_and_convert = [&](float2 al) {
        CUTE_UNROLL
        for (int j = 0; j < DV / 8; ++j)
          CUTE_UNROLL
          for (int c = 0; c < 2; ++c) tOrO(c + 4 * j) *= al.x, tOrO(c + 2 + 4 * j) *= al.y;
        CUTE_UNROLL
        for (int e = 0; e < kN / 2; e += 2) {  // pairs: one packed convert (cvt.rn.bf16x2.f32) each
          cutlass::Array<float, 2> x;
          x[0] = tSrS(e), x[1] = tSrS(e + 1);
          *reinterpret_cast<cutlass::Array<T, 2>*>(&tOrP(e)) =
              cutlass::NumericArrayConverter<T, float, 2, cutlass::FloatRoundStyle::round_to_nearest>::convert(x);
        }
      };
      auto tQ = tSrQ(_, _, _, qb);

      if (w.ntiles == 0) {
        Bar::arrive(&sm.empty_q[qb]);
      } else if constexpr (!kOverlap) {
        // One tile at a time: S, softmax, P V, each waited for.
        for (int kt = 0; kt < w.ntiles; ++kt) {
          const int st = (it + kt) % kStages, parity = ((it + kt) / kStages) & 1;
          FullBar::wait(&sm.full_k[st], parity);
          wg_gemm<true, false>(mma_qk, tQ, tSrK(_, _, _, st), tSrS);
          Bar::arrive(&sm.empty_k[st]);
          if (kt == w.ntiles - 1) Bar::arrive(&sm.empty_q[qb]);  // Q's last reader is done
          rescale_and_convert(softmax(kt));
          FullBar::wait(&sm.full_v[st], parity);
          wg_gemm<false, true>(mma_pv, tOrP, tOrV(_, _, _, st), tOrO);
          Bar::arrive(&sm.empty_v[st]);
        }
      } else {
        // FlashAttention-3's intra-warpgroup overlap: S of tile kt and P V of tile kt - 1 are
        // issued together, and the softmax of tile kt runs on the CUDA cores while the tensor
        // cores do P V of tile kt - 1; O is rescaled once that product has landed.
        {
          const int st = it % kStages, parity = (it / kStages) & 1;
          FullBar::wait(&sm.full_k[st], parity);
          wg_gemm<true, false>(mma_qk, tQ, tSrK(_, _, _, st), tSrS);
          Bar::arrive(&sm.empty_k[st]);
          if (w.ntiles == 1) Bar::arrive(&sm.empty_q[qb]);
          rescale_and_convert(softmax(0));
        }
        for (int kt = 1; kt < w.ntiles; ++kt) {
          const int st = (it + kt) % kStages, parity = ((it + kt) / kStages) & 1;
          const int sp = (it + kt - 1) % kStages, parity_p = ((it + kt - 1) / kStages) & 1;
          FullBar::wait(&sm.full_k[st], parity);
          wg_issue<true, false>(mma_qk, tQ, tSrK(_, _, _, st), tSrS);
          FullBar::wait(&sm.full_v[sp], parity_p);
          wg_issue<false, true>(mma_pv, tOrP, tOrV(_, _, _, sp), tOrO);
          warpgroup_wait<1>();  // S landed (groups complete in order); P V may still run
          warpgroup_fence_operand(tSrS);
          Bar::arrive(&sm.empty_k[st]);
          if (kt == w.ntiles - 1) Bar::arrive(&sm.empty_q[qb]);
          const float2 al = softmax(kt);
          warpgroup_wait<0>();
          warpgroup_fence_operand(tOrO);
          warpgroup_fence_operand(tOrP);
          Bar::arrive(&sm.empty_v[sp]);
          rescale_and_convert(al);
        }
        const int sl = (it + w.ntiles - 1) % kStages;
        FullBar::wait(&sm.full_v[sl], ((it + w.ntiles - 1) / kStages) & 1);
        wg_gemm<false, true>(mma_pv, tOrP, tOrV(_, _, _, sl), tOrO);
        Bar::arrive(&sm.empty_v[sl]);
      }
      it += w.ntiles;

      // Epilogue: O / l in the operand precision, lse = ln(sum exp(s q.k)) in fp32.
      lA += __shfl_xor_sync(0xffffffffu, lA, 1);
      lA += __shfl_xor_sync(0xffffffffu, lA, 2);
      lB += __shfl_xor_sync(0xffffffffu, lB, 1);
      lB += __shfl_xor_sync(0xffffffffu, lB, 2);
      const float iA = lA > 0.f ? 1.f / lA : 0.f, iB = lB > 0.f ? 1.f / lB : 0.f;
      const int hA = w.g * G + rA % G, hB = w.g * G + rB % G;
      if (tA < w.T_b) {
        T* dst = o + ((w.row0 + tA) * p.Hq + hA) * DV + c_lane;
        CUTE_UNROLL
        for (int j = 0; j < DV / 8; ++j) {
          const uint32_t lo = T(tOrO(4 * j) * iA).raw(), hi = T(tOrO(1 + 4 * j) * iA).raw();
          *reinterpret_cast<uint32_t*>(dst + 8 * j) = lo | (hi << 16);
        }
        if ((lane & 3) == 0)
          p.lse_cmp[(w.row0 + tA) * p.Hq + hA] = lA > 0.f ? (mA * sl2 + log2f(lA)) * kLn2F : -INFINITY;
      }
      if (tB < w.T_b) {
        T* dst = o + ((w.row0 + tB) * p.Hq + hB) * DV + c_lane;
        CUTE_UNROLL
        for (int j = 0; j < DV / 8; ++j) {
          const uint32_t lo = T(tOrO(2 + 4 * j) * iB).raw(), hi = T(tOrO(3 + 4 * j) * iB).raw();
          *reinterpret_cast<uint32_t*>(dst + 8 * j) = lo | (hi << 16);
        }
        if ((lane & 3) == 0)
          p.lse_cmp[(w.row0 + tB) * p.Hq + hB] = lB > 0.f ? (mB * sl2 + log2f(lB)) * kLn2F : -INFINITY;
      }
    }
  }
#endif
}

template <class T, int DK, int DV, int kN, int kStages, bool kOverlap>
struct Launcher {
  using C = Cfg<T, DK, DV, kN, kStages>;
  static auto tmas(const CmpAttnSm90Params& p) {
    // With no compressed row at all no tile loads anything (every row sees 0 blocks), but the
    // descriptor still needs a real address and a non-empty shape: q's first rows stand in.
    const bool none = p.Nc == 0;
    const T* kc = static_cast<const T*>(none ? p.q : p.kc);
    const T* vc = static_cast<const T*>(none ? p.q : p.vc);
    const int Nc = none ? 1 : int(p.Nc);
    auto tk = make_kv_tma<T, DK, kN>(kc, Nc, p.Hkv, take<0, 2>(typename C::LayoutK{}));
    auto tv = make_kv_tma<T, DV, kN>(vc, Nc, p.Hkv, take<0, 2>(typename C::LayoutV{}));
    return std::make_pair(tk, tv);
  }
  using TmaK = decltype(tmas(CmpAttnSm90Params{}).first);
  using TmaV = decltype(tmas(CmpAttnSm90Params{}).second);
  static const void* kernel() {
    return reinterpret_cast<const void*>(&cmp_attn_sm90_kernel<T, DK, DV, kN, kStages, kOverlap, TmaK, TmaV>);
  }
  static void run(const CmpAttnSm90Params& p, cudaStream_t s) {
    auto [tk, tv] = tmas(p);
    auto k = &cmp_attn_sm90_kernel<T, DK, DV, kN, kStages, kOverlap, TmaK, TmaV>;
    const int smem = int(sizeof(typename C::Smem));
    NSA_CUDA_CHECK(cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    const int64_t items = p.tiles * p.Hkv;
    int64_t grid = items;
    if (p.persistent) {
      int dev = 0, sms = 0;
      NSA_CUDA_CHECK(cudaGetDevice(&dev));
      NSA_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
      grid = std::min<int64_t>(items, sms);
    }
    k<<<unsigned(grid), kThreads, smem, s>>>(p, tk, tv);
    NSA_CUDA_CHECK_LAUNCH("cmp_attn_sm90_kernel");
  }
};

// The compiled variants (docs/cuda_sm90.md has their times); fn gets the Launcher, false if
// none matches. The defaults (cmp_attn_sm90_resolve): (block_n, stages) = (128, 2) for dk = 128
// (two Q buffers fit beside the ring) and (64, 3) for dk = 192 (at (128, 2) only one Q buffer
// fits, and the Q load shows); both with the overlap. The others are kept to compare against:
// the plain schedule at dk = 128, and (128, 2) at dk = 192.
#define NSA_SM90_VARIANTS(X)                                                                      \
  X(cutlass::bfloat16_t, Sm90Elem::BF16, 128, 128, 128, 2, true)                                  \
  X(cutlass::bfloat16_t, Sm90Elem::BF16, 192, 128, 64, 3, true)                                   \
  X(cutlass::half_t, Sm90Elem::FP16, 128, 128, 128, 2, true)                                      \
  X(cutlass::half_t, Sm90Elem::FP16, 192, 128, 64, 3, true)                                       \
  NSA_SM90_MORE_VARIANTS(X)
#ifdef NSA_SM90_DEV_ONE_VARIANT  // development builds: the defaults only
#define NSA_SM90_MORE_VARIANTS(X)
#else
#define NSA_SM90_MORE_VARIANTS(X)                                                                 \
  X(cutlass::bfloat16_t, Sm90Elem::BF16, 128, 128, 128, 2, false)                                 \
  X(cutlass::bfloat16_t, Sm90Elem::BF16, 192, 128, 128, 2, true)                                  \
  X(cutlass::half_t, Sm90Elem::FP16, 192, 128, 128, 2, true)
#endif

template <class Fn>
bool dispatch(const CmpAttnSm90Params& p, Fn&& fn) {
#define NSA_SM90_CASE(T_, E_, DK_, DV_, N_, S_, O_)                                               \
  if (p.elem == E_ && p.dk == DK_ && p.dv == DV_ && p.block_n == N_ && p.stages == S_ && p.overlap == O_) { \
    fn(Launcher<T_, DK_, DV_, N_, S_, O_>{});                                                     \
    return true;                                                                                  \
  }
  NSA_SM90_VARIANTS(NSA_SM90_CASE)
#undef NSA_SM90_CASE
  return false;
}

}  // namespace

int cmp_attn_sm90_tile_positions(int G) { return G > 0 && kRows % G == 0 ? kRows / G : 0; }

CmpAttnSm90Params cmp_attn_sm90_resolve(const CmpAttnSm90Params& p) {
  CmpAttnSm90Params r = p;
  if (r.block_n == 0) r.block_n = r.dk <= 128 ? 128 : 64;
  if (r.stages == 0) r.stages = r.dk <= 128 ? 2 : 3;
  return r;
}

bool cmp_attn_sm90_supported(const CmpAttnSm90Params& p_in, std::string* why) {
  const CmpAttnSm90Params p = cmp_attn_sm90_resolve(p_in);
  auto no = [&](std::string msg) {
    if (why) *why = "cmp_attn_sm90: " + std::move(msg);
    return false;
  };
  if (!(p.G == 1 || p.G == 2 || p.G == 4 || p.G == 8 || p.G == 16) || p.Hq != p.G * p.Hkv)
    return no(cat("G = Hq / Hkv = ", p.Hq, " / ", p.Hkv, " is not supported (expected 1, 2, 4, 8 or 16)"));
  if (p.Nc >= (int64_t(1) << 31)) return no(cat("Nc = ", p.Nc, " compressed rows exceed TMA's int32 coordinates"));
  const void* kern = nullptr;
  if (!dispatch(p, [&](auto L) { kern = decltype(L)::kernel(); }))
    return no(cat("no compiled variant for ", p.elem == Sm90Elem::BF16 ? "bf16" : "fp16", ", dk = ", p.dk,
                  ", dv = ", p.dv, ", block_n = ", p.block_n, ", stages = ", p.stages, ", overlap = ", p.overlap,
                  " (compiled: cmp_attn_sm90.cu's NSA_SM90_VARIANTS; every precision has dk/dv 128/128 and ",
                  "192/128 with the defaults)"));
  int dev = 0, major = 0, minor = 0;
  if (cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev) != cudaSuccess) {
    cudaGetLastError();
    return no("no CUDA device");
  }
  if (major != 9 || minor != 0) return no(cat("needs compute capability 9.0 (Hopper), the device has ", major, ".", minor));
  cudaFuncAttributes attr{};
  if (cudaFuncGetAttributes(&attr, kern) != cudaSuccess) {
    cudaGetLastError();
    return no("this build has no sm_90a code (NSA_CUDA_ARCHS must contain 90a)");
  }
  return true;
}

void cmp_attn_sm90(const CmpAttnSm90Params& p_in, cudaStream_t s) {
  const CmpAttnSm90Params p = cmp_attn_sm90_resolve(p_in);
  std::string why;
  if (!cmp_attn_sm90_supported(p, &why)) throw ConfigError(why);
  if (p.tiles == 0 || p.Hkv == 0) return;
  dispatch(p, [&](auto L) { decltype(L)::run(p, s); });
}

}  // namespace nsa::cuda
