// Helpers for the CUDA registrations: the kernel-side dtype of a tensor, its data or
// null, the current stream, and launch error checking.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "../csrc/cuda/launch.h"

namespace seqfuse {

inline cuda::DType cuda_dtype(const char* op, const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return cuda::DType::Float32;
    case at::kDouble: return cuda::DType::Float64;
    case at::kHalf: return cuda::DType::Float16;
    case at::kBFloat16: return cuda::DType::BFloat16;
    case at::kComplexFloat: return cuda::DType::Complex64;
    default: TORCH_CHECK(false, op, ": dtype ", t.scalar_type(), " is not supported on CUDA");
  }
}

// t's data, or null for an undefined tensor (an optional input that is absent).
template <typename T = void>
T* data_or_null(const at::Tensor& t) {
  return t.defined() ? static_cast<T*>(t.data_ptr()) : nullptr;
}

inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream(); }

}  // namespace seqfuse
