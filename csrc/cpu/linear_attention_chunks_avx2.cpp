// The chunked linear attention items (linear_attention_chunks.h) compiled for
// AVX2 and FMA (256-bit vectors, fused multiply-add).
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "../common/linear_attention.h"
#include "linear_attention_chunks.h"
#include "vec_math.h"

#ifdef SEQFUSE_CHUNKS_AVX2
// Everything below is compiled for AVX2 and FMA; chunked_*_avx2 may only be called on a
// processor that has both (linear_attention.cpp checks). The headers above, included
// first, stay at the baseline: their inline functions may be shared with other files.
#pragma GCC target("avx2,fma")
#define SEQFUSE_VECTOR_BYTES 32
#include "linear_attention_chunks_impl.h"

namespace seqfuse::cpu {

template <typename scalar_t, typename acc_t>
void chunked_forward_avx2(const ChunkProblem<scalar_t, acc_t>& p, int64_t b, int64_t h0, int64_t G,
                    int64_t t_begin, int64_t t_end, acc_t* S, acc_t* z, bool outputs,
                    acc_t* scratch) {
  run_chunked_forward(p, b, h0, G, t_begin, t_end, S, z, outputs, scratch);
}

template <typename scalar_t, typename acc_t>
void chunked_backward_avx2(const ChunkProblem<scalar_t, acc_t>& p, int64_t b, int64_t h0, int64_t G,
                     int64_t t_begin, int64_t t_end, acc_t* S, acc_t* z, acc_t* W, acc_t* Wz,
                     bool grads, acc_t* scratch) {
  run_chunked_backward(p, b, h0, G, t_begin, t_end, S, z, W, Wz, grads, scratch);
}

#define SEQFUSE_INSTANTIATE(scalar_t, acc_t)                                                     \
  template void chunked_forward_avx2(const ChunkProblem<scalar_t, acc_t>&, int64_t, int64_t,       \
                                      int64_t, int64_t, int64_t, acc_t*, acc_t*, bool, acc_t*);   \
  template void chunked_backward_avx2(const ChunkProblem<scalar_t, acc_t>&, int64_t, int64_t,      \
                                       int64_t, int64_t, int64_t, acc_t*, acc_t*, acc_t*, acc_t*,  \
                                       bool, acc_t*);
SEQFUSE_INSTANTIATE(float, float)
SEQFUSE_INSTANTIATE(double, double)
SEQFUSE_INSTANTIATE(c10::Half, float)
SEQFUSE_INSTANTIATE(c10::BFloat16, float)
#undef SEQFUSE_INSTANTIATE

}  // namespace seqfuse::cpu
#endif  // SEQFUSE_CHUNKS_AVX2
