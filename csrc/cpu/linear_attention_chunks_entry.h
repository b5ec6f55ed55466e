// The entry points of one instruction-set build of the chunked items:
// chunked_forward_<isa> and chunked_backward_<isa> (linear_attention_chunks.h), and
// their instantiations for every (storage, accumulation) pair. Included once, at the
// end of linear_attention_chunks_<isa>.cpp, after linear_attention_chunks_impl.h and
// with SEQFUSE_CHUNKS_ISA naming the build (avx2, baseline).
#ifndef SEQFUSE_CHUNKS_ISA
#error "define SEQFUSE_CHUNKS_ISA before including linear_attention_chunks_entry.h"
#endif

#define SEQFUSE_PASTE_(a, b) a##b
#define SEQFUSE_PASTE(a, b) SEQFUSE_PASTE_(a, b)
#define SEQFUSE_FORWARD SEQFUSE_PASTE(chunked_forward_, SEQFUSE_CHUNKS_ISA)
#define SEQFUSE_BACKWARD SEQFUSE_PASTE(chunked_backward_, SEQFUSE_CHUNKS_ISA)

namespace seqfuse::cpu {

template <typename scalar_t, typename acc_t>
void SEQFUSE_FORWARD(const ChunkProblem<scalar_t, acc_t>& p, int64_t b, int64_t h0, int64_t G,
                     int64_t t_begin, int64_t t_end, acc_t* S, acc_t* z, bool outputs,
                     acc_t* scratch) {
  run_chunked_forward(p, b, h0, G, t_begin, t_end, S, z, outputs, scratch);
}

template <typename scalar_t, typename acc_t>
void SEQFUSE_BACKWARD(const ChunkProblem<scalar_t, acc_t>& p, int64_t b, int64_t h0, int64_t G,
                      int64_t t_begin, int64_t t_end, acc_t* S, acc_t* z, acc_t* W, acc_t* Wz,
                      bool grads, acc_t* scratch) {
  run_chunked_backward(p, b, h0, G, t_begin, t_end, S, z, W, Wz, grads, scratch);
}

#define SEQFUSE_INSTANTIATE(scalar_t, acc_t)                                                   \
  template void SEQFUSE_FORWARD(const ChunkProblem<scalar_t, acc_t>&, int64_t, int64_t,        \
                                int64_t, int64_t, int64_t, acc_t*, acc_t*, bool, acc_t*);      \
  template void SEQFUSE_BACKWARD(const ChunkProblem<scalar_t, acc_t>&, int64_t, int64_t,       \
                                 int64_t, int64_t, int64_t, acc_t*, acc_t*, acc_t*, acc_t*,    \
                                 bool, acc_t*);
SEQFUSE_INSTANTIATE(float, float)
SEQFUSE_INSTANTIATE(double, double)
SEQFUSE_INSTANTIATE(c10::Half, float)
SEQFUSE_INSTANTIATE(c10::BFloat16, float)
#undef SEQFUSE_INSTANTIATE

}  // namespace seqfuse::cpu

#undef SEQFUSE_FORWARD
#undef SEQFUSE_BACKWARD
#undef SEQFUSE_PASTE
#undef SEQFUSE_PASTE_
