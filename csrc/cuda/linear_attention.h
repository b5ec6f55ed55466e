// CUDA causal linear attention (docs/linear_attention.md); the maths is stated in
// csrc/common/linear_attention.h.
#pragma once

#include <cstddef>
#include <cstdint>

#include "../common/linear_attention.h"
#include "launch.h"

namespace seqfuse::cuda {

// Pointers are to device memory. "acc" is the accumulation type: float for the half
// types and float32, double for float64. A state is passed as its two tensors, S
// (acc [B, H, Dk, Dv]) and z (acc [B, H, Dk]), each read or written in place by the
// kernels (no joined copy per call); the kernels treat them as one S' = [S, z].
// decay is not range-checked on the host (that would synchronise every call): a
// factor outside (0, 1] makes the kernels produce NaN for that head. With packed
// sequences (geom.cu_seqlens, device memory) states are per (sequence, head), [N, H,
// ...], and `invalid` points to a zeroed int: the offsets are validated on the device
// first (seqlens.cuh) and invalid ones make every output NaN.
struct LinearAttentionArgs {
  LinearAttentionGeometry geom;
  FeatureMap feature_map;
  bool normalize;
  double scale, eps;
  const void* decay;  // acc [H], or null for gamma = 1
  const void* q;      // [B, T, H, Dk], contiguous
  const void* k;      // [B, T, H, Dk]
  const void* v;      // [B, T, H, Dv]
  const void* S_in;  // acc S_0, or null for zeros
  const void* z_in;  // acc z_0, or null for zeros
  int* invalid;      // packed sequences: a zeroed int (see above); else null

  // forward
  void* o;          // [B, T, H, Dv]
  void* S_out;      // acc S_T
  void* z_out;      // acc z_T
  void* den;        // acc [B, H, T]: scale phi(q_i)^T z_i + eps

  // backward (reads q, k, v, S_in, z_in, o, den)
  const void* grad_o;  // [B, T, H, Dv], contiguous
  const void* grad_S;  // acc dL/dS_T, or null for zero
  const void* grad_z;  // acc dL/dz_T, or null for zero
  void* dq;                // [B, T, H, Dk]
  void* dk;                // [B, T, H, Dk]
  void* dv;                // [B, T, H, Dv]
  void* grad_S_in;         // acc dL/dS_0
  void* grad_z_in;         // acc dL/dz_0
  void* workspace;         // linear_attention_workspace_bytes(geom, dtype) bytes
};

size_t linear_attention_workspace_bytes(const LinearAttentionGeometry& geom, DType dtype);
cudaError_t linear_attention_forward(const LinearAttentionArgs& args, DType dtype,
                                     cudaStream_t stream);
cudaError_t linear_attention_backward(const LinearAttentionArgs& args, DType dtype,
                                      cudaStream_t stream);

}  // namespace seqfuse::cuda
