// linear_scan: schema, argument checks and the CPU registration.
#include "scan.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include <vector>

#include "../csrc/cpu/huge_pages.h"
#include "../csrc/cpu/scan.h"
#include "checks.h"

namespace seqfuse {

ScanInputs prepare_scan(const char* op, const at::Tensor& a, const at::Tensor& b,
                        const std::optional<at::Tensor>& h0, bool reverse,
                        const std::optional<at::Tensor>& cu_seqlens, bool on_cpu) {
  check_dim(op, "b", b, 3, "[B, T, C]");
  TORCH_CHECK(at::isFloatingType(b.scalar_type()) || at::isComplexType(b.scalar_type()), op,
              ": b must be a floating point or complex tensor, got ", b.scalar_type());
  check_same_dtype(op, "a", a, "b", b);
  check_same_device(op, "a", a, "b", b);
  TORCH_CHECK_VALUE(a.dim() <= 3, op, ": a must broadcast to b's shape ", shape_str(b),
                    ", got shape ", shape_str(a));
  for (int64_t d = 1; d <= a.dim(); ++d) {
    TORCH_CHECK_VALUE(a.size(-d) == 1 || a.size(-d) == b.size(-d), op,
                      ": a must broadcast to b's shape ", shape_str(b), ", got shape ",
                      shape_str(a));
  }

  ScanInputs in;
  in.b = b.contiguous();
  const int64_t B = b.size(0), T = b.size(1), C = b.size(2);
  in.a = a.expand({B, T, C});
  // An `a` with a time dim of its own but stride 0 there (a.expand_as(b)) gets one
  // gradient entry per step: the kernels must not read it as time-invariant.
  const bool per_step = a.dim() >= 2 && a.size(-2) != 1;
  if (per_step && in.a.stride(1) == 0) {
    in.a = at::empty({B, T, C}, a.options()).copy_(in.a);  // its own strides, also when empty
  } else if (C > 1 && in.a.stride(2) > 1) {
    in.a = a.contiguous().expand({B, T, C});
  }
  in.geom = {B, T, C, in.a.stride(0), in.a.stride(1), C > 1 ? in.a.stride(2) : 0, reverse};
  if (cu_seqlens.has_value()) {
    in.cu_seqlens = check_cu_seqlens(op, *cu_seqlens, T, "b", b, on_cpu);
    in.geom.cu_seqlens = in.cu_seqlens.data_ptr<int64_t>();
    in.geom.N = in.cu_seqlens.size(0) - 1;
  }

  if (h0.has_value()) {
    const at::Tensor& h = *h0;
    const int64_t S = in.geom.sequences();
    check_same_device(op, "h0", h, "b", b);
    TORCH_CHECK_VALUE(h.dim() == 2 && h.size(0) == S && h.size(1) == C, op, ": h0 must be ",
                      cu_seqlens.has_value() ? "[N, C] = [" : "[B, C] = [", S, ", ", C,
                      "], got shape ", shape_str(h));
    TORCH_CHECK(at::isComplexType(h.scalar_type()) == at::isComplexType(b.scalar_type()) &&
                    (at::isFloatingType(h.scalar_type()) || at::isComplexType(h.scalar_type())),
                op, ": h0 has dtype ", h.scalar_type(), ", which does not suit b's dtype ",
                b.scalar_type());
    in.h0 = h.to(acc_dtype(b.scalar_type())).contiguous();
  }
  return in;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> finish_scan_backward(
    const at::Tensor& a, const std::optional<at::Tensor>& h0, const at::Tensor& grad_a_acc,
    const at::Tensor& grad_b, const at::Tensor& grad_h0_acc) {
  const auto h0_dtype = h0.has_value() ? h0->scalar_type() : grad_h0_acc.scalar_type();
  return {grad_a_acc.sum_to_size(a.sizes()).to(a.scalar_type()), grad_b,
          grad_h0_acc.to(h0_dtype)};
}

namespace {

at::Tensor linear_scan_cpu(const at::Tensor& a, const at::Tensor& b,
                           const std::optional<at::Tensor>& h0, bool reverse,
                           const std::optional<at::Tensor>& cu_seqlens) {
  const ScanInputs in = prepare_scan("linear_scan", a, b, h0, reverse, cu_seqlens, true);
  at::Tensor h = at::empty_like(in.b);
  cpu::advise_huge_pages(h);
  cpu::linear_scan_forward(in.geom, in.a, in.b, in.h0, h);
  return h;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_scan_backward_cpu(
    const at::Tensor& grad_h, const at::Tensor& a, const at::Tensor& h,
    const std::optional<at::Tensor>& h0, bool reverse,
    const std::optional<at::Tensor>& cu_seqlens) {
  const ScanInputs in =
      prepare_scan("linear_scan_backward", a, h, h0, reverse, cu_seqlens, true);
  const ScanGeometry& g = in.geom;
  const auto acc = acc_dtype(h.scalar_type());
  at::Tensor grad = grad_h.contiguous();
  at::Tensor grad_b = at::empty_like(in.b);
  // The kernel writes every element of grad_a (a time-invariant a: one sum per
  // sequence), but does not run for T = 0.
  const auto grad_a_shape = g.a_sT == 0 ? std::vector<int64_t>{g.sequences(), 1, g.C}
                                        : std::vector<int64_t>{g.B, g.T, g.C};
  at::Tensor grad_a = g.T > 0 ? at::empty(grad_a_shape, h.options().dtype(acc))
                              : at::zeros(grad_a_shape, h.options().dtype(acc));
  cpu::advise_huge_pages(grad_b);
  cpu::advise_huge_pages(grad_a);
  at::Tensor grad_h0 = at::zeros({g.sequences(), g.C}, h.options().dtype(acc));
  if (g.T > 0) cpu::linear_scan_backward(g, in.a, grad, in.b, in.h0, grad_b, grad_a, grad_h0);
  return finish_scan_backward(a, h0, grad_a, grad_b, grad_h0);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(seqfuse, m) {
  m.def(
      "linear_scan(Tensor a, Tensor b, Tensor? h0=None, bool reverse=False, "
      "Tensor? cu_seqlens=None) -> Tensor");
  m.def(
      "linear_scan_backward(Tensor grad_h, Tensor a, Tensor h, Tensor? h0, bool reverse, "
      "Tensor? cu_seqlens=None) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(seqfuse, CPU, m) {
  m.impl("linear_scan", &linear_scan_cpu);
  m.impl("linear_scan_backward", &linear_scan_backward_cpu);
}

}  // namespace seqfuse
