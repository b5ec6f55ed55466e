// CPU linear recurrence scan (docs/scan.md); the maths is stated in csrc/common/scan.h.
#pragma once

#include <ATen/core/Tensor.h>

#include "../common/scan.h"

namespace seqfuse::cpu {

// a: any tensor addressed through g's strides; b, h: contiguous [B, T, C];
// h0: contiguous [S, C] in the accumulation dtype (S = g.sequences()), or undefined for
// zeros.
void linear_scan_forward(const ScanGeometry& g, const at::Tensor& a, const at::Tensor& b,
                         const at::Tensor& h0, at::Tensor& h);

// grad_a: accumulation dtype, [B, T, C], or [S, 1, C] summed over each sequence's steps
// when a is time-invariant (g.a_sT == 0); grad_h0: [S, C] in the accumulation dtype.
void linear_scan_backward(const ScanGeometry& g, const at::Tensor& a, const at::Tensor& grad_h,
                          const at::Tensor& h, const at::Tensor& h0, at::Tensor& grad_b,
                          at::Tensor& grad_a, at::Tensor& grad_h0);

}  // namespace seqfuse::cpu
