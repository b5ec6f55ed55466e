// CPU causal linear attention (maths: csrc/common/linear_attention.h): how a call is cut
// into work items, spread over threads, and how states are carried between items.
//
// A work item is one (batch, head) over a range of steps, walked chunk by chunk with the
// state carried in a tile (linear_attention_chunks.h; its products run on register-
// blocked micro-kernels, tile_gemm.h, compiled for AVX2+FMA and for the x86-64 baseline
// and picked at run time). With at least as many (batch, head) pairs as threads, an item
// is a whole sequence. With fewer, each sequence is cut into segments, so that every
// thread has one, and the states at the segment boundaries are found first:
//
//   1. in parallel, the increment of every piece of the sequence that precedes a
//      boundary: U = sum_s gamma^(end-1-s) phi(k_s) [v_s, 1]^T, the state that piece
//      leaves from a zero start (the backward also takes the increments of W, the
//      state's gradient, of the pieces after a boundary, from a zero W at their end);
//   2. per head, a cheap carry over pieces: X <- gamma^len X + U (W likewise, backwards);
//   3. in parallel, every segment from its carry-in, as a whole sequence would run.
//
// Step 1 costs about a third of step 3 per step covered (only the state products), and
// its pieces are cut finer than the segments so that it too keeps every thread busy.
// A decoding step (T = 1) is a plain loop per head over its state.
#include "linear_attention.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <type_traits>
#include <vector>

#include "dtype.h"
#include "linear_attention_chunks.h"

namespace seqfuse::cpu {
namespace {

// Steps per chunk. Per step, a chunk of C steps costs the two state products (4 Dk Dv
// FLOPs, whatever C) plus the causal halves of the intra-chunk ones (about
// C (Dk + Dv)); C also sets the depth of the state update and the height of the state
// read, which the micro-kernel wants at least a few dozen deep.
int64_t chunk_length(int64_t Dk, int64_t Dv) {
  const int64_t d = std::max(Dk, Dv);
  return d <= 64 ? 16 : 64;
}

// The AVX2+FMA kernels when they are built and the processor has both, unless
// SEQFUSE_CPU_ISA=baseline asks for the baseline ones (read once: it lets the tests run
// those on any machine).
bool use_avx2() {
#ifdef SEQFUSE_CHUNKS_AVX2
  static const bool yes = [] {
    const char* forced = std::getenv("SEQFUSE_CPU_ISA");
    if (forced && std::strcmp(forced, "baseline") == 0) return false;
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  return yes;
#else
  return false;
#endif
}

// How the steps of every head are cut. Segments: what the work items of the main pass
// cover; pieces: what the first pass's items cover, each segment cut into `pieces`.
struct Split {
  int64_t T, segments, segment_len, pieces, piece_len;

  Split(int64_t BH, int64_t T_, int64_t C) : T(T_) {
    const int64_t threads = at::get_num_threads(), chunks = (T + C - 1) / C;
    // Segments only where (batch, head) pairs alone leave threads idle, and of at least
    // two chunks each; enough that the items divide evenly over the threads.
    segments = BH >= threads ? 1 : threads / std::gcd(BH, threads);
    segments = std::max<int64_t>(1, std::min(segments, chunks / 2));
    segment_len = std::max<int64_t>(1, (chunks + segments - 1) / segments) * C;
    segments = std::max<int64_t>(1, (T + segment_len - 1) / segment_len);
    // Pieces: the first pass has BH * (segments - 1) segments to cover; cut each so that
    // the pieces too divide evenly over the threads.
    const int64_t work = std::max<int64_t>(1, BH * (segments - 1));
    pieces = std::max<int64_t>(1, std::min(threads / std::gcd(work, threads), segment_len / C));
    piece_len = (segment_len / C + pieces - 1) / pieces * C;
  }
  int64_t begin(int64_t j) const { return std::min(T, j * segment_len); }
  int64_t end(int64_t j) const { return std::min(T, (j + 1) * segment_len); }
  int64_t piece_begin(int64_t j, int64_t i) const { return std::min(end(j), begin(j) + i * piece_len); }
  int64_t piece_end(int64_t j, int64_t i) const { return std::min(end(j), begin(j) + (i + 1) * piece_len); }
};

template <typename acc_t>
acc_t power(acc_t gamma, int64_t n) {
  acc_t x = 1;
  for (int64_t i = 0; i < n; ++i) x *= gamma;
  return x;
}

// x <- f x + u over n values.
template <typename acc_t>
void carry(acc_t* x, acc_t f, const acc_t* u, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] = f * x[i] + u[i];
}

// One thread's scratch for the items it runs, plus room for the states it carries.
template <typename acc_t>
struct ItemScratch {
  std::vector<acc_t> buf;
  acc_t *tiles, *S, *z, *W, *Wz;
  ItemScratch(int64_t C, int64_t Dk, int64_t Dv) {
    const int64_t tiles_n = chunk_scratch_elements(C, Dk, Dv);
    buf.resize(tiles_n + 2 * (Dk * Dv + Dk));
    tiles = buf.data(), S = tiles + tiles_n, z = S + Dk * Dv, W = z + Dk, Wz = W + Dk * Dv;
  }
};

// A [Dk, Dv] state and its [Dk] partner into dst, from src (zeros when null).
template <typename acc_t>
void load_state(const acc_t* S, const acc_t* z, int64_t Dk, int64_t Dv, acc_t* S_dst,
                acc_t* z_dst) {
  if (S) std::copy_n(S, Dk * Dv, S_dst); else std::fill_n(S_dst, Dk * Dv, acc_t(0));
  if (z) std::copy_n(z, Dk, z_dst); else std::fill_n(z_dst, Dk, acc_t(0));
}

template <typename scalar_t, typename acc_t>
class Runner {
 public:
  using Problem = ChunkProblem<scalar_t, acc_t>;

  explicit Runner(const Problem& p)
      : p_(p), g_(p.geo), BH_(g_.B * g_.H), state_(g_.Dk * g_.Dv), split_(BH_, g_.T, p.chunk) {}

  // S0, z0: initial state or null; S_T, z_T: the final state.
  void forward(const acc_t* S0, const acc_t* z0, acc_t* S_T, acc_t* z_T) const {
    std::vector<acc_t> X, Xz;  // per (head, segment): the carry-in
    carry_ins(S0, z0, X, Xz);
    run_items(split_.segments, [&](int64_t bh, int64_t j, ItemScratch<acc_t>& s) {
      const bool last = j == split_.segments - 1;
      acc_t* S = last ? S_T + bh * state_ : s.S;
      acc_t* z = last ? z_T + bh * g_.Dk : s.z;
      const int64_t at = bh * split_.segments + j;
      if (split_.segments == 1) {
        load_state(S0 ? S0 + bh * state_ : nullptr, z0 ? z0 + bh * g_.Dk : nullptr, g_.Dk, g_.Dv, S, z);
      } else {
        load_state(X.data() + at * state_, Xz.data() + at * g_.Dk, g_.Dk, g_.Dv, S, z);
      }
      forward_item(bh, split_.begin(j), split_.end(j), S, z, true, s.tiles);
    });
  }

  // grad_S, grad_z: the final state's gradient or null; dS0, dz0: the initial state's.
  void backward(const acc_t* S0, const acc_t* z0, const acc_t* grad_S, const acc_t* grad_z,
                acc_t* dS0, acc_t* dz0) const {
    std::vector<acc_t> X, Xz, Y, Yz;  // per (head, segment): S at its start, W at its end
    carry_ins(S0, z0, X, Xz);
    gradient_carry_ins(grad_S, grad_z, Y, Yz);
    run_items(split_.segments, [&](int64_t bh, int64_t j, ItemScratch<acc_t>& s) {
      const int64_t at = bh * split_.segments + j;
      const bool multi = split_.segments > 1;
      load_state(multi ? X.data() + at * state_ : S0 ? S0 + bh * state_ : nullptr,
                 multi ? Xz.data() + at * g_.Dk : z0 ? z0 + bh * g_.Dk : nullptr, g_.Dk, g_.Dv,
                 s.S, s.z);
      // W ends in dS0 for the first segment.
      acc_t* W = j == 0 ? dS0 + bh * state_ : s.W;
      acc_t* Wz = j == 0 ? dz0 + bh * g_.Dk : s.Wz;
      load_state(multi ? Y.data() + at * state_ : grad_S ? grad_S + bh * state_ : nullptr,
                 multi ? Yz.data() + at * g_.Dk : grad_z ? grad_z + bh * g_.Dk : nullptr, g_.Dk,
                 g_.Dv, W, Wz);
      backward_item(bh, split_.begin(j), split_.end(j), s.S, s.z, W, Wz, true, s.tiles);
    });
  }

 private:
  void forward_item(int64_t bh, int64_t t0, int64_t t1, acc_t* S, acc_t* z, bool outputs,
                    acc_t* tiles) const {
#ifdef SEQFUSE_CHUNKS_AVX2
    if (use_avx2()) return chunked_forward_avx2(p_, bh, t0, t1, S, z, outputs, tiles);
#endif
    chunked_forward_baseline(p_, bh, t0, t1, S, z, outputs, tiles);
  }
  void backward_item(int64_t bh, int64_t t0, int64_t t1, acc_t* S, acc_t* z, acc_t* W, acc_t* Wz,
                     bool grads, acc_t* tiles) const {
#ifdef SEQFUSE_CHUNKS_AVX2
    if (use_avx2()) return chunked_backward_avx2(p_, bh, t0, t1, S, z, W, Wz, grads, tiles);
#endif
    chunked_backward_baseline(p_, bh, t0, t1, S, z, W, Wz, grads, tiles);
  }

  // item(bh, j, scratch) for every head bh and j < per_head, in parallel. Threads take
  // the next item as they finish one rather than a fixed share, so that a thread slowed
  // by other work on the machine does not leave the others waiting at the end.
  template <typename Item>
  void run_items(int64_t per_head, const Item& item) const {
    const int64_t total = BH_ * per_head;
    std::atomic<int64_t> next{0};
    at::parallel_for(0, std::min<int64_t>(total, at::get_num_threads()), 1, [&](int64_t, int64_t) {
      ItemScratch<acc_t> scratch(p_.chunk, g_.Dk, g_.Dv);
      for (int64_t i = next++; i < total; i = next++) item(i / per_head, i % per_head, scratch);
    });
  }

  acc_t gamma(int64_t bh) const { return p_.decay ? p_.decay[bh % g_.H] : acc_t(1); }

  // Steps 1 and 2 for S: X, Xz [BH, segments] get every segment's state at its start.
  void carry_ins(const acc_t* S0, const acc_t* z0, std::vector<acc_t>& X,
                 std::vector<acc_t>& Xz) const {
    const int64_t segs = split_.segments, pieces = split_.pieces, Dk = g_.Dk;
    if (segs == 1) return;
    // U, Uz [BH, segments - 1, pieces]: the increments of the pieces before the last segment.
    const int64_t per_head = (segs - 1) * pieces;
    std::vector<acc_t> U(BH_ * per_head * state_, acc_t(0)), Uz(BH_ * per_head * Dk, acc_t(0));
    run_items(per_head, [&](int64_t bh, int64_t i, ItemScratch<acc_t>& s) {
      const int64_t j = i / pieces, k = i % pieces, at = bh * per_head + i;
      const int64_t t0 = split_.piece_begin(j, k), t1 = split_.piece_end(j, k);
      if (t1 > t0) forward_item(bh, t0, t1, U.data() + at * state_, Uz.data() + at * Dk, false, s.tiles);
    });
    X.resize(BH_ * segs * state_);
    Xz.resize(BH_ * segs * Dk);
    at::parallel_for(0, BH_, 1, [&](int64_t begin, int64_t end) {
      for (int64_t bh = begin; bh < end; ++bh) {
        acc_t* x = X.data() + bh * segs * state_;
        acc_t* xz = Xz.data() + bh * segs * Dk;
        load_state(S0 ? S0 + bh * state_ : nullptr, z0 ? z0 + bh * Dk : nullptr, Dk, g_.Dv, x, xz);
        for (int64_t j = 0; j + 1 < segs; ++j) {
          std::copy_n(x + j * state_, state_, x + (j + 1) * state_);
          std::copy_n(xz + j * Dk, Dk, xz + (j + 1) * Dk);
          for (int64_t k = 0; k < pieces; ++k) {
            const int64_t at = bh * per_head + j * pieces + k;
            const acc_t f = power(gamma(bh), split_.piece_end(j, k) - split_.piece_begin(j, k));
            carry(x + (j + 1) * state_, f, U.data() + at * state_, state_);
            carry(xz + (j + 1) * Dk, f, Uz.data() + at * Dk, Dk);
          }
        }
      }
    });
  }

  // Steps 1 and 2 for W: Y, Yz [BH, segments] get the gradient of every segment's state
  // at its end.
  void gradient_carry_ins(const acc_t* grad_S, const acc_t* grad_z, std::vector<acc_t>& Y,
                          std::vector<acc_t>& Yz) const {
    const int64_t segs = split_.segments, pieces = split_.pieces, Dk = g_.Dk;
    if (segs == 1) return;
    // R, Rz [BH, segments - 1, pieces]: the increments of the pieces after the first segment.
    const int64_t per_head = (segs - 1) * pieces;
    std::vector<acc_t> R(BH_ * per_head * state_, acc_t(0)), Rz(BH_ * per_head * Dk, acc_t(0));
    run_items(per_head, [&](int64_t bh, int64_t i, ItemScratch<acc_t>& s) {
      const int64_t j = 1 + i / pieces, k = i % pieces, at = bh * per_head + i;
      const int64_t t0 = split_.piece_begin(j, k), t1 = split_.piece_end(j, k);
      if (t1 > t0) {
        backward_item(bh, t0, t1, nullptr, nullptr, R.data() + at * state_, Rz.data() + at * Dk,
                      false, s.tiles);
      }
    });
    Y.resize(BH_ * segs * state_);
    Yz.resize(BH_ * segs * Dk);
    at::parallel_for(0, BH_, 1, [&](int64_t begin, int64_t end) {
      for (int64_t bh = begin; bh < end; ++bh) {
        acc_t* y = Y.data() + bh * segs * state_;
        acc_t* yz = Yz.data() + bh * segs * Dk;
        load_state(grad_S ? grad_S + bh * state_ : nullptr, grad_z ? grad_z + bh * Dk : nullptr, Dk,
                   g_.Dv, y + (segs - 1) * state_, yz + (segs - 1) * Dk);
        for (int64_t j = segs - 1; j > 0; --j) {
          std::copy_n(y + j * state_, state_, y + (j - 1) * state_);
          std::copy_n(yz + j * Dk, Dk, yz + (j - 1) * Dk);
          for (int64_t k = pieces - 1; k >= 0; --k) {
            const int64_t at = bh * per_head + (j - 1) * pieces + k;
            const acc_t f = power(gamma(bh), split_.piece_end(j, k) - split_.piece_begin(j, k));
            carry(y + (j - 1) * state_, f, R.data() + at * state_, state_);
            carry(yz + (j - 1) * Dk, f, Rz.data() + at * Dk, Dk);
          }
        }
      }
    });
  }

  const Problem& p_;
  const LinearAttentionGeometry& g_;
  const int64_t BH_, state_;
  const Split split_;
};

// One decoding step (T = 1) of head bh in one pass over its state, S0 straight into
// S_T: S' <- gamma S' + phi(k) [v, 1]^T, o = scale phi(q)^T S' (/ den).
template <FeatureMap F, typename scalar_t, typename acc_t>
void forward_step(const ChunkProblem<scalar_t, acc_t>& p, int64_t bh, const acc_t* S0,
                  const acc_t* z0, acc_t* S_T, acc_t* z_T) {
  const LinearAttentionGeometry& geo = p.geo;
  const int64_t b = bh / geo.H, h = bh % geo.H, Dk = geo.Dk, Dv = geo.Dv;
  const acc_t gamma = p.decay ? p.decay[h] : acc_t(1);
  const acc_t* S_in = S0 ? S0 + bh * Dk * Dv : nullptr;
  const acc_t* z_in = z0 ? z0 + bh * Dk : nullptr;
  acc_t* S_out = S_T + bh * Dk * Dv;
  acc_t* z_out = z_T + bh * Dk;
  std::array<acc_t, kMaxHeadDim> vr, num{};
  acc_t num_z = 0;
  const scalar_t* v_row = p.v + geo.v_offset(b, 0, h);
  for (int64_t c = 0; c < Dv; ++c) vr[c] = acc_t(v_row[c]);
  const scalar_t* qr = p.q + geo.qk_offset(b, 0, h);
  const scalar_t* kr = p.k + geo.qk_offset(b, 0, h);
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
  const acc_t d = p.scale * num_z + p.eps;
  p.den[bh] = d;
  const acc_t f = p.normalize ? p.scale / d : p.scale;
  scalar_t* out = p.o + geo.v_offset(b, 0, h);
  for (int64_t c = 0; c < Dv; ++c) out[c] = scalar_t(num[c] * f);
}

// Calls fn(problem) with the problem of this call in its storage and accumulation types.
template <typename Fn>
void with_problem(const LinearAttentionGeometry& geo, const LinearAttentionOptions& opt,
                  const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                  const at::Tensor& decay, const Fn& fn) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "linear_attention_cpu", [&] {
    using storage_t = typename Types<scalar_t>::storage;
    using acc_t = typename Types<scalar_t>::acc;
    ChunkProblem<storage_t, acc_t> p{};
    p.geo = geo;
    p.feature_map = opt.feature_map;
    p.normalize = opt.normalize;
    p.scale = acc_t(opt.scale);
    p.eps = acc_t(opt.eps);
    p.chunk = chunk_length(geo.Dk, geo.Dv);
    p.decay = data_or_null<const acc_t>(decay);
    p.q = data_or_null<const storage_t>(q);
    p.k = data_or_null<const storage_t>(k);
    p.v = data_or_null<const storage_t>(v);
    fn(p);
  });
}

template <typename Fn>
void with_feature_map(FeatureMap f, Fn&& fn) {
  switch (f) {
    case FeatureMap::Elu1: return fn(std::integral_constant<FeatureMap, FeatureMap::Elu1>{});
    case FeatureMap::Relu: return fn(std::integral_constant<FeatureMap, FeatureMap::Relu>{});
    default: return fn(std::integral_constant<FeatureMap, FeatureMap::Identity>{});
  }
}

}  // namespace

void linear_attention_forward(const LinearAttentionGeometry& g, const LinearAttentionOptions& opt,
                              const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                              const at::Tensor& decay, const at::Tensor& S0, const at::Tensor& z0,
                              at::Tensor& o, at::Tensor& S_T, at::Tensor& z_T, at::Tensor& den) {
  if (g.B * g.H == 0) return;
  with_problem(g, opt, q, k, v, decay, [&](auto& p) {
    using P = std::decay_t<decltype(p)>;
    using storage_t = std::remove_cv_t<std::remove_pointer_t<decltype(p.o)>>;
    using acc_t = decltype(p.scale);
    p.o = data_or_null<storage_t>(o);
    p.den = data_or_null<acc_t>(den);
    const acc_t *s0 = data_or_null<const acc_t>(S0), *z0p = data_or_null<const acc_t>(z0);
    acc_t *sT = data_or_null<acc_t>(S_T), *zT = data_or_null<acc_t>(z_T);
    if (g.T == 0) {
      // The state passes through unchanged.
      for (int64_t bh = 0; bh < g.B * g.H; ++bh) {
        load_state(s0 ? s0 + bh * g.Dk * g.Dv : nullptr, z0p ? z0p + bh * g.Dk : nullptr, g.Dk,
                   g.Dv, sT + bh * g.Dk * g.Dv, zT + bh * g.Dk);
      }
    } else if (g.T == 1) {
      // About 32k state elements per task: below that, waking the pool costs more.
      const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, g.Dk * (g.Dv + 1)));
      with_feature_map(opt.feature_map, [&](auto f) {
        at::parallel_for(0, g.B * g.H, grain, [&](int64_t begin, int64_t end) {
          for (int64_t bh = begin; bh < end; ++bh) {
            forward_step<decltype(f)::value>(p, bh, s0, z0p, sT, zT);
          }
        });
      });
    } else {
      Runner<storage_t, acc_t>(static_cast<const P&>(p)).forward(s0, z0p, sT, zT);
    }
  });
}

void linear_attention_backward(const LinearAttentionGeometry& g, const LinearAttentionOptions& opt,
                               const at::Tensor& grad_o, const at::Tensor& grad_S,
                               const at::Tensor& grad_z, const at::Tensor& q, const at::Tensor& k,
                               const at::Tensor& v, const at::Tensor& o, const at::Tensor& den,
                               const at::Tensor& decay, const at::Tensor& S0, const at::Tensor& z0,
                               at::Tensor& dq, at::Tensor& dk, at::Tensor& dv, at::Tensor& dS0,
                               at::Tensor& dz0) {
  if (g.B * g.H == 0) return;
  with_problem(g, opt, q, k, v, decay, [&](auto& p) {
    using storage_t = std::remove_cv_t<std::remove_pointer_t<decltype(p.o)>>;
    using acc_t = decltype(p.scale);
    p.grad_o = data_or_null<const storage_t>(grad_o);
    p.o_saved = data_or_null<const storage_t>(o);
    p.den_saved = data_or_null<const acc_t>(den);
    p.dq = data_or_null<storage_t>(dq);
    p.dk = data_or_null<storage_t>(dk);
    p.dv = data_or_null<storage_t>(dv);
    Runner<storage_t, acc_t>(p).backward(data_or_null<const acc_t>(S0), data_or_null<const acc_t>(z0),
                                         data_or_null<const acc_t>(grad_S),
                                         data_or_null<const acc_t>(grad_z), data_or_null<acc_t>(dS0),
                                         data_or_null<acc_t>(dz0));
  });
}

}  // namespace seqfuse::cpu
