// CUDA GlobalPointer kernels: exact tiled products on CUDA cores, accumulated in fp32
// (fp64 for fp64 inputs). Tensor cores are not used yet.
//
//   s[b,h,i,j] = (scale R_i q) . (R_j k) + bs[b,h,i] + be[b,h,j],  -inf where masked
//   loss terms and gradients: csrc/common/global_pointer.h
//
// A prologue rotates q (times scale) and k once into acc-typed workspace [B, L, Hqk, D].
// A block then owns a T x T score tile (T = 64; 32 for fp64): 256 threads, thread
// (ty, tx) holding rows ty + 16 r and columns tx + 16 c, the head dim staged through
// shared memory 16 columns at a time.
// - scores: one block per (b, h, tile i, tile j) writes its tile once, -inf included.
// - loss forward: one block per (b, h, tile i) sweeps the column tiles, merging each
//   entry into the negative or positive log-sum (membership by binary search in the
//   row's sorted positives), and leaves a partial per block; a second kernel merges them.
// - backward (scores and loss): the "rows" kernel, one block per (b, q/k head, tile i),
//   forms dS tiles (loaded, or recomputed from q and k for the loss), summed over the
//   heads sharing q/k, and adds scale * dS @ Rk into grad_q and row sums into
//   grad_bias_start; the "columns" kernel does the transpose for grad_k and
//   grad_bias_end. Every output row is owned by one block: no atomics, deterministic.
//   An epilogue rotates grad_q and grad_k back (R^T).
#include <algorithm>
#include <cmath>

#include "dtype.cuh"
#include "global_pointer.h"

namespace seqfuse::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kSide = 16;   // threads along each side of a tile
constexpr int kChunk = 16;  // head-dim columns staged per product step
constexpr int kRowThreads = 256;

template <typename acc_t>
struct Tile {
  static constexpr int T = sizeof(acc_t) == 8 ? 32 : 64;
  static constexpr int P = T / kSide;  // rows (and columns) per thread
};

template <typename acc_t>
struct ProductSmem {
  acc_t a[Tile<acc_t>::T][kChunk + 1];
  acc_t b[Tile<acc_t>::T][kChunk + 1];
};

template <typename acc_t>
struct BackwardSmem {
  static constexpr int T = Tile<acc_t>::T;
  ProductSmem<acc_t> product;
  acc_t ds[T][T + 1];     // dS summed over heads, [own axis][other axis]
  acc_t v[T][T + 1];      // the other operand, [other axis][head-dim chunk]
  acc_t sums[kSide][T];   // column sums across ty
};

// ---- rotation ------------------------------------------------------------------------

struct RotateArgs {
  const void* x;
  void* y;                   // may alias x
  const int64_t* positions;  // [B, L], or null for 0..L-1
  int64_t B, L, H, D;
  double log_base, mult;
  bool rotate, inverse, heads_major;  // heads_major: [B, H, L, D], else [B, L, H, D]
};

// y = mult * R x (R^T with inverse), one pair per thread. Without rotation D may be odd:
// the last "pair" of a row is then the single element D - 1.
template <typename scalar_t, typename In, typename Out>
__global__ void __launch_bounds__(kThreads) rotate_kernel(const RotateArgs a) {
  using acc_t = acc_of<scalar_t>;
  const int64_t half = (a.D + 1) / 2, pairs = a.B * a.L * a.H * half;
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < pairs;
       e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t i = e % half, row = e / half;
    const int64_t b = row / (a.L * a.H), l = a.heads_major ? row % a.L : row / a.H % a.L;
    const In* x = static_cast<const In*>(a.x) + row * a.D + 2 * i;
    const bool single = 2 * i + 1 == a.D;
    acc_t x0 = acc_t(a.mult) * to_acc(x[0]);
    acc_t x1 = single ? acc_t(0) : acc_t(a.mult) * to_acc(x[1]);
    if (a.rotate) {
      const double pos = a.positions ? double(a.positions[b * a.L + l]) : double(l);
      acc_t c, s;
      rope_cos_sin<acc_t>(pos, i, a.D, a.log_base, a.inverse, c, s);
      rope_rotate(x0, x1, c, s);
    }
    Out* y = static_cast<Out*>(a.y) + row * a.D + 2 * i;
    y[0] = from_acc<Out>(x0);
    if (!single) y[1] = from_acc<Out>(x1);
  }
}

template <typename scalar_t, typename In, typename Out>
cudaError_t rotate(const RotateArgs& a, cudaStream_t stream) {
  const int64_t pairs = a.B * a.L * a.H * ((a.D + 1) / 2);
  if (pairs == 0) return cudaSuccess;
  const int64_t blocks = std::min<int64_t>((pairs + kThreads - 1) / kThreads, 1 << 20);
  rotate_kernel<scalar_t, In, Out><<<unsigned(blocks), kThreads, 0, stream>>>(a);
  return cudaGetLastError();
}

// ---- tiles ---------------------------------------------------------------------------

// acc[r][c] += A[ty + 16 r] . Bm[tx + 16 c] over the head dim; A and Bm point at the
// tile's first row, rows `ld` apart, with a_rows / b_rows valid rows. Block-uniform.
template <typename acc_t>
__device__ void tile_product(const acc_t* A, int a_rows, const acc_t* Bm, int b_rows,
                             int64_t ld, int64_t D, ProductSmem<acc_t>& sm,
                             acc_t (&acc)[Tile<acc_t>::P][Tile<acc_t>::P]) {
  constexpr int T = Tile<acc_t>::T, P = Tile<acc_t>::P;
  const int tid = threadIdx.x, ty = tid / kSide, tx = tid % kSide;
  for (int64_t d0 = 0; d0 < D; d0 += kChunk) {
    __syncthreads();
    for (int e = tid; e < T * kChunk; e += kThreads) {
      const int r = e / kChunk, d = e % kChunk;
      const bool in_d = d0 + d < D;
      sm.a[r][d] = r < a_rows && in_d ? A[r * ld + d0 + d] : acc_t(0);
      sm.b[r][d] = r < b_rows && in_d ? Bm[r * ld + d0 + d] : acc_t(0);
    }
    __syncthreads();
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

__device__ __forceinline__ int64_t min64(int64_t x, int64_t y) { return x < y ? x : y; }

template <typename acc_t>
__device__ int tile_rows(const GPGeometry& g, int64_t start) {
  return int(min64(Tile<acc_t>::T, g.L - start));
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

// ---- scores --------------------------------------------------------------------------

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    scores_forward_kernel(const GPArgs a, const acc_of<scalar_t>* rq, const acc_of<scalar_t>* rk) {
  using acc_t = acc_of<scalar_t>;
  constexpr int T = Tile<acc_t>::T, P = Tile<acc_t>::P;
  __shared__ ProductSmem<acc_t> sm;
  const GPGeometry& g = a.geom;
  const int64_t tiles = (g.L + T - 1) / T;
  int64_t blk = blockIdx.x;
  const int64_t tj = blk % tiles, ti = blk / tiles % tiles, bh = blk / (tiles * tiles);
  const int64_t b = bh / g.H, h = bh % g.H, hq = g.Hqk == 1 ? 0 : h;
  const int64_t i0 = ti * T, j0 = tj * T;
  acc_t acc[P][P] = {};
  if (!(g.tril && i0 > j0 + T - 1)) {  // a tile wholly below the diagonal is all -inf
    tile_product(rq + g.qk_offset(b, i0, hq), tile_rows<acc_t>(g, i0),
                 rk + g.qk_offset(b, j0, hq), tile_rows<acc_t>(g, j0), g.Hqk * g.D, g.D, sm,
                 acc);
  }
  const int ty = threadIdx.x / kSide, tx = threadIdx.x % kSide;
  scalar_t* out = static_cast<scalar_t*>(a.out);
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

// ---- the fused loss, forward ---------------------------------------------------------

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    loss_forward_kernel(const GPArgs a, const acc_of<scalar_t>* rq, const acc_of<scalar_t>* rk,
                        acc_of<scalar_t>* partials) {
  using acc_t = acc_of<scalar_t>;
  constexpr int T = Tile<acc_t>::T, P = Tile<acc_t>::P;
  __shared__ ProductSmem<acc_t> sm;
  __shared__ acc_t red_m[kThreads / 32], red_z[kThreads / 32];
  const GPGeometry& g = a.geom;
  const int64_t tiles = (g.L + T - 1) / T;
  const int64_t ti = blockIdx.x % tiles, bh = blockIdx.x / tiles;
  const int64_t b = bh / g.H, h = bh % g.H, hq = g.Hqk == 1 ? 0 : h;
  const int64_t i0 = ti * T;
  const int64_t* pos = a.positives + bh * a.P;
  const int64_t lo = lower_bound(pos, a.P, i0 * g.L);
  const int64_t hi = lower_bound(pos, a.P, min64(i0 + T, g.L) * g.L);
  const int ty = threadIdx.x / kSide, tx = threadIdx.x % kSide;
  Log1pSumExp<acc_t> neg, posv;
  for (int64_t tj = g.tril ? ti : 0; tj < tiles; ++tj) {
    const int64_t j0 = tj * T;
    acc_t acc[P][P] = {};
    tile_product(rq + g.qk_offset(b, i0, hq), tile_rows<acc_t>(g, i0),
                 rk + g.qk_offset(b, j0, hq), tile_rows<acc_t>(g, j0), g.Hqk * g.D, g.D, sm,
                 acc);
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
  }
  neg = block_merge(neg, red_m, red_z);
  posv = block_merge(posv, red_m, red_z);
  if (threadIdx.x == 0) {
    acc_t* p = partials + int64_t(blockIdx.x) * 4;
    p[0] = neg.m;
    p[1] = neg.z;
    p[2] = posv.m;
    p[3] = posv.z;
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    loss_finish_kernel(int64_t rows, int64_t tiles, const acc_of<scalar_t>* partials,
                       scalar_t* terms) {
  using acc_t = acc_of<scalar_t>;
  const int64_t row = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (row >= rows) return;
  Log1pSumExp<acc_t> neg, pos;
  for (int64_t t = 0; t < tiles; ++t) {
    const acc_t* p = partials + (row * tiles + t) * 4;
    Log1pSumExp<acc_t> n, q;
    n.m = p[0];
    n.z = p[1];
    q.m = p[2];
    q.z = p[3];
    neg.merge(n);
    pos.merge(q);
  }
  terms[2 * row] = from_acc<scalar_t>(neg.value());
  terms[2 * row + 1] = from_acc<scalar_t>(pos.value());
}

// ---- backward (scores and loss) --------------------------------------------------------

// COLUMNS = false: block (b, hq, tile i) -> grad_q rows, grad_bias_start.
// COLUMNS = true:  block (b, hq, tile j) -> grad_k rows, grad_bias_end.
// LOSS: dS from the loss terms (scores recomputed), else the scores' upstream gradient.
template <typename scalar_t, bool LOSS, bool COLUMNS>
__global__ void __launch_bounds__(kThreads)
    backward_kernel(const GPArgs a, const acc_of<scalar_t>* rq, const acc_of<scalar_t>* rk) {
  using acc_t = acc_of<scalar_t>;
  constexpr int T = Tile<acc_t>::T, P = Tile<acc_t>::P;
  __shared__ BackwardSmem<acc_t> sm;
  const GPGeometry& g = a.geom;
  const int64_t tiles = (g.L + T - 1) / T;
  const int64_t own = blockIdx.x % tiles, bq = blockIdx.x / tiles;
  const int64_t b = bq / g.Hqk, hq = bq % g.Hqk;
  const int64_t h_first = g.Hqk == 1 ? 0 : hq, h_count = g.Hqk == 1 ? g.H : 1;
  const int tid = threadIdx.x, ty = tid / kSide, tx = tid % kSide;
  const int64_t ld = g.Hqk * g.D;
  // The other operand of dS's product and where it lands: rows of Rk into grad (R q)
  // times scale; columns: rows of scale * R q into grad (R k).
  const acc_t* other = COLUMNS ? rq : rk;
  acc_t* grad_out = static_cast<acc_t*>(COLUMNS ? a.grad_k : a.grad_q) + bq * g.L * g.D;
  const acc_t mult = COLUMNS ? acc_t(1) : acc_t(g.scale);
  acc_t* grad_bias = static_cast<acc_t*>(COLUMNS ? a.grad_bias_end : a.grad_bias_start);

  const int64_t u_begin = COLUMNS ? 0 : (g.tril ? own : 0);
  const int64_t u_end = COLUMNS ? (g.tril ? own + 1 : tiles) : tiles;
  for (int64_t u = u_begin; u < u_end; ++u) {
    const int64_t ti = COLUMNS ? u : own, tj = COLUMNS ? own : u;
    const int64_t i0 = ti * T, j0 = tj * T;
    acc_t prod[P][P] = {};
    if constexpr (LOSS) {
      tile_product(rq + g.qk_offset(b, i0, hq), tile_rows<acc_t>(g, i0),
                   rk + g.qk_offset(b, j0, hq), tile_rows<acc_t>(g, j0), ld, g.D, sm.product,
                   prod);
    }
    acc_t dsum[P][P] = {};
    for (int64_t h = h_first; h < h_first + h_count; ++h) {
      const int64_t row = g.row(b, h);
      acc_t ds[P][P];
      acc_t neg = 0, pos = 0, g_neg = 0, g_pos = 0;
      int64_t lo = 0, hi = 0;
      const int64_t* positives = nullptr;
      if constexpr (LOSS) {
        const scalar_t* terms = static_cast<const scalar_t*>(a.terms);
        const scalar_t* grad_terms = static_cast<const scalar_t*>(a.grad);
        neg = to_acc(terms[2 * row]);
        pos = to_acc(terms[2 * row + 1]);
        g_neg = to_acc(grad_terms[2 * row]);
        g_pos = to_acc(grad_terms[2 * row + 1]);
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
          if (i < g.L && j < g.L && !g.masked(a.mask, b, i, j) &&
              !(LOSS && padding_slot(i * g.L + j, a.mask_zero))) {
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
    // dS (summed over heads) with the block's own axis first.
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
    // grad_out[own rows, d] += mult * sum_y ds[x][y] * other[y rows, d]
    const int64_t x0 = COLUMNS ? j0 : i0, y0 = COLUMNS ? i0 : j0;
    const int y_rows = tile_rows<acc_t>(g, y0);
    for (int64_t d0 = 0; d0 < g.D; d0 += T) {
      __syncthreads();
      for (int e = tid; e < T * T; e += kThreads) {
        const int y = e / T, d = e % T;
        sm.v[y][d] = y < y_rows && d0 + d < g.D ? other[g.qk_offset(b, y0 + y, hq) + d0 + d]
                                                : acc_t(0);
      }
      __syncthreads();
      acc_t o[P][P] = {};
      for (int y = 0; y < T; ++y) {
        acc_t dv[P], vv[P];
#pragma unroll
        for (int r = 0; r < P; ++r) dv[r] = sm.ds[ty + kSide * r][y];
#pragma unroll
        for (int c = 0; c < P; ++c) vv[c] = sm.v[y][tx + kSide * c];
#pragma unroll
        for (int r = 0; r < P; ++r) {
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
          if (x < g.L && d < g.D) grad_out[x * g.D + d] += mult * o[r][c];
        }
      }
    }
    __syncthreads();
  }
}

// ---- losses on materialised rows -----------------------------------------------------

template <typename scalar_t, bool SPARSE>
__global__ void __launch_bounds__(kRowThreads) row_loss_forward_kernel(const RowLossArgs a) {
  using acc_t = acc_of<scalar_t>;
  __shared__ acc_t red_m[kRowThreads / 32], red_z[kRowThreads / 32];
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
    scalar_t* terms = static_cast<scalar_t*>(a.out);
    terms[2 * r] = from_acc<scalar_t>(neg.value());
    terms[2 * r + 1] = from_acc<scalar_t>(pos.value());
  }
}

template <typename scalar_t, bool SPARSE>
__global__ void __launch_bounds__(kRowThreads) row_loss_backward_kernel(const RowLossArgs a) {
  using acc_t = acc_of<scalar_t>;
  const scalar_t* terms = static_cast<const scalar_t*>(a.terms);
  const scalar_t* grad_terms = static_cast<const scalar_t*>(a.grad_terms);
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
                             to_acc(terms[2 * r]), to_acc(terms[2 * r + 1]),
                             to_acc(grad_terms[2 * r]), to_acc(grad_terms[2 * r + 1]));
    static_cast<scalar_t*>(a.out)[e] = from_acc<scalar_t>(d);
  }
}

// ---- launches ------------------------------------------------------------------------

template <typename acc_t>
struct Workspace {
  acc_t *rq, *rk, *partials;
};

template <typename acc_t>
Workspace<acc_t> workspace_of(const GPGeometry& g, void* base) {
  acc_t* p = static_cast<acc_t*>(base);
  const int64_t n = g.B * g.L * g.Hqk * g.D;
  return {p, p + n, p + 2 * n};
}

template <typename acc_t>
size_t workspace_bytes(const GPGeometry& g) {
  const int64_t tiles = (g.L + Tile<acc_t>::T - 1) / Tile<acc_t>::T;
  return sizeof(acc_t) * size_t(2 * g.B * g.L * g.Hqk * g.D + 4 * g.B * g.H * tiles);
}

// rq = scale * R q and rk = R k into the workspace.
template <typename scalar_t>
cudaError_t rotate_inputs(const GPArgs& a, const Workspace<acc_of<scalar_t>>& w,
                          cudaStream_t stream) {
  const GPGeometry& g = a.geom;
  RotateArgs r{a.q, w.rq, nullptr, g.B, g.L, g.Hqk, g.D, std::log(kScoresRopeBase), g.scale,
               g.rope, false, false};
  cudaError_t err = rotate<scalar_t, scalar_t, acc_of<scalar_t>>(r, stream);
  if (err != cudaSuccess) return err;
  r.x = a.k;
  r.y = w.rk;
  r.mult = 1.0;
  return rotate<scalar_t, scalar_t, acc_of<scalar_t>>(r, stream);
}

bool grid_fits(int64_t blocks) { return blocks < (int64_t(1) << 31); }

template <bool LOSS>
cudaError_t launch_backward(const GPArgs& a, DType dtype, cudaStream_t stream) {
  const GPGeometry& g = a.geom;
  if (g.B * g.Hqk * g.L == 0) return cudaSuccess;  // no block to launch
  cudaError_t err = cudaErrorInvalidValue;
  dispatch_float_types(dtype, [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc_t = acc_of<scalar_t>;
    const auto w = workspace_of<acc_t>(g, a.workspace);
    const int64_t blocks = g.B * g.Hqk * ((g.L + Tile<acc_t>::T - 1) / Tile<acc_t>::T);
    if (!grid_fits(blocks)) {
      err = cudaErrorInvalidConfiguration;
      return;
    }
    if ((err = rotate_inputs<scalar_t>(a, w, stream)) != cudaSuccess) return;
    const unsigned grid = unsigned(blocks);
    backward_kernel<scalar_t, LOSS, false><<<grid, kThreads, 0, stream>>>(a, w.rq, w.rk);
    if ((err = cudaGetLastError()) != cudaSuccess) return;
    backward_kernel<scalar_t, LOSS, true><<<grid, kThreads, 0, stream>>>(a, w.rq, w.rk);
    if ((err = cudaGetLastError()) != cudaSuccess || !g.rope) return;
    // grad (R q) -> grad q, in place in the [B, Hqk, L, D] gradient layout.
    RotateArgs r{a.grad_q, a.grad_q, nullptr, g.B, g.L, g.Hqk, g.D, std::log(kScoresRopeBase), 1.0,
                 true, true, true};
    if ((err = rotate<scalar_t, acc_t, acc_t>(r, stream)) != cudaSuccess) return;
    r.x = r.y = a.grad_k;
    err = rotate<scalar_t, acc_t, acc_t>(r, stream);
  });
  return err;
}

template <bool SPARSE>
cudaError_t launch_row_forward(const RowLossArgs& a, DType dtype, cudaStream_t stream) {
  if (a.R == 0) return cudaSuccess;
  if (!grid_fits(a.R)) return cudaErrorInvalidConfiguration;
  cudaError_t err = cudaErrorInvalidValue;
  dispatch_float_types(dtype, [&](auto tag) {
    row_loss_forward_kernel<decltype(tag), SPARSE><<<unsigned(a.R), kRowThreads, 0, stream>>>(a);
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
    row_loss_backward_kernel<decltype(tag), SPARSE>
        <<<unsigned(blocks), kRowThreads, 0, stream>>>(a);
    err = cudaGetLastError();
  });
  return err;
}

}  // namespace

size_t global_pointer_workspace_bytes(const GPGeometry& geom, DType dtype) {
  size_t bytes = 0;
  dispatch_float_types(dtype, [&](auto tag) {
    bytes = workspace_bytes<acc_of<decltype(tag)>>(geom);
  });
  return bytes;
}

cudaError_t rope(const void* x, const int64_t* positions, int64_t B, int64_t L, int64_t H,
                 int64_t D, double base, bool inverse, void* out, DType dtype,
                 cudaStream_t stream) {
  cudaError_t err = cudaErrorInvalidValue;
  dispatch_float_types(dtype, [&](auto tag) {
    using scalar_t = decltype(tag);
    const RotateArgs r{x, out, positions, B, L, H, D, std::log(base), 1.0, true, inverse, false};
    err = rotate<scalar_t, scalar_t, scalar_t>(r, stream);
  });
  return err;
}

cudaError_t global_pointer_scores_forward(const GPArgs& a, DType dtype, cudaStream_t stream) {
  const GPGeometry& g = a.geom;
  if (g.B * g.H * g.L == 0) return cudaSuccess;
  cudaError_t err = cudaErrorInvalidValue;
  dispatch_float_types(dtype, [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc_t = acc_of<scalar_t>;
    const auto w = workspace_of<acc_t>(g, a.workspace);
    const int64_t tiles = (g.L + Tile<acc_t>::T - 1) / Tile<acc_t>::T;
    const int64_t blocks = g.B * g.H * tiles * tiles;
    if (!grid_fits(blocks)) {
      err = cudaErrorInvalidConfiguration;
      return;
    }
    if ((err = rotate_inputs<scalar_t>(a, w, stream)) != cudaSuccess) return;
    scores_forward_kernel<scalar_t><<<unsigned(blocks), kThreads, 0, stream>>>(a, w.rq, w.rk);
    err = cudaGetLastError();
  });
  return err;
}

cudaError_t global_pointer_scores_backward(const GPArgs& a, DType dtype, cudaStream_t stream) {
  return launch_backward<false>(a, dtype, stream);
}

cudaError_t global_pointer_loss_forward(const GPArgs& a, DType dtype, cudaStream_t stream) {
  const GPGeometry& g = a.geom;
  if (g.B * g.H * g.L == 0) return cudaSuccess;
  cudaError_t err = cudaErrorInvalidValue;
  dispatch_float_types(dtype, [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc_t = acc_of<scalar_t>;
    const auto w = workspace_of<acc_t>(g, a.workspace);
    const int64_t tiles = (g.L + Tile<acc_t>::T - 1) / Tile<acc_t>::T;
    const int64_t rows = g.B * g.H;
    if (!grid_fits(rows * tiles)) {
      err = cudaErrorInvalidConfiguration;
      return;
    }
    if ((err = rotate_inputs<scalar_t>(a, w, stream)) != cudaSuccess) return;
    loss_forward_kernel<scalar_t><<<unsigned(rows * tiles), kThreads, 0, stream>>>(a, w.rq, w.rk,
                                                                                  w.partials);
    if ((err = cudaGetLastError()) != cudaSuccess) return;
    loss_finish_kernel<scalar_t><<<unsigned((rows + kThreads - 1) / kThreads), kThreads, 0,
                                   stream>>>(rows, tiles, w.partials,
                                             static_cast<scalar_t*>(a.out));
    err = cudaGetLastError();
  });
  return err;
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
