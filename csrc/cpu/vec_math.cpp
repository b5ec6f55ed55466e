// Float32 row maths with a run-time AVX2 path (declarations: vec_math.h).
//
// e^x = 2^m e^r with m = round(x / ln 2) and r = x - m ln 2 in [-ln2/2, ln2/2]; ln 2 is
// split in two so that r is exact to float precision, e^r is a degree-6 polynomial
// (Cephes's expf coefficients) and 2^m is built in the exponent bits. Below -87.33
// (where 2^m leaves the normal range) the result is flushed to 0: e^-87.33 = 1.2e-38.
#include "vec_math.h"

#include <cmath>

#include "../common/linear_attention.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define SEQFUSE_HAVE_AVX2_PATH 1
#endif

namespace seqfuse::cpu {
namespace {

void elu1_scalar(const float* x, float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] = feature<FeatureMap::Elu1>(x[i]);
}

#ifdef SEQFUSE_HAVE_AVX2_PATH
__attribute__((target("avx2,fma"))) __m256 exp_avx2(__m256 x) {
  const __m256 lo = _mm256_set1_ps(-87.33654f), hi = _mm256_set1_ps(88.72283f);
  // min/max return their second operand when either is NaN: x second keeps NaN.
  const __m256 xc = _mm256_max_ps(lo, _mm256_min_ps(hi, x));
  const __m256 m = _mm256_round_ps(_mm256_mul_ps(xc, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(m, _mm256_set1_ps(0.693359375f), xc);
  r = _mm256_fnmadd_ps(m, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(m), _mm256_set1_epi32(127)), 23);
  const __m256 e = _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
  return _mm256_andnot_ps(_mm256_cmp_ps(x, lo, _CMP_LT_OQ), e);  // x < lo (-inf too): 0
}

__attribute__((target("avx2,fma"))) void elu1_avx2(const float* x, float* y, int64_t n) {
  const __m256 zero = _mm256_setzero_ps(), one = _mm256_set1_ps(1.0f);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 v = _mm256_loadu_ps(x + i);
    const __m256 positive = _mm256_cmp_ps(v, zero, _CMP_GT_OQ);  // false for NaN
    _mm256_storeu_ps(y + i, _mm256_blendv_ps(exp_avx2(v), _mm256_add_ps(v, one), positive));
  }
  elu1_scalar(x + i, y + i, n - i);
}

bool has_avx2_fma() {
  static const bool yes = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return yes;
}
#endif

}  // namespace

void elu1_rows(const float* x, float* y, int64_t n) {
#ifdef SEQFUSE_HAVE_AVX2_PATH
  if (has_avx2_fma()) return elu1_avx2(x, y, n);
#endif
  elu1_scalar(x, y, n);
}

}  // namespace seqfuse::cpu
