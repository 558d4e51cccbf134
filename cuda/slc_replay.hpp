// The selection-attention kernel alone on a given selection (docs/simulate.md, validation): what
// `nsa_slc_replay` runs under Nsight Compute so that the L2 and HBM counters of the kernel can be
// compared with `nsa simulate` on the same block_idx. Host-side, Eigen- and CUDA-header-free.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "nsa_cuda.hpp"

namespace nsa::cuda {

struct SlcReplay {
  std::string device;         // device_name()
  int sms = 0;
  int64_t l2_bytes = 0;       // cudaDeviceProp::l2CacheSize
  int64_t smem_per_sm = 0;    // cudaDeviceProp::sharedMemPerMultiprocessor
  std::string kernel;         // the selection stage's variant (choose_kernels), the one that ran
  int warps_per_cta = 0;      // as the plan picks them (choose_kernels)
  int64_t smem_per_cta = 0;   // dynamic shared memory of one CTA
  int64_t ctas = 0;           // grid size
  int ctas_per_sm_smem = 0;   // CTAs one SM's shared memory holds (registers may allow fewer:
                              // Nsight Compute's launch__occupancy_limit_* metrics say)
  std::vector<double> ms;     // each timed launch, L2 flushed before it
};

// Runs the selection kernel the forward pass would run for cfg (the mma variant; fp32 is refused) on
// device-resident q, K, V ~ N(0, 1) (shared K/V, one packed batch given by cu_seqlens) and the
// selection block_idx [N, Hkv, n]: one launch, then `reps` timed launches with the L2 flushed
// before each. Throws ConfigError / CudaError naming the problem.
SlcReplay replay_selection(const Config& cfg, const Tensor<int32_t>& block_idx, const std::vector<int64_t>& cu_seqlens,
                           Precision prec, int reps);

}  // namespace nsa::cuda
