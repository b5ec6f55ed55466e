// CPU kernels of the backward of linear_sparse_softmax_cross_entropy (the SPACES loss
// straight from the LM head; the whole algorithm is stated in
// pyext/linear_cross_entropy.cpp). The loss's gradient with respect to the logits has
// J = k + 1 non-zeros per row, held as coef [N, J] (accumulation dtype) at the
// vocabulary rows index [N, J] (int64; V marks an entry that takes no part), so the
// backward is a gather and a scatter of weight-sized rows instead of two products.
// float32 and float64; every tensor contiguous.
#pragma once

#include <ATen/core/Tensor.h>

namespace seqfuse::cpu {

// out [N, D] = sum_j coef[n, j] * weight[index[n, j]]   (weight [V, D]).
void gather_weight_rows(const at::Tensor& coef, const at::Tensor& index,
                        const at::Tensor& weight, at::Tensor& out);

// The transpose, deterministically: sorted [M] = index.flatten() sorted stably, order
// [M] the flat positions it came from (M = N J). Every run of one vocabulary row v < V
// is summed in that order:
//   grad_weight[v] = sum coef[e] * hidden[e / J],   grad_bias[v] = sum coef[e].
// Rows of grad_weight [V, D] and grad_bias [V] that no entry names are left as they are.
void scatter_weight_rows(const at::Tensor& sorted, const at::Tensor& order,
                         const at::Tensor& coef, const at::Tensor& hidden, int64_t J,
                         at::Tensor& grad_weight, at::Tensor& grad_bias);

}  // namespace seqfuse::cpu
