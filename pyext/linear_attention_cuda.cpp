// causal_linear_attention: the CUDA registration. Kernels: csrc/cuda/linear_attention.cu.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "../csrc/cuda/linear_attention.h"
#include "checks.h"
#include "cuda_utils.h"
#include "linear_attention.h"

namespace seqfuse {
namespace {

// The kernels read the state's two halves S and z in place and write them as two
// outputs: no joined copy, and no host synchronisation anywhere in a call (the decay
// range is checked on the device), so a decoding step is a single kernel launch.
cuda::LinearAttentionArgs base_args(const LinearAttentionInputs& in, bool normalize, double scale,
                                    double eps) {
  cuda::LinearAttentionArgs args{};
  args.geom = in.geom;
  args.feature_map = in.feature_map;
  args.normalize = normalize;
  args.scale = scale;
  args.eps = eps;
  args.decay = data_or_null(in.decay);
  args.q = in.q.data_ptr();
  args.k = in.k.data_ptr();
  args.v = in.v.data_ptr();
  args.S_in = data_or_null(in.S0);
  args.z_in = data_or_null(in.z0);
  return args;
}

// With packed sequences, the zeroed flag in which the kernels' check of the offsets
// leaves its verdict (csrc/cuda/seqlens.cuh); undefined otherwise.
at::Tensor offsets_flag(const LinearAttentionInputs& in) {
  return in.cu_seqlens.defined() ? at::zeros({1}, in.q.options().dtype(at::kInt)) : at::Tensor();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> causal_linear_attention_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, c10::string_view feature_map,
    bool normalize, const std::optional<at::Tensor>& decay, double scale,
    const std::optional<at::Tensor>& S0, const std::optional<at::Tensor>& z0, double eps,
    const std::optional<at::Tensor>& cu_seqlens) {
  const char* op = "causal_linear_attention";
  const DeviceGuard guard(q.device());
  const LinearAttentionInputs in = prepare_linear_attention(
      op, q, k, v, std::string(feature_map), decay, scale, S0, z0, eps, cu_seqlens, false);
  const LinearAttentionGeometry& g = in.geom;
  const auto dtype = cuda_dtype(op, in.q);
  const auto acc = q.options().dtype(acc_dtype(q.scalar_type()));
  at::Tensor o = at::empty_like(in.v);
  at::Tensor S_T = at::empty({g.sequences(), g.H, g.Dk, g.Dv}, acc);
  at::Tensor z_T = at::empty({g.sequences(), g.H, g.Dk}, acc);
  at::Tensor den = at::empty({g.B, g.H, g.T}, acc);
  at::Tensor invalid = offsets_flag(in);
  cuda::LinearAttentionArgs args = base_args(in, normalize, scale, eps);
  args.invalid = data_or_null<int>(invalid);
  args.o = o.data_ptr();
  args.S_out = S_T.data_ptr();
  args.z_out = z_T.data_ptr();
  args.den = den.data_ptr();
  SEQFUSE_CUDA_CHECK(cuda::linear_attention_forward(args, dtype, current_stream()));
  return {o, S_T, z_T, den};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
causal_linear_attention_backward_cuda(
    const at::Tensor& grad_o, const std::optional<at::Tensor>& grad_S,
    const std::optional<at::Tensor>& grad_z, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& v, const at::Tensor& o, const at::Tensor& den, c10::string_view feature_map,
    bool normalize, const std::optional<at::Tensor>& decay, double scale,
    const std::optional<at::Tensor>& S0, const std::optional<at::Tensor>& z0,
    const std::optional<at::Tensor>& cu_seqlens) {
  const char* op = "causal_linear_attention_backward";
  const DeviceGuard guard(q.device());
  const LinearAttentionInputs in = prepare_linear_attention(
      op, q, k, v, std::string(feature_map), decay, scale, S0, z0, 0.0, cu_seqlens, false);
  const LinearAttentionGrads gr = prepare_linear_attention_grads(op, in, grad_o, grad_S, grad_z, o, den);
  const LinearAttentionGeometry& g = in.geom;
  const auto dtype = cuda_dtype(op, in.q);
  const auto acc = q.options().dtype(acc_dtype(q.scalar_type()));
  at::Tensor dq = at::empty_like(in.q), dk = at::empty_like(in.k), dv = at::empty_like(in.v);
  at::Tensor dS0 = at::empty({g.sequences(), g.H, g.Dk, g.Dv}, acc);
  at::Tensor dz0 = at::empty({g.sequences(), g.H, g.Dk}, acc);
  at::Tensor invalid = offsets_flag(in);
  at::Tensor workspace = at::empty(
      {static_cast<int64_t>(cuda::linear_attention_workspace_bytes(g, dtype))},
      q.options().dtype(at::kByte));
  cuda::LinearAttentionArgs args = base_args(in, normalize, scale, 0.0);
  args.o = gr.o.data_ptr();
  args.den = gr.den.data_ptr();
  args.grad_o = gr.grad_o.data_ptr();
  args.grad_S = data_or_null(gr.grad_S);
  args.grad_z = data_or_null(gr.grad_z);
  args.dq = dq.data_ptr();
  args.dk = dk.data_ptr();
  args.dv = dv.data_ptr();
  args.grad_S_in = dS0.data_ptr();
  args.grad_z_in = dz0.data_ptr();
  args.workspace = workspace.data_ptr();
  args.invalid = data_or_null<int>(invalid);
  SEQFUSE_CUDA_CHECK(cuda::linear_attention_backward(args, dtype, current_stream()));
  return {dq, dk, dv, dS0, dz0};
}

}  // namespace

SEQFUSE_CUDA_LIBRARY_IMPL(m) {
  m.impl("causal_linear_attention", &causal_linear_attention_cuda);
  m.impl("causal_linear_attention_backward", &causal_linear_attention_backward_cuda);
}

}  // namespace seqfuse
