// An emulated CUDA device for the tests: compiles seqfuse's real kernel sources
// (csrc/cuda/*.cu) as host C++ and runs them on the CPU.
//
// Force-included (g++ -include) before a .cu file is compiled as C++. NVIDIA's own
// headers supply what works in host mode (dim3 and the runtime's types, the fp16/bf16
// conversions, CCCL's cuda::atomic_ref); this header supplies the rest of the device:
//
//   - the builtin coordinates (threadIdx, blockIdx, blockDim, gridDim, warpSize);
//   - __syncthreads, __syncwarp and the warp collectives (shuffles, ballot, vote),
//     which meet the other threads in the scheduler of runtime.cpp: threads of a block
//     are cooperative fibers that yield only at these points;
//   - shared memory, allocated per block at its exact size and poisoned (0xFF bytes, or
//     under the random schedule for half the blocks 0x3F: finite);
//   - atomics, fences and __nanosleep (a yield to the other fibers);
//   - nvcuda::wmma 16x16x16 tiles, with the alignment and leading-dimension rules;
//   - device maths: float overloads in the global namespace, so float code rounds in
//     float as on the device, and the intrinsics the kernels use;
//   - the launch macro SEQFUSE_LAUNCH (the triple chevron is not C++).
//
// __CUDA_ARCH__ is defined after NVIDIA's headers are in, so the device branches of
// seqfuse's shared headers (csrc/common) are the ones compiled here.
#pragma once

#define SEQFUSE_EMULATED 1

#include <cuda_runtime_api.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cuda/atomic>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <source_location>
#include <tuple>
#include <type_traits>
#include <utility>

#define __CUDA_ARCH__ 900
// mma.h in host mode declares nothing usable; wmma is emulated below.
#define __CUDA_MMA_H__

// Occupancy hints mean nothing here (host_defines.h leaves them undefined for g++).
#define __launch_bounds__(...)

// A raw __shared__ would compile to a per-thread local here: refuse it.
#undef __shared__
#define __shared__ static_assert(false, "use SEQFUSE_SHARED / SEQFUSE_DYNAMIC_SHARED");

namespace seqfuse::emu {

// ---- What the scheduler (runtime.cpp) provides to the running emulated thread. ----

struct Coords {
  uint3 thread_idx, block_idx;
  dim3 block_dim, grid_dim;
};
// The coordinates of the thread now running; set by the scheduler before a switch.
extern const Coords* g_coords;

enum class WarpOp : int { Sync, ShflIdx, ShflUp, ShflDown, ShflXor, Ballot, Any, All, Wmma };

// Meets the lanes of `mask` in a warp collective. `in` holds this lane's value (at
// most 16 bytes), `arg` the source lane / delta / xor mask, `width` the segment width;
// the result is written to `out`. Fails loudly when a lane of the mask never comes,
// when lanes disagree on the mask, or when the lane itself is not in it.
void warp_collective(WarpOp op, unsigned mask, const void* in, void* out, size_t bytes, int arg,
                     int width, const std::source_location& where);
void sync_threads(const std::source_location& where);
void nanosleep_yield();
[[noreturn]] void fail(const char* what);

struct SharedSite {
  const char* name;
};
// The block's storage for one static __shared__ declaration: the same for every
// thread of the block, allocated at its exact size on first use and poisoned.
void* shared_storage(const SharedSite& site, size_t bytes, size_t align);
// The block's dynamic shared memory: exactly the launch's bytes, poisoned.
void* dynamic_shared(size_t align);
// Scratch of the emulator itself, per warp (at least `bytes`), kept across a block's
// run: lets warp-uniform work be done once for the warp (wmma::mma_sync).
void* warp_scratch(size_t bytes);

template <typename T>
T& shared(const SharedSite& site) {
  return *static_cast<T*>(shared_storage(site, sizeof(T), alignof(T)));
}

// ---- Launches ----

struct LaunchConfig {
  const char* kernel;
  dim3 grid, block;
  size_t smem;
  const void* func;
};
// Runs body() once per thread of every block under the configured schedule, or records
// a launch-configuration error for cudaGetLastError.
void run_launch(const LaunchConfig& config, const std::function<void()>& body);

template <typename... Params>
struct Launcher {
  void (*kernel)(Params...);
  LaunchConfig config;
  template <typename... Args>
  void operator()(Args&&... args) const {
    // Parameters are copied once, as the device copies them into its constant bank;
    // each thread then takes its own copy when it calls the kernel.
    std::tuple<std::decay_t<Params>...> params(std::forward<Args>(args)...);
    auto* k = kernel;
    run_launch(config, [&] { std::apply(k, params); });
  }
};

template <typename... Params>
Launcher<Params...> launcher(dim3 grid, dim3 block, size_t smem, const char* name,
                             void (*kernel)(Params...)) {
  return {kernel, {name, grid, block, smem, reinterpret_cast<const void*>(kernel)}};
}

template <typename T>
T shuffle(WarpOp op, unsigned mask, T var, int arg, int width,
          const std::source_location& where) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 16, "shuffle of a large type");
  T out;
  warp_collective(op, mask, &var, &out, sizeof(T), arg, width, where);
  return out;
}

inline int vote(WarpOp op, unsigned mask, int predicate, const std::source_location& where) {
  unsigned out = 0;
  const int p = predicate != 0;
  warp_collective(op, mask, &p, &out, sizeof(int), 0, 32, where);
  return int(out);
}

}  // namespace seqfuse::emu

// ---- Kernel-source spellings that differ from nvcc's (csrc/cuda/portability.cuh) ----

#define SEQFUSE_LAUNCH(grid, block, smem, stream, ...) \
  ::seqfuse::emu::launcher(dim3(grid), dim3(block), size_t(smem), #__VA_ARGS__, __VA_ARGS__)

#define SEQFUSE_SHARED(type, name, ...)                                       \
  static constexpr ::seqfuse::emu::SharedSite name##_shared_site_{#name};    \
  type(&name) __VA_ARGS__ = ::seqfuse::emu::shared<type __VA_ARGS__>(name##_shared_site_)

#define SEQFUSE_DYNAMIC_SHARED(type, name, align) \
  type* const name = static_cast<type*>(::seqfuse::emu::dynamic_shared(align))

// ---- Builtins ----

#define threadIdx (::seqfuse::emu::g_coords->thread_idx)
#define blockIdx (::seqfuse::emu::g_coords->block_idx)
#define blockDim (::seqfuse::emu::g_coords->block_dim)
#define gridDim (::seqfuse::emu::g_coords->grid_dim)
constexpr int warpSize = 32;

inline void __syncthreads(std::source_location where = std::source_location::current()) {
  ::seqfuse::emu::sync_threads(where);
}
inline void __syncwarp(unsigned mask = 0xffffffffu,
                       std::source_location where = std::source_location::current()) {
  ::seqfuse::emu::warp_collective(::seqfuse::emu::WarpOp::Sync, mask, nullptr, nullptr, 0, 0, 32,
                                  where);
}

template <typename T>
T __shfl_sync(unsigned mask, T var, int src, int width = 32,
              std::source_location where = std::source_location::current()) {
  return ::seqfuse::emu::shuffle(::seqfuse::emu::WarpOp::ShflIdx, mask, var, src, width, where);
}
template <typename T>
T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = 32,
                 std::source_location where = std::source_location::current()) {
  return ::seqfuse::emu::shuffle(::seqfuse::emu::WarpOp::ShflUp, mask, var, int(delta), width,
                                 where);
}
template <typename T>
T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = 32,
                   std::source_location where = std::source_location::current()) {
  return ::seqfuse::emu::shuffle(::seqfuse::emu::WarpOp::ShflDown, mask, var, int(delta), width,
                                 where);
}
template <typename T>
T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = 32,
                  std::source_location where = std::source_location::current()) {
  return ::seqfuse::emu::shuffle(::seqfuse::emu::WarpOp::ShflXor, mask, var, lane_mask, width,
                                 where);
}
inline unsigned __ballot_sync(unsigned mask, int predicate,
                              std::source_location where = std::source_location::current()) {
  return unsigned(::seqfuse::emu::vote(::seqfuse::emu::WarpOp::Ballot, mask, predicate, where));
}
inline int __any_sync(unsigned mask, int predicate,
                      std::source_location where = std::source_location::current()) {
  return ::seqfuse::emu::vote(::seqfuse::emu::WarpOp::Any, mask, predicate, where);
}
inline int __all_sync(unsigned mask, int predicate,
                      std::source_location where = std::source_location::current()) {
  return ::seqfuse::emu::vote(::seqfuse::emu::WarpOp::All, mask, predicate, where);
}

// One OS thread runs every emulated thread, and a fiber yields only at the points
// above, so a read-modify-write is atomic as written and fences have nothing to order.
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __threadfence_block() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __nanosleep(unsigned) { ::seqfuse::emu::nanosleep_yield(); }

// Applies op to *address in place and returns the old value.
template <typename T, typename Op>
T seqfuse_emu_atomic(T* address, Op op) {
  const T old = *address;
  *address = op(old);
  return old;
}
template <typename T>
T atomicAdd(T* address, T value) {
  return seqfuse_emu_atomic(address, [&](T old) { return old + value; });
}
template <typename T>
T atomicSub(T* address, T value) {
  return seqfuse_emu_atomic(address, [&](T old) { return old - value; });
}
template <typename T>
T atomicMax(T* address, T value) {
  return seqfuse_emu_atomic(address, [&](T old) { return old < value ? value : old; });
}
template <typename T>
T atomicMin(T* address, T value) {
  return seqfuse_emu_atomic(address, [&](T old) { return value < old ? value : old; });
}
template <typename T>
T atomicExch(T* address, T value) {
  return seqfuse_emu_atomic(address, [&](T) { return value; });
}
template <typename T>
T atomicCAS(T* address, T compare, T value) {
  return seqfuse_emu_atomic(address, [&](T old) { return old == compare ? value : old; });
}
template <typename T>
T atomicOr(T* address, T value) {
  return seqfuse_emu_atomic(address, [&](T old) { return old | value; });
}
template <typename T>
T atomicAnd(T* address, T value) {
  return seqfuse_emu_atomic(address, [&](T old) { return old & value; });
}

// ---- Bit intrinsics ----

inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(unsigned(x)); }
inline int __clzll(long long x) { return x == 0 ? 64 : __builtin_clzll((unsigned long long)x); }
inline unsigned __brev(unsigned x) {
  unsigned r = 0;
  for (int i = 0; i < 32; ++i) r |= ((x >> i) & 1u) << (31 - i);
  return r;
}
template <typename To, typename From>
inline To seqfuse_emu_bit_cast(From x) {
  static_assert(sizeof(To) == sizeof(From));
  To y;
  std::memcpy(&y, &x, sizeof(y));
  return y;
}
inline float __int_as_float(int x) { return seqfuse_emu_bit_cast<float>(x); }
inline float __uint_as_float(unsigned x) { return seqfuse_emu_bit_cast<float>(x); }
inline int __float_as_int(float x) { return seqfuse_emu_bit_cast<int>(x); }
inline unsigned __float_as_uint(float x) { return seqfuse_emu_bit_cast<unsigned>(x); }
inline long long __double_as_longlong(double x) { return seqfuse_emu_bit_cast<long long>(x); }
inline double __longlong_as_double(long long x) { return seqfuse_emu_bit_cast<double>(x); }

// ---- Device maths ----
// The device has float overloads of the maths functions in the global namespace; host
// C++ has only the C double functions there, which would quietly run float code in
// double. These overloads make float code round in float, as on the device.
#define SEQFUSE_EMU_FLOAT_MATH_1(fn) \
  inline float fn(float x) { return std::fn(x); }
SEQFUSE_EMU_FLOAT_MATH_1(exp)
SEQFUSE_EMU_FLOAT_MATH_1(exp2)
SEQFUSE_EMU_FLOAT_MATH_1(expm1)
SEQFUSE_EMU_FLOAT_MATH_1(log)
SEQFUSE_EMU_FLOAT_MATH_1(log2)
SEQFUSE_EMU_FLOAT_MATH_1(log1p)
SEQFUSE_EMU_FLOAT_MATH_1(sqrt)
SEQFUSE_EMU_FLOAT_MATH_1(sin)
SEQFUSE_EMU_FLOAT_MATH_1(cos)
SEQFUSE_EMU_FLOAT_MATH_1(tanh)
SEQFUSE_EMU_FLOAT_MATH_1(fabs)
SEQFUSE_EMU_FLOAT_MATH_1(floor)
SEQFUSE_EMU_FLOAT_MATH_1(ceil)
SEQFUSE_EMU_FLOAT_MATH_1(rint)
SEQFUSE_EMU_FLOAT_MATH_1(round)
SEQFUSE_EMU_FLOAT_MATH_1(trunc)
#undef SEQFUSE_EMU_FLOAT_MATH_1
inline float fmax(float a, float b) { return std::fmax(a, b); }
inline float fmin(float a, float b) { return std::fmin(a, b); }
inline float pow(float a, float b) { return std::pow(a, b); }
inline float ldexp(float x, int e) { return std::ldexp(x, e); }
inline float frexp(float x, int* e) { return std::frexp(x, e); }
using std::isfinite;
using std::isinf;
using std::isnan;
using std::signbit;

inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline double rsqrt(double x) { return 1.0 / std::sqrt(x); }
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __saturatef(float x) { return x < 0.f ? 0.f : (x > 1.f ? 1.f : x); }
inline void sincosf(float x, float* s, float* c) {
  *s = std::sin(x);
  *c = std::cos(x);
}
// sin and cos of pi * x: the argument reduction is exact, as on the device.
inline void sincospi(double x, double* s, double* c) {
  const double r = x - 2.0 * std::rint(x / 2.0);  // exact, in [-1, 1]
  *s = std::sin(M_PI * r);
  *c = std::cos(M_PI * r);
}
inline void sincospif(float x, float* s, float* c) {
  double sd, cd;
  sincospi(double(x), &sd, &cd);
  *s = float(sd);
  *c = float(cd);
}

inline int min(int a, int b) { return a < b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long min(long a, long b) { return a < b ? a : b; }
inline unsigned long long min(unsigned long long a, unsigned long long b) { return a < b ? a : b; }
inline float min(float a, float b) { return std::fmin(a, b); }
inline double min(double a, double b) { return std::fmin(a, b); }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline long max(long a, long b) { return a > b ? a : b; }
inline unsigned long long max(unsigned long long a, unsigned long long b) { return a > b ? a : b; }
inline float max(float a, float b) { return std::fmax(a, b); }
inline double max(double a, double b) { return std::fmax(a, b); }

// ---- Host runtime: the template overloads that nvcc's cuda_runtime.h adds ----

template <typename T>
cudaError_t cudaFuncSetAttribute(T* entry, cudaFuncAttribute attr, int value) {
  return ::cudaFuncSetAttribute(reinterpret_cast<const void*>(entry), attr, value);
}

#include "wmma.h"
