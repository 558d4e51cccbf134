// cuBLAS as the plan and the decoder hold it, and what compute-sanitizer's initcheck must be told
// about it (issue 9).
//
// initcheck does not see the writes of cuBLAS's kernels: on the H100 every element of a GEMM's
// output is reported as uninitialised when it is next read, although every one of them was
// written (the test "cuda cublas probe" in tests/test_cuda_cublas.cpp shows both with nothing of
// ours in between: the output, first filled with NaN bytes, comes back all finite and equal to the
// product, and initcheck reports the copy of a fresh output). cuBLAS's own split-K reduction,
// reading the partial sums its GEMM kernel left in cuBLAS's workspace, is reported for the same
// reason. So:
//   - after each GEMM, the rows of C that the GEMM wrote are marked initialised through NVTX's
//     memory API for the sanitizer (mark_gemm_output);
//   - cuBLAS works in a workspace of ours, zero-filled once (Blas::create) and set again after
//     every stream change (Blas::set_stream).
// Without a tool attached, the NVTX calls return at once (no injection library is loaded).
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <nvtx3/nvToolsExtMemCudaRt.h>

#include <cstdint>

#include "check.hpp"

namespace nsa::cuda {

// Tells the sanitizer that the bytes [ptr, ptr + bytes) were written by work on stream s.
inline void mark_initialized(cudaStream_t s, const void* ptr, size_t bytes) {
  if (ptr == nullptr || bytes == 0) return;
  static const nvtxDomainHandle_t domain = nvtxDomainCreateA("nsa");
  nvtxMemVirtualRangeDesc_t range{};
  range.ptr = ptr;
  range.size = bytes;
  nvtxMemMarkInitializedBatch_t batch{};
  batch.extCompatID = NVTX_EXT_COMPATID_MEM;
  batch.structSize = sizeof(batch);
  batch.regionType = NVTX_MEM_TYPE_VIRTUAL_ADDRESS;
  batch.regionDescCount = 1;
  batch.regionDescElementSize = sizeof(range);
  batch.regionDescElements = &range;
  nvtxMemCudaMarkInitialized(domain, s, 0, &batch);
}

// A row-major batched GEMM's output: batch matrices of M rows of N floats, row r of matrix b at
// C + b * strideC + r * ldc. Marks exactly those rows: as one range when they tile it (matrices
// one after another, or interleaved row by row: the layouts we use), else row by row.
inline void mark_gemm_output(cublasHandle_t blas, int batch, int M, int N, const float* C, int64_t ldc,
                             int64_t strideC) {
  if (batch <= 0 || M <= 0 || N <= 0) return;
  cudaStream_t s = nullptr;
  NSA_CUBLAS_CHECK(cublasGetStream(blas, &s));
  const bool stacked = ldc == N && (batch == 1 || strideC == int64_t(M) * N);
  const bool interleaved = strideC == N && ldc == int64_t(batch) * N;
  if (stacked || interleaved) {
    mark_initialized(s, C, size_t(batch) * size_t(M) * size_t(N) * sizeof(float));
    return;
  }
  for (int b = 0; b < batch; ++b)
    for (int r = 0; r < M; ++r) mark_initialized(s, C + b * strideC + r * ldc, size_t(N) * sizeof(float));
}

// A cuBLAS handle with a workspace of ours (cublasSetWorkspace), zero-filled once so that the
// sanitizer counts it as written; destroy() releases the handle before the workspace. Streams are
// set through set_stream, never cublasSetStream alone.
struct Blas {
  cublasHandle_t handle = nullptr;
  void* workspace = nullptr;
  // cuBLAS's recommended workspace on Hopper (4 MiB suffices before it).
  static constexpr size_t kWorkspaceBytes = size_t(32) << 20;

  void create() {
    NSA_CUBLAS_CHECK(cublasCreate(&handle));
    workspace = device_malloc(kWorkspaceBytes, "cuBLAS workspace");
    NSA_CUDA_CHECK(cudaMemset(workspace, 0, kWorkspaceBytes));
    NSA_CUBLAS_CHECK(cublasSetWorkspace(handle, workspace, kWorkspaceBytes));
  }
  // cublasSetStream puts the handle back on cuBLAS's default workspace pool (cuBLAS documents
  // this), so the workspace is set again after it.
  void set_stream(cudaStream_t s) {
    NSA_CUBLAS_CHECK(cublasSetStream(handle, s));
    NSA_CUBLAS_CHECK(cublasSetWorkspace(handle, workspace, kWorkspaceBytes));
  }
  void destroy() {
    if (handle) cublasDestroy(handle);
    if (workspace) cudaFree(workspace);
    handle = nullptr;
    workspace = nullptr;
  }
};

}  // namespace nsa::cuda
