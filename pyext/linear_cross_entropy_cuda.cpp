// linear_sparse_softmax_cross_entropy: the CUDA registration. Kernels:
// csrc/cuda/linear_cross_entropy.cu; the chunk products are ATen's (cuBLAS), the top-k
// ranking the sparse-softmax family's, the algorithm shared with the CPU registration
// (linear_cross_entropy.cpp).
#include <ATen/ATen.h>
#include <torch/library.h>

#include "../csrc/cuda/linear_cross_entropy.h"
#include "checks.h"
#include "cuda_utils.h"
#include "linear_cross_entropy.h"

namespace seqfuse {
namespace {

constexpr const char* kOp = "linear_sparse_softmax_cross_entropy";

void check_cuda_dtype(const at::Tensor& hidden) {
  TORCH_CHECK(hidden.scalar_type() != at::kDouble, kOp,
              ": hidden must be float32, float16 or bfloat16 on CUDA, got float64 (use the CPU "
              "kernels for float64)");
}

cuda::WeightRows shape_of(const at::Tensor& index, const at::Tensor& weight) {
  const cuda::WeightRows s{index.size(0), index.size(1), weight.size(0), weight.size(1)};
  TORCH_CHECK_VALUE(s.N * s.J < (int64_t(1) << 31), kOp,
                    ": N (k + 1) must be below 2^31 on CUDA, got ", s.N * s.J);
  return s;
}

void gather_weight_rows(const at::Tensor& coef, const at::Tensor& index, const at::Tensor& weight,
                        at::Tensor& out) {
  const DeviceGuard guard(weight.device());
  SEQFUSE_CUDA_CHECK(cuda::gather_weight_rows(
      coef.data_ptr<float>(), index.data_ptr<int64_t>(), weight.data_ptr(),
      shape_of(index, weight), out.data_ptr(), cuda_dtype(kOp, weight), current_stream()));
}

void scatter_weight_rows(const at::Tensor& sorted, const at::Tensor& order, const at::Tensor& coef,
                         const at::Tensor& hidden, int64_t J, at::Tensor& grad_weight,
                         at::Tensor& grad_bias) {
  const DeviceGuard guard(hidden.device());
  SEQFUSE_CUDA_CHECK(cuda::scatter_weight_rows(
      sorted.data_ptr<int64_t>(), order.data_ptr<int64_t>(), coef.data_ptr<float>(),
      hidden.data_ptr(), shape_of(coef, grad_weight), grad_weight.data_ptr(),
      grad_bias.data_ptr<float>(), cuda_dtype(kOp, hidden), current_stream()));
}

// 32M logits (128 MB in float32) per chunk: products large enough to fill the GPU.
const LinearCrossEntropyKernels kCudaKernels = {cuda_row_kernels, gather_weight_rows,
                                                scatter_weight_rows, int64_t(1) << 25,
                                                check_cuda_dtype};

}  // namespace

SEQFUSE_CUDA_LIBRARY_IMPL(m) { register_linear_cross_entropy<kCudaKernels>(m); }

}  // namespace seqfuse
