// Kernels with the defects that the emulated device must report, one per check; run by
// tests/test_emulator.py through seqfuse_emulated.selftest(name). Compiled only for
// the emulator (as host C++, like csrc/cuda/*.cu).
#include <cuda_runtime_api.h>

#include <stdexcept>
#include <string>

#include "../../csrc/cuda/portability.cuh"

namespace seqfuse::emu {
namespace {

constexpr int kThreads = 64;

// Each thread reads the slot that another thread writes, with no barrier in between:
// the result depends on the order in which the threads run.
__global__ void missing_barrier(float* out) {
  SEQFUSE_SHARED(float, s, [kThreads]);
  s[threadIdx.x] = float(threadIdx.x);
  out[threadIdx.x] = s[kThreads - 1 - threadIdx.x];
}

// The same, with the barrier: correct under every schedule.
__global__ void with_barrier(float* out) {
  SEQFUSE_SHARED(float, s, [kThreads]);
  s[threadIdx.x] = float(threadIdx.x);
  __syncthreads();
  out[threadIdx.x] = s[kThreads - 1 - threadIdx.x];
}

// Reads a shared slot that no thread writes: poison (NaN) shows in the output.
__global__ void uninitialised_shared(float* out) {
  SEQFUSE_SHARED(float, s, [kThreads]);
  if (threadIdx.x > 0) s[threadIdx.x] = 1.0f;
  __syncthreads();
  out[threadIdx.x] = s[0];
}

__global__ void divergent_barrier(float* out) {
  if (threadIdx.x < 32) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 0.0f;
}

__global__ void exit_before_barrier(float* out) {
  if (threadIdx.x == 5) return;
  __syncthreads();
  out[threadIdx.x] = 0.0f;
}

// Lanes 16-31 leave while lanes 0-15 shuffle with a full mask.
__global__ void shuffle_with_absent_lanes(float* out) {
  if (threadIdx.x % 32 >= 16) return;
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, float(threadIdx.x), 1);
}

__global__ void shuffle_masks_disagree(float* out) {
  const unsigned mask = threadIdx.x % 32 == 0 ? 0x3u : 0xffffffffu;
  out[threadIdx.x] = __shfl_sync(mask, float(threadIdx.x), 0);
}

// Block 0 waits for a flag that block 1 sets: with one block resident at a time in
// forward order, block 1 never starts.
__global__ void waits_on_a_later_block(int* flag) {
  if (blockIdx.x == 1) {
    if (threadIdx.x == 0) atomicExch(flag, 1);
    return;
  }
  while (atomicAdd(flag, 0) == 0) __nanosleep(100);
}

__global__ void warp_sums(float* out) {
  float v = float(threadIdx.x);
  for (int o = 16; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
  out[threadIdx.x] = v;
}

}  // namespace

// Runs selftest `name` on `out` (kThreads floats, or an int flag); returns the launch's
// cudaError_t. Emulator reports surface as exceptions.
int selftest(const std::string& name, void* out) {
  auto* f = static_cast<float*>(out);
  auto one_block = [&](void (*kernel)(float*)) {
    SEQFUSE_LAUNCH(1, kThreads, 0, 0, kernel)(f);
  };
  if (name == "missing_barrier") one_block(missing_barrier);
  else if (name == "with_barrier") one_block(with_barrier);
  else if (name == "uninitialised_shared") one_block(uninitialised_shared);
  else if (name == "divergent_barrier") one_block(divergent_barrier);
  else if (name == "exit_before_barrier") one_block(exit_before_barrier);
  else if (name == "shuffle_with_absent_lanes") one_block(shuffle_with_absent_lanes);
  else if (name == "shuffle_masks_disagree") one_block(shuffle_masks_disagree);
  else if (name == "warp_sums") one_block(warp_sums);
  else if (name == "waits_on_a_later_block")
    SEQFUSE_LAUNCH(2, kThreads, 0, 0, waits_on_a_later_block)(static_cast<int*>(out));
  else if (name == "too_many_threads") SEQFUSE_LAUNCH(1, 2048, 0, 0, warp_sums)(f);
  else if (name == "too_much_dynamic_shared")
    SEQFUSE_LAUNCH(1, kThreads, 64 * 1024, 0, warp_sums)(f);
  else throw std::invalid_argument("no selftest " + name);
  return int(cudaGetLastError());
}

}  // namespace seqfuse::emu
