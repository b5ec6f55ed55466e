// CUDA kernels of the backward of linear_sparse_softmax_cross_entropy; the maths is
// that of csrc/cpu/linear_cross_entropy.h (the algorithm: pyext/linear_cross_entropy.cpp).
// Pointers are to device memory: coef float [N, J] (the gradient of the loss with
// respect to the logits at its J = k + 1 non-zeros), index int64 [N, J] (vocabulary
// rows; V marks an entry that takes no part), weight [V, D] and hidden [N, D] in the
// element type (float32, float16 or bfloat16), sums in float32. Every launch runs on
// `stream`.
#pragma once

#include <cstdint>

#include "launch.h"

namespace seqfuse::cuda {

struct WeightRows {
  int64_t N, J, V, D;
};

// out [N, D] = sum_j coef[n, j] * weight[index[n, j]].
cudaError_t gather_weight_rows(const float* coef, const int64_t* index, const void* weight,
                               WeightRows s, void* out, DType dtype, cudaStream_t stream);

// sorted, order [N J]: index.flatten() sorted stably and the flat positions it came
// from. grad_weight[v] = sum coef[e] hidden[e / J] and grad_bias[v] = sum coef[e] over
// the run of v, in sorted order (so the same on every run); rows no entry names are
// left as they are.
cudaError_t scatter_weight_rows(const int64_t* sorted, const int64_t* order, const float* coef,
                                const void* hidden, WeightRows s, void* grad_weight,
                                float* grad_bias, DType dtype, cudaStream_t stream);

}  // namespace seqfuse::cuda
