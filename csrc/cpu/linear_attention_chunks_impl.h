// Bodies of chunked_forward and chunked_backward (linear_attention_chunks.h), included
// by one file per instruction set; internal linkage, like tile_gemm.h.
//
// Per chunk of n <= C steps of one head, with P = phi(Q) phi(K)^T masked by
// M_rs = gamma^(r-s) (s <= r), carry-in S, z and local steps r, s:
//
//   forward   o_r  = scale (gamma^(r+1) phi(q_r)^T S + (P V)_r) / den_r     (normalize)
//             den_r = scale (gamma^(r+1) phi(q_r)^T z + sum_s P_rs) + eps
//             S <- gamma^n S + phi(K)^T diag(gamma^(n-1-s)) V,   z likewise with 1 for V
//   backward  with G = do / den (do without normalize) and g_r = -(do_r . o_r) / den_r
//             (0 without normalize), dP = (G V^T + g 1^T) . M:
//     sweep forward in time, carrying S^T:
//             dphi(Q) = scale (diag(gamma^(r+1)) (G S^T + g z^T) + dP phi(K))
//     sweep back in time, carrying W = dL/dS and Wz = dL/dz from the range's end:
//             dV      = diag(gamma^(n-1-s)) phi(K) W + scale P^T G
//             dphi(K) = diag(gamma^(n-1-s)) (V W^T + 1 Wz^T) + scale dP^T phi(Q)
//             W  <- gamma^n W  + scale phi(Q)^T diag(gamma^(r+1)) G
//             Wz <- gamma^n Wz + scale phi(Q)^T diag(gamma^(r+1)) g
//
// Every product is one tile_gemm call on tiles that stay in L1/L2: the causal ones
// (P and dP formed on and below the diagonal only, P V and dP phi(K) summed over
// s <= r, P^T G and dP^T phi(Q) over r >= s) skip the masked half element by element,
// so no masked-out zero ever meets a NaN or an infinity of a later step and the
// outputs of step r depend on steps <= r only, with the same arithmetic whatever the
// later steps hold. z rides along as row sums (of P, of dP) and rank-one terms instead
// of an extra column, which would leave every product one column past its vector
// blocks. Inputs are read in place where they already are acc_t rows (float32 and
// float64 q with the identity map, v, grad_o without normalize); otherwise phi and the
// conversion are applied once per chunk while gathering.
//
// Where a chunk holds a NaN or an infinity, the rows it reaches are taken in the
// recurrence's order instead (the maths as stated: S_r = gamma S_(r-1) + phi(k_r) v_r^T
// formed, then read): the chunked form distributes each read over the sum, and an
// infinity times a sum of finite terms of both signs is +-inf where the distributed
// terms give inf - inf = NaN (q_r = inf against S = 0.7 x 1.2 - 0.3 x 0.4: inf, not
// NaN). A non-finite phi(k_s) or v_s reaches o and dq of every row from s on and dk, dv
// of row s; a non-finite phi(q_r), G_r or g_r reaches o_r, dq_r and dk, dv of every row
// up to r. The other rows keep the chunked arithmetic bit for bit, so a non-finite value
// changes nothing the maths does not send it to.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <type_traits>

#include "../common/linear_attention.h"
#include "linear_attention_chunks.h"
#include "tile_gemm.h"
#include "vec_math.h"

namespace seqfuse::cpu {
namespace {

template <FeatureMap F, typename scalar_t, typename acc_t>
class Chunks {
 public:
  using Problem = ChunkProblem<scalar_t, acc_t>;

  // Head bh's view of the call; tiles: the shared chunk tiles (kChunkTiles elements),
  // xt: this head's [Dv, Dk] buffer for S^T (sweep in time) and W^T (sweep back).
  Chunks(const Problem& p, int64_t bh, acc_t* tiles, acc_t* xt)
      : p_(p), g_(p.geo), Dk_(g_.Dk), Dv_(g_.Dv), C_(p.chunk), b_(bh / g_.H), h_(bh % g_.H),
        bh_(bh), xt_(xt) {
    const int64_t d = std::max(Dk_, Dv_);
    acc_t* next = tiles;
    auto carve = [&](int64_t n) {
      acc_t* x = next;
      next += (n + 15) / 16 * 16;
      return x;
    };
    q_ = carve(C_ * d), k_ = carve(C_ * d), kd_ = carve(C_ * d), v_ = carve(C_ * d);
    vd_ = carve(C_ * d), g_rows_ = carve(C_ * d), acc1_ = carve(C_ * d), acc2_ = carve(C_ * d);
    kt_ = carve(C_ * d), vt_ = carve(C_ * d);
    p_tile_ = carve(C_ * C_), dp_ = carve(C_ * C_);
    gz_ = carve(C_ + 1), part_ = carve(C_ + 1), gpow_ = carve(C_ + 1);
    row_ = carve(d), state_ = carve(Dk_ * Dv_), zrow_ = carve(d);
    gpow_[0] = acc_t(1);
    const acc_t gamma = p.decay ? p.decay[h_] : acc_t(1);
    for (int64_t i = 1; i <= C_; ++i) gpow_[i] = gpow_[i - 1] * gamma;
  }

  // The forward of the chunk of n steps at t0: o and den (with outputs), then the
  // state S, z moves on.
  void forward(int64_t t0, int64_t n, acc_t* S, acc_t* z, bool outputs) {
    const Rows K = feature_rows(p_.k + g_.qk_offset(b_, t0, h_), Dk_, n, k_);
    transpose(K, n, Dk_, kt_, C_);
    const Rows V = value_rows(p_.v + g_.v_offset(b_, t0, h_), n, v_);
    if (outputs) forward_outputs(t0, n, K, V, S, z);
    // S <- gamma^n S + phi(K)^T diag(gamma^(n-1-s)) V, z likewise.
    const Rows Vd = decay() ? scaled_rows(V, n, Dv_, /*into_state=*/true, vd_) : V;
    if (decay()) {
      scale_by(S, Dk_ * Dv_, gpow_[n]), scale_by(z, Dk_, gpow_[n]);
      for (int64_t s = 0; s < n; ++s) part_[s] = gpow_[n - 1 - s];
      for (int64_t d = 0; d < Dk_; ++d) z[d] += tile_dot(kt_ + d * C_, part_, n);
    } else {
      for (int64_t s = 0; s < n; ++s) {  // rows of phi(K): whole vectors, no reductions
        for (int64_t d = 0; d < Dk_; ++d) z[d] += K.p[s * K.ld + d];
      }
    }
    tile_gemm(TileShape::Full, Dk_, Dv_, n, acc_t(1), kt_, C_, 1, Vd.p, Vd.ld, acc_t(1), S, Dv_);
  }

  // S^T into this head's buffer, before its first query_grads.
  void begin_query_grads(const acc_t* S) { transpose({S, Dv_}, Dk_, Dv_, xt_, Dk_); }
  // W^T into this head's buffer, before its first key_value_grads with grads.
  void begin_key_value_grads(const acc_t* W) { transpose({W, Dv_}, Dk_, Dv_, xt_, Dk_); }

 private:
  // n rows of acc_t at p with row stride ld.
  struct Rows {
    const acc_t* p;
    int64_t ld;
  };
  // A tile of rows with `cols` values each, for the finiteness checks.
  struct Cols {
    const acc_t* p;
    int64_t ld, cols;
  };

  // Whether row r of every tile is free of NaN and infinity.
  static bool finite_row(int64_t r, std::initializer_list<Cols> tiles) {
    bool finite = true;
    for (const Cols& t : tiles) {
      for (int64_t c = 0; c < t.cols; ++c) {
        finite &= std::abs(t.p[r * t.ld + c]) <= std::numeric_limits<acc_t>::max();
      }
    }
    return finite;
  }

  // Whether n rows of every tile are free of NaN and infinity, as the quick test of a
  // chunk: their vector sums are finite. (A sum that overflows says no too; the rows are
  // then looked at one by one.)
  static bool all_finite(int64_t n, std::initializer_list<Cols> tiles) {
    acc_t sum = 0;
    for (const Cols& t : tiles) {
      if (t.ld == t.cols) {
        sum += tile_sum(t.p, n * t.cols);
      } else {
        for (int64_t r = 0; r < n; ++r) sum += tile_sum(t.p + r * t.ld, t.cols);
      }
    }
    return std::isfinite(sum);
  }

  // The first of rows [0, n) (last: the last one) that is not finite_row; n (last: -1)
  // if none.
  static int64_t non_finite_row(int64_t n, bool last, std::initializer_list<Cols> tiles) {
    for (int64_t i = 0; i < n; ++i) {
      const int64_t r = last ? n - 1 - i : i;
      if (!finite_row(r, tiles)) return r;
    }
    return last ? -1 : n;
  }

  // S <- gamma S + phi(k) v^T and z <- gamma z + phi(k): one step of the recurrence on
  // an [Dk, Dv] S (transposed: [Dv, Dk]).
  void step_state(const acc_t* k, const acc_t* v, acc_t* S, acc_t* z, bool transposed) const {
    const acc_t gamma = gpow_[1];
    for (int64_t d = 0; d < Dk_; ++d) {
      z[d] = gamma * z[d] + k[d];
      for (int64_t c = 0; c < Dv_; ++c) {
        acc_t& x = transposed ? S[c * Dk_ + d] : S[d * Dv_ + c];
        x = gamma * x + k[d] * v[c];
      }
    }
  }

  bool decay() const { return p_.decay != nullptr; }

  static void scale_by(acc_t* x, int64_t n, acc_t f) {
    for (int64_t i = 0; i < n; ++i) x[i] *= f;
  }

  // x[i] <- phi(x[i]) for i < count.
  static void apply_feature(acc_t* x, int64_t count) {
    if constexpr (F == FeatureMap::Elu1 && std::is_same_v<acc_t, float>) {
      elu1_rows(x, x, count);
    } else if constexpr (F != FeatureMap::Identity) {
      for (int64_t i = 0; i < count; ++i) x[i] = feature<F>(x[i]);
    }
  }

  // phi of n rows of q or k starting at x, gathered into a contiguous [n, D] tile.
  // Always a copy, even where the rows are acc_t already: read in place, rows H * D
  // apart (a power of two, often) fall into a few L1 sets and evict each other while
  // a product sweeps them. phi goes over the gathered tile afterwards rather than row
  // by row on the way in: a plain copy keeps many more loads from memory in flight.
  Rows feature_rows(const scalar_t* x, int64_t D, int64_t n, acc_t* tile) const {
    for (int64_t r = 0; r < n; ++r) {
      const scalar_t* row = x + r * g_.H * D;
      for (int64_t d = 0; d < D; ++d) tile[r * D + d] = acc_t(row[d]);
    }
    apply_feature(tile, n * D);
    return {tile, D};
  }

  // n rows of v (or grad_o) as a contiguous acc_t tile.
  Rows value_rows(const scalar_t* x, int64_t n, acc_t* tile) const {
    for (int64_t r = 0; r < n; ++r) {
      const scalar_t* row = x + r * g_.H * Dv_;
      for (int64_t c = 0; c < Dv_; ++c) tile[r * Dv_ + c] = acc_t(row[c]);
    }
    return {tile, Dv_};
  }

  // One row of an output: dst[c] = scalar_t(src[c]) for c < n, streamed past the caches
  // where it is whole acc_t vectors (the outputs are written once and not read here;
  // plain stores would first read every line from memory).
  static void store_row(scalar_t* dst, const acc_t* src, int64_t n) {
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      if (tile_stream(dst, src, n)) return;
    }
    for (int64_t c = 0; c < n; ++c) dst[c] = scalar_t(src[c]);
  }

  // diag(gamma^(n-1-r)) X (into_state) or diag(gamma^(r+1)) X, into tile.
  Rows scaled_rows(Rows x, int64_t n, int64_t cols, bool into_state, acc_t* tile) const {
    for (int64_t r = 0; r < n; ++r) {
      const acc_t f = gpow_[into_state ? n - 1 - r : r + 1];
      for (int64_t c = 0; c < cols; ++c) tile[r * cols + c] = f * x.p[r * x.ld + c];
    }
    return {tile, cols};
  }

  void scale_rows(acc_t* x, int64_t ld, int64_t n, int64_t cols, bool into_state) const {
    if (!decay()) return;
    for (int64_t r = 0; r < n; ++r) scale_by(x + r * ld, cols, gpow_[into_state ? n - 1 - r : r + 1]);
  }

  // dst [cols, ld_dst] = X^T for an [n, cols] X.
  static void transpose(Rows x, int64_t n, int64_t cols, acc_t* dst, int64_t ld_dst) {
    tile_transpose(x.p, x.ld, n, cols, dst, ld_dst);
  }

  // The decay mask on the lower triangle of an [n, n] tile (ld C), after adding
  // add[r] to row r (the rank-one z term of dP) when add is given.
  void mask(acc_t* x, int64_t n, const acc_t* add) const {
    for (int64_t r = 0; r < n; ++r) {
      acc_t* row = x + r * C_;
      if (add) {
        for (int64_t s = 0; s <= r; ++s) row[s] += add[r];
      }
      if (decay()) {
        for (int64_t s = 0; s <= r; ++s) row[s] *= gpow_[r - s];
      }
    }
  }

  void forward_outputs(int64_t t0, int64_t n, Rows K, Rows V, const acc_t* S, const acc_t* z) {
    const Rows Q = feature_rows(p_.q + g_.qk_offset(b_, t0, h_), Dk_, n, q_);
    acc_t* O = acc1_;
    const int64_t ldo = Dv_;

    // Carry-in: gamma^(r+1) phi(q_r)^T [S, z].
    tile_gemm(TileShape::Full, n, Dv_, Dk_, acc_t(1), Q.p, Q.ld, 1, S, Dv_, acc_t(0), O, ldo);
    for (int64_t r = 0; r < n; ++r) part_[r] = tile_dot(Q.p + r * Q.ld, z, Dk_);
    if (decay()) {
      scale_rows(O, ldo, n, Dv_, false);
      for (int64_t r = 0; r < n; ++r) part_[r] *= gpow_[r + 1];
    }
    // Inside the chunk: P = (phi(Q) phi(K)^T) . M, then P V and P's row sums.
    tile_gemm(TileShape::LowerC, n, n, Dk_, acc_t(1), Q.p, Q.ld, 1, kt_, C_, acc_t(0), p_tile_, C_);
    mask(p_tile_, n, nullptr);
    for (int64_t r = 0; r < n; ++r) part_[r] += tile_sum(p_tile_ + r * C_, r + 1);
    tile_gemm(TileShape::LowerA, n, Dv_, n, acc_t(1), p_tile_, C_, 1, V.p, V.ld, acc_t(1), O, ldo);
    // A non-finite phi(k_s) or v_s reaches every row from s on, a phi(q_r) row r alone.
    if (!all_finite(n, {{Q.p, Q.ld, Dk_}, {K.p, K.ld, Dk_}, {V.p, V.ld, Dv_}})) {
      const int64_t f = non_finite_row(n, false, {{K.p, K.ld, Dk_}, {V.p, V.ld, Dv_}});
      recurrent_outputs(f, n, Q, K, V, S, z, O, ldo);
    }

    const acc_t scale = p_.scale, eps = p_.eps;
    acc_t* den = p_.den + bh_ * g_.T + t0;
    for (int64_t r = 0; r < n; ++r) {
      const acc_t d = scale * part_[r] + eps;
      den[r] = d;
      const acc_t f = p_.normalize ? scale / d : scale;
      acc_t* num = O + r * ldo;
      for (int64_t c = 0; c < Dv_; ++c) num[c] *= f;
      store_row(p_.o + g_.v_offset(b_, t0 + r, h_), num, Dv_);
    }
  }

  // Rows [f, n) and those with a non-finite phi(q_r) of O (gamma^(r+1) phi(q_r)^T S +
  // (P V)_r) and of part_ (the same with z and row sums) in the recurrence's order: the
  // state at each step formed, then read.
  void recurrent_outputs(int64_t f, int64_t n, Rows Q, Rows K, Rows V, const acc_t* S,
                         const acc_t* z, acc_t* O, int64_t ldo) {
    std::copy(S, S + Dk_ * Dv_, state_);
    std::copy(z, z + Dk_, zrow_);
    for (int64_t r = 0; r < n; ++r) {
      step_state(K.p + r * K.ld, V.p + r * V.ld, state_, zrow_, false);
      if (r < f && finite_row(r, {{Q.p, Q.ld, Dk_}})) continue;
      const acc_t* q = Q.p + r * Q.ld;
      acc_t* o = O + r * ldo;
      std::fill(o, o + Dv_, acc_t(0));
      acc_t den = 0;
      for (int64_t d = 0; d < Dk_; ++d) {
        den += q[d] * zrow_[d];
        for (int64_t c = 0; c < Dv_; ++c) o[c] += q[d] * state_[d * Dv_ + c];
      }
      part_[r] = den;
    }
  }

  // G = do / den (or do) and g = -(do . o) / den (or 0) for n steps from t0.
  Rows output_grads(int64_t t0, int64_t n) const {
    const scalar_t* grad = p_.grad_o + g_.v_offset(b_, t0, h_);
    if (!p_.normalize) {
      std::fill(gz_, gz_ + n, acc_t(0));
      return value_rows(grad, n, g_rows_);
    }
    const scalar_t* o = p_.o_saved + g_.v_offset(b_, t0, h_);
    const acc_t* den = p_.den_saved + bh_ * g_.T + t0;
    for (int64_t r = 0; r < n; ++r) {
      const scalar_t* gr = grad + r * g_.H * Dv_;
      const scalar_t* orow = o + r * g_.H * Dv_;
      const acc_t inv = acc_t(1) / den[r];
      acc_t* grow = g_rows_ + r * Dv_;
      acc_t dot;
      if constexpr (std::is_same_v<scalar_t, acc_t>) {
        dot = tile_dot(gr, orow, Dv_);
      } else {
        dot = 0;
        for (int64_t c = 0; c < Dv_; ++c) dot += acc_t(gr[c]) * acc_t(orow[c]);
      }
      for (int64_t c = 0; c < Dv_; ++c) grow[c] = acc_t(gr[c]) * inv;
      gz_[r] = -dot * inv;
    }
    return {g_rows_, Dv_};
  }

  // dx = factor * grad * phi'(x) for n rows, from phi(x) ([n, Dk] rows; unused for the
  // identity): phi' is 1 for the identity, [phi > 0] for relu and min(phi, 1) for elu1
  // (1 above zero, e^x below); a NaN phi (a NaN x) gives a NaN phi' for both.
  void store_feature_grads(const acc_t* grad, int64_t ld, int64_t n, const acc_t* phi,
                           acc_t factor, scalar_t* dx) const {
    const int64_t D = Dk_;
    for (int64_t r = 0; r < n; ++r, dx += g_.H * D, grad += ld, phi += D) {
      for (int64_t d = 0; d < D; ++d) {
        acc_t slope = 1;
        if constexpr (F == FeatureMap::Relu) {
          slope = phi[d] > acc_t(0) ? acc_t(1) : phi[d] == phi[d] ? acc_t(0) : phi[d];
        }
        if constexpr (F == FeatureMap::Elu1) slope = phi[d] > acc_t(1) ? acc_t(1) : phi[d];
        row_[d] = factor * grad[d] * slope;
      }
      store_row(dx, row_, D);
    }
  }

  // The sweep in time of the backward, for the chunk of n steps at t0: dq, then S^T
  // (in this head's buffer) and z move on.
 public:
  void query_grads(int64_t t0, int64_t n, acc_t* z) {
    const Rows K = feature_rows(p_.k + g_.qk_offset(b_, t0, h_), Dk_, n, k_);
    const Rows V = value_rows(p_.v + g_.v_offset(b_, t0, h_), n, v_);
    transpose(V, n, Dv_, vt_, C_);
    const Rows G = output_grads(t0, n);
    acc_t* dQ = acc1_;

    tile_gemm(TileShape::Full, n, Dk_, Dv_, acc_t(1), G.p, G.ld, 1, xt_, Dk_, acc_t(0), dQ, Dk_);
    if (p_.normalize) {
      for (int64_t r = 0; r < n; ++r) {
        for (int64_t d = 0; d < Dk_; ++d) dQ[r * Dk_ + d] += gz_[r] * z[d];
      }
    }
    scale_rows(dQ, Dk_, n, Dk_, false);
    tile_gemm(TileShape::LowerC, n, n, Dv_, acc_t(1), G.p, G.ld, 1, vt_, C_, acc_t(0), dp_, C_);
    mask(dp_, n, p_.normalize ? gz_ : nullptr);
    tile_gemm(TileShape::LowerA, n, Dk_, n, acc_t(1), dp_, C_, 1, K.p, K.ld, acc_t(1), dQ, Dk_);
    // A non-finite phi(k_s) or v_s reaches every row from s on, a G_r or g_r row r alone.
    if (!all_finite(n, {{K.p, K.ld, Dk_}, {V.p, V.ld, Dv_}, {G.p, G.ld, Dv_}, {gz_, 1, 1}})) {
      const int64_t f = non_finite_row(n, false, {{K.p, K.ld, Dk_}, {V.p, V.ld, Dv_}});
      recurrent_query_grads(f, n, K, V, G, z, dQ);
    }
    const acc_t* phi_q = q_;
    if constexpr (F != FeatureMap::Identity) {
      phi_q = feature_rows(p_.q + g_.qk_offset(b_, t0, h_), Dk_, n, q_).p;
    }
    store_feature_grads(dQ, Dk_, n, phi_q, p_.scale, p_.dq + g_.qk_offset(b_, t0, h_));

    // S^T <- gamma^n S^T + V^T diag(gamma^(n-1-s)) phi(K), z likewise.
    const Rows Kd = decay() ? scaled_rows(K, n, Dk_, true, kd_) : K;
    if (decay()) scale_by(xt_, Dk_ * Dv_, gpow_[n]), scale_by(z, Dk_, gpow_[n]);
    for (int64_t s = 0; s < n; ++s) {
      for (int64_t d = 0; d < Dk_; ++d) z[d] += Kd.p[s * Kd.ld + d];
    }
    tile_gemm(TileShape::Full, Dv_, Dk_, n, acc_t(1), vt_, C_, 1, Kd.p, Kd.ld, acc_t(1), xt_, Dk_);
  }

  // Rows [f, n) and those with a non-finite G_r or g_r of dphi(Q) in the recurrence's
  // order, from S^T (this head's buffer) and z at the chunk's start: dphi(q_r) = S_r G_r
  // + z_r g_r.
  void recurrent_query_grads(int64_t f, int64_t n, Rows K, Rows V, Rows G, const acc_t* z,
                             acc_t* dQ) {
    std::copy(xt_, xt_ + Dk_ * Dv_, state_);
    std::copy(z, z + Dk_, zrow_);
    for (int64_t r = 0; r < n; ++r) {
      step_state(K.p + r * K.ld, V.p + r * V.ld, state_, zrow_, true);
      if (r < f && finite_row(r, {{G.p, G.ld, Dv_}, {gz_, 1, 1}})) continue;
      acc_t* dq = dQ + r * Dk_;
      for (int64_t d = 0; d < Dk_; ++d) dq[d] = p_.normalize ? zrow_[d] * gz_[r] : acc_t(0);
      for (int64_t c = 0; c < Dv_; ++c) {
        const acc_t g = G.p[r * G.ld + c];
        for (int64_t d = 0; d < Dk_; ++d) dq[d] += state_[c * Dk_ + d] * g;
      }
    }
  }

  // Rows [0, l] and those with a non-finite phi(k_s) or v_s of dphi(K) and dV in the
  // recurrence's order, back from W, Wz (the gradients of the chunk's last state):
  // W_r = gamma W_(r+1) + scale phi(q_r) G_r^T (Wz_r with g_r), dv_r = W_r^T phi(k_r),
  // dphi(k_r) = W_r v_r + Wz_r.
  void recurrent_key_value_grads(int64_t l, int64_t n, Rows Q, Rows K, Rows V, Rows G,
                                 const acc_t* W, const acc_t* Wz, acc_t* dK, acc_t* dV) {
    std::copy(W, W + Dk_ * Dv_, state_);
    std::copy(Wz, Wz + Dk_, zrow_);
    const acc_t gamma = gpow_[1], scale = p_.scale;
    for (int64_t r = n - 1; r >= 0; --r) {
      const acc_t* q = Q.p + r * Q.ld;
      const acc_t* g = G.p + r * G.ld;
      for (int64_t d = 0; d < Dk_; ++d) {
        const acc_t sq = scale * q[d];
        acc_t* w = state_ + d * Dv_;
        if (r < n - 1) {
          for (int64_t c = 0; c < Dv_; ++c) w[c] *= gamma;
          zrow_[d] *= gamma;
        }
        for (int64_t c = 0; c < Dv_; ++c) w[c] += sq * g[c];
        if (p_.normalize) zrow_[d] += sq * gz_[r];
      }
      if (r > l && finite_row(r, {{K.p, K.ld, Dk_}, {V.p, V.ld, Dv_}})) continue;
      const acc_t* k = K.p + r * K.ld;
      const acc_t* v = V.p + r * V.ld;
      acc_t* dv = dV + r * Dv_;
      acc_t* dk = dK + r * Dk_;
      std::fill(dv, dv + Dv_, acc_t(0));
      for (int64_t d = 0; d < Dk_; ++d) {
        const acc_t* w = state_ + d * Dv_;
        acc_t x = 0;
        for (int64_t c = 0; c < Dv_; ++c) dv[c] += w[c] * k[d], x += w[c] * v[c];
        dk[d] = x + zrow_[d];
      }
    }
  }

  // The sweep back in time, for the chunk of n steps at t0: dk and dv (with grads),
  // then W, Wz (and W^T in this head's buffer) move back.
  void key_value_grads(int64_t t0, int64_t n, acc_t* W, acc_t* Wz, bool grads) {
    const Rows Q = feature_rows(p_.q + g_.qk_offset(b_, t0, h_), Dk_, n, q_);
    const Rows G = output_grads(t0, n);
    const acc_t scale = p_.scale;
    if (grads) {
      const Rows K = feature_rows(p_.k + g_.qk_offset(b_, t0, h_), Dk_, n, k_);
      transpose(K, n, Dk_, kt_, C_);
      const Rows V = value_rows(p_.v + g_.v_offset(b_, t0, h_), n, v_);
      transpose(V, n, Dv_, vt_, C_);
      tile_gemm(TileShape::LowerC, n, n, Dk_, acc_t(1), Q.p, Q.ld, 1, kt_, C_, acc_t(0), p_tile_, C_);
      mask(p_tile_, n, nullptr);
      tile_gemm(TileShape::LowerC, n, n, Dv_, acc_t(1), G.p, G.ld, 1, vt_, C_, acc_t(0), dp_, C_);
      mask(dp_, n, p_.normalize ? gz_ : nullptr);

      // dV = diag(gamma^(n-1-s)) phi(K) W + scale P^T G.
      acc_t* dV = acc2_;
      const int64_t ldv = Dv_;
      tile_gemm(TileShape::Full, n, Dv_, Dk_, acc_t(1), kt_, 1, C_, W, Dv_, acc_t(0), dV, ldv);
      scale_rows(dV, ldv, n, Dv_, true);
      tile_gemm(TileShape::UpperA, n, Dv_, n, scale, p_tile_, 1, C_, G.p, G.ld, acc_t(1), dV, ldv);

      // dphi(K) = diag(gamma^(n-1-s)) (V W^T + 1 Wz^T) + scale dP^T phi(Q).
      acc_t* dK = acc1_;
      tile_gemm(TileShape::Full, n, Dk_, Dv_, acc_t(1), V.p, V.ld, 1, xt_, Dk_, acc_t(0), dK, Dk_);
      for (int64_t s = 0; s < n; ++s) {
        for (int64_t d = 0; d < Dk_; ++d) dK[s * Dk_ + d] += Wz[d];
      }
      scale_rows(dK, Dk_, n, Dk_, true);
      tile_gemm(TileShape::UpperA, n, Dk_, n, scale, dp_, 1, C_, Q.p, Q.ld, acc_t(1), dK, Dk_);
      // A non-finite phi(q_r), G_r or g_r reaches every row up to r, a phi(k_s) or v_s
      // row s alone.
      const Cols reach[] = {{Q.p, Q.ld, Dk_}, {G.p, G.ld, Dv_}, {gz_, 1, 1}};
      if (!all_finite(n, {reach[0], reach[1], reach[2], {K.p, K.ld, Dk_}, {V.p, V.ld, Dv_}})) {
        const int64_t l = non_finite_row(n, true, {reach[0], reach[1], reach[2]});
        recurrent_key_value_grads(l, n, Q, K, V, G, W, Wz, dK, dV);
      }
      for (int64_t s = 0; s < n; ++s) store_row(p_.dv + g_.v_offset(b_, t0 + s, h_), dV + s * Dv_, Dv_);
      store_feature_grads(dK, Dk_, n, K.p, acc_t(1), p_.dk + g_.qk_offset(b_, t0, h_));
    }

    // W <- gamma^n W + scale phi(Q)^T diag(gamma^(r+1)) G, Wz likewise with g.
    const Rows Qd = decay() ? scaled_rows(Q, n, Dk_, false, q_) : Q;
    if (decay()) scale_by(W, Dk_ * Dv_, gpow_[n]), scale_by(Wz, Dk_, gpow_[n]);
    if (p_.normalize) {
      for (int64_t r = 0; r < n; ++r) {
        const acc_t f = scale * gz_[r];
        for (int64_t d = 0; d < Dk_; ++d) Wz[d] += f * Qd.p[r * Qd.ld + d];
      }
    }
    tile_gemm(TileShape::Full, Dk_, Dv_, n, scale, Qd.p, 1, Qd.ld, G.p, G.ld, acc_t(1), W, Dv_);
    if (grads) transpose({W, Dv_}, Dk_, Dv_, xt_, Dk_);
  }

 private:
  const Problem& p_;
  const LinearAttentionGeometry& g_;
  const int64_t Dk_, Dv_, C_, b_, h_, bh_;
  acc_t *q_, *k_, *kd_, *v_, *vd_, *g_rows_, *acc1_, *acc2_, *kt_, *vt_;
  acc_t* const xt_;
  acc_t *p_tile_, *dp_, *gz_, *part_, *gpow_, *row_, *state_, *zrow_;
};

// Heads [h0, h0 + G) of batch row b, chunk by chunk, each chunk through every head of
// the group before the next: the rows of one step hold the heads side by side, so a
// chunk's rows are read (and prefetched) as whole runs of lines and pages, which
// strided per-head rows are not (with rows of a page or more, a per-head sweep missed
// the TLB on every row).
template <FeatureMap F, typename scalar_t, typename acc_t>
class HeadGroup {
 public:
  using Problem = ChunkProblem<scalar_t, acc_t>;

  HeadGroup(const Problem& p, int64_t b, int64_t h0, int64_t G, acc_t* scratch)
      : p_(p), g_(p.geo), b_(b), h0_(h0), G_(G), C_(p.chunk), tiles_(scratch),
        xt_(scratch + chunk_tile_elements(p.chunk, p.geo.Dk, p.geo.Dv)) {}

  // Each chunk's rows are asked for one chunk ahead, one head at a time just before the
  // head's products of the chunk before run (prefetch_rows): a whole group's rows at
  // once (thousands of lines) fill the core's miss buffers and stall it until they drain.
  void forward(int64_t t_begin, int64_t t_end, acc_t* S, acc_t* z, bool outputs) const {
    auto prefetch = [&](int64_t t0, int64_t g0, int64_t heads) {
      if (t0 < t_begin || t0 >= t_end) return;
      const int64_t n = std::min(C_, t_end - t0);
      prefetch_rows(p_.k, g_.Dk, t0, n, g0, heads);
      prefetch_rows(p_.v, g_.Dv, t0, n, g0, heads);
      if (outputs) prefetch_rows(p_.q, g_.Dk, t0, n, g0, heads);
    };
    prefetch(t_begin, 0, G_);
    for (int64_t t0 = t_begin; t0 < t_end; t0 += C_) {
      for (int64_t g = 0; g < G_; ++g) {
        prefetch(t0 + C_, g, 1);
        head(g).forward(t0, std::min(C_, t_end - t0), S + g * state(), z + g * g_.Dk, outputs);
      }
    }
    tile_stream_fence();
  }

  void backward(int64_t t_begin, int64_t t_end, acc_t* S, acc_t* z, acc_t* W, acc_t* Wz,
                bool grads) const {
    auto prefetch = [&](int64_t t0, bool query, int64_t g0, int64_t heads) {
      if (t0 < t_begin || t0 >= t_end) return;
      const int64_t n = std::min(C_, t_end - t0);
      prefetch_rows(p_.grad_o, g_.Dv, t0, n, g0, heads);
      if (p_.normalize) prefetch_rows(p_.o_saved, g_.Dv, t0, n, g0, heads);
      if (query || grads) {
        prefetch_rows(p_.k, g_.Dk, t0, n, g0, heads), prefetch_rows(p_.v, g_.Dv, t0, n, g0, heads);
      }
      if (!query || F != FeatureMap::Identity) prefetch_rows(p_.q, g_.Dk, t0, n, g0, heads);
    };
    if (grads) {
      for (int64_t g = 0; g < G_; ++g) head(g).begin_query_grads(S + g * state());
      prefetch(t_begin, true, 0, G_);
      for (int64_t t0 = t_begin; t0 < t_end; t0 += C_) {
        for (int64_t g = 0; g < G_; ++g) {
          prefetch(t0 + C_, true, g, 1);
          head(g).query_grads(t0, std::min(C_, t_end - t0), z + g * g_.Dk);
        }
      }
      for (int64_t g = 0; g < G_; ++g) head(g).begin_key_value_grads(W + g * state());
    }
    if (t_end <= t_begin) return;
    const int64_t last = t_begin + (t_end - t_begin - 1) / C_ * C_;
    prefetch(last, false, 0, G_);
    for (int64_t t0 = last; t0 >= t_begin; t0 -= C_) {
      for (int64_t g = 0; g < G_; ++g) {
        prefetch(t0 - C_, false, g, 1);
        head(g).key_value_grads(t0, std::min(C_, t_end - t0), W + g * state(), Wz + g * g_.Dk,
                                grads);
      }
    }
    tile_stream_fence();
  }

 private:
  int64_t state() const { return g_.Dk * g_.Dv; }

  Chunks<F, scalar_t, acc_t> head(int64_t g) const {
    return Chunks<F, scalar_t, acc_t>(p_, b_ * g_.H + h0_ + g, tiles_,
                                      xt_ + g * padded_elements(state()));
  }

  // Asks for the cache lines of n rows of x (D values per head) from step t0, of the
  // group's heads [g0, g0 + heads), ahead of their use. Strided rows get little from
  // the hardware prefetchers.
  template <typename T>
  void prefetch_rows(const T* x, int64_t D, int64_t t0, int64_t n, int64_t g0,
                     int64_t heads) const {
    const char* row = reinterpret_cast<const char*>(x + ((b_ * g_.T + t0) * g_.H + h0_ + g0) * D);
    const int64_t bytes = heads * D * int64_t(sizeof(T)), stride = g_.H * D * int64_t(sizeof(T));
    for (int64_t r = 0; r < n; ++r, row += stride) {
      for (int64_t i = 0; i < bytes; i += 64) tile_prefetch(row + i);
      tile_prefetch(row + bytes - 1);
    }
  }

  const Problem& p_;
  const LinearAttentionGeometry& g_;
  const int64_t b_, h0_, G_, C_;
  acc_t* const tiles_;
  acc_t* const xt_;
};

template <typename scalar_t, typename acc_t>
void run_chunked_forward(const ChunkProblem<scalar_t, acc_t>& p, int64_t b, int64_t h0, int64_t G,
                         int64_t t_begin, int64_t t_end, acc_t* S, acc_t* z, bool outputs,
                         acc_t* scratch) {
  with_feature_map(p.feature_map, [&](auto f) {
    HeadGroup<decltype(f)::value, scalar_t, acc_t>(p, b, h0, G, scratch)
        .forward(t_begin, t_end, S, z, outputs);
  });
}

template <typename scalar_t, typename acc_t>
void run_chunked_backward(const ChunkProblem<scalar_t, acc_t>& p, int64_t b, int64_t h0,
                          int64_t G, int64_t t_begin, int64_t t_end, acc_t* S, acc_t* z, acc_t* W,
                          acc_t* Wz, bool grads, acc_t* scratch) {
  with_feature_map(p.feature_map, [&](auto f) {
    HeadGroup<decltype(f)::value, scalar_t, acc_t>(p, b, h0, G, scratch)
        .backward(t_begin, t_end, S, z, W, Wz, grads);
  });
}

}  // namespace
}  // namespace seqfuse::cpu
