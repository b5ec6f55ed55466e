// GlobalPointer ops: the CUDA registration. Kernels: csrc/cuda/global_pointer.cu.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "../csrc/cuda/global_pointer.h"
#include "checks.h"
#include "cuda_utils.h"
#include "global_pointer.h"

namespace seqfuse {
namespace {

// The kernels' positive lists: sorted, with ignored entries (padding 0) as -1.
at::Tensor sorted_positives(const at::Tensor& idx, bool mask_zero) {
  const at::Tensor p = mask_zero ? idx.masked_fill(idx == 0, -1) : idx;
  return std::get<0>(p.sort(-1)).contiguous();
}

cuda::GPArgs gp_args(const GPInputs& in) {
  cuda::GPArgs a{};
  a.geom = in.geom;
  a.q = in.q.data_ptr();
  a.k = in.k.data_ptr();
  a.mask = data_or_null<const uint8_t>(in.mask);
  a.bias_start = data_or_null(in.bias_start);
  a.bias_end = data_or_null(in.bias_end);
  return a;
}

at::Tensor workspace_for(const GPGeometry& g, cuda::DType dtype, const at::Tensor& like) {
  const auto bytes = static_cast<int64_t>(cuda::global_pointer_workspace_bytes(g, dtype));
  return at::empty({bytes}, like.options().dtype(at::kByte));
}

at::Tensor rope_cuda(const at::Tensor& x, const std::optional<at::Tensor>& positions, double base,
                     bool inverse) {
  const char* op = "rope";
  TORCH_CHECK_VALUE(x.dim() == 3 || x.dim() == 4, op, ": x must be [B, L, H, D] or [B, L, D], "
                    "got shape ", shape_str(x));
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), op,
              ": x must be a floating point tensor, got ", x.scalar_type());
  const auto dtype = cuda_dtype(op, x);
  const int64_t B = x.size(0), L = x.size(1), H = x.dim() == 4 ? x.size(2) : 1, D = x.size(-1);
  TORCH_CHECK_VALUE(D % 2 == 0, op, ": x's last dim D must be even (pairs (2i, 2i+1) are "
                    "rotated), got D = ", D);
  TORCH_CHECK_VALUE(base > 0 && std::isfinite(base), op, ": base must be positive, got ", base);
  at::Tensor pos;
  if (positions.has_value()) {
    const at::Tensor& p = *positions;
    check_same_device(op, "positions", p, "x", x);
    TORCH_CHECK(at::isIntegralType(p.scalar_type(), false), op,
                ": positions must be an integer tensor, got ", p.scalar_type());
    TORCH_CHECK_VALUE((p.dim() == 1 && p.size(0) == L) ||
                          (p.dim() == 2 && p.size(0) == B && p.size(1) == L),
                      op, ": positions must be [L] or [B, L] = [", B, ", ", L, "], got shape ",
                      shape_str(p));
    pos = p.to(at::kLong).expand({B, L}).contiguous();
  }
  const DeviceGuard guard(x.device());
  at::Tensor in = x.contiguous();
  at::Tensor out = at::empty_like(in);
  SEQFUSE_CUDA_CHECK(cuda::rope(in.data_ptr(), data_or_null<const int64_t>(pos), B,
                            L, H, D, base, inverse, out.data_ptr(), dtype, current_stream()));
  return out;
}

at::Tensor global_pointer_scores_cuda(const at::Tensor& q, const at::Tensor& k,
                                      const std::optional<at::Tensor>& mask, bool rope,
                                      bool tril, std::optional<double> scale,
                                      const std::optional<at::Tensor>& bias_start,
                                      const std::optional<at::Tensor>& bias_end) {
  const char* op = "global_pointer_scores";
  const GPInputs in =
      prepare_global_pointer(op, q, k, mask, rope, tril, scale, bias_start, bias_end);
  const auto dtype = cuda_dtype(op, q);
  const GPGeometry& g = in.geom;
  const DeviceGuard guard(q.device());
  at::Tensor scores = at::empty({g.B, g.H, g.L, g.L}, q.options());
  cuda::GPArgs a = gp_args(in);
  a.out = scores.data_ptr();
  SEQFUSE_CUDA_CHECK(cuda::global_pointer_scores_forward(a, dtype, current_stream()));
  return scores;
}

struct GradBuffers {
  at::Tensor q, k, bias_start, bias_end;
};

GradBuffers grad_buffers(const GPGeometry& g, const at::Tensor& q, cuda::GPArgs& a) {
  const auto acc = q.options().dtype(acc_dtype(q.scalar_type()));
  GradBuffers gb{at::zeros({g.B, g.Hqk, g.L, g.D}, acc), at::zeros({g.B, g.Hqk, g.L, g.D}, acc),
                 at::zeros({g.B, g.H, g.L}, acc), at::zeros({g.B, g.H, g.L}, acc)};
  a.grad_q = gb.q.data_ptr();
  a.grad_k = gb.k.data_ptr();
  a.grad_bias_start = gb.bias_start.data_ptr();
  a.grad_bias_end = gb.bias_end.data_ptr();
  return gb;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> global_pointer_scores_backward_cuda(
    const at::Tensor& grad, const at::Tensor& q, const at::Tensor& k,
    const std::optional<at::Tensor>& mask, bool rope, bool tril, std::optional<double> scale,
    const std::optional<at::Tensor>& bias_start, const std::optional<at::Tensor>& bias_end) {
  const char* op = "global_pointer_scores_backward";
  const GPInputs in =
      prepare_global_pointer(op, q, k, mask, rope, tril, scale, bias_start, bias_end);
  const auto dtype = cuda_dtype(op, q);
  const GPGeometry& g = in.geom;
  check_same_device(op, "grad", grad, "q", q);
  TORCH_CHECK_VALUE(grad.dim() == 4 && grad.size(0) == g.B && grad.size(1) == g.H &&
                        grad.size(2) == g.L && grad.size(3) == g.L,
                    op, ": grad must be [B, H, L, L] = [", g.B, ", ", g.H, ", ", g.L, ", ", g.L,
                    "], got shape ", shape_str(grad));
  const DeviceGuard guard(q.device());
  at::Tensor upstream = grad.to(q.scalar_type()).contiguous();
  cuda::GPArgs a = gp_args(in);
  a.grad = upstream.data_ptr();
  const GradBuffers gb = grad_buffers(g, q, a);
  SEQFUSE_CUDA_CHECK(cuda::global_pointer_scores_backward(a, dtype, current_stream()));
  return finish_global_pointer_backward(in, gb.q, gb.k, gb.bias_start, gb.bias_end,
                                        q.scalar_type());
}

at::Tensor terms_shape(const at::Tensor& scores, const at::Tensor& terms) {
  auto shape = scores.sizes().vec();
  shape.back() = 2;
  return terms.view(shape);
}

at::Tensor mce_cuda(const at::Tensor& scores, const at::Tensor& labels) {
  const char* op = "multilabel_categorical_crossentropy";
  at::Tensor s = prepare_loss_scores(op, scores);
  const auto dtype = cuda_dtype(op, scores);
  at::Tensor t = prepare_labels(op, labels, scores);
  const DeviceGuard guard(scores.device());
  at::Tensor terms = at::empty({s.size(0), 2}, s.options().dtype(acc_dtype(s.scalar_type())));
  const cuda::RowLossArgs a{s.size(0), s.size(1), 0, s.data_ptr(), t.data_ptr(), nullptr,
                            nullptr, nullptr, terms.data_ptr()};
  SEQFUSE_CUDA_CHECK(cuda::mce_forward(a, dtype, current_stream()));
  return terms_shape(scores, terms);
}

at::Tensor mce_backward_cuda(const at::Tensor& grad_terms, const at::Tensor& terms,
                             const at::Tensor& scores, const at::Tensor& labels) {
  const char* op = "multilabel_categorical_crossentropy_backward";
  at::Tensor s = prepare_loss_scores(op, scores);
  const auto dtype = cuda_dtype(op, scores);
  at::Tensor t = prepare_labels(op, labels, scores);
  const auto rows = scores.sizes().slice(0, scores.dim() - 1);
  at::Tensor gt = prepare_terms(op, "grad_terms", grad_terms, rows, scores);
  at::Tensor tt = prepare_terms(op, "terms", terms, rows, scores);
  const DeviceGuard guard(scores.device());
  at::Tensor grad = at::empty_like(s);
  const cuda::RowLossArgs a{s.size(0), s.size(1), 0, s.data_ptr(), t.data_ptr(), nullptr,
                            gt.data_ptr(), tt.data_ptr(), grad.data_ptr()};
  SEQFUSE_CUDA_CHECK(cuda::mce_backward(a, dtype, current_stream()));
  return grad.view(scores.sizes());
}

at::Tensor sparse_mce_cuda(const at::Tensor& scores, const at::Tensor& pos_index, bool mask_zero) {
  const char* op = "sparse_multilabel_categorical_crossentropy";
  at::Tensor s = prepare_loss_scores(op, scores);
  const auto dtype = cuda_dtype(op, scores);
  at::Tensor idx = prepare_pos_index(op, pos_index, scores.sizes().slice(0, scores.dim() - 1),
                                     scores.size(-1), mask_zero, scores);
  const DeviceGuard guard(scores.device());
  at::Tensor positives = sorted_positives(idx, mask_zero);
  at::Tensor terms = at::empty({s.size(0), 2}, s.options().dtype(acc_dtype(s.scalar_type())));
  const cuda::RowLossArgs a{s.size(0), s.size(1), positives.size(1), s.data_ptr(), nullptr,
                            positives.data_ptr<int64_t>(), nullptr, nullptr, terms.data_ptr(),
                            mask_zero};
  SEQFUSE_CUDA_CHECK(cuda::sparse_mce_forward(a, dtype, current_stream()));
  return terms_shape(scores, terms);
}

at::Tensor sparse_mce_backward_cuda(const at::Tensor& grad_terms, const at::Tensor& terms,
                                    const at::Tensor& scores, const at::Tensor& pos_index,
                                    bool mask_zero) {
  const char* op = "sparse_multilabel_categorical_crossentropy_backward";
  at::Tensor s = prepare_loss_scores(op, scores);
  const auto dtype = cuda_dtype(op, scores);
  const auto rows = scores.sizes().slice(0, scores.dim() - 1);
  at::Tensor idx = prepare_pos_index(op, pos_index, rows, scores.size(-1), mask_zero, scores);
  at::Tensor gt = prepare_terms(op, "grad_terms", grad_terms, rows, scores);
  at::Tensor tt = prepare_terms(op, "terms", terms, rows, scores);
  const DeviceGuard guard(scores.device());
  at::Tensor positives = sorted_positives(idx, mask_zero);
  at::Tensor grad = at::empty_like(s);
  const cuda::RowLossArgs a{s.size(0), s.size(1), positives.size(1), s.data_ptr(), nullptr,
                            positives.data_ptr<int64_t>(), gt.data_ptr(), tt.data_ptr(),
                            grad.data_ptr(), mask_zero};
  SEQFUSE_CUDA_CHECK(cuda::sparse_mce_backward(a, dtype, current_stream()));
  return grad.view(scores.sizes());
}

at::Tensor global_pointer_loss_cuda(const at::Tensor& q, const at::Tensor& k,
                                    const at::Tensor& pos_index,
                                    const std::optional<at::Tensor>& mask, bool rope, bool tril,
                                    std::optional<double> scale,
                                    const std::optional<at::Tensor>& bias_start,
                                    const std::optional<at::Tensor>& bias_end, bool mask_zero) {
  const char* op = "global_pointer_loss";
  const GPInputs in =
      prepare_global_pointer(op, q, k, mask, rope, tril, scale, bias_start, bias_end);
  const auto dtype = cuda_dtype(op, q);
  const GPGeometry& g = in.geom;
  at::Tensor idx = prepare_pos_index(op, pos_index, {g.B, g.H}, g.L * g.L, mask_zero, q);
  const DeviceGuard guard(q.device());
  at::Tensor positives = sorted_positives(idx, mask_zero);
  at::Tensor terms = at::zeros({g.B, g.H, 2}, q.options().dtype(acc_dtype(q.scalar_type())));
  at::Tensor workspace = workspace_for(g, dtype, q);  // the per-tile partial sums
  cuda::GPArgs a = gp_args(in);
  a.positives = positives.data_ptr<int64_t>();
  a.P = positives.size(1);
  a.mask_zero = mask_zero;
  a.out = terms.data_ptr();
  a.workspace = workspace.data_ptr();
  SEQFUSE_CUDA_CHECK(cuda::global_pointer_loss_forward(a, dtype, current_stream()));
  return terms;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> global_pointer_loss_backward_cuda(
    const at::Tensor& grad_terms, const at::Tensor& terms, const at::Tensor& q,
    const at::Tensor& k, const at::Tensor& pos_index, const std::optional<at::Tensor>& mask,
    bool rope, bool tril, std::optional<double> scale,
    const std::optional<at::Tensor>& bias_start, const std::optional<at::Tensor>& bias_end,
    bool mask_zero) {
  const char* op = "global_pointer_loss_backward";
  const GPInputs in =
      prepare_global_pointer(op, q, k, mask, rope, tril, scale, bias_start, bias_end);
  const auto dtype = cuda_dtype(op, q);
  const GPGeometry& g = in.geom;
  at::Tensor idx = prepare_pos_index(op, pos_index, {g.B, g.H}, g.L * g.L, mask_zero, q);
  at::Tensor gt = prepare_terms(op, "grad_terms", grad_terms, {g.B, g.H}, q);
  at::Tensor tt = prepare_terms(op, "terms", terms, {g.B, g.H}, q);
  const DeviceGuard guard(q.device());
  at::Tensor positives = sorted_positives(idx, mask_zero);
  cuda::GPArgs a = gp_args(in);
  a.positives = positives.data_ptr<int64_t>();
  a.P = positives.size(1);
  a.mask_zero = mask_zero;
  a.grad = gt.data_ptr();
  a.terms = tt.data_ptr();
  const GradBuffers gb = grad_buffers(g, q, a);
  SEQFUSE_CUDA_CHECK(cuda::global_pointer_loss_backward(a, dtype, current_stream()));
  return finish_global_pointer_backward(in, gb.q, gb.k, gb.bias_start, gb.bias_end,
                                        q.scalar_type());
}

}  // namespace

SEQFUSE_CUDA_LIBRARY_IMPL(m) {
  m.impl("rope", &rope_cuda);
  m.impl("global_pointer_scores", &global_pointer_scores_cuda);
  m.impl("global_pointer_scores_backward", &global_pointer_scores_backward_cuda);
  m.impl("multilabel_categorical_crossentropy", &mce_cuda);
  m.impl("multilabel_categorical_crossentropy_backward", &mce_backward_cuda);
  m.impl("sparse_multilabel_categorical_crossentropy", &sparse_mce_cuda);
  m.impl("sparse_multilabel_categorical_crossentropy_backward", &sparse_mce_backward_cuda);
  m.impl("global_pointer_loss", &global_pointer_loss_cuda);
  m.impl("global_pointer_loss_backward", &global_pointer_loss_backward_cuda);
}

}  // namespace seqfuse
