// Argument handling of causal_linear_attention shared by the CPU and CUDA registrations.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <string>

#include "../csrc/common/linear_attention.h"

namespace seqfuse {

// Checked and normalised inputs: q, k, v contiguous; decay ([H]), S0 ([B, H, Dk, Dv])
// and z0 ([B, H, Dk]) contiguous in the accumulation dtype, or undefined.
struct LinearAttentionInputs {
  at::Tensor q, k, v, decay, S0, z0;
  LinearAttentionGeometry geom;
  FeatureMap feature_map;
};

LinearAttentionInputs prepare_linear_attention(
    const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::string& feature_map, const std::optional<at::Tensor>& decay, double scale,
    const std::optional<at::Tensor>& S0, const std::optional<at::Tensor>& z0, double eps);

// The backward's extra inputs, checked against the forward's geometry: grad_o, o
// contiguous [B, T, H, Dv]; den [B, H, T]; grad_S, grad_z in the accumulation dtype
// or undefined.
struct LinearAttentionGrads {
  at::Tensor grad_o, o, den, grad_S, grad_z;
};

LinearAttentionGrads prepare_linear_attention_grads(
    const char* op, const LinearAttentionInputs& in, const at::Tensor& grad_o,
    const std::optional<at::Tensor>& grad_S, const std::optional<at::Tensor>& grad_z,
    const at::Tensor& o, const at::Tensor& den);

}  // namespace seqfuse
