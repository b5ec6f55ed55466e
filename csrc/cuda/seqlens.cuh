// Packed sequences on the device: cu_seqlens (N + 1 int64 offsets into a time axis of
// T steps; sequence n spans [cu_seqlens[n], cu_seqlens[n+1])) read by the kernels
// themselves, so a call never waits for the host to see them.
//
// The host cannot check the values without a synchronisation, so validate_offsets runs
// on the device first and raises a flag that the kernels read (or fill_if_invalid, after
// them): with invalid offsets (not 0 first, decreasing, not T last) every output is NaN
// instead of a result. Whatever the values, every index the helpers below return stays
// in bounds.
#pragma once

#include <cstdint>

#include "portability.cuh"

namespace seqfuse::cuda {
namespace {  // one copy per kernel file that includes this

__global__ void validate_offsets_kernel(const int64_t* cu, int64_t N, int64_t T, int* invalid) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i > N) return;
  const bool bad = (i == 0 && cu[0] != 0) || (i == N && cu[N] != T) ||
                   (i < N && cu[i + 1] < cu[i]);
  if (bad) atomicOr(invalid, 1);
}

template <typename T>
__global__ void fill_if_invalid_kernel(T* data, int64_t n, T value, const int* invalid) {
  if (*invalid == 0) return;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    data[i] = value;
  }
}

}  // namespace

// *invalid must be zero before; it is 1 after the kernel iff the offsets are invalid.
inline cudaError_t validate_offsets(const int64_t* cu, int64_t N, int64_t T, int* invalid,
                                    cudaStream_t stream) {
  constexpr int kThreads = 256;
  const int64_t blocks = (N + kThreads) / kThreads;  // N + 1 offsets
  if (blocks >= (int64_t(1) << 31)) return cudaErrorInvalidConfiguration;
  SEQFUSE_LAUNCH(unsigned(blocks), kThreads, 0, stream, validate_offsets_kernel)(cu, N, T,
                                                                                 invalid);
  return cudaGetLastError();
}

// After the kernels: n elements of `data` set to `value` if *invalid (a kernel that
// only walks the stretches the offsets describe leaves the rest of its outputs
// unwritten when they are invalid). When they are valid its blocks return at once.
template <typename T>
cudaError_t fill_if_invalid(T* data, int64_t n, T value, const int* invalid,
                            cudaStream_t stream) {
  constexpr int kThreads = 256;
  if (n == 0) return cudaSuccess;
  const int64_t needed = (n + kThreads - 1) / kThreads;
  const int64_t blocks = needed < 1024 ? needed : 1024;
  SEQFUSE_LAUNCH(unsigned(blocks), kThreads, 0, stream, fill_if_invalid_kernel<T>)(data, n, value,
                                                                                  invalid);
  return cudaGetLastError();
}

// The sequence that holds step t: the last n in [0, N) with cu[n] <= t (an empty
// sequence shares its offset with the next one and is skipped). Needs N >= 1.
__device__ inline int64_t sequence_of(const int64_t* cu, int64_t N, int64_t t) {
  int64_t lo = 0, hi = N - 1;
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) / 2;
    if (cu[mid] <= t) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo;
}

}  // namespace seqfuse::cuda
