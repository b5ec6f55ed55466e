// Helpers for the CUDA registrations: the kernel-side dtype of a tensor, its data or
// null, the device guard, the current stream, launch error checking and the
// registration macro (the emulated device of the tests swaps the last four).
#pragma once

#include <ATen/core/Tensor.h>

#include "../csrc/cuda/launch.h"

#ifdef SEQFUSE_EMULATED
// The emulated device of the tests (tests/emulator): the same binding code, built
// against a CPU torch, with no streams or devices to guard. Each binding file's
// registrations are collected here, and the emulator installs them on the CPU key of
// torch.ops.seqfuse while a test enables it.
#include <torch/library.h>

namespace seqfuse {
struct DeviceGuard {
  explicit DeviceGuard(const c10::Device&) {}
};
inline cudaStream_t current_stream() { return nullptr; }
inline void check_cuda(cudaError_t err, const char* expr) {
  TORCH_CHECK(err == cudaSuccess, "CUDA error: ", cudaGetErrorString(err), " (from ", expr, ")");
}
namespace emu {
struct Registration {
  explicit Registration(void (*add)(torch::Library&));
};
}  // namespace emu
}  // namespace seqfuse

#define SEQFUSE_CUDA_CHECK(expr) ::seqfuse::check_cuda((expr), #expr)
#define SEQFUSE_CUDA_LIBRARY_IMPL(m)                                              \
  static void seqfuse_emulated_impl(torch::Library& m);                           \
  static const ::seqfuse::emu::Registration seqfuse_emulated_registration(        \
      &seqfuse_emulated_impl);                                                     \
  static void seqfuse_emulated_impl(torch::Library& m)
#else
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

namespace seqfuse {
using DeviceGuard = c10::cuda::CUDAGuard;
inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream(); }
}  // namespace seqfuse

#define SEQFUSE_CUDA_CHECK(expr) C10_CUDA_CHECK(expr)
#define SEQFUSE_CUDA_LIBRARY_IMPL(m) TORCH_LIBRARY_IMPL(seqfuse, CUDA, m)
#endif

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

}  // namespace seqfuse
