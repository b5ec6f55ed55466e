// Argument handling of the GlobalPointer ops shared by the CPU and CUDA registrations.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

#include "../csrc/common/global_pointer.h"

namespace seqfuse {

// Checked and normalised inputs of global_pointer_scores / global_pointer_loss: q, k
// contiguous [B, L, Hqk, D]; mask uint8 [B, L] (1 = token); biases contiguous [B, H, L]
// in the accumulation dtype. Undefined tensors stand for absent arguments.
struct GPInputs {
  at::Tensor q, k, mask, bias_start, bias_end;
  GPGeometry geom;
};

GPInputs prepare_global_pointer(const char* op, const at::Tensor& q, const at::Tensor& k,
                                const std::optional<at::Tensor>& mask, bool rope, bool tril,
                                std::optional<double> scale,
                                const std::optional<at::Tensor>& bias_start,
                                const std::optional<at::Tensor>& bias_end);

// pos_index as contiguous int64 [rows..., P] after checking its leading shape and that
// every entry is a flat index in [0, N) (or 0, padding, when mask_zero).
at::Tensor prepare_pos_index(const char* op, const at::Tensor& pos_index, at::IntArrayRef rows,
                             int64_t N, bool mask_zero, const at::Tensor& scores_like);

// Scores of the losses as contiguous [R, N], R the product of the leading dims.
at::Tensor prepare_loss_scores(const char* op, const at::Tensor& scores);
// Labels of the dense loss: scores' shape, values in [0, 1], cast to scores' dtype, [R, N].
at::Tensor prepare_labels(const char* op, const at::Tensor& labels, const at::Tensor& scores);
// Upstream gradient or saved value of the loss terms ([rows..., 2]) as contiguous [R, 2].
at::Tensor prepare_terms(const char* op, const char* name, const at::Tensor& t,
                         at::IntArrayRef rows, const at::Tensor& like);

// Gradients from the kernels' layout (q/k: [B, Hqk, L, D]; biases: [B, H, L], all in
// the accumulation dtype) to the inputs' layouts and dtypes.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> finish_global_pointer_backward(
    const GPInputs& in, const at::Tensor& grad_q, const at::Tensor& grad_k,
    const at::Tensor& grad_bias_start, const at::Tensor& grad_bias_end, at::ScalarType dtype);

}  // namespace seqfuse
