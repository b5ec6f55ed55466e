// Geometry and element maths of causal linear attention (docs/linear_attention.md),
// shared by the CPU and CUDA kernels. Per (batch, head), with phi the feature map and
// gamma the head's decay (1 without decay):
//
//   S_i = gamma S_{i-1} + phi(k_i) v_i^T          z_i = gamma z_{i-1} + phi(k_i)
//   o_i = scale phi(q_i)^T S_i / den_i,   den_i = scale phi(q_i)^T z_i + eps   (normalize)
//   o_i = scale phi(q_i)^T S_i                                                 (otherwise)
//
// Both kernels carry z as one more column of S: with v'_i = [v_i, 1] the state is
// S'_i = [S_i, z_i] ([Dk, Dv+1]) and n'_i = scale phi(q_i)^T S'_i = [num_i, den_i - eps].
// Time is cut into chunks of C steps; inside a chunk (local positions r, s) with
// carry-in S' and M_rs = gamma^(r-s) for s <= r (0 above the diagonal):
//
//   n'_r  = scale ((phi(Q) phi(K)^T . M) V' + diag(gamma^(r+1)) phi(Q) S')_r
//   S'   <- gamma^C S' + (diag(gamma^(C-1-s)) phi(K))^T V'
//
// Backward, with g_i = dL/dn'_i = [do_i / den_i, -(do_i . o_i) / den_i] (normalize) or
// [do_i, 0], and W = dL/dS' at the chunk's last step, flowing from the future (at the
// end of the sequence: the gradient of the returned final state, [dS_T, dz_T]):
//
//   dphi(Q) = scale ((G V'^T . M) phi(K) + diag(gamma^(r+1)) G S'^T)   (forward sweep)
//   dphi(K) = scale (G V'^T . M)^T phi(Q) + diag(gamma^(C-1-s)) V' W^T  (reverse sweep)
//   dV'     = scale (phi(Q) phi(K)^T . M)^T G + diag(gamma^(C-1-s)) phi(K) W
//   W      <- gamma^C W + scale (diag(gamma^(r+1)) phi(Q))^T G,  and dS'_0 = W after chunk 0
//   dq = dphi(Q) * phi'(q),  dk = dphi(K) * phi'(k)
#pragma once

#include <cmath>
#include <cstdint>

#include "macros.h"
#include "packed.h"

namespace seqfuse {

enum class FeatureMap : int { Identity = 0, Elu1 = 1, Relu = 2 };

// Head dims above this are refused before any kernel runs.
constexpr int64_t kMaxHeadDim = 256;

// q, k: contiguous [B, T, H, Dk]; v, o: contiguous [B, T, H, Dv]; states per (b, h).
// Packed sequences (packed.h): each is a causal product of its own with its own state
// (states per (n, h)): nothing crosses a boundary.
struct LinearAttentionGeometry {
  int64_t B, T, H, Dk, Dv;
  const int64_t* cu_seqlens = nullptr;  // packed sequences, or null
  int64_t N = 0;                        // sequences, with cu_seqlens

  using Span = seqfuse::Span;
  SEQFUSE_HD int64_t sequences() const { return cu_seqlens ? N : B; }
  SEQFUSE_HD Span span(int64_t n) const { return sequence_span(cu_seqlens, n, T); }

  SEQFUSE_HD int64_t qk_offset(int64_t b, int64_t t, int64_t h) const {
    return ((b * T + t) * H + h) * Dk;
  }
  SEQFUSE_HD int64_t v_offset(int64_t b, int64_t t, int64_t h) const {
    return ((b * T + t) * H + h) * Dv;
  }
};

// phi; NaN in, NaN out (relu too: max(NaN, 0) must not be 0, or a NaN would vanish).
template <FeatureMap F, typename T>
SEQFUSE_HD T feature(T x) {
  using std::exp;
  if constexpr (F == FeatureMap::Elu1) {
    return x > T(0) ? x + T(1) : exp(x);
  } else if constexpr (F == FeatureMap::Relu) {
    return x > T(0) || x != x ? x : T(0);
  } else {
    return x;
  }
}

// d phi / dx; at 0, relu's derivative is taken as 0 (as torch.relu's backward does); at
// a NaN x it is NaN.
template <FeatureMap F, typename T>
SEQFUSE_HD T feature_grad(T x) {
  using std::exp;
  if constexpr (F == FeatureMap::Elu1) {
    return x > T(0) ? T(1) : exp(x);
  } else if constexpr (F == FeatureMap::Relu) {
    return x > T(0) ? T(1) : (x == x ? T(0) : x);
  } else {
    return T(1);
  }
}

}  // namespace seqfuse
