// CPU causal linear attention (maths: csrc/common/linear_attention.h): how a call is cut
// into work items, spread over threads, and how states are carried between items.
//
// A work item is one (batch, head) over a range of steps, walked chunk by chunk with the
// state carried in a tile (linear_attention_chunks.h; its products run on register-
// blocked micro-kernels, tile_gemm.h, compiled for AVX-512, for AVX2+FMA and for the
// x86-64 baseline and picked at run time). With at least as many (batch, head) pairs as
// threads, an item is a whole sequence. With fewer, each sequence is cut into segments,
// so that every thread has one, and the states at the segment boundaries are found
// first:
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
//
// Packed sequences (cu_seqlens): an item is a group of heads of one sequence, over that
// sequence's stretch of the row, with the sequence's own states; items are taken
// longest first, so that a long sequence does not start last. Sequences are not cut
// into segments (a batch of them is already many items).
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

// The widest build of the chunk kernels the processor runs: AVX-512 (F and VL), else
// AVX2+FMA, else the x86-64 baseline. SEQFUSE_CPU_ISA=baseline or avx2 caps the choice
// (read once: it lets the tests run every build on a machine that has the widest).
enum class Isa { Baseline, Avx2, Avx512 };

Isa chunk_isa() {
#ifdef SEQFUSE_CHUNKS_X86
  static const Isa isa = [] {
    Isa best = Isa::Baseline;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
      best = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl")
                 ? Isa::Avx512 : Isa::Avx2;
    }
    const char* cap = std::getenv("SEQFUSE_CPU_ISA");
    if (cap && std::strcmp(cap, "baseline") == 0) return Isa::Baseline;
    if (cap && std::strcmp(cap, "avx2") == 0) return std::min(best, Isa::Avx2);
    return best;
  }();
  return isa;
#else
  return Isa::Baseline;
#endif
}

// How a call is cut into items. With at least as many (batch, head) pairs as threads,
// an item is a group of `heads` heads of one batch row over the whole sequence (as many
// heads as keep the items a multiple of the thread count and their states within
// kGroupStateBytes). With fewer, an item is one head over one of `segments` segments;
// the first pass covers each segment but the last in `pieces` pieces.
struct Split {
  static constexpr int64_t kGroupStateBytes = 256 << 10;  // half of a typical L2
  int64_t T, heads, segments, segment_len, pieces, piece_len;

  // B: sequences; segmentable: whether sequences may be cut (not when packed).
  Split(int64_t B, int64_t H, int64_t T_, int64_t C, int64_t state_bytes, int64_t threads,
        bool segmentable)
      : T(T_) {
    const int64_t chunks = (T + C - 1) / C, BH = B * H;
    heads = 1;
    for (int64_t G = H; G > 1; --G) {
      if (H % G == 0 && G * state_bytes <= kGroupStateBytes && (BH / G) % threads == 0) {
        heads = G;
        break;
      }
    }
    // Segments only where (batch, head) pairs alone leave threads idle, and of at least
    // two chunks each; enough that the items divide evenly over the threads.
    segments = BH >= threads || !segmentable ? 1 : threads / std::gcd(BH, threads);
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
  int64_t piece_begin(int64_t j, int64_t i) const {
    return std::min(end(j), begin(j) + i * piece_len);
  }
  int64_t piece_end(int64_t j, int64_t i) const {
    return std::min(end(j), begin(j) + (i + 1) * piece_len);
  }
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

// `heads` [Dk, Dv] states and their [Dk] partners into dst, from src (zeros when null).
template <typename acc_t>
void load_states(const acc_t* S, const acc_t* z, int64_t heads, int64_t Dk, int64_t Dv,
                 acc_t* S_dst, acc_t* z_dst) {
  if (S) std::copy_n(S, heads * Dk * Dv, S_dst); else std::fill_n(S_dst, heads * Dk * Dv, acc_t(0));
  if (z) std::copy_n(z, heads * Dk, z_dst); else std::fill_n(z_dst, heads * Dk, acc_t(0));
}

template <typename scalar_t, typename acc_t>
class Runner {
 public:
  using Problem = ChunkProblem<scalar_t, acc_t>;

  explicit Runner(const Problem& p)
      : p_(p), g_(p.geo), BH_(g_.sequences() * g_.H), state_(g_.Dk * g_.Dv),
        threads_(threads(p)),
        split_(g_.sequences(), g_.H, g_.T, p.chunk, state_ * int64_t(sizeof(acc_t)), threads_,
               g_.cu_seqlens == nullptr),
        order_(longest_first(g_)) {}

  // S0, z0: initial state or null; S_T, z_T: the final state.
  void forward(const acc_t* S0, const acc_t* z0, acc_t* S_T, acc_t* z_T) const {
    if (split_.segments == 1) {
      const int64_t G = split_.heads;
      run_items(BH_ / G, [&](int64_t u, Scratch& s) {
        const Item it = item(u);
        load_states(at(S0, it.sh), at_z(z0, it.sh), G, g_.Dk, g_.Dv, at(S_T, it.sh),
                    at_z(z_T, it.sh));
        forward_item(it.span.row, it.h, G, it.span.start, it.span.start + it.span.length,
                     at(S_T, it.sh), at_z(z_T, it.sh), true, s.tiles);
      });
      return;
    }
    std::vector<acc_t> X, Xz;  // per (head, segment): the carry-in
    carry_ins(S0, z0, X, Xz);
    const int64_t segs = split_.segments;
    run_items(BH_ * segs, [&](int64_t i, Scratch& s) {
      const int64_t bh = i / segs, j = i % segs;
      const bool last = j == segs - 1;
      acc_t* S = last ? at(S_T, bh) : s.S;
      acc_t* z = last ? at_z(z_T, bh) : s.z;
      load_states(X.data() + i * state_, Xz.data() + i * g_.Dk, 1, g_.Dk, g_.Dv, S, z);
      forward_item(bh / g_.H, bh % g_.H, 1, split_.begin(j), split_.end(j), S, z, true, s.tiles);
    });
  }

  // grad_S, grad_z: the final state's gradient or null; dS0, dz0: the initial state's.
  void backward(const acc_t* S0, const acc_t* z0, const acc_t* grad_S, const acc_t* grad_z,
                acc_t* dS0, acc_t* dz0) const {
    if (split_.segments == 1) {
      const int64_t G = split_.heads;
      run_items(BH_ / G, [&](int64_t u, Scratch& s) {
        const Item it = item(u);
        load_states(at(S0, it.sh), at_z(z0, it.sh), G, g_.Dk, g_.Dv, s.S, s.z);
        load_states(at(grad_S, it.sh), at_z(grad_z, it.sh), G, g_.Dk, g_.Dv, at(dS0, it.sh),
                    at_z(dz0, it.sh));
        backward_item(it.span.row, it.h, G, it.span.start, it.span.start + it.span.length, s.S,
                      s.z, at(dS0, it.sh), at_z(dz0, it.sh), true, s.tiles);
      });
      return;
    }
    std::vector<acc_t> X, Xz, Y, Yz;  // per (head, segment): S at its start, W at its end
    carry_ins(S0, z0, X, Xz);
    gradient_carry_ins(grad_S, grad_z, Y, Yz);
    const int64_t segs = split_.segments;
    run_items(BH_ * segs, [&](int64_t i, Scratch& s) {
      const int64_t bh = i / segs, j = i % segs;
      load_states(X.data() + i * state_, Xz.data() + i * g_.Dk, 1, g_.Dk, g_.Dv, s.S, s.z);
      // W ends in dS0 for the first segment.
      acc_t* W = j == 0 ? at(dS0, bh) : s.W;
      acc_t* Wz = j == 0 ? at_z(dz0, bh) : s.Wz;
      load_states(Y.data() + i * state_, Yz.data() + i * g_.Dk, 1, g_.Dk, g_.Dv, W, Wz);
      backward_item(bh / g_.H, bh % g_.H, 1, split_.begin(j), split_.end(j), s.S, s.z, W, Wz,
                    true, s.tiles);
    });
  }

 private:
  // Threads worth waking: a call of under about 50 us of products on one thread runs on
  // the calling thread alone (starting the pool, and on a busy machine waiting for a
  // worker to be scheduled, costs more).
  static int64_t threads(const Problem& p) {
    const LinearAttentionGeometry& g = p.geo;
    const double flops = double(g.B * g.H * g.T) * (4 * g.Dk * g.Dv + p.chunk * (g.Dk + g.Dv));
    return flops < 4e6 ? 1 : at::get_num_threads();
  }

  // One thread's scratch for the items it runs: the chunk kernels' tiles and the states
  // an item carries.
  struct Scratch {
    std::vector<acc_t> buf;
    acc_t *tiles, *S, *z, *W, *Wz;
    Scratch(const Problem& p, int64_t heads) {
      const int64_t Dk = p.geo.Dk, state = Dk * p.geo.Dv;
      const int64_t tiles_n = chunk_scratch_elements(p.chunk, Dk, p.geo.Dv, heads);
      buf.resize(tiles_n + 2 * heads * (state + Dk));
      tiles = buf.data(), S = tiles + tiles_n, z = S + heads * state, W = z + heads * Dk;
      Wz = W + heads * state;
    }
  };

  // Head bh's [Dk, Dv] state in x ([B, H, Dk, Dv]) and its [Dk] partner in z; null for null.
  template <typename T>
  T* at(T* x, int64_t bh) const { return x ? x + bh * state_ : nullptr; }
  template <typename T>
  T* at_z(T* z, int64_t bh) const { return z ? z + bh * g_.Dk : nullptr; }

  // Sequences, longest first (packed), or the batch rows in order.
  static std::vector<int64_t> longest_first(const LinearAttentionGeometry& g) {
    std::vector<int64_t> order(g.sequences());
    std::iota(order.begin(), order.end(), int64_t(0));
    if (g.cu_seqlens) {
      std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
        return g.span(a).length > g.span(b).length;
      });
    }
    return order;
  }

  // Whole-sequence item u: heads [h, h + G) of sequence n (its steps: span), whose
  // states start at sh = n * H + h.
  struct Item {
    int64_t h, sh;
    LinearAttentionGeometry::Span span;
  };
  Item item(int64_t u) const {
    const int64_t groups = g_.H / split_.heads;
    const int64_t n = order_[u / groups], h = u % groups * split_.heads;
    return {h, n * g_.H + h, g_.span(n)};
  }

  // Heads [h, h + G) of batch row b over steps [t0, t1).
  void forward_item(int64_t b, int64_t h, int64_t G, int64_t t0, int64_t t1, acc_t* S, acc_t* z,
                    bool outputs, acc_t* tiles) const {
    if (t1 <= t0) return;
#ifdef SEQFUSE_CHUNKS_X86
    switch (chunk_isa()) {
      case Isa::Avx512: return chunked_forward_avx512(p_, b, h, G, t0, t1, S, z, outputs, tiles);
      case Isa::Avx2: return chunked_forward_avx2(p_, b, h, G, t0, t1, S, z, outputs, tiles);
      default: break;
    }
#endif
    chunked_forward_baseline(p_, b, h, G, t0, t1, S, z, outputs, tiles);
  }
  void backward_item(int64_t b, int64_t h, int64_t G, int64_t t0, int64_t t1, acc_t* S, acc_t* z,
                     acc_t* W, acc_t* Wz, bool grads, acc_t* tiles) const {
    if (t1 <= t0) return;
#ifdef SEQFUSE_CHUNKS_X86
    switch (chunk_isa()) {
      case Isa::Avx512:
        return chunked_backward_avx512(p_, b, h, G, t0, t1, S, z, W, Wz, grads, tiles);
      case Isa::Avx2:
        return chunked_backward_avx2(p_, b, h, G, t0, t1, S, z, W, Wz, grads, tiles);
      default: break;
    }
#endif
    chunked_backward_baseline(p_, b, h, G, t0, t1, S, z, W, Wz, grads, tiles);
  }

  // fn(i, scratch) for every i < items, in parallel. Threads take the next item as
  // they finish one rather than a fixed share, so that a thread slowed by other work on
  // the machine does not leave the others waiting at the end.
  template <typename Fn>
  void run_items(int64_t items, const Fn& fn) const {
    std::atomic<int64_t> next{0};
    auto work = [&](int64_t, int64_t) {
      Scratch scratch(p_, split_.segments == 1 ? split_.heads : 1);
      for (int64_t i = next++; i < items; i = next++) fn(i, scratch);
    };
    if (threads_ == 1) return work(0, 1);
    at::parallel_for(0, std::min(items, threads_), 1, work);
  }

  acc_t gamma(int64_t bh) const { return p_.decay ? p_.decay[bh % g_.H] : acc_t(1); }

  // Steps 1 and 2 for S: X, Xz [BH, segments] get every segment's state at its start.
  void carry_ins(const acc_t* S0, const acc_t* z0, std::vector<acc_t>& X,
                 std::vector<acc_t>& Xz) const {
    const int64_t segs = split_.segments, pieces = split_.pieces, Dk = g_.Dk;
    // U, Uz [BH, segments - 1, pieces]: the increments of the pieces before the last segment.
    const int64_t per_head = (segs - 1) * pieces;
    std::vector<acc_t> U(BH_ * per_head * state_, acc_t(0)), Uz(BH_ * per_head * Dk, acc_t(0));
    run_items(BH_ * per_head, [&](int64_t i, Scratch& s) {
      const int64_t bh = i / per_head, j = i % per_head / pieces, k = i % pieces;
      const int64_t t0 = split_.piece_begin(j, k), t1 = split_.piece_end(j, k);
      if (t1 > t0) {
        forward_item(bh / g_.H, bh % g_.H, 1, t0, t1, U.data() + i * state_, Uz.data() + i * Dk,
                     false, s.tiles);
      }
    });
    X.resize(BH_ * segs * state_);
    Xz.resize(BH_ * segs * Dk);
    for (int64_t bh = 0; bh < BH_; ++bh) {  // elementwise and short: on this thread
      acc_t* x = X.data() + bh * segs * state_;
      acc_t* xz = Xz.data() + bh * segs * Dk;
      load_states(at(S0, bh), at_z(z0, bh), 1, Dk, g_.Dv, x, xz);
      for (int64_t j = 0; j + 1 < segs; ++j) {
        std::copy_n(x + j * state_, state_, x + (j + 1) * state_);
        std::copy_n(xz + j * Dk, Dk, xz + (j + 1) * Dk);
        for (int64_t k = 0; k < pieces; ++k) {
          const int64_t i = bh * per_head + j * pieces + k;
          const acc_t f = power(gamma(bh), split_.piece_end(j, k) - split_.piece_begin(j, k));
          carry(x + (j + 1) * state_, f, U.data() + i * state_, state_);
          carry(xz + (j + 1) * Dk, f, Uz.data() + i * Dk, Dk);
        }
      }
    }
  }

  // Steps 1 and 2 for W: Y, Yz [BH, segments] get the gradient of every segment's state
  // at its end.
  void gradient_carry_ins(const acc_t* grad_S, const acc_t* grad_z, std::vector<acc_t>& Y,
                          std::vector<acc_t>& Yz) const {
    const int64_t segs = split_.segments, pieces = split_.pieces, Dk = g_.Dk;
    // R, Rz [BH, segments - 1, pieces]: the increments of the pieces after the first segment.
    const int64_t per_head = (segs - 1) * pieces;
    std::vector<acc_t> R(BH_ * per_head * state_, acc_t(0)), Rz(BH_ * per_head * Dk, acc_t(0));
    run_items(BH_ * per_head, [&](int64_t i, Scratch& s) {
      const int64_t bh = i / per_head, j = 1 + i % per_head / pieces, k = i % pieces;
      const int64_t t0 = split_.piece_begin(j, k), t1 = split_.piece_end(j, k);
      if (t1 > t0) {
        backward_item(bh / g_.H, bh % g_.H, 1, t0, t1, nullptr, nullptr, R.data() + i * state_,
                      Rz.data() + i * Dk, false, s.tiles);
      }
    });
    Y.resize(BH_ * segs * state_);
    Yz.resize(BH_ * segs * Dk);
    for (int64_t bh = 0; bh < BH_; ++bh) {  // elementwise and short: on this thread
      acc_t* y = Y.data() + bh * segs * state_;
      acc_t* yz = Yz.data() + bh * segs * Dk;
      load_states(at(grad_S, bh), at_z(grad_z, bh), 1, Dk, g_.Dv, y + (segs - 1) * state_,
                  yz + (segs - 1) * Dk);
      for (int64_t j = segs - 1; j > 0; --j) {
        std::copy_n(y + j * state_, state_, y + (j - 1) * state_);
        std::copy_n(yz + j * Dk, Dk, yz + (j - 1) * Dk);
        for (int64_t k = pieces - 1; k >= 0; --k) {
          const int64_t i = bh * per_head + (j - 1) * pieces + k;
          const acc_t f = power(gamma(bh), split_.piece_end(j, k) - split_.piece_begin(j, k));
          carry(y + (j - 1) * state_, f, R.data() + i * state_, state_);
          carry(yz + (j - 1) * Dk, f, Rz.data() + i * Dk, Dk);
        }
      }
    }
  }

  const Problem& p_;
  const LinearAttentionGeometry& g_;
  const int64_t BH_, state_, threads_;
  const Split split_;
  const std::vector<int64_t> order_;
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
    if (g.cu_seqlens) {
      Runner<storage_t, acc_t>(static_cast<const P&>(p)).forward(s0, z0p, sT, zT);
    } else if (g.T == 0) {
      // The state passes through unchanged.
      for (int64_t bh = 0; bh < g.B * g.H; ++bh) {
        load_states(s0 ? s0 + bh * g.Dk * g.Dv : nullptr, z0p ? z0p + bh * g.Dk : nullptr, 1, g.Dk,
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
