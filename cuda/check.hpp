// CUDA error checks (STYLE 7): every runtime and cuBLAS call goes through one of these macros,
// which throw nsa::CudaError naming the call, the file and the line; out-of-memory becomes a
// ResourceError that says how much was asked for.
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include "errors.hpp"

namespace nsa::cuda {

inline void check_cuda(cudaError_t e, const char* call, const char* file, int line) {
  if (e == cudaSuccess) return;
  cudaGetLastError();  // clear a sticky-free error so that later calls report their own
  if (e == cudaErrorMemoryAllocation)
    throw ResourceError(cat("CUDA out of memory in ", call, " at ", file, ":", line));
  throw CudaError(cat("CUDA error '", cudaGetErrorString(e), "' (", int(e), ") in ", call, " at ", file, ":", line));
}

inline void check_cublas(cublasStatus_t s, const char* call, const char* file, int line) {
  if (s == CUBLAS_STATUS_SUCCESS) return;
  if (s == CUBLAS_STATUS_ALLOC_FAILED)
    throw ResourceError(cat("cuBLAS out of memory in ", call, " at ", file, ":", line));
  throw CudaError(cat("cuBLAS error ", cublasGetStatusName(s), " in ", call, " at ", file, ":", line));
}

// cudaMalloc of `bytes` for `what`; out of memory is a ResourceError naming what, its size and the
// device's free memory, prefixed by `owner` ("" or e.g. "decode cache: ").
inline void* device_malloc(size_t bytes, const char* what, const char* owner = "") {
  void* ptr = nullptr;
  const cudaError_t e = cudaMalloc(&ptr, bytes);
  if (e == cudaErrorMemoryAllocation) {
    cudaGetLastError();
    size_t free_b = 0, total_b = 0;
    cudaMemGetInfo(&free_b, &total_b);
    throw ResourceError(cat(owner, "out of device memory allocating ", what, " (", bytes / 1048576.0, " MiB; ",
                            free_b / 1048576.0, " MiB free of ", total_b / 1048576.0, ")"));
  }
  check_cuda(e, "cudaMalloc", __FILE__, __LINE__);
  return ptr;
}

}  // namespace nsa::cuda

#define NSA_CUDA_CHECK(call) ::nsa::cuda::check_cuda((call), #call, __FILE__, __LINE__)
#define NSA_CUBLAS_CHECK(call) ::nsa::cuda::check_cublas((call), #call, __FILE__, __LINE__)
// After a kernel launch: launch-configuration errors surface here, execution errors at the next
// synchronising call.
#define NSA_CUDA_CHECK_LAUNCH(name) ::nsa::cuda::check_cuda(cudaGetLastError(), "launch of " name, __FILE__, __LINE__)
