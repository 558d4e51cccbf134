// Internal: the state of a Plan, shared by the forward stages (plan.cu: buffers, the forward
// launches), the backward stages (backward.cu) and the benchmarks (measure.cu). Not part of the API.
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <cstring>
#include <string>
#include <vector>

#include "blas.hpp"
#include "check.hpp"
#include "kernels.hpp"
#include "measure.hpp"
#include "nsa_cuda.hpp"

namespace nsa::cuda {

struct DeviceInfo {
  cudaDeviceProp prop{};
  int smem_optin = 0;  // bytes of shared memory a block may opt in to
};
const DeviceInfo& device_info(int device);
// Host float -> device elements of the precision (rounded to nearest even), and back.
std::vector<char> to_elems(Precision prec, const float* x, size_t n);
void from_elems(Precision prec, const char* src, size_t n, float* out);
// x ~ N(0, 1) as elements of the precision (benchmarks' random inputs), on the default stream.
void fill_normal_elems(Precision prec, void* x, int64_t n, uint64_t seed);
// x ~ U(0, 1) floats (benchmarks' random gates), on the default stream.
void fill_uniform_floats(float* x, int64_t n, uint64_t seed);

// phi's parameters on the device, through the owner's (a Plan's or a Decoder's) uploads: fp32
// (upload_f) for pe and the biases, elements of the precision (upload_e) for the weights.
template <class Owner>
PhiDevice upload_phi(Owner& o, const ref::PhiParams<float>& ph) {
  PhiDevice d;
  d.pe = o.upload_f(ph.pe, "phi.pe");
  d.w = o.upload_e(ph.w, "phi.w");
  d.b = o.upload_f(ph.b, "phi.b");
  d.w1 = o.upload_e(ph.w1, "phi.w1");
  d.b1 = o.upload_f(ph.b1, "phi.b1");
  d.w2 = o.upload_e(ph.w2, "phi.w2");
  d.b2 = o.upload_f(ph.b2, "phi.b2");
  return d;
}

struct DeviceBuffer {
  void* ptr = nullptr;
  size_t bytes = 0;
};

// What the backward pass holds beside the forward's buffers (backward.cu), when Options::backward.
struct BwdState {
  bool mma = false;  // the backward's variant: mma (tensor cores) or fp32 (CUDA cores)
  BwdParams bp;
  bool k_shared[kBranches] = {true, true, true};  // branch c reads the shared k (v): its dk_c adds into dk
  bool v_shared[kBranches] = {true, true, true};
  float* dk_sum = nullptr;  // [N, Hkv, dk]  dL/dk of the shared k: the sum over the branches reading it
  float* dv_sum = nullptr;  // [N, Hkv, dv]
  // Selection lists (host copies of the prefix arrays' totals).
  int64_t chunks = 0, slots = 0;
  int NBmax = 0;
  void* scan_tmp = nullptr;  // cub's scratch for the prefix sums
  size_t scan_tmp_bytes = 0;
  int64_t slc_items_max = 0;  // mma: an upper bound on the selection's work items
  int64_t cmp_items = 0;      // mma: compression work items per group
  TileMap tm_dq, tm_slc_dq, tm_keys;  // mma: tiles of the dq kernels and of the key-centric window kernel
  // phi's backward (Eq. 7): fp32 copies of the (rounded) weights, the gradients, a workspace.
  PhiBwdDevice phi_k, phi_v;
  PhiBwdWorkspace phi_ws;
  GateMlpGradDevice gate;  // the gate MLP's gradients and workspace
};

struct Plan::Impl {
  Config cfg;
  Options opt;
  KernelChoice kernels;  // choose_kernels' answer, which run() executes
  int64_t N = 0;
  std::vector<int64_t> cu, cu_cmp;  // host copies
  FwdParams p;
  TileMap tm_cmp, tm_topn, tm_slc, tm_win;  // tiles of the mma and wgmma kernels
  bool mma(Stage s) const { return kernels[s].variant == Variant::Mma; }
  bool wgmma(Stage s) const { return kernels[s].variant == Variant::Wgmma; }
  int warps(Stage s) const { return kernels[s].warps; }
  std::vector<DeviceBuffer> buffers;
  Blas blas;  // cuBLAS: phi's and the gate MLP's GEMMs
  PhiDevice phi_k, phi_v;
  PhiWorkspace ws;
  enum class GateSource { Ones, Given, Mlp } gate_source = GateSource::Ones;
  GateMlpDevice gate_mlp;
  void* k_shared = nullptr;  // [N, Hkv, dk] elem
  void* v_shared = nullptr;
  L2Flush flush;             // the benchmark's (measure.cu)
  bool has_bwd = false;      // Options::backward: bw is set up
  BwdState bw;

  void* alloc(size_t bytes, const char* what) {
    DeviceBuffer b;
    b.bytes = bytes;
    if (bytes > 0) b.ptr = device_malloc(bytes, what);
    buffers.push_back(b);
    return b.ptr;
  }
  template <class X>
  X* alloc_t(int64_t n, const char* what) {
    return static_cast<X*>(alloc(size_t(n) * sizeof(X), what));
  }
  void* alloc_e(int64_t n, const char* what) { return alloc(size_t(n) * element_size(opt.dtype), what); }

  void put(void* dst, const void* src, size_t bytes) {
    if (bytes) NSA_CUDA_CHECK(cudaMemcpy(dst, src, bytes, cudaMemcpyHostToDevice));
  }
  // Uploads a host tensor as elements of the precision (elem) or as fp32.
  void* upload_e(const Tensor<float>& t, const char* what) {
    if (t.empty()) return nullptr;
    const std::vector<char> e = to_elems(opt.dtype, t.data(), size_t(t.numel()));
    void* d = alloc(e.size(), what);
    put(d, e.data(), e.size());
    return d;
  }
  float* upload_f(const Tensor<float>& t, const char* what) {
    if (t.empty()) return nullptr;
    float* d = alloc_t<float>(t.numel(), what);
    put(d, t.data(), size_t(t.numel()) * sizeof(float));
    return d;
  }
  // Device copy of host prefix sums.
  int64_t* upload_i64(const std::vector<int64_t>& v, const char* what) {
    auto* d = alloc_t<int64_t>(int64_t(v.size()), what);
    put(d, v.data(), v.size() * sizeof(int64_t));
    return d;
  }
  TileMap tile_map(int BT, const char* what) {
    std::vector<int64_t> ct(1, 0);
    for (size_t b = 0; b + 1 < cu.size(); ++b) ct.push_back(ct.back() + (cu[b + 1] - cu[b] + BT - 1) / BT);
    TileMap tm;
    tm.BT = BT;
    tm.total = ct.back();
    tm.cu_tiles = upload_i64(ct, what);
    return tm;
  }
  PhiDevice upload_phi(const ref::PhiParams<float>& ph) { return cuda::upload_phi(*this, ph); }

  ~Impl() {
    blas.destroy();
    for (auto& b : buffers)
      if (b.ptr) cudaFree(b.ptr);
  }
};

// ---- backward.cu, called by forward.cu ----
// Sizes and allocates the backward state after the forward's buffers exist.
void setup_backward(Plan::Impl& I);
// After upload/randomize: fp32 copies of phi's weights for its backward, which branches share k, v.
void backward_inputs_changed(Plan::Impl& I, const ref::CompressParams<float>* phi);
// Throws ConfigError unless the plan was made with Options::backward.
void require_backward(const Plan::Impl& I);

}  // namespace nsa::cuda
