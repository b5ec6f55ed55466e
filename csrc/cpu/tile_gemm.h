// Register-blocked matrix products of small tiles (tens to a few hundred rows and
// columns), for kernels that run many of them back to back: no per-call dispatch,
// no packing of A, causal triangles skipped element by element.
//
//   C[i, j] = beta C[i, j] + alpha sum_k A(i, k) B[k, j]        (i < M, j < N, k < K)
//
// A is read one element at a time through two strides, A(i, k) = a[i a_rs + k a_cs], so
// a tile, its transpose or a view into a larger array all serve without a copy. B and
// C are row-major (unit column stride, row strides ldb and ldc). beta = 0 never reads C.
// `shape` names the part of the product that is formed (the rest is never read):
//
//   Full     every (i, k, j)
//   LowerA   only k <= i (A lower triangular, K >= M): products that would multiply
//            an entry above A's diagonal are not formed at all, so a NaN or an
//            infinity in a row k of B reaches no row i < k of C
//   UpperA   only k >= i (A upper triangular)
//   LowerC   only C[i, j] for j <= i + (MR - 1 rounded up to a column block); the
//            entries above the diagonal of C are left unspecified
//
// The micro-kernel keeps an MR x (NV vectors) block of C in registers over the whole
// k loop: per k, NV vector loads of B, MR broadcasts of A and MR * NV fused
// multiply-adds. With 16 vector registers (SSE2, AVX2), MR = 6 and NV = 2 leave 12
// accumulators, which is enough to cover the latency of the FMA units; AVX-512's 32
// take NV = 4 (24 accumulators: each broadcast of A feeds four multiply-adds). Written with GCC vector extensions,
// so one source compiles for each instruction set the includer selects:
//
//   SEQFUSE_VECTOR_BYTES  16 (SSE2, the x86-64 baseline), 32 (AVX2+FMA) or 64 (AVX-512),
//                         the wider ones in a file compiled under #pragma GCC target
//
// Everything here has internal linkage: a file that includes this header gets its own
// copy, compiled for its own instruction set, which the linker never merges with the
// copy of another file.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#ifndef SEQFUSE_VECTOR_BYTES
#error "define SEQFUSE_VECTOR_BYTES (16 or 32) before including tile_gemm.h"
#endif

namespace seqfuse::cpu {
namespace {

enum class TileShape { Full, LowerA, UpperA, LowerC };

template <typename T>
struct TileVec {
  typedef T type __attribute__((vector_size(SEQFUSE_VECTOR_BYTES)));
  static constexpr int lanes = SEQFUSE_VECTOR_BYTES / sizeof(T);
};

// Rows of one register block, and its columns in vectors (narrower panels cover what
// is left of N).
constexpr int kTileMR = 6;
constexpr int kTileNV = SEQFUSE_VECTOR_BYTES == 64 ? 4 : 2;
// The largest K (a head dim or a chunk length) a product may have: the packed tail of
// B lives on the stack.
constexpr int64_t kTileMaxK = 256;

template <typename T>
inline typename TileVec<T>::type tile_load(const T* p) {
  typename TileVec<T>::type v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

template <typename T>
inline void tile_store(T* p, typename TileVec<T>::type v) {
  std::memcpy(p, &v, sizeof v);
}

// One MR x (NV * lanes) block of C at c (rows i0 .. i0 + MR - 1 of the product; a and
// c point at row i0, b at the block's first column). The full k range [k0, k1) is
// summed for every row; with a triangular shape, the MR steps k = i0 + kk on the
// diagonal block are summed only into the rows the triangle allows.
template <typename T, int MR, int NV, TileShape S>
__attribute__((always_inline)) inline void tile_block(int64_t i0, int64_t k0, int64_t k1,
                                                      const T* a, int64_t a_rs, int64_t a_cs,
                                                      const T* b, int64_t ldb, T* c, int64_t ldc,
                                                      T alpha, T beta) {
  using V = typename TileVec<T>::type;
  constexpr int L = TileVec<T>::lanes;
  V acc[MR][NV];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[r][v] = V{};
  }
  auto step = [&](int64_t k, int first_row, int last_row) __attribute__((always_inline)) {
    V bv[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) bv[v] = tile_load(b + k * ldb + v * L);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      if (r < first_row || r > last_row) continue;
      const T x = a[r * a_rs + k * a_cs];
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[r][v] += x * bv[v];
    }
  };
  auto diagonal = [&]() __attribute__((always_inline)) {
#pragma GCC unroll 8
    for (int kk = 0; kk < MR; ++kk) {
      if constexpr (S == TileShape::LowerA) step(i0 + kk, kk, MR - 1);
      else step(i0 + kk, 0, kk);
    }
  };
  if constexpr (S == TileShape::UpperA) diagonal();
  for (int64_t k = k0; k < k1; ++k) step(k, 0, MR - 1);
  if constexpr (S == TileShape::LowerA) diagonal();

#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      T* out = c + r * ldc + v * L;
      const V res = beta == T(0) ? alpha * acc[r][v] : alpha * acc[r][v] + beta * tile_load(out);
      tile_store(out, res);
    }
  }
}

// tile_block for a run-time row count mr <= MR.
template <typename T, int NV, TileShape S>
inline void tile_block_rows(int mr, int64_t i0, int64_t k0, int64_t k1, const T* a, int64_t a_rs,
                            int64_t a_cs, const T* b, int64_t ldb, T* c, int64_t ldc, T alpha,
                            T beta) {
  static_assert(kTileMR == 6, "one case per row count below");
  switch (mr) {
    case 6: return tile_block<T, 6, NV, S>(i0, k0, k1, a, a_rs, a_cs, b, ldb, c, ldc, alpha, beta);
    case 5: return tile_block<T, 5, NV, S>(i0, k0, k1, a, a_rs, a_cs, b, ldb, c, ldc, alpha, beta);
    case 4: return tile_block<T, 4, NV, S>(i0, k0, k1, a, a_rs, a_cs, b, ldb, c, ldc, alpha, beta);
    case 3: return tile_block<T, 3, NV, S>(i0, k0, k1, a, a_rs, a_cs, b, ldb, c, ldc, alpha, beta);
    case 2: return tile_block<T, 2, NV, S>(i0, k0, k1, a, a_rs, a_cs, b, ldb, c, ldc, alpha, beta);
    default: return tile_block<T, 1, NV, S>(i0, k0, k1, a, a_rs, a_cs, b, ldb, c, ldc, alpha, beta);
  }
}

// The k range summed for every row of the block starting at row i0 (the triangular
// shapes add their diagonal block to it).
template <TileShape S>
inline void tile_k_range(int64_t i0, int mr, int64_t K, int64_t& k0, int64_t& k1) {
  if constexpr (S == TileShape::LowerA) {
    k0 = 0, k1 = i0;
  } else if constexpr (S == TileShape::UpperA) {
    k0 = i0 + mr, k1 = K;
  } else {
    k0 = 0, k1 = K;
  }
}

// Columns [j0, j0 + NV * lanes) of C over every row block the shape needs.
template <typename T, int NV, TileShape S>
inline void tile_column_panel(int64_t M, int64_t K, int64_t j0, T alpha, const T* a, int64_t a_rs,
                              int64_t a_cs, const T* b, int64_t ldb, T beta, T* c, int64_t ldc) {
  // LowerC: a row block is needed once its last row reaches the panel's first column.
  const int64_t first = S == TileShape::LowerC ? j0 / kTileMR * kTileMR : 0;
  for (int64_t i0 = first; i0 < M; i0 += kTileMR) {
    const int mr = int(std::min<int64_t>(kTileMR, M - i0));
    int64_t k0, k1;
    tile_k_range<S>(i0, mr, K, k0, k1);
    tile_block_rows<T, NV, S>(mr, i0, k0, k1, a + i0 * a_rs, a_rs, a_cs, b + j0, ldb,
                              c + i0 * ldc + j0, ldc, alpha, beta);
  }
}

template <typename T, TileShape S>
void tile_gemm_shaped(int64_t M, int64_t N, int64_t K, T alpha, const T* a, int64_t a_rs,
                      int64_t a_cs, const T* b, int64_t ldb, T beta, T* c, int64_t ldc) {
  constexpr int L = TileVec<T>::lanes;
  int64_t j0 = 0;
  for (; j0 + kTileNV * L <= N; j0 += kTileNV * L) {
    tile_column_panel<T, kTileNV, S>(M, K, j0, alpha, a, a_rs, a_cs, b, ldb, beta, c, ldc);
  }
  if constexpr (kTileNV > 2) {
    for (; j0 + 2 * L <= N; j0 += 2 * L) {
      tile_column_panel<T, 2, S>(M, K, j0, alpha, a, a_rs, a_cs, b, ldb, beta, c, ldc);
    }
  }
  for (; j0 + L <= N; j0 += L) {
    tile_column_panel<T, 1, S>(M, K, j0, alpha, a, a_rs, a_cs, b, ldb, beta, c, ldc);
  }
  const int64_t tail = N - j0;
  if (tail == 0) return;
  // The last N % lanes columns: B's are copied into a zero-padded panel and C's go
  // through a padded row, so that no load or store leaves the caller's arrays.
  alignas(64) T bpad[kTileMaxK * L];
  for (int64_t k = 0; k < K; ++k) {
    std::fill(std::copy_n(b + k * ldb + j0, tail, bpad + k * L), bpad + (k + 1) * L, T(0));
  }
  const int64_t first = S == TileShape::LowerC ? j0 / kTileMR * kTileMR : 0;
  for (int64_t i0 = first; i0 < M; i0 += kTileMR) {
    const int mr = int(std::min<int64_t>(kTileMR, M - i0));
    alignas(64) T cpad[kTileMR * L] = {};
    for (int r = 0; r < mr; ++r) std::copy_n(c + (i0 + r) * ldc + j0, beta == T(0) ? 0 : tail, cpad + r * L);
    int64_t k0, k1;
    tile_k_range<S>(i0, mr, K, k0, k1);
    tile_block_rows<T, 1, S>(mr, i0, k0, k1, a + i0 * a_rs, a_rs, a_cs, bpad, L, cpad, L, alpha,
                             beta);
    for (int r = 0; r < mr; ++r) std::copy_n(cpad + r * L, tail, c + (i0 + r) * ldc + j0);
  }
}

// Asks for the cache line at p to be brought into L2. In assembly on x86: GCC 12 deletes
// loops of __builtin_prefetch whose stride it cannot see as constant, as if they did
// nothing.
inline void tile_prefetch(const void* p) {
#if defined(__x86_64__)
  asm volatile("prefetcht1 %0" : : "m"(*static_cast<const char*>(p)));
#else
  __builtin_prefetch(p, 0, 2);
#endif
}

// dst[i] = src[i] for i < n with streaming stores, which write whole lines to memory
// without reading them first (for outputs too large to stay cached and not read back
// soon); false, writing nothing, where dst is not vector-aligned or n not a whole number
// of vectors (or off x86). Call tile_stream_fence() before others read what was written.
template <typename T>
bool tile_stream(T* dst, const T* src, int64_t n) {
#if defined(__x86_64__)
  constexpr int64_t L = TileVec<T>::lanes;
  if (reinterpret_cast<uintptr_t>(dst) % SEQFUSE_VECTOR_BYTES != 0 || n % L != 0) return false;
  for (int64_t i = 0; i < n; i += L) {
#if SEQFUSE_VECTOR_BYTES == 64
    if constexpr (std::is_same_v<T, float>) _mm512_stream_ps(dst + i, _mm512_loadu_ps(src + i));
    else _mm512_stream_pd(dst + i, _mm512_loadu_pd(src + i));
#elif SEQFUSE_VECTOR_BYTES == 32
    if constexpr (std::is_same_v<T, float>) _mm256_stream_ps(dst + i, _mm256_loadu_ps(src + i));
    else _mm256_stream_pd(dst + i, _mm256_loadu_pd(src + i));
#else
    if constexpr (std::is_same_v<T, float>) _mm_stream_ps(dst + i, _mm_loadu_ps(src + i));
    else _mm_stream_pd(dst + i, _mm_loadu_pd(src + i));
#endif
  }
  return true;
#else
  return false;
#endif
}

inline void tile_stream_fence() {
#if defined(__x86_64__)
  _mm_sfence();
#endif
}

// sum_i a[i] b[i] and sum_i a[i] over n values, in vector partial sums (the order of the
// additions depends on n only).
template <typename T>
T tile_dot(const T* a, const T* b, int64_t n) {
  using V = typename TileVec<T>::type;
  constexpr int L = TileVec<T>::lanes;
  V acc0{}, acc1{};
  int64_t i = 0;
  for (; i + 2 * L <= n; i += 2 * L) {
    acc0 += tile_load(a + i) * tile_load(b + i);
    acc1 += tile_load(a + i + L) * tile_load(b + i + L);
  }
  if (i + L <= n) acc0 += tile_load(a + i) * tile_load(b + i), i += L;
  acc0 += acc1;
  T sum = 0;
  for (int l = 0; l < L; ++l) sum += acc0[l];
  for (; i < n; ++i) sum += a[i] * b[i];
  return sum;
}

template <typename T>
T tile_sum(const T* a, int64_t n) {
  using V = typename TileVec<T>::type;
  constexpr int L = TileVec<T>::lanes;
  V acc0{}, acc1{};
  int64_t i = 0;
  for (; i + 2 * L <= n; i += 2 * L) acc0 += tile_load(a + i), acc1 += tile_load(a + i + L);
  if (i + L <= n) acc0 += tile_load(a + i), i += L;
  acc0 += acc1;
  T sum = 0;
  for (int l = 0; l < L; ++l) sum += acc0[l];
  for (; i < n; ++i) sum += a[i];
  return sum;
}

// dst[c * ld_dst + r] = src[r * ld_src + c] for r < rows, c < cols: 8 x 8 blocks, each
// read as 8 rows of 8-float vectors and written as 8, through registers where the build
// has them (AVX and wider); element by element otherwise.
template <typename T>
void tile_transpose(const T* src, int64_t ld_src, int64_t rows, int64_t cols, T* dst,
                    int64_t ld_dst) {
  int64_t r0 = 0;
  if constexpr (std::is_same_v<T, float> && SEQFUSE_VECTOR_BYTES >= 32) {
    typedef float V __attribute__((vector_size(32)));
    using I = int __attribute__((vector_size(32)));
    for (; r0 + 8 <= rows; r0 += 8) {
      int64_t c0 = 0;
      for (; c0 + 8 <= cols; c0 += 8) {
        V x[8], y[8];
        for (int r = 0; r < 8; ++r) std::memcpy(&x[r], src + (r0 + r) * ld_src + c0, sizeof(V));
        // Interleave pairs of rows, then pairs of pairs, then the 128-bit halves.
        for (int r = 0; r < 8; r += 2) {
          y[r] = __builtin_shuffle(x[r], x[r + 1], I{0, 8, 1, 9, 4, 12, 5, 13});
          y[r + 1] = __builtin_shuffle(x[r], x[r + 1], I{2, 10, 3, 11, 6, 14, 7, 15});
        }
        for (int r = 0; r < 8; r += 4) {
          x[r] = __builtin_shuffle(y[r], y[r + 2], I{0, 1, 8, 9, 4, 5, 12, 13});
          x[r + 1] = __builtin_shuffle(y[r], y[r + 2], I{2, 3, 10, 11, 6, 7, 14, 15});
          x[r + 2] = __builtin_shuffle(y[r + 1], y[r + 3], I{0, 1, 8, 9, 4, 5, 12, 13});
          x[r + 3] = __builtin_shuffle(y[r + 1], y[r + 3], I{2, 3, 10, 11, 6, 7, 14, 15});
        }
        for (int r = 0; r < 4; ++r) {
          y[r] = __builtin_shuffle(x[r], x[r + 4], I{0, 1, 2, 3, 8, 9, 10, 11});
          y[r + 4] = __builtin_shuffle(x[r], x[r + 4], I{4, 5, 6, 7, 12, 13, 14, 15});
        }
        for (int c = 0; c < 8; ++c) std::memcpy(dst + (c0 + c) * ld_dst + r0, &y[c], sizeof(V));
      }
      for (int64_t r = r0; r < r0 + 8; ++r) {
        for (int64_t c = c0; c < cols; ++c) dst[c * ld_dst + r] = src[r * ld_src + c];
      }
    }
  }
  for (int64_t b0 = r0; b0 < rows; b0 += 8) {
    for (int64_t c0 = 0; c0 < cols; c0 += 8) {
      const int64_t r1 = std::min(rows, b0 + 8), c1 = std::min(cols, c0 + 8);
      for (int64_t r = b0; r < r1; ++r) {
        for (int64_t c = c0; c < c1; ++c) dst[c * ld_dst + r] = src[r * ld_src + c];
      }
    }
  }
}

// The product above; K <= kTileMaxK (a head dim or a chunk length).
template <typename T>
void tile_gemm(TileShape shape, int64_t M, int64_t N, int64_t K, T alpha, const T* a, int64_t a_rs,
               int64_t a_cs, const T* b, int64_t ldb, T beta, T* c, int64_t ldc) {
  switch (shape) {
    case TileShape::LowerA:
      return tile_gemm_shaped<T, TileShape::LowerA>(M, N, K, alpha, a, a_rs, a_cs, b, ldb, beta, c, ldc);
    case TileShape::UpperA:
      return tile_gemm_shaped<T, TileShape::UpperA>(M, N, K, alpha, a, a_rs, a_cs, b, ldb, beta, c, ldc);
    case TileShape::LowerC:
      return tile_gemm_shaped<T, TileShape::LowerC>(M, N, K, alpha, a, a_rs, a_cs, b, ldb, beta, c, ldc);
    default:
      return tile_gemm_shaped<T, TileShape::Full>(M, N, K, alpha, a, a_rs, a_cs, b, ldb, beta, c, ldc);
  }
}

}  // namespace
}  // namespace seqfuse::cpu
