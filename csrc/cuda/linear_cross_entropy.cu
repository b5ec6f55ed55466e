// CUDA backward of linear_sparse_softmax_cross_entropy (maths: linear_cross_entropy.h):
//
//   gather   dhidden_n = sum_j coef_nj W[index_nj]       one block per (token, D tile)
//   scatter  dW_v = sum_{run of v} coef_e hidden_{e/J}    one block per (sorted position,
//            db_v = sum_{run of v} coef_e                 D tile); only the block at the
//                                                         start of a run works, and walks
//                                                         the run in sorted order
//
// No atomics: each output element is written by one thread, which sums its terms in an
// order fixed by the stable sort, so the gradients are the same on every run. A block's
// threads split the D columns; the run (or the token's J entries) is read by all of
// them from the same addresses, which the caches serve once.
#include <cstdint>
#include <type_traits>

#include "dtype.cuh"
#include "linear_cross_entropy.h"

namespace seqfuse::cuda {
namespace {

constexpr int kThreads = 128;

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    gather_kernel(const float* coef, const int64_t* index, const scalar_t* weight, WeightRows s,
                  scalar_t* out) {
  const int64_t n = blockIdx.x;
  const int64_t d = int64_t(blockIdx.y) * kThreads + threadIdx.x;
  if (d >= s.D) return;
  float acc = 0.f;
  for (int64_t j = 0; j < s.J; ++j) {
    const int64_t v = index[n * s.J + j];
    if (v < s.V) acc += coef[n * s.J + j] * to_acc(weight[v * s.D + d]);
  }
  out[n * s.D + d] = from_acc<scalar_t>(acc);
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    scatter_kernel(const int64_t* sorted, const int64_t* order, const float* coef,
                   const scalar_t* hidden, WeightRows s, scalar_t* grad_weight,
                   float* grad_bias) {
  const int64_t M = s.N * s.J;
  const int64_t p = blockIdx.x;
  const int64_t v = sorted[p];
  if ((p > 0 && sorted[p - 1] == v) || v >= s.V) return;  // not the start of a run
  const int64_t d = int64_t(blockIdx.y) * kThreads + threadIdx.x;
  if (d >= s.D) return;
  float acc = 0.f, bias = 0.f;
  for (int64_t q = p; q < M && sorted[q] == v; ++q) {
    const int64_t e = order[q];
    acc += coef[e] * to_acc(hidden[(e / s.J) * s.D + d]);
    bias += coef[e];
  }
  grad_weight[v * s.D + d] = from_acc<scalar_t>(acc);
  if (d == 0) grad_bias[v] = bias;  // column 0's thread: one writer per row
}

template <typename T>
const T* as(const void* p) {
  return static_cast<const T*>(p);
}
template <typename T>
T* as(void* p) {
  return static_cast<T*>(p);
}

// Launches launch(tag, grid, block) over rows x D tiles for the CUDA element types.
template <typename Launch>
cudaError_t launch_tiles(int64_t rows, int64_t D, DType dtype, Launch&& launch) {
  if (rows == 0 || D == 0) return cudaSuccess;
  const int64_t tiles = (D + kThreads - 1) / kThreads;
  if (rows >= (int64_t(1) << 31) || tiles > 65535) return cudaErrorInvalidConfiguration;
  cudaError_t err = cudaErrorInvalidValue;
  dispatch_float_types(dtype, [&](auto tag) {
    if constexpr (!std::is_same_v<decltype(tag), double>) {
      launch(tag, dim3(unsigned(rows), unsigned(tiles)), dim3(kThreads));
      err = cudaGetLastError();
    }
  });
  return err;
}

}  // namespace

cudaError_t gather_weight_rows(const float* coef, const int64_t* index, const void* weight,
                               WeightRows s, void* out, DType dtype, cudaStream_t stream) {
  return launch_tiles(s.N, s.D, dtype, [&](auto tag, dim3 grid, dim3 block) {
    using T = decltype(tag);
    SEQFUSE_LAUNCH(grid, block, 0, stream, gather_kernel<T>)(coef, index, as<T>(weight), s,
                                                             as<T>(out));
  });
}

cudaError_t scatter_weight_rows(const int64_t* sorted, const int64_t* order, const float* coef,
                                const void* hidden, WeightRows s, void* grad_weight,
                                float* grad_bias, DType dtype, cudaStream_t stream) {
  return launch_tiles(s.N * s.J, s.D, dtype, [&](auto tag, dim3 grid, dim3 block) {
    using T = decltype(tag);
    SEQFUSE_LAUNCH(grid, block, 0, stream, scatter_kernel<T>)(sorted, order, coef, as<T>(hidden),
                                                              s, as<T>(grad_weight), grad_bias);
  });
}

}  // namespace seqfuse::cuda
