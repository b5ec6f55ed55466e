// nvcuda::wmma for the emulated device: 16x16x16 tiles of half or bfloat16 with float
// accumulators (the shapes seqfuse uses).
//
// Every lane holds the whole tile: the element-to-lane layout of the real fragments is
// not emulated, so a fragment has no x[] and no num_elements here, and kernel code that
// touches fragment elements does not compile. Each operation is a warp collective
// (all 32 lanes, as on the device); the products are exact and summed in float in k
// order, which tensor cores do not promise (they may truncate partial sums).
//
// Checked as the device requires: pointers 256-bit (32-byte) aligned, leading
// dimensions a multiple of 16 bytes (8 elements of a 16-bit type, 4 floats).
#pragma once

#include <string>

namespace nvcuda::wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
class fragment {
  static_assert(M == 16 && N == 16 && K == 16, "the emulator has 16x16x16 tiles only");
  static_assert(std::is_same_v<Use, accumulator> ? std::is_same_v<T, float>
                                                 : (std::is_same_v<T, __half> ||
                                                    std::is_same_v<T, __nv_bfloat16>),
                "half/bfloat16 operands with float accumulators");
  static constexpr int kRows = std::is_same_v<Use, matrix_b> ? K : M;
  static constexpr int kCols = std::is_same_v<Use, matrix_a> ? K : N;
  float v_[kRows][kCols];  // operands kept exactly, as float

 public:
  using layout_type = Layout;

 private:

  template <typename U, int M2, int N2, int K2, typename T2, typename L2>
  friend class fragment;
  template <typename F, typename V>
  friend void fill_fragment(F&, const V&);
  template <typename F, typename P>
  friend void load_matrix_sync(F&, const P*, unsigned);
  template <typename F>
  friend void load_matrix_sync(F&, const float*, unsigned, layout_t);
  template <typename F>
  friend void store_matrix_sync(float*, const F&, unsigned, layout_t);
  template <typename D, typename A, typename B, typename C>
  friend void mma_sync(D&, const A&, const B&, const C&);
};

namespace detail {

inline void meet(const char* what, const std::source_location& where) {
  ::seqfuse::emu::warp_collective(::seqfuse::emu::WarpOp::Wmma, 0xffffffffu, nullptr, nullptr,
                                  0, 0, 32, where);
  (void)what;
}

inline void check(const void* p, unsigned ldm, size_t elem, const char* what) {
  if (reinterpret_cast<uintptr_t>(p) % 32 != 0) {
    ::seqfuse::emu::fail((std::string(what) + ": pointer not 256-bit aligned").c_str());
  }
  if ((ldm * elem) % 16 != 0) {
    ::seqfuse::emu::fail(
        (std::string(what) + ": ldm is not a multiple of 16 bytes").c_str());
  }
}

inline float to_float(float x) { return x; }
inline float to_float(__half x) { return __half2float(x); }
inline float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
T from_float(float x) {
  if constexpr (std::is_same_v<T, __half>) {
    return __float2half_rn(x);
  } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __float2bfloat16_rn(x);
  } else {
    return x;
  }
}

template <typename Layout>
constexpr bool is_row_major() {
  return std::is_same_v<Layout, row_major>;
}

}  // namespace detail

template <typename F, typename V>
void fill_fragment(F& f, const V& value) {
  detail::meet("wmma::fill_fragment", std::source_location::current());
  for (auto& row : f.v_) {
    for (auto& x : row) x = detail::to_float(value);
  }
}

// Operand tiles: element (r, c) of the tile is p[r * ldm + c] in row-major memory and
// p[c * ldm + r] in column-major memory.
template <typename F, typename P>
void load_matrix_sync(F& f, const P* p, unsigned ldm) {
  detail::meet("wmma::load_matrix_sync", std::source_location::current());
  detail::check(p, ldm, sizeof(P), "wmma::load_matrix_sync");
  constexpr bool row = detail::is_row_major<typename F::layout_type>();
  for (int r = 0; r < F::kRows; ++r) {
    for (int c = 0; c < F::kCols; ++c) {
      f.v_[r][c] = detail::to_float(row ? p[size_t(r) * ldm + c] : p[size_t(c) * ldm + r]);
    }
  }
}

template <typename F>
void load_matrix_sync(F& f, const float* p, unsigned ldm, layout_t layout) {
  detail::meet("wmma::load_matrix_sync", std::source_location::current());
  detail::check(p, ldm, sizeof(float), "wmma::load_matrix_sync");
  for (int r = 0; r < F::kRows; ++r) {
    for (int c = 0; c < F::kCols; ++c) {
      f.v_[r][c] = layout == mem_row_major ? p[size_t(r) * ldm + c] : p[size_t(c) * ldm + r];
    }
  }
}

// Each lane writes its share of the tile (element e goes to lane e % 32): a reader of
// another lane's elements needs a __syncwarp first, as on the device.
template <typename F>
void store_matrix_sync(float* p, const F& f, unsigned ldm, layout_t layout) {
  detail::meet("wmma::store_matrix_sync", std::source_location::current());
  detail::check(p, ldm, sizeof(float), "wmma::store_matrix_sync");
  const int lane = int(threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z)) % 32;
  for (int e = lane; e < F::kRows * F::kCols; e += 32) {
    const int r = e / F::kCols, c = e % F::kCols;
    (layout == mem_row_major ? p[size_t(r) * ldm + c] : p[size_t(c) * ldm + r]) = f.v_[r][c];
  }
}

// d = a b + c, each product exact and the sums in float. The lanes of a warp hold the
// same tiles, so the first lane computes the product and the others reuse it from the
// warp's scratch when their operands match it (compared in full).
template <typename D, typename A, typename B, typename C>
void mma_sync(D& d, const A& a, const B& b, const C& c) {
  detail::meet("wmma::mma_sync", std::source_location::current());
  struct Product {
    float a[16][16], b[16][16], c[16][16], d[16][16];
  };
  auto* last = static_cast<Product*>(::seqfuse::emu::warp_scratch(sizeof(Product)));
  if (std::memcmp(last->a, a.v_, sizeof(last->a)) != 0 ||
      std::memcmp(last->b, b.v_, sizeof(last->b)) != 0 ||
      std::memcmp(last->c, c.v_, sizeof(last->c)) != 0) {
    std::memcpy(last->a, a.v_, sizeof(last->a));
    std::memcpy(last->b, b.v_, sizeof(last->b));
    std::memcpy(last->c, c.v_, sizeof(last->c));
    for (int i = 0; i < 16; ++i) {
      for (int j = 0; j < 16; ++j) {
        float s = c.v_[i][j];
        for (int k = 0; k < 16; ++k) s += a.v_[i][k] * b.v_[k][j];
        last->d[i][j] = s;
      }
    }
  }
  std::memcpy(d.v_, last->d, sizeof(last->d));
}

}  // namespace nvcuda::wmma
