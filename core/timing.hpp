// Medians of timed runs, shared by every benchmark: the CPU ones (experiments/cmd_bench.cpp,
// the sweep) and the CUDA ones (cuda/measure.cu, which adds the L2 flush and CUDA events).
#pragma once

#include <algorithm>
#include <chrono>
#include <ctime>
#include <vector>

namespace nsa {

// The median (the mean of the two middle values for an even count; 0 for none).
inline double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0.0 : v.size() % 2 ? v[v.size() / 2] : 0.5 * (v[v.size() / 2 - 1] + v[v.size() / 2]);
}

// Milliseconds of CPU time of the process (every thread's).
inline double cpu_time_ms() {
  timespec ts;
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
  return 1e3 * double(ts.tv_sec) + 1e-6 * double(ts.tv_nsec);
}

// Median time of `reps` runs of f after `warmup` runs, in ms: wall time, or the process's CPU
// time (cpu_clock).
template <class F>
double median_ms(F&& f, int warmup, int reps, bool cpu_clock = false) {
  for (int i = 0; i < warmup; ++i) f();
  std::vector<double> ms;
  for (int i = 0; i < reps; ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    const double c0 = cpu_time_ms();
    f();
    ms.push_back(cpu_clock ? cpu_time_ms() - c0
                           : std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
  }
  return median(ms);
}

}  // namespace nsa
