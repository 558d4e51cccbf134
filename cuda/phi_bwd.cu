// phi's backward (docs/spec.md 3, 7; Eq. 7), the CUDA twin of reference/phi.cpp's
// phi_backward: the gradient dy of the compressed rows goes to phi's parameters and, through
// the overlapping blocks, to the raw keys (values) of the compression branch.
//   mean:   dx[u] = sum over the blocks i covering u of dy[i] / l;
//   linear: X = gathered blocks + pe (as the forward rounded it); dW = dy^T X, db = colsum dy,
//           dX = dy W;
//   mlp:    A = X W1^T + b1, H = act(A) (rounded as the forward's); dW2 = dy^T H, db2 = colsum dy,
//           dA = (dy W2) act'(A), dW1 = dA^T X, db1 = colsum dA, dX = dA W1;
//   then dpe = colsum dX and dx[u, c] = sum over the blocks i covering u of dX[i, (u - i d) D + c].
// The products run in fp32 through cuBLAS (TF32 for bf16 runs: X and the weights hold bf16 values,
// which TF32 represents exactly); the column sums and the overlap-add run in a fixed order, so the
// result is the same on every run.
#include "blas.hpp"
#include "check.hpp"
#include "device.cuh"
#include "kernels.hpp"

namespace nsa::cuda {

namespace {

using dev::from_f;
using dev::to_f;

// X[h, ci, r D + c] = x[token i d + r, h, c] + pe[h, r, c], rounded to T as the forward's gather;
// grid (Nc, Hkv).
template <class T>
__global__ void gather_kernel(FwdParams p, const T* __restrict__ x, const float* __restrict__ pe, int D,
                              float* __restrict__ X) {
  const int64_t ci = blockIdx.x;
  const int h = blockIdx.y;
  const int b = dev::find_seq(p.cu_cmp, p.B, ci);
  const int64_t src0 = p.cu_seqlens[b] + (ci - p.cu_cmp[b]) * p.cmp_stride;
  const int64_t lD = int64_t(p.cmp_len) * D;
  float* dst = X + (int64_t(h) * p.Nc + ci) * lD;
  for (int64_t e = threadIdx.x; e < lD; e += blockDim.x) {
    const int64_t r = e / D, c = e % D;
    dst[e] = to_f(from_f<T>(to_f(x[((src0 + r) * p.Hkv + h) * D + c]) + pe[(int64_t(h) * p.cmp_len + r) * D + c]));
  }
}

// A += b1 (A [Hkv, Nc, hc]); H = act(A) rounded to T, as the forward's hidden layer.
template <class T>
__global__ void hidden_kernel(float* A, const float* b1, int64_t Nc, int hc, int64_t n, Activation act, float* H) {
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < n; e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t h = e / (Nc * hc), a = e % hc;
    const float z = A[e] + b1[h * hc + a];
    A[e] = z;
    H[e] = to_f(from_f<T>(dev::activation(act, z)));
  }
}

// dA *= act'(A).
__global__ void act_grad_kernel(float* dA, const float* A, int64_t n, Activation act) {
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < n; e += int64_t(gridDim.x) * blockDim.x)
    dA[e] *= dev::activation_grad(act, A[e]);
}

// dx[row, h, c] for every token row: the sum, over the blocks i of its sequence that cover it
// (i d <= u < i d + l) in ascending order, of dy[i, h, c] / l (kMean) or dX[h, i, (u - i d) D + c].
template <bool kMean>
__global__ void overlap_add_kernel(FwdParams p, const float* __restrict__ src, int D, float* __restrict__ dx) {
  const int64_t n = p.N * p.Hkv * D;
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < n; e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t row = e / (int64_t(p.Hkv) * D);
    const int h = int((e / D) % p.Hkv), c = int(e % D);
    const int b = dev::find_seq(p.cu_seqlens, p.B, row);
    const int u = int(row - p.cu_seqlens[b]);
    const int64_t cmp0 = p.cu_cmp[b];
    const int nc = int(p.cu_cmp[b + 1] - cmp0);
    const int lo = u >= p.cmp_len ? (u - p.cmp_len) / p.cmp_stride + 1 : 0, hi = min(u / p.cmp_stride, nc - 1);
    float s = 0;
    for (int i = lo; i <= hi; ++i) {
      if (kMean) s += src[((cmp0 + i) * p.Hkv + h) * D + c] / float(p.cmp_len);
      else s += src[(int64_t(h) * p.Nc + cmp0 + i) * p.cmp_len * D + int64_t(u - i * p.cmp_stride) * D + c];
    }
    dx[e] = s;
  }
}

// One thread per (batch entry, column), rows in order.
__global__ void colsum_kernel(const float* X, int64_t rows, int64_t cols, int64_t ld, int64_t bstride, int batch,
                              float* out, int64_t out_stride) {
  const int64_t n = int64_t(batch) * cols;
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < n; e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t bt = e / cols, c = e % cols;
    const float* x = X + bt * bstride + c;
    float s = 0;
    for (int64_t r = 0; r < rows; ++r) s += x[r * ld];
    out[bt * out_stride + c] = s;
  }
}

int grid_for(int64_t n) {
  const int64_t b = (n + 255) / 256;
  return int(b < 65535 * 16 ? (b > 0 ? b : 1) : 65535 * 16);
}

template <class T>
void backward_typed(const Config& cfg, const FwdParams& p, bool tf32, const T* x, int D, int hc, const PhiDevice& phi,
                    const PhiBwdDevice& g, const PhiBwdWorkspace& ws, const float* dy, float* dx,
                    cublasHandle_t blas, cudaStream_t s) {
  const int64_t Nc = p.Nc, lD = int64_t(p.cmp_len) * D, H = p.Hkv;
  const int64_t nx = p.N * H * D;
  if (cfg.compress == CompressKind::Mean) {
    if (nx) overlap_add_kernel<true><<<grid_for(nx), 256, 0, s>>>(p, dy, D, dx);
    NSA_CUDA_CHECK_LAUNCH("overlap_add_kernel<mean>");
    return;
  }
  auto zero = [&](float* t, int64_t n) {
    if (t && n) NSA_CUDA_CHECK(cudaMemsetAsync(t, 0, size_t(n) * 4, s));
  };
  if (Nc == 0) {  // no compressed block: every gradient is zero
    zero(dx, nx);
    zero(g.dpe, H * lD);
    zero(g.dw, H * D * lD), zero(g.db, H * D);
    zero(g.dw1, H * hc * lD), zero(g.db1, H * hc), zero(g.dw2, H * D * hc), zero(g.db2, H * D);
    return;
  }
  gather_kernel<T><<<dim3(unsigned(Nc), unsigned(H)), 256, 0, s>>>(p, x, phi.pe, D, ws.X);
  NSA_CUDA_CHECK_LAUNCH("gather_kernel (backward)");
  const int n = int(Nc), hd = int(H * D);  // dy[h] is [Nc, D] with row stride Hkv D, batch stride D
  if (cfg.compress == CompressKind::Linear) {
    gemm_f32(blas, tf32, true, false, int(H), D, int(lD), n, dy, hd, D, ws.X, lD, Nc * lD, g.dw, lD, D * lD);
    colsum(dy, Nc, D, hd, D, int(H), g.db, D, s);
    gemm_f32(blas, tf32, false, false, int(H), n, int(lD), D, dy, hd, D, g.w, lD, D * lD, ws.dX, lD, Nc * lD);
  } else {
    gemm_f32(blas, tf32, false, true, int(H), n, hc, int(lD), ws.X, lD, Nc * lD, g.w1, lD, hc * lD, ws.A, hc,
             Nc * hc);  // A = X W1^T
    const int64_t nh = H * Nc * hc;
    hidden_kernel<T><<<grid_for(nh), 256, 0, s>>>(ws.A, phi.b1, Nc, hc, nh, cfg.cmp_act, ws.Hb);
    NSA_CUDA_CHECK_LAUNCH("hidden_kernel");
    gemm_f32(blas, tf32, true, false, int(H), D, hc, n, dy, hd, D, ws.Hb, hc, Nc * hc, g.dw2, hc, int64_t(D) * hc);
    colsum(dy, Nc, D, hd, D, int(H), g.db2, D, s);
    gemm_f32(blas, tf32, false, false, int(H), n, hc, D, dy, hd, D, g.w2, hc, int64_t(D) * hc, ws.dA, hc,
             Nc * hc);  // dH = dy W2
    act_grad_kernel<<<grid_for(nh), 256, 0, s>>>(ws.dA, ws.A, nh, cfg.cmp_act);
    NSA_CUDA_CHECK_LAUNCH("act_grad_kernel");
    gemm_f32(blas, tf32, true, false, int(H), hc, int(lD), n, ws.dA, hc, Nc * hc, ws.X, lD, Nc * lD, g.dw1, lD,
             hc * lD);
    colsum(ws.dA, Nc, hc, hc, Nc * hc, int(H), g.db1, hc, s);
    gemm_f32(blas, tf32, false, false, int(H), n, int(lD), hc, ws.dA, hc, Nc * hc, g.w1, lD, hc * lD, ws.dX, lD,
             Nc * lD);
  }
  colsum(ws.dX, Nc, lD, lD, Nc * lD, int(H), g.dpe, lD, s);
  overlap_add_kernel<false><<<grid_for(nx), 256, 0, s>>>(p, ws.dX, D, dx);
  NSA_CUDA_CHECK_LAUNCH("overlap_add_kernel");
}

}  // namespace

void gemm_f32(cublasHandle_t blas, bool tf32, bool transA, bool transB, int batch, int M, int N, int K,
              const float* A, int64_t lda, int64_t strideA, const float* B, int64_t ldb, int64_t strideB, float* C,
              int64_t ldc, int64_t strideC) {
  // Row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T: cuBLAS sees B first, and a
  // row-major operand read column-major is its transpose.
  const float one = 1.0f, zero = 0.0f;
  const cublasComputeType_t ct = tf32 ? CUBLAS_COMPUTE_32F_FAST_TF32 : CUBLAS_COMPUTE_32F_PEDANTIC;
  NSA_CUBLAS_CHECK(cublasGemmStridedBatchedEx(blas, transB ? CUBLAS_OP_T : CUBLAS_OP_N, transA ? CUBLAS_OP_T : CUBLAS_OP_N,
                                              N, M, K, &one, B, CUDA_R_32F, int(ldb), strideB, A, CUDA_R_32F,
                                              int(lda), strideA, &zero, C, CUDA_R_32F, int(ldc), strideC, batch, ct,
                                              CUBLAS_GEMM_DEFAULT));
  mark_gemm_output(blas, batch, M, N, C, ldc, strideC);  // blas.hpp: initcheck does not see cuBLAS's writes
}

void colsum(const float* X, int64_t rows, int64_t cols, int64_t ld, int64_t bstride, int batch, float* out,
            int64_t out_stride, cudaStream_t s) {
  const int64_t n = int64_t(batch) * cols;
  if (n == 0) return;
  colsum_kernel<<<grid_for(n), 256, 0, s>>>(X, rows, cols, ld, bstride, batch, out, out_stride);
  NSA_CUDA_CHECK_LAUNCH("colsum_kernel");
}

void phi_backward(const Config& cfg, const FwdParams& p, Precision prec, const void* x, int D, int hc,
                       const PhiDevice& phi, const PhiBwdDevice& g, const PhiBwdWorkspace& ws, const float* dy,
                       float* dx, cublasHandle_t blas, cudaStream_t s) {
  const bool tf32 = prec == Precision::BF16;
  switch (prec) {
    case Precision::BF16:
      backward_typed(cfg, p, tf32, static_cast<const __nv_bfloat16*>(x), D, hc, phi, g, ws, dy, dx, blas, s);
      break;
    case Precision::FP16:
      backward_typed(cfg, p, tf32, static_cast<const __half*>(x), D, hc, phi, g, ws, dy, dx, blas, s);
      break;
    case Precision::FP32:
      backward_typed(cfg, p, tf32, static_cast<const float*>(x), D, hc, phi, g, ws, dy, dx, blas, s);
      break;
  }
}

}  // namespace nsa::cuda
