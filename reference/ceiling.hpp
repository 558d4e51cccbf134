// The CPU's measured matrix-product rate through Eigen, every thread multiplying its own n x n
// matrices at once (the way the fast path uses Eigen): the ceiling CPU benchmarks report against.
#pragma once

#include <cstdint>

namespace nsa::ref {

// GFLOP/s over all threads (the current OpenMP thread count), the median of 3 timed rounds. With
// cpu_clock, each thread's rate is per second of its own CPU time (the rate it would have alone on
// its core: the ceiling for `nsa bench --clock cpu` on a machine shared with other jobs).
template <class S>
double measure_gemm_gflops(int64_t n = 512, double seconds_per_round = 0.3, bool cpu_clock = false);

}  // namespace nsa::ref
