// Argument handling of causal_linear_attention shared by the CPU and CUDA registrations.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <string>

#include "../csrc/common/linear_attention.h"

namespace seqfuse {

// Checked and normalised inputs: q, k, v contiguous; decay ([H]), S0 ([S, H, Dk, Dv])
// and z0 ([S, H, Dk]) contiguous in the accumulation dtype, or undefined, for S = B
// sequences (N with cu_seqlens, whose int64 copy geom.cu_seqlens points into). on_cpu:
// for the CPU kernels, so the offsets' values are checked here (checks.h).
struct LinearAttentionInputs {
  at::Tensor q, k, v, decay, S0, z0, cu_seqlens;
  LinearAttentionGeometry geom;
  FeatureMap feature_map;
};

LinearAttentionInputs prepare_linear_attention(
    const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::string& feature_map, const std::optional<at::Tensor>& decay, double scale,
    const std::optional<at::Tensor>& S0, const std::optional<at::Tensor>& z0, double eps,
    const std::optional<at::Tensor>& cu_seqlens, bool on_cpu);

// The backward's extra inputs, checked against the forward's geometry: grad_o, o
// contiguous [B, T, H, Dv]; den [B, H, T]; grad_S, grad_z ([S, H, ...]) in the
// accumulation dtype or undefined.
struct LinearAttentionGrads {
  at::Tensor grad_o, o, den, grad_S, grad_z;
};

LinearAttentionGrads prepare_linear_attention_grads(
    const char* op, const LinearAttentionInputs& in, const at::Tensor& grad_o,
    const std::optional<at::Tensor>& grad_S, const std::optional<at::Tensor>& grad_z,
    const at::Tensor& o, const at::Tensor& den);

}  // namespace seqfuse
