// Qualifiers shared by the CPU and CUDA halves of seqfuse. No torch header here:
// everything under csrc/common compiles with a plain host compiler and with nvcc.
#pragma once

#if defined(__CUDACC__)
#define SEQFUSE_HD __host__ __device__ __forceinline__
#else
#define SEQFUSE_HD inline
#endif
