// CUDA causal linear attention (SPEC §2); the maths is stated in
// csrc/common/linear_attention.h.
#pragma once

#include <cstddef>
#include <cstdint>

#include "../common/linear_attention.h"
#include "launch.h"

namespace seqfuse::cuda {

// Pointers are to device memory. "acc" is the accumulation type: float for the half
// types and float32, double for float64. States carry z as their last column:
// S' = [S, z] is acc [B, H, Dk, Dv+1].
struct LinearAttentionArgs {
  LinearAttentionGeometry geom;
  FeatureMap feature_map;
  bool normalize;
  double scale, eps;
  const void* decay;  // acc [H], or null for gamma = 1
  const void* q;      // [B, T, H, Dk], contiguous
  const void* k;      // [B, T, H, Dk]
  const void* v;      // [B, T, H, Dv]
  const void* state_in;  // acc S'_0, or null for zeros

  // forward
  void* o;          // [B, T, H, Dv]
  void* state_out;  // acc S'_T
  void* den;        // acc [B, H, T]: scale phi(q_i)^T z_i + eps

  // backward (reads q, k, v, state_in, o, den)
  const void* grad_o;      // [B, T, H, Dv], contiguous
  const void* grad_state;  // acc dL/dS'_T, or null for zero
  void* dq;                // [B, T, H, Dk]
  void* dk;                // [B, T, H, Dk]
  void* dv;                // [B, T, H, Dv]
  void* grad_state_in;     // acc dL/dS'_0
  void* workspace;         // linear_attention_workspace_bytes(geom, dtype) bytes
};

size_t linear_attention_workspace_bytes(const LinearAttentionGeometry& geom, DType dtype);
cudaError_t linear_attention_forward(const LinearAttentionArgs& args, DType dtype,
                                     cudaStream_t stream);
cudaError_t linear_attention_backward(const LinearAttentionArgs& args, DType dtype,
                                      cudaStream_t stream);

}  // namespace seqfuse::cuda
