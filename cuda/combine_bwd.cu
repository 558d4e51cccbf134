// The gates' backward (docs/spec.md 2, 7) and the softmax deltas every branch's backward needs;
// the CUDA twin of the first loop of reference/backward.cpp's backward_fast and of its
// gate_mlp_backward_fast.
//   dL/dg_c[t, h] = <dL/do[t, h], O_c[t, h]>,   D_c[t, h] = g_c dL/dg_c = rowsum(dO_c * O_c);
// with the gate MLP g = sigmoid(z), z = hid W + b, hid = x or act(x W0 + b0):
//   dz = dg g (1 - g),  dW = hid^T dz,  db = colsum dz,  dhid = dz W^T,
//   da = dhid act'(a),  dW0 = x^T da,  db0 = colsum da,  dx = da W0^T  (or dx = dhid),
// in fp32 through cuBLAS, as the forward's gate MLP.
#include "check.hpp"
#include "device.cuh"
#include "kernels.hpp"

namespace nsa::cuda {

namespace {

using dev::to_f;

// One warp per (token, head): the three dot products over dv, in fp32.
template <class T>
__global__ void prep_kernel(FwdParams p, BwdParams bp) {
  const int64_t NHq = p.N * p.Hq;
  const int64_t th = blockIdx.x * int64_t(blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (th >= NHq) return;
  const T* d = static_cast<const T*>(bp.dO) + th * p.dv;
  const T* o[3] = {static_cast<const T*>(p.o_cmp) + th * p.dv, static_cast<const T*>(p.o_slc) + th * p.dv,
                   static_cast<const T*>(p.o_win) + th * p.dv};
  float s[3] = {0, 0, 0};
  for (int c = lane; c < p.dv; c += 32) {
    const float x = to_f(d[c]);
#pragma unroll
    for (int br = 0; br < 3; ++br) s[br] += x * to_f(o[br][c]);
  }
#pragma unroll
  for (int br = 0; br < 3; ++br) {
    for (int off = 16; off > 0; off /= 2) s[br] += __shfl_xor_sync(0xffffffffu, s[br], off);
    if (lane == 0) {
      bp.dgates[th * 3 + br] = s[br];
      bp.delta[br * NHq + th] = p.gates[th * 3 + br] * s[br];
    }
  }
}

// dz = dg g (1 - g) for the [N, 3 Hq] gates.
__global__ void sigmoid_grad_kernel(const float* dg, const float* g, int64_t n, float* dz) {
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < n; e += int64_t(gridDim.x) * blockDim.x)
    dz[e] = dg[e] * g[e] * (1.0f - g[e]);
}

// a[r, c] += b0[c] (the hidden layer's pre-activation), then da = dhid act'(a) in place of dhid.
__global__ void hidden_grad_kernel(float* a, const float* b0, float* dhid, int64_t rows, int cols, Activation act) {
  const int64_t n = rows * cols;
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < n; e += int64_t(gridDim.x) * blockDim.x) {
    const float z = a[e] + b0[e % cols];
    a[e] = z;
    dhid[e] *= dev::activation_grad(act, z);
  }
}

int blocks_for(int64_t n) {
  const int64_t b = (n + 255) / 256;
  return int(b < 4096 ? (b > 0 ? b : 1) : 4096);
}

}  // namespace

void combine_bwd(Precision prec, const FwdParams& p, const BwdParams& bp, cudaStream_t s) {
  const int64_t NHq = p.N * p.Hq;
  if (NHq == 0) return;
  const unsigned grid = unsigned((NHq + 7) / 8);
  switch (prec) {
    case Precision::BF16: prep_kernel<__nv_bfloat16><<<grid, 256, 0, s>>>(p, bp); break;
    case Precision::FP16: prep_kernel<__half><<<grid, 256, 0, s>>>(p, bp); break;
    case Precision::FP32: prep_kernel<float><<<grid, 256, 0, s>>>(p, bp); break;
  }
  NSA_CUDA_CHECK_LAUNCH("prep_kernel");
}

void gate_mlp_backward(const FwdParams& p, const GateMlpDevice& m, const float* dgates, const GateMlpGradDevice& g,
                       cublasHandle_t blas, cudaStream_t s) {
  const int N = int(p.N), Z = 3 * p.Hq;
  if (N == 0) return;
  sigmoid_grad_kernel<<<blocks_for(int64_t(N) * Z), 256, 0, s>>>(dgates, p.gates, int64_t(N) * Z, g.dz);
  NSA_CUDA_CHECK_LAUNCH("sigmoid_grad_kernel");
  const bool hidden = m.w0 != nullptr;
  const float* hid = hidden ? m.hidden : m.x;  // the forward's hidden layer act(x W0 + b0), or x
  const int din = hidden ? m.dh : m.dm;
  gemm_f32(blas, false, true, false, 1, din, Z, N, hid, din, 0, g.dz, Z, 0, g.dw, Z, 0);  // dW = hid^T dz
  colsum(g.dz, N, Z, Z, 0, 1, g.db, 0, s);                                               // db
  // dhid = dz W^T (W: [din, 3 Hq]); without the hidden layer it is dx.
  gemm_f32(blas, false, false, true, 1, N, din, Z, g.dz, Z, 0, m.w, Z, 0, hidden ? g.dhid : g.dx, din, 0);
  if (!hidden) return;
  gemm_f32(blas, false, false, false, 1, N, m.dh, m.dm, m.x, m.dm, 0, m.w0, m.dh, 0, g.a, m.dh, 0);  // a = x W0
  hidden_grad_kernel<<<blocks_for(int64_t(N) * m.dh), 256, 0, s>>>(g.a, m.b0, g.dhid, N, m.dh, m.act);
  NSA_CUDA_CHECK_LAUNCH("hidden_grad_kernel");
  gemm_f32(blas, false, true, false, 1, m.dm, m.dh, N, m.x, m.dm, 0, g.dhid, m.dh, 0, g.dw0, m.dh, 0);  // x^T da
  colsum(g.dhid, N, m.dh, m.dh, 0, 1, g.db0, 0, s);                                                  // db0
  gemm_f32(blas, false, false, true, 1, N, m.dm, m.dh, g.dhid, m.dh, 0, m.w0, m.dh, 0, g.dx, m.dm, 0);  // da W0^T
}

}  // namespace nsa::cuda
