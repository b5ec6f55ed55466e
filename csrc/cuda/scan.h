// CUDA linear recurrence scan (docs/scan.md); the maths is stated in csrc/common/scan.h.
#pragma once

#include <cstddef>
#include <cstdint>

#include "../common/scan.h"
#include "launch.h"

namespace seqfuse::cuda {

// Pointers are to device memory. "acc" means the accumulation type: float for the
// half types, the element type otherwise.
struct ScanArgs {
  ScanGeometry geom;
  const void* a;   // addressed through geom's strides
  const void* b;   // forward: b; backward: dL/dh. Contiguous [B, T, C]
  const void* h;   // backward: the forward's output
  const void* h0;  // acc [S, C] (S = geom.sequences()), or null for zeros
  void* out;       // forward: h; backward: dL/db. Contiguous [B, T, C]
  void* grad_a;    // backward: acc [B, T, C], or [B, scan_chunks(T), C] when geom.a_sT == 0
  void* grad_h0;   // backward: acc [S, C], zeroed (an empty sequence's stays 0)
  void* workspace;  // scan_workspace_bytes(geom, dtype) bytes, any contents
};

int64_t scan_chunks(int64_t T);
size_t scan_workspace_bytes(const ScanGeometry& geom, DType dtype);
cudaError_t linear_scan_forward(const ScanArgs& args, DType dtype, cudaStream_t stream);
cudaError_t linear_scan_backward(const ScanArgs& args, DType dtype, cudaStream_t stream);

}  // namespace seqfuse::cuda
