// linear_scan: the CUDA registration. Kernels: csrc/cuda/scan.cu.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "../csrc/cuda/scan.h"
#include "checks.h"
#include "cuda_utils.h"
#include "scan.h"

namespace seqfuse {
namespace {

at::Tensor workspace_for(const ScanGeometry& g, cuda::DType dtype, const at::Tensor& like) {
  const auto bytes = static_cast<int64_t>(cuda::scan_workspace_bytes(g, dtype));
  return at::empty({bytes}, like.options().dtype(at::kByte));
}

at::Tensor linear_scan_cuda(const at::Tensor& a, const at::Tensor& b,
                            const std::optional<at::Tensor>& h0, bool reverse,
                            const std::optional<at::Tensor>& cu_seqlens) {
  const ScanInputs in = prepare_scan("linear_scan", a, b, h0, reverse, cu_seqlens, false);
  const auto dtype = cuda_dtype("linear_scan", in.b);
  const DeviceGuard guard(b.device());
  at::Tensor h = at::empty_like(in.b);
  at::Tensor workspace = workspace_for(in.geom, dtype, in.b);
  cuda::ScanArgs args{};
  args.geom = in.geom;
  args.a = in.a.data_ptr();
  args.b = in.b.data_ptr();
  args.h0 = data_or_null(in.h0);
  args.out = h.data_ptr();
  args.workspace = workspace.data_ptr();
  SEQFUSE_CUDA_CHECK(cuda::linear_scan_forward(args, dtype, current_stream()));
  return h;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_scan_backward_cuda(
    const at::Tensor& grad_h, const at::Tensor& a, const at::Tensor& h,
    const std::optional<at::Tensor>& h0, bool reverse,
    const std::optional<at::Tensor>& cu_seqlens) {
  const ScanInputs in =
      prepare_scan("linear_scan_backward", a, h, h0, reverse, cu_seqlens, false);
  check_same_device("linear_scan_backward", "grad_h", grad_h, "h", h);
  const ScanGeometry& g = in.geom;
  const auto dtype = cuda_dtype("linear_scan_backward", in.b);
  const auto acc = h.options().dtype(acc_dtype(h.scalar_type()));
  const DeviceGuard guard(h.device());
  at::Tensor grad = grad_h.contiguous();
  at::Tensor grad_b = at::empty_like(in.b);
  const bool per_chunk = g.a_sT == 0;
  at::Tensor grad_a = at::zeros({g.B, per_chunk ? cuda::scan_chunks(g.T) : g.T, g.C}, acc);
  at::Tensor grad_h0 = at::zeros({g.sequences(), g.C}, acc);  // an empty sequence: 0
  at::Tensor workspace = workspace_for(g, dtype, in.b);
  cuda::ScanArgs args{};
  args.geom = g;
  args.a = in.a.data_ptr();
  args.b = grad.data_ptr();
  args.h = in.b.data_ptr();
  args.h0 = data_or_null(in.h0);
  args.out = grad_b.data_ptr();
  args.grad_a = grad_a.data_ptr();
  args.grad_h0 = grad_h0.data_ptr();
  args.workspace = workspace.data_ptr();
  SEQFUSE_CUDA_CHECK(cuda::linear_scan_backward(args, dtype, current_stream()));
  if (per_chunk) grad_a = grad_a.sum(1, /*keepdim=*/true);
  return finish_scan_backward(a, h0, grad_a, grad_b, grad_h0);
}

}  // namespace

SEQFUSE_CUDA_LIBRARY_IMPL(m) {
  m.impl("linear_scan", &linear_scan_cuda);
  m.impl("linear_scan_backward", &linear_scan_backward_cuda);
}

}  // namespace seqfuse
