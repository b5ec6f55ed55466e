// The chunked linear attention items (linear_attention_chunks.h) compiled for the
// baseline instruction set (on x86-64, SSE2: 128-bit vectors), for every processor.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "../common/linear_attention.h"
#include "linear_attention_chunks.h"
#include "vec_math.h"

#define SEQFUSE_VECTOR_BYTES 16
#include "linear_attention_chunks_impl.h"
#define SEQFUSE_CHUNKS_ISA baseline
#include "linear_attention_chunks_entry.h"
