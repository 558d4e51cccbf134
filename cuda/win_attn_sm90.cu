// Sliding-window attention + the gated combine (Eq. 5) on Hopper (sm_90a), FlashAttention-3's
// structure built from CuTe (CUTLASS 4.2), the same skeleton as cmp_attn_sm90.cu. docs/cuda_sm90.md
// says what was measured and why the shapes below.
//
// Work item = 128 query rows x a band of the raw keys of one KV group g. Rows are positions x the
// G heads of the group (row r: position t0 + r / G, head g G + r % G), BT = 128 / G positions. Row
// t sees keys u in [max(0, t - w + 1), t], so the item needs the keys [k0, t_last] with
// k0 = max(0, t0 - w + 1): w + BT - 1 keys once t0 >= w - 1, in ceil(that / block_n) tiles starting
// at k0 (any row: TMA boxes start at any coordinate). A tile inside every valid row's window skips
// the mask; the others mask per row at both ends (u < start(t) or u > t: -inf, exactly 0 after the
// exp). Keys past the sequence (the next sequence's rows, TMA's zero fill past N) are all > t.
// A CTA (384 threads; one per SM when `persistent`, walking the items longest first):
//   warpgroup 0, the producer (setmaxnreg 56): one thread of warp 0 streams the K and V tiles
//     (k_win [N, Hkv, dk], row stride Hkv dk) by TMA into a kStages-deep ring of swizzled shared
//     memory that runs on across items (mbarriers full_k / full_v: bytes landed; empty_k /
//     empty_v: both consumer warpgroups done). Warps 1-3 copy each item's Q into one of kQBufs
//     buffers with cp.async (all copies in flight, one wait) and ask L2 to prefetch the item's
//     O_cmp and O_slc rows (cp.async.bulk.prefetch) and gates, one item ahead of its epilogue.
//   warpgroups 1 and 2, the consumers (setmaxnreg 224), 64 rows each: S = Q K^T (wgmma SS), the
//     online softmax in registers, O += P V (wgmma RS, P from registers), the softmax of tile k
//     under the P V product of tile k - 1 (FlashAttention-3's intra-warpgroup overlap). The
//     epilogue's loads (gates, O_cmp, O_slc of the thread's first row) are issued under the last
//     P V product, the second row's under the first row's stores; o = g_cmp O_cmp + g_slc O_slc
//     + g_win O_win, lse_win, and O_win where asked, stored from registers.
#include "win_attn_sm90.hpp"

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
// target); any other pass compiles an empty body, and the host side refuses to launch where the
// device has no sm_90a image (win_attn_sm90_supported).
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define NSA_SM90A_BODY 1
#elif defined(__CUDA_ARCH__)
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
  // Q [128, DK], K [kN, DK] and V [kN, DV] per stage; K-major, 128-byte swizzle. Two Q buffers
  // (the next item's Q lands during this item's products) where they fit beside the ring.
  static constexpr int kQBufs =
      2 * kRows * DK * 2 + kStages * kN * (DK + DV) * 2 + 1024 <= 227 * 1024 ? 2 : 1;
  using LayoutQ =
      decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<T>{}, Shape<Int<kRows>, Int<DK>, Int<kQBufs>>{}));
  using LayoutK = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<T>{}, Shape<Int<kN>, Int<DK>, Int<kStages>>{}));
  using LayoutV = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<T>{}, Shape<Int<kN>, Int<DV>, Int<kStages>>{}));
  // V^T (dv, key, stage): the same bytes with dv as the contiguous (MN) mode, the B operand of P V.
  using LayoutVt = decltype(composition(
      LayoutV{}, make_ordered_layout(Shape<Int<DV>, Int<kN>, Int<kStages>>{}, Step<_2, _1, _3>{})));
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
    uint64_t empty_k[kStages];
    uint64_t empty_v[kStages];
    uint64_t full_q[kQBufs];
    uint64_t empty_q[kQBufs];
  };
  static constexpr uint32_t kBytesK = uint32_t(kN) * DK * sizeof(T);
  static constexpr uint32_t kBytesV = uint32_t(kN) * DV * sizeof(T);
};

// The TMA descriptor of one operand: the group's rows of x [N, Hkv, D] as a (N, D, Hkv) tensor,
// boxes of kN rows x D.
template <class T, int D, int kN, class SmemLayout>
auto make_kv_tma(const T* x, int N, int Hkv, SmemLayout sl) {
  Tensor m = make_tensor(make_gmem_ptr(x), make_shape(N, Int<D>{}, Hkv), make_stride(int64_t(Hkv) * D, _1{}, int64_t(D)));
  return make_tma_copy(SM90_TMA_LOAD{}, m, sl, Shape<Int<kN>, Int<D>>{}, _1{});
}

__device__ __forceinline__ float ex2(float x) {  // 2^x; ex2.approx of -inf is +0
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

__device__ __forceinline__ int win_start(int t, int w) { return t - w + 1 > 0 ? t - w + 1 : 0; }

template <class T>
__device__ __forceinline__ float2 unpack2(uint32_t x) {
  return make_float2(float(T::bitcast(uint16_t(x & 0xFFFFu))), float(T::bitcast(uint16_t(x >> 16))));
}
template <class T>
__device__ __forceinline__ uint32_t pack2(float a, float b) {
  return uint32_t(T(a).raw()) | (uint32_t(T(b).raw()) << 16);
}

// One warpgroup product C (+)= A B, issued (one commit group); the caller waits and fences.
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

template <class T, int DK, int DV, int kN, int kStages, class TmaK, class TmaV>
__global__ void __launch_bounds__(kThreads, 1)
    win_attn_sm90_kernel(const __grid_constant__ WinAttnSm90Params p, const __grid_constant__ TmaK tma_k,
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

  // Work items (tile of positions, group), longest first (the first w / BT tiles of a sequence
  // have shorter bands); CTA c takes items c, c + gridDim.x, ...
  const int64_t items = p.tiles * p.Hkv;
  const int G = p.G, BT = kRows / G;
  struct Item {
    int g, t0, T_b, t_last, k0, ntiles;
    int64_t row0;
  };
  auto decode = [&](int64_t i) {
    Item it;
    const int64_t x = p.tiles - 1 - i / p.Hkv;
    it.g = int(i % p.Hkv);
    int lo = 0, hi = p.B - 1;
    while (lo < hi) {
      const int mid = (lo + hi + 1) / 2;
      if (p.cu_tiles[mid] <= x) lo = mid;
      else hi = mid - 1;
    }
    it.t0 = int(x - p.cu_tiles[lo]) * BT;
    it.row0 = p.cu_seqlens[lo];
    it.T_b = int(p.cu_seqlens[lo + 1] - it.row0);
    it.t_last = min(it.t0 + BT, it.T_b) - 1;
    it.k0 = win_start(it.t0, p.w);
    it.ntiles = (it.t_last + 1 - it.k0 + kN - 1) / kN;  // >= 1: the band holds t0 itself
    return it;
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
      if (cute::elect_one_sync()) {
        Tensor mK = tma_k.get_tma_tensor(make_shape(int(p.N), Int<DK>{}, p.Hkv));
        Tensor mV = tma_v.get_tma_tensor(make_shape(int(p.N), Int<DV>{}, p.Hkv));
        int it = 0;
        for (int64_t i = blockIdx.x; i < items; i += gridDim.x) {
          const Item w = decode(i);
          // (kN, D, tile): tile kt = the key rows [k0 + kt kN, k0 + kt kN + kN) of the sequence.
          const int first = int(w.row0) + w.k0;
          Tensor gK = local_tile(domain_offset(make_coord(first, _0{}), mK(_, _, w.g)), Shape<Int<kN>, Int<DK>>{},
                                 make_coord(_, _0{}));
          Tensor gV = local_tile(domain_offset(make_coord(first, _0{}), mV(_, _, w.g)), Shape<Int<kN>, Int<DV>>{},
                                 make_coord(_, _0{}));
          auto [tKgK, tKsK] =
              tma_partition(tma_k, Int<0>{}, Layout<_1>{}, group_modes<0, 2>(sK), group_modes<0, 2>(gK));
          auto [tVgV, tVsV] =
              tma_partition(tma_v, Int<0>{}, Layout<_1>{}, group_modes<0, 2>(sV), group_modes<0, 2>(gV));
          for (int kt = 0; kt < w.ntiles; ++kt, ++it) {
            const int st = it % kStages;
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
      // Warps 1-3: Q with cp.async (rows past the sequence zero-filled), then L2 prefetches of
      // what the item's epilogue reads. Ordinary-proxy writes read next by wgmma (the async
      // proxy): each thread waits for its copies and fences before it arrives.
      const int qt = int(threadIdx.x) - 32;  // 0..95
      const T* q = static_cast<const T*>(p.q);
      const T* ocmp = static_cast<const T*>(p.o_cmp);
      const T* oslc = static_cast<const T*>(p.o_slc);
      constexpr int kChunks = DK / 8;
      const uint32_t pf_bytes = uint32_t(G) * DV * sizeof(T);  // one position's heads of the group
      int k = 0;
      for (int64_t i = blockIdx.x; i < items; i += gridDim.x, ++k) {
        const Item w = decode(i);
        const int qb = k % kQBufs, use = k / kQBufs;
        if (use > 0) Bar::wait(&sm.empty_q[qb], (use - 1) & 1);
        for (int c = qt; c < kRows * kChunks; c += 96) {
          const int r = c / kChunks, e = (c % kChunks) * 8;
          const int t = w.t0 + r / G;
          const bool ok = t < w.T_b;
          const T* src = q + ((w.row0 + (ok ? t : 0)) * p.Hq + w.g * G + r % G) * DK + e;
          const uint32_t dst = cute::cast_smem_ptr_to_uint(&sQ(r, e, qb));
          asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(ok ? 16 : 0)
                       : "memory");
        }
        for (int j = qt; j < BT; j += 96) {
          const int t = w.t0 + j;
          if (t >= w.T_b) break;
          const int64_t th = (w.row0 + t) * p.Hq + w.g * G;
          asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;\n" ::"l"(ocmp + th * DV), "r"(pf_bytes) : "memory");
          asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;\n" ::"l"(oslc + th * DV), "r"(pf_bytes) : "memory");
          const float* gt = p.gates + th * 3;
          asm volatile("prefetch.global.L2 [%0];\n" ::"l"(gt) : "memory");
          asm volatile("prefetch.global.L2 [%0];\n" ::"l"(gt + 3 * G - 1) : "memory");
        }
        asm volatile("cp.async.wait_all;\n" ::: "memory");
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
    // P as the A operand of the second product: element i of S is element i of P.
    Tensor tOrP = make_tensor<T>(Layout<Shape<Shape<_2, _2, _2>, _1, Int<kN / 16>>>{});
    static_assert(decltype(size(tSrS))::value == kN / 2 && decltype(size(tOrP))::value == kN / 2);

    // This thread's rows (the accumulator layout): A = 64 cwg + 16 warp + lane / 4, B = A + 8.
    const int rA = 64 * cwg + 16 * warp + lane / 4, rB = rA + 8;
    const int c_lane = 2 * (lane & 3);
    const float sl2 = p.scale * kLog2eF;
    const uint32_t* ocmp = static_cast<const uint32_t*>(p.o_cmp);  // element pairs
    const uint32_t* oslc = static_cast<const uint32_t*>(p.o_slc);
    uint32_t* o = static_cast<uint32_t*>(p.o);
    uint32_t* owin = static_cast<uint32_t*>(p.o_win);
    int it = 0, k = 0;  // tiles and items consumed so far (the rings' positions)

    for (int64_t i = blockIdx.x; i < items; i += gridDim.x, ++k) {
      const Item w = decode(i);
      const int tA = w.t0 + rA / G, tB = w.t0 + rB / G;
      const bool okA = tA < w.T_b, okB = tB < w.T_b;
      const int loA = win_start(tA, p.w), loB = win_start(tB, p.w);
      // Keys every valid row of the item sees: [start(t_last), t0].
      const int all_lo = win_start(w.t_last, p.w), all_hi = w.t0;
      const int qb = k % kQBufs;
      float mA = -INFINITY, mB = -INFINITY, lA = 0.f, lB = 0.f;  // running max (raw score), sum
      clear(tOrO);
      Bar::wait(&sm.full_q[qb], (k / kQBufs) & 1);

      // Masks tile kt outside each row's window, updates the running max and sum, turns S into
      // exp2(s sl2 - max sl2) in place; returns the factors that rescale O to the new max.
      auto softmax = [&](int kt) {
        const int u0 = w.k0 + kt * kN;
        if (u0 < all_lo || u0 + kN - 1 > all_hi) {
          CUTE_UNROLL
          for (int j = 0; j < kN / 8; ++j)
            CUTE_UNROLL
            for (int c = 0; c < 2; ++c) {
              const int u = u0 + 8 * j + c_lane + c;
              if (u < loA || u > tA) tSrS(c + 4 * j) = -INFINITY;
              if (u < loB || u > tB) tSrS(c + 2 + 4 * j) = -INFINITY;
            }
        }
        float xA = mA, xB = mB;
        CUTE_UNROLL
        for (int j = 0; j < kN / 8; ++j)
          CUTE_UNROLL
          for (int c = 0; c < 2; ++c) xA = fmaxf(xA, tSrS(c + 4 * j)), xB = fmaxf(xB, tSrS(c + 2 + 4 * j));
        xA = fmaxf(xA, __shfl_xor_sync(0xffffffffu, xA, 1));
        xA = fmaxf(xA, __shfl_xor_sync(0xffffffffu, xA, 2));
        xB = fmaxf(xB, __shfl_xor_sync(0xffffffffu, xB, 1));
        xB = fmaxf(xB, __shfl_xor_sync(0xffffffffu, xB, 2));
        // A row with no key in the band yet (the first tile of a long band) keeps -inf and
        // subtracts 0: every p is 0.
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
        for (int e = 0; e < kN / 2; e += 2) {
          cutlass::Array<float, 2> x;
          x[0] = tSrS(e), x[1] = tSrS(e + 1);
          *reinterpret_cast<cutlass::Array<T, 2>*>(&tOrP(e)) =
              cutlass::NumericArrayConverter<T, float, 2, cutlass::FloatRoundStyle::round_to_nearest>::convert(x);
        }
      };
      auto tQ = tSrQ(_, _, _, qb);

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
      // The last P V product, and under it the epilogue's loads of row A: its gates, O_cmp and
      // O_slc (element pairs 8 j + c_lane; in L2 since the Q warps prefetched them). Row B's are
      // issued after the product, under row A's arithmetic and stores (both rows' loads under
      // the product would spill at block_n = 128).
      const int hA = w.g * G + rA % G, hB = w.g * G + rB % G;
      const int64_t thA = (w.row0 + tA) * p.Hq + hA, thB = (w.row0 + tB) * p.Hq + hB;
      uint32_t xc[DV / 8], xs[DV / 8];
      float g0 = 0, g1 = 0, g2 = 0;
      auto load_row = [&](bool ok, int64_t th) {
        if (!ok) return;
        g0 = p.gates[th * 3], g1 = p.gates[th * 3 + 1], g2 = p.gates[th * 3 + 2];
        const uint32_t* pc = ocmp + (th * DV + c_lane) / 2;
        const uint32_t* ps = oslc + (th * DV + c_lane) / 2;
        CUTE_UNROLL
        for (int j = 0; j < DV / 8; ++j) xc[j] = __ldg(pc + 4 * j), xs[j] = __ldg(ps + 4 * j);
      };
      {
        const int sl = (it + w.ntiles - 1) % kStages;
        FullBar::wait(&sm.full_v[sl], ((it + w.ntiles - 1) / kStages) & 1);
        wg_issue<false, true>(mma_pv, tOrP, tOrV(_, _, _, sl), tOrO);
        load_row(okA, thA);
        warpgroup_wait<0>();
        warpgroup_fence_operand(tOrO);
        warpgroup_fence_operand(tOrP);
        Bar::arrive(&sm.empty_v[sl]);
      }
      it += w.ntiles;

      // Epilogue: O_win = O / l (fp32, rounded only where stored), o = Eq. 5, lse in fp32.
      lA += __shfl_xor_sync(0xffffffffu, lA, 1);
      lA += __shfl_xor_sync(0xffffffffu, lA, 2);
      lB += __shfl_xor_sync(0xffffffffu, lB, 1);
      lB += __shfl_xor_sync(0xffffffffu, lB, 2);
      // Row half (0: A, 1: B) from the loaded xc, xs, g0..g2.
      auto store_row = [&](auto half, int64_t th, float m, float l) {  // half: Int<0> or Int<1>, static indices
        const float inv = l > 0.f ? 1.f / l : 0.f;
        const int64_t e = (th * DV + c_lane) / 2;
        CUTE_UNROLL
        for (int j = 0; j < DV / 8; ++j) {
          const float w0 = tOrO(2 * half() + 4 * j) * inv, w1 = tOrO(2 * half() + 1 + 4 * j) * inv;
          if (owin) owin[e + 4 * j] = pack2<T>(w0, w1);
          const float2 c2 = unpack2<T>(xc[j]), s2 = unpack2<T>(xs[j]);
          o[e + 4 * j] = pack2<T>(g0 * c2.x + g1 * s2.x + g2 * w0, g0 * c2.y + g1 * s2.y + g2 * w1);
        }
        if ((lane & 3) == 0) p.lse_win[th] = l > 0.f ? (m * sl2 + log2f(l)) * kLn2F : -INFINITY;
      };
      if (okA) store_row(Int<0>{}, thA, mA, lA);
      load_row(okB, thB);
      if (okB) store_row(Int<1>{}, thB, mB, lB);
    }
  }
#endif
}

template <class T, int DK, int DV, int kN, int kStages>
struct Launcher {
  using C = Cfg<T, DK, DV, kN, kStages>;
  static auto tmas(const WinAttnSm90Params& p) {
    const int N = std::max<int>(1, int(p.N));
    auto tk = make_kv_tma<T, DK, kN>(static_cast<const T*>(p.k_win), N, std::max(1, p.Hkv),
                                     take<0, 2>(typename C::LayoutK{}));
    auto tv = make_kv_tma<T, DV, kN>(static_cast<const T*>(p.v_win), N, std::max(1, p.Hkv),
                                     take<0, 2>(typename C::LayoutV{}));
    return std::make_pair(tk, tv);
  }
  using TmaK = decltype(tmas(WinAttnSm90Params{}).first);
  using TmaV = decltype(tmas(WinAttnSm90Params{}).second);
  static const void* kernel() {
    return reinterpret_cast<const void*>(&win_attn_sm90_kernel<T, DK, DV, kN, kStages, TmaK, TmaV>);
  }
  static void run(const WinAttnSm90Params& p, cudaStream_t s) {
    auto [tk, tv] = tmas(p);
    auto k = &win_attn_sm90_kernel<T, DK, DV, kN, kStages, TmaK, TmaV>;
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
    NSA_CUDA_CHECK_LAUNCH("win_attn_sm90_kernel");
  }
};

// The compiled variants (T, elem, dk, dv, block_n, stages); docs/cuda_sm90.md has their times.
// The first of each (precision, dims) is the default (win_attn_sm90_resolve).
#define NSA_WIN_SM90_VARIANTS(X)                                  \
  X(cutlass::bfloat16_t, Sm90Elem::BF16, 128, 128, 128, 2)        \
  X(cutlass::bfloat16_t, Sm90Elem::BF16, 192, 128, 64, 3)         \
  X(cutlass::half_t, Sm90Elem::FP16, 128, 128, 128, 2)            \
  X(cutlass::half_t, Sm90Elem::FP16, 192, 128, 64, 3)             \
  NSA_WIN_SM90_MORE_VARIANTS(X)
#ifdef NSA_SM90_DEV_ONE_VARIANT
#define NSA_WIN_SM90_MORE_VARIANTS(X)
#else
#define NSA_WIN_SM90_MORE_VARIANTS(X)                             \
  X(cutlass::bfloat16_t, Sm90Elem::BF16, 128, 128, 64, 3)         \
  X(cutlass::bfloat16_t, Sm90Elem::BF16, 128, 128, 64, 4)
#endif

template <class Fn>
bool dispatch(const WinAttnSm90Params& p, Fn&& fn) {
#define NSA_WIN_SM90_CASE(T_, E_, DK_, DV_, N_, S_)                                                   \
  if (p.elem == E_ && p.dk == DK_ && p.dv == DV_ && p.block_n == N_ && p.stages == S_) {              \
    fn(Launcher<T_, DK_, DV_, N_, S_>{});                                                             \
    return true;                                                                                      \
  }
  NSA_WIN_SM90_VARIANTS(NSA_WIN_SM90_CASE)
#undef NSA_WIN_SM90_CASE
  return false;
}

}  // namespace

int win_attn_sm90_tile_positions(int G) { return G > 0 && kRows % G == 0 ? kRows / G : 0; }

WinAttnSm90Params win_attn_sm90_resolve(const WinAttnSm90Params& p) {
  WinAttnSm90Params r = p;
  if (r.block_n == 0) r.block_n = r.dk <= 128 ? 128 : 64;
  if (r.stages == 0) r.stages = r.dk <= 128 ? 2 : 3;
  return r;
}

bool win_attn_sm90_supported(const WinAttnSm90Params& p_in, std::string* why) {
  const WinAttnSm90Params p = win_attn_sm90_resolve(p_in);
  auto no = [&](std::string msg) {
    if (why) *why = "win_attn_sm90: " + std::move(msg);
    return false;
  };
  if (!(p.G == 1 || p.G == 2 || p.G == 4 || p.G == 8 || p.G == 16) || p.Hq != p.G * p.Hkv)
    return no(cat("G = Hq / Hkv = ", p.Hq, " / ", p.Hkv, " is not supported (expected 1, 2, 4, 8 or 16)"));
  if (p.N >= (int64_t(1) << 31)) return no(cat("N = ", p.N, " tokens exceed TMA's int32 coordinates"));
  if (p.w < 1) return no(cat("window w = ", p.w, " (expected >= 1)"));
  const void* kern = nullptr;
  if (!dispatch(p, [&](auto L) { kern = decltype(L)::kernel(); }))
    return no(cat("no compiled variant for ", p.elem == Sm90Elem::BF16 ? "bf16" : "fp16", ", dk = ", p.dk,
                  ", dv = ", p.dv, ", block_n = ", p.block_n, ", stages = ", p.stages,
                  " (compiled: win_attn_sm90.cu's NSA_WIN_SM90_VARIANTS; every precision has dk/dv 128/128 and ",
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

void win_attn_sm90(const WinAttnSm90Params& p_in, cudaStream_t s) {
  const WinAttnSm90Params p = win_attn_sm90_resolve(p_in);
  std::string why;
  if (!win_attn_sm90_supported(p, &why)) throw ConfigError(why);
  if (p.tiles == 0 || p.Hkv == 0 || p.N == 0) return;
  dispatch(p, [&](auto L) { decltype(L)::run(p, s); });
}

}  // namespace nsa::cuda
