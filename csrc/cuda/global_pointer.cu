// CUDA GlobalPointer kernels, accumulated in fp32 (fp64 for fp64 inputs):
//
//   s[b,h,i,j] = scale * (R_i q[b,i,h]) . (R_j k[b,j,h]) + bs[b,h,i] + be[b,h,j],  -inf where masked
//   R_l: RoPE at position l (pairs (2i, 2i+1), angle l * 10000^(-2i/D)); loss terms and
//   gradients: csrc/common/global_pointer.h
//
// q and k are read straight from the inputs: every tile loader rotates the rows it
// stages into shared memory (the angle reduced in double, cos/sin in acc precision), so
// there is no rotated copy of q and k and the scores are written once.
// A block owns a T x T score tile (T = 64; 32 for fp64): 256 threads, thread (ty, tx)
// holding rows ty + 16 r and columns tx + 16 c, the head dim staged 16 columns at a time.
// float16/bfloat16 tiles are multiplied on tensor cores with nvcuda::wmma (16x16x16
// fragments, float accumulators, operands and results passed through shared memory in
// the layouts wmma defines); float32/float64 tiles on CUDA cores, exactly.
// - scores: one block per (b, q/k head, tile i, tile j) forms the product once and writes
//   the tile of every head it serves (all heads for Efficient GlobalPointer's shared q/k,
//   which then differ only by their biases).
// - loss forward: the same blocks merge each entry into the negative or positive
//   log-sum (membership by binary search in the row's sorted positives) and leave one
//   partial per (row, tile); a second kernel merges them.
// - backward (scores and loss): the "rows" kernel, one block per (b, q/k head, tile i),
//   forms dS tiles (loaded, or recomputed from q and k for the loss), summed over the
//   heads sharing q/k, and adds scale * dS @ (R k) into grad (R q) and row sums into
//   grad_bias_start; the "columns" kernel does the transpose for grad (R k) and
//   grad_bias_end. Every output row is owned by one block (no atomics, deterministic),
//   which finally rotates its rows back by R^T into grad q / grad k.
#include <mma.h>

#include <algorithm>
#include <cmath>
#include <type_traits>

#include "dtype.cuh"
#include "global_pointer.h"

namespace seqfuse::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kSide = 16;   // threads along each side of a tile
constexpr int kChunk = 16;  // head-dim columns staged per product step (wmma's K)
constexpr int kRowThreads = 256;

template <typename scalar_t>
struct Tile {
  using acc_t = acc_of<scalar_t>;
  static constexpr bool kTensorCores = !std::is_same_v<scalar_t, acc_t>;  // the half types
  static constexpr int T = sizeof(acc_t) == 8 ? 32 : 64;
  static constexpr int P = T / kSide;  // rows (and columns) per thread
  // Staged operands: the element type for wmma, acc_t for the exact path. Pitches: wmma
  // wants rows 32-byte aligned (a multiple of 8 halves); the CUDA-core path pads by one
  // against bank conflicts.
  using stage_t = std::conditional_t<kTensorCores, scalar_t, acc_t>;
  static constexpr int kPitch = kTensorCores ? kChunk + 8 : kChunk + 1;
};

template <typename scalar_t>
struct ProductSmem {
  using K = Tile<scalar_t>;
  alignas(32) typename K::stage_t a[K::T][K::kPitch];
  alignas(32) typename K::stage_t b[K::T][K::kPitch];
  // wmma accumulators on their way to the threads' (ty, tx) layout; unused otherwise.
  alignas(32) typename K::acc_t out[K::kTensorCores ? K::T : 1][K::T + 4];
  double theta[kChunk / 2];  // frequencies of the staged pairs
};

template <typename scalar_t>
struct BackwardSmem {
  using acc_t = acc_of<scalar_t>;
  static constexpr int T = Tile<scalar_t>::T;
  union {  // the product is read out into registers before v is staged
    ProductSmem<scalar_t> product;
    acc_t v[T][T + 1];  // the other operand, [other axis][head-dim chunk]
  };
  acc_t ds[T][T + 1];     // dS summed over heads, [own axis][other axis]
  acc_t sums[kSide][T];   // column sums across ty
  double theta[T / 2];
  int non_finite;         // whether the staged v holds a NaN or an infinity
};

__device__ __forceinline__ double scores_log_base() { return log(kScoresRopeBase); }

// ---- helpers -------------------------------------------------------------------------

__device__ __forceinline__ int64_t min64(int64_t x, int64_t y) { return x < y ? x : y; }

template <typename scalar_t>
__device__ int tile_rows(const GPGeometry& g, int64_t start) {
  return int(min64(Tile<scalar_t>::T, g.L - start));
}

// The first index in sorted list[0, n) not below key.
__device__ int64_t lower_bound(const int64_t* list, int64_t n, int64_t key) {
  int64_t lo = 0, hi = n;
  while (lo < hi) {
    const int64_t mid = (lo + hi) / 2;
    if (list[mid] < key) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  return lo;
}

__device__ bool contains(const int64_t* list, int64_t lo, int64_t hi, int64_t key) {
  const int64_t at = lo + lower_bound(list + lo, hi - lo, key);
  return at < hi && list[at] == key;
}

template <typename acc_t>
__device__ acc_t bias_at(const void* bias, int64_t offset) {
  return bias ? static_cast<const acc_t*>(bias)[offset] : acc_t(0);
}

// Merges every thread's accumulator; thread 0 gets the block's.
template <typename acc_t>
__device__ Log1pSumExp<acc_t> block_merge(Log1pSumExp<acc_t> x, acc_t* sm_m, acc_t* sm_z) {
  for (int off = 16; off > 0; off /= 2) {
    Log1pSumExp<acc_t> o;
    o.m = __shfl_xor_sync(0xffffffffu, x.m, off);
    o.z = __shfl_xor_sync(0xffffffffu, x.z, off);
    x.merge(o);
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();
  if (lane == 0) {
    sm_m[warp] = x.m;
    sm_z[warp] = x.z;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < int(blockDim.x) / 32; ++w) {
      Log1pSumExp<acc_t> o;
      o.m = sm_m[w];
      o.z = sm_z[w];
      x.merge(o);
    }
  }
  return x;
}

// ---- the rope op -----------------------------------------------------------------------

struct RotateArgs {
  const void* x;
  void* y;
  const int64_t* positions;  // [B, L], or null for 0..L-1
  int64_t B, L, H, D;        // x, y: [B, L, H, D], D even
  double log_base;
  bool inverse;
};

// y = R x (R^T with inverse), one pair per thread.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) rotate_kernel(const RotateArgs a) {
  using acc_t = acc_of<scalar_t>;
  const int64_t half = a.D / 2, pairs = a.B * a.L * a.H * half;
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < pairs;
       e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t i = e % half, row = e / half;
    const int64_t b = row / (a.L * a.H), l = row / a.H % a.L;
    const scalar_t* x = static_cast<const scalar_t*>(a.x) + row * a.D + 2 * i;
    acc_t x0 = to_acc(x[0]), x1 = to_acc(x[1]);
    const double pos = a.positions ? double(a.positions[b * a.L + l]) : double(l);
    acc_t c, s;
    rope_cos_sin<acc_t>(pos, i, a.D, a.log_base, a.inverse, c, s);
    rope_rotate(x0, x1, c, s);
    scalar_t* y = static_cast<scalar_t*>(a.y) + row * a.D + 2 * i;
    y[0] = from_acc<scalar_t>(x0);
    y[1] = from_acc<scalar_t>(x1);
  }
}

// ---- tiles ---------------------------------------------------------------------------

// theta[p] = frequency of pair d0 / 2 + p, for the W / 2 pairs of columns [d0, d0 + W).
// Followed by a barrier, which also keeps the stage_rows after it from overwriting
// tiles that slower threads still read; callers start it after the barrier that ends
// the previous stage_rows (theta's readers).
template <int W>
__device__ void stage_thetas(const GPGeometry& g, int64_t d0, double* theta) {
  if (g.rope && threadIdx.x < W / 2) {
    theta[threadIdx.x] = rope_theta(d0 / 2 + threadIdx.x, g.D, scores_log_base());
  }
  __syncthreads();
}

// dst[r][c] = (R_{l0 + r} x[l0 + r])[d0 + c] for r < rows, c < W (R = 1 without rope),
// zeros outside the tile or past D (so odd D without rope is exact). x points at row
// l0, rows `ld` apart; dst rows are `pitch` apart. One pair per thread and step: d0 is
// even, so a pair never straddles two chunks. The staged values are times `factor`.
template <typename scalar_t, int W, typename stage_t>
__device__ void stage_rows(const GPGeometry& g, const scalar_t* x, int64_t ld, int64_t l0,
                           int rows, int64_t d0, const double* theta, stage_t* dst, int pitch,
                           acc_of<scalar_t> factor = acc_of<scalar_t>(1)) {
  using acc_t = acc_of<scalar_t>;
  constexpr int T = Tile<scalar_t>::T;
  for (int e = threadIdx.x; e < T * (W / 2); e += kThreads) {
    const int r = e / (W / 2), p = e % (W / 2);
    const int64_t d = d0 + 2 * p;
    acc_t x0 = acc_t(0), x1 = acc_t(0);
    if (r < rows && d < g.D) {
      const scalar_t* src = x + r * ld + d;
      x0 = to_acc(src[0]);
      if (d + 1 < g.D) x1 = to_acc(src[1]);
      if (g.rope) {
        acc_t c, s;
        rope_cos_sin_at<acc_t>(double(l0 + r), theta[p], false, c, s);
        rope_rotate(x0, x1, c, s);
      }
    }
    dst[r * pitch + 2 * p] = from_acc<stage_t>(factor * x0);
    dst[r * pitch + 2 * p + 1] = from_acc<stage_t>(factor * x1);
  }
}

// Stages chunk d0 of the q rows from i0 and the k rows from j0 into sm.a and sm.b. On
// CUDA cores the q rows are staged times scale: c q . k stays finite wherever it is
// representable, where (q . k) c overflowed for a q . k beyond the range (the CPU
// kernels and the reference take c q too). Tensor-core tiles keep their half inputs
// unscaled (one rounding fewer) and scale the float accumulators: float16 products
// cannot overflow them, bfloat16 ones beyond float's max do (documented).
template <typename scalar_t>
__device__ void stage_chunk(const GPGeometry& g, const scalar_t* q, const scalar_t* k,
                            int64_t b, int64_t hq, int64_t i0, int64_t j0, int64_t d0,
                            ProductSmem<scalar_t>& sm) {
  using K = Tile<scalar_t>;
  const int64_t ld = g.Hqk * g.D;
  stage_thetas<kChunk>(g, d0, sm.theta);  // its barrier: the previous chunk is read
  const auto c = acc_of<scalar_t>(K::kTensorCores ? 1.0 : g.scale);
  stage_rows<scalar_t, kChunk>(g, q + g.qk_offset(b, i0, hq), ld, i0, tile_rows<scalar_t>(g, i0),
                               d0, sm.theta, &sm.a[0][0], K::kPitch, c);
  stage_rows<scalar_t, kChunk>(g, k + g.qk_offset(b, j0, hq), ld, j0, tile_rows<scalar_t>(g, j0),
                               d0, sm.theta, &sm.b[0][0], K::kPitch);
  __syncthreads();
}

// acc[r][c] = scale * (R_i q_i) . (R_j k_j) for i = i0 + ty + 16 r, j = j0 + tx + 16 c
// (0 outside the sequence). Block-uniform.
template <typename scalar_t>
__device__ void tile_product(const GPGeometry& g, const scalar_t* q, const scalar_t* k,
                             int64_t b, int64_t hq, int64_t i0, int64_t j0,
                             ProductSmem<scalar_t>& sm,
                             acc_of<scalar_t> (&acc)[Tile<scalar_t>::P][Tile<scalar_t>::P]) {
  using K = Tile<scalar_t>;
  using acc_t = acc_of<scalar_t>;
  constexpr int T = K::T, P = K::P;
  const int ty = threadIdx.x / kSide, tx = threadIdx.x % kSide;
  if constexpr (K::kTensorCores) {
    namespace wmma = nvcuda::wmma;
    static_assert(T == 64 && kThreads == 256 && kChunk == 16, "8 warps x 2 fragments of 4 x 4");
    // Warp w computes the fragments (w / 2, 2 (w % 2)) and (w / 2, 2 (w % 2) + 1).
    const int warp = threadIdx.x / 32, fr = warp / 2, fc = (warp % 2) * 2;
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> c0, c1;
    wmma::fill_fragment(c0, 0.0f);
    wmma::fill_fragment(c1, 0.0f);
    for (int64_t d0 = 0; d0 < g.D; d0 += kChunk) {
      stage_chunk(g, q, k, b, hq, i0, j0, d0, sm);
      // A = q rows (row-major [m][k]); B[k][n] = k row n, i.e. k rows read column-major.
      wmma::fragment<wmma::matrix_a, 16, 16, 16, scalar_t, wmma::row_major> fa;
      wmma::fragment<wmma::matrix_b, 16, 16, 16, scalar_t, wmma::col_major> fb;
      wmma::load_matrix_sync(fa, &sm.a[16 * fr][0], K::kPitch);
      wmma::load_matrix_sync(fb, &sm.b[16 * fc][0], K::kPitch);
      wmma::mma_sync(c0, fa, fb, c0);
      wmma::load_matrix_sync(fb, &sm.b[16 * (fc + 1)][0], K::kPitch);
      wmma::mma_sync(c1, fa, fb, c1);
    }
    // No barrier before the stores: sm.out has no earlier reader in the block (the
    // forward kernels take one tile; the backward ends every tile with a barrier).
    wmma::store_matrix_sync(&sm.out[16 * fr][16 * fc], c0, T + 4, wmma::mem_row_major);
    wmma::store_matrix_sync(&sm.out[16 * fr][16 * (fc + 1)], c1, T + 4, wmma::mem_row_major);
    __syncthreads();
#pragma unroll
    for (int r = 0; r < P; ++r) {
#pragma unroll
      for (int c = 0; c < P; ++c) acc[r][c] = sm.out[ty + kSide * r][tx + kSide * c];
    }
  } else {
#pragma unroll
    for (int r = 0; r < P; ++r) {
#pragma unroll
      for (int c = 0; c < P; ++c) acc[r][c] = acc_t(0);
    }
    for (int64_t d0 = 0; d0 < g.D; d0 += kChunk) {
      stage_chunk(g, q, k, b, hq, i0, j0, d0, sm);
#pragma unroll
      for (int d = 0; d < kChunk; ++d) {
        acc_t av[P], bv[P];
#pragma unroll
        for (int r = 0; r < P; ++r) av[r] = sm.a[ty + kSide * r][d];
#pragma unroll
        for (int c = 0; c < P; ++c) bv[c] = sm.b[tx + kSide * c][d];
#pragma unroll
        for (int r = 0; r < P; ++r) {
#pragma unroll
          for (int c = 0; c < P; ++c) acc[r][c] += av[r] * bv[c];
        }
      }
    }
  }
  if constexpr (K::kTensorCores) {  // (CUDA cores took the scale on q when staging)
#pragma unroll
    for (int r = 0; r < P; ++r) {
#pragma unroll
      for (int c = 0; c < P; ++c) acc[r][c] *= acc_t(g.scale);
    }
  }
}

// The output heads served by q/k head hq: all of them when q and k are shared.
struct HeadRange {
  int64_t first, count;
};
__device__ HeadRange heads_of(const GPGeometry& g, int64_t hq) {
  return g.Hqk == 1 ? HeadRange{0, g.H} : HeadRange{hq, 1};
}

template <typename scalar_t>
__host__ __device__ int64_t tiles_of(const GPGeometry& g) {
  return (g.L + Tile<scalar_t>::T - 1) / Tile<scalar_t>::T;
}

// ---- scores --------------------------------------------------------------------------

// Block (b, hq, tile i, tile j).
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads, 1) scores_forward_kernel(const GPArgs a) {
  using acc_t = acc_of<scalar_t>;
  constexpr int T = Tile<scalar_t>::T, P = Tile<scalar_t>::P;
  SEQFUSE_SHARED(ProductSmem<scalar_t>, sm);
  const GPGeometry& g = a.geom;
  const int64_t tiles = tiles_of<scalar_t>(g);
  const int64_t blk = blockIdx.x;
  const int64_t tj = blk % tiles, ti = blk / tiles % tiles, bq = blk / (tiles * tiles);
  const int64_t b = bq / g.Hqk, hq = bq % g.Hqk;
  const int64_t i0 = ti * T, j0 = tj * T;
  acc_t acc[P][P] = {};
  if (!(g.tril && i0 > j0 + T - 1)) {  // a tile wholly below the diagonal is all -inf
    tile_product(g, static_cast<const scalar_t*>(a.q), static_cast<const scalar_t*>(a.k), b, hq,
                 i0, j0, sm, acc);
  }
  const int ty = threadIdx.x / kSide, tx = threadIdx.x % kSide;
  scalar_t* out = static_cast<scalar_t*>(a.out);
  const HeadRange heads = heads_of(g, hq);
  for (int64_t h = heads.first; h < heads.first + heads.count; ++h) {
#pragma unroll
    for (int r = 0; r < P; ++r) {
      const int64_t i = i0 + ty + kSide * r;
      if (i >= g.L) continue;
      const acc_t bi = bias_at<acc_t>(a.bias_start, g.bias_offset(b, h, i));
#pragma unroll
      for (int c = 0; c < P; ++c) {
        const int64_t j = j0 + tx + kSide * c;
        if (j >= g.L) continue;
        const acc_t s = g.masked(a.mask, b, i, j)
                            ? acc_t(-INFINITY)
                            : acc[r][c] + bi + bias_at<acc_t>(a.bias_end, g.bias_offset(b, h, j));
        out[g.score_offset(b, h, i, j)] = from_acc<scalar_t>(s);
      }
    }
  }
}

// ---- the fused loss, forward ---------------------------------------------------------

// Block (b, hq, tile i, tile j): for every head served, the tile's (neg, pos) partial
// sums, as (m, z) pairs, at partials[((row * tiles + ti) * tiles + tj) * 4].
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads, 1)
    loss_forward_kernel(const GPArgs a, acc_of<scalar_t>* partials) {
  using acc_t = acc_of<scalar_t>;
  constexpr int T = Tile<scalar_t>::T, P = Tile<scalar_t>::P;
  SEQFUSE_SHARED(ProductSmem<scalar_t>, sm);
  SEQFUSE_SHARED(acc_t, red_m, [kThreads / 32]);
  SEQFUSE_SHARED(acc_t, red_z, [kThreads / 32]);
  const GPGeometry& g = a.geom;
  const int64_t tiles = tiles_of<scalar_t>(g);
  const int64_t blk = blockIdx.x;
  const int64_t tj = blk % tiles, ti = blk / tiles % tiles, bq = blk / (tiles * tiles);
  const int64_t b = bq / g.Hqk, hq = bq % g.Hqk;
  const int64_t i0 = ti * T, j0 = tj * T;
  const bool empty = g.tril && i0 > j0 + T - 1;  // wholly below the diagonal
  acc_t acc[P][P] = {};
  if (!empty) {
    tile_product(g, static_cast<const scalar_t*>(a.q), static_cast<const scalar_t*>(a.k), b, hq,
                 i0, j0, sm, acc);
  }
  const int ty = threadIdx.x / kSide, tx = threadIdx.x % kSide;
  const HeadRange heads = heads_of(g, hq);
  for (int64_t h = heads.first; h < heads.first + heads.count; ++h) {
    const int64_t row = g.row(b, h);
    Log1pSumExp<acc_t> neg, posv;
    if (!empty) {
      const int64_t* pos = a.positives + row * a.P;
      const int64_t lo = lower_bound(pos, a.P, i0 * g.L);
      const int64_t hi = lower_bound(pos, a.P, min64(i0 + T, g.L) * g.L);
#pragma unroll
      for (int r = 0; r < P; ++r) {
        const int64_t i = i0 + ty + kSide * r;
#pragma unroll
        for (int c = 0; c < P; ++c) {
          const int64_t j = j0 + tx + kSide * c;
          if (i >= g.L || j >= g.L || g.masked(a.mask, b, i, j) ||
              padding_slot(i * g.L + j, a.mask_zero)) {
            continue;
          }
          const acc_t s = acc[r][c] + bias_at<acc_t>(a.bias_start, g.bias_offset(b, h, i)) +
                          bias_at<acc_t>(a.bias_end, g.bias_offset(b, h, j));
          if (s == acc_t(-INFINITY)) continue;
          if (contains(pos, lo, hi, i * g.L + j)) {
            posv.add(-s);
          } else {
            neg.add(s);
          }
        }
      }
      neg = block_merge(neg, red_m, red_z);
      posv = block_merge(posv, red_m, red_z);
    }
    if (threadIdx.x == 0) {
      acc_t* p = partials + ((row * tiles + ti) * tiles + tj) * 4;
      p[0] = neg.m;
      p[1] = neg.z;
      p[2] = posv.m;
      p[3] = posv.z;
    }
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    loss_finish_kernel(int64_t rows, int64_t parts, const acc_of<scalar_t>* partials,
                       acc_of<scalar_t>* terms) {
  using acc_t = acc_of<scalar_t>;
  const int64_t row = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (row >= rows) return;
  Log1pSumExp<acc_t> neg, pos;
  for (int64_t t = 0; t < parts; ++t) {
    const acc_t* p = partials + (row * parts + t) * 4;
    Log1pSumExp<acc_t> n, q;
    n.m = p[0];
    n.z = p[1];
    q.m = p[2];
    q.z = p[3];
    neg.merge(n);
    pos.merge(q);
  }
  terms[2 * row] = neg.value();
  terms[2 * row + 1] = pos.value();
}

// ---- backward (scores and loss) --------------------------------------------------------

// Whether span (i, j) has a score: inside the sequence, not masked, and with LOSS not
// the padding slot.
template <bool LOSS>
__device__ bool span_live(const GPArgs& a, int64_t b, int64_t i, int64_t j) {
  const GPGeometry& g = a.geom;
  return i < g.L && j < g.L && !g.masked(a.mask, b, i, j) &&
         !(LOSS && padding_slot(i * g.L + j, a.mask_zero));
}

// COLUMNS = false: block (b, hq, tile i) -> grad_q rows, grad_bias_start.
// COLUMNS = true:  block (b, hq, tile j) -> grad_k rows, grad_bias_end.
// LOSS: dS from the loss terms (scores recomputed), else the scores' upstream gradient.
template <typename scalar_t, bool LOSS, bool COLUMNS>
__global__ void __launch_bounds__(kThreads, 1) backward_kernel(const GPArgs a) {
  using acc_t = acc_of<scalar_t>;
  constexpr int T = Tile<scalar_t>::T, P = Tile<scalar_t>::P;
  SEQFUSE_SHARED(BackwardSmem<scalar_t>, sm);
  const GPGeometry& g = a.geom;
  const scalar_t* q = static_cast<const scalar_t*>(a.q);
  const scalar_t* k = static_cast<const scalar_t*>(a.k);
  const int64_t tiles = tiles_of<scalar_t>(g);
  const int64_t own = blockIdx.x % tiles, bq = blockIdx.x / tiles;
  const int64_t b = bq / g.Hqk, hq = bq % g.Hqk;
  const HeadRange heads = heads_of(g, hq);
  const int tid = threadIdx.x, ty = tid / kSide, tx = tid % kSide;
  // dS's product partner and where it lands: rows of R k into grad (R q), rows of R q
  // into grad (R k), both times scale.
  const scalar_t* other = COLUMNS ? q : k;
  acc_t* grad_out = static_cast<acc_t*>(COLUMNS ? a.grad_k : a.grad_q) + bq * g.L * g.D;
  acc_t* grad_bias = static_cast<acc_t*>(COLUMNS ? a.grad_bias_end : a.grad_bias_start);

  const int64_t u_begin = COLUMNS ? 0 : (g.tril ? own : 0);
  const int64_t u_end = COLUMNS ? (g.tril ? own + 1 : tiles) : tiles;
  for (int64_t u = u_begin; u < u_end; ++u) {
    const int64_t ti = COLUMNS ? u : own, tj = COLUMNS ? own : u;
    const int64_t i0 = ti * T, j0 = tj * T;
    acc_t prod[P][P] = {};
    if constexpr (LOSS) tile_product(g, q, k, b, hq, i0, j0, sm.product, prod);
    acc_t dsum[P][P] = {};
    for (int64_t h = heads.first; h < heads.first + heads.count; ++h) {
      const int64_t row = g.row(b, h);
      acc_t ds[P][P];
      acc_t neg = 0, pos = 0, g_neg = 0, g_pos = 0;
      int64_t lo = 0, hi = 0;
      const int64_t* positives = nullptr;
      if constexpr (LOSS) {
        const acc_t* terms = static_cast<const acc_t*>(a.terms);
        const acc_t* grad_terms = static_cast<const acc_t*>(a.grad);
        neg = terms[2 * row];
        pos = terms[2 * row + 1];
        g_neg = grad_terms[2 * row];
        g_pos = grad_terms[2 * row + 1];
        positives = a.positives + row * a.P;
        lo = lower_bound(positives, a.P, i0 * g.L);
        hi = lower_bound(positives, a.P, min64(i0 + T, g.L) * g.L);
      }
#pragma unroll
      for (int r = 0; r < P; ++r) {
        const int64_t i = i0 + ty + kSide * r;
#pragma unroll
        for (int c = 0; c < P; ++c) {
          const int64_t j = j0 + tx + kSide * c;
          acc_t d = acc_t(0);
          if (span_live<LOSS>(a, b, i, j)) {
            if constexpr (LOSS) {
              const acc_t s = prod[r][c] + bias_at<acc_t>(a.bias_start, g.bias_offset(b, h, i)) +
                              bias_at<acc_t>(a.bias_end, g.bias_offset(b, h, j));
              const acc_t t = contains(positives, lo, hi, i * g.L + j) ? acc_t(1) : acc_t(0);
              d = mce_grad(s, acc_t(1) - t, t, neg, pos, g_neg, g_pos);
            } else {
              d = to_acc(static_cast<const scalar_t*>(a.grad)[g.score_offset(b, h, i, j)]);
            }
          }
          ds[r][c] = d;
          dsum[r][c] += d;
        }
      }
      // This head's bias gradient: sums along the other axis.
      if constexpr (COLUMNS) {
#pragma unroll
        for (int c = 0; c < P; ++c) {
          acc_t v = acc_t(0);
#pragma unroll
          for (int r = 0; r < P; ++r) v += ds[r][c];
          sm.sums[ty][tx + kSide * c] = v;
        }
        __syncthreads();
        if (tid < T && j0 + tid < g.L) {
          acc_t v = acc_t(0);
          for (int y = 0; y < kSide; ++y) v += sm.sums[y][tid];
          grad_bias[row * g.L + j0 + tid] += v;
        }
        __syncthreads();
      } else {
#pragma unroll
        for (int r = 0; r < P; ++r) {
          acc_t v = acc_t(0);
#pragma unroll
          for (int c = 0; c < P; ++c) v += ds[r][c];
#pragma unroll
          for (int off = kSide / 2; off > 0; off /= 2) v += __shfl_xor_sync(0xffffffffu, v, off);
          const int64_t i = i0 + ty + kSide * r;
          if (tx == 0 && i < g.L) grad_bias[row * g.L + i] += v;
        }
      }
    }
    // dS (summed over heads) with the block's own axis first. sm.ds is not in the union
    // with the product's staging area, and its readers of the previous tile are behind
    // the barrier that ends it; v (which is) is staged after the barrier below.
#pragma unroll
    for (int r = 0; r < P; ++r) {
#pragma unroll
      for (int c = 0; c < P; ++c) {
        if (COLUMNS) {
          sm.ds[tx + kSide * c][ty + kSide * r] = dsum[r][c];
        } else {
          sm.ds[ty + kSide * r][tx + kSide * c] = dsum[r][c];
        }
      }
    }
    // grad_out[own rows, d] += scale * sum_y ds[x][y] * (R other)[y rows, d]
    const int64_t x0 = COLUMNS ? j0 : i0, y0 = COLUMNS ? i0 : j0;
    // A masked span's ds is 0, but 0 times a NaN or an infinity in its partner row is NaN:
    // when the staged rows hold one, masked spans are skipped (the reference's gradient
    // of a masked span reaches neither q_i nor k_j).
    for (int64_t d0 = 0; d0 < g.D; d0 += T) {
      __syncthreads();
      if (tid == 0) sm.non_finite = 0;
      stage_thetas<T>(g, d0, sm.theta);
      stage_rows<scalar_t, T>(g, other + g.qk_offset(b, y0, hq), g.Hqk * g.D, y0,
                              tile_rows<scalar_t>(g, y0), d0, sm.theta, &sm.v[0][0], T + 1);
      __syncthreads();
      for (int e = tid; e < T * T; e += kThreads) {
        const acc_t x = sm.v[e / T][e % T];
        if (x - x != acc_t(0)) sm.non_finite = 1;  // NaN for a NaN or an infinity
      }
      __syncthreads();
      const bool careful = sm.non_finite != 0;
      acc_t o[P][P] = {};
      for (int y = 0; y < T; ++y) {
        acc_t dv[P], vv[P];
#pragma unroll
        for (int r = 0; r < P; ++r) dv[r] = sm.ds[ty + kSide * r][y];
#pragma unroll
        for (int c = 0; c < P; ++c) vv[c] = sm.v[y][tx + kSide * c];
#pragma unroll
        for (int r = 0; r < P; ++r) {
          if (careful) {  // (rare: the mask is read again rather than kept in shared memory)
            const int64_t x = x0 + ty + kSide * r, other_at = y0 + y;
            if (!span_live<LOSS>(a, b, COLUMNS ? other_at : x, COLUMNS ? x : other_at)) continue;
          }
#pragma unroll
          for (int c = 0; c < P; ++c) o[r][c] += dv[r] * vv[c];
        }
      }
#pragma unroll
      for (int r = 0; r < P; ++r) {
        const int64_t x = x0 + ty + kSide * r;
#pragma unroll
        for (int c = 0; c < P; ++c) {
          const int64_t d = d0 + tx + kSide * c;
          if (x < g.L && d < g.D) grad_out[x * g.D + d] += acc_t(g.scale) * o[r][c];
        }
      }
    }
    __syncthreads();
  }
  if (!g.rope) return;
  // grad (R x) -> grad x = R^T grad (R x), on the rows this block owns (its own global
  // writes are visible to it after the barrier).
  const int64_t x0 = own * T;
  const int rows = tile_rows<scalar_t>(g, x0);
  for (int64_t e = tid; e < int64_t(rows) * (g.D / 2); e += kThreads) {
    const int64_t x = x0 + e / (g.D / 2), i = e % (g.D / 2);
    acc_t* p = grad_out + x * g.D + 2 * i;
    acc_t c, s;
    rope_cos_sin<acc_t>(double(x), i, g.D, scores_log_base(), true, c, s);
    rope_rotate(p[0], p[1], c, s);
  }
}

// ---- losses on materialised rows -----------------------------------------------------

template <typename scalar_t, bool SPARSE>
__global__ void __launch_bounds__(kRowThreads) row_loss_forward_kernel(const RowLossArgs a) {
  using acc_t = acc_of<scalar_t>;
  SEQFUSE_SHARED(acc_t, red_m, [kRowThreads / 32]);
  SEQFUSE_SHARED(acc_t, red_z, [kRowThreads / 32]);
  const int64_t r = blockIdx.x;
  const scalar_t* s = static_cast<const scalar_t*>(a.scores) + r * a.N;
  Log1pSumExp<acc_t> neg, pos;
  for (int64_t n = threadIdx.x; n < a.N; n += blockDim.x) {
    const acc_t x = to_acc(s[n]);
    if (x == acc_t(-INFINITY) || (SPARSE && padding_slot(n, a.mask_zero))) continue;
    if constexpr (SPARSE) {
      if (contains(a.positives + r * a.P, 0, a.P, n)) {
        pos.add(-x);
      } else {
        neg.add(x);
      }
    } else {
      const acc_t t = to_acc(static_cast<const scalar_t*>(a.labels)[r * a.N + n]);
      if (t != acc_t(1)) neg.add(x + log1p(-t));
      if (t != acc_t(0)) pos.add(log(t) - x);
    }
  }
  neg = block_merge(neg, red_m, red_z);
  pos = block_merge(pos, red_m, red_z);
  if (threadIdx.x == 0) {
    acc_t* terms = static_cast<acc_t*>(a.out);
    terms[2 * r] = neg.value();
    terms[2 * r + 1] = pos.value();
  }
}

template <typename scalar_t, bool SPARSE>
__global__ void __launch_bounds__(kRowThreads) row_loss_backward_kernel(const RowLossArgs a) {
  using acc_t = acc_of<scalar_t>;
  const acc_t* terms = static_cast<const acc_t*>(a.terms);
  const acc_t* grad_terms = static_cast<const acc_t*>(a.grad_terms);
  const int64_t total = a.R * a.N;
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < total;
       e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = e / a.N, n = e % a.N;
    acc_t t;
    if constexpr (SPARSE) {
      t = contains(a.positives + r * a.P, 0, a.P, n) ? acc_t(1) : acc_t(0);
    } else {
      t = to_acc(static_cast<const scalar_t*>(a.labels)[e]);
    }
    const acc_t s = SPARSE && padding_slot(n, a.mask_zero)
                        ? acc_t(-INFINITY)
                        : to_acc(static_cast<const scalar_t*>(a.scores)[e]);
    const acc_t d = mce_grad(s, acc_t(1) - t, t,
                             terms[2 * r], terms[2 * r + 1], grad_terms[2 * r],
                             grad_terms[2 * r + 1]);
    static_cast<scalar_t*>(a.out)[e] = from_acc<scalar_t>(d);
  }
}

// ---- launches ------------------------------------------------------------------------

bool grid_fits(int64_t blocks) { return blocks < (int64_t(1) << 31); }

// The prologue every GlobalPointer launcher shares: nothing to do for empty inputs,
// dispatch on dtype, the grid size checked. launch(tag, tiles, grid) does the rest.
template <typename Blocks, typename Launch>
cudaError_t launch_gp(const GPArgs& a, DType dtype, Blocks blocks_of, Launch launch) {
  const GPGeometry& g = a.geom;
  if (g.B * g.Hqk * g.H * g.L == 0) return cudaSuccess;
  cudaError_t err = cudaErrorInvalidValue;
  dispatch_float_types(dtype, [&](auto tag) {
    const int64_t tiles = tiles_of<decltype(tag)>(g);
    const int64_t blocks = blocks_of(tiles);
    err = grid_fits(blocks) ? launch(tag, tiles, unsigned(blocks)) : cudaErrorInvalidConfiguration;
  });
  return err;
}

template <bool LOSS>
cudaError_t launch_backward(const GPArgs& a, DType dtype, cudaStream_t stream) {
  const GPGeometry& g = a.geom;
  return launch_gp(
      a, dtype, [&](int64_t tiles) { return g.B * g.Hqk * tiles; },
      [&](auto tag, int64_t, unsigned grid) {
        using scalar_t = decltype(tag);
        SEQFUSE_LAUNCH(grid, kThreads, 0, stream, backward_kernel<scalar_t, LOSS, false>)(a);
        const cudaError_t err = cudaGetLastError();
        if (err != cudaSuccess) return err;
        SEQFUSE_LAUNCH(grid, kThreads, 0, stream, backward_kernel<scalar_t, LOSS, true>)(a);
        return cudaGetLastError();
      });
}

template <bool SPARSE>
cudaError_t launch_row_forward(const RowLossArgs& a, DType dtype, cudaStream_t stream) {
  if (a.R == 0) return cudaSuccess;
  if (!grid_fits(a.R)) return cudaErrorInvalidConfiguration;
  cudaError_t err = cudaErrorInvalidValue;
  dispatch_float_types(dtype, [&](auto tag) {
    SEQFUSE_LAUNCH(unsigned(a.R), kRowThreads, 0, stream, row_loss_forward_kernel<decltype(tag), SPARSE>)(a);
    err = cudaGetLastError();
  });
  return err;
}

template <bool SPARSE>
cudaError_t launch_row_backward(const RowLossArgs& a, DType dtype, cudaStream_t stream) {
  const int64_t total = a.R * a.N;
  if (total == 0) return cudaSuccess;
  const int64_t blocks = std::min<int64_t>((total + kRowThreads - 1) / kRowThreads, 1 << 20);
  cudaError_t err = cudaErrorInvalidValue;
  dispatch_float_types(dtype, [&](auto tag) {
    SEQFUSE_LAUNCH(unsigned(blocks), kRowThreads, 0, stream, row_loss_backward_kernel<decltype(tag), SPARSE>)(a);
    err = cudaGetLastError();
  });
  return err;
}

}  // namespace

size_t global_pointer_workspace_bytes(const GPGeometry& g, DType dtype) {
  size_t bytes = 0;
  dispatch_float_types(dtype, [&](auto tag) {
    using scalar_t = decltype(tag);
    const int64_t tiles = tiles_of<scalar_t>(g);
    bytes = sizeof(acc_of<scalar_t>) * size_t(4 * g.B * g.H * tiles * tiles);
  });
  return bytes;
}

cudaError_t rope(const void* x, const int64_t* positions, int64_t B, int64_t L, int64_t H,
                 int64_t D, double base, bool inverse, void* out, DType dtype,
                 cudaStream_t stream) {
  const int64_t pairs = B * L * H * (D / 2);
  if (pairs == 0) return cudaSuccess;
  const int64_t blocks = std::min<int64_t>((pairs + kThreads - 1) / kThreads, 1 << 20);
  cudaError_t err = cudaErrorInvalidValue;
  dispatch_float_types(dtype, [&](auto tag) {
    const RotateArgs r{x, out, positions, B, L, H, D, std::log(base), inverse};
    SEQFUSE_LAUNCH(unsigned(blocks), kThreads, 0, stream, rotate_kernel<decltype(tag)>)(r);
    err = cudaGetLastError();
  });
  return err;
}

cudaError_t global_pointer_scores_forward(const GPArgs& a, DType dtype, cudaStream_t stream) {
  const GPGeometry& g = a.geom;
  return launch_gp(
      a, dtype, [&](int64_t tiles) { return g.B * g.Hqk * tiles * tiles; },
      [&](auto tag, int64_t, unsigned grid) {
        SEQFUSE_LAUNCH(grid, kThreads, 0, stream, scores_forward_kernel<decltype(tag)>)(a);
        return cudaGetLastError();
      });
}

cudaError_t global_pointer_scores_backward(const GPArgs& a, DType dtype, cudaStream_t stream) {
  return launch_backward<false>(a, dtype, stream);
}

cudaError_t global_pointer_loss_forward(const GPArgs& a, DType dtype, cudaStream_t stream) {
  const GPGeometry& g = a.geom;
  return launch_gp(
      a, dtype, [&](int64_t tiles) { return g.B * g.Hqk * tiles * tiles; },
      [&](auto tag, int64_t tiles, unsigned grid) {
        using scalar_t = decltype(tag);
        auto* partials = static_cast<acc_of<scalar_t>*>(a.workspace);
        SEQFUSE_LAUNCH(grid, kThreads, 0, stream, loss_forward_kernel<scalar_t>)(a, partials);
        const cudaError_t err = cudaGetLastError();
        if (err != cudaSuccess) return err;
        const int64_t rows = g.B * g.H;
        SEQFUSE_LAUNCH(unsigned((rows + kThreads - 1) / kThreads), kThreads, 0, stream, loss_finish_kernel<scalar_t>)(rows, tiles * tiles, partials,
                                                 static_cast<acc_of<scalar_t>*>(a.out));
        return cudaGetLastError();
      });
}

cudaError_t global_pointer_loss_backward(const GPArgs& a, DType dtype, cudaStream_t stream) {
  return launch_backward<true>(a, dtype, stream);
}

cudaError_t mce_forward(const RowLossArgs& a, DType dtype, cudaStream_t stream) {
  return launch_row_forward<false>(a, dtype, stream);
}
cudaError_t mce_backward(const RowLossArgs& a, DType dtype, cudaStream_t stream) {
  return launch_row_backward<false>(a, dtype, stream);
}
cudaError_t sparse_mce_forward(const RowLossArgs& a, DType dtype, cudaStream_t stream) {
  return launch_row_forward<true>(a, dtype, stream);
}
cudaError_t sparse_mce_backward(const RowLossArgs& a, DType dtype, cudaStream_t stream) {
  return launch_row_backward<true>(a, dtype, stream);
}

}  // namespace seqfuse::cuda
