// Per-element maths of the row-wise normalisers (docs/sparse_softmax.md), shared by
// the CPU and CUDA kernels. Every op works on contiguous rows x[0..V) of a [R, V] view.
//
//   top-k:   Omega_k = the k largest x_i; ties go to the lower index (NaN ranks above
//            +inf, as torch.topk; -0 equals +0). k >= V keeps the whole row.
//   sparse softmax:  p_i = exp(x_i - m) / s [i in Omega_k],  m = max_{Omega_k} x,
//                    s = sum_{Omega_k} exp(x_j - m)  (the log-sum-exp lse = m + log s)
//                    dx_i = p_i (g_i - sum_j p_j g_j)
//   SPACES loss:     L = (m - x_t) + log s,   dL/dx_i = p_i [i in Omega_k] - [i == t]
//   Taylor softmax:  f_n(x) = sum_{m<=n} x^m / m!,  p_i = f_n(x_i) / S,  S = sum_j f_n(x_j)
//                    dx_i = f_{n-1}(x_i) / S * (g_i - sum_j g_j p_j)
//            (a row whose S is not finite is taken in scaled terms: TaylorRow below)
//   entropy normalisation, one Newton step on q (l_i = log q_i over q_i != 0):
//                    H = -sum q l,  M = sum q l^2,  D = H^2 - M,  u = (H* - H) / D,
//                    gamma = 1 + u,  l'_i = gamma l_i - log sum_j exp(gamma l_j)
//            Every iterate is a power of the input p (L = log p), held as EntropyIterate
//            (G, R, z): l_t = G_t (L - R_t) - z_t, G_0 = 1, R_0 = z_0 = 0,
//            G_{t+1} = gamma_t G_t, R_{t+1} = the L at which G_{t+1} L is largest (the
//            row's max L for G >= 0, its min L below), z = log sum_j exp(G (L_j - R)),
//            in [0, log V]. G (L - R) <= 0 whatever G is: a product of gammas past the
//            float range sends the other entries to q = 0, where G L - log Z would be
//            inf - inf. Entries with q = 0 add nothing to a sum (the limit of q l^k).
//            The adjoint runs in log space, a_i = dJ/dl_i (at the output a_i = g_i q_i):
//                    S = sum a'_i,  b_i = a'_i - q'_i S,  gbar = sum_i b_i (l_i - c)
//            (dJ/dgamma) for any c, as the b_i sum to 0: c = the row's largest l (-z; at
//            the input max L), or a near-uniform row's gbar would cancel its terms.
//                    Hbar = -gbar (1 + 2 H u) / D,  Mbar = gbar u / D,  H*bar += gbar / D
//                    a_i = gamma b_i + q_i (-Hbar (l_i + 1) + Mbar (l_i^2 + 2 l_i))
//            and at the input dJ/dp_i = a_i / p_i, taken as
//                    gamma b_i / p_i - Hbar (L_i + 1) + Mbar (L_i^2 + 2 L_i).
//            A D below the float range makes gamma infinite and the row one-hot: there
//            every b_i and gbar are 0, and 0 times the infinite gamma (or u) is 0.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "macros.h"

namespace seqfuse {

// An unsigned integer whose order is the order of the values (the radix-select key):
// flip all bits of negatives, the sign bit of positives. NaN maps to the top key.
template <typename acc_t>
struct OrderKey;

template <>
struct OrderKey<float> {
  using type = uint32_t;
  static constexpr int kBits = 32;
  SEQFUSE_HD static uint32_t of(float x) {
    if (x != x) return 0xFFFFFFFFu;
    x += 0.0f;  // -0 -> +0
#if defined(__CUDA_ARCH__)
    const uint32_t u = __float_as_uint(x);
#else
    uint32_t u;
    std::memcpy(&u, &x, sizeof(u));
#endif
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
  }
};

template <>
struct OrderKey<double> {
  using type = uint64_t;
  static constexpr int kBits = 64;
  SEQFUSE_HD static uint64_t of(double x) {
    if (x != x) return ~uint64_t(0);
    x += 0.0;
#if defined(__CUDA_ARCH__)
    const uint64_t u = static_cast<uint64_t>(__double_as_longlong(x));
#else
    uint64_t u;
    std::memcpy(&u, &x, sizeof(u));
#endif
    const uint64_t sign = uint64_t(1) << 63;
    return (u & sign) ? ~u : (u | sign);
  }
};

template <typename acc_t>
SEQFUSE_HD typename OrderKey<acc_t>::type order_key(acc_t x) {
  return OrderKey<acc_t>::of(x);
}

// An entry of a top-k selection, ranked by key and then by the lower index.
template <typename key_t>
struct Ranked {
  key_t key;
  int64_t index;
  SEQFUSE_HD bool outranks(const Ranked& other) const {
    return key > other.key || (key == other.key && index < other.index);
  }
};

// f_n(x) and f_{n-1}(x), summed from the low-order terms up.
template <typename acc_t>
struct Taylor {
  acc_t f, df;
  SEQFUSE_HD static Taylor at(acc_t x, int order) {
    acc_t term = acc_t(1), below = acc_t(0);
    for (int m = 1; m <= order; ++m) {
      below += term;
      term *= x / acc_t(m);
    }
    return {below + term, below};
  }
};

// f_n(x) and f_{n-1}(x) as (f, df) * 2^(32 e), e >= 0: the terms are scaled down by 2^-32
// whenever one passes 1 in magnitude, so that nothing overflows for any finite x (f_n
// itself passes float32's range from |x| ~ 2^64 at n = 2, and from 2^14 at n = 8).
// Below that the result is Taylor's, e = 0. x must be finite.
template <typename acc_t>
struct ScaledTaylor {
  acc_t f, df;
  int e;
  SEQFUSE_HD static ScaledTaylor at(acc_t x, int order) {
    const acc_t step = acc_t(1) / acc_t(4294967296.0);  // 2^-32
    acc_t term = acc_t(1), below = acc_t(0);
    int e = 0;
    for (int m = 1; m <= order; ++m) {
      below += term;
      term *= x / acc_t(m);  // |term| <= 1 before, so at most |x| after: finite
      while (term > acc_t(1) || term < acc_t(-1)) {
        term *= step;
        below *= step;
        ++e;
      }
    }
    return {below + term, below, e};
  }
};

// v * 2^(-32 n), n >= 0, in steps that never underflow before the end.
template <typename acc_t>
SEQFUSE_HD acc_t scale_down_pow2_32(acc_t v, int n) {
  const acc_t step = acc_t(1) / acc_t(4294967296.0);
  for (; n > 0 && v != acc_t(0); --n) v *= step;
  return v;
}

// The normaliser of one row of the Taylor softmax. Plain: S = sum_j f_n(x_j). Where that
// is not finite, the maths may still have a finite p: the sum overflows (+inf, or NaN
// from inf - inf between the terms of a negative x) while the f_n are finite in the
// maths (f_2(float32 max) is, in float64), or an x is +inf, which makes p 0 at every
// finite x. Such a row is taken in ScaledTaylor's terms: E = max_j e_j over the finite
// x_j, each finite entry's f, df scaled by 2^(32 (e_i - E)), S their sum. An infinite or
// NaN x keeps the plain f_n (inf for +inf; NaN for -inf, inf - inf between its terms, and
// for NaN), so S is inf or NaN as in the plain sum, and p is NaN there, 0 elsewhere.
template <typename acc_t>
struct TaylorRow {
  int order;
  bool scaled;
  int E;
  acc_t S;
  // Entry x's f_n in the row's scale.
  SEQFUSE_HD acc_t term(acc_t x) const { return scaled_at(x).f; }
  // (p_i, f_{n-1}(x_i) / S) of entry x.
  SEQFUSE_HD Taylor<acc_t> normalised(acc_t x) const {
    const Taylor<acc_t> t = scaled_at(x);
    return {t.f / S, t.df / S};
  }

 private:
  SEQFUSE_HD Taylor<acc_t> scaled_at(acc_t x) const {
    if (!scaled || !(x - x == acc_t(0))) return Taylor<acc_t>::at(x, order);
    const ScaledTaylor<acc_t> t = ScaledTaylor<acc_t>::at(x, order);
    return {scale_down_pow2_32(t.f, E - t.e), scale_down_pow2_32(t.df, E - t.e)};
  }
};

// The log-sum-exp over Omega_k in two parts, m = max_{Omega_k} x and s = sum exp(x - m)
// (so nothing overflows, and s >= 1), never added: m + log s rounded to acc_t loses log s
// to the rounding of m, up to |m| ulp, and exp(x - lse) with it (past |x| ~ 2^8 in float32
// p would leave the dtype's tolerance, and two entries at the float32 max would both get
// p = 1). So p = exp(x - m) / s, L = (m - x_t) + log s, dL/dx = exp((x - m) - log s).
// A kept +inf makes s = exp(inf - inf) = NaN. The softmaxes keep it: a NaN normaliser
// poisons their row, as torch.softmax's exp(x - max) does. The loss takes the true value
// lse = +inf (as torch.logsumexp), as m = +inf with log s = 0: L = +inf (NaN if x_t is the
// +inf) and dL/dx_i = exp((x_i - m) - log s) - [i == t] is NaN at the +inf entries only.
template <typename acc_t>
struct KeptLse {
  acc_t m, s, log_s;  // log_s: log(s), computed by the caller (host or device log)
  // The (m, log s) the loss and its gradient use.
  SEQFUSE_HD KeptLse for_loss() const {
    return m == acc_t(INFINITY) ? KeptLse{m, acc_t(1), acc_t(0)} : *this;
  }
};

// Scalars of one Newton step of entropy normalisation (see the top of this file).
template <typename acc_t>
struct EntropyStep {
  acc_t H, D, u, gamma;
  SEQFUSE_HD static EntropyStep of(acc_t sum_qL, acc_t sum_qL2, acc_t target) {
    EntropyStep s;
    s.H = -sum_qL;
    s.D = s.H * s.H - sum_qL2;
    // A uniform row (D = 0) has no direction to move in: leave it as it is.
    s.u = s.D != acc_t(0) ? (target - s.H) / s.D : acc_t(0);
    s.gamma = acc_t(1) + s.u;
    return s;
  }
};

// One iterate of entropy normalisation, l = G (L - R) - z (see the top of this file).
template <typename acc_t>
struct EntropyIterate {
  acc_t G, R, z;
  // The input itself: l_0 = L.
  SEQFUSE_HD static EntropyIterate input() { return {acc_t(1), acc_t(0), acc_t(0)}; }
  // G' = gamma G, R' where G' L is largest over the row's L in [L_min, L_max]; z' is the
  // caller's, log sum_j exp(G' (L_j - R')), after this.
  SEQFUSE_HD EntropyIterate next(acc_t gamma, acc_t L_min, acc_t L_max) const {
    const acc_t g = G * gamma;
    return {g, g >= acc_t(0) ? L_max : L_min, acc_t(0)};
  }
  // l for an entry of the support (L > -inf). At R itself the product is 0 even for an
  // infinite G (one-hot rows), where G * 0 would be NaN.
  SEQFUSE_HD acc_t log_q(acc_t L) const { return L == R ? -z : G * (L - R) - z; }
};

// gamma x, and 0 for x = 0 even where gamma is infinite (a D below the float range): the
// limit along a step that makes the row one-hot, whose gradient is 0.
template <typename acc_t>
SEQFUSE_HD acc_t entropy_scale(acc_t gamma, acc_t x) {
  return x == acc_t(0) ? acc_t(0) : gamma * x;
}

}  // namespace seqfuse
