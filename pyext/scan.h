// Argument handling of linear_scan shared by the CPU and CUDA registrations.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

#include "../csrc/common/scan.h"

namespace seqfuse {

// Checked and normalised inputs: b contiguous, a broadcast to b's shape through
// strides (channel stride 0 or 1), h0 contiguous in the accumulation dtype.
// With cu_seqlens, its int64 copy (geom.cu_seqlens points into it), and h0 is [N, C];
// on_cpu: for the CPU kernels (the offsets' values are checked here, see checks.h).
struct ScanInputs {
  at::Tensor a, b, h0, cu_seqlens;
  ScanGeometry geom;
};

ScanInputs prepare_scan(const char* op, const at::Tensor& a, const at::Tensor& b,
                        const std::optional<at::Tensor>& h0, bool reverse,
                        const std::optional<at::Tensor>& cu_seqlens, bool on_cpu);

// Outputs of the backward before reduction; `finish_scan_backward` sums grad_a over
// a's broadcast dimensions and casts each gradient to its input's dtype.
std::tuple<at::Tensor, at::Tensor, at::Tensor> finish_scan_backward(
    const at::Tensor& a, const std::optional<at::Tensor>& h0, const at::Tensor& grad_a_acc,
    const at::Tensor& grad_b, const at::Tensor& grad_h0_acc);

}  // namespace seqfuse
