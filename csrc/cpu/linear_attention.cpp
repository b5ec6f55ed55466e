// CPU causal linear attention, chunked (maths: csrc/common/linear_attention.h).
//
// Forward (T > 1), chunk-parallel: the intra-chunk products of every (batch, head,
// chunk) do not depend on the carried state, so they run as a few batched matrix
// products over all chunks at once (ATen's bmm: BLAS, threaded), and only the state
// itself is carried, by a cheap elementwise scan over the chunk increments:
//
//   P_c = (phi(Q_c) phi(K_c)^T . M)      U_c = (diag(gamma^(n_c-1-s)) phi(K_c))^T V'_c
//   X_0 = S'_0,   X_{c+1} = gamma^(n_c) X_c + U_c
//   n'_c = scale (P_c V'_c + diag(gamma^(r+1)) phi(Q_c) X_c)
//
// Operands are gathered once into chunk tiles in the accumulation type, the feature
// map and V' = [V, 1] applied on the way in; long sequences go through in segments
// so the scratch stays bounded. A decoding step (T = 1) is a plain loop per head.
// Measured at B=2, H=8, T=1024, D=64 (2 cores): about 5% faster than one BLAS call per
// tile per head; the products are now under half the time. elu's exp, which GCC keeps
// scalar under the baseline flags, goes through vec_math.h's run-time AVX2 path.
//
// Causality with NaN/inf inputs: P V' multiplies the zeros above P's diagonal by every
// row of V', so a NaN or an infinity in v at local step f would reach back, as
// 0 * NaN = NaN, to rows r < f of its chunk. A chunk whose V' holds one (found while
// gathering) has its V' rows from f on zeroed for that product, which leaves rows r < f
// exactly as in the run without them, and rows r >= f summed over s <= r only from the
// true values (causal_rows). Nothing else looks ahead: the mask overwrites P above the
// diagonal (a non-finite k_s never reaches P[r < s]), the decay factors scale rows, and
// U_c, formed from the true V' before the zeroing, reaches only later chunks. Finite
// inputs take the batched path unchanged, at the cost of one finiteness test per v.
//
// Backward: work items are (batch, head) pairs, run in parallel. Each walks its chunks
// of kChunk steps carrying S' = [S, z] ([Dk, Dv+1]) in a scratch tile, with tile
// products on ATen's matrix multiply: a forward sweep (G and dq, re-deriving the
// carried state) then a reverse sweep carrying W (dk, dv, and the initial state's
// gradient). Its masked products keep causality as the forward's do (masked_product).
#include "linear_attention.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/core/InferenceMode.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "dtype.h"
#include "huge_pages.h"
#include "vec_math.h"

namespace seqfuse::cpu {
namespace {

// 128 rather than 64: half as many small tile products, whose per-call overhead
// dominated at 64 (B=2, H=8, T=1024, D=64 float32: 8.1 ms -> 5.9 ms on 2 cores).
constexpr int64_t kChunk = 128;

// A [rows, cols] matrix over the first rows * cols elements of a flat buffer, so a
// short last chunk still has contiguous operands.
at::Tensor tile(const at::Tensor& buf, int64_t rows, int64_t cols, int64_t start = 0) {
  return buf.narrow(0, start, rows * cols).view({rows, cols});
}

// Whether none of the n values at x is a NaN or an infinity (all exponent bits set). On
// the bits, so that the loop vectorises: it runs over every v of the forward, and
// std::isfinite's scalar loop cost 6x as much (1.7 ns a value, ~5% of the forward).
template <typename acc_t>
bool all_finite(const acc_t* x, int64_t n) {
  using bits_t = std::conditional_t<sizeof(acc_t) == 4, uint32_t, uint64_t>;
  static_assert(sizeof(bits_t) == sizeof(acc_t));
  constexpr bits_t exponent = sizeof(acc_t) == 4 ? bits_t(0x7f800000u) : bits_t(0x7ff0000000000000ull);
  bits_t bad = 0;
  for (int64_t i = 0; i < n; ++i) {
    bits_t b;
    std::memcpy(&b, x + i, sizeof b);
    bad |= (b & exponent) == exponent;
  }
  return bad == 0;
}

// Forward chunk length: 64 rather than 128 halves the intra-chunk FLOPs per step
// (2 C (Dk + Dv) of the 2 C (Dk + Dv) + 4 Dk Dv); batched, the smaller tiles cost
// no extra calls.
constexpr int64_t kForwardChunk = 64;
// Elements of forward scratch per segment (64 MiB in float): bounds the memory of long
// sequences while keeping the batched products large.
constexpr int64_t kSegmentElements = int64_t(1) << 24;

// Scratch tiles of one thread, reused across its work items.
struct Scratch {
  at::Tensor qf, kf, vp, p, n, dx, rows, state, g;
  Scratch(const LinearAttentionGeometry& geo, at::ScalarType acc, bool backward) {
    const auto opt = at::TensorOptions().dtype(acc);
    const int64_t dv1 = geo.Dv + 1, c = std::min(kChunk, std::max<int64_t>(geo.T, 1));
    qf = at::empty({c * geo.Dk}, opt);
    kf = at::empty({c * geo.Dk}, opt);
    vp = at::empty({c * dv1}, opt);
    p = at::empty({c * c}, opt);
    n = at::empty({c * dv1}, opt);
    dx = at::empty({c * geo.Dk}, opt);
    rows = at::empty({c * std::max(geo.Dk, dv1)}, opt);
    state = at::empty({geo.Dk * dv1}, opt);
    if (backward) g = at::empty({geo.T * dv1}, opt);
  }
};

template <FeatureMap F, typename scalar_t, typename acc_t>
struct Kernel {
  using storage_type = scalar_t;
  using acc_type = acc_t;
  LinearAttentionGeometry geo;
  LinearAttentionOptions opt;
  const scalar_t *q, *k, *v;
  const acc_t *decay, *S0, *z0;

  // gamma^0 .. gamma^(kChunk + 1): every exponent a chunk of either pass uses.
  using Powers = std::array<acc_t, kChunk + 2>;

  int64_t dv1() const { return geo.Dv + 1; }

  // phi(x) for n steps of one head, from [B, T, H, D] rows into a contiguous [n, D] tile.
  void gather_feature(const scalar_t* x, int64_t D, int64_t n, acc_t* dst) const {
    for (int64_t r = 0; r < n; ++r, x += geo.H * D, dst += D) {
      if constexpr (F == FeatureMap::Elu1 && std::is_same_v<scalar_t, float>) {
        elu1_rows(x, dst, D);  // vector exp: the scalar one was a third of the forward
      } else {
        for (int64_t d = 0; d < D; ++d) dst[d] = feature<F>(acc_t(x[d]));
      }
    }
  }
  void gather_feature(const scalar_t* x, int64_t D, int64_t n, const at::Tensor& out) const {
    gather_feature(x, D, n, out.data_ptr<acc_t>());
  }

  // V' = [V, 1] for n steps starting at v_row.
  void gather_values(const scalar_t* v_row, int64_t n, acc_t* dst) const {
    for (int64_t r = 0; r < n; ++r, v_row += geo.H * geo.Dv, dst += dv1()) {
      for (int64_t c = 0; c < geo.Dv; ++c) dst[c] = acc_t(v_row[c]);
      dst[geo.Dv] = acc_t(1);
    }
  }
  void gather_values(const scalar_t* v_row, int64_t n, const at::Tensor& out) const {
    gather_values(v_row, n, out.data_ptr<acc_t>());
  }

  // The first of the n rows of V' at x that holds a NaN or an infinity; n if none.
  int64_t first_non_finite_row(const acc_t* x, int64_t n) const {
    if (all_finite(x, n * dv1())) return n;
    for (int64_t r = 0; r < n; ++r, x += dv1()) {
      if (!all_finite(x, geo.Dv)) return r;
    }
    return n;
  }

  // Rows [from, n) of P V' for one chunk (P: [C, C] tile, V': [n, Dv+1]), each summed
  // over s <= r only, so no masked-out zero ever meets a non-finite value.
  void causal_rows(const acc_t* p, int64_t C, const acc_t* vp, int64_t from, int64_t n,
                   acc_t* num) const {
    for (int64_t r = from; r < n; ++r) {
      acc_t* out = num + r * dv1();
      std::fill(out, out + dv1(), acc_t(0));
      for (int64_t s = 0; s <= r; ++s) {
        const acc_t a = p[r * C + s];
        const acc_t* x = vp + s * dv1();
        for (int64_t c = 0; c < dv1(); ++c) out[c] += a * x[c];
      }
    }
  }

  // out = beta out + alpha A X for a masked [n, n] tile P: A = P (lower: row r sums
  // s <= r) or A = P^T (upper: row s sums r >= s). The product multiplies P's masked-out
  // zeros by every row of X, and 0 * NaN = NaN would carry a non-finite row of X to the
  // rows that must not see it (a gradient of an earlier or a later step). With one in X,
  // its rows from the first such (lower) or up to the last (upper) are zeroed for the
  // product, which leaves the other rows of out as in the run without them, and the rows
  // that do see them are summed over their own steps only.
  void masked_product(at::Tensor& out, const at::Tensor& p, const at::Tensor& x, bool upper,
                      acc_t beta, acc_t alpha) const {
    const int64_t n = x.size(0), cols = x.size(1);
    const acc_t* xs = x.data_ptr<acc_t>();
    // BLAS may scale X by alpha before multiplying: with |alpha| > 1 (a scale above 1), a
    // finite x whose alpha x overflows is as bad as an infinity.
    auto row_ok = [&](const acc_t* row, int64_t len) {
      if (std::abs(alpha) <= acc_t(1)) return all_finite(row, len);
      for (int64_t i = 0; i < len; ++i) {
        if (!std::isfinite(alpha * row[i])) return false;
      }
      return true;
    };
    int64_t first = n, last = -1;
    if (!row_ok(xs, n * cols)) {
      for (int64_t r = 0; r < n; ++r) {
        if (row_ok(xs + r * cols, cols)) continue;
        first = std::min(first, r);
        last = r;
      }
    }
    const at::Tensor a = upper ? p.t() : p;
    if (last < 0) {
      out.addmm_(a, x, beta, alpha);
      return;
    }
    const int64_t from = upper ? 0 : first, to = upper ? last + 1 : n;  // rows that see one
    const at::Tensor before = out.narrow(0, from, to - from).clone();
    at::Tensor zeroed = x.clone();
    zeroed.narrow(0, from, to - from).zero_();
    out.addmm_(a, zeroed, beta, alpha);
    const acc_t* ps = p.data_ptr<acc_t>();
    const acc_t* prev = before.data_ptr<acc_t>();
    acc_t* o = out.data_ptr<acc_t>();
    for (int64_t r = from; r < to; ++r) {
      acc_t* row = o + r * cols;
      const acc_t* old = prev + (r - from) * cols;
      for (int64_t c = 0; c < cols; ++c) row[c] = beta == acc_t(0) ? acc_t(0) : beta * old[c];
      const int64_t s0 = upper ? r : 0, s1 = upper ? n : r + 1;
      for (int64_t s = s0; s < s1; ++s) {
        const acc_t w = alpha * (upper ? ps[s * n + r] : ps[r * n + s]);
        const acc_t* xr = xs + s * cols;
        for (int64_t c = 0; c < cols; ++c) row[c] += w * xr[c];
      }
    }
  }

  // The intra-chunk mask M_rs = gamma^(r-s) for s <= r, 0 above the diagonal, on an
  // [n, n] tile.
  void mask(acc_t* x, int64_t n, const Powers& gpow) const {
    for (int64_t r = 0; r < n; ++r) {
      if (decay) {
        for (int64_t s = 0; s <= r; ++s) x[r * n + s] *= gpow[r - s];
      }
      std::fill(x + r * n + r + 1, x + (r + 1) * n, acc_t(0));
    }
  }
  void mask(const at::Tensor& p, const Powers& gpow) const { mask(p.data_ptr<acc_t>(), p.size(0), gpow); }

  // diag(gamma^(e_r)) X with e_r = r + 1 (reading the carried state) or n - 1 - r
  // (writing it); X itself when there is no decay.
  at::Tensor decayed(const at::Tensor& x, bool into_state, const Powers& gpow,
                     const at::Tensor& buf) const {
    if (!decay) return x;
    const int64_t n = x.size(0), cols = x.size(1);
    at::Tensor out = tile(buf, n, cols);
    const acc_t* src = x.data_ptr<acc_t>();
    acc_t* dst = out.data_ptr<acc_t>();
    for (int64_t r = 0; r < n; ++r) {
      const acc_t f = gpow[into_state ? n - 1 - r : r + 1];
      for (int64_t c = 0; c < cols; ++c) dst[r * cols + c] = f * src[r * cols + c];
    }
    return out;
  }

  Powers powers(int64_t h) const {
    Powers gpow;
    gpow[0] = acc_t(1);
    const acc_t gamma = decay ? decay[h] : acc_t(1);
    for (size_t i = 1; i < gpow.size(); ++i) gpow[i] = gpow[i - 1] * gamma;
    return gpow;
  }

  // S' = [S, z] from an [Dk, Dv] and a [Dk] source (zeros where null).
  void load_state(const acc_t* S, const acc_t* z, int64_t bh, const at::Tensor& state) const {
    acc_t* dst = state.data_ptr<acc_t>();
    for (int64_t d = 0; d < geo.Dk; ++d) {
      for (int64_t c = 0; c < geo.Dv; ++c) {
        dst[d * dv1() + c] = S ? S[(bh * geo.Dk + d) * geo.Dv + c] : acc_t(0);
      }
      dst[d * dv1() + geo.Dv] = z ? z[bh * geo.Dk + d] : acc_t(0);
    }
  }

  void store_state(const at::Tensor& state, int64_t bh, at::Tensor& S, at::Tensor& z) const {
    const acc_t* src = state.data_ptr<acc_t>();
    acc_t* s_out = S.data_ptr<acc_t>() + bh * geo.Dk * geo.Dv;
    acc_t* z_out = z.data_ptr<acc_t>() + bh * geo.Dk;
    for (int64_t d = 0; d < geo.Dk; ++d) {
      std::copy_n(src + d * dv1(), geo.Dv, s_out + d * geo.Dv);
      z_out[d] = src[d * dv1() + geo.Dv];
    }
  }

  // S' <- gamma^n S' + (diag(gamma^(n-1-s)) phi(K))^T V'
  void advance_state(at::Tensor& state, const at::Tensor& kf, const at::Tensor& vp,
                     const Powers& gpow, Scratch& s) const {
    state.addmm_(decayed(kf, true, gpow, s.rows).t(), vp, gpow[kf.size(0)], 1);
  }

  // One decoding step (T = 1) of head bh in one pass over its state, S0 straight into
  // S_T with no matrix-product calls: S' <- gamma S' + phi(k) [v, 1]^T,
  // o = scale phi(q)^T S' (/ den).
  void forward_step(int64_t bh, scalar_t* o, acc_t* S_T, acc_t* z_T, acc_t* den) const {
    const int64_t b = bh / geo.H, h = bh % geo.H, Dk = geo.Dk, Dv = geo.Dv;
    const acc_t gamma = decay ? decay[h] : acc_t(1);
    const acc_t* S_in = S0 ? S0 + bh * Dk * Dv : nullptr;
    const acc_t* z_in = z0 ? z0 + bh * Dk : nullptr;
    acc_t* S_out = S_T + bh * Dk * Dv;
    acc_t* z_out = z_T + bh * Dk;
    std::array<acc_t, kMaxHeadDim> vr, num{};
    acc_t num_z = 0;
    const scalar_t* v_row = v + geo.v_offset(b, 0, h);
    for (int64_t c = 0; c < Dv; ++c) vr[c] = acc_t(v_row[c]);
    const scalar_t* qr = q + geo.qk_offset(b, 0, h);
    const scalar_t* kr = k + geo.qk_offset(b, 0, h);
    for (int64_t d = 0; d < Dk; ++d) {
      const acc_t kf = feature<F>(acc_t(kr[d])), qf = feature<F>(acc_t(qr[d]));
      acc_t* row = S_out + d * Dv;
      if (S_in) {
        const acc_t* in = S_in + d * Dv;
        for (int64_t c = 0; c < Dv; ++c) row[c] = gamma * in[c] + kf * vr[c];
      } else {
        for (int64_t c = 0; c < Dv; ++c) row[c] = kf * vr[c];
      }
      for (int64_t c = 0; c < Dv; ++c) num[c] += qf * row[c];
      z_out[d] = gamma * (z_in ? z_in[d] : acc_t(0)) + kf;
      num_z += qf * z_out[d];
    }
    const acc_t d = acc_t(opt.scale) * num_z + acc_t(opt.eps);
    den[bh] = d;
    const acc_t f = opt.normalize ? acc_t(opt.scale) / d : acc_t(opt.scale);
    scalar_t* out = o + geo.v_offset(b, 0, h);
    for (int64_t c = 0; c < Dv; ++c) out[c] = scalar_t(num[c] * f);
  }

  // The forward for T > 1 over all (batch, head) pairs: see the top of this file.
  // Chunk tiles are laid out chunk-major, [chunks][B * H][rows][cols], so that a
  // shorter last segment is a prefix of the buffers.
  void forward_chunked(scalar_t* o, at::Tensor& S_T, at::Tensor& z_T, acc_t* den) const {
    const int64_t BH = geo.B * geo.H, Dk = geo.Dk, Dv1 = dv1(), T = geo.T;
    if (BH == 0) return;
    const int64_t C = std::max<int64_t>(1, std::min(kForwardChunk, T));
    const int64_t per_chunk = BH * (C * (2 * Dk + 2 * Dv1 + C) + Dk * Dv1);
    const int64_t max_chunks = std::max<int64_t>(1, kSegmentElements / per_chunk);
    const int64_t nc = std::min(max_chunks, (T + C - 1) / C);
    // One allocation carved into the tiles (64-byte aligned), advised onto huge pages
    // before its first touch: at tens of MB, first-touch faults of 4 KiB pages cost
    // about as much as the products themselves.
    const int64_t items_max = nc * BH, align = 64 / int64_t(sizeof(acc_t));
    const std::array<std::array<int64_t, 3>, 7> shapes = {{{items_max, C, Dk}, {items_max, C, Dk},
        {items_max, C, Dv1}, {items_max, C, C}, {items_max, C, Dv1}, {items_max, Dk, Dv1}, {BH, Dk, Dv1}}};
    int64_t total = 0;
    for (const auto& sh : shapes) total += (sh[0] * sh[1] * sh[2] + align - 1) / align * align;
    const at::Tensor scratch = at::empty({total}, at::TensorOptions().dtype(c10::CppTypeToScalarType<acc_t>::value));
    advise_huge_pages(scratch);
    int64_t used = 0;
    auto carve = [&](int which) {
      const auto& sh = shapes[which];
      at::Tensor t = scratch.narrow(0, used, sh[0] * sh[1] * sh[2]).view({sh[0], sh[1], sh[2]});
      used += (sh[0] * sh[1] * sh[2] + align - 1) / align * align;
      return t;
    };
    const at::Tensor qf = carve(0), kf = carve(1), vp = carve(2), p = carve(3), num = carve(4);
    const at::Tensor upd = carve(5), state = carve(6);
    for (int64_t bh = 0; bh < BH; ++bh) load_state(S0, z0, bh, state[bh]);
    // Chunk tiles are a few tens of kFLOP to a few MFLOP each.
    const int64_t grain = std::max<int64_t>(1, 4096 / (C * (Dk + Dv1)));
    // Per chunk tile: the first local step whose v holds a NaN or an infinity, or C.
    std::vector<int64_t> non_finite_from(items_max);

    for (int64_t t0 = 0; t0 < T; t0 += nc * C) {
      const int64_t chunks = std::min(nc, (T - t0 + C - 1) / C), items = chunks * BH;
      // Steps of chunk c of this segment (the last one may be short; rows past it are
      // zero, so they add nothing to any product).
      auto steps = [&](int64_t c) { return std::min(C, T - t0 - c * C); };
      acc_t *qf_p = qf.data_ptr<acc_t>(), *kf_p = kf.data_ptr<acc_t>(), *vp_p = vp.data_ptr<acc_t>();
      acc_t *p_p = p.data_ptr<acc_t>(), *num_p = num.data_ptr<acc_t>(), *upd_p = upd.data_ptr<acc_t>();

      at::parallel_for(0, items, grain, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
          const int64_t c = i / BH, bh = i % BH, b = bh / geo.H, h = bh % geo.H, n = steps(c);
          const int64_t t = t0 + c * C;
          gather_feature(q + geo.qk_offset(b, t, h), Dk, n, qf_p + i * C * Dk);
          gather_feature(k + geo.qk_offset(b, t, h), Dk, n, kf_p + i * C * Dk);
          gather_values(v + geo.v_offset(b, t, h), n, vp_p + i * C * Dv1);
          const int64_t f = first_non_finite_row(vp_p + i * C * Dv1, n);
          non_finite_from[i] = f < n ? f : C;
          std::fill(qf_p + (i * C + n) * Dk, qf_p + (i + 1) * C * Dk, acc_t(0));
          std::fill(kf_p + (i * C + n) * Dk, kf_p + (i + 1) * C * Dk, acc_t(0));
          std::fill(vp_p + (i * C + n) * Dv1, vp_p + (i + 1) * C * Dv1, acc_t(0));
        }
      });
      const at::Tensor qf_s = qf.narrow(0, 0, items), kf_s = kf.narrow(0, 0, items);
      const at::Tensor vp_s = vp.narrow(0, 0, items);
      at::Tensor p_s = p.narrow(0, 0, items), num_s = num.narrow(0, 0, items), upd_s = upd.narrow(0, 0, items);
      at::bmm_out(p_s, qf_s, kf_s.transpose(1, 2));

      // The mask on P; with decay, phi(Q) and phi(K) then take the factors of the
      // carry-in read and of the state update (P has been formed from them already).
      at::parallel_for(0, items, grain, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
          const auto gpow = powers(i % BH % geo.H);
          mask(p_p + i * C * C, C, gpow);
          if (!decay) continue;
          const int64_t n = steps(i / BH);
          for (int64_t r = 0; r < n; ++r) {
            scale_row(qf_p + (i * C + r) * Dk, Dk, gpow[r + 1]);
            scale_row(kf_p + (i * C + r) * Dk, Dk, gpow[n - 1 - r]);
          }
        }
      });
      at::bmm_out(upd_s, kf_s.transpose(1, 2), vp_s);
      const bool all_finite = std::all_of(non_finite_from.begin(), non_finite_from.begin() + items,
                                          [&](int64_t f) { return f == C; });
      for (int64_t i = 0; i < items; ++i) {
        const int64_t f = non_finite_from[i];
        if (f < C) std::fill(vp_p + (i * C + f) * Dv1, vp_p + (i + 1) * C * Dv1, acc_t(0));
      }
      at::bmm_out(num_s, p_s, vp_s);
      if (!all_finite) {
        at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
          std::vector<acc_t> values;
          for (int64_t i = begin; i < end; ++i) {
            const int64_t f = non_finite_from[i];
            if (f == C) continue;
            const int64_t c = i / BH, bh = i % BH, n = steps(c);
            values.resize(n * Dv1);
            gather_values(v + geo.v_offset(bh / geo.H, t0 + c * C, bh % geo.H), n, values.data());
            causal_rows(p_p + i * C * C, C, values.data(), f, n, num_p + i * C * Dv1);
          }
        });
      }

      // The scan: U_c becomes X_c, the carry-in of chunk c, and the state moves on.
      at::parallel_for(0, BH, 1, [&](int64_t begin, int64_t end) {
        for (int64_t bh = begin; bh < end; ++bh) {
          const auto gpow = powers(bh % geo.H);
          acc_t* x = state.data_ptr<acc_t>() + bh * Dk * Dv1;
          for (int64_t c = 0; c < chunks; ++c) {
            const acc_t g = gpow[steps(c)];
            acc_t* u = upd_p + (c * BH + bh) * Dk * Dv1;
            for (int64_t e = 0; e < Dk * Dv1; ++e) {
              const acc_t inc = u[e];
              u[e] = x[e];
              x[e] = g * x[e] + inc;
            }
          }
        }
      });
      num_s.baddbmm_(qf_s, upd_s);

      at::parallel_for(0, items, grain, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
          const int64_t c = i / BH, bh = i % BH;
          write_outputs(num_p + i * C * Dv1, bh, t0 + c * C, steps(c), o, den);
        }
      });
    }
    for (int64_t bh = 0; bh < BH; ++bh) store_state(state[bh], bh, S_T, z_T);
  }

  // o and den of n steps from t0 out of their rows n' = [num, den - eps] / scale.
  void write_outputs(const acc_t* nr, int64_t bh, int64_t t0, int64_t n, scalar_t* o, acc_t* den) const {
    const int64_t b = bh / geo.H, h = bh % geo.H, Dv = geo.Dv;
    for (int64_t r = 0; r < n; ++r, nr += dv1()) {
      const acc_t d = acc_t(opt.scale) * nr[Dv] + acc_t(opt.eps);
      den[bh * geo.T + t0 + r] = d;
      const acc_t f = opt.normalize ? acc_t(opt.scale) / d : acc_t(opt.scale);
      scalar_t* out = o + geo.v_offset(b, t0 + r, h);
      for (int64_t c = 0; c < Dv; ++c) out[c] = scalar_t(nr[c] * f);
    }
  }

  static void scale_row(acc_t* x, int64_t n, acc_t f) {
    for (int64_t j = 0; j < n; ++j) x[j] *= f;
  }

  // G rows for n steps from t0: [do / den, -(do . o) / den] or [do, 0].
  void gather_output_grad(const scalar_t* grad_o, const scalar_t* o, const acc_t* den, int64_t bh,
                          int64_t t0, int64_t n, const at::Tensor& out) const {
    const int64_t b = bh / geo.H, h = bh % geo.H;
    acc_t* dst = out.data_ptr<acc_t>();
    for (int64_t r = 0; r < n; ++r, dst += dv1()) {
      const scalar_t* gr = grad_o + geo.v_offset(b, t0 + r, h);
      const scalar_t* orow = o + geo.v_offset(b, t0 + r, h);
      const acc_t inv = opt.normalize ? acc_t(1) / den[bh * geo.T + t0 + r] : acc_t(1);
      acc_t dot = 0;
      for (int64_t c = 0; c < geo.Dv; ++c) {
        dst[c] = acc_t(gr[c]) * inv;
        dot += acc_t(gr[c]) * acc_t(orow[c]);
      }
      dst[geo.Dv] = opt.normalize ? -dot * inv : acc_t(0);
    }
  }

  // dx = scale * grad_tile * phi'(x), written back as [B, T, H, D] rows.
  void store_feature_grad(const at::Tensor& grad, const scalar_t* x, acc_t factor,
                          scalar_t* dx) const {
    const int64_t n = grad.size(0), D = grad.size(1);
    const acc_t* src = grad.data_ptr<acc_t>();
    for (int64_t r = 0; r < n; ++r, x += geo.H * D, dx += geo.H * D, src += D) {
      if constexpr (F == FeatureMap::Elu1 && std::is_same_v<scalar_t, float>) {
        // elu1'(x) = min(elu1(x), 1): 1 above zero, e^x below (NaN stays NaN).
        float phi[kMaxHeadDim];
        elu1_rows(x, phi, D);
        for (int64_t d = 0; d < D; ++d) dx[d] = factor * src[d] * (phi[d] > 1.0f ? 1.0f : phi[d]);
      } else {
        for (int64_t d = 0; d < D; ++d) dx[d] = scalar_t(factor * src[d] * feature_grad<F>(acc_t(x[d])));
      }
    }
  }

  void backward(int64_t bh, Scratch& s, const scalar_t* grad_o, const acc_t* grad_S,
                const acc_t* grad_z, const scalar_t* o, const acc_t* den, scalar_t* dq,
                scalar_t* dk, scalar_t* dv, at::Tensor& dS0, at::Tensor& dz0) const {
    const int64_t b = bh / geo.H, h = bh % geo.H, Dk = geo.Dk, Dv = geo.Dv;
    const acc_t scale = acc_t(opt.scale);
    const auto gpow = powers(h);
    at::Tensor state = tile(s.state, Dk, dv1());

    // Forward sweep: G, dphi(Q) = scale ((G V'^T . M) phi(K) + diag(gamma^(r+1)) G S'^T).
    load_state(S0, z0, bh, state);
    for (int64_t t0 = 0; t0 < geo.T; t0 += kChunk) {
      const int64_t n = std::min(kChunk, geo.T - t0);
      at::Tensor kf = tile(s.kf, n, Dk), vp = tile(s.vp, n, dv1()), gt = tile(s.g, n, dv1(), t0 * dv1());
      at::Tensor dp = tile(s.p, n, n), dqf = tile(s.dx, n, Dk);
      gather_feature(k + geo.qk_offset(b, t0, h), Dk, n, kf);
      gather_values(v + geo.v_offset(b, t0, h), n, vp);
      gather_output_grad(grad_o, o, den, bh, t0, n, gt);
      at::mm_out(dp, gt, vp.t());
      mask(dp, gpow);
      masked_product(dqf, dp, kf, false, 0, 1);
      dqf.addmm_(decayed(gt, false, gpow, s.rows), state.t());
      store_feature_grad(dqf, q + geo.qk_offset(b, t0, h), scale, dq + geo.qk_offset(b, t0, h));
      advance_state(state, kf, vp, gpow, s);
    }

    // Reverse sweep carrying W, the gradient of the state at the chunk's last step.
    at::Tensor& w = state;
    load_state(grad_S, grad_z, bh, w);
    for (int64_t t0 = (geo.T - 1) / kChunk * kChunk; t0 >= 0 && geo.T > 0; t0 -= kChunk) {
      const int64_t n = std::min(kChunk, geo.T - t0);
      at::Tensor qf = tile(s.qf, n, Dk), kf = tile(s.kf, n, Dk), vp = tile(s.vp, n, dv1());
      at::Tensor gt = tile(s.g, n, dv1(), t0 * dv1());
      at::Tensor p = tile(s.p, n, n), dvp = tile(s.n, n, dv1()), dkf = tile(s.dx, n, Dk);
      gather_feature(q + geo.qk_offset(b, t0, h), Dk, n, qf);
      gather_feature(k + geo.qk_offset(b, t0, h), Dk, n, kf);
      gather_values(v + geo.v_offset(b, t0, h), n, vp);

      // dV' = scale (phi(Q) phi(K)^T . M)^T G + diag(gamma^(n-1-s)) phi(K) W
      at::mm_out(p, qf, kf.t());
      mask(p, gpow);
      at::mm_out(dvp, decayed(kf, true, gpow, s.rows), w);
      masked_product(dvp, p, gt, true, 1, scale);
      const acc_t* src = dvp.data_ptr<acc_t>();
      for (int64_t r = 0; r < n; ++r, src += dv1()) {
        scalar_t* dst = dv + geo.v_offset(b, t0 + r, h);
        for (int64_t c = 0; c < Dv; ++c) dst[c] = scalar_t(src[c]);
      }

      // dphi(K) = scale (G V'^T . M)^T phi(Q) + diag(gamma^(n-1-s)) V' W^T
      at::mm_out(p, gt, vp.t());
      mask(p, gpow);
      at::mm_out(dkf, decayed(vp, true, gpow, s.rows), w.t());
      masked_product(dkf, p, qf, true, 1, scale);
      store_feature_grad(dkf, k + geo.qk_offset(b, t0, h), acc_t(1), dk + geo.qk_offset(b, t0, h));

      // W <- gamma^n W + scale (diag(gamma^(r+1)) phi(Q))^T G
      w.addmm_(decayed(qf, false, gpow, s.rows).t(), gt, gpow[n], scale);
    }
    store_state(w, bh, dS0, dz0);
  }
};

// Calls fn(std::integral_constant<FeatureMap, F>{}) for the runtime feature map.
template <typename Fn>
void dispatch_feature_map(FeatureMap f, Fn&& fn) {
  switch (f) {
    case FeatureMap::Elu1: return fn(std::integral_constant<FeatureMap, FeatureMap::Elu1>{});
    case FeatureMap::Relu: return fn(std::integral_constant<FeatureMap, FeatureMap::Relu>{});
    default: return fn(std::integral_constant<FeatureMap, FeatureMap::Identity>{});
  }
}

// Calls fn(kernel) with the kernel for the runtime dtype and feature map.
template <typename Fn>
void with_kernel(const LinearAttentionGeometry& geo, const LinearAttentionOptions& opt,
                 const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                 const at::Tensor& decay, const at::Tensor& S0, const at::Tensor& z0, const Fn& fn) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "linear_attention_cpu", [&] {
    using storage_t = typename Types<scalar_t>::storage;
    using acc_t = typename Types<scalar_t>::acc;
    dispatch_feature_map(opt.feature_map, [&](auto fm) {
      fn(Kernel<decltype(fm)::value, storage_t, acc_t>{
          geo, opt,
          reinterpret_cast<const storage_t*>(q.data_ptr()),
          reinterpret_cast<const storage_t*>(k.data_ptr()),
          reinterpret_cast<const storage_t*>(v.data_ptr()),
          data_or_null<const acc_t>(decay), data_or_null<const acc_t>(S0), data_or_null<const acc_t>(z0)});
    });
  });
}

// Runs item(kernel, bh, scratch) for every (batch, head) in parallel, with ATen's
// autograd machinery switched off for the scratch products.
template <typename Item>
void for_each_head(const LinearAttentionGeometry& geo, const LinearAttentionOptions& opt,
                   const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                   const at::Tensor& decay, const at::Tensor& S0, const at::Tensor& z0,
                   bool backward, const Item& item) {
  with_kernel(geo, opt, q, k, v, decay, S0, z0, [&](const auto& kernel) {
    using acc_t = typename std::decay_t<decltype(kernel)>::acc_type;
    const auto acc = c10::CppTypeToScalarType<acc_t>::value;
    // Heads with little work (decoding, T = 1) run on the calling thread: waking the
    // pool costs more than they do.
    const int64_t work = std::max<int64_t>(1, geo.T * (geo.Dk + 1) * (geo.Dv + 1));
    const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 20) / work);
    at::parallel_for(0, geo.B * geo.H, grain, [&](int64_t begin, int64_t end) {
      c10::InferenceMode guard;
      Scratch scratch(geo, acc, backward);
      for (int64_t bh = begin; bh < end; ++bh) item(kernel, bh, scratch);
    });
  });
}


}  // namespace

void linear_attention_forward(const LinearAttentionGeometry& g, const LinearAttentionOptions& opt,
                              const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                              const at::Tensor& decay, const at::Tensor& S0, const at::Tensor& z0,
                              at::Tensor& o, at::Tensor& S_T, at::Tensor& z_T, at::Tensor& den) {
  if (g.T == 1) {
    with_kernel(g, opt, q, k, v, decay, S0, z0, [&](const auto& kernel) {
      using K = std::decay_t<decltype(kernel)>;
      using acc_t = typename K::acc_type;
      // About 32k state elements per task: below that, waking the pool costs more.
      const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, g.Dk * (g.Dv + 1)));
      at::parallel_for(0, g.B * g.H, grain, [&](int64_t begin, int64_t end) {
        for (int64_t bh = begin; bh < end; ++bh) {
          kernel.forward_step(bh, data_or_null<typename K::storage_type>(o), data_or_null<acc_t>(S_T),
                              data_or_null<acc_t>(z_T), data_or_null<acc_t>(den));
        }
      });
    });
    return;
  }
  with_kernel(g, opt, q, k, v, decay, S0, z0, [&](const auto& kernel) {
    using K = std::decay_t<decltype(kernel)>;
    c10::InferenceMode guard;
    kernel.forward_chunked(data_or_null<typename K::storage_type>(o), S_T, z_T,
                           data_or_null<typename K::acc_type>(den));
  });
}

void linear_attention_backward(const LinearAttentionGeometry& g, const LinearAttentionOptions& opt,
                               const at::Tensor& grad_o, const at::Tensor& grad_S,
                               const at::Tensor& grad_z, const at::Tensor& q, const at::Tensor& k,
                               const at::Tensor& v, const at::Tensor& o, const at::Tensor& den,
                               const at::Tensor& decay, const at::Tensor& S0, const at::Tensor& z0,
                               at::Tensor& dq, at::Tensor& dk, at::Tensor& dv, at::Tensor& dS0,
                               at::Tensor& dz0) {
  for_each_head(g, opt, q, k, v, decay, S0, z0, true, [&](const auto& kernel, int64_t bh, Scratch& s) {
    using K = std::decay_t<decltype(kernel)>;
    using storage_t = typename K::storage_type;
    using acc_t = typename K::acc_type;
    kernel.backward(bh, s, data_or_null<const storage_t>(grad_o), data_or_null<const acc_t>(grad_S),
                    data_or_null<const acc_t>(grad_z), data_or_null<const storage_t>(o),
                    data_or_null<const acc_t>(den), data_or_null<storage_t>(dq), data_or_null<storage_t>(dk),
                    data_or_null<storage_t>(dv), dS0, dz0);
  });
}

}  // namespace seqfuse::cpu
