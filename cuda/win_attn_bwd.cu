// The sliding-window branch's backward (docs/spec.md 5, 7): dq over the keys [t - w + 1, t] of
// each query, and dK/dV of each key over the queries [u, u + w - 1] that see it. The CUDA twin of
// the window part of reference/backward.cpp's nsa_tile_backward. A key tile's queries are a band
// of w + 63 positions: one CTA holds them all, so no partial sums meet and no atomics are needed.
#include "bwd_tile.cuh"
#include "check.hpp"
#include "kernels.hpp"

namespace nsa::cuda {

namespace {

using namespace dev;

template <class T>
void launch_fp32(const FwdParams& p, const BwdParams& bp, cudaStream_t s) {
  const int nw = p.G < 4 ? p.G : 4;
  dq_fp32_kernel<T, kWin><<<dim3(unsigned(p.N), unsigned(p.Hkv)), 32 * nw, 0, s>>>(p, bp);
  NSA_CUDA_CHECK_LAUNCH("dq_fp32_kernel<win>");
  dkdv_fp32_kernel<T, kWin><<<dim3(unsigned(p.N), unsigned(p.Hkv)), 32 * nw, size_t(nw) * (p.dk + p.dv) * 4, s>>>(p,
                                                                                                                 bp);
  NSA_CUDA_CHECK_LAUNCH("dkdv_fp32_kernel<win>");
}

template <class T>
void launch_mma(const FwdParams& p, const BwdParams& bp, const TileMap& tm_dq, const TileMap& tm_keys, cudaStream_t s) {
  const bool ok = dispatch_dims(p.dk, p.dv, [&](auto DK_, auto DV_) {
    constexpr int DK = decltype(DK_)::value, DV = decltype(DV_)::value;
    auto dq = dq_mma_kernel<T, DK, DV, kWin>;
    NSA_CUDA_CHECK(cudaFuncSetAttribute(dq, cudaFuncAttributeMaxDynamicSharedMemorySize, int(dq_mma_bytes(DK, DV))));
    dq<<<dim3(unsigned(tm_dq.total), unsigned(p.Hkv)), 128, dq_mma_bytes(DK, DV), s>>>(p, bp, tm_dq);
    NSA_CUDA_CHECK_LAUNCH("dq_mma_kernel<win>");
    auto kv = dkdv_mma_kernel<T, DK, DV, kWin>;
    NSA_CUDA_CHECK(cudaFuncSetAttribute(kv, cudaFuncAttributeMaxDynamicSharedMemorySize, int(dkdv_mma_bytes(DK, DV))));
    kv<<<dim3(unsigned(tm_keys.total), unsigned(p.Hkv)), 128, dkdv_mma_bytes(DK, DV), s>>>(p, bp, tm_keys);
    NSA_CUDA_CHECK_LAUNCH("dkdv_mma_kernel<win>");
  });
  if (!ok) throw ConfigError(cat("win_attn_bwd mma: head dims dk = ", p.dk, ", dv = ", p.dv, " are not compiled"));
}

}  // namespace

void win_attn_bwd_fp32(Precision prec, const FwdParams& p, const BwdParams& bp, cudaStream_t s) {
  if (p.N == 0) return;
  for_precision(prec, [&](auto t) { launch_fp32<decltype(t)>(p, bp, s); });
}

void win_attn_bwd_mma(Precision prec, const FwdParams& p, const BwdParams& bp, const TileMap& tm_dq, const TileMap& tm_keys,
                cudaStream_t s) {
  if (p.N == 0) return;
  for_mma_precision(prec, "win_attn_bwd mma", [&](auto t) { launch_mma<decltype(t)>(p, bp, tm_dq, tm_keys, s); });
}

}  // namespace nsa::cuda
