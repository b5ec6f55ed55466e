// Packed sequences, shared by the scan and linear attention geometries: with
// `cu_seqlens` (N + 1 offsets, 0 = cu_seqlens[0] <= ... <= cu_seqlens[N] = T) a tensor
// of one row (B = 1) holds N sequences back to back, sequence n being the steps
// [cu_seqlens[n], cu_seqlens[n+1]); without it, each of the B rows is one sequence of
// T steps. The offsets live in host or device memory, as the kernel runs.
#pragma once

#include <cstdint>

#include "macros.h"

namespace seqfuse {

// One sequence: `length` steps from `start` in tensor row `row`.
struct Span {
  int64_t row, start, length;
};

// Sequence n's span; cu_seqlens null: row n, all T steps.
SEQFUSE_HD Span sequence_span(const int64_t* cu_seqlens, int64_t n, int64_t T) {
  return cu_seqlens ? Span{0, cu_seqlens[n], cu_seqlens[n + 1] - cu_seqlens[n]}
                    : Span{n, 0, T};
}

}  // namespace seqfuse
