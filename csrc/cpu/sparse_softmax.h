// CPU row-wise normalisers (docs/sparse_softmax.md); the maths is stated in
// csrc/common/row_softmax.h.
// Every tensor is contiguous; x-shaped ones are [R, V] (the normalised dim last),
// per-row ones [R] in the accumulation dtype, index tensors int64.
#pragma once

#include <ATen/core/Tensor.h>

namespace seqfuse::cpu {

// out [R, V]: the softmax over each row's top min(k, V) entries, zeros elsewhere.
void sparse_softmax_forward(const at::Tensor& x, int64_t k, at::Tensor& out);
// grad_x = p * (grad - sum(p * grad)) over p != 0; also the backward of softmax.
void sparse_softmax_backward(const at::Tensor& grad, const at::Tensor& probs, at::Tensor& grad_x);

// probs, indices [R, kk], kk = min(k, V): the top entries, highest first.
void topk_softmax_forward(const at::Tensor& x, at::Tensor& probs, at::Tensor& indices);
// grad_x [R, V]: probs * (grad - sum(probs * grad)) scattered to indices, zeros elsewhere.
void topk_softmax_backward(const at::Tensor& grad, const at::Tensor& probs,
                           const at::Tensor& indices, at::Tensor& grad_x);

// logits [N, V], target [N] int64. loss [N]; lse [N, 2]: the kept log-sum-exp as
// (m, log s) (KeptLse::for_loss, csrc/common/row_softmax.h); indices [N, k] (any order)
// when k < V, or [N, 0] for the plain softmax (k >= V). Rows with target == ignore_index
// get loss 0.
void cross_entropy_forward(const at::Tensor& logits, const at::Tensor& target, int64_t k,
                           int64_t ignore_index, at::Tensor& loss, at::Tensor& lse,
                           at::Tensor& indices);
// grad_logits [N, V] = grad_loss * (softmax over Omega_k - onehot(target)).
void cross_entropy_backward(const at::Tensor& grad_loss, const at::Tensor& logits,
                            const at::Tensor& target, const at::Tensor& lse,
                            const at::Tensor& indices, int64_t ignore_index,
                            at::Tensor& grad_logits);

void taylor_softmax_forward(const at::Tensor& x, int64_t order, at::Tensor& out);
void taylor_softmax_backward(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& out,
                             int64_t order, at::Tensor& grad_x);

// target [R] in the accumulation dtype; grad_target [R] likewise.
void entropy_normalize_forward(const at::Tensor& p, const at::Tensor& target, int64_t iters,
                               at::Tensor& out);
void entropy_normalize_backward(const at::Tensor& grad, const at::Tensor& p,
                                const at::Tensor& target, int64_t iters, at::Tensor& grad_p,
                                at::Tensor& grad_target);

}  // namespace seqfuse::cpu
