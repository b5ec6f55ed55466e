// linear_sparse_softmax_cross_entropy: the SPACES loss straight from the LM head,
// without the [N, V] logits. Schemas, argument checks, the chunked algorithm and the CPU
// registration; kernels: csrc/cpu/linear_cross_entropy.cpp (CUDA:
// linear_cross_entropy_cuda.cpp).
//
//   s_n = W h_n + b  [V],  Omega_n = the k largest of s_n (ties: the lower index)
//   L_n = logsumexp_{Omega_n} s_n - s_{n, t_n} = (m_n - s_{n, t_n}) + log sum_{Omega_n}
//         exp(s_ni - m_n),  m_n = max_{Omega_n} s_n   (the two parts never added: see
//         KeptLse in csrc/common/row_softmax.h)
//   g_ni = p_ni [i in Omega_n] - [i = t_n],   p_n = softmax_{Omega_n}(s_n)
//   dh_n = dL_n sum_i g_ni W_i,  dW_i = sum_n dL_n g_ni h_n,  db_i = sum_n dL_n g_ni
//
// Forward, k < V. The vocabulary is walked in chunks of C >= k columns, and one chunk
// of logits S = h W_c^T + b_c [N, C] is all that exists of them at a time. Each row
// keeps its best k so far, best first; the next chunk is ranked together with them, and
// the top k of [kept | S] by the row kernels' selection (ties to the lower position)
// are the top k of every column seen so far: kept entries precede the chunk in the
// vocabulary, and listed best first with ties in index order they rank among
// themselves as their indices do. s_t is read from the chunk that holds t. Stored for
// the backward: p and the indices of Omega ([N, k] each) and the lse as (m, log s).
//
// Backward, k < V. The J = k + 1 non-zeros of each row of g, coef = dL [p - [i = t] | -1]
// at [indices | t], the last one none where t is among the indices (its -1 joins p there
// in one coefficient: p h - h apart is NaN for an infinite h where p = 0) and none for an
// ignored row, are gathered for dh and scattered for dW and db in the order of a stable
// sort of the indices: deterministic, and no product with V in it.
//
// k = V keeps every logit: the forward takes an online logsumexp over the chunks (as
// (m, log s), combined chunk by chunk) and the backward recomputes each chunk's logits for
// dense products, as a fused dense cross-entropy does.
#include "linear_cross_entropy.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>

#include "../csrc/cpu/linear_cross_entropy.h"
#include "checks.h"

namespace seqfuse {
namespace {

constexpr const char* kOp = "linear_sparse_softmax_cross_entropy";
constexpr const char* kBackwardOp = "linear_sparse_softmax_cross_entropy_backward";

struct Problem {
  at::Tensor h, W, t;   // hidden [N, D], weight [V, D], target [N] with ignored rows -> 0
  at::Tensor ignored;   // bool [N]
  std::optional<at::Tensor> b;
  int64_t N, D, V, k, C;  // C: the chunk width
  at::TensorOptions acc;  // the accumulation dtype
};

Problem check_inputs(const char* op, const LinearCrossEntropyKernels& kernels,
                     const at::Tensor& hidden, const at::Tensor& weight,
                     const std::optional<at::Tensor>& bias, const at::Tensor& target, int64_t k,
                     int64_t ignore_index, std::optional<int64_t> chunk_size) {
  check_dim(op, "hidden", hidden, 2, "[N, D]");
  TORCH_CHECK(at::isFloatingType(hidden.scalar_type()), op,
              ": hidden must be a floating point tensor, got ", hidden.scalar_type());
  check_dim(op, "weight", weight, 2, "[V, D]");
  check_same_device(op, "weight", weight, "hidden", hidden);
  check_same_dtype(op, "weight", weight, "hidden", hidden);
  TORCH_CHECK_VALUE(weight.size(1) == hidden.size(1), op, ": weight must be [V, D] with D = ",
                    hidden.size(1), " (hidden's last dim), got ", shape_str(weight));
  const int64_t V = weight.size(0);
  if (bias) {
    check_same_device(op, "bias", *bias, "hidden", hidden);
    check_same_dtype(op, "bias", *bias, "hidden", hidden);
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == V, op, ": bias must be [V] = [", V,
                      "] to match weight ", shape_str(weight), ", got ", shape_str(*bias));
  }
  TORCH_CHECK_VALUE(k >= 1 && k <= V, op, ": k must be in [1, V] = [1, ", V,
                    "] (the logits kept per row), got ", k);
  TORCH_CHECK_VALUE(!chunk_size || *chunk_size >= 1, op,
                    ": chunk_size must be a positive int (logits per row computed at once), got ",
                    chunk_size.value_or(0));
  check_class_target(op, target, V, ignore_index, "hidden", hidden);
  Problem p;
  p.N = hidden.size(0);
  p.D = hidden.size(1);
  p.V = V;
  p.k = k;
  const int64_t per_row = kernels.tile_logits / std::max<int64_t>(p.N, 1);
  p.C = std::min(V, std::max(k, chunk_size.value_or(std::max<int64_t>(128, per_row))));
  p.h = hidden.contiguous();
  p.W = weight.contiguous();
  p.b = bias;
  p.ignored = target.eq(ignore_index);
  p.t = target.masked_fill(p.ignored, 0);
  p.acc = hidden.options().dtype(acc_dtype(hidden.scalar_type()));
  return p;
}

// out [N, w] (any row stride) = h W[v0, v0 + w)^T + b[v0, v0 + w).
void chunk_logits(const Problem& p, int64_t v0, int64_t w, at::Tensor out) {
  const at::Tensor Wc = p.W.narrow(0, v0, w);
  if (p.b) {
    at::addmm_out(out, p.b->narrow(0, v0, w), p.h, Wc.t());
  } else {
    at::mm_out(out, p.h, Wc.t());
  }
}

// The target's column in a chunk [v0, v0 + w) of logits held from column `held` of
// `logits`, and whether the chunk holds it.
struct TargetColumn {
  at::Tensor column, in_chunk;
  TargetColumn(const Problem& p, int64_t v0, int64_t w, int64_t held)
      : column((p.t - v0).clamp(0, w - 1).add_(held).unsqueeze(1)),
        in_chunk(p.t.ge(v0).logical_and_(p.t.lt(v0 + w))) {}
  at::Tensor pick(const at::Tensor& logits, const at::Tensor& previous, const Problem& p) const {
    return at::where(in_chunk, logits.gather(1, column).squeeze(1).to(p.acc.dtype()), previous);
  }
};

struct Forward {
  at::Tensor lse, target_logit, probs, indices;  // lse: [N, 2], (m, log s)
};

// The log-sum-exp of each row of s [N, n] (n >= 1, the accumulation dtype) in two parts,
// [N, 2] = (m, log s): m the row's maximum (NaN if it holds one), log s = log sum exp(s - m),
// and log s = 0 where m = +inf (the row kernels' KeptLse::for_loss).
at::Tensor lse_parts(const at::Tensor& s) {
  const at::Tensor m = s.amax(1);
  const at::Tensor shift = at::where(m.isfinite(), m, at::zeros_like(m));
  const at::Tensor log_s = at::logsumexp(s - shift.unsqueeze(1), {1});
  return at::stack({m, log_s.masked_fill(m.eq(std::numeric_limits<double>::infinity()), 0)}, 1);
}

// Two chunks' (m, log s) as one: the larger m, and the sums rescaled to it.
at::Tensor combine_lse_parts(const at::Tensor& a, const at::Tensor& b) {
  const at::Tensor ma = a.select(1, 0), mb = b.select(1, 0);
  const at::Tensor m = at::maximum(ma, mb);
  const at::Tensor shift = at::where(m.isfinite(), m, at::zeros_like(m));
  const at::Tensor log_s =
      at::logaddexp(a.select(1, 1) + (ma - shift), b.select(1, 1) + (mb - shift));
  return at::stack({m, log_s.masked_fill(m.eq(std::numeric_limits<double>::infinity()), 0)}, 1);
}

// exp(s - lse) for rows s [N, n] and their (m, log s) [N, 2].
at::Tensor exp_minus_lse(const at::Tensor& s, const at::Tensor& lse) {
  return at::exp((s - lse.select(1, 0).unsqueeze(1)) - lse.select(1, 1).unsqueeze(1));
}

Forward sparse_forward(const LinearCrossEntropyKernels& kernels, const Problem& p) {
  const int64_t k = p.k;
  at::Tensor kept, kept_index;  // [N, k]: the best logits so far, best first
  at::Tensor target_logit = at::zeros({p.N}, p.acc);
  for (int64_t v0 = 0; v0 < p.V; v0 += p.C) {
    const int64_t w = std::min(p.C, p.V - v0);
    const int64_t held = v0 == 0 ? 0 : k;
    at::Tensor candidates = at::empty({p.N, held + w}, p.h.options());
    if (held) candidates.narrow(1, 0, k).copy_(kept);
    chunk_logits(p, v0, w, candidates.narrow(1, held, w));
    target_logit = TargetColumn(p, v0, w, held).pick(candidates, target_logit, p);
    at::Tensor unused = at::empty({p.N, k}, p.h.options());
    at::Tensor position = at::empty({p.N, k}, p.h.options().dtype(at::kLong));
    kernels.rows().topk_softmax_forward(candidates, unused, position);
    kept = candidates.gather(1, position);
    kept_index = held ? at::where(position.lt(k), kept_index.gather(1, position.clamp_max(k - 1)),
                                  position + (v0 - k))
                      : position;
  }
  const at::Tensor s = kept.to(p.acc.dtype());
  const at::Tensor lse = lse_parts(s);
  return {lse, target_logit, exp_minus_lse(s, lse), kept_index};
}

Forward dense_forward(const Problem& p) {
  at::Tensor lse;
  at::Tensor target_logit = at::zeros({p.N}, p.acc);
  at::Tensor logits = at::empty({p.N, p.C}, p.h.options());
  for (int64_t v0 = 0; v0 < p.V; v0 += p.C) {
    const int64_t w = std::min(p.C, p.V - v0);
    at::Tensor S = w == p.C ? logits : logits.narrow(1, 0, w);
    chunk_logits(p, v0, w, S);
    const at::Tensor chunk = lse_parts(S.to(p.acc.dtype()));
    lse = v0 == 0 ? chunk : combine_lse_parts(lse, chunk);
    target_logit = TargetColumn(p, v0, w, 0).pick(S, target_logit, p);
  }
  const auto none = p.acc.dtype(at::kLong);
  return {lse, target_logit, at::empty({p.N, 0}, p.acc), at::empty({p.N, 0}, none)};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_cross_entropy_impl(
    const LinearCrossEntropyKernels& kernels, const at::Tensor& hidden, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& target, int64_t k,
    int64_t ignore_index, std::optional<int64_t> chunk_size) {
  const Problem p =
      check_inputs(kOp, kernels, hidden, weight, bias, target, k, ignore_index, chunk_size);
  const int64_t kk = k < p.V ? k : 0;
  if (p.N == 0) {
    return {at::empty({0}, p.acc), at::empty({0, 2}, p.acc), at::empty({0, kk}, p.acc),
            at::empty({0, kk}, p.acc.dtype(at::kLong))};
  }
  const Forward f = kk ? sparse_forward(kernels, p) : dense_forward(p);
  at::Tensor loss =
      ((f.lse.select(1, 0) - f.target_logit) + f.lse.select(1, 1)).masked_fill_(p.ignored, 0);
  return {loss, f.lse, f.probs, f.indices};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_cross_entropy_backward_impl(
    const LinearCrossEntropyKernels& kernels, const at::Tensor& grad_loss,
    const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& target, const at::Tensor& lse, const at::Tensor& probs,
    const at::Tensor& indices, int64_t k, int64_t ignore_index, std::optional<int64_t> chunk_size) {
  const char* op = kBackwardOp;
  const Problem p =
      check_inputs(op, kernels, hidden, weight, bias, target, k, ignore_index, chunk_size);
  const int64_t kk = k < p.V ? k : 0;
  check_same_device(op, "grad_loss", grad_loss, "hidden", hidden);
  TORCH_CHECK_VALUE(grad_loss.dim() == 1 && grad_loss.size(0) == p.N, op,
                    ": grad_loss must be [N] = [", p.N, "], got ", shape_str(grad_loss));
  check_same_device(op, "lse", lse, "hidden", hidden);
  TORCH_CHECK_VALUE(lse.dim() == 2 && lse.size(0) == p.N && lse.size(1) == 2, op,
                    ": lse must be [N, 2] = [", p.N, ", 2] (as the forward returned it), got ",
                    shape_str(lse));
  for (const auto& [name, t] : {std::pair{"probs", &probs}, std::pair{"indices", &indices}}) {
    check_same_device(op, name, *t, "hidden", hidden);
    TORCH_CHECK_VALUE(t->dim() == 2 && t->size(0) == p.N && t->size(1) == kk, op, ": ", name,
                      " must be [N, k] = [", p.N, ", ", kk, "] (as the forward returned it), got ",
                      shape_str(*t));
  }
  TORCH_CHECK(indices.scalar_type() == at::kLong, op, ": indices must be int64, got ",
              indices.scalar_type());
  const at::Tensor rows_out = p.ignored.unsqueeze(1);
  const at::Tensor dL = grad_loss.to(p.acc.dtype()).masked_fill(p.ignored, 0).unsqueeze(1);
  at::Tensor grad_hidden, grad_weight, grad_bias;
  if (kk) {
    const at::Tensor at_t = indices.eq(p.t.unsqueeze(1));  // [N, k]: where t is kept
    const at::Tensor t_kept = at_t.any(1, /*keepdim=*/true);
    const at::Tensor coef = at::cat({(probs.to(p.acc.dtype()) - at_t.to(p.acc.dtype())) * dL,
                                     (-dL).masked_fill(t_kept, 0)},
                                    1)
                                .masked_fill_(rows_out, 0);
    const at::Tensor index =
        at::cat({indices, p.t.unsqueeze(1).masked_fill(t_kept, p.V)}, 1).masked_fill_(rows_out, p.V);
    grad_hidden = at::empty({p.N, p.D}, p.h.options());
    kernels.gather_weight_rows(coef, index, p.W, grad_hidden);
    const auto [sorted, order] = index.flatten().sort(/*stable=*/true, 0, /*descending=*/false);
    grad_weight = at::zeros_like(p.W);
    grad_bias = at::zeros({p.V}, p.acc);
    kernels.scatter_weight_rows(sorted, order, coef, p.h, kk + 1, grad_weight, grad_bias);
  } else {
    at::Tensor gh = at::zeros({p.N, p.D}, p.acc);
    const at::Tensor h_kept = p.h.masked_fill(rows_out, 0);  // an ignored row reaches nothing
    grad_weight = at::empty_like(p.W);
    grad_bias = at::empty({p.V}, p.acc);
    for (int64_t v0 = 0; v0 < p.V; v0 += p.C) {
      const int64_t w = std::min(p.C, p.V - v0);
      at::Tensor S = at::empty({p.N, w}, p.h.options());
      chunk_logits(p, v0, w, S);
      const TargetColumn target_column(p, v0, w, 0);
      at::Tensor G = exp_minus_lse(S.to(p.acc.dtype()), lse.to(p.acc.dtype())) * dL;
      G.scatter_add_(1, target_column.column,
                     at::where(target_column.in_chunk.unsqueeze(1), -dL, at::zeros_like(dL)));
      G.masked_fill_(rows_out, 0);
      const at::Tensor Gs = G.to(p.h.scalar_type());
      gh.add_(at::mm(Gs, p.W.narrow(0, v0, w)));
      at::Tensor grad_weight_rows = grad_weight.narrow(0, v0, w);
      at::mm_out(grad_weight_rows, Gs.t(), h_kept);
      grad_bias.narrow(0, v0, w).copy_(G.sum(0));
    }
    // An ignored row's G is 0, but 0 times a non-finite weight entry is NaN: it gets no
    // gradient, whatever the weight holds.
    grad_hidden = gh.masked_fill_(rows_out, 0).to(p.h.scalar_type());
  }
  return {grad_hidden, grad_weight, grad_bias.to(p.h.scalar_type())};
}

TORCH_LIBRARY_FRAGMENT(seqfuse, m) {
  m.def(
      "linear_sparse_softmax_cross_entropy(Tensor hidden, Tensor weight, Tensor? bias, "
      "Tensor target, int k, int ignore_index, int? chunk_size) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "linear_sparse_softmax_cross_entropy_backward(Tensor grad_loss, Tensor hidden, "
      "Tensor weight, Tensor? bias, Tensor target, Tensor lse, Tensor probs, Tensor indices, "
      "int k, int ignore_index, int? chunk_size) -> (Tensor, Tensor, Tensor)");
}

namespace {

// float32 and float64 only on CPU: the half types have no fast CPU matrix product.
void check_cpu_dtype(const at::Tensor& hidden) {
  TORCH_CHECK(hidden.scalar_type() == at::kFloat || hidden.scalar_type() == at::kDouble, kOp,
              ": hidden must be float32 or float64 on CPU, got ", hidden.scalar_type());
}

// 4M logits (16 MB in float32) per chunk: the product stays efficient and the chunk
// mostly in cache while its top k are taken.
const LinearCrossEntropyKernels kCpuKernels = {cpu_row_kernels, cpu::gather_weight_rows,
                                               cpu::scatter_weight_rows, int64_t(1) << 22,
                                               check_cpu_dtype};

}  // namespace

TORCH_LIBRARY_IMPL(seqfuse, CPU, m) { register_linear_cross_entropy<kCpuKernels>(m); }

}  // namespace seqfuse
