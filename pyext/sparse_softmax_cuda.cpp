// The row-wise normalisers: the CUDA registration. Kernels: csrc/cuda/sparse_softmax.cu.
// Argument checks and shapes are shared with the CPU registration (sparse_softmax.cpp);
// the functions here only turn checked, contiguous tensors into kernel launches.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "../csrc/cuda/sparse_softmax.h"
#include "checks.h"
#include "cuda_utils.h"
#include "sparse_softmax.h"

namespace seqfuse {
namespace {

// float32, float16 or bfloat16; float64 has no CUDA kernels here.
cuda::DType row_dtype(const at::Tensor& t) {
  TORCH_CHECK(t.scalar_type() != at::kDouble,
              "seqfuse: the sparse softmax family runs float32, float16 and bfloat16 on CUDA; "
              "got float64 (use the CPU kernels for float64)");
  return cuda_dtype("sparse softmax", t);
}

cuda::RowShape shape_of(const at::Tensor& rows) {
  TORCH_CHECK_VALUE(rows.size(0) < (int64_t(1) << 31) && rows.size(1) <= INT32_MAX,
                    "seqfuse: CUDA rows must number below 2^31 and hold at most 2^31 - 1 "
                    "entries, got ", shape_str(rows));
  return {rows.size(0), rows.size(1)};
}

template <typename T>
T* mut(at::Tensor& t) {
  return static_cast<T*>(t.data_ptr());
}
template <typename T>
const T* ro(const at::Tensor& t) {
  return static_cast<const T*>(t.data_ptr());
}

void sparse_softmax_forward(const at::Tensor& x, int64_t k, at::Tensor& out) {
  const DeviceGuard guard(x.device());
  SEQFUSE_CUDA_CHECK(cuda::sparse_softmax_forward(x.data_ptr(), shape_of(x), k, out.data_ptr(),
                                              row_dtype(x), current_stream()));
}

void sparse_softmax_backward(const at::Tensor& grad, const at::Tensor& probs, at::Tensor& grad_x) {
  const DeviceGuard guard(probs.device());
  SEQFUSE_CUDA_CHECK(cuda::sparse_softmax_backward(grad.data_ptr(), probs.data_ptr(), shape_of(probs),
                                               grad_x.data_ptr(), row_dtype(probs),
                                               current_stream()));
}

void topk_softmax_forward(const at::Tensor& x, at::Tensor& probs, at::Tensor& indices) {
  const DeviceGuard guard(x.device());
  const int64_t kk = probs.size(1);
  SEQFUSE_CUDA_CHECK(cuda::topk_softmax_forward(x.data_ptr(), shape_of(x), kk, probs.data_ptr(),
                                            mut<int64_t>(indices), row_dtype(x),
                                            current_stream()));
  if (kk > cuda::kTopKSortedMax) {
    // Long lists come back in any order: best first, ties to the lower index, is a
    // sort by index followed by a stable sort by value.
    const auto [by_index, index_order] = indices.sort(1);
    const auto [unused, value_order] =
        x.gather(1, by_index).sort(/*stable=*/true, /*dim=*/1, /*descending=*/true);
    indices.copy_(by_index.gather(1, value_order));
    probs.copy_(probs.gather(1, index_order).gather(1, value_order));
  }
}

void topk_softmax_backward(const at::Tensor& grad, const at::Tensor& probs,
                           const at::Tensor& indices, at::Tensor& grad_x) {
  const DeviceGuard guard(probs.device());
  SEQFUSE_CUDA_CHECK(cuda::topk_softmax_backward(grad.data_ptr(), probs.data_ptr(),
                                             ro<int64_t>(indices), shape_of(grad_x),
                                             probs.size(1), grad_x.data_ptr(), row_dtype(probs),
                                             current_stream()));
}

void cross_entropy_forward(const at::Tensor& logits, const at::Tensor& target, int64_t k,
                           int64_t ignore_index, at::Tensor& loss, at::Tensor& lse,
                           at::Tensor& indices) {
  const DeviceGuard guard(logits.device());
  SEQFUSE_CUDA_CHECK(cuda::cross_entropy_forward(
      logits.data_ptr(), ro<int64_t>(target), shape_of(logits), k, ignore_index, mut<float>(loss),
      mut<float>(lse), indices.numel() > 0 ? mut<int64_t>(indices) : nullptr, row_dtype(logits),
      current_stream()));
}

void cross_entropy_backward(const at::Tensor& grad_loss, const at::Tensor& logits,
                            const at::Tensor& target, const at::Tensor& lse,
                            const at::Tensor& indices, int64_t ignore_index,
                            at::Tensor& grad_logits) {
  const DeviceGuard guard(logits.device());
  SEQFUSE_CUDA_CHECK(cuda::cross_entropy_backward(
      ro<float>(grad_loss), logits.data_ptr(), ro<int64_t>(target), ro<float>(lse),
      indices.numel() > 0 ? ro<int64_t>(indices) : nullptr, shape_of(logits), indices.size(1),
      ignore_index, grad_logits.data_ptr(), row_dtype(logits), current_stream()));
}

void taylor_softmax_forward(const at::Tensor& x, int64_t order, at::Tensor& out) {
  const DeviceGuard guard(x.device());
  SEQFUSE_CUDA_CHECK(cuda::taylor_softmax_forward(x.data_ptr(), shape_of(x), int(order),
                                              out.data_ptr(), row_dtype(x), current_stream()));
}

void taylor_softmax_backward(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& out,
                             int64_t order, at::Tensor& grad_x) {
  const DeviceGuard guard(x.device());
  SEQFUSE_CUDA_CHECK(cuda::taylor_softmax_backward(grad.data_ptr(), x.data_ptr(), out.data_ptr(),
                                               shape_of(x), int(order), grad_x.data_ptr(),
                                               row_dtype(x), current_stream()));
}

void entropy_normalize_forward(const at::Tensor& p, const at::Tensor& target, int64_t iters,
                               at::Tensor& out) {
  const DeviceGuard guard(p.device());
  SEQFUSE_CUDA_CHECK(cuda::entropy_normalize_forward(p.data_ptr(), ro<float>(target), shape_of(p),
                                                 int(iters), out.data_ptr(), row_dtype(p),
                                                 current_stream()));
}

void entropy_normalize_backward(const at::Tensor& grad, const at::Tensor& p,
                                const at::Tensor& target, int64_t iters, at::Tensor& grad_p,
                                at::Tensor& grad_target) {
  const DeviceGuard guard(p.device());
  const cuda::RowShape s = shape_of(p);
  const auto bytes = int64_t(cuda::entropy_backward_workspace_bytes(s, int(iters)));
  at::Tensor workspace = at::empty({bytes}, p.options().dtype(at::kByte));
  SEQFUSE_CUDA_CHECK(cuda::entropy_normalize_backward(
      grad.data_ptr(), p.data_ptr(), ro<float>(target), s, int(iters), grad_p.data_ptr(),
      mut<float>(grad_target), workspace.data_ptr(), row_dtype(p), current_stream()));
}

const RowKernels kCudaKernels = {
    sparse_softmax_forward,  sparse_softmax_backward, topk_softmax_forward,
    topk_softmax_backward,   cross_entropy_forward,   cross_entropy_backward,
    taylor_softmax_forward,  taylor_softmax_backward, entropy_normalize_forward,
    entropy_normalize_backward,
};

}  // namespace

const RowKernels& cuda_row_kernels() { return kCudaKernels; }

SEQFUSE_CUDA_LIBRARY_IMPL(m) {
  m.impl("sparse_softmax",
         [](const at::Tensor& x, int64_t k) { return sparse_softmax_impl(kCudaKernels, x, k); });
  m.impl("sparse_softmax_backward", [](const at::Tensor& grad, const at::Tensor& probs) {
    return sparse_softmax_backward_impl(kCudaKernels, grad, probs);
  });
  m.impl("topk_softmax",
         [](const at::Tensor& x, int64_t k) { return topk_softmax_impl(kCudaKernels, x, k); });
  m.impl("topk_softmax_backward", [](const at::Tensor& grad, const at::Tensor& probs,
                                     const at::Tensor& indices, int64_t V) {
    return topk_softmax_backward_impl(kCudaKernels, grad, probs, indices, V);
  });
  m.impl("sparse_softmax_cross_entropy", [](const at::Tensor& logits, const at::Tensor& target,
                                            int64_t k, int64_t ignore_index) {
    return sparse_softmax_cross_entropy_impl(kCudaKernels, logits, target, k, ignore_index);
  });
  m.impl("sparse_softmax_cross_entropy_backward",
         [](const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& target,
            const at::Tensor& lse, const at::Tensor& indices, int64_t ignore_index) {
           return sparse_softmax_cross_entropy_backward_impl(kCudaKernels, grad_loss, logits,
                                                             target, lse, indices, ignore_index);
         });
  m.impl("taylor_softmax", [](const at::Tensor& x, int64_t order) {
    return taylor_softmax_impl(kCudaKernels, x, order);
  });
  m.impl("taylor_softmax_backward", [](const at::Tensor& grad, const at::Tensor& x,
                                       const at::Tensor& out, int64_t order) {
    return taylor_softmax_backward_impl(kCudaKernels, grad, x, out, order);
  });
  m.impl("entropy_normalize", [](const at::Tensor& p, const at::Tensor& target, int64_t iters) {
    return entropy_normalize_impl(kCudaKernels, p, target, iters);
  });
  m.impl("entropy_normalize_backward", [](const at::Tensor& grad, const at::Tensor& p,
                                          const at::Tensor& target, int64_t iters) {
    return entropy_normalize_backward_impl(kCudaKernels, grad, p, target, iters);
  });
}

}  // namespace seqfuse
