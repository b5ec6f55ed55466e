// CPU GlobalPointer kernels (docs/global_pointer.md); the maths is stated in
// csrc/common/global_pointer.h. float32 and float64; every buffer is contiguous.
#pragma once

#include <ATen/core/Tensor.h>

#include "../common/global_pointer.h"

namespace seqfuse::cpu {

// x, out: [B, L, H, D]; positions: int64 [B, L], or undefined for 0..L-1.
void rope(const at::Tensor& x, const at::Tensor& positions, double base, bool inverse,
          at::Tensor& out);

// mask: uint8 [B, L] or undefined; bias_start, bias_end: [B, H, L] or undefined.
void global_pointer_scores_forward(const GPGeometry& g, const at::Tensor& q, const at::Tensor& k,
                                   const at::Tensor& mask, const at::Tensor& bias_start,
                                   const at::Tensor& bias_end, at::Tensor& scores);

// grad_q, grad_k: [B, H, L, D] per output head (summed by the caller when q and k are
// shared); grad_bias_start, grad_bias_end: [B, H, L].
void global_pointer_scores_backward(const GPGeometry& g, const at::Tensor& grad,
                                    const at::Tensor& q, const at::Tensor& k,
                                    const at::Tensor& mask, at::Tensor& grad_q,
                                    at::Tensor& grad_k, at::Tensor& grad_bias_start,
                                    at::Tensor& grad_bias_end);

// Rows of N scores; terms: [R, 2] = (neg, pos). labels: [R, N] in [0, 1].
void mce_forward(const at::Tensor& scores, const at::Tensor& labels, at::Tensor& terms);
void mce_backward(const at::Tensor& grad_terms, const at::Tensor& terms, const at::Tensor& scores,
                  const at::Tensor& labels, at::Tensor& grad_scores);

// pos_index: int64 [R, P], entries in [0, N) (0 is padding when mask_zero).
void sparse_mce_forward(const at::Tensor& scores, const at::Tensor& pos_index, bool mask_zero,
                        at::Tensor& terms);
void sparse_mce_backward(const at::Tensor& grad_terms, const at::Tensor& terms,
                         const at::Tensor& scores, const at::Tensor& pos_index, bool mask_zero,
                         at::Tensor& grad_scores);

// The sparse terms of every (b, h) row of the scores, computed from q and k tile by
// tile: terms [B, H, 2]; pos_index int64 [B, H, P] of flat indices i * L + j.
void global_pointer_loss_forward(const GPGeometry& g, const at::Tensor& q, const at::Tensor& k,
                                 const at::Tensor& mask, const at::Tensor& bias_start,
                                 const at::Tensor& bias_end, const at::Tensor& pos_index,
                                 bool mask_zero, at::Tensor& terms);
// Gradients laid out as in global_pointer_scores_backward.
void global_pointer_loss_backward(const GPGeometry& g, const at::Tensor& grad_terms,
                                  const at::Tensor& terms, const at::Tensor& q,
                                  const at::Tensor& k, const at::Tensor& mask,
                                  const at::Tensor& bias_start, const at::Tensor& bias_end,
                                  const at::Tensor& pos_index, bool mask_zero,
                                  at::Tensor& grad_q, at::Tensor& grad_k,
                                  at::Tensor& grad_bias_start, at::Tensor& grad_bias_end);

}  // namespace seqfuse::cpu
