// A minimal complex number for kernels that must compile without torch headers.
// Same layout as c10::complex<T> and std::complex<T> (two T's, real first), so a
// tensor's data pointer can be reinterpreted as Complex<T>*.
#pragma once

#include "macros.h"

namespace seqfuse {

template <typename T>
struct alignas(2 * sizeof(T)) Complex {
  T re, im;
  Complex() = default;  // trivial, so Complex can live in __shared__ arrays
  SEQFUSE_HD Complex(T r) : re(r), im(0) {}
  SEQFUSE_HD Complex(T r, T i) : re(r), im(i) {}
};

template <typename T>
SEQFUSE_HD Complex<T> operator+(Complex<T> x, Complex<T> y) {
  return {x.re + y.re, x.im + y.im};
}
template <typename T>
SEQFUSE_HD Complex<T> operator*(Complex<T> x, Complex<T> y) {
  return {x.re * y.re - x.im * y.im, x.re * y.im + x.im * y.re};
}
template <typename T>
SEQFUSE_HD Complex<T>& operator+=(Complex<T>& x, Complex<T> y) {
  x = x + y;
  return x;
}

// conj_of is the identity on real numbers, so one kernel body serves both.
template <typename T>
SEQFUSE_HD T conj_of(T x) {
  return x;
}
template <typename T>
SEQFUSE_HD Complex<T> conj_of(Complex<T> x) {
  return {x.re, -x.im};
}

// Whether x (every part of it) is finite: x - x is 0 then, NaN for an infinity or a NaN.
template <typename T>
SEQFUSE_HD bool is_finite(T x) {
  return x - x == T(0);
}
template <typename T>
SEQFUSE_HD bool is_finite(Complex<T> x) {
  return is_finite(x.re) && is_finite(x.im);
}

}  // namespace seqfuse
