// Storage and accumulation types of the CPU kernels: half types accumulate in float,
// complex tensors are read as seqfuse::Complex (same layout as c10::complex).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <c10/util/complex.h>

#include "../common/complex.h"

namespace seqfuse::cpu {

template <typename T>
struct Types {
  using storage = T;
  using acc = T;
};
template <>
struct Types<c10::Half> {
  using storage = c10::Half;
  using acc = float;
};
template <>
struct Types<c10::BFloat16> {
  using storage = c10::BFloat16;
  using acc = float;
};
template <typename T>
struct Types<c10::complex<T>> {
  using storage = Complex<T>;
  using acc = Complex<T>;
};

// t's data as the kernel type T (complex storage differs from c10's type), or null
// for an undefined tensor (an optional input that is absent).
template <typename T>
T* data_or_null(const at::Tensor& t) {
  return t.defined() ? reinterpret_cast<T*>(t.data_ptr()) : nullptr;
}

}  // namespace seqfuse::cpu
