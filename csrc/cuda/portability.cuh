// The three kernel-source spellings that are not C++: a launch, a static __shared__
// declaration and dynamic shared memory. nvcc gets them as written here; the emulated
// device of the tests (tests/emulator/cuda_emulator.h) defines its own before this file
// is read, so the same .cu sources also compile as host C++ and run on the CPU.
//
//   SEQFUSE_LAUNCH(grid, block, smem, stream, kernel)(args...)
//   SEQFUSE_SHARED(type, name, [dims]...);
//   SEQFUSE_DYNAMIC_SHARED(type, name, alignment);      // a type* to the launch's bytes
#pragma once

#ifndef SEQFUSE_EMULATED
#define SEQFUSE_LAUNCH(grid, block, smem, stream, ...) __VA_ARGS__<<<grid, block, smem, stream>>>
#define SEQFUSE_SHARED(type, name, ...) __shared__ type name __VA_ARGS__
#define SEQFUSE_DYNAMIC_SHARED(type, name, align) extern __shared__ __align__(align) type name[]
#endif
