// phi (docs/spec.md 3, Eq. 7), the CUDA twin of reference/phi.cpp: compressed block i of a
// sequence covers its tokens [i*d, i*d + l).
//   mean:   one kernel, the fp32 sum of the l rows divided by l (the reference's order);
//   linear: gather X[h, i, r*D + c] = x[i*d + r, h, c] + pe[h, r, c] (blocks overlap when d < l,
//           so the rows are copied), then one cuBLAS batched product over the KV heads;
//   mlp:    the same gather, X W1^T, act(+ b1), then H W2^T + b2.
// Products take elem operands and accumulate and return fp32; each epilogue rounds once to elem,
// which is what the attention kernels read.
#include <cmath>

#include "blas.hpp"
#include "check.hpp"
#include "device.cuh"
#include "kernels.hpp"

namespace nsa::cuda {

namespace {

using dev::from_f;
using dev::to_f;

__device__ __forceinline__ float activate(Activation a, float x) {
  switch (a) {
    case Activation::Gelu: return 0.5f * x * (1.0f + erff(x * 0.70710678118654752f));
    case Activation::GeluTanh: {
      const float c = 0.79788456080286536f;  // sqrt(2 / pi)
      return 0.5f * x * (1.0f + tanhf(c * (x + 0.044715f * x * x * x)));
    }
    case Activation::Relu: return x > 0 ? x : 0.0f;
    case Activation::Silu: return x / (1.0f + expf(-x));
  }
  return x;
}

// out[ci, h, :] = mean of the l rows of compressed block ci; grid (Nc, Hkv).
template <class T>
__global__ void mean_kernel(FwdParams p, const T* __restrict__ x, int D, T* __restrict__ out) {
  const int64_t ci = blockIdx.x;
  const int h = blockIdx.y;
  const int b = dev::find_seq(p.cu_cmp, p.B, ci);
  const int64_t src0 = p.cu_seqlens[b] + (ci - p.cu_cmp[b]) * p.cmp_stride;
  for (int c = threadIdx.x; c < D; c += blockDim.x) {
    float s = 0;
    for (int r = 0; r < p.cmp_len; ++r) s += to_f(x[((src0 + r) * p.Hkv + h) * D + c]);
    out[(ci * p.Hkv + h) * D + c] = from_f<T>(s / float(p.cmp_len));
  }
}

// X[h, ci, r*D + c] = x[token i*d + r, h, c] + pe[h, r, c]; grid (Nc, Hkv).
template <class T>
__global__ void gather_kernel(FwdParams p, const T* __restrict__ x, const float* __restrict__ pe, int D,
                              T* __restrict__ X) {
  const int64_t ci = blockIdx.x;
  const int h = blockIdx.y;
  const int b = dev::find_seq(p.cu_cmp, p.B, ci);
  const int64_t src0 = p.cu_seqlens[b] + (ci - p.cu_cmp[b]) * p.cmp_stride;
  const int64_t lD = int64_t(p.cmp_len) * D;
  T* dst = X + (int64_t(h) * p.Nc + ci) * lD;
  for (int64_t e = threadIdx.x; e < lD; e += blockDim.x) {
    const int64_t r = e / D, c = e % D;
    dst[e] = from_f<T>(to_f(x[((src0 + r) * p.Hkv + h) * D + c]) + pe[(int64_t(h) * p.cmp_len + r) * D + c]);
  }
}

// Hb[h, ci, a] = act(H[h, ci, a] + b1[h, a]); n = Hkv * Nc * hc.
template <class T>
__global__ void bias_act_kernel(const float* __restrict__ H, const float* __restrict__ b1, int64_t Nc, int hc,
                                int64_t n, Activation act, T* __restrict__ Hb) {
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < n; e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t h = e / (Nc * hc), a = e % hc;
    Hb[e] = from_f<T>(activate(act, H[e] + b1[h * hc + a]));
  }
}

// out[row(ci), h, c] = Y[ci, h, c] + b[h, c]; n = Nc * Hkv * D; row(ci) = rows[ci], or ci.
template <class T>
__global__ void bias_out_kernel(const float* __restrict__ Y, const float* __restrict__ bias, int Hkv, int D,
                                int64_t n, const int64_t* __restrict__ rows, T* __restrict__ out) {
  const int64_t HD = int64_t(Hkv) * D;
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < n; e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t ci = e / HD, hc = e % HD;  // hc = h * D + c
    out[(rows ? rows[ci] : ci) * HD + hc] = from_f<T>(Y[e] + bias[hc]);
  }
}

int grid_for(int64_t n, int threads) {
  const int64_t blocks = (n + threads - 1) / threads;
  return int(blocks < 65535 * 16 ? (blocks > 0 ? blocks : 1) : 65535 * 16);
}

cudaDataType_t cuda_type(Precision prec) {
  return prec == Precision::BF16 ? CUDA_R_16BF : prec == Precision::FP16 ? CUDA_R_16F : CUDA_R_32F;
}

template <class T>
void phi_gathered_typed(const Config& cfg, Precision prec, int64_t Nc, int Hkv, int D, int hc, const PhiDevice& phi,
                        const PhiWorkspace& ws, const int64_t* rows, T* out, cublasHandle_t blas, cudaStream_t s) {
  const int64_t lD = int64_t(cfg.cmp_len) * D, nout = Nc * Hkv * D;
  if (cfg.compress == CompressKind::Linear) {
    // Y[ci, h, :] = X[h, ci, :] W[h]^T
    gemm(blas, prec, true, Hkv, int(Nc), D, int(lD), ws.X, lD, Nc * lD, phi.w, lD, D * lD, ws.Y, int64_t(Hkv) * D,
         D);
    bias_out_kernel<T><<<grid_for(nout, 256), 256, 0, s>>>(ws.Y, phi.b, Hkv, D, nout, rows, out);
    NSA_CUDA_CHECK_LAUNCH("bias_out_kernel");
    return;
  }
  // mlp: H[h] = X[h] W1[h]^T, Hb = act(H + b1), Y[ci, h, :] = Hb[h, ci, :] W2[h]^T + b2
  gemm(blas, prec, true, Hkv, int(Nc), hc, int(lD), ws.X, lD, Nc * lD, phi.w1, lD, int64_t(hc) * lD, ws.H, hc,
       Nc * hc);
  const int64_t nh = int64_t(Hkv) * Nc * hc;
  bias_act_kernel<T><<<grid_for(nh, 256), 256, 0, s>>>(ws.H, phi.b1, Nc, hc, nh, cfg.cmp_act, static_cast<T*>(ws.Hb));
  NSA_CUDA_CHECK_LAUNCH("bias_act_kernel");
  gemm(blas, prec, true, Hkv, int(Nc), D, hc, ws.Hb, hc, Nc * hc, phi.w2, hc, int64_t(D) * hc, ws.Y,
       int64_t(Hkv) * D, D);
  bias_out_kernel<T><<<grid_for(nout, 256), 256, 0, s>>>(ws.Y, phi.b2, Hkv, D, nout, rows, out);
  NSA_CUDA_CHECK_LAUNCH("bias_out_kernel");
}

template <class T>
void compress_typed(const Config& cfg, const FwdParams& p, Precision prec, const T* x, int D, int hc,
                    const PhiDevice& phi, const PhiWorkspace& ws, T* out, cublasHandle_t blas, cudaStream_t s) {
  if (p.Nc == 0) return;
  const dim3 grid(unsigned(p.Nc), unsigned(p.Hkv));
  if (cfg.compress == CompressKind::Mean) {
    mean_kernel<T><<<grid, 128, 0, s>>>(p, x, D, out);
    NSA_CUDA_CHECK_LAUNCH("mean_kernel");
    return;
  }
  gather_kernel<T><<<grid, 256, 0, s>>>(p, x, phi.pe, D, static_cast<T*>(ws.X));
  NSA_CUDA_CHECK_LAUNCH("gather_kernel");
  phi_gathered_typed<T>(cfg, prec, p.Nc, p.Hkv, D, hc, phi, ws, nullptr, out, blas, s);
}

}  // namespace

void gemm(cublasHandle_t blas, Precision prec, bool transB, int batch, int M, int N, int K, const void* A,
          int64_t lda, int64_t strideA, const void* B, int64_t ldb, int64_t strideB, float* C, int64_t ldc,
          int64_t strideC) {
  // Row-major C = A op(B) is column-major C^T = op(B)^T A^T: cuBLAS sees B first.
  const float one = 1.0f, zero = 0.0f;
  const cudaDataType_t t = cuda_type(prec);
  // fp32 runs are the debug reference: no TF32 or other reduced-precision shortcut.
  const cublasComputeType_t ct = prec == Precision::FP32 ? CUBLAS_COMPUTE_32F_PEDANTIC : CUBLAS_COMPUTE_32F;
  NSA_CUBLAS_CHECK(cublasGemmStridedBatchedEx(blas, transB ? CUBLAS_OP_T : CUBLAS_OP_N, CUBLAS_OP_N, N, M, K, &one,
                                              B, t, int(ldb), strideB, A, t, int(lda), strideA, &zero, C,
                                              CUDA_R_32F, int(ldc), strideC, batch, ct, CUBLAS_GEMM_DEFAULT));
  mark_gemm_output(blas, batch, M, N, C, ldc, strideC);  // blas.hpp: initcheck does not see cuBLAS's writes
}

void phi_gathered(const Config& cfg, Precision prec, int64_t M, int Hkv, int D, int hc, const PhiDevice& phi,
                  const PhiWorkspace& ws, const int64_t* rows, void* out, cublasHandle_t blas, cudaStream_t s) {
  if (M == 0) return;
  switch (prec) {
    case Precision::BF16:
      phi_gathered_typed(cfg, prec, M, Hkv, D, hc, phi, ws, rows, static_cast<__nv_bfloat16*>(out), blas, s);
      break;
    case Precision::FP16:
      phi_gathered_typed(cfg, prec, M, Hkv, D, hc, phi, ws, rows, static_cast<__half*>(out), blas, s);
      break;
    case Precision::FP32:
      phi_gathered_typed(cfg, prec, M, Hkv, D, hc, phi, ws, rows, static_cast<float*>(out), blas, s);
      break;
  }
}

void phi_forward(const Config& cfg, const FwdParams& p, Precision prec, const void* x, int D, int hc,
                  const PhiDevice& phi, const PhiWorkspace& ws, void* out, cublasHandle_t blas, cudaStream_t s) {
  switch (prec) {
    case Precision::BF16:
      compress_typed(cfg, p, prec, static_cast<const __nv_bfloat16*>(x), D, hc, phi, ws,
                     static_cast<__nv_bfloat16*>(out), blas, s);
      break;
    case Precision::FP16:
      compress_typed(cfg, p, prec, static_cast<const __half*>(x), D, hc, phi, ws, static_cast<__half*>(out), blas,
                     s);
      break;
    case Precision::FP32:
      compress_typed(cfg, p, prec, static_cast<const float*>(x), D, hc, phi, ws, static_cast<float*>(out), blas, s);
      break;
  }
}

}  // namespace nsa::cuda
