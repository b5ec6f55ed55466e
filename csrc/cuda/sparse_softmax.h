// CUDA row-wise normalisers (docs/sparse_softmax.md); the maths is stated in
// csrc/common/row_softmax.h.
// Pointers are to device memory. x-shaped buffers are contiguous [R, V] in the element
// type (float32, float16 or bfloat16); per-row buffers are float32 [R]; indices int64.
// Every launch runs on `stream`. R must be below 2^31 and V at most 2^31 - 1.
#pragma once

#include <cstddef>
#include <cstdint>

#include "launch.h"

namespace seqfuse::cuda {

// Top lists longer than this come out of topk_softmax_forward in any order; the caller
// sorts them.
constexpr int64_t kTopKSortedMax = 1024;

struct RowShape {
  int64_t R, V;
};

cudaError_t sparse_softmax_forward(const void* x, RowShape s, int64_t k, void* out, DType dtype,
                                   cudaStream_t stream);
cudaError_t sparse_softmax_backward(const void* grad, const void* probs, RowShape s, void* grad_x,
                                    DType dtype, cudaStream_t stream);

// probs, indices [R, kk], best first when kk <= kTopKSortedMax, in any order otherwise.
cudaError_t topk_softmax_forward(const void* x, RowShape s, int64_t kk, void* probs,
                                 int64_t* indices, DType dtype, cudaStream_t stream);
// grad_x [R, V] from grad, probs, indices [R, kk].
cudaError_t topk_softmax_backward(const void* grad, const void* probs, const int64_t* indices,
                                  RowShape s, int64_t kk, void* grad_x, DType dtype,
                                  cudaStream_t stream);

// loss [N]; lse [N, 2]: the kept log-sum-exp as (m, log s) (KeptLse::for_loss,
// csrc/common/row_softmax.h); indices [N, k] in any order when k < V; untouched (and may
// be null) when k >= V.
cudaError_t cross_entropy_forward(const void* logits, const int64_t* target, RowShape s, int64_t k,
                                  int64_t ignore_index, float* loss, float* lse, int64_t* indices,
                                  DType dtype, cudaStream_t stream);
// kk = indices' row length: 0 for the plain softmax.
cudaError_t cross_entropy_backward(const float* grad_loss, const void* logits,
                                   const int64_t* target, const float* lse,
                                   const int64_t* indices, RowShape s, int64_t kk,
                                   int64_t ignore_index, void* grad, DType dtype,
                                   cudaStream_t stream);

cudaError_t taylor_softmax_forward(const void* x, RowShape s, int order, void* out, DType dtype,
                                   cudaStream_t stream);
cudaError_t taylor_softmax_backward(const void* grad, const void* x, const void* out, RowShape s,
                                    int order, void* grad_x, DType dtype, cudaStream_t stream);

cudaError_t entropy_normalize_forward(const void* p, const float* target, RowShape s, int iters,
                                      void* out, DType dtype, cudaStream_t stream);
// workspace: entropy_backward_workspace_bytes(s, iters) bytes, any contents.
size_t entropy_backward_workspace_bytes(RowShape s, int iters);
cudaError_t entropy_normalize_backward(const void* grad, const void* p, const float* target,
                                       RowShape s, int iters, void* grad_p, float* grad_target,
                                       void* workspace, DType dtype, cudaStream_t stream);

}  // namespace seqfuse::cuda
