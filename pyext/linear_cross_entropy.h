// linear_sparse_softmax_cross_entropy: the schema's argument checks and the chunked
// algorithm (pyext/linear_cross_entropy.cpp), shared by the CPU and CUDA registrations.
// Each backend supplies its kernels as a table; everything else is ATen.
#pragma once

#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "sparse_softmax.h"

namespace seqfuse {

struct LinearCrossEntropyKernels {
  const RowKernels& (*rows)();  // its topk_softmax_forward ranks each chunk
  // out [N, D] = sum_j coef[n, j] weight[index[n, j]]; coef in the accumulation dtype.
  void (*gather_weight_rows)(const at::Tensor& coef, const at::Tensor& index,
                             const at::Tensor& weight, at::Tensor& out);
  // grad_weight, grad_bias rows named by sorted (see csrc/cpu/linear_cross_entropy.h).
  void (*scatter_weight_rows)(const at::Tensor& sorted, const at::Tensor& order,
                              const at::Tensor& coef, const at::Tensor& hidden, int64_t J,
                              at::Tensor& grad_weight, at::Tensor& grad_bias);
  int64_t tile_logits;  // default chunks: max(k, 128, tile_logits / N) columns
  void (*check_dtype)(const at::Tensor& hidden);  // the dtypes the backend takes
};

// (loss [N], lse [N], probs [N, kk], indices [N, kk]) with kk = k < V ? k : 0.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_cross_entropy_impl(
    const LinearCrossEntropyKernels& kernels, const at::Tensor& hidden, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& target, int64_t k,
    int64_t ignore_index, std::optional<int64_t> chunk_size);

// (grad_hidden [N, D], grad_weight [V, D], grad_bias [V]).
std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_cross_entropy_backward_impl(
    const LinearCrossEntropyKernels& kernels, const at::Tensor& grad_loss,
    const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& target, const at::Tensor& lse, const at::Tensor& probs,
    const at::Tensor& indices, int64_t k, int64_t ignore_index, std::optional<int64_t> chunk_size);

// Registers both ops for a backend, bound to its kernel table.
template <const LinearCrossEntropyKernels& kernels>
void register_linear_cross_entropy(torch::Library& m) {
  m.impl("linear_sparse_softmax_cross_entropy",
         [](const at::Tensor& hidden, const at::Tensor& weight,
            const std::optional<at::Tensor>& bias, const at::Tensor& target, int64_t k,
            int64_t ignore_index, std::optional<int64_t> chunk_size) {
           kernels.check_dtype(hidden);
           return linear_cross_entropy_impl(kernels, hidden, weight, bias, target, k,
                                            ignore_index, chunk_size);
         });
  m.impl("linear_sparse_softmax_cross_entropy_backward",
         [](const at::Tensor& grad_loss, const at::Tensor& hidden, const at::Tensor& weight,
            const std::optional<at::Tensor>& bias, const at::Tensor& target,
            const at::Tensor& lse, const at::Tensor& probs, const at::Tensor& indices, int64_t k,
            int64_t ignore_index, std::optional<int64_t> chunk_size) {
           kernels.check_dtype(hidden);
           return linear_cross_entropy_backward_impl(kernels, grad_loss, hidden, weight, bias,
                                                     target, lse, probs, indices, k,
                                                     ignore_index, chunk_size);
         });
}

}  // namespace seqfuse
