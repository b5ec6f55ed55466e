// Geometry and element maths of the linear recurrence scan (docs/scan.md), shared by the
// CPU and CUDA kernels:
//
//   h_t = a_t * h_{t-1} + b_t,  h_{-1} = h0             (reverse: t runs T-1 .. 0)
//
// A scan is walked in "scan order": position p = 0..T-1 visits time t(p), which is
// p forwards and T-1-p in reverse. The gradient is the same recurrence walked the
// other way:
//
//   g_{t(p)} = dL/dh_{t(p)} + conj(a_{t(p+1)}) * g_{t(p+1)}
//   db_t = g_t,   da_{t(p)} = g_{t(p)} * conj(h_{t(p-1)}),   dh0 = conj(a_{t(0)}) * g_{t(0)}
#pragma once

#include <cstdint>

#include "complex.h"
#include "macros.h"
#include "packed.h"

namespace seqfuse {

// b, h, grad_h and grad_b are contiguous [B, T, C]. `a` is addressed through its
// strides after broadcasting to [B, T, C]: a zero stride is a broadcast dimension, so
// a per-channel `a` ([C]) is read from C numbers and never materialised.
// Packed sequences (packed.h): each is a recurrence of its own that starts from h0[n]:
// no state crosses a boundary, and `reverse` walks each one backwards.
struct ScanGeometry {
  int64_t B, T, C;
  int64_t a_sB, a_sT, a_sC;
  bool reverse;
  const int64_t* cu_seqlens = nullptr;  // packed sequences, or null
  int64_t N = 0;                        // sequences, with cu_seqlens

  using Span = seqfuse::Span;
  SEQFUSE_HD int64_t sequences() const { return cu_seqlens ? N : B; }
  SEQFUSE_HD Span span(int64_t n) const { return sequence_span(cu_seqlens, n, T); }
  // The time of scan position p (0 .. length-1) of a span.
  SEQFUSE_HD int64_t time_in(const Span& s, int64_t p) const {
    return s.start + (reverse ? s.length - 1 - p : p);
  }

  SEQFUSE_HD int64_t time_at(int64_t p) const { return reverse ? T - 1 - p : p; }
  SEQFUSE_HD int64_t a_offset(int64_t b, int64_t t, int64_t c) const {
    return b * a_sB + t * a_sT + c * a_sC;
  }
  SEQFUSE_HD int64_t offset(int64_t b, int64_t t, int64_t c) const {
    return (b * T + t) * C + c;
  }
};

// The affine map x -> A x + B that a stretch of the recurrence applies to its
// carry-in. A stretch in which a packed sequence starts ignores its carry-in (`cut`,
// A unused): nothing before the boundary reaches it, not even an inf or NaN as 0 * inf.
// `then` composes: first *this, then `next`; that equals the recurrence only while the
// maps are finite (csrc/cuda/scan.cu), and there is no identity map to start from:
// {1, 0} would multiply an infinite A by 0. (No default member initialisers: Affine
// lives in __shared__ arrays.)
template <typename acc_t>
struct Affine {
  acc_t A, B;
  bool cut;
  SEQFUSE_HD Affine then(const Affine& next) const {
    return next.cut ? next : Affine{next.A * A, next.A * B + next.B, cut};
  }
  SEQFUSE_HD acc_t apply(acc_t x) const { return cut ? B : A * x + B; }
  // Whether apply(x) equals the recurrence it stands for: every number it uses finite.
  SEQFUSE_HD bool applies_to(acc_t x) const {
    return is_finite(B) && (cut || (is_finite(A) && is_finite(x)));
  }
};

}  // namespace seqfuse
