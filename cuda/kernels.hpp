// Internal: the launchers of every stage's kernels, one section per file, named <stage>_<variant>
// (docs/cuda.md, "Stages and files"); plan.cu and backward.cu call them in the spec's order.
#pragma once

#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <type_traits>

#include "config.hpp"
#include "nsa_cuda.hpp"
#include "params.hpp"

namespace nsa::cuda {

// Tiles of BT consecutive positions of one sequence: tile x of the packing is sequence b =
// the largest b with cu_tiles[b] <= x, positions [(x - cu_tiles[b]) * BT, ... + BT) of it.
struct TileMap {
  const int64_t* cu_tiles = nullptr;  // [B+1] device, prefix sums of ceil(T_b / BT)
  int64_t total = 0;                  // tiles in all
  int BT = 0;                         // positions per tile
};

// ---- phi.cu: phi (Eq. 7) ----
struct PhiDevice {  // one of keys / values; pointers into the Plan's buffers
  const float* pe = nullptr;  // [Hkv, l, D]      fp32
  const void* w = nullptr;    // [Hkv, D, l*D]    elem   linear
  const float* b = nullptr;   // [Hkv, D]         fp32
  const void* w1 = nullptr;   // [Hkv, hc, l*D]   elem   mlp
  const float* b1 = nullptr;  // [Hkv, hc]
  const void* w2 = nullptr;   // [Hkv, D, hc]     elem
  const float* b2 = nullptr;  // [Hkv, D]
};
struct PhiWorkspace {
  void* X = nullptr;      // [Hkv, Nc, l*D] elem   gathered blocks + pe
  float* H = nullptr;     // [Hkv, Nc, max(hc, D)] fp32  GEMM output before its epilogue
  void* Hb = nullptr;     // [Hkv, Nc, hc] elem    act(H + b1)
  float* Y = nullptr;     // [Nc, Hkv, D] fp32
};
// out [Nc, Hkv, D] elem = phi(x) for x [N, Hkv, D] elem.
void phi_forward(const Config& cfg, const FwdParams& p, Precision prec, const void* x, int D, int hc,
                 const PhiDevice& phi, const PhiWorkspace& ws, void* out, cublasHandle_t blas, cudaStream_t s);

// phi's products and epilogues on blocks already gathered (linear, mlp): ws.X [Hkv, M, l*D] elem
// (rows + pe) -> the [Hkv, D] row of block e at out + rows[e] * Hkv * D (rows nullptr: row e).
void phi_gathered(const Config& cfg, Precision prec, int64_t M, int Hkv, int D, int hc, const PhiDevice& phi,
                  const PhiWorkspace& ws, const int64_t* rows, void* out, cublasHandle_t blas, cudaStream_t s);

// Row-major batched C = A op(B) with fp32 output: A [M, K] (lda), B [N, K] (ldb) when
// transB, else [K, N]; C [M, N] (ldc); `stride*` between batch entries.
void gemm(cublasHandle_t blas, Precision prec, bool transB, int batch, int M, int N, int K, const void* A,
          int64_t lda, int64_t strideA, const void* B, int64_t ldb, int64_t strideB, float* C, int64_t ldc,
          int64_t strideC);

// ---- combine.cu: the gates (docs/spec.md 2) and the fp32 combine (Eq. 5) ----
struct GateMlpDevice {
  const float* x = nullptr;   // [N, dm]
  const float* w0 = nullptr;  // [dm, dh]  nullptr: no hidden layer
  const float* b0 = nullptr;  // [dh]
  const float* w = nullptr;   // [din, 3*Hq]
  const float* b = nullptr;   // [3*Hq]
  int dm = 0, dh = 0;
  Activation act = Activation::Gelu;
  float* hidden = nullptr;    // [N, dh] workspace
};
void gates_from_mlp(const FwdParams& p, const GateMlpDevice& m, float* gates, cublasHandle_t blas, cudaStream_t s);
void fill(float* x, int64_t n, float value, cudaStream_t s);
void combine_fp32(Precision prec, const FwdParams& p, cudaStream_t s);

// ---- cmp_attn.cu: compression attention (its fp32 kernel computes the topn stage too) ----
void cmp_attn_fp32(Precision prec, const FwdParams& p, cudaStream_t s);
size_t cmp_attn_fp32_smem(const FwdParams& p, int nwarps);
// FlashAttention-2 for O_cmp and lse with 32 rows per warp (tm: tiles of 32 * nwarps / G positions).
void cmp_attn_mma(Precision prec, const FwdParams& p, const TileMap& tm, int nwarps, cudaStream_t s);
size_t cmp_attn_mma_smem(const FwdParams& p, int nwarps);

// ---- topn.cu: Eq. 8-11 (scores with lse_cmp known, the top-n) ----
// tm: tiles of 16 * nwarps / G positions.
void topn_mma(Precision prec, const FwdParams& p, const TileMap& tm, int nwarps, cudaStream_t s);
size_t topn_mma_smem(const FwdParams& p, int nwarps);

// ---- slc_attn.cu: selection attention (Eq. 12) ----
void slc_attn_fp32(Precision prec, const FwdParams& p, cudaStream_t s);
// tm: tiles of 16 / G positions, one per warp; nwarps warps per CTA (block lists in shared
// memory, unmasked full chunks).
void slc_attn_mma(Precision prec, const FwdParams& p, const TileMap& tm, int nwarps, cudaStream_t s);
size_t slc_attn_mma_smem(const FwdParams& p, int nwarps);

// ---- win_attn.cu: sliding window (its mma kernel computes the combine stage, Eq. 5, too) ----
void win_attn_fp32(Precision prec, const FwdParams& p, cudaStream_t s);
// 16 * nwarps rows per CTA (tm: tiles of 16 * nwarps / G positions), 3 stages; writes o (the
// gated sum of Eq. 5) too.
void win_attn_mma(Precision prec, const FwdParams& p, const TileMap& tm, int nwarps, cudaStream_t s);
size_t win_attn_mma_smem(const FwdParams& p, int nwarps);

// ---- the backward pass (backward.cu runs the stages in this order) ----
// combine_bwd.cu: dgates = <dL/do, O_c> and the deltas D_c = g_c dgates_c for every (token, head).
void combine_bwd(Precision prec, const FwdParams& p, const BwdParams& bp, cudaStream_t s);
struct GateMlpGradDevice {  // gradients of the gate MLP (fp32) and its workspace
  float* dz = nullptr;    // [N, 3 Hq]  dL/d(pre-sigmoid)
  float* a = nullptr;     // [N, dh]    x W0 + b0, recomputed
  float* dhid = nullptr;  // [N, din]   dL/d(hidden), then dL/da in place
  float* dx = nullptr;    // [N, dm]
  float* dw0 = nullptr;   // [dm, dh]
  float* db0 = nullptr;   // [dh]
  float* dw = nullptr;    // [din, 3 Hq]
  float* db = nullptr;    // [3 Hq]
};
void gate_mlp_backward(const FwdParams& p, const GateMlpDevice& m, const float* dgates, const GateMlpGradDevice& g,
                       cublasHandle_t blas, cudaStream_t s);

// slc_attn_bwd.cu: the lists of the positions that selected each block (BwdParams); with items,
// also the mma kernels' work items (item_cnt, item_off). tmp: cub's scratch of slc_lists_scan_bytes.
size_t slc_lists_scan_bytes(int64_t slots, int64_t lists);
void build_slc_lists(const FwdParams& p, const BwdParams& bp, int64_t chunks, int64_t slots, bool items, void* tmp,
                     size_t tmp_bytes, cudaStream_t s);
size_t slc_lists_smem(const FwdParams& p, const BwdParams& bp);

// Per branch (cmp_attn_bwd.cu, slc_attn_bwd.cu, win_attn_bwd.cu): dq (cmp writes, slc and win add), then
// dK/dV. fp32: any shape (dk, dv <= 256).
void cmp_attn_bwd_fp32(Precision prec, const FwdParams& p, const BwdParams& bp, cudaStream_t s);
void slc_attn_bwd_fp32(Precision prec, const FwdParams& p, const BwdParams& bp, cudaStream_t s);
void win_attn_bwd_fp32(Precision prec, const FwdParams& p, const BwdParams& bp, cudaStream_t s);
// mma: tm_dq tiles of 64 / G positions; tm_slc tiles of 16 / G positions (one per warp);
// tm_keys tiles of 64 tokens; cmp_items work items per group (BwdParams::cu_cmp_items);
// slc_items an upper bound on the selection's work items (the kernel reads the count).
void cmp_attn_bwd_mma(Precision prec, const FwdParams& p, const BwdParams& bp, const TileMap& tm_dq,
                      int64_t cmp_items, cudaStream_t s);
void slc_attn_bwd_mma(Precision prec, const FwdParams& p, const BwdParams& bp, const TileMap& tm_slc,
                      int64_t slc_items, cudaStream_t s);
void win_attn_bwd_mma(Precision prec, const FwdParams& p, const BwdParams& bp, const TileMap& tm_dq,
                      const TileMap& tm_keys, cudaStream_t s);
size_t bwd_mma_smem(const FwdParams& p);  // the most shared memory any mma backward kernel asks for

// phi_bwd.cu: phi's backward (Eq. 7): dy = dL/dphi(x) [Nc, Hkv, D] -> dx [N, Hkv, D] (fp32,
// every row written) and the parameters' gradients.
struct PhiBwdDevice {
  const float* w = nullptr;   // [Hkv, D, l*D]   fp32 copies of the (rounded) weights
  const float* w1 = nullptr;  // [Hkv, hc, l*D]
  const float* w2 = nullptr;  // [Hkv, D, hc]
  float* dpe = nullptr;       // [Hkv, l, D]
  float* dw = nullptr;        // [Hkv, D, l*D]   linear
  float* db = nullptr;        // [Hkv, D]
  float* dw1 = nullptr;       // [Hkv, hc, l*D]  mlp
  float* db1 = nullptr;       // [Hkv, hc]
  float* dw2 = nullptr;       // [Hkv, D, hc]
  float* db2 = nullptr;       // [Hkv, D]
};
struct PhiBwdWorkspace {
  float* X = nullptr;   // [Hkv, Nc, l*D]  the gathered blocks + pe, rounded as the forward's
  float* A = nullptr;   // [Hkv, Nc, hc]   the hidden layer's pre-activation
  float* Hb = nullptr;  // [Hkv, Nc, hc]   act(A), rounded as the forward's
  float* dA = nullptr;  // [Hkv, Nc, hc]
  float* dX = nullptr;  // [Hkv, Nc, l*D]  dL/d(flattened block + pe)
};
void phi_backward(const Config& cfg, const FwdParams& p, Precision prec, const void* x, int D, int hc,
                  const PhiDevice& phi, const PhiBwdDevice& g, const PhiBwdWorkspace& ws, const float* dy, float* dx,
                  cublasHandle_t blas, cudaStream_t s);
// Row-major batched C = op(A) op(B) in fp32 (A [M, K] or, transposed, [K, M]; B [K, N] or [N, K]);
// tf32: tensor-core TF32 products (for bf16 runs: the operands' own rounding is coarser).
void gemm_f32(cublasHandle_t blas, bool tf32, bool transA, bool transB, int batch, int M, int N, int K,
              const float* A, int64_t lda, int64_t strideA, const float* B, int64_t ldb, int64_t strideB, float* C,
              int64_t ldc, int64_t strideC);
// out[bt * out_stride + c] = sum over r < rows, in order, of X[bt * bstride + r * ld + c], c < cols.
void colsum(const float* X, int64_t rows, int64_t cols, int64_t ld, int64_t bstride, int batch, float* out,
            int64_t out_stride, cudaStream_t s);

// ---- decode_attn.cu: the decode step (docs/spec.md 8) ----
constexpr int kDecTile = 32;  // split sizes are multiples of this many keys (whole tiles of every split kernel)
// The compressed rows a step emits: rows[e], rows[M + e], rows[2M + e] = cache sequence b, first
// raw token u0 = i*d of block i, destination row b * Ncap + i (device, int64 [3, M]).
struct DecEmit {
  int M = 0;
  const int64_t* rows = nullptr;
};
size_t dec_split_smem(const DecParams& p, Precision prec);
// Once per Decoder: lets the split and selection kernels take up to `optin` bytes of dynamic
// shared memory; returns the split kernel's CTAs per SM (its occupancy).
int dec_init(Precision prec, const DecParams& p, int optin);
// The step's kernels; pdl: launched with programmatic dependent launch (sm_90), so that the
// kernel's CTAs start in the previous kernel's tail (each waits for that kernel's results).
// The split kernel: the compression and window splits (and the append) or the selection splits.
void dec_split(Precision prec, const DecParams& p, bool selection, bool pdl, cudaStream_t s);
// The selection kernel: blocks per CTA (DecParams::jb), and its shared memory, NBcap = selection
// blocks at the cache's capacity (the top-n holds an item's block scores).
int dec_select_blocks_per_cta(const DecParams& p);
size_t dec_select_smem(const DecParams& p, int NBcap);
void dec_select(const DecParams& p, int NBcap, bool pdl, cudaStream_t s);
// The merge kernel and its shared memory.
size_t dec_combine_smem(const DecParams& p);
void dec_combine(Precision prec, const DecParams& p, bool pdl, cudaStream_t s);
void dec_append(Precision prec, const DecParams& p, cudaStream_t s);
void dec_emit_mean(Precision prec, const DecParams& p, const DecEmit& em, bool values, cudaStream_t s);
// X [Hkv, M, l*D] for phi_gathered, from the cache's raw rows (the tail ring or the history).
void dec_emit_gather(Precision prec, const DecParams& p, const DecEmit& em, bool values, const float* pe, void* X,
                     cudaStream_t s);


// Host: calls fn(T()) with T the element type of the precision, the kernels' template argument.
template <class Fn>
void for_precision(Precision prec, Fn&& fn) {
  switch (prec) {
    case Precision::BF16: fn(__nv_bfloat16()); break;
    case Precision::FP16: fn(__half()); break;
    case Precision::FP32: fn(float()); break;
  }
}
// The same for the mma kernels, which take bf16 or fp16 operands; `what` names them in the error.
template <class Fn>
void for_mma_precision(Precision prec, const char* what, Fn&& fn) {
  if (prec == Precision::BF16) fn(__nv_bfloat16());
  else if (prec == Precision::FP16) fn(__half());
  else throw ConfigError(cat(what, " needs bf16 or fp16 operands (fp32 runs the fp32 kernels)"));
}

// Calls fn(integral_constant<DK>, integral_constant<DV>) for the compiled (dk, dv) pair; false if
// none matches. The pairs are those of NSA_CUDA_DIMS (CMake), to bound compile time.
template <class Fn>
bool dispatch_dims(int dk, int dv, Fn&& fn) {
#define NSA_DIMS_CASE(A, B)                                                        \
  if (dk == A && dv == B) {                                                        \
    fn(std::integral_constant<int, A>{}, std::integral_constant<int, B>{});        \
    return true;                                                                   \
  }
#ifdef NSA_CUDA_ALL_DIMS
  NSA_DIMS_CASE(64, 64)
  NSA_DIMS_CASE(64, 128)
  NSA_DIMS_CASE(128, 64)
  NSA_DIMS_CASE(192, 64)
#endif
  NSA_DIMS_CASE(128, 128)
  NSA_DIMS_CASE(192, 128)
#undef NSA_DIMS_CASE
  return false;
}

}  // namespace nsa::cuda
