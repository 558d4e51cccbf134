// Device helpers shared by the kernels: element conversions, the config arithmetic, the
// sequence lookup, and the tensor-core primitives of the mma kernels (ldmatrix, mma.sync m16n8k16 with
// fp32 accumulation, cp.async with zero fill), all available from sm_80 on.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "config.hpp"
#include "params.hpp"

namespace nsa::cuda::dev {

// ---- element conversions ----
__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
template <class T>
__device__ __forceinline__ T from_f(float x);
template <>
__device__ __forceinline__ float from_f<float>(float x) { return x; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <>
__device__ __forceinline__ __half from_f<__half>(float x) { return __float2half_rn(x); }

// Two floats as one 32-bit register of two 16-bit elements, the lower column in the low half.
template <class T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}
template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}

// 2^x with one MUFU instruction (flush-to-zero, ~2 ulp): exp2f without fast-math adds a
// denormal-handling sequence around it, which measurably costs in the softmax loops.
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// act(x) and act'(x) of the hidden layers (phi = mlp, the gate MLP) in fp32: the reference's
// formulas (reference/common.hpp).
__device__ __forceinline__ float activation(Activation a, float x) {
  switch (a) {
    case Activation::Gelu: return 0.5f * x * (1.0f + erff(x * 0.70710678118654752f));
    case Activation::GeluTanh: return 0.5f * x * (1.0f + tanhf(0.79788456080286536f * (x + 0.044715f * x * x * x)));
    case Activation::Relu: return x > 0 ? x : 0.0f;
    case Activation::Silu: return x / (1.0f + expf(-x));
  }
  return x;
}
__device__ __forceinline__ float activation_grad(Activation a, float x) {
  switch (a) {
    case Activation::Gelu: {
      const float cdf = 0.5f * (1.0f + erff(x * 0.70710678118654752f));
      const float pdf = expf(-0.5f * x * x) * 0.39894228040143268f;  // 1 / sqrt(2 pi)
      return cdf + x * pdf;
    }
    case Activation::GeluTanh: {
      const float c = 0.79788456080286536f, u = c * (x + 0.044715f * x * x * x), th = tanhf(u);
      return 0.5f * (1.0f + th) + 0.5f * x * (1.0f - th * th) * c * (1.0f + 3.0f * 0.044715f * x * x);
    }
    case Activation::Relu: return x > 0 ? 1.0f : 0.0f;
    case Activation::Silu: {
      const float s = 1.0f / (1.0f + expf(-x));
      return s * (1.0f + x * (1.0f - s));
    }
  }
  return 1.0f;
}

// ---- config arithmetic (Config's, per sequence-local position t) ----
__device__ __forceinline__ int cmp_visible(int t, int l, int d) { return num_cmp_blocks(t + 1, l, d); }
__device__ __forceinline__ int slc_valid(int t, int ls) { return t / ls + 1; }
__device__ __forceinline__ int win_start(int t, int w) { return t - w + 1 > 0 ? t - w + 1 : 0; }

// Eq. 9: |[i d, i d + l) ∩ [j l', (j+1) l')| / d, the weight of compressed block i in selection block j.
__device__ __forceinline__ float overlap_weight(int i, int j, int l, int d, int ls) {
  const int a = max(i * d, j * ls), b = min(i * d + l, (j + 1) * ls);
  return b > a ? float(b - a) / float(d) : 0.0f;
}

// The compressed blocks i that overlap selection block j: [first, last] (empty when first > last),
// i.e. i d + l > j l' and i d < (j + 1) l'.
__device__ __forceinline__ int overlap_first(int j, int l, int d, int ls) {
  const int num = j * ls - l + 1;
  return num > 0 ? (num + d - 1) / d : 0;
}
__device__ __forceinline__ int overlap_last(int j, int d, int ls) { return ((j + 1) * ls - 1) / d; }

// The sequence holding offset x of a [B+1] prefix array (largest b with cu[b] <= x, b < B).
__device__ __forceinline__ int find_seq(const int64_t* cu, int B, int64_t x) {
  int lo = 0, hi = B - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (cu[mid] <= x) lo = mid;
    else hi = mid - 1;
  }
  return lo;
}

// The fp32 attention kernels' online softmax, one warp per (row, head), keys one at a time: the
// score s q.k (lanes split the head dims, a warp sum), the running max m and sum, and the
// unnormalised output o (lane holds dims lane + 32 k2; dv <= 256).
struct Fp32Softmax {
  float m = -INFINITY, sum = 0, o[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  template <class T>
  __device__ __forceinline__ void add(const T* q, const T* k, const T* v, const LayerParams& p, int lane) {
    float s = 0;
    for (int c = lane; c < p.dk; c += 32) s += to_f(q[c]) * to_f(k[c]);
    for (int off = 16; off > 0; off /= 2) s += __shfl_xor_sync(0xffffffffu, s, off);
    s *= p.scale;
    const float mn = fmaxf(m, s), alpha = expf(m - mn), pr = expf(s - mn);
    sum = sum * alpha + pr;
#pragma unroll
    for (int k2 = 0; k2 < 8; ++k2)
      if (lane + 32 * k2 < p.dv) o[k2] = o[k2] * alpha + pr * to_f(v[lane + 32 * k2]);
    m = mn;
  }
};

// The fp32 kernels' CTA (grid (N, Hkv)): its token row and KV group, the row's sequence's first
// row row0 and its position t there, and the warp's place in the CTA.
struct TokenCta {
  int64_t row, row0;
  int g, t, nw, warp, lane;
};
__device__ __forceinline__ TokenCta token_cta(const int64_t* cu_seqlens, int B) {
  TokenCta c;
  c.row = blockIdx.x;
  c.g = blockIdx.y;
  const int b = find_seq(cu_seqlens, B, c.row);
  c.row0 = cu_seqlens[b];
  c.t = int(c.row - c.row0);
  c.nw = blockDim.x / 32, c.warp = threadIdx.x / 32, c.lane = threadIdx.x % 32;
  return c;
}

// Ranking of the top-n (Eq. 11): a NaN score ranks below every number; ties go to the lower index.
__device__ __forceinline__ float rank_key(float s) { return isnan(s) ? -INFINITY : s; }
__device__ __forceinline__ bool ranks_before(float ka, int a, float kb, int b) {
  return ka > kb || (ka == kb && a < b);
}

// ---- tensor-core primitives (the mma kernels) ----
__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16 bytes global -> shared, bypassing L1; src_bytes = 0 writes zeros (rows past the end).
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, bool valid) {
  const int src_bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(smem)), "l"(gmem), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}

// D += A B for one m16n8k16 tile: A row-major 16x16 (4 regs), B "col" 16x8 (2 regs), D fp32 16x8.
// Thread lane holds D rows lane/4 and lane/4 + 8, columns 2*(lane%4) and 2*(lane%4) + 1.
template <class T>
__device__ __forceinline__ void mma16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);
template <>
__device__ __forceinline__ void mma16816<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                                        uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void mma16816<__half>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// A shared-memory tile of rows x D 16-bit elements (D a multiple of 64), stored in 16-byte chunks
// with chunk c of row r at position c ^ (r % 8): the 8 rows an ldmatrix reads at one column then
// fall in 8 different bank groups instead of one (rows are 128-256 bytes apart).
template <int D>
struct SwizzledTile {
  static_assert(D % 64 == 0, "swizzle needs a multiple of 8 chunks per row");
  static constexpr int kChunks = D / 8;
  __device__ static __forceinline__ int offset(int row, int chunk) {
    return row * D + ((chunk ^ (row & 7)) << 3);
  }
};

// Copies `rows` rows of D elements into a swizzled tile with cp.async; row r comes from
// src_row(r) (a pointer), or is zero-filled when src_row(r) is nullptr (then the valid address
// `fallback` is named but not read). Threads [tid, nthreads) of the caller's group.
template <int D, class T, class SrcRow>
__device__ __forceinline__ void load_tile_async(T* tile, int rows, SrcRow src_row, const T* fallback, int tid,
                                                int nthreads) {
  using Tile = SwizzledTile<D>;
  for (int c = tid; c < rows * Tile::kChunks; c += nthreads) {
    const int r = c / Tile::kChunks, ch = c % Tile::kChunks;
    const T* src = src_row(r);
    cp_async_16(tile + Tile::offset(r, ch), src ? src + ch * 8 : fallback, src != nullptr);
  }
}

// Copies rows [0, rows) of a strided matrix (row r at base + r * stride elements) into a swizzled
// tile with cp.async; rows >= valid are zero-filled. The same copy as load_tile_async for the
// common case of evenly strided rows, with the address arithmetic of one row in a multiply-add.
// base must be a valid address (row 0 is always in range where it is used).
template <int D, class T>
__device__ __forceinline__ void load_rows_async(T* tile, int rows, const T* base, int64_t stride, int valid, int tid,
                                                int nthreads) {
  using Tile = SwizzledTile<D>;
  constexpr int C = Tile::kChunks;
  for (int c = tid; c < rows * C; c += nthreads) {
    const int r = c / C, ch = c - r * C;
    const bool ok = r < valid;
    cp_async_16(tile + Tile::offset(r, ch), base + (ok ? r * stride + ch * 8 : 0), ok);
  }
}

}  // namespace nsa::cuda::dev
