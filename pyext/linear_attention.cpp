// causal_linear_attention: schemas, argument checks and the CPU registration.
#include "linear_attention.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>

#include "../csrc/cpu/linear_attention.h"
#include "checks.h"

namespace seqfuse {
namespace {

FeatureMap parse_feature_map(const char* op, const std::string& name) {
  if (name == "identity") return FeatureMap::Identity;
  if (name == "elu1") return FeatureMap::Elu1;
  if (name == "relu") return FeatureMap::Relu;
  TORCH_CHECK_VALUE(false, op, ": feature_map must be \"identity\", \"elu1\" or \"relu\", got \"",
                    name, "\"");
}

// An optional per-(b, h) tensor of the given shape, in the accumulation dtype.
at::Tensor state_input(const char* op, const char* name, const std::optional<at::Tensor>& t,
                       at::IntArrayRef shape, const char* layout, const at::Tensor& q) {
  if (!t.has_value()) return {};
  check_same_device(op, name, *t, "q", q);
  TORCH_CHECK_VALUE(t->sizes() == shape, op, ": ", name, " must be ", layout, " = ", shape,
                    ", got shape ", shape_str(*t));
  TORCH_CHECK(at::isFloatingType(t->scalar_type()), op, ": ", name,
              " must be a floating point tensor, got ", t->scalar_type());
  return t->to(acc_dtype(q.scalar_type())).contiguous();
}

}  // namespace

LinearAttentionInputs prepare_linear_attention(
    const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::string& feature_map, const std::optional<at::Tensor>& decay, double scale,
    const std::optional<at::Tensor>& S0, const std::optional<at::Tensor>& z0, double eps,
    const std::optional<at::Tensor>& cu_seqlens, bool on_cpu) {
  check_dim(op, "q", q, 4, "[B, T, H, Dk]");
  check_dim(op, "k", k, 4, "[B, T, H, Dk]");
  check_dim(op, "v", v, 4, "[B, T, H, Dv]");
  TORCH_CHECK(at::isFloatingType(q.scalar_type()), op,
              ": q must be a floating point tensor, got ", q.scalar_type());
  check_same_dtype(op, "k", k, "q", q);
  check_same_dtype(op, "v", v, "q", q);
  check_same_device(op, "k", k, "q", q);
  check_same_device(op, "v", v, "q", q);
  TORCH_CHECK_VALUE(k.sizes() == q.sizes(), op, ": k must have q's shape ", shape_str(q),
                    ", got ", shape_str(k));
  const int64_t B = q.size(0), T = q.size(1), H = q.size(2), Dk = q.size(3), Dv = v.size(3);
  TORCH_CHECK_VALUE(v.size(0) == B && v.size(1) == T && v.size(2) == H, op,
                    ": v must be [B, T, H, Dv] with q's B, T, H = ", B, ", ", T, ", ", H,
                    ", got shape ", shape_str(v));
  TORCH_CHECK_VALUE(Dk >= 1 && Dk <= kMaxHeadDim, op, ": the head dim Dk of q and k must be in [1, ",
                    kMaxHeadDim, "], got ", Dk);
  TORCH_CHECK_VALUE(Dv >= 1 && Dv <= kMaxHeadDim, op, ": the head dim Dv of v must be in [1, ",
                    kMaxHeadDim, "], got ", Dv);
  TORCH_CHECK_VALUE(std::isfinite(scale), op, ": scale must be finite, got ", scale);
  TORCH_CHECK_VALUE(std::isfinite(eps) && eps >= 0, op, ": eps must be finite and >= 0, got ", eps);

  LinearAttentionInputs in;
  in.feature_map = parse_feature_map(op, feature_map);
  in.q = q.contiguous();
  in.k = k.contiguous();
  in.v = v.contiguous();
  in.geom = {B, T, H, Dk, Dv};
  if (cu_seqlens.has_value()) {
    in.cu_seqlens = check_cu_seqlens(op, *cu_seqlens, T, "q", q, on_cpu);
    in.geom.cu_seqlens = in.cu_seqlens.data_ptr<int64_t>();
    in.geom.N = in.cu_seqlens.size(0) - 1;
  }
  if (decay.has_value()) {
    const at::Tensor& d = *decay;
    check_same_device(op, "decay", d, "q", q);
    TORCH_CHECK_VALUE(d.dim() == 1 && d.size(0) == H, op, ": decay must be [H] = [", H,
                      "] (one factor per head), got shape ", shape_str(d));
    TORCH_CHECK(at::isFloatingType(d.scalar_type()), op,
                ": decay must be a floating point tensor, got ", d.scalar_type());
    in.decay = d.to(acc_dtype(q.scalar_type())).contiguous();
    // Checked where it is free. On a GPU the check would synchronise the host on every
    // call (every decoding step): there the kernels give NaN for a head whose factor
    // is out of range instead.
    TORCH_CHECK_VALUE(!in.decay.is_cpu() || H == 0 ||
                          at::logical_and(in.decay > 0, in.decay <= 1).all().item<bool>(),
                      op, ": decay must lie in (0, 1], got ", in.decay);
  }
  const int64_t S = in.geom.sequences();
  const bool packed = cu_seqlens.has_value();
  in.S0 = state_input(op, "initial_state S", S0, {S, H, Dk, Dv},
                      packed ? "[N, H, Dk, Dv]" : "[B, H, Dk, Dv]", q);
  in.z0 = state_input(op, "initial_state z", z0, {S, H, Dk}, packed ? "[N, H, Dk]" : "[B, H, Dk]",
                      q);
  return in;
}

LinearAttentionGrads prepare_linear_attention_grads(
    const char* op, const LinearAttentionInputs& in, const at::Tensor& grad_o,
    const std::optional<at::Tensor>& grad_S, const std::optional<at::Tensor>& grad_z,
    const at::Tensor& o, const at::Tensor& den) {
  const LinearAttentionGeometry& g = in.geom;
  check_same_device(op, "grad_o", grad_o, "q", in.q);
  check_same_device(op, "o", o, "q", in.q);
  check_same_device(op, "den", den, "q", in.q);
  TORCH_CHECK_VALUE(grad_o.sizes() == in.v.sizes(), op, ": grad_o must have v's shape ",
                    shape_str(in.v), ", got ", shape_str(grad_o));
  TORCH_CHECK_VALUE(o.sizes() == in.v.sizes(), op, ": o must have v's shape ", shape_str(in.v),
                    ", got ", shape_str(o));
  TORCH_CHECK_VALUE(den.sizes() == at::IntArrayRef({g.B, g.H, g.T}), op,
                    ": den must be [B, H, T], got ", shape_str(den));
  LinearAttentionGrads out;
  out.grad_o = grad_o.to(in.q.scalar_type()).contiguous();
  out.o = o.to(in.q.scalar_type()).contiguous();
  out.den = den.to(acc_dtype(in.q.scalar_type())).contiguous();
  const int64_t S = g.sequences();
  out.grad_S = state_input(op, "grad_S", grad_S, {S, g.H, g.Dk, g.Dv}, "[S, H, Dk, Dv]", in.q);
  out.grad_z = state_input(op, "grad_z", grad_z, {S, g.H, g.Dk}, "[S, H, Dk]", in.q);
  return out;
}

namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> causal_linear_attention_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, c10::string_view feature_map,
    bool normalize, const std::optional<at::Tensor>& decay, double scale,
    const std::optional<at::Tensor>& S0, const std::optional<at::Tensor>& z0, double eps,
    const std::optional<at::Tensor>& cu_seqlens) {
  const char* op = "causal_linear_attention";
  const LinearAttentionInputs in = prepare_linear_attention(
      op, q, k, v, std::string(feature_map), decay, scale, S0, z0, eps, cu_seqlens, true);
  const LinearAttentionGeometry& g = in.geom;
  const auto acc = q.options().dtype(acc_dtype(q.scalar_type()));
  const cpu::LinearAttentionOptions opt{in.feature_map, normalize, scale, eps};
  at::Tensor o = at::empty_like(in.v);
  at::Tensor S_T = at::empty({g.sequences(), g.H, g.Dk, g.Dv}, acc);
  at::Tensor z_T = at::empty({g.sequences(), g.H, g.Dk}, acc);
  at::Tensor den = at::empty({g.B, g.H, g.T}, acc);
  // Packed sequences too: the kernel reads the offsets (checked above) from geom.
  cpu::linear_attention_forward(g, opt, in.q, in.k, in.v, in.decay, in.S0, in.z0, o, S_T, z_T,
                                den);
  return {o, S_T, z_T, den};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
causal_linear_attention_backward_cpu(
    const at::Tensor& grad_o, const std::optional<at::Tensor>& grad_S,
    const std::optional<at::Tensor>& grad_z, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& v, const at::Tensor& o, const at::Tensor& den, c10::string_view feature_map,
    bool normalize, const std::optional<at::Tensor>& decay, double scale,
    const std::optional<at::Tensor>& S0, const std::optional<at::Tensor>& z0,
    const std::optional<at::Tensor>& cu_seqlens) {
  const char* op = "causal_linear_attention_backward";
  const LinearAttentionInputs in = prepare_linear_attention(
      op, q, k, v, std::string(feature_map), decay, scale, S0, z0, 0.0, cu_seqlens, true);
  const LinearAttentionGrads gr =
      prepare_linear_attention_grads(op, in, grad_o, grad_S, grad_z, o, den);
  const LinearAttentionGeometry& g = in.geom;
  const auto acc = q.options().dtype(acc_dtype(q.scalar_type()));
  const cpu::LinearAttentionOptions opt{in.feature_map, normalize, scale, 0.0};
  at::Tensor dq = at::empty_like(in.q), dk = at::empty_like(in.k), dv = at::empty_like(in.v);
  at::Tensor dS0 = at::empty({g.sequences(), g.H, g.Dk, g.Dv}, acc);
  at::Tensor dz0 = at::empty({g.sequences(), g.H, g.Dk}, acc);
  cpu::linear_attention_backward(g, opt, gr.grad_o, gr.grad_S, gr.grad_z, in.q, in.k, in.v, gr.o,
                                 gr.den, in.decay, in.S0, in.z0, dq, dk, dv, dS0, dz0);
  return {dq, dk, dv, dS0, dz0};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(seqfuse, m) {
  m.def(
      "causal_linear_attention(Tensor q, Tensor k, Tensor v, str feature_map, bool normalize, "
      "Tensor? decay, float scale, Tensor? S0, Tensor? z0, float eps, "
      "Tensor? cu_seqlens=None) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "causal_linear_attention_backward(Tensor grad_o, Tensor? grad_S, Tensor? grad_z, "
      "Tensor q, Tensor k, Tensor v, Tensor o, Tensor den, str feature_map, bool normalize, "
      "Tensor? decay, float scale, Tensor? S0, Tensor? z0, Tensor? cu_seqlens=None) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(seqfuse, CPU, m) {
  m.impl("causal_linear_attention", &causal_linear_attention_cpu);
  m.impl("causal_linear_attention_backward", &causal_linear_attention_backward_cpu);
}

}  // namespace seqfuse
