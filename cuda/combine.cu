// combine: the gates (docs/spec.md 2) and the fp32 gated sum (Eq. 5; the mma one is win_attn's
// epilogue); the CUDA twin of
// ref::compute_gates and the last loop of reference/forward.cpp. The gate MLP is small next to
// attention (N x d_model x 3 Hq), so it runs in fp32 through cuBLAS whatever the precision.
#include "check.hpp"
#include "device.cuh"
#include "kernels.hpp"

namespace nsa::cuda {

namespace {

// y[r, c] = act(y[r, c] + b[c]) (sigmoid when `sig`) for a [rows, cols] row-major matrix.
__global__ void bias_act_rows(float* y, const float* b, int64_t rows, int cols, Activation act, bool sig) {
  const int64_t n = rows * cols;
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < n; e += int64_t(gridDim.x) * blockDim.x) {
    const float z = y[e] + b[e % cols];
    // The reference's stable sigmoid: both branches equal 1 / (1 + e^-z) in exact arithmetic.
    y[e] = sig ? (z >= 0 ? 1.0f / (1.0f + expf(-z)) : expf(z) / (1.0f + expf(z))) : dev::activation(act, z);
  }
}

__global__ void fill_kernel(float* x, int64_t n, float v) {
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < n; e += int64_t(gridDim.x) * blockDim.x)
    x[e] = v;
}

// o[t, h, c] = sum_b gates[t, h, b] * o_b[t, h, c] (Eq. 5), in the reference's order.
template <class T>
__global__ void combine_kernel(FwdParams p) {
  const int64_t n = p.N * p.Hq * p.dv;
  const T* ob[3] = {static_cast<const T*>(p.o_cmp), static_cast<const T*>(p.o_slc), static_cast<const T*>(p.o_win)};
  T* o = static_cast<T*>(p.o);
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < n; e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t th = e / p.dv;  // t * Hq + h
    float s = 0;
    for (int b = 0; b < 3; ++b) s += p.gates[th * 3 + b] * dev::to_f(ob[b][e]);
    o[e] = dev::from_f<T>(s);
  }
}

int blocks_for(int64_t n) {
  const int64_t b = (n + 255) / 256;
  return int(b < 4096 ? (b > 0 ? b : 1) : 4096);
}

}  // namespace

void fill(float* x, int64_t n, float value, cudaStream_t s) {
  fill_kernel<<<blocks_for(n), 256, 0, s>>>(x, n, value);
  NSA_CUDA_CHECK_LAUNCH("fill_kernel");
}

void gates_from_mlp(const FwdParams& p, const GateMlpDevice& m, float* gates, cublasHandle_t blas, cudaStream_t s) {
  const int N = int(p.N), G3 = 3 * p.Hq;
  const float* h = m.x;
  int din = m.dm;
  if (m.w0) {  // hidden = act(x W0 + b0)
    gemm(blas, Precision::FP32, false, 1, N, m.dh, m.dm, m.x, m.dm, 0, m.w0, m.dh, 0, m.hidden, m.dh, 0);
    bias_act_rows<<<blocks_for(int64_t(N) * m.dh), 256, 0, s>>>(m.hidden, m.b0, N, m.dh, m.act, false);
    NSA_CUDA_CHECK_LAUNCH("bias_act_rows");
    h = m.hidden;
    din = m.dh;
  }
  // g = sigmoid(h W + b): column h*3 + c of the [N, 3 Hq] product is gate c of head h.
  gemm(blas, Precision::FP32, false, 1, N, G3, din, h, din, 0, m.w, G3, 0, gates, G3, 0);
  bias_act_rows<<<blocks_for(int64_t(N) * G3), 256, 0, s>>>(gates, m.b, N, G3, m.act, true);
  NSA_CUDA_CHECK_LAUNCH("bias_act_rows");
}

void combine_fp32(Precision prec, const FwdParams& p, cudaStream_t s) {
  const int blocks = blocks_for(p.N * p.Hq * p.dv);
  switch (prec) {
    case Precision::BF16: combine_kernel<__nv_bfloat16><<<blocks, 256, 0, s>>>(p); break;
    case Precision::FP16: combine_kernel<__half><<<blocks, 256, 0, s>>>(p); break;
    case Precision::FP32: combine_kernel<float><<<blocks, 256, 0, s>>>(p); break;
  }
  NSA_CUDA_CHECK_LAUNCH("combine_kernel");
}

}  // namespace nsa::cuda
