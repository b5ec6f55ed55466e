// Float32 element maths on whole rows, vectorised where the processor allows it.
//
// The extension is compiled for the baseline x86-64 (SSE2), under which GCC keeps
// exp scalar, so ATen's at::vec falls back to one libm call per lane here. These
// functions carry an AVX2+FMA body chosen at run time (checked once) and a scalar body
// that is the reference for it.
#pragma once

#include <cstdint>

namespace seqfuse::cpu {

// y[i] = x[i] + 1 for x[i] > 0, else e^{x[i]} (the elu1 feature map), for i < n; x and
// y may alias. The vector exp is within 2 ulp of libm's; NaN stays NaN, -inf gives 0.
void elu1_rows(const float* x, float* y, int64_t n);

}  // namespace seqfuse::cpu
