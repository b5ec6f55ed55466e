// causal_linear_attention: the CUDA registration. Kernels: csrc/cuda/linear_attention.cu.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "../csrc/cuda/linear_attention.h"
#include "checks.h"
#include "cuda_utils.h"
#include "linear_attention.h"

namespace seqfuse {
namespace {

// S' = [S, z] ([B, H, Dk, Dv+1]) from the two halves of a state, either of which may be
// undefined (zeros); undefined when both are.
at::Tensor joined_state(const at::Tensor& S, const at::Tensor& z, const LinearAttentionGeometry& g,
                        const at::TensorOptions& acc) {
  if (!S.defined() && !z.defined()) return {};
  at::Tensor s = S.defined() ? S : at::zeros({g.B, g.H, g.Dk, g.Dv}, acc);
  at::Tensor c = z.defined() ? z.unsqueeze(-1) : at::zeros({g.B, g.H, g.Dk, 1}, acc);
  return at::cat({s, c}, -1).contiguous();
}

cuda::LinearAttentionArgs base_args(const LinearAttentionInputs& in, bool normalize, double scale,
                                    double eps, const at::Tensor& state_in) {
  cuda::LinearAttentionArgs args{};
  args.geom = in.geom;
  args.feature_map = in.feature_map;
  args.normalize = normalize;
  args.scale = scale;
  args.eps = eps;
  args.decay = in.decay.defined() ? in.decay.data_ptr() : nullptr;
  args.q = in.q.data_ptr();
  args.k = in.k.data_ptr();
  args.v = in.v.data_ptr();
  args.state_in = state_in.defined() ? state_in.data_ptr() : nullptr;
  return args;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> causal_linear_attention_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, c10::string_view feature_map,
    bool normalize, const std::optional<at::Tensor>& decay, double scale,
    const std::optional<at::Tensor>& S0, const std::optional<at::Tensor>& z0, double eps) {
  const char* op = "causal_linear_attention";
  const c10::cuda::CUDAGuard guard(q.device());
  const LinearAttentionInputs in =
      prepare_linear_attention(op, q, k, v, std::string(feature_map), decay, scale, S0, z0, eps);
  const LinearAttentionGeometry& g = in.geom;
  const auto dtype = cuda_dtype(op, in.q);
  const auto acc = q.options().dtype(acc_dtype(q.scalar_type()));
  const at::Tensor state_in = joined_state(in.S0, in.z0, g, acc);
  at::Tensor o = at::empty_like(in.v);
  at::Tensor state_out = at::empty({g.B, g.H, g.Dk, g.Dv + 1}, acc);
  at::Tensor den = at::empty({g.B, g.H, g.T}, acc);
  cuda::LinearAttentionArgs args = base_args(in, normalize, scale, eps, state_in);
  args.o = o.data_ptr();
  args.state_out = state_out.data_ptr();
  args.den = den.data_ptr();
  C10_CUDA_CHECK(cuda::linear_attention_forward(args, dtype, current_stream()));
  return {o, state_out.narrow(-1, 0, g.Dv).contiguous(), state_out.select(-1, g.Dv).contiguous(),
          den};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
causal_linear_attention_backward_cuda(
    const at::Tensor& grad_o, const std::optional<at::Tensor>& grad_S,
    const std::optional<at::Tensor>& grad_z, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& v, const at::Tensor& o, const at::Tensor& den, c10::string_view feature_map,
    bool normalize, const std::optional<at::Tensor>& decay, double scale,
    const std::optional<at::Tensor>& S0, const std::optional<at::Tensor>& z0) {
  const char* op = "causal_linear_attention_backward";
  const c10::cuda::CUDAGuard guard(q.device());
  const LinearAttentionInputs in =
      prepare_linear_attention(op, q, k, v, std::string(feature_map), decay, scale, S0, z0, 0.0);
  const LinearAttentionGrads gr = prepare_linear_attention_grads(op, in, grad_o, grad_S, grad_z, o, den);
  const LinearAttentionGeometry& g = in.geom;
  const auto dtype = cuda_dtype(op, in.q);
  const auto acc = q.options().dtype(acc_dtype(q.scalar_type()));
  const at::Tensor state_in = joined_state(in.S0, in.z0, g, acc);
  const at::Tensor grad_state = joined_state(gr.grad_S, gr.grad_z, g, acc);
  at::Tensor dq = at::empty_like(in.q), dk = at::empty_like(in.k), dv = at::empty_like(in.v);
  at::Tensor grad_state_in = at::empty({g.B, g.H, g.Dk, g.Dv + 1}, acc);
  at::Tensor workspace = at::empty(
      {static_cast<int64_t>(cuda::linear_attention_workspace_bytes(g, dtype))},
      q.options().dtype(at::kByte));
  cuda::LinearAttentionArgs args = base_args(in, normalize, scale, 0.0, state_in);
  args.o = gr.o.data_ptr();
  args.den = gr.den.data_ptr();
  args.grad_o = gr.grad_o.data_ptr();
  args.grad_state = grad_state.defined() ? grad_state.data_ptr() : nullptr;
  args.dq = dq.data_ptr();
  args.dk = dk.data_ptr();
  args.dv = dv.data_ptr();
  args.grad_state_in = grad_state_in.data_ptr();
  args.workspace = workspace.data_ptr();
  C10_CUDA_CHECK(cuda::linear_attention_backward(args, dtype, current_stream()));
  return {dq, dk, dv, grad_state_in.narrow(-1, 0, g.Dv).contiguous(),
          grad_state_in.select(-1, g.Dv).contiguous()};
}

}  // namespace

TORCH_LIBRARY_IMPL(seqfuse, CUDA, m) {
  m.impl("causal_linear_attention", &causal_linear_attention_cuda);
  m.impl("causal_linear_attention_backward", &causal_linear_attention_backward_cuda);
}

}  // namespace seqfuse
