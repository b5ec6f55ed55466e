// CPU causal linear attention, chunked (maths: csrc/common/linear_attention.h).
//
// Work items are (batch, head) pairs, run in parallel. Each walks its chunks of
// kChunk steps carrying S' = [S, z] ([Dk, Dv+1]) in a scratch tile. A chunk's operands
// (phi(Q), phi(K), V' = [V, 1], G) are gathered once into contiguous tiles in the
// accumulation type, with the feature map applied on the way in; the tile products go
// to ATen's matrix multiply (BLAS), the masks, decays and normaliser are plain loops.
// The backward is a forward sweep (G and dq, re-deriving the carried state) followed
// by a reverse sweep carrying W (dk, dv, and the gradient of the initial state).
#include "linear_attention.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/core/InferenceMode.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "dtype.h"

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

  int64_t dv1() const { return geo.Dv + 1; }

  // phi(x) for n steps of one head, from [B, T, H, D] rows into a contiguous [n, D] tile.
  void gather_feature(const scalar_t* x, int64_t D, int64_t n, const at::Tensor& out) const {
    acc_t* dst = out.data_ptr<acc_t>();
    for (int64_t r = 0; r < n; ++r, x += geo.H * D, dst += D) {
      for (int64_t d = 0; d < D; ++d) dst[d] = feature<F>(acc_t(x[d]));
    }
  }

  // V' = [V, 1] for n steps starting at v_row.
  void gather_values(const scalar_t* v_row, int64_t n, const at::Tensor& out) const {
    acc_t* dst = out.data_ptr<acc_t>();
    for (int64_t r = 0; r < n; ++r, v_row += geo.H * geo.Dv, dst += dv1()) {
      for (int64_t c = 0; c < geo.Dv; ++c) dst[c] = acc_t(v_row[c]);
      dst[geo.Dv] = acc_t(1);
    }
  }

  // The intra-chunk mask M_rs = gamma^(r-s) for s <= r, 0 above the diagonal.
  static void mask(const at::Tensor& p, const std::vector<acc_t>& gpow) {
    const int64_t n = p.size(0);
    acc_t* x = p.data_ptr<acc_t>();
    for (int64_t r = 0; r < n; ++r) {
      for (int64_t s = 0; s <= r; ++s) x[r * n + s] *= gpow[r - s];
      std::fill(x + r * n + r + 1, x + (r + 1) * n, acc_t(0));
    }
  }

  // diag(gamma^(e_r)) X with e_r = r + 1 (reading the carried state) or n - 1 - r
  // (writing it); X itself when there is no decay.
  at::Tensor decayed(const at::Tensor& x, bool into_state, const std::vector<acc_t>& gpow,
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

  std::vector<acc_t> powers(int64_t h) const {
    std::vector<acc_t> gpow(kChunk + 2, acc_t(1));
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
                     const std::vector<acc_t>& gpow, Scratch& s) const {
    state.addmm_(decayed(kf, true, gpow, s.rows).t(), vp, gpow[kf.size(0)], 1);
  }

  // One decoding step (T = 1) in plain loops, with no matrix-product calls:
  // S' <- gamma S' + phi(k) [v, 1]^T, o = scale phi(q)^T S' (/ den).
  void forward_step(int64_t bh, Scratch& s, scalar_t* o, at::Tensor& S_T, at::Tensor& z_T,
                    acc_t* den) const {
    const int64_t b = bh / geo.H, h = bh % geo.H, Dv = geo.Dv;
    const acc_t gamma = decay ? decay[h] : acc_t(1);
    at::Tensor state = tile(s.state, geo.Dk, dv1());
    load_state(S0, z0, bh, state);
    acc_t* S = state.data_ptr<acc_t>();
    acc_t* num = s.n.data_ptr<acc_t>();
    gather_values(v + geo.v_offset(b, 0, h), 1, s.vp);
    const acc_t* vp = s.vp.data_ptr<acc_t>();
    const scalar_t* qr = q + geo.qk_offset(b, 0, h);
    const scalar_t* kr = k + geo.qk_offset(b, 0, h);
    std::fill_n(num, dv1(), acc_t(0));
    for (int64_t d = 0; d < geo.Dk; ++d) {
      const acc_t kf = feature<F>(acc_t(kr[d])), qf = feature<F>(acc_t(qr[d]));
      acc_t* row = S + d * dv1();
      for (int64_t c = 0; c < dv1(); ++c) {
        row[c] = gamma * row[c] + kf * vp[c];
        num[c] += qf * row[c];
      }
    }
    const acc_t d = acc_t(opt.scale) * num[Dv] + acc_t(opt.eps);
    den[bh] = d;
    const acc_t f = opt.normalize ? acc_t(opt.scale) / d : acc_t(opt.scale);
    scalar_t* out = o + geo.v_offset(b, 0, h);
    for (int64_t c = 0; c < Dv; ++c) out[c] = scalar_t(num[c] * f);
    store_state(state, bh, S_T, z_T);
  }

  void forward(int64_t bh, Scratch& s, scalar_t* o, at::Tensor& S_T, at::Tensor& z_T,
               acc_t* den) const {
    if (geo.T == 1) return forward_step(bh, s, o, S_T, z_T, den);
    const int64_t b = bh / geo.H, h = bh % geo.H, Dk = geo.Dk, Dv = geo.Dv;
    const auto gpow = powers(h);
    at::Tensor state = tile(s.state, Dk, dv1());
    load_state(S0, z0, bh, state);
    for (int64_t t0 = 0; t0 < geo.T; t0 += kChunk) {
      const int64_t n = std::min(kChunk, geo.T - t0);
      at::Tensor qf = tile(s.qf, n, Dk), kf = tile(s.kf, n, Dk), vp = tile(s.vp, n, dv1());
      at::Tensor p = tile(s.p, n, n), num = tile(s.n, n, dv1());
      gather_feature(q + geo.qk_offset(b, t0, h), Dk, n, qf);
      gather_feature(k + geo.qk_offset(b, t0, h), Dk, n, kf);
      gather_values(v + geo.v_offset(b, t0, h), n, vp);
      at::mm_out(p, qf, kf.t());
      mask(p, gpow);
      at::mm_out(num, p, vp);
      num.addmm_(decayed(qf, false, gpow, s.rows), state);
      const acc_t* nr = num.data_ptr<acc_t>();
      for (int64_t r = 0; r < n; ++r, nr += dv1()) {
        const acc_t d = acc_t(opt.scale) * nr[Dv] + acc_t(opt.eps);
        den[bh * geo.T + t0 + r] = d;
        const acc_t f = opt.normalize ? acc_t(opt.scale) / d : acc_t(opt.scale);
        scalar_t* out = o + geo.v_offset(b, t0 + r, h);
        for (int64_t c = 0; c < Dv; ++c) out[c] = scalar_t(nr[c] * f);
      }
      advance_state(state, kf, vp, gpow, s);
    }
    store_state(state, bh, S_T, z_T);
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
      for (int64_t d = 0; d < D; ++d) dx[d] = scalar_t(factor * src[d] * feature_grad<F>(acc_t(x[d])));
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
      at::mm_out(dqf, dp, kf);
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
      dvp.addmm_(p.t(), gt, 1, scale);
      const acc_t* src = dvp.data_ptr<acc_t>();
      for (int64_t r = 0; r < n; ++r, src += dv1()) {
        scalar_t* dst = dv + geo.v_offset(b, t0 + r, h);
        for (int64_t c = 0; c < Dv; ++c) dst[c] = scalar_t(src[c]);
      }

      // dphi(K) = scale (G V'^T . M)^T phi(Q) + diag(gamma^(n-1-s)) V' W^T
      at::mm_out(p, gt, vp.t());
      mask(p, gpow);
      at::mm_out(dkf, decayed(vp, true, gpow, s.rows), w.t());
      dkf.addmm_(p.t(), qf, 1, scale);
      store_feature_grad(dkf, k + geo.qk_offset(b, t0, h), acc_t(1), dk + geo.qk_offset(b, t0, h));

      // W <- gamma^n W + scale (diag(gamma^(r+1)) phi(Q))^T G
      w.addmm_(decayed(qf, false, gpow, s.rows).t(), gt, gpow[n], scale);
    }
    store_state(w, bh, dS0, dz0);
  }
};

template <typename acc_t>
const acc_t* optional_ptr(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<acc_t>() : nullptr;
}

// Calls fn(std::integral_constant<FeatureMap, F>{}) for the runtime feature map.
template <typename Fn>
void dispatch_feature_map(FeatureMap f, Fn&& fn) {
  switch (f) {
    case FeatureMap::Elu1: return fn(std::integral_constant<FeatureMap, FeatureMap::Elu1>{});
    case FeatureMap::Relu: return fn(std::integral_constant<FeatureMap, FeatureMap::Relu>{});
    default: return fn(std::integral_constant<FeatureMap, FeatureMap::Identity>{});
  }
}

// Runs item(kernel, bh, scratch) for every (batch, head) in parallel, with ATen's
// autograd machinery switched off for the scratch products.
template <typename Item>
void for_each_head(const LinearAttentionGeometry& geo, const LinearAttentionOptions& opt,
                   const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                   const at::Tensor& decay, const at::Tensor& S0, const at::Tensor& z0,
                   bool backward, const Item& item) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "linear_attention_cpu", [&] {
    using storage_t = typename Types<scalar_t>::storage;
    using acc_t = typename Types<scalar_t>::acc;
    dispatch_feature_map(opt.feature_map, [&](auto fm) {
      const Kernel<decltype(fm)::value, storage_t, acc_t> kernel{
          geo, opt,
          reinterpret_cast<const storage_t*>(q.data_ptr()),
          reinterpret_cast<const storage_t*>(k.data_ptr()),
          reinterpret_cast<const storage_t*>(v.data_ptr()),
          optional_ptr<acc_t>(decay), optional_ptr<acc_t>(S0), optional_ptr<acc_t>(z0)};
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
  });
}

template <typename T>
T* ptr_of(const at::Tensor& t) {
  return t.defined() ? reinterpret_cast<T*>(t.data_ptr()) : nullptr;
}

}  // namespace

void linear_attention_forward(const LinearAttentionGeometry& g, const LinearAttentionOptions& opt,
                              const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                              const at::Tensor& decay, const at::Tensor& S0, const at::Tensor& z0,
                              at::Tensor& o, at::Tensor& S_T, at::Tensor& z_T, at::Tensor& den) {
  for_each_head(g, opt, q, k, v, decay, S0, z0, false, [&](const auto& kernel, int64_t bh, Scratch& s) {
    using K = std::decay_t<decltype(kernel)>;
    using storage_t = typename K::storage_type;
    using acc_t = typename K::acc_type;
    kernel.forward(bh, s, ptr_of<storage_t>(o), S_T, z_T, ptr_of<acc_t>(den));
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
    kernel.backward(bh, s, ptr_of<const storage_t>(grad_o), ptr_of<const acc_t>(grad_S),
                    ptr_of<const acc_t>(grad_z), ptr_of<const storage_t>(o),
                    ptr_of<const acc_t>(den), ptr_of<storage_t>(dq), ptr_of<storage_t>(dk),
                    ptr_of<storage_t>(dv), dS0, dz0);
  });
}

}  // namespace seqfuse::cpu
