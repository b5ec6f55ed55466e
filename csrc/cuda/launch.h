// What the torch bindings need to launch a seqfuse CUDA kernel, with no torch or
// device code: the element types, and the stream every launch runs on.
#pragma once

#include <cuda_runtime_api.h>

namespace seqfuse::cuda {

enum class DType { Float32, Float64, Float16, BFloat16, Complex64 };

}  // namespace seqfuse::cuda
