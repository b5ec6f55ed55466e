// Element types of the CUDA kernels and their conversions. Half types are loaded into
// float and rounded once on the way out; conversions are spelled out because torch
// builds with __CUDA_NO_HALF_CONVERSIONS__.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <utility>

#include "../common/complex.h"
#include "launch.h"
#include "portability.cuh"

namespace seqfuse::cuda {

template <typename T>
struct Acc {
  using type = T;
};
template <>
struct Acc<__half> {
  using type = float;
};
template <>
struct Acc<__nv_bfloat16> {
  using type = float;
};
template <typename T>
using acc_of = typename Acc<T>::type;

template <typename T>
__device__ __forceinline__ T to_acc(T x) {
  return x;
}
__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_acc(acc_of<T> x) {
  return x;
}
template <>
__device__ __forceinline__ __half from_acc<__half>(float x) {
  return __float2half_rn(x);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// Calls fn(T{}) with the element type named by dtype.
template <typename Fn>
void dispatch_float_types(DType dtype, Fn&& fn) {
  switch (dtype) {
    case DType::Float32: return fn(float{});
    case DType::Float64: return fn(double{});
    case DType::Float16: return fn(__half{});
    case DType::BFloat16: return fn(__nv_bfloat16{});
    default: break;
  }
}
template <typename Fn>
void dispatch_float_and_complex_types(DType dtype, Fn&& fn) {
  if (dtype == DType::Complex64) return fn(Complex<float>{});
  dispatch_float_types(dtype, std::forward<Fn>(fn));
}

}  // namespace seqfuse::cuda
