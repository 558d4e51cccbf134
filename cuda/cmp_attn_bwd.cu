// The compression branch's backward (docs/spec.md 7): dq of the softmax over the visible
// compressed keys, and the gradients of the compressed keys and values dL/dphi(k_cmp),
// dL/dphi(v_cmp), which phi_bwd.cu takes on through phi. The CUDA twin of the compression
// part of reference/backward.cpp's nsa_tile_backward.
//
// Every compressed key is seen by every later query of its sequence, so its key-centric work is
// cut into items of one tile of 64 compressed keys and one chunk of QC positions (BwdParams):
// the fast mode adds the items' sums with fp32 atomics, the deterministic mode writes them to
// partial buffers and reduce_kernel adds each key's items in chunk order.
#include "bwd_tile.cuh"
#include "check.hpp"
#include "kernels.hpp"

namespace nsa::cuda {

namespace {

using namespace dev;

// Deterministic mode: dkc, dvc of compressed row ci (group blockIdx.y) = the sum over its tile's
// non-empty chunks, in chunk order, of the items' partial sums. Grid (Nc, Hkv).
__global__ void reduce_kernel(FwdParams p, BwdParams bp) {
  const int64_t ci = blockIdx.x;
  const int g = blockIdx.y;
  const int b = find_seq(p.cu_cmp, p.B, ci);
  const int T_b = int(p.cu_seqlens[b + 1] - p.cu_seqlens[b]);
  const int i = int(ci - p.cu_cmp[b]), kt = i / kBwdKeys, slot = i % kBwdKeys;
  const int nch = (T_b + bp.QC - 1) / bp.QC;
  const int c0 = (kt * kBwdKeys * p.cmp_stride + p.cmp_len - 1) / bp.QC;  // chunks before c0 hold no position that sees the tile
  const int64_t x0 = bp.cu_cmp_items[b] + int64_t(kt) * nch;
  for (int c = threadIdx.x; c < p.dk + p.dv; c += blockDim.x) {
    const bool isk = c < p.dk;
    const int D = isk ? p.dk : p.dv, col = isk ? c : c - p.dk;
    const float* part = isk ? bp.part_k : bp.part_v;
    float s = 0;
    for (int ch = c0; ch < nch; ++ch) s += part[(((x0 + ch) * p.Hkv + g) * kBwdKeys + slot) * D + col];
    (isk ? bp.dkc : bp.dvc)[(ci * p.Hkv + g) * D + col] = s;
  }
}

template <class T>
void launch_fp32(const FwdParams& p, const BwdParams& bp, cudaStream_t s) {
  const int nw = p.G < 4 ? p.G : 4;
  dq_fp32_kernel<T, kCmp><<<dim3(unsigned(p.N), unsigned(p.Hkv)), 32 * nw, 0, s>>>(p, bp);
  NSA_CUDA_CHECK_LAUNCH("dq_fp32_kernel<cmp>");
  if (p.Nc == 0) return;
  dkdv_fp32_kernel<T, kCmp><<<dim3(unsigned(p.Nc), unsigned(p.Hkv)), 32 * nw, size_t(nw) * (p.dk + p.dv) * 4, s>>>(
      p, bp);
  NSA_CUDA_CHECK_LAUNCH("dkdv_fp32_kernel<cmp>");
}

template <class T>
void launch_mma(const FwdParams& p, const BwdParams& bp, const TileMap& tm, int64_t items, cudaStream_t s) {
  const bool ok = dispatch_dims(p.dk, p.dv, [&](auto DK_, auto DV_) {
    constexpr int DK = decltype(DK_)::value, DV = decltype(DV_)::value;
    auto dq = dq_mma_kernel<T, DK, DV, kCmp>;
    NSA_CUDA_CHECK(cudaFuncSetAttribute(dq, cudaFuncAttributeMaxDynamicSharedMemorySize, int(dq_mma_bytes(DK, DV))));
    dq<<<dim3(unsigned(tm.total), unsigned(p.Hkv)), 128, dq_mma_bytes(DK, DV), s>>>(p, bp, tm);
    NSA_CUDA_CHECK_LAUNCH("dq_mma_kernel<cmp>");
    if (p.Nc == 0) return;
    if (!bp.deterministic) {  // the items add into zeros
      NSA_CUDA_CHECK(cudaMemsetAsync(bp.dkc, 0, size_t(p.Nc) * p.Hkv * DK * 4, s));
      NSA_CUDA_CHECK(cudaMemsetAsync(bp.dvc, 0, size_t(p.Nc) * p.Hkv * DV * 4, s));
    }
    auto kv = dkdv_mma_kernel<T, DK, DV, kCmp>;
    NSA_CUDA_CHECK(cudaFuncSetAttribute(kv, cudaFuncAttributeMaxDynamicSharedMemorySize, int(dkdv_mma_bytes(DK, DV))));
    kv<<<dim3(unsigned(items), unsigned(p.Hkv)), 128, dkdv_mma_bytes(DK, DV), s>>>(p, bp, TileMap{});
    NSA_CUDA_CHECK_LAUNCH("dkdv_mma_kernel<cmp>");
    if (bp.deterministic) {
      reduce_kernel<<<dim3(unsigned(p.Nc), unsigned(p.Hkv)), 128, 0, s>>>(p, bp);
      NSA_CUDA_CHECK_LAUNCH("cmp reduce_kernel");
    }
  });
  if (!ok) throw ConfigError(cat("cmp_attn_bwd mma: head dims dk = ", p.dk, ", dv = ", p.dv, " are not compiled"));
}

}  // namespace

void cmp_attn_bwd_fp32(Precision prec, const FwdParams& p, const BwdParams& bp, cudaStream_t s) {
  if (p.N == 0) return;
  for_precision(prec, [&](auto t) { launch_fp32<decltype(t)>(p, bp, s); });
}

void cmp_attn_bwd_mma(Precision prec, const FwdParams& p, const BwdParams& bp, const TileMap& tm_dq, int64_t cmp_items,
                cudaStream_t s) {
  if (p.N == 0) return;
  for_mma_precision(prec, "cmp_attn_bwd mma", [&](auto t) { launch_mma<decltype(t)>(p, bp, tm_dq, cmp_items, s); });
}

}  // namespace nsa::cuda
