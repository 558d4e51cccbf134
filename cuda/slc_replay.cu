// The selection kernel alone on a given block_idx (slc_replay.hpp): the same launcher, tile map and
// warps per CTA as the forward plan's slc_attn stage (plan.cu, choice.cu), on buffers of its own.
#include "slc_replay.hpp"

#include <algorithm>

#include "check.hpp"
#include "kernels.hpp"
#include "plan.hpp"

namespace nsa::cuda {

SlcReplay replay_selection(const Config& cfg, const Tensor<int32_t>& block_idx, const std::vector<int64_t>& cu,
                           Precision prec, int reps) {
  cfg.validate();
  Options opt;
  opt.dtype = prec;
  if (cu.size() < 2 || cu.front() != 0) throw InputError("cu_seqlens must start at 0 and hold a sequence");
  const int64_t N = cu.back();
  if (block_idx.shape() != Shape{N, cfg.Hkv, cfg.slc_count})
    throw InputError(cat("block_idx has shape ", shape_str(block_idx.shape()), ", expected [", N, ", ", cfg.Hkv, ", ",
                         cfg.slc_count, "]"));
  const DeviceInfo& d = device_info(0);
  SlcReplay r;
  r.device = device_name();
  r.sms = d.prop.multiProcessorCount;
  r.l2_bytes = d.prop.l2CacheSize;
  r.smem_per_sm = int64_t(d.prop.sharedMemPerMultiprocessor);

  int64_t Tmax = 0;
  for (size_t b = 0; b + 1 < cu.size(); ++b) Tmax = std::max(Tmax, cu[b + 1] - cu[b]);
  // The plan's choice for the selection stage: its variant and warps per CTA.
  const StageChoice slc = choose_kernels(cfg, Tmax, device_caps(0), opt).stage[size_t(Stage::SlcAttn)];
  if (slc.variant != Variant::Mma)
    throw ConfigError(cat("the selection replay needs the tensor-core kernel; the plan would run ", to_string(slc.variant),
                          ": ", slc.why));
  r.kernel = to_string(slc.variant);

  FwdParams p;
  static_cast<LayerParams&>(p) = layer_params(cfg);
  p.B = int(cu.size()) - 1, p.N = N;
  p.Tmax = int(Tmax);
  p.NB = int(cfg.num_slc_blocks(Tmax));
  p.scale = float(cfg.softmax_scale());

  std::vector<void*> bufs;
  auto alloc = [&](size_t bytes, const char* what) {
    void* x = device_malloc(std::max<size_t>(bytes, 16), what);
    bufs.push_back(x);
    return x;
  };
  struct Free {
    std::vector<void*>& b;
    ~Free() {
      for (void* x : b) cudaFree(x);
    }
  } free_all{bufs};
  const size_t eb = size_t(element_size(prec));
  auto* cu_d = static_cast<int64_t*>(alloc(cu.size() * sizeof(int64_t), "cu_seqlens"));
  NSA_CUDA_CHECK(cudaMemcpy(cu_d, cu.data(), cu.size() * sizeof(int64_t), cudaMemcpyHostToDevice));
  p.cu_seqlens = cu_d;
  void* q = alloc(size_t(N * cfg.Hq * cfg.dk) * eb, "q");
  void* k = alloc(size_t(N * cfg.Hkv * cfg.dk) * eb, "k");
  void* v = alloc(size_t(N * cfg.Hkv * cfg.dv) * eb, "v");
  fill_normal_elems(prec, q, N * cfg.Hq * cfg.dk, 1);
  fill_normal_elems(prec, k, N * cfg.Hkv * cfg.dk, 2);
  fill_normal_elems(prec, v, N * cfg.Hkv * cfg.dv, 3);
  p.q = q, p.k_slc = k, p.v_slc = v;
  p.o_slc = alloc(size_t(N * cfg.Hq * cfg.dv) * eb, "o_slc");
  p.lse_slc = static_cast<float*>(alloc(size_t(N * cfg.Hq) * sizeof(float), "lse_slc"));
  p.block_idx = static_cast<int32_t*>(alloc(size_t(block_idx.numel()) * sizeof(int32_t), "block_idx"));
  NSA_CUDA_CHECK(cudaMemcpy(p.block_idx, block_idx.data(), size_t(block_idx.numel()) * sizeof(int32_t),
                            cudaMemcpyHostToDevice));

  // The plan's tile map (16 / G positions per warp) and warps per CTA (choose_kernels).
  TileMap tm;
  tm.BT = 16 / p.G;
  std::vector<int64_t> ct(1, 0);
  for (size_t b = 0; b + 1 < cu.size(); ++b) ct.push_back(ct.back() + (cu[b + 1] - cu[b] + tm.BT - 1) / tm.BT);
  tm.total = ct.back();
  auto* ct_d = static_cast<int64_t*>(alloc(ct.size() * sizeof(int64_t), "cu_tiles"));
  NSA_CUDA_CHECK(cudaMemcpy(ct_d, ct.data(), ct.size() * sizeof(int64_t), cudaMemcpyHostToDevice));
  tm.cu_tiles = ct_d;
  const int nw = slc.warps;
  r.warps_per_cta = nw;
  r.smem_per_cta = int64_t(slc_attn_mma_smem(p, nw));
  r.ctas = (int64_t(p.Hkv) * tm.total + nw - 1) / nw;
  r.ctas_per_sm_smem = int(r.smem_per_sm / (r.smem_per_cta + int64_t(d.prop.reservedSharedMemPerBlock)));

  auto launch = [&]() { slc_attn_mma(prec, p, tm, nw, nullptr); };
  // Twice the L2, rewritten before each timed launch so that nothing of the last one stays cached.
  const size_t flush_bytes = size_t(std::max(d.prop.l2CacheSize, 1 << 20)) * 2;
  void* flush = alloc(flush_bytes, "L2 flush");
  NSA_CUDA_CHECK(cudaMemset(flush, 0, flush_bytes));
  NSA_CUDA_CHECK(cudaDeviceSynchronize());
  launch();  // the launch Nsight Compute profiles (--launch-count 1), with its own cache control
  NSA_CUDA_CHECK(cudaDeviceSynchronize());
  cudaEvent_t a, b;
  NSA_CUDA_CHECK(cudaEventCreate(&a));
  NSA_CUDA_CHECK(cudaEventCreate(&b));
  for (int i = 0; i < reps; ++i) {
    NSA_CUDA_CHECK(cudaMemsetAsync(flush, i & 0xff, flush_bytes, nullptr));
    NSA_CUDA_CHECK(cudaEventRecord(a, nullptr));
    launch();
    NSA_CUDA_CHECK(cudaEventRecord(b, nullptr));
    NSA_CUDA_CHECK(cudaEventSynchronize(b));
    float ms = 0;
    NSA_CUDA_CHECK(cudaEventElapsedTime(&ms, a, b));
    r.ms.push_back(double(ms));
  }
  cudaEventDestroy(a);
  cudaEventDestroy(b);
  return r;
}

}  // namespace nsa::cuda
