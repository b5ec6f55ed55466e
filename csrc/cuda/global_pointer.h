// CUDA GlobalPointer kernels (docs/global_pointer.md); the maths is stated in
// csrc/common/global_pointer.h. No torch header: pointers, sizes, DType and a stream.
#pragma once

#include <cstddef>
#include <cstdint>

#include "../common/global_pointer.h"
#include "launch.h"

namespace seqfuse::cuda {

// Pointers are to device memory; "acc" is the accumulation type (float for the half
// types, the element type otherwise); "elem" the element type of q.
struct GPArgs {
  GPGeometry geom;
  const void* q;                // elem [B, L, Hqk, D]
  const void* k;                // elem [B, L, Hqk, D]
  const uint8_t* mask;          // [B, L], or null
  const void* bias_start;       // acc [B, H, L], or null
  const void* bias_end;         // acc [B, H, L], or null
  const int64_t* positives;     // loss: [B, H, P] sorted ascending, -1 for none
  int64_t P;
  bool mask_zero;               // loss: flat index 0 (span (0, 0)) ignored entirely
  const void* grad;             // scores backward: elem [B, H, L, L]; loss backward: acc [B, H, 2]
  const void* terms;            // loss backward: acc [B, H, 2]
  void* out;                    // scores: elem [B, H, L, L]; loss: acc [B, H, 2]
  void* grad_q;                 // backward: acc [B, Hqk, L, D], zeroed
  void* grad_k;                 // backward: acc [B, Hqk, L, D], zeroed
  void* grad_bias_start;        // backward: acc [B, H, L], zeroed
  void* grad_bias_end;          // backward: acc [B, H, L], zeroed
  void* workspace;              // loss forward: global_pointer_workspace_bytes(geom, dtype)
};

size_t global_pointer_workspace_bytes(const GPGeometry& geom, DType dtype);
cudaError_t global_pointer_scores_forward(const GPArgs& args, DType dtype, cudaStream_t stream);
cudaError_t global_pointer_scores_backward(const GPArgs& args, DType dtype, cudaStream_t stream);
cudaError_t global_pointer_loss_forward(const GPArgs& args, DType dtype, cudaStream_t stream);
cudaError_t global_pointer_loss_backward(const GPArgs& args, DType dtype, cudaStream_t stream);

// x, out: elem [B, L, H, D]; positions: int64 [B, L], or null for 0..L-1.
cudaError_t rope(const void* x, const int64_t* positions, int64_t B, int64_t L, int64_t H,
                 int64_t D, double base, bool inverse, void* out, DType dtype,
                 cudaStream_t stream);

// Losses of R rows of N scores (elem); terms, grad_terms: acc [R, 2] (neg, pos),
// kept in the accumulation type: the backward divides by e^neg, e^pos.
// labels: elem [R, N]. positives: [R, P] sorted ascending, -1 for none.
struct RowLossArgs {
  int64_t R, N, P;
  const void* scores;
  const void* labels;
  const int64_t* positives;
  const void* grad_terms;
  const void* terms;  // backward input
  void* out;          // forward: terms; backward: elem [R, N] grad of the scores
  bool mask_zero;     // sparse: flat index 0 ignored as a positive and as a negative
};
cudaError_t mce_forward(const RowLossArgs& args, DType dtype, cudaStream_t stream);
cudaError_t mce_backward(const RowLossArgs& args, DType dtype, cudaStream_t stream);
cudaError_t sparse_mce_forward(const RowLossArgs& args, DType dtype, cudaStream_t stream);
cudaError_t sparse_mce_backward(const RowLossArgs& args, DType dtype, cudaStream_t stream);

}  // namespace seqfuse::cuda
