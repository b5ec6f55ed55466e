// The row-wise normalisers: schemas, argument checks, shape handling, and the CPU
// registration. Kernels: csrc/cpu/sparse_softmax.cpp.
#include "sparse_softmax.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <vector>

#include "../csrc/cpu/sparse_softmax.h"
#include "checks.h"

namespace seqfuse {
namespace {

// A tensor seen as contiguous rows [R, V] along its last dim.
struct Rows {
  at::Tensor x;  // contiguous, [R, V]
  int64_t R, V;
  std::vector<int64_t> batch;  // the leading dims, whose product is R
};

Rows as_rows(const char* op, const char* name, const at::Tensor& x) {
  TORCH_CHECK_VALUE(x.dim() >= 1, op, ": ", name,
                    " must have at least one dimension (the one normalised), got a scalar");
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), op, ": ", name,
              " must be a floating point tensor, got ", x.scalar_type());
  Rows rows;
  rows.V = x.size(-1);
  rows.batch = x.sizes().vec();
  rows.batch.pop_back();
  rows.R = c10::multiply_integers(rows.batch);
  rows.x = x.contiguous().view({rows.R, rows.V});
  return rows;
}

at::Tensor like_rows(const char* op, const char* name, const at::Tensor& t, const Rows& rows,
                     const at::Tensor& like) {
  check_same_device(op, name, t, "the input", like);
  check_same_dtype(op, name, t, "the input", like);
  TORCH_CHECK_VALUE(t.dim() >= 1 && t.numel() == rows.R * rows.V && t.size(-1) == rows.V, op,
                    ": ", name, " must have the input's shape ", shape_str(like), ", got ",
                    shape_str(t));
  return t.contiguous().view({rows.R, rows.V});
}

std::vector<int64_t> with_last(const std::vector<int64_t>& batch, int64_t last) {
  std::vector<int64_t> shape = batch;
  shape.push_back(last);
  return shape;
}

void check_k(const char* op, int64_t k) {
  TORCH_CHECK_VALUE(k >= 1, op, ": k must be a positive int (the number of entries kept per ",
                    "row), got ", k);
}

void check_taylor_order(const char* op, int64_t order) {
  TORCH_CHECK_VALUE(order >= 2 && order % 2 == 0 && order <= 64, op,
                    ": order must be an even int in [2, 64] (f_n is positive only for even n), "
                    "got ", order);
}

void check_iters(const char* op, int64_t iters) {
  TORCH_CHECK_VALUE(iters >= 0 && iters <= 1000, op, ": iters must be in [0, 1000], got ", iters);
}

at::Tensor check_cross_entropy(const char* op, const at::Tensor& logits, const at::Tensor& target,
                               int64_t ignore_index) {
  check_dim(op, "logits", logits, 2, "[N, V]");
  TORCH_CHECK(at::isFloatingType(logits.scalar_type()), op,
              ": logits must be a floating point tensor, got ", logits.scalar_type());
  check_class_target(op, target, logits.size(1), ignore_index, "logits", logits);
  return target.contiguous();
}

// indices: int64 [rows, cols] with entries in [0, V), as a forward produced them (one
// reduction, a synchronisation on CUDA): the backward kernels write through them.
void check_indices(const char* op, const at::Tensor& indices, int64_t rows, int64_t cols,
                   int64_t V) {
  TORCH_CHECK_VALUE(indices.scalar_type() == at::kLong && indices.dim() == 2 &&
                        indices.size(0) == rows && indices.size(1) == cols,
                    op, ": indices must be int64 [", rows, ", ", cols, "], got ",
                    indices.scalar_type(), " ", shape_str(indices));
  if (indices.numel() > 0) {
    TORCH_CHECK_VALUE(indices.min().item<int64_t>() >= 0 && indices.max().item<int64_t>() < V,
                      op, ": indices must lie in [0, ", V, ")");
  }
}

// A per-row tensor ([N] grad_loss, [N, 2] lse) in the accumulation dtype, contiguous.
at::Tensor per_row(const char* op, const char* name, const at::Tensor& t, int64_t N,
                   int64_t width, const at::Tensor& logits) {
  check_same_device(op, name, t, "logits", logits);
  const bool shaped = width == 1 ? t.dim() == 1 && t.size(0) == N
                                 : t.dim() == 2 && t.size(0) == N && t.size(1) == width;
  TORCH_CHECK_VALUE(shaped && at::isFloatingType(t.scalar_type()), op, ": ", name,
                    " must be a floating point [N", width == 1 ? "" : ", 2", "] with N = ", N,
                    ", got ", t.scalar_type(), " ", shape_str(t));
  return t.to(acc_dtype(logits.scalar_type())).contiguous();
}

at::Tensor entropy_targets(const char* op, const at::Tensor& target, const Rows& rows,
                           const at::Tensor& p) {
  check_same_device(op, "target_entropy", target, "p", p);
  TORCH_CHECK(at::isFloatingType(target.scalar_type()), op,
              ": target_entropy must be a floating point tensor, got ", target.scalar_type());
  TORCH_CHECK_VALUE(target.sizes().vec() == rows.batch, op,
                    ": target_entropy must be p's shape without the normalised dim, ",
                    c10::IntArrayRef(rows.batch), ", got ", shape_str(target));
  return target.to(acc_dtype(p.scalar_type())).contiguous().view({rows.R});
}

}  // namespace

at::Tensor sparse_softmax_impl(const RowKernels& kernels, const at::Tensor& x, int64_t k) {
  check_k("sparse_softmax", k);
  const Rows rows = as_rows("sparse_softmax", "x", x);
  at::Tensor out = at::empty_like(rows.x);
  if (out.numel() > 0) kernels.sparse_softmax_forward(rows.x, k, out);
  return out.view(x.sizes());
}

at::Tensor sparse_softmax_backward_impl(const RowKernels& kernels, const at::Tensor& grad,
                                        const at::Tensor& probs) {
  const Rows rows = as_rows("sparse_softmax_backward", "probs", probs);
  const at::Tensor g = like_rows("sparse_softmax_backward", "grad", grad, rows, probs);
  at::Tensor grad_x = at::empty_like(rows.x);
  if (grad_x.numel() > 0) kernels.sparse_softmax_backward(g, rows.x, grad_x);
  return grad_x.view(probs.sizes());
}

std::tuple<at::Tensor, at::Tensor> topk_softmax_impl(const RowKernels& kernels,
                                                     const at::Tensor& x, int64_t k) {
  check_k("topk_softmax", k);
  const Rows rows = as_rows("topk_softmax", "x", x);
  const int64_t kk = std::min(k, rows.V);
  at::Tensor probs = at::empty({rows.R, kk}, x.options());
  at::Tensor indices = at::empty({rows.R, kk}, x.options().dtype(at::kLong));
  if (probs.numel() > 0) kernels.topk_softmax_forward(rows.x, probs, indices);
  const auto shape = with_last(rows.batch, kk);
  return {probs.view(shape), indices.view(shape)};
}

at::Tensor topk_softmax_backward_impl(const RowKernels& kernels, const at::Tensor& grad,
                                      const at::Tensor& probs, const at::Tensor& indices,
                                      int64_t V) {
  const char* op = "topk_softmax_backward";
  const Rows rows = as_rows(op, "probs", probs);
  const at::Tensor g = like_rows(op, "grad", grad, rows, probs);
  TORCH_CHECK_VALUE(V >= rows.V, op, ": V (", V, ") must be at least k (", rows.V, ")");
  check_same_device(op, "indices", indices, "probs", probs);
  TORCH_CHECK_VALUE(indices.sizes() == probs.sizes(), op, ": indices must have probs' shape ",
                    shape_str(probs), ", got ", shape_str(indices));
  const at::Tensor idx = indices.contiguous().view({rows.R, rows.V});
  check_indices(op, idx, rows.R, rows.V, V);
  at::Tensor grad_x = at::empty({rows.R, V}, probs.options());
  if (grad_x.numel() > 0) kernels.topk_softmax_backward(g, rows.x, idx, grad_x);
  return grad_x.view(with_last(rows.batch, V));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sparse_softmax_cross_entropy_impl(
    const RowKernels& kernels, const at::Tensor& logits, const at::Tensor& target, int64_t k,
    int64_t ignore_index) {
  const char* op = "sparse_softmax_cross_entropy";
  check_k(op, k);
  const at::Tensor t = check_cross_entropy(op, logits, target, ignore_index);
  const at::Tensor s = logits.contiguous();
  const int64_t N = s.size(0), V = s.size(1);
  const auto acc = s.options().dtype(acc_dtype(s.scalar_type()));
  at::Tensor loss = at::empty({N}, acc);
  at::Tensor lse = at::empty({N, 2}, acc);  // (m, log s): csrc/common/row_softmax.h
  at::Tensor indices = at::empty({N, k < V ? k : 0}, s.options().dtype(at::kLong));
  if (V == 0) {  // every target is then ignore_index
    loss.zero_();
    lse.fill_(-std::numeric_limits<double>::infinity());
  } else if (N > 0) {
    kernels.cross_entropy_forward(s, t, k, ignore_index, loss, lse, indices);
  }
  return {loss, lse, indices};
}

at::Tensor sparse_softmax_cross_entropy_backward_impl(
    const RowKernels& kernels, const at::Tensor& grad_loss, const at::Tensor& logits,
    const at::Tensor& target, const at::Tensor& lse, const at::Tensor& indices,
    int64_t ignore_index) {
  const char* op = "sparse_softmax_cross_entropy_backward";
  const at::Tensor t = check_cross_entropy(op, logits, target, ignore_index);
  const at::Tensor s = logits.contiguous();
  const int64_t N = s.size(0), V = s.size(1);
  const at::Tensor gl = per_row(op, "grad_loss", grad_loss, N, 1, s);
  const at::Tensor l = per_row(op, "lse", lse, N, 2, s);
  check_same_device(op, "indices", indices, "logits", logits);
  TORCH_CHECK_VALUE(indices.dim() == 2 && indices.size(1) < std::max<int64_t>(V, 1), op,
                    ": indices must be [N, k] with k < V (or [N, 0] for k >= V), got ",
                    shape_str(indices));
  const at::Tensor idx = indices.contiguous();
  check_indices(op, idx, N, indices.size(1), V);
  at::Tensor grad = at::empty_like(s);
  if (grad.numel() > 0) kernels.cross_entropy_backward(gl, s, t, l, idx, ignore_index, grad);
  return grad;
}

at::Tensor taylor_softmax_impl(const RowKernels& kernels, const at::Tensor& x, int64_t order) {
  check_taylor_order("taylor_softmax", order);
  const Rows rows = as_rows("taylor_softmax", "x", x);
  at::Tensor out = at::empty_like(rows.x);
  if (out.numel() > 0) kernels.taylor_softmax_forward(rows.x, order, out);
  return out.view(x.sizes());
}

at::Tensor taylor_softmax_backward_impl(const RowKernels& kernels, const at::Tensor& grad,
                                        const at::Tensor& x, const at::Tensor& out,
                                        int64_t order) {
  const char* op = "taylor_softmax_backward";
  check_taylor_order(op, order);
  const Rows rows = as_rows(op, "x", x);
  const at::Tensor g = like_rows(op, "grad", grad, rows, x);
  const at::Tensor o = like_rows(op, "out", out, rows, x);
  at::Tensor grad_x = at::empty_like(rows.x);
  if (grad_x.numel() > 0) kernels.taylor_softmax_backward(g, rows.x, o, order, grad_x);
  return grad_x.view(x.sizes());
}

at::Tensor entropy_normalize_impl(const RowKernels& kernels, const at::Tensor& p,
                                  const at::Tensor& target_entropy, int64_t iters) {
  const char* op = "entropy_normalize";
  check_iters(op, iters);
  const Rows rows = as_rows(op, "p", p);
  const at::Tensor target = entropy_targets(op, target_entropy, rows, p);
  at::Tensor out = at::empty_like(rows.x);
  if (out.numel() > 0) kernels.entropy_normalize_forward(rows.x, target, iters, out);
  return out.view(p.sizes());
}

std::tuple<at::Tensor, at::Tensor> entropy_normalize_backward_impl(
    const RowKernels& kernels, const at::Tensor& grad, const at::Tensor& p,
    const at::Tensor& target_entropy, int64_t iters) {
  const char* op = "entropy_normalize_backward";
  check_iters(op, iters);
  const Rows rows = as_rows(op, "p", p);
  const at::Tensor g = like_rows(op, "grad", grad, rows, p);
  const at::Tensor target = entropy_targets(op, target_entropy, rows, p);
  at::Tensor grad_p = at::empty_like(rows.x);
  at::Tensor grad_target = at::zeros_like(target);
  if (grad_p.numel() > 0) {
    kernels.entropy_normalize_backward(g, rows.x, target, iters, grad_p, grad_target);
  }
  return {grad_p.view(p.sizes()),
          grad_target.view(target_entropy.sizes()).to(target_entropy.scalar_type())};
}

TORCH_LIBRARY_FRAGMENT(seqfuse, m) {
  m.def("sparse_softmax(Tensor x, int k) -> Tensor");
  m.def("sparse_softmax_backward(Tensor grad, Tensor probs) -> Tensor");
  m.def("topk_softmax(Tensor x, int k) -> (Tensor, Tensor)");
  m.def("topk_softmax_backward(Tensor grad, Tensor probs, Tensor indices, SymInt V) -> Tensor");
  m.def(
      "sparse_softmax_cross_entropy(Tensor logits, Tensor target, int k, int ignore_index) "
      "-> (Tensor, Tensor, Tensor)");
  m.def(
      "sparse_softmax_cross_entropy_backward(Tensor grad_loss, Tensor logits, Tensor target, "
      "Tensor lse, Tensor indices, int ignore_index) -> Tensor");
  m.def("taylor_softmax(Tensor x, int order) -> Tensor");
  m.def("taylor_softmax_backward(Tensor grad, Tensor x, Tensor out, int order) -> Tensor");
  m.def("entropy_normalize(Tensor p, Tensor target_entropy, int iters) -> Tensor");
  m.def(
      "entropy_normalize_backward(Tensor grad, Tensor p, Tensor target_entropy, int iters) "
      "-> (Tensor, Tensor)");
}

namespace {

const RowKernels kCpuKernels = {
    cpu::sparse_softmax_forward,  cpu::sparse_softmax_backward, cpu::topk_softmax_forward,
    cpu::topk_softmax_backward,   cpu::cross_entropy_forward,   cpu::cross_entropy_backward,
    cpu::taylor_softmax_forward,  cpu::taylor_softmax_backward, cpu::entropy_normalize_forward,
    cpu::entropy_normalize_backward,
};

}  // namespace

const RowKernels& cpu_row_kernels() { return kCpuKernels; }

TORCH_LIBRARY_IMPL(seqfuse, CPU, m) {
  m.impl("sparse_softmax",
         [](const at::Tensor& x, int64_t k) { return sparse_softmax_impl(kCpuKernels, x, k); });
  m.impl("sparse_softmax_backward", [](const at::Tensor& grad, const at::Tensor& probs) {
    return sparse_softmax_backward_impl(kCpuKernels, grad, probs);
  });
  m.impl("topk_softmax",
         [](const at::Tensor& x, int64_t k) { return topk_softmax_impl(kCpuKernels, x, k); });
  m.impl("topk_softmax_backward", [](const at::Tensor& grad, const at::Tensor& probs,
                                     const at::Tensor& indices, int64_t V) {
    return topk_softmax_backward_impl(kCpuKernels, grad, probs, indices, V);
  });
  m.impl("sparse_softmax_cross_entropy", [](const at::Tensor& logits, const at::Tensor& target,
                                            int64_t k, int64_t ignore_index) {
    return sparse_softmax_cross_entropy_impl(kCpuKernels, logits, target, k, ignore_index);
  });
  m.impl("sparse_softmax_cross_entropy_backward",
         [](const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& target,
            const at::Tensor& lse, const at::Tensor& indices, int64_t ignore_index) {
           return sparse_softmax_cross_entropy_backward_impl(kCpuKernels, grad_loss, logits,
                                                             target, lse, indices, ignore_index);
         });
  m.impl("taylor_softmax", [](const at::Tensor& x, int64_t order) {
    return taylor_softmax_impl(kCpuKernels, x, order);
  });
  m.impl("taylor_softmax_backward", [](const at::Tensor& grad, const at::Tensor& x,
                                       const at::Tensor& out, int64_t order) {
    return taylor_softmax_backward_impl(kCpuKernels, grad, x, out, order);
  });
  m.impl("entropy_normalize", [](const at::Tensor& p, const at::Tensor& target, int64_t iters) {
    return entropy_normalize_impl(kCpuKernels, p, target, iters);
  });
  m.impl("entropy_normalize_backward", [](const at::Tensor& grad, const at::Tensor& p,
                                          const at::Tensor& target, int64_t iters) {
    return entropy_normalize_backward_impl(kCpuKernels, grad, p, target, iters);
  });
}

}  // namespace seqfuse
