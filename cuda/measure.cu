// The CUDA benchmarks' measurements (measure.hpp): the L2 flush, CUDA events, warm-up and medians,
// used by bench (the forward), bench_backward, bench_decode (decode.cu) and measure_ceilings.
#include <algorithm>

#include "check.hpp"
#include "kernels.hpp"
#include "measure.hpp"
#include "plan.hpp"

namespace nsa::cuda {

L2Flush::~L2Flush() {
  if (buf_) cudaFree(buf_);
}

void L2Flush::allocate(int device) {
  if (buf_) return;
  int l2 = 0;
  NSA_CUDA_CHECK(cudaDeviceGetAttribute(&l2, cudaDevAttrL2CacheSize, device));
  bytes_ = size_t(std::max(l2, 1 << 20)) * 2;
  NSA_CUDA_CHECK(cudaMalloc(&buf_, bytes_));
}

void L2Flush::operator()(int rep, cudaStream_t s) {
  if (!buf_) throw CudaError("L2Flush used before allocate()");
  NSA_CUDA_CHECK(cudaMemsetAsync(buf_, rep & 0xff, bytes_, s));
}

namespace {
// Events reused across timings (created once per device and thread, kept for the process): no
// event is created between a flush and the run it precedes, so the host keeps queueing launches
// while the flush runs.
const std::vector<cudaEvent_t>& events(size_t n) {
  thread_local std::vector<std::vector<cudaEvent_t>> per_device;
  int dev = 0;
  NSA_CUDA_CHECK(cudaGetDevice(&dev));
  if (per_device.size() <= size_t(dev)) per_device.resize(size_t(dev) + 1);
  auto& ev = per_device[size_t(dev)];
  while (ev.size() < n) {
    cudaEvent_t e;
    NSA_CUDA_CHECK(cudaEventCreate(&e));
    ev.push_back(e);
  }
  return ev;
}
double elapsed(cudaEvent_t a, cudaEvent_t b) {
  float t = 0;
  NSA_CUDA_CHECK(cudaEventElapsedTime(&t, a, b));
  return double(t);
}
}  // namespace

double event_ms(cudaStream_t s, const std::function<void()>& fn) {
  const auto& e = events(2);
  NSA_CUDA_CHECK(cudaEventRecord(e[0], s));
  fn();
  NSA_CUDA_CHECK(cudaEventRecord(e[1], s));
  NSA_CUDA_CHECK(cudaEventSynchronize(e[1]));
  return elapsed(e[0], e[1]);
}

double flushed_ms(L2Flush& flush, int rep, cudaStream_t s, const std::function<void()>& fn) {
  flush(rep, s);
  return event_ms(s, fn);
}

std::vector<StageTime> run_stages_timed(const StageList& st, cudaStream_t s) {
  const auto& e = events(st.size() + 1);
  NSA_CUDA_CHECK(cudaEventRecord(e[0], s));
  for (size_t i = 0; i < st.size(); ++i) {
    st[i].second(s);
    NSA_CUDA_CHECK(cudaEventRecord(e[i + 1], s));
  }
  NSA_CUDA_CHECK(cudaEventSynchronize(e[st.size()]));
  std::vector<StageTime> out;
  for (size_t i = 0; i < st.size(); ++i) out.push_back({st[i].first, elapsed(e[i], e[i + 1])});
  return out;
}

void StageMedians::add(const std::vector<StageTime>& run) {
  if (names_.empty())
    for (const auto& s : run) names_.push_back(s.stage), ms_.emplace_back();
  for (size_t i = 0; i < run.size() && i < ms_.size(); ++i) ms_[i].push_back(run[i].ms);
}

std::vector<StageTime> StageMedians::medians() const {
  std::vector<StageTime> out;
  for (size_t i = 0; i < names_.size(); ++i) out.push_back({names_[i], median(ms_[i])});
  return out;
}

BenchResult bench(Plan& plan, int warmup, int reps) {
  Plan::Impl& I = *plan.impl_;
  I.flush.allocate(I.opt.device);
  for (int i = 0; i < warmup; ++i) plan.run();
  NSA_CUDA_CHECK(cudaDeviceSynchronize());
  std::vector<double> times;
  for (int r = 0; r < reps; ++r) times.push_back(flushed_ms(I.flush, r, nullptr, [&] { plan.run(); }));
  BenchResult res;
  res.ms = median(times);
  res.kernels = I.kernels;
  StageMedians per;
  for (int r = 0; r < reps; ++r) {
    I.flush(r, nullptr);
    per.add(plan.run_timed());
  }
  res.stages = per.medians();
  return res;
}

BwdBenchResult bench_backward(Plan& plan, int warmup, int reps) {
  Plan::Impl& I = *plan.impl_;
  require_backward(I);
  I.flush.allocate(I.opt.device);
  for (int i = 0; i < warmup; ++i) {
    plan.run();
    plan.run_backward();
  }
  NSA_CUDA_CHECK(cudaDeviceSynchronize());
  // Forward + backward between the events, or the backward alone after an untimed forward.
  auto timed = [&](bool with_forward, int r) {
    if (!with_forward) plan.run();
    return flushed_ms(I.flush, r, nullptr, [&] {
      if (with_forward) plan.run();
      plan.run_backward();
    });
  };
  std::vector<double> both, bwd;
  for (int r = 0; r < reps; ++r) both.push_back(timed(true, r));
  for (int r = 0; r < reps; ++r) bwd.push_back(timed(false, r));
  BwdBenchResult res;
  res.fwd_bwd_ms = median(both);
  res.bwd_ms = median(bwd);
  res.kernels = I.kernels;
  res.deterministic = I.bw.bp.deterministic;
  StageMedians per;
  for (int r = 0; r < reps; ++r) {
    plan.run();
    I.flush(r, nullptr);
    per.add(plan.run_backward_timed());
  }
  res.stages = per.medians();
  return res;
}

namespace {
// Reads `passes` times over n 16-byte words (a buffer that fits in L2); the xor keeps the loads.
__global__ void l2_read_kernel(const uint4* __restrict__ x, int64_t n, int passes, uint4* sink) {
  uint32_t acc = 0;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int pass = 0; pass < passes; ++pass)
    for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += stride) {
      const uint4 v = x[i];
      acc ^= v.x ^ v.y ^ v.z ^ v.w;
    }
  if (acc == 0x12345678u) sink->x = acc;  // practically never: the loads must not be removed
}
}  // namespace

Ceilings measure_ceilings(Precision prec, int device) {
  NSA_CUDA_CHECK(cudaSetDevice(device));
  const int n = 8192;
  const size_t es = size_t(element_size(prec));
  void *a = nullptr, *b = nullptr;
  float* c = nullptr;
  NSA_CUDA_CHECK(cudaMalloc(&a, size_t(n) * n * es));
  NSA_CUDA_CHECK(cudaMalloc(&b, size_t(n) * n * es));
  NSA_CUDA_CHECK(cudaMalloc(&c, size_t(n) * n * sizeof(float)));
  // Random operands: a tensor core multiplies zeros faster than real data.
  fill_normal_elems(prec, a, int64_t(n) * n, 11);
  fill_normal_elems(prec, b, int64_t(n) * n, 12);
  cublasHandle_t blas;
  NSA_CUBLAS_CHECK(cublasCreate(&blas));
  // Medians of 10 event-timed runs after 3 warm-ups, on the default stream, no flush (the
  // operands are far larger than L2; the L2 read ceiling wants them cached).
  auto median_ms = [&](auto&& fn, int reps) {
    for (int i = 0; i < 3; ++i) fn();
    std::vector<double> t;
    for (int i = 0; i < reps; ++i) t.push_back(event_ms(nullptr, fn));
    return median(t);
  };
  Ceilings r;
  const double mm = median_ms([&] { gemm(blas, prec, false, 1, n, n, n, a, n, 0, b, n, 0, c, n, 0); }, 10);
  r.matmul_tflops = 2.0 * n * n * double(n) / mm / 1e9;
  const size_t bytes = size_t(n) * n * es;
  const double cp = median_ms([&] { NSA_CUDA_CHECK(cudaMemcpyAsync(b, a, bytes, cudaMemcpyDeviceToDevice)); }, 10);
  r.copy_tbps = 2.0 * double(bytes) / cp / 1e9;
  // L2: a quarter of the cache, read 20 times per launch by 4 CTAs of 512 threads per SM.
  const DeviceInfo& d = device_info(device);
  const int64_t l2_words = std::max<int64_t>(d.prop.l2CacheSize / 4 / 16, 1 << 16);
  const int passes = 20;
  const double l2 = median_ms(
      [&] {
        l2_read_kernel<<<4 * d.prop.multiProcessorCount, 512>>>(static_cast<const uint4*>(a), l2_words, passes,
                                                                static_cast<uint4*>(b));
      },
      10);
  NSA_CUDA_CHECK_LAUNCH("l2_read_kernel");
  r.l2_read_tbps = double(l2_words) * 16 * passes / l2 / 1e9;
  cublasDestroy(blas);
  cudaFree(a);
  cudaFree(b);
  cudaFree(c);
  return r;
}

}  // namespace nsa::cuda
