// CPU causal linear attention (docs/linear_attention.md); the maths is stated in
// csrc/common/linear_attention.h.
#pragma once

#include <ATen/core/Tensor.h>

#include "../common/linear_attention.h"

namespace seqfuse::cpu {

// Scalars of one call. decay: [H] in the accumulation dtype, or undefined for 1.
struct LinearAttentionOptions {
  FeatureMap feature_map;
  bool normalize;
  double scale, eps;
};

// q, k: contiguous [B, T, H, Dk]; v: contiguous [B, T, H, Dv]; S0 [B, H, Dk, Dv] and
// z0 [B, H, Dk] contiguous in the accumulation dtype, or undefined for zeros.
// Writes o (like v), the final state S_T, z_T (accumulation dtype) and den [B, H, T]
// (accumulation dtype; the normaliser scale phi(q_i)^T z_i + eps, kept for backward).
void linear_attention_forward(const LinearAttentionGeometry& g, const LinearAttentionOptions& opt,
                              const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                              const at::Tensor& decay, const at::Tensor& S0, const at::Tensor& z0,
                              at::Tensor& o, at::Tensor& S_T, at::Tensor& z_T, at::Tensor& den);

// grad_o like o; grad_S, grad_z: gradients of the final state (accumulation dtype,
// undefined for zero); o and den from the forward. Writes dq, dk, dv (input dtype) and
// dS0, dz0 (accumulation dtype).
void linear_attention_backward(const LinearAttentionGeometry& g, const LinearAttentionOptions& opt,
                               const at::Tensor& grad_o, const at::Tensor& grad_S,
                               const at::Tensor& grad_z, const at::Tensor& q, const at::Tensor& k,
                               const at::Tensor& v, const at::Tensor& o, const at::Tensor& den,
                               const at::Tensor& decay, const at::Tensor& S0, const at::Tensor& z0,
                               at::Tensor& dq, at::Tensor& dk, at::Tensor& dv, at::Tensor& dS0,
                               at::Tensor& dz0);

}  // namespace seqfuse::cpu
