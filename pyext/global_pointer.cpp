// GlobalPointer ops: schemas, argument checks and the CPU registration.
#include "global_pointer.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>

#include "../csrc/cpu/global_pointer.h"
#include "checks.h"

namespace seqfuse {
namespace {

void check_floating(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), op, ": ", name,
              " must be a floating point tensor, got ", t.scalar_type());
}

void check_integer(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(at::isIntegralType(t.scalar_type(), /*includeBool=*/false), op, ": ", name,
              " must be an integer tensor, got ", t.scalar_type());
}

at::Tensor prepare_bias(const char* op, const char* name, const std::optional<at::Tensor>& bias,
                        const at::Tensor& q, int64_t B, int64_t H, int64_t L) {
  if (!bias.has_value()) return {};
  const at::Tensor& t = *bias;
  check_same_device(op, name, t, "q", q);
  check_floating(op, name, t);
  TORCH_CHECK_VALUE(t.dim() == 3 && t.size(0) == B && t.size(1) == H && t.size(2) == L, op,
                    ": ", name, " must be [B, H, L] = [", B, ", ", H, ", ", L, "], got shape ",
                    shape_str(t));
  return t.to(acc_dtype(q.scalar_type())).contiguous();
}

}  // namespace

GPInputs prepare_global_pointer(const char* op, const at::Tensor& q, const at::Tensor& k,
                                const std::optional<at::Tensor>& mask, bool rope, bool tril,
                                std::optional<double> scale,
                                const std::optional<at::Tensor>& bias_start,
                                const std::optional<at::Tensor>& bias_end) {
  check_dim(op, "q", q, 4, "[B, L, H, D] or [B, L, 1, D]");
  check_floating(op, "q", q);
  check_same_dtype(op, "k", k, "q", q);
  check_same_device(op, "k", k, "q", q);
  TORCH_CHECK_VALUE(k.sizes() == q.sizes(), op, ": k must have q's shape ", shape_str(q),
                    ", got shape ", shape_str(k));
  const int64_t B = q.size(0), L = q.size(1), Hqk = q.size(2), D = q.size(3);
  TORCH_CHECK_VALUE(!rope || D % 2 == 0, op, ": q's head dim D must be even for rope (pairs "
                    "(2i, 2i+1) are rotated), got D = ", D);

  int64_t H = Hqk;
  if (Hqk == 1) {
    for (const auto* bias : {&bias_start, &bias_end}) {
      if (bias->has_value() && (*bias)->dim() == 3) H = std::max(H, (*bias)->size(1));
    }
  }
  GPInputs in;
  in.q = q.contiguous();
  in.k = k.contiguous();
  in.bias_start = prepare_bias(op, "bias_start", bias_start, q, B, H, L);
  in.bias_end = prepare_bias(op, "bias_end", bias_end, q, B, H, L);
  if (mask.has_value()) {
    const at::Tensor& m = *mask;
    check_same_device(op, "mask", m, "q", q);
    TORCH_CHECK_VALUE(m.dim() == 2 && m.size(0) == B && m.size(1) == L, op,
                      ": mask must be [B, L] = [", B, ", ", L, "], got shape ", shape_str(m));
    in.mask = m.ne(0).to(at::kByte).contiguous();
  }
  if (scale.has_value()) {
    TORCH_CHECK_VALUE(std::isfinite(*scale), op, ": scale must be finite, got ", *scale);
  }
  in.geom = {B, L, H, Hqk, D, rope, tril,
             scale.value_or(D > 0 ? 1.0 / std::sqrt(double(D)) : 1.0)};
  return in;
}

at::Tensor prepare_pos_index(const char* op, const at::Tensor& pos_index, at::IntArrayRef rows,
                             int64_t N, bool mask_zero, const at::Tensor& scores_like) {
  check_same_device(op, "pos_index", pos_index, "scores", scores_like);
  check_integer(op, "pos_index", pos_index);
  if (pos_index.dim() != int64_t(rows.size()) + 1 ||
      pos_index.sizes().slice(0, rows.size()) != rows) {
    // Formatted only on failure: this runs on every call.
    const std::string leading = c10::str(rows);  // "[B, H]"
    TORCH_CHECK_VALUE(false, op, ": pos_index must be ", leading.substr(0, leading.size() - 1),
                      rows.empty() ? "P]" : ", P]", " (one list of P flat positive indices "
                      "per row), got shape ", shape_str(pos_index));
  }
  at::Tensor idx = pos_index.to(at::kLong).contiguous();
  if (idx.numel() > 0) {
    const auto [lo, hi] = at::aminmax(idx);
    const int64_t min = lo.item<int64_t>(), max = hi.item<int64_t>();
    TORCH_CHECK_VALUE(min >= 0 && (max < N || (mask_zero && max == 0)), op,
                      ": pos_index entries must be flat indices in [0, ", N, ")",
                      mask_zero ? " (0 is padding)" : "", ", got values in [", min, ", ", max,
                      "]");
  }
  return idx.view({c10::multiply_integers(rows), idx.size(-1)});
}

at::Tensor prepare_loss_scores(const char* op, const at::Tensor& scores) {
  TORCH_CHECK_VALUE(scores.dim() >= 1, op, ": scores must be [..., N], got a 0-dim tensor");
  check_floating(op, "scores", scores);
  const int64_t R = c10::multiply_integers(scores.sizes().slice(0, scores.dim() - 1));
  return scores.contiguous().view({R, scores.size(-1)});
}

at::Tensor prepare_labels(const char* op, const at::Tensor& labels, const at::Tensor& scores) {
  check_same_device(op, "labels", labels, "scores", scores);
  TORCH_CHECK_VALUE(labels.sizes() == scores.sizes(), op, ": labels must have scores' shape ",
                    shape_str(scores), ", got shape ", shape_str(labels));
  at::Tensor t = labels.to(scores.scalar_type()).contiguous();
  if (t.numel() > 0) {
    const auto [lo, hi] = at::aminmax(t);
    TORCH_CHECK_VALUE(lo.item<double>() >= 0 && hi.item<double>() <= 1, op,
                      ": labels must lie in [0, 1] (1 = positive), got values in [",
                      lo.item<double>(), ", ", hi.item<double>(), "]");
  }
  return t.view({c10::multiply_integers(scores.sizes().slice(0, scores.dim() - 1)),
                 scores.size(-1)});
}

at::Tensor prepare_terms(const char* op, const char* name, const at::Tensor& t,
                         at::IntArrayRef rows, const at::Tensor& like) {
  check_same_device(op, name, t, "scores", like);
  TORCH_CHECK_VALUE(t.dim() == int64_t(rows.size()) + 1 &&
                        t.sizes().slice(0, rows.size()) == rows && t.size(-1) == 2,
                    op, ": ", name, " must be [rows..., 2] with rows ", rows, ", got shape ",
                    shape_str(t));
  return t.to(acc_dtype(like.scalar_type())).contiguous().view({c10::multiply_integers(rows), 2});
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> finish_global_pointer_backward(
    const GPInputs& in, const at::Tensor& grad_q, const at::Tensor& grad_k,
    const at::Tensor& grad_bias_start, const at::Tensor& grad_bias_end, at::ScalarType dtype) {
  auto layout = [&](const at::Tensor& g) {
    return g.permute({0, 2, 1, 3}).to(dtype).contiguous();
  };
  return {layout(grad_q), layout(grad_k), grad_bias_start.to(dtype), grad_bias_end.to(dtype)};
}

namespace {

void check_cpu_dtype(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, op, ": ", name,
              " must be float32 or float64 on CPU, got ", t.scalar_type());
}

at::Tensor rope_cpu(const at::Tensor& x, const std::optional<at::Tensor>& positions, double base,
                    bool inverse) {
  const char* op = "rope";
  TORCH_CHECK_VALUE(x.dim() == 3 || x.dim() == 4, op, ": x must be [B, L, H, D] or [B, L, D], "
                    "got shape ", shape_str(x));
  check_floating(op, "x", x);
  check_cpu_dtype(op, "x", x);
  const int64_t B = x.size(0), L = x.size(1), D = x.size(-1);
  TORCH_CHECK_VALUE(D % 2 == 0, op, ": x's last dim D must be even (pairs (2i, 2i+1) are "
                    "rotated), got D = ", D);
  TORCH_CHECK_VALUE(base > 0 && std::isfinite(base), op, ": base must be positive, got ", base);
  at::Tensor pos;
  if (positions.has_value()) {
    const at::Tensor& p = *positions;
    check_same_device(op, "positions", p, "x", x);
    check_integer(op, "positions", p);
    TORCH_CHECK_VALUE((p.dim() == 1 && p.size(0) == L) ||
                          (p.dim() == 2 && p.size(0) == B && p.size(1) == L),
                      op, ": positions must be [L] or [B, L] = [", B, ", ", L, "], got shape ",
                      shape_str(p));
    pos = p.to(at::kLong).expand({B, L}).contiguous();
  }
  at::Tensor in = x.contiguous().view({B, L, x.dim() == 4 ? x.size(2) : 1, D});
  at::Tensor out = at::empty_like(in);
  if (in.numel() > 0) cpu::rope(in, pos, base, inverse, out);
  return out.view(x.sizes());
}

at::Tensor global_pointer_scores_cpu(const at::Tensor& q, const at::Tensor& k,
                                     const std::optional<at::Tensor>& mask, bool rope, bool tril,
                                     std::optional<double> scale,
                                     const std::optional<at::Tensor>& bias_start,
                                     const std::optional<at::Tensor>& bias_end) {
  const char* op = "global_pointer_scores";
  const GPInputs in =
      prepare_global_pointer(op, q, k, mask, rope, tril, scale, bias_start, bias_end);
  check_cpu_dtype(op, "q", q);
  const GPGeometry& g = in.geom;
  at::Tensor scores = at::empty({g.B, g.H, g.L, g.L}, q.options());
  if (scores.numel() > 0) {
    cpu::global_pointer_scores_forward(g, in.q, in.k, in.mask, in.bias_start, in.bias_end, scores);
  }
  return scores;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> global_pointer_scores_backward_cpu(
    const at::Tensor& grad, const at::Tensor& q, const at::Tensor& k,
    const std::optional<at::Tensor>& mask, bool rope, bool tril, std::optional<double> scale,
    const std::optional<at::Tensor>& bias_start, const std::optional<at::Tensor>& bias_end) {
  const char* op = "global_pointer_scores_backward";
  const GPInputs in =
      prepare_global_pointer(op, q, k, mask, rope, tril, scale, bias_start, bias_end);
  check_cpu_dtype(op, "q", q);
  const GPGeometry& g = in.geom;
  check_same_device(op, "grad", grad, "q", q);
  TORCH_CHECK_VALUE(grad.dim() == 4 && grad.size(0) == g.B && grad.size(1) == g.H &&
                        grad.size(2) == g.L && grad.size(3) == g.L,
                    op, ": grad must be [B, H, L, L] = [", g.B, ", ", g.H, ", ", g.L, ", ", g.L,
                    "], got shape ", shape_str(grad));
  const auto acc = q.options().dtype(acc_dtype(q.scalar_type()));
  at::Tensor gq = at::zeros({g.B, g.Hqk, g.L, g.D}, acc), gk = at::zeros_like(gq);
  at::Tensor gbs = at::zeros({g.B, g.H, g.L}, acc), gbe = at::zeros_like(gbs);
  if (g.B * g.Hqk * g.L > 0) {  // the kernels divide by Hqk
    cpu::global_pointer_scores_backward(g, grad.to(q.scalar_type()).contiguous(), in.q, in.k,
                                        in.mask, gq, gk, gbs, gbe);
  }
  return finish_global_pointer_backward(in, gq, gk, gbs, gbe, q.scalar_type());
}

at::Tensor mce_cpu(const at::Tensor& scores, const at::Tensor& labels) {
  const char* op = "multilabel_categorical_crossentropy";
  at::Tensor s = prepare_loss_scores(op, scores);
  check_cpu_dtype(op, "scores", scores);
  at::Tensor t = prepare_labels(op, labels, scores);
  at::Tensor terms = at::empty({s.size(0), 2}, s.options().dtype(acc_dtype(s.scalar_type())));
  if (s.size(0) > 0) cpu::mce_forward(s, t, terms);
  auto shape = scores.sizes().vec();
  shape.back() = 2;
  return terms.view(shape);
}

at::Tensor mce_backward_cpu(const at::Tensor& grad_terms, const at::Tensor& terms,
                            const at::Tensor& scores, const at::Tensor& labels) {
  const char* op = "multilabel_categorical_crossentropy_backward";
  at::Tensor s = prepare_loss_scores(op, scores);
  check_cpu_dtype(op, "scores", scores);
  at::Tensor t = prepare_labels(op, labels, scores);
  const auto rows = scores.sizes().slice(0, scores.dim() - 1);
  at::Tensor gt = prepare_terms(op, "grad_terms", grad_terms, rows, scores);
  at::Tensor tt = prepare_terms(op, "terms", terms, rows, scores);
  at::Tensor grad = at::empty_like(s);
  if (s.numel() > 0) cpu::mce_backward(gt, tt, s, t, grad);
  return grad.view(scores.sizes());
}

at::Tensor sparse_mce_cpu(const at::Tensor& scores, const at::Tensor& pos_index, bool mask_zero) {
  const char* op = "sparse_multilabel_categorical_crossentropy";
  at::Tensor s = prepare_loss_scores(op, scores);
  check_cpu_dtype(op, "scores", scores);
  at::Tensor idx = prepare_pos_index(op, pos_index, scores.sizes().slice(0, scores.dim() - 1),
                                     scores.size(-1), mask_zero, scores);
  at::Tensor terms = at::empty({s.size(0), 2}, s.options().dtype(acc_dtype(s.scalar_type())));
  if (s.size(0) > 0) cpu::sparse_mce_forward(s, idx, mask_zero, terms);
  auto shape = scores.sizes().vec();
  shape.back() = 2;
  return terms.view(shape);
}

at::Tensor sparse_mce_backward_cpu(const at::Tensor& grad_terms, const at::Tensor& terms,
                                   const at::Tensor& scores, const at::Tensor& pos_index,
                                   bool mask_zero) {
  const char* op = "sparse_multilabel_categorical_crossentropy_backward";
  at::Tensor s = prepare_loss_scores(op, scores);
  check_cpu_dtype(op, "scores", scores);
  const auto rows = scores.sizes().slice(0, scores.dim() - 1);
  at::Tensor idx = prepare_pos_index(op, pos_index, rows, scores.size(-1), mask_zero, scores);
  at::Tensor gt = prepare_terms(op, "grad_terms", grad_terms, rows, scores);
  at::Tensor tt = prepare_terms(op, "terms", terms, rows, scores);
  at::Tensor grad = at::empty_like(s);
  if (s.numel() > 0) cpu::sparse_mce_backward(gt, tt, s, idx, mask_zero, grad);
  return grad.view(scores.sizes());
}

at::Tensor global_pointer_loss_cpu(const at::Tensor& q, const at::Tensor& k,
                                   const at::Tensor& pos_index,
                                   const std::optional<at::Tensor>& mask, bool rope, bool tril,
                                   std::optional<double> scale,
                                   const std::optional<at::Tensor>& bias_start,
                                   const std::optional<at::Tensor>& bias_end, bool mask_zero) {
  const char* op = "global_pointer_loss";
  const GPInputs in =
      prepare_global_pointer(op, q, k, mask, rope, tril, scale, bias_start, bias_end);
  check_cpu_dtype(op, "q", q);
  const GPGeometry& g = in.geom;
  at::Tensor idx = prepare_pos_index(op, pos_index, {g.B, g.H}, g.L * g.L, mask_zero, q);
  at::Tensor terms = at::zeros({g.B, g.H, 2}, q.options().dtype(acc_dtype(q.scalar_type())));
  if (g.B * g.Hqk * g.L > 0) {  // the kernels divide by Hqk
    cpu::global_pointer_loss_forward(g, in.q, in.k, in.mask, in.bias_start, in.bias_end,
                                     idx.view({g.B, g.H, -1}), mask_zero, terms);
  }
  return terms;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> global_pointer_loss_backward_cpu(
    const at::Tensor& grad_terms, const at::Tensor& terms, const at::Tensor& q,
    const at::Tensor& k, const at::Tensor& pos_index, const std::optional<at::Tensor>& mask,
    bool rope, bool tril, std::optional<double> scale,
    const std::optional<at::Tensor>& bias_start, const std::optional<at::Tensor>& bias_end,
    bool mask_zero) {
  const char* op = "global_pointer_loss_backward";
  const GPInputs in =
      prepare_global_pointer(op, q, k, mask, rope, tril, scale, bias_start, bias_end);
  check_cpu_dtype(op, "q", q);
  const GPGeometry& g = in.geom;
  at::Tensor idx = prepare_pos_index(op, pos_index, {g.B, g.H}, g.L * g.L, mask_zero, q);
  at::Tensor gt = prepare_terms(op, "grad_terms", grad_terms, {g.B, g.H}, q);
  at::Tensor tt = prepare_terms(op, "terms", terms, {g.B, g.H}, q);
  const auto acc = q.options().dtype(acc_dtype(q.scalar_type()));
  at::Tensor gq = at::zeros({g.B, g.Hqk, g.L, g.D}, acc), gk = at::zeros_like(gq);
  at::Tensor gbs = at::zeros({g.B, g.H, g.L}, acc), gbe = at::zeros_like(gbs);
  if (g.B * g.Hqk * g.L > 0) {  // the kernels divide by Hqk
    cpu::global_pointer_loss_backward(g, gt, tt, in.q, in.k, in.mask, in.bias_start, in.bias_end,
                                      idx.view({g.B, g.H, -1}), mask_zero, gq, gk, gbs, gbe);
  }
  return finish_global_pointer_backward(in, gq, gk, gbs, gbe, q.scalar_type());
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(seqfuse, m) {
  m.def("rope(Tensor x, Tensor? positions=None, float base=10000.0, bool inverse=False) -> Tensor");
  m.def(
      "global_pointer_scores(Tensor q, Tensor k, Tensor? mask=None, bool rope=True, "
      "bool tril=True, float? scale=None, Tensor? bias_start=None, Tensor? bias_end=None) "
      "-> Tensor");
  m.def(
      "global_pointer_scores_backward(Tensor grad, Tensor q, Tensor k, Tensor? mask, bool rope, "
      "bool tril, float? scale, Tensor? bias_start, Tensor? bias_end) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def("multilabel_categorical_crossentropy(Tensor scores, Tensor labels) -> Tensor");
  m.def(
      "multilabel_categorical_crossentropy_backward(Tensor grad_terms, Tensor terms, "
      "Tensor scores, Tensor labels) -> Tensor");
  m.def(
      "sparse_multilabel_categorical_crossentropy(Tensor scores, Tensor pos_index, "
      "bool mask_zero=False) -> Tensor");
  m.def(
      "sparse_multilabel_categorical_crossentropy_backward(Tensor grad_terms, Tensor terms, "
      "Tensor scores, Tensor pos_index, bool mask_zero) -> Tensor");
  m.def(
      "global_pointer_loss(Tensor q, Tensor k, Tensor pos_index, Tensor? mask=None, "
      "bool rope=True, bool tril=True, float? scale=None, Tensor? bias_start=None, "
      "Tensor? bias_end=None, bool mask_zero=True) -> Tensor");
  m.def(
      "global_pointer_loss_backward(Tensor grad_terms, Tensor terms, Tensor q, Tensor k, "
      "Tensor pos_index, Tensor? mask, bool rope, bool tril, float? scale, Tensor? bias_start, "
      "Tensor? bias_end, bool mask_zero) -> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(seqfuse, CPU, m) {
  m.impl("rope", &rope_cpu);
  m.impl("global_pointer_scores", &global_pointer_scores_cpu);
  m.impl("global_pointer_scores_backward", &global_pointer_scores_backward_cpu);
  m.impl("multilabel_categorical_crossentropy", &mce_cpu);
  m.impl("multilabel_categorical_crossentropy_backward", &mce_backward_cpu);
  m.impl("sparse_multilabel_categorical_crossentropy", &sparse_mce_cpu);
  m.impl("sparse_multilabel_categorical_crossentropy_backward", &sparse_mce_backward_cpu);
  m.impl("global_pointer_loss", &global_pointer_loss_cpu);
  m.impl("global_pointer_loss_backward", &global_pointer_loss_backward_cpu);
}

}  // namespace seqfuse
