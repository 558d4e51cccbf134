// Internal: the measurement building blocks of every CUDA benchmark (the forward's, the
// backward's, the decode step's and the card's ceilings): the L2 flush, CUDA-event timing of one
// run and of a pass stage by stage, and per-stage medians (the median itself: core/timing.hpp,
// shared with the CPU benchmarks).
#pragma once

#include <cuda_runtime.h>

#include <functional>
#include <string>
#include <utility>
#include <vector>

#include "nsa_cuda.hpp"
#include "timing.hpp"

namespace nsa::cuda {

// A pass as its stages in order: each stage's label (docs/cuda.md, "Stages and files") and its
// launches on a stream.
using StageList = std::vector<std::pair<const char*, std::function<void(cudaStream_t)>>>;

// A buffer of twice the L2 cache, written before each timed repeat so that no input stays cached.
class L2Flush {
 public:
  L2Flush() = default;
  ~L2Flush();
  L2Flush(const L2Flush&) = delete;
  L2Flush& operator=(const L2Flush&) = delete;
  void allocate(int device);                  // once; later calls do nothing
  void operator()(int rep, cudaStream_t s);   // enqueues the write of repeat `rep`

 private:
  void* buf_ = nullptr;
  size_t bytes_ = 0;
};

// Milliseconds between events recorded on s around fn (which enqueues its work on s); synchronises.
double event_ms(cudaStream_t s, const std::function<void()>& fn);
// The same after the L2 flush of repeat `rep`.
double flushed_ms(L2Flush& flush, int rep, cudaStream_t s, const std::function<void()>& fn);
// Runs the stages in order on s with an event after each: each stage's time. Synchronises.
std::vector<StageTime> run_stages_timed(const StageList& st, cudaStream_t s);

// Per-stage medians over timed runs.
class StageMedians {
 public:
  void add(const std::vector<StageTime>& run);
  std::vector<StageTime> medians() const;

 private:
  std::vector<std::string> names_;
  std::vector<std::vector<double>> ms_;
};

}  // namespace nsa::cuda
