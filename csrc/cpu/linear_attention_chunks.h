// The chunked causal linear attention of one (batch, head) over a range of steps: the
// CPU kernels' work item (maths: csrc/common/linear_attention.h; bodies:
// linear_attention_chunks_impl.h). linear_attention.cpp cuts a call into these items,
// runs them in parallel and carries the states between them; each item is compiled
// once per instruction set (linear_attention_chunks_baseline.cpp, _avx2.cpp,
// _avx512.cpp) and the caller picks one at run time.
#pragma once

#include <cstdint>
#include <type_traits>

#include "../common/linear_attention.h"

// The AVX2+FMA and AVX-512 builds exist on x86-64 with GCC (they are compiled under
// #pragma GCC target).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define SEQFUSE_CHUNKS_X86 1
#endif

namespace seqfuse::cpu {

// The pointers and scalars of one call, in the storage type scalar_t of q, k, v and
// the accumulation type acc_t of states, den and every product.
template <typename scalar_t, typename acc_t>
struct ChunkProblem {
  LinearAttentionGeometry geo;
  FeatureMap feature_map;
  bool normalize;
  acc_t scale, eps;
  int64_t chunk;                 // steps per chunk, a multiple of 16, at most kMaxChunk
  const acc_t* decay;            // [H], or null for gamma = 1
  const scalar_t *q, *k, *v;     // [B, T, H, D] rows
  scalar_t* o;                   // forward: [B, T, H, Dv]
  acc_t* den;                    // forward: [B, H, T]
  const scalar_t* grad_o;        // backward inputs: [B, T, H, Dv]
  const scalar_t* o_saved;       //   the forward's o
  const acc_t* den_saved;        //   and its den
  scalar_t *dq, *dk, *dv;        // backward outputs
};

constexpr int64_t kMaxChunk = 128;

// fn(std::integral_constant<FeatureMap, f>{}): the feature map as a template argument.
template <typename Fn>
void with_feature_map(FeatureMap f, Fn&& fn) {
  switch (f) {
    case FeatureMap::Elu1: return fn(std::integral_constant<FeatureMap, FeatureMap::Elu1>{});
    case FeatureMap::Relu: return fn(std::integral_constant<FeatureMap, FeatureMap::Relu>{});
    default: return fn(std::integral_constant<FeatureMap, FeatureMap::Identity>{});
  }
}


constexpr int64_t padded_elements(int64_t n) { return (n + 15) / 16 * 16; }

// Elements of the tiles one head's chunk uses (shared by the heads of an item): the
// chunk's row tiles, two [chunk, chunk] score tiles, row vectors, and one state with its
// z for the rows taken in the recurrence's order.
constexpr int64_t chunk_tile_elements(int64_t chunk, int64_t Dk, int64_t Dv) {
  const int64_t d = Dk > Dv ? Dk : Dv;
  return 10 * padded_elements(chunk * d) + 2 * padded_elements(chunk * chunk) +
         3 * padded_elements(chunk + 1) + 2 * padded_elements(d) + padded_elements(Dk * Dv);
}

// Elements of acc_t scratch an item of `heads` heads needs (a thread reuses it).
constexpr int64_t chunk_scratch_elements(int64_t chunk, int64_t Dk, int64_t Dv, int64_t heads) {
  return chunk_tile_elements(chunk, Dk, Dv) + heads * padded_elements(Dk * Dv);
}

// chunked_forward_<isa>: steps [t_begin, t_end) of heads [h0, h0 + G) of batch row b. S
// [G, Dk, Dv] and z [G, Dk] hold their states at t_begin and are left holding the
// states at t_end. With outputs, o and den of those steps are written; without, only
// the states move (from zero states: the range's increments, carried between ranges).
//
// chunked_backward_<isa>: the backward of the same. S, z: the forward states at t_begin
// (clobbered). W [G, Dk, Dv], Wz [G, Dk]: the gradients of the states at t_end, left
// holding the gradients of the states at t_begin. With grads, dq, dk and dv of those
// steps are written; without, only W and Wz move (from zeros: the range's increments)
// and S, z are not touched.
//
// scratch: chunk_scratch_elements(chunk, Dk, Dv, G) elements. Instantiated for
// (float, float), (double, double), (c10::Half, float) and (c10::BFloat16, float); the
// _avx2 ones need a processor with AVX2 and FMA, the _avx512 ones AVX-512F and VL too.
template <typename scalar_t, typename acc_t>
void chunked_forward_baseline(const ChunkProblem<scalar_t, acc_t>& p, int64_t b, int64_t h0,
                              int64_t G, int64_t t_begin, int64_t t_end, acc_t* S, acc_t* z,
                              bool outputs, acc_t* scratch);
template <typename scalar_t, typename acc_t>
void chunked_backward_baseline(const ChunkProblem<scalar_t, acc_t>& p, int64_t b, int64_t h0,
                               int64_t G, int64_t t_begin, int64_t t_end, acc_t* S, acc_t* z,
                               acc_t* W, acc_t* Wz, bool grads, acc_t* scratch);
#ifdef SEQFUSE_CHUNKS_X86
#define SEQFUSE_DECLARE_CHUNKS(isa)                                                            \
  template <typename scalar_t, typename acc_t>                                                 \
  void chunked_forward_##isa(const ChunkProblem<scalar_t, acc_t>& p, int64_t b, int64_t h0,    \
                             int64_t G, int64_t t_begin, int64_t t_end, acc_t* S, acc_t* z,    \
                             bool outputs, acc_t* scratch);                                    \
  template <typename scalar_t, typename acc_t>                                                 \
  void chunked_backward_##isa(const ChunkProblem<scalar_t, acc_t>& p, int64_t b, int64_t h0,   \
                              int64_t G, int64_t t_begin, int64_t t_end, acc_t* S, acc_t* z,   \
                              acc_t* W, acc_t* Wz, bool grads, acc_t* scratch);
SEQFUSE_DECLARE_CHUNKS(avx2)
SEQFUSE_DECLARE_CHUNKS(avx512)
#undef SEQFUSE_DECLARE_CHUNKS
#endif

}  // namespace seqfuse::cpu
