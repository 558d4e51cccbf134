#include "ceiling.hpp"

#include <omp.h>

#include <algorithm>
#include <chrono>
#include <ctime>
#include <vector>

#include "common.hpp"

namespace nsa::ref {

namespace {
double thread_cpu_seconds() {
  timespec ts;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return double(ts.tv_sec) + 1e-9 * double(ts.tv_nsec);
}
}  // namespace

template <class S>
double measure_gemm_gflops(int64_t n, double seconds_per_round, bool cpu_clock) {
  const int threads = omp_get_max_threads();
  const double flop = 2.0 * double(n) * double(n) * double(n);
  std::vector<double> rates;
  std::vector<int64_t> reps(static_cast<size_t>(threads), 0);
  std::vector<double> cpu_rate(static_cast<size_t>(threads), 0);
  for (int round = 0; round < 3; ++round) {
    double elapsed = 0;
#pragma omp parallel num_threads(threads)
    {
      const Mat<S> A = Mat<S>::Random(n, n), B = Mat<S>::Random(n, n);
      Mat<S> C(n, n);
      C.noalias() = A * B;  // warm-up: page in, fill the caches
#pragma omp barrier
      const auto t0 = std::chrono::steady_clock::now();
      const double c0 = thread_cpu_seconds();
      int64_t r = 0;
      double dt = 0;
      do {
        C.noalias() = A * B;
        ++r;
        dt = cpu_clock ? thread_cpu_seconds() - c0
                       : std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      } while (dt < seconds_per_round);
      reps[static_cast<size_t>(omp_get_thread_num())] = r;
      cpu_rate[static_cast<size_t>(omp_get_thread_num())] = flop * double(r) / dt / 1e9;
#pragma omp barrier
#pragma omp master
      elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      volatile S sink = C(0, 0);  // the products must not be optimised away
      (void)sink;
    }
    int64_t total = 0;
    double cpu_total = 0;
    for (int t = 0; t < threads; ++t) total += reps[size_t(t)], cpu_total += cpu_rate[size_t(t)];
    rates.push_back(cpu_clock ? cpu_total : flop * double(total) / elapsed / 1e9);
  }
  std::sort(rates.begin(), rates.end());
  return rates[1];
}

template double measure_gemm_gflops<double>(int64_t, double, bool);
template double measure_gemm_gflops<float>(int64_t, double, bool);

}  // namespace nsa::ref
