// CUDA causal linear attention: chunked, with the state kept in shared memory.
//
// Every pass is one causal product (maths: csrc/common/linear_attention.h), walked in
// step order p = 0..T-1 (time p, or T-1-p for the reverse sweeps) in chunks of kChunk
// steps; r, s are positions inside the chunk and n its length:
//
//   out_p = alpha sum_{s <= r} gamma^(r-s) (a_r . b_s) c_s  +  beta gamma^(r+off) a_r^T X
//   X    <- gamma^n X + kappa sum_s gamma^(n-1-s) b_s c_s^T        (after each chunk)
//
// which is consistent across chunk boundaries when beta kappa gamma^(off-1) = alpha.
//
//   pass      order    a       b       c       X_0        alpha  beta   off  kappa
//   forward   forward  phi(q)  phi(k)  [v, 1]  S'_0       scale  scale  1    1
//   dq        forward  G       [v, 1]  phi(k)  S'_0^T     scale  scale  1    1
//   dv        reverse  phi(k)  phi(q)  G       dS'_T      scale  1      0    scale gamma
//   dk        reverse  [v, 1]  G       phi(q)  dS'_T^T    scale  1      0    scale gamma
//
// The forward's final X is S'_T, the dv pass's is dS'_0; G = [do / den, -(do . o) / den]
// (or [do, 0]) is formed first by a row kernel. dq and dk leave the pass multiplied by
// phi'(q), phi'(k).
//
// A block owns one (batch, head) and a tile of kCols columns of c, and keeps its
// [Da, kCols (+1)] slice of X in shared memory for the whole sequence. With packed
// sequences (cu_seqlens) a block owns one (sequence, head) instead and walks that
// sequence's stretch of the row, its state X its own: the offsets are read on the
// device, validated by a small kernel first, and invalid ones make every output NaN
// (seqlens.cuh). The forward pass
// also carries c's ones column (the normaliser z) in every block, so each block can
// normalise its own columns. A T = 1 forward (decoding with a carried state) takes a
// separate kernel that streams the state through registers.
//
// Precision. float32, float64 and bfloat16 run every product on CUDA cores in the
// accumulation type (float; double for float64). float16 runs the two intra-chunk
// products on tensor cores (nvcuda::wmma, 16x16x16 tiles, float accumulators):
//
//   S = A B^T   [kChunk, kChunk], K = Da   A, B rounded to the input type
//   P = alpha gamma^(r-s) S_rs (s <= r)     in float, then rounded to the input type
//   P C         [kChunk, kCols],  K = kChunk C rounded to the input type
//
// Every row of A, B, C and P is scaled by a power of two (its largest magnitude into
// [1/2, 1)) before it is rounded and unscaled after the product, in float: exact, and
// it keeps float16's narrow range from overflowing or flushing the operands (features
// near 0, G = do / den, dot products over Da) where the float path would not. The
// state products (a_r^T X, the X update) and the normaliser's column (c's
// ones column, from the float P) stay on CUDA cores in float with float A, B, C, so the
// carried state is exact in float. The wmma operands live in shared memory padded to
// multiples of 16 (Da to Dpad, zeros in the padding and in the rows past the sequence
// end), with leading dimensions that are multiples of 8 (16-bit) or 4 (float) and every
// tile 32-byte aligned; a warp loads and stores its fragments through those, never
// through the fragment's element layout. When row f of a chunk's C holds a NaN or an
// infinity, the tile product would carry 0 * NaN into the outputs before f: Ch rows
// from f on are zeroed for it (rows before f then come out bit for bit as without the
// bad value), and rows from f on take P C on CUDA cores from the float P (Pf), s <= r
// only. So the op is causal on every path: a non-finite input at step t changes no
// output before t.
#include <mma.h>

#include <climits>
#include <initializer_list>
#include <type_traits>

#include "dtype.cuh"
#include "linear_attention.h"
#include "seqlens.cuh"

namespace seqfuse::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kCols = 32;  // columns of c per block; a warp's lanes

// Steps per chunk: 32 in float, 16 in double (shared memory).
template <typename acc_t>
__host__ __device__ constexpr int chunk_of() {
  return sizeof(acc_t) == 4 ? 32 : 16;
}

// float16 inputs take the intra-chunk products on tensor cores (wmma). bfloat16 does
// not: its 8-bit significand, rounded once more in S and P, cost dq and dk up to 6e-2
// relative error (differences of nearly equal terms), so it runs the float path and
// is only rounded on the way in and out.
template <typename scalar_t>
constexpr bool kTensorCores = std::is_same_v<scalar_t, __half>;
constexpr int kTile = 16;  // wmma M = N = K

template <typename T>
__device__ __forceinline__ T apply_feature(FeatureMap f, T x) {
  switch (f) {
    case FeatureMap::Elu1: return feature<FeatureMap::Elu1>(x);
    case FeatureMap::Relu: return feature<FeatureMap::Relu>(x);
    default: return x;
  }
}

template <typename T>
__device__ __forceinline__ T apply_feature_grad(FeatureMap f, T x) {
  switch (f) {
    case FeatureMap::Elu1: return feature_grad<FeatureMap::Elu1>(x);
    case FeatureMap::Relu: return feature_grad<FeatureMap::Relu>(x);
    default: return T(1);
  }
}

// gamma of head h: 1 without decay; NaN when outside (0, 1], so that a bad factor
// shows in every output of its head instead of costing a host synchronisation per
// call to check.
template <typename acc_t>
__device__ __forceinline__ acc_t head_decay(const acc_t* decay, int64_t h) {
  if (!decay) return acc_t(1);
  const acc_t gamma = decay[h];
  return gamma > acc_t(0) && gamma <= acc_t(1) ? gamma : acc_t(NAN);
}

// A state S' = [S, z] ([Dk, Dv+1] per (b, h)) kept as its two tensors S [B*H, Dk, Dv]
// and z [B*H, Dk]; a pass sees it as X = S' or, `transposed`, X = S'^T. Null halves
// read as zeros (and are not written).
template <typename Ptr>
struct StateView {
  Ptr S, z;
  bool transposed;

  // The element of S' behind X[i][j] of head bh, or null.
  __device__ __forceinline__ Ptr at(const LinearAttentionGeometry& g, int64_t bh, int64_t i,
                                    int64_t j) const {
    const int64_t d = transposed ? j : i, c = transposed ? i : j;
    if (c < g.Dv) return S ? S + (bh * g.Dk + d) * g.Dv + c : nullptr;
    return z ? z + bh * g.Dk + d : nullptr;
  }
};

enum class Source : int { Feature, Values, Dense };

// One operand of a pass, read as rows of `width` numbers per (b, h, t):
// Feature: phi(x) of [B, T, H, width]; Values: [v, 1] of v [B, T, H, width - 1];
// Dense: acc [B, H, T, width].
template <typename scalar_t>
struct Operand {
  using acc_t = acc_of<scalar_t>;
  Source kind;
  const scalar_t* x;
  const acc_t* dense;
  int64_t width;

  __device__ __forceinline__ acc_t load(const LinearAttentionGeometry& g, FeatureMap f, int64_t b, int64_t h,
                        int64_t t, int64_t col) const {
    switch (kind) {
      case Source::Feature:
        return apply_feature(f, to_acc(x[((b * g.T + t) * g.H + h) * width + col]));
      case Source::Values:
        return col < width - 1 ? to_acc(x[((b * g.T + t) * g.H + h) * (width - 1) + col])
                               : acc_t(1);
      default:
        return dense[((b * g.H + h) * g.T + t) * width + col];
    }
  }
};

enum class Epilogue : int { Normalize, FeatureGrad, Plain };

template <typename scalar_t>
struct Pass {
  using acc_t = acc_of<scalar_t>;
  LinearAttentionGeometry geom;
  FeatureMap feature_map;
  Operand<scalar_t> a, b, c;
  int64_t Da, Dc;     // width of a and b; columns of c tiled across blocks
  bool ones_column;   // also carry c's column Dc (the forward's ones column)
  bool reverse;
  int off;
  acc_t alpha, beta, kappa;  // kappa is multiplied by gamma when off == 0
  const acc_t* decay;
  StateView<const acc_t*> x0;  // X_0 (zeros where null)
  StateView<acc_t*> x_out;     // the final X (not written where null)
  Epilogue epilogue;
  int64_t out_cols;   // columns of the output written
  scalar_t* out;      // [B, T, H, out_cols]
  const scalar_t* fx; // FeatureGrad: the input whose phi' multiplies the output
  acc_t* den;         // Normalize: acc [B, H, T], written by the first column tile
  bool normalize;
  acc_t eps;

  // The time of step p0 + r of a sequence.
  __device__ __forceinline__ int64_t time_at(const LinearAttentionGeometry::Span& sp,
                                             int64_t p0, int r) const {
    return sp.start + (reverse ? sp.length - 1 - (p0 + r) : p0 + r);
  }
  // Column j of the tile starting at c0: c0 + j, or the ones column for j == kCols;
  // -1 where there is none.
  __device__ __forceinline__ int64_t column(int64_t c0, int j) const {
    if (j < kCols) return c0 + j < Dc ? c0 + j : -1;
    return ones_column ? Dc : -1;
  }
};

// sum_{s <= r} P_rs c_s[j], from the shared-memory tiles (CUDA cores).
template <typename acc_t, int ldp, int ldc>
__device__ __forceinline__ acc_t intra_product(const acc_t* P, const acc_t* C, int r, int j) {
  acc_t intra = 0;
  for (int s = 0; s <= r; ++s) intra += P[r * ldp + s] * C[s * ldc + j];
  return intra;
}

// a_r^T X[:, j], from the shared-memory tiles (CUDA cores).
template <typename acc_t, int kDa, int ldc>
__device__ __forceinline__ acc_t state_product(const acc_t* A, const acc_t* X, int r, int j,
                                               int Da, int lda) {
  acc_t inter = 0;
#pragma unroll 8
  for (int i = 0; i < (kDa ? kDa : Da); ++i) inter += A[r * lda + i] * X[i * ldc + j];
  return inter;
}

// The exponent e with m = f 2^e, f in [1/2, 1); 0 for zero, inf or NaN (left as they are).
// An all-zero row (padding, or do = 0 at padded steps) gets an exponent far below any
// real one, so that it never sets the scale of a row of P (whose exponent is the
// largest over the rows of C it meets) and flushes the real entries; a zero row scaled
// by any power of two is still zero.
constexpr int kZeroRowExponent = -1000;

__device__ __forceinline__ int row_exponent(float m) {
  int e = 0;
  if (m == 0.0f) return kZeroRowExponent;
  if (isfinite(m)) frexpf(m, &e);
  return e;
}

__host__ __device__ constexpr int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// Shared-memory layout of one block. The CUDA-core tiles A, B, C, P, X, gpow and the
// normaliser scratch come first, offsets in acc_t elements; their row strides are odd
// so that lanes walking different rows hit different banks. The 16-bit path has no
// float P (it masks S in F into Ph and sums the ones column as it goes) and appends its
// wmma tiles, offsets in bytes, each 32-byte aligned (with 16-row tiles, strides that
// are multiples of 8 elements (16-bit) or 4 (float) keep every 16x16 tile inside them
// 32-byte aligned too): F, a float [chunk, ldf] tile that holds S = A B^T and then P C;
// A and B in the input type, [chunk, ldh] with Da padded to Dpad; C and P in the input
// type, [chunk, ldch] and [chunk, ldph] (Ph over Ah and Bh, which are dead by then);
// then the rows' power-of-two exponents. The
// +8 / +4 on the strides shift each row by 16 bytes so that the 8 rows of a fragment
// load fall in different banks.
struct Smem {
  static constexpr int ldf = kCols + 4, ldch = kCols + 8;
  int64_t lda, ldp, a, b, c, p, x, gpow, extra;      // acc_t elements
  int64_t Dpad, ldh, ldph, f, ah, bh, ch, ph, ex, pf, bytes;  // bytes (f .. pf, bytes)
  __host__ __device__ Smem(int64_t Da, int chunk, int acc_size, bool tensor) {
    lda = Da % 2 == 0 ? Da + 1 : Da;
    ldp = chunk + 1;
    a = 0;
    b = a + chunk * lda;
    c = b + chunk * lda;
    p = c + chunk * (kCols + 1);
    x = p + (tensor ? 0 : chunk * ldp);  // the 16-bit path keeps P in F and Ph
    gpow = x + Da * (kCols + 1);
    extra = gpow + chunk + 1;
    bytes = (extra + 2 * chunk) * acc_size;
    Dpad = round_up(Da, kTile);
    ldh = Dpad + 8;
    ldph = chunk + 8;
    f = ah = bh = ch = ph = ex = pf = bytes;
    if (tensor) {  // acc_t is float; the operands are 2 bytes
      f = round_up(bytes, 32);
      ah = round_up(f + chunk * ldf * 4, 32);
      bh = ah + chunk * ldh * 2;
      ch = bh + chunk * ldh * 2;
      ph = ah;  // Ah and Bh are dead once S is formed; Ph (<= their size) reuses them
      ex = ch + chunk * ldch * 2;
      // int exponents of the rows of A, B, C and Ph, and C's first non-finite row; then
      // the float P of the rows from there on
      pf = round_up(ex + (4 * chunk + 1) * 4, 16);
      bytes = pf + chunk * ldf * 4;
    }
  }
};
static_assert(Smem::ldf % 4 == 0 && Smem::ldch % 8 == 0 && kCols % kTile == 0,
              "wmma: float strides a multiple of 4, 16-bit ones of 8, whole column tiles");

// kDa: a compile-time width of a and b (0: read it from the pass). Shared memory allows
// about two blocks per SM at the common head dims; saying so lets ptxas use up to 128
// registers instead of spilling under its default target.
template <typename scalar_t, int kDa>
__global__ void __launch_bounds__(kThreads, 2) chunk_kernel(Pass<scalar_t> ps, unsigned tiles) {
  using acc_t = acc_of<scalar_t>;
  constexpr bool kTensor = kTensorCores<scalar_t>;
  constexpr int kChunk = chunk_of<acc_t>();
  constexpr int kRows = kChunk / kWarps;  // output rows per thread
  // wmma tiles: row tiles of the chunk, column tiles of c; warps from kPcWarps on are
  // free while P C runs and take the normaliser's column meanwhile.
  constexpr int kRowTiles = kChunk / kTile, kColTiles = kCols / kTile;
  constexpr int kPcWarps = kTensor ? kRowTiles * kColTiles : 0;
  static_assert(!kTensor || (kChunk % kTile == 0 && (kWarps - kPcWarps) * 32 >= kChunk),
                "the 16-bit path needs whole 16-step tiles and spare warps for the ones column");
  static_assert(kChunk + 8 <= 2 * (kTile + 8), "Ph fits in Ah and Bh for every Da (ldh >= 24)");
  // acc_t may be double; the wmma tiles want 32 bytes
  SEQFUSE_DYNAMIC_SHARED(unsigned char, smem_raw, 128);
  acc_t* smem = reinterpret_cast<acc_t*>(smem_raw);

  const LinearAttentionGeometry& g = ps.geom;
  const int Da = kDa ? kDa : int(ps.Da);  // <= 257: shared-memory indices fit in int
  const Smem L(Da, kChunk, int(sizeof(acc_t)), kTensor);
  // P: the float path only (the 16-bit path has no such region: P aliases X there).
  acc_t *A = smem + L.a, *Bs = smem + L.b, *C = smem + L.c, *P = smem + L.p, *X = smem + L.x;
  acc_t *gpow = smem + L.gpow, *den = smem + L.extra, *inv_den = den + kChunk;
  constexpr int ldc = kCols + 1, ldp = kChunk + 1;
  // 16-bit path only (unused otherwise): F holds S, then P C; Ah, Bh, Ch, Ph are the
  // tensor-core operands.
  acc_t* F = reinterpret_cast<acc_t*>(smem_raw + L.f);
  scalar_t *Ah = reinterpret_cast<scalar_t*>(smem_raw + L.ah);
  scalar_t *Bh = reinterpret_cast<scalar_t*>(smem_raw + L.bh);
  scalar_t *Ch = reinterpret_cast<scalar_t*>(smem_raw + L.ch);
  scalar_t *Ph = reinterpret_cast<scalar_t*>(smem_raw + L.ph);
  int* ex = reinterpret_cast<int*>(smem_raw + L.ex);  // row exponents ea, eb, ec, ep
  int* first_bad = ex + 4 * kChunk;  // the chunk's first row of C with a NaN or inf
  acc_t* Pf = reinterpret_cast<acc_t*>(smem_raw + L.pf);  // float P from that row on
  const int ldh = int(L.ldh), ldph = int(L.ldph);
  constexpr int ldf = Smem::ldf, ldch = Smem::ldch;

  // 32-bit index arithmetic: launches have fewer than 2^31 blocks. bh: the state's
  // (sequence, head); bi: the tensors' row.
  const unsigned bh32 = blockIdx.x / tiles, heads = unsigned(g.H);
  const int64_t bh = bh32, c0 = int64_t(blockIdx.x % tiles) * kCols;
  const int64_t h = bh32 % heads;
  const LinearAttentionGeometry::Span sp = g.span(bh32 / heads);
  const int64_t bi = sp.row;
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const acc_t gamma = head_decay(ps.decay, h);
  const acc_t kappa = ps.off == 0 ? ps.kappa * gamma : ps.kappa;

  if (tid == 0) {
    acc_t x = 1;
    for (int i = 0; i <= kChunk; ++i, x *= gamma) gpow[i] = x;
  }
  for (int idx = tid; idx < Da * ldc; idx += kThreads) {
    const int64_t i = idx / ldc, col = ps.column(c0, idx % ldc);
    const acc_t* x0 = col >= 0 ? ps.x0.at(g, bh, i, col) : nullptr;
    X[idx] = x0 ? *x0 : acc_t(0);
  }

  for (int64_t p0 = 0; p0 < sp.length; p0 += kChunk) {
    const int n = sp.length - p0 < kChunk ? int(sp.length - p0) : kChunk;
    __syncthreads();  // the previous chunk is done with A, B, C
    if (kTensor && tid == 0) *first_bad = kChunk;

    for (int idx = tid; idx < kChunk * Da; idx += kThreads) {
      const int r = idx / Da, i = idx % Da;
      const bool live = r < n;
      const int64_t t = ps.time_at(sp, p0, r);
      A[r * L.lda + i] = live ? ps.a.load(g, ps.feature_map, bi, h, t, i) : acc_t(0);
      Bs[r * L.lda + i] = live ? ps.b.load(g, ps.feature_map, bi, h, t, i) : acc_t(0);
    }
    for (int idx = tid; idx < kChunk * ldc; idx += kThreads) {
      const int r = idx / ldc;
      const int64_t col = ps.column(c0, idx % ldc);
      C[idx] = r < n && col >= 0
                   ? ps.c.load(g, ps.feature_map, bi, h, ps.time_at(sp, p0, r), col)
                   : acc_t(0);
    }
    __syncthreads();

    if constexpr (kTensor) {
      namespace wmma = nvcuda::wmma;
      // The operands in the input type, each row scaled by a power of two that brings
      // its largest magnitude into [1/2, 1): exact, and it keeps float16 clear of
      // overflow and underflow whatever the range of the features or of G. A warp per
      // row; rows 0..kChunk-1 of A, then of B, then of C; padding (Da..Dpad-1) zeros.
      for (int job = warp; job < 3 * kChunk; job += kWarps) {
        const int which = job / kChunk, r = job % kChunk;
        const acc_t* src = which == 0 ? A + r * L.lda : which == 1 ? Bs + r * L.lda : C + r * ldc;
        scalar_t* dst = which == 0 ? Ah + r * ldh : which == 1 ? Bh + r * ldh : Ch + r * ldch;
        const int width = which == 2 ? kCols : Da, padded = which == 2 ? kCols : int(L.Dpad);
        acc_t m = 0;
        bool finite = true;
        for (int i = lane; i < width; i += 32) {
          m = fmaxf(m, fabsf(src[i]));
          finite &= isfinite(src[i]);
        }
        for (int offset = 16; offset > 0; offset /= 2)
          m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, offset));
        const bool all_finite = __all_sync(0xffffffffu, finite);
        if (!all_finite && which == 2 && lane == 0) atomicMin(first_bad, r);
        const int e = row_exponent(m);
        for (int i = lane; i < padded; i += 32)
          dst[i] = from_acc<scalar_t>(i < width ? ldexpf(src[i], -e) : 0.0f);
        if (lane == 0) ex[job] = e;
      }
      __syncthreads();

      // S = A B^T on tensor cores, one 16x16 tile per warp; tiles above the diagonal
      // are masked away whole and skipped (a warp-uniform branch).
      for (int tile = warp; tile < kRowTiles * kRowTiles; tile += kWarps) {
        const int mt = tile / kRowTiles, nt = tile % kRowTiles;
        if (nt > mt) continue;
        wmma::fragment<wmma::accumulator, kTile, kTile, kTile, float> acc;
        wmma::fragment<wmma::matrix_a, kTile, kTile, kTile, scalar_t, wmma::row_major> fa;
        wmma::fragment<wmma::matrix_b, kTile, kTile, kTile, scalar_t, wmma::col_major> fb;
        wmma::fill_fragment(acc, 0.0f);
        // Not unrolled: at Da = 64 the unrolled fragment loads push ptxas past 128
        // registers into spills.
#pragma unroll 1
        for (int k = 0; k < int(L.Dpad); k += kTile) {
          wmma::load_matrix_sync(fa, Ah + mt * kTile * ldh + k, ldh);  // A[r][i], row-major
          wmma::load_matrix_sync(fb, Bh + nt * kTile * ldh + k, ldh);  // B^T[i][s] = B[s][i]
          wmma::mma_sync(acc, fa, fb, acc);
        }
        wmma::store_matrix_sync(F + mt * kTile * ldf + nt * kTile, acc, ldf, wmma::mem_row_major);
      }
      __syncthreads();

      // P_rs = alpha gamma^(r-s) S_rs for s <= r in float (S unscaled from the tile:
      // F_rs 2^(ea_r + eb_s)). P C is taken as 2^(ep_r) Ph Ch with Ch_sj = c_sj 2^(-ec_s)
      // from above and Ph_rs = P_rs 2^(ec_s - ep_r) rounded, ep_r chosen so that row r
      // of Ph has its largest magnitude in [1/2, 1) (all in exponents: no overflow in
      // between). A warp per row (lane = s) also sums the normaliser's intra part
      // sum_s P_rs c_s[kCols] from the float P, parked in den[r] for the ones column.
      static_assert(kChunk == 32, "the 16-bit path masks a row of P per warp");
      const int *ea = ex, *eb = ex + kChunk, *ec = ex + 2 * kChunk;
      int* ep = ex + 3 * kChunk;
      for (int r = warp; r < kChunk; r += kWarps) {
        const int s = lane;
        const acc_t pv = s <= r && r < n
                             ? ps.alpha * gpow[r - s] * ldexpf(F[r * ldf + s], ea[r] + eb[s])
                             : acc_t(0);
        int e_pv = 0;
        const acc_t frac = frexpf(pv, &e_pv);  // pv = frac 2^e_pv, |frac| in [1/2, 1)
        const bool normal = pv != acc_t(0) && isfinite(pv);
        int e_row = normal ? e_pv + ec[s] : INT_MIN;
        for (int offset = 16; offset > 0; offset /= 2)
          e_row = max(e_row, __shfl_xor_sync(0xffffffffu, e_row, offset));
        if (e_row == INT_MIN) e_row = 0;  // a row of zeros (or of NaN / inf: kept as is)
        Ph[r * ldph + s] = from_acc<scalar_t>(normal ? ldexpf(frac, e_pv + ec[s] - e_row) : pv);
        if (lane == 0) ep[r] = e_row;
        if (r >= *first_bad) {
          Pf[r * ldf + s] = pv;
          for (int i = lane; i < kCols; i += 32) Ch[r * ldch + i] = from_acc<scalar_t>(0.0f);
        }
        if (ps.ones_column) {
          acc_t z = pv * C[s * ldc + kCols];
          for (int offset = 16; offset > 0; offset /= 2) z += __shfl_xor_sync(0xffffffffu, z, offset);
          if (lane == 0) den[r] = z;
        }
      }
      __syncthreads();

      // P C on tensor cores into F (S is dead); K runs to the diagonal tile only.
      for (int tile = warp; tile < kPcWarps; tile += kWarps) {
        const int mt = tile / kColTiles, nt = tile % kColTiles;
        wmma::fragment<wmma::accumulator, kTile, kTile, kTile, float> acc;
        wmma::fragment<wmma::matrix_a, kTile, kTile, kTile, scalar_t, wmma::row_major> fa;
        wmma::fragment<wmma::matrix_b, kTile, kTile, kTile, scalar_t, wmma::row_major> fb;
        wmma::fill_fragment(acc, 0.0f);
        for (int kt = 0; kt <= mt; ++kt) {
          wmma::load_matrix_sync(fa, Ph + mt * kTile * ldph + kt * kTile, ldph);
          wmma::load_matrix_sync(fb, Ch + kt * kTile * ldch + nt * kTile, ldch);
          wmma::mma_sync(acc, fa, fb, acc);
        }
        wmma::store_matrix_sync(F + mt * kTile * ldf + nt * kTile, acc, ldf, wmma::mem_row_major);
      }
    } else {
      // P_rs = alpha gamma^(r-s) (a_r . b_s) for s <= r
      for (int idx = tid; idx < kChunk * kChunk; idx += kThreads) {
        const int r = idx / kChunk, s = idx % kChunk;
        acc_t dot = 0;
        if (s <= r && r < n) {
#pragma unroll 8
          for (int i = 0; i < Da; ++i) dot += A[r * L.lda + i] * Bs[s * L.lda + i];
        }
        P[r * ldp + s] = ps.alpha * gpow[r - s > 0 ? r - s : 0] * dot;
      }
      __syncthreads();
    }

    // out_r = sum_s P_rs c_s + beta gamma^(r+off) a_r^T X; lane = column.
    // The ones column first (CUDA cores, float P), so that every thread can normalise
    // its outputs; on the 16-bit path by the warps that P C leaves free.
    if (ps.ones_column && tid >= kPcWarps * 32 && tid < kPcWarps * 32 + kChunk) {
      const int r = tid - kPcWarps * 32;
      acc_t intra;
      if constexpr (kTensor) {
        intra = den[r];
      } else {
        intra = intra_product<acc_t, ldp, ldc>(P, C, r, kCols);
      }
      const acc_t d = intra + ps.beta * gpow[r + ps.off] *
                          state_product<acc_t, kDa, ldc>(A, X, r, kCols, Da, int(L.lda)) +
                      ps.eps;
      den[r] = d;
      inv_den[r] = ps.normalize ? acc_t(1) / d : acc_t(1);
    }
    __syncthreads();
    acc_t val[kRows];
#pragma unroll
    for (int i = 0; i < kRows; ++i) {
      const int r = warp + kWarps * i;
      acc_t intra;
      if constexpr (kTensor) {
        // 2^(ep_r) (Ph Ch)_rj, or from C's first non-finite row on the float Pf C
        intra = r >= *first_bad ? intra_product<acc_t, ldf, ldc>(Pf, C, r, lane)
                                : ldexpf(F[r * ldf + lane], ex[3 * kChunk + r]);
      } else {
        intra = intra_product<acc_t, ldp, ldc>(P, C, r, lane);
      }
      val[i] = intra + ps.beta * gpow[r + ps.off] *
                           state_product<acc_t, kDa, ldc>(A, X, r, lane, Da, int(L.lda));
    }

    const int64_t col = c0 + lane;
#pragma unroll
    for (int i = 0; i < kRows; ++i) {
      const int r = warp + kWarps * i;
      if (r >= n || col >= ps.out_cols) continue;
      const int64_t t = ps.time_at(sp, p0, r);
      const int64_t o = ((bi * g.T + t) * g.H + h) * ps.out_cols + col;
      acc_t y = val[i];
      if (ps.epilogue == Epilogue::Normalize) {
        y *= inv_den[r];
      } else if (ps.epilogue == Epilogue::FeatureGrad) {
        y *= apply_feature_grad(ps.feature_map, to_acc(ps.fx[o]));
      }
      ps.out[o] = from_acc<scalar_t>(y);
    }
    if (ps.epilogue == Epilogue::Normalize && c0 == 0 && tid < n) {
      ps.den[(bi * g.H + h) * g.T + ps.time_at(sp, p0, tid)] = den[tid];
    }
    __syncthreads();  // every product has read X

    // X <- gamma^n X + kappa sum_s gamma^(n-1-s) b_s c_s^T
    for (int idx = tid; idx < Da * ldc; idx += kThreads) {
      const int i = idx / ldc, j = idx % ldc;
      acc_t sum = 0;
      for (int s = 0; s < n; ++s) sum += gpow[n - 1 - s] * Bs[s * L.lda + i] * C[s * ldc + j];
      X[idx] = gpow[n] * X[idx] + kappa * sum;
    }
  }

  // Every column tile carries the ones column; the first one stores it, so no two
  // blocks write the same element. No barrier: the loops that start, update and store
  // X split it over the threads alike, so each thread stores what it wrote itself.
  if (ps.x_out.S || ps.x_out.z) {
    for (int idx = tid; idx < Da * ldc; idx += kThreads) {
      const int j = idx % ldc;
      const int64_t i = idx / ldc, col = ps.column(c0, j);
      acc_t* out = col >= 0 && (j < kCols || c0 == 0) ? ps.x_out.at(g, bh, i, col) : nullptr;
      if (out) *out = X[idx];
    }
  }
}

// One decoding step (T = 1) of the forward pass: S' <- gamma S' + phi(k) [v, 1]^T,
// o = scale phi(q)^T S' (/ den). A block owns one (b, h) and kCols columns (plus the
// ones column); lane = column, warps split the Dk rows, so the state is read and
// written once, coalesced, and never staged in shared memory. S and z are read and
// written as the caller's two tensors: the step is this one launch and nothing else.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) decode_kernel(LinearAttentionArgs args, unsigned tiles) {
  using acc_t = acc_of<scalar_t>;
  SEQFUSE_SHARED(acc_t, partial, [kWarps][kCols + 1]);
  const LinearAttentionGeometry& g = args.geom;
  const unsigned bh32 = blockIdx.x / tiles;
  const int64_t bh = bh32, c0 = int64_t(blockIdx.x % tiles) * kCols;
  const int64_t h = bh32 % unsigned(g.H);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const auto* q = static_cast<const scalar_t*>(args.q) + bh * g.Dk;  // T = 1: row (b, 0, h)
  const auto* k = static_cast<const scalar_t*>(args.k) + bh * g.Dk;
  const auto* v = static_cast<const scalar_t*>(args.v) + bh * g.Dv;
  const auto* S_in = static_cast<const acc_t*>(args.S_in);
  const auto* z_in = static_cast<const acc_t*>(args.z_in);
  auto* S_out = static_cast<acc_t*>(args.S_out) + bh * g.Dk * g.Dv;
  auto* z_out = static_cast<acc_t*>(args.z_out) + bh * g.Dk;
  const acc_t gamma = head_decay(static_cast<const acc_t*>(args.decay), h);

  // Columns lane (c0 + lane) and, for lane 0, the ones column (z).
  const int64_t col = c0 + lane;
  const bool live = col < g.Dv;
  const acc_t v_col = live ? to_acc(v[col]) : acc_t(0);
  acc_t acc_v = 0, acc_z = 0;
  for (int64_t i = warp; i < g.Dk; i += kWarps) {
    const acc_t qf = apply_feature(args.feature_map, to_acc(q[i]));
    const acc_t kf = apply_feature(args.feature_map, to_acc(k[i]));
    const int64_t row = bh * g.Dk + i;
    if (live) {
      const acc_t s = gamma * (S_in ? S_in[row * g.Dv + col] : acc_t(0)) + kf * v_col;
      S_out[i * g.Dv + col] = s;
      acc_v += qf * s;
    }
    if (lane == 0) {
      const acc_t z = gamma * (z_in ? z_in[row] : acc_t(0)) + kf;
      if (c0 == 0) z_out[i] = z;
      acc_z += qf * z;
    }
  }
  partial[warp][lane] = acc_v;
  if (lane == 0) partial[warp][kCols] = acc_z;
  __syncthreads();
  if (warp == 0) {
    acc_t num = 0, z = 0;
    for (int w = 0; w < kWarps; ++w) {
      num += partial[w][lane];
      z += partial[w][kCols];
    }
    const acc_t scale = acc_t(args.scale);
    const acc_t den = scale * z + acc_t(args.eps);
    if (live) {
      const acc_t y = args.normalize ? scale * num / den : scale * num;
      static_cast<scalar_t*>(args.o)[bh * g.Dv + col] = from_acc<scalar_t>(y);
    }
    if (c0 == 0 && lane == 0) static_cast<acc_t*>(args.den)[bh] = den;
  }
}

// G = [do / den, -(do . o) / den] (normalize) or [do, 0], one warp per (b, t, h) row,
// written as acc [B, H, T, Dv + 1].
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) output_grad_kernel(LinearAttentionArgs args) {
  using acc_t = acc_of<scalar_t>;
  const LinearAttentionGeometry& g = args.geom;
  const int64_t row = int64_t(blockIdx.x) * kWarps + threadIdx.x / 32;  // (b, t, h)
  if (row >= g.B * g.T * g.H) return;
  const int lane = threadIdx.x % 32;
  const int64_t h = row % g.H, t = row / g.H % g.T, b = row / (g.H * g.T);
  const int64_t bht = (b * g.H + h) * g.T + t;
  const auto* go = static_cast<const scalar_t*>(args.grad_o) + row * g.Dv;
  const auto* o = static_cast<const scalar_t*>(args.o) + row * g.Dv;
  auto* G = static_cast<acc_t*>(args.workspace) + bht * (g.Dv + 1);
  const acc_t inv = args.normalize ? acc_t(1) / static_cast<const acc_t*>(args.den)[bht] : acc_t(1);
  acc_t dot = 0;
  for (int64_t c = lane; c < g.Dv; c += 32) {
    const acc_t d = to_acc(go[c]);
    G[c] = d * inv;
    dot += d * to_acc(o[c]);
  }
  for (int offset = 16; offset > 0; offset /= 2) dot += __shfl_xor_sync(0xffffffffu, dot, offset);
  if (lane == 0) G[g.Dv] = args.normalize ? -dot * inv : acc_t(0);
}

template <typename scalar_t>
Operand<scalar_t> feature_operand(const void* x, int64_t width) {
  return {Source::Feature, static_cast<const scalar_t*>(x), nullptr, width};
}
template <typename scalar_t>
Operand<scalar_t> values_operand(const void* v, int64_t Dv) {
  return {Source::Values, static_cast<const scalar_t*>(v), nullptr, Dv + 1};
}
template <typename scalar_t>
Operand<scalar_t> dense_operand(const void* G, int64_t width) {
  return {Source::Dense, nullptr, static_cast<const acc_of<scalar_t>*>(G), width};
}

// A pass with the geometry and decay filled in, reading and writing its state X as
// S' (or, transposed, S'^T) from the given halves.
template <typename scalar_t>
Pass<scalar_t> base_pass(const LinearAttentionArgs& args, bool transposed, const void* S0,
                         const void* z0, void* S_out, void* z_out) {
  using acc_t = acc_of<scalar_t>;
  Pass<scalar_t> ps{};
  ps.geom = args.geom;
  ps.feature_map = args.feature_map;
  ps.decay = static_cast<const acc_t*>(args.decay);
  ps.x0 = {static_cast<const acc_t*>(S0), static_cast<const acc_t*>(z0), transposed};
  ps.x_out = {static_cast<acc_t*>(S_out), static_cast<acc_t*>(z_out), transposed};
  ps.normalize = args.normalize;
  ps.eps = acc_t(args.eps);
  return ps;
}

template <typename scalar_t, int kDa>
cudaError_t launch_pass_with(const Pass<scalar_t>& ps, cudaStream_t stream) {
  using acc_t = acc_of<scalar_t>;
  const int64_t tiles = (ps.Dc + kCols - 1) / kCols;
  const int64_t blocks = ps.geom.sequences() * ps.geom.H * tiles;
  if (blocks == 0) return cudaSuccess;
  if (blocks >= (int64_t(1) << 31)) return cudaErrorInvalidConfiguration;
  const size_t bytes = size_t(
      Smem(ps.Da, chunk_of<acc_t>(), int(sizeof(acc_t)), kTensorCores<scalar_t>).bytes);
  auto kernel = chunk_kernel<scalar_t, kDa>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes));
  if (err != cudaSuccess) return err;
  SEQFUSE_LAUNCH(unsigned(blocks), kThreads, bytes, stream, kernel)(ps, unsigned(tiles));
  return cudaGetLastError();
}

// Head dims 64 and 128 get their dot products unrolled at compile time: Da = D for the
// forward and dv passes, D + 1 (the rows [v, 1] and G) for the dq and dk passes.
template <typename scalar_t>
cudaError_t launch_pass(const Pass<scalar_t>& ps, cudaStream_t stream) {
  switch (ps.Da) {
    case 64: return launch_pass_with<scalar_t, 64>(ps, stream);
    case 65: return launch_pass_with<scalar_t, 65>(ps, stream);
    case 128: return launch_pass_with<scalar_t, 128>(ps, stream);
    case 129: return launch_pass_with<scalar_t, 129>(ps, stream);
    default: return launch_pass_with<scalar_t, 0>(ps, stream);
  }
}

// Packed sequences with invalid offsets: NaN into each output, every element (the
// kernels walk the stretches the offsets describe, which need not cover the row).
struct Output {
  void* data;
  int64_t numel;
  bool acc;  // in the accumulation type (else the element type)
};

template <typename T>
T quiet_nan() {
  if constexpr (std::is_same_v<T, __half>) {
    return __float2half_rn(NAN);
  } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __float2bfloat16_rn(NAN);
  } else {
    return T(NAN);
  }
}

template <typename scalar_t>
cudaError_t poison_if_invalid(const LinearAttentionArgs& args,
                              std::initializer_list<Output> outputs, cudaStream_t stream) {
  using acc_t = acc_of<scalar_t>;
  for (const Output& out : outputs) {
    const cudaError_t err =
        out.acc ? fill_if_invalid(static_cast<acc_t*>(out.data), out.numel, quiet_nan<acc_t>(),
                                  args.invalid, stream)
                : fill_if_invalid(static_cast<scalar_t*>(out.data), out.numel,
                                  quiet_nan<scalar_t>(), args.invalid, stream);
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

template <typename scalar_t>
cudaError_t forward(const LinearAttentionArgs& args, cudaStream_t stream) {
  using acc_t = acc_of<scalar_t>;
  const LinearAttentionGeometry& g = args.geom;
  if (g.cu_seqlens) {
    const cudaError_t err = validate_offsets(g.cu_seqlens, g.N, g.T, args.invalid, stream);
    if (err != cudaSuccess) return err;
  } else if (g.T == 1) {
    const int64_t tiles = (g.Dv + kCols - 1) / kCols, blocks = g.B * g.H * tiles;
    if (blocks == 0) return cudaSuccess;
    if (blocks >= (int64_t(1) << 31)) return cudaErrorInvalidConfiguration;
    SEQFUSE_LAUNCH(unsigned(blocks), kThreads, 0, stream, decode_kernel<scalar_t>)(args, unsigned(tiles));
    return cudaGetLastError();
  }
  Pass<scalar_t> ps = base_pass<scalar_t>(args, false, args.S_in, args.z_in, args.S_out, args.z_out);
  ps.a = feature_operand<scalar_t>(args.q, g.Dk);
  ps.b = feature_operand<scalar_t>(args.k, g.Dk);
  ps.c = values_operand<scalar_t>(args.v, g.Dv);
  ps.Da = g.Dk;
  ps.Dc = g.Dv;
  ps.ones_column = true;
  ps.off = 1;
  ps.alpha = ps.beta = acc_t(args.scale);
  ps.kappa = 1;
  ps.epilogue = Epilogue::Normalize;
  ps.out_cols = g.Dv;
  ps.out = static_cast<scalar_t*>(args.o);
  ps.den = static_cast<acc_t*>(args.den);
  const cudaError_t err = launch_pass(ps, stream);
  if (err != cudaSuccess || !g.cu_seqlens) return err;
  const int64_t S = g.sequences() * g.H;
  return poison_if_invalid<scalar_t>(args, {{args.o, g.B * g.T * g.H * g.Dv, false},
                                  {args.den, g.B * g.H * g.T, true},
                                  {args.S_out, S * g.Dk * g.Dv, true},
                                  {args.z_out, S * g.Dk, true}}, stream);
}

template <typename scalar_t>
cudaError_t backward(const LinearAttentionArgs& args, cudaStream_t stream) {
  using acc_t = acc_of<scalar_t>;
  const LinearAttentionGeometry& g = args.geom;
  if (g.cu_seqlens) {
    const cudaError_t err = validate_offsets(g.cu_seqlens, g.N, g.T, args.invalid, stream);
    if (err != cudaSuccess) return err;
  }
  const int64_t rows = g.B * g.T * g.H;
  if (rows > 0) {
    const int64_t blocks = (rows + kWarps - 1) / kWarps;
    if (blocks >= (int64_t(1) << 31)) return cudaErrorInvalidConfiguration;
    SEQFUSE_LAUNCH(unsigned(blocks), kThreads, 0, stream, output_grad_kernel<scalar_t>)(args);
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  const acc_t scale = acc_t(args.scale);

  Pass<scalar_t> dq = base_pass<scalar_t>(args, true, args.S_in, args.z_in, nullptr, nullptr);
  dq.a = dense_operand<scalar_t>(args.workspace, g.Dv + 1);
  dq.b = values_operand<scalar_t>(args.v, g.Dv);
  dq.c = feature_operand<scalar_t>(args.k, g.Dk);
  dq.Da = g.Dv + 1;
  dq.Dc = g.Dk;
  dq.off = 1;
  dq.alpha = dq.beta = scale;
  dq.kappa = 1;
  dq.epilogue = Epilogue::FeatureGrad;
  dq.out_cols = g.Dk;
  dq.out = static_cast<scalar_t*>(args.dq);
  dq.fx = static_cast<const scalar_t*>(args.q);

  Pass<scalar_t> dv = base_pass<scalar_t>(args, false, args.grad_S, args.grad_z, args.grad_S_in,
                                         args.grad_z_in);
  dv.a = feature_operand<scalar_t>(args.k, g.Dk);
  dv.b = feature_operand<scalar_t>(args.q, g.Dk);
  dv.c = dense_operand<scalar_t>(args.workspace, g.Dv + 1);
  dv.Da = g.Dk;
  dv.Dc = g.Dv + 1;
  dv.reverse = true;
  dv.off = 0;
  dv.alpha = dv.kappa = scale;
  dv.beta = 1;
  dv.epilogue = Epilogue::Plain;
  dv.out_cols = g.Dv;
  dv.out = static_cast<scalar_t*>(args.dv);

  Pass<scalar_t> dk = base_pass<scalar_t>(args, true, args.grad_S, args.grad_z, nullptr, nullptr);
  dk.a = values_operand<scalar_t>(args.v, g.Dv);
  dk.b = dense_operand<scalar_t>(args.workspace, g.Dv + 1);
  dk.c = feature_operand<scalar_t>(args.q, g.Dk);
  dk.Da = g.Dv + 1;
  dk.Dc = g.Dk;
  dk.reverse = true;
  dk.off = 0;
  dk.alpha = dk.kappa = scale;
  dk.beta = 1;
  dk.epilogue = Epilogue::FeatureGrad;
  dk.out_cols = g.Dk;
  dk.out = static_cast<scalar_t*>(args.dk);
  dk.fx = static_cast<const scalar_t*>(args.k);

  for (const Pass<scalar_t>* ps : {&dq, &dv, &dk}) {
    const cudaError_t err = launch_pass(*ps, stream);
    if (err != cudaSuccess) return err;
  }
  if (!g.cu_seqlens) return cudaSuccess;
  const int64_t S = g.sequences() * g.H;
  return poison_if_invalid<scalar_t>(args, {{args.dq, g.B * g.T * g.H * g.Dk, false},
                                  {args.dk, g.B * g.T * g.H * g.Dk, false},
                                  {args.dv, g.B * g.T * g.H * g.Dv, false},
                                  {args.grad_S_in, S * g.Dk * g.Dv, true},
                                  {args.grad_z_in, S * g.Dk, true}}, stream);
}

}  // namespace

size_t linear_attention_workspace_bytes(const LinearAttentionGeometry& geom, DType dtype) {
  const size_t acc = dtype == DType::Float64 ? sizeof(double) : sizeof(float);
  return size_t(geom.B) * geom.H * geom.T * (geom.Dv + 1) * acc;
}

cudaError_t linear_attention_forward(const LinearAttentionArgs& args, DType dtype,
                                     cudaStream_t stream) {
  cudaError_t err = cudaErrorInvalidValue;
  dispatch_float_types(dtype, [&](auto tag) { err = forward<decltype(tag)>(args, stream); });
  return err;
}

cudaError_t linear_attention_backward(const LinearAttentionArgs& args, DType dtype,
                                      cudaStream_t stream) {
  cudaError_t err = cudaErrorInvalidValue;
  dispatch_float_types(dtype, [&](auto tag) { err = backward<decltype(tag)>(args, stream); });
  return err;
}

}  // namespace seqfuse::cuda
