#include "ceiling.hpp"

#include <omp.h>

#include <algorithm>
#include <chrono>
#include <vector>

#include "common.hpp"

namespace nsa::ref {

template <class S>
double measure_gemm_gflops(int64_t n, double seconds_per_round) {
  const int threads = omp_get_max_threads();
  std::vector<double> rates;
  std::vector<int64_t> reps(static_cast<size_t>(threads), 0);
  for (int round = 0; round < 3; ++round) {
    double elapsed = 0;
#pragma omp parallel num_threads(threads)
    {
      const Mat<S> A = Mat<S>::Random(n, n), B = Mat<S>::Random(n, n);
      Mat<S> C(n, n);
      C.noalias() = A * B;  // warm-up: page in, fill the caches
#pragma omp barrier
      const auto t0 = std::chrono::steady_clock::now();
      int64_t r = 0;
      double dt = 0;
      do {
        C.noalias() = A * B;
        ++r;
        dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      } while (dt < seconds_per_round);
      reps[static_cast<size_t>(omp_get_thread_num())] = r;
#pragma omp barrier
#pragma omp master
      elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      volatile S sink = C(0, 0);  // the products must not be optimised away
      (void)sink;
    }
    int64_t total = 0;
    for (int64_t r : reps) total += r;
    rates.push_back(2.0 * double(n) * double(n) * double(n) * double(total) / elapsed / 1e9);
  }
  std::sort(rates.begin(), rates.end());
  return rates[1];
}

template double measure_gemm_gflops<double>(int64_t, double);
template double measure_gemm_gflops<float>(int64_t, double);

}  // namespace nsa::ref
