// The row-wise normalisers (sparse_softmax, topk_softmax, sparse_softmax_cross_entropy,
// taylor_softmax, entropy_normalize): argument checks and shape handling shared by the
// CPU and CUDA registrations. Each backend supplies its kernels as a RowKernels table
// with the signatures of csrc/cpu/sparse_softmax.h (contiguous [R, V] rows, per-row
// tensors in the accumulation dtype) and registers the *_impl functions bound to it.
// Every op normalises the last dim; the Python wrappers move any other dim there.
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

namespace seqfuse {

struct RowKernels {
  void (*sparse_softmax_forward)(const at::Tensor& x, int64_t k, at::Tensor& out);
  void (*sparse_softmax_backward)(const at::Tensor& grad, const at::Tensor& probs,
                                  at::Tensor& grad_x);
  void (*topk_softmax_forward)(const at::Tensor& x, at::Tensor& probs, at::Tensor& indices);
  void (*topk_softmax_backward)(const at::Tensor& grad, const at::Tensor& probs,
                                const at::Tensor& indices, at::Tensor& grad_x);
  void (*cross_entropy_forward)(const at::Tensor& logits, const at::Tensor& target, int64_t k,
                                int64_t ignore_index, at::Tensor& loss, at::Tensor& lse,
                                at::Tensor& indices);
  void (*cross_entropy_backward)(const at::Tensor& grad_loss, const at::Tensor& logits,
                                 const at::Tensor& target, const at::Tensor& lse,
                                 const at::Tensor& indices, int64_t ignore_index,
                                 at::Tensor& grad_logits);
  void (*taylor_softmax_forward)(const at::Tensor& x, int64_t order, at::Tensor& out);
  void (*taylor_softmax_backward)(const at::Tensor& grad, const at::Tensor& x,
                                  const at::Tensor& out, int64_t order, at::Tensor& grad_x);
  void (*entropy_normalize_forward)(const at::Tensor& p, const at::Tensor& target, int64_t iters,
                                    at::Tensor& out);
  void (*entropy_normalize_backward)(const at::Tensor& grad, const at::Tensor& p,
                                     const at::Tensor& target, int64_t iters, at::Tensor& grad_p,
                                     at::Tensor& grad_target);
};

// The backends' kernel tables (the CUDA one in CUDA and emulated builds only), for the
// bindings that build on the top-k selection.
const RowKernels& cpu_row_kernels();
const RowKernels& cuda_row_kernels();

at::Tensor sparse_softmax_impl(const RowKernels& kernels, const at::Tensor& x, int64_t k);
at::Tensor sparse_softmax_backward_impl(const RowKernels& kernels, const at::Tensor& grad,
                                        const at::Tensor& probs);
std::tuple<at::Tensor, at::Tensor> topk_softmax_impl(const RowKernels& kernels,
                                                     const at::Tensor& x, int64_t k);
at::Tensor topk_softmax_backward_impl(const RowKernels& kernels, const at::Tensor& grad,
                                      const at::Tensor& probs, const at::Tensor& indices,
                                      int64_t V);
std::tuple<at::Tensor, at::Tensor, at::Tensor> sparse_softmax_cross_entropy_impl(
    const RowKernels& kernels, const at::Tensor& logits, const at::Tensor& target, int64_t k,
    int64_t ignore_index);
at::Tensor sparse_softmax_cross_entropy_backward_impl(
    const RowKernels& kernels, const at::Tensor& grad_loss, const at::Tensor& logits,
    const at::Tensor& target, const at::Tensor& lse, const at::Tensor& indices,
    int64_t ignore_index);
at::Tensor taylor_softmax_impl(const RowKernels& kernels, const at::Tensor& x, int64_t order);
at::Tensor taylor_softmax_backward_impl(const RowKernels& kernels, const at::Tensor& grad,
                                        const at::Tensor& x, const at::Tensor& out,
                                        int64_t order);
at::Tensor entropy_normalize_impl(const RowKernels& kernels, const at::Tensor& p,
                                  const at::Tensor& target_entropy, int64_t iters);
std::tuple<at::Tensor, at::Tensor> entropy_normalize_backward_impl(
    const RowKernels& kernels, const at::Tensor& grad, const at::Tensor& p,
    const at::Tensor& target_entropy, int64_t iters);

}  // namespace seqfuse
