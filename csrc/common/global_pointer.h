// Geometry and element maths of GlobalPointer (docs/global_pointer.md), shared by
// the CPU and CUDA kernels.
//
//   RoPE, pairs (2i, 2i+1), theta_i = base^(-2i/D), angle a = pos * theta_i:
//     (R x)_{2i} = x_{2i} cos a - x_{2i+1} sin a,   (R x)_{2i+1} = x_{2i+1} cos a + x_{2i} sin a
//     R^T is the rotation by -a, so the backward of RoPE is RoPE with `inverse`.
//
//   scores  s[b,h,i,j] = scale * (R_i q[b,i,h]) . (R_j k[b,j,h]) + bs[b,h,i] + be[b,h,j],
//           s = -inf where mask[b,i] == 0, mask[b,j] == 0 or (tril and i > j).
//
//   multilabel categorical crossentropy of one row s[0..N) is the sum of two terms,
//     neg = log(1 + sum_i (1 - t_i) e^{s_i}),   pos = log(1 + sum_i t_i e^{-s_i})
//   (hard labels: t in {0, 1}; sparse labels: t_i = 1 on the listed positives), where
//   entries with s = -inf are left out of both sums. Each term is accumulated over its
//   own entries (Log1pSumExp), never as a difference of two sums, so it cannot cancel.
//   Gradients, with g_neg, g_pos the upstream gradients of the terms:
//     d/ds_i = g_neg (1 - t_i) e^{s_i - neg} - g_pos t_i e^{-s_i - pos}.
//   mask_zero (sparse labels, as bert4keras): flat index 0 is a padding slot, so
//   pos_index entries 0 are no positives AND score 0 (span (0, 0)) is left out of the
//   negative sum too, exactly as if s_0 were -inf; its gradient is 0.
#pragma once

#include <cmath>
#include <cstdint>

#include "macros.h"

namespace seqfuse {

// q, k: contiguous [B, L, Hqk, D] with Hqk == H, or Hqk == 1 shared by every head;
// bias_start, bias_end: contiguous [B, H, L]; mask: contiguous [B, L] bytes;
// scores: contiguous [B, H, L, L].
struct GPGeometry {
  int64_t B, L, H, Hqk, D;
  bool rope, tril;
  double scale;

  SEQFUSE_HD int64_t qk_offset(int64_t b, int64_t l, int64_t h) const {
    return ((b * L + l) * Hqk + (Hqk == 1 ? 0 : h)) * D;
  }
  SEQFUSE_HD int64_t row(int64_t b, int64_t h) const { return b * H + h; }
  SEQFUSE_HD int64_t bias_offset(int64_t b, int64_t h, int64_t l) const {
    return (b * H + h) * L + l;
  }
  SEQFUSE_HD int64_t score_offset(int64_t b, int64_t h, int64_t i, int64_t j) const {
    return ((b * H + h) * L + i) * L + j;
  }
  // Whether s[b, ., i, j] is masked to -inf; mask may be null (no padding).
  SEQFUSE_HD bool masked(const uint8_t* mask, int64_t b, int64_t i, int64_t j) const {
    return (tril && i > j) || (mask && (!mask[b * L + i] || !mask[b * L + j]));
  }
};

// global_pointer_scores and global_pointer_loss rotate by positions 0..L-1 with this base.
constexpr double kScoresRopeBase = 10000.0;

// theta_i = base^(-2i/D), the frequency of pair i, in double.
SEQFUSE_HD double rope_theta(int64_t i, int64_t D, double log_base) {
  return exp(-double(2 * i) / double(D) * log_base);
}

// cos and sin of the angle pos * theta. The angle is formed and reduced to [-pi, pi]
// in double, so float kernels lose nothing at long positions.
#ifdef __CUDA_ARCH__
// sin and cos of pi * t. Their argument reduction is exact, so unlike sin/cos they carry
// no slow path through local memory, which would spill the kernels that rotate tiles.
__device__ __forceinline__ void sincospi_of(float t, float& s, float& c) { sincospif(t, &s, &c); }
__device__ __forceinline__ void sincospi_of(double t, double& s, double& c) { sincospi(t, &s, &c); }
#endif

template <typename acc_t>
SEQFUSE_HD void rope_cos_sin_at(double pos, double theta, bool inverse, acc_t& c, acc_t& s) {
  constexpr double kPi = 3.1415926535897932384626433832795;
  double a = pos * theta;
  a -= 2 * kPi * rint(a / (2 * kPi));
  if (inverse) a = -a;
#ifdef __CUDA_ARCH__
  sincospi_of(acc_t(a / kPi), s, c);
#else
  c = cos(acc_t(a));
  s = sin(acc_t(a));
#endif
}

// cos and sin of the RoPE angle of pair i at position pos.
template <typename acc_t>
SEQFUSE_HD void rope_cos_sin(double pos, int64_t i, int64_t D, double log_base, bool inverse,
                             acc_t& c, acc_t& s) {
  rope_cos_sin_at(pos, rope_theta(i, D, log_base), inverse, c, s);
}

// Rotates one pair in place.
template <typename acc_t>
SEQFUSE_HD void rope_rotate(acc_t& x0, acc_t& x1, acc_t c, acc_t s) {
  const acc_t y0 = x0 * c - x1 * s;
  x1 = x1 * c + x0 * s;
  x0 = y0;
}

// log(1 + sum_k e^{x_k}): the terms are accumulated as e^m * z, m their running
// maximum, so nothing overflows; the "1" is added at the end by a stable softplus,
// which keeps tiny results (1e-7 and below) exact in float32. -inf terms add nothing
// and NaN propagates: a NaN term or partial takes the `!(x <= m)` branch, so m never
// stays -inf beside a NaN z, and merge, which skips partials with m = -inf (empty
// ones), never drops a NaN. A term (or partial) equal to m adds e^0 = 1 (times its z)
// without exp(x - m): at x = m = +inf that is exp(inf - inf) = NaN, where the sum of
// two +inf terms is +inf.
template <typename acc_t>
struct Log1pSumExp {
  acc_t m = -INFINITY, z = acc_t(0);

  SEQFUSE_HD void add(acc_t x) {
    if (x == -INFINITY) return;
    if (!(x <= m)) {
      z = z * exp(m - x) + acc_t(1);
      m = x;
    } else {
      z += x == m ? acc_t(1) : exp(x - m);
    }
  }
  SEQFUSE_HD void merge(const Log1pSumExp& o) {
    if (o.m == -INFINITY) return;
    if (!(o.m <= m)) {
      z = z * exp(m - o.m) + o.z;
      m = o.m;
    } else {
      z += o.m == m ? o.z : o.z * exp(o.m - m);
    }
  }
  SEQFUSE_HD acc_t value() const {
    const acc_t y = m + log(z);  // log of the sum, -inf when empty
    return y > acc_t(0) ? y + log1p(exp(-y)) : log1p(exp(y));
  }
};

// Whether flat entry n of a sparse-loss row is the padding slot that mask_zero ignores.
SEQFUSE_HD bool padding_slot(int64_t n, bool mask_zero) { return mask_zero && n == 0; }

// d/ds of the two terms at one entry, given the terms' values and upstream gradients.
// t_neg = 1 - t and t_pos = t (hard/sparse labels: 0 or 1). Masked entries (s = -inf)
// get 0.
template <typename acc_t>
SEQFUSE_HD acc_t mce_grad(acc_t s, acc_t t_neg, acc_t t_pos, acc_t neg, acc_t pos, acc_t g_neg,
                          acc_t g_pos) {
  if (s == -INFINITY) return acc_t(0);
  acc_t d = acc_t(0);
  if (t_neg != acc_t(0)) d += g_neg * t_neg * exp(s - neg);
  if (t_pos != acc_t(0)) d -= g_pos * t_pos * exp(-s - pos);
  return d;
}

}  // namespace seqfuse
