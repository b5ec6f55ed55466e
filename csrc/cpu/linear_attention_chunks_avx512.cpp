// The chunked linear attention items (linear_attention_chunks.h) compiled for
// AVX-512 (512-bit vectors, AVX-512F and VL, with FMA).
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

#ifdef SEQFUSE_CHUNKS_X86
// Everything below is compiled for AVX-512F/VL with AVX2 and FMA; chunked_*_avx512 may
// only be called on a processor that has all four (linear_attention.cpp checks). The
// headers above, included first, stay at the baseline: their inline functions may be
// shared with other files.
#pragma GCC target("avx512f,avx512vl,avx2,fma")
#define SEQFUSE_VECTOR_BYTES 64
#include "linear_attention_chunks_impl.h"
#define SEQFUSE_CHUNKS_ISA avx512
#include "linear_attention_chunks_entry.h"
#endif  // SEQFUSE_CHUNKS_X86
