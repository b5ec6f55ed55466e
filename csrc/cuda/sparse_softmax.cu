// CUDA row-wise normalisers (maths: csrc/common/row_softmax.h).
//
// Top-k. Every entry of a row gets a 64-bit composite key
//
//   c_i = order_key(x_i) << 32  |  ~i        (i < 2^31, so ~i fits the low 32 bits)
//
// Higher composites rank first: a higher value, then a lower index (the tie rule of
// docs/sparse_softmax.md). Composites are all distinct, so the selection is a single
// threshold T with
//
//   Omega_k = { i : c_i >= T },   |Omega_k| = k exactly,
//
// found by a radix select (8-bit digits, high to low, stopping as soon as a bin holds
// exactly the entries still wanted; ties in value resolve in the index bits). Every
// pass runs on shared memory; the row is read from HBM once, by one of three paths
// picked per launch from the row length and the device's shared memory:
//
//   warp     V <= kWarpRowMax: one warp per row, kWarpsPerBlock rows per block, the row
//            staged in shared memory in its storage type;
//   staged   V * sizeof(scalar) <= kStageBytesMax: one block per row, staged likewise;
//   filter   longer rows: one block streams the row once and appends every entry whose
//            composite reaches the running threshold to a candidate buffer in shared
//            memory. When the next tile might not fit, the buffer is cut to its own top
//            k by the same radix select and the threshold rises to the k-th composite:
//            nothing below it can enter the top k of the row any more. Rows in
//            ascending order keep every entry and compact often: slower, still exact.
//
// Only when none fits (k too large for the candidate buffer, or k >= V on a row too
// long to stage) does the block read the row from global memory in every pass.
// Then, over the kept entries: m = max and s = sum exp(x - m) (float32, kept apart, see
// KeptLse), and the output (dense: fill, then scatter the kept p = exp(x - m) / s;
// compact: sorted in shared memory by a bitonic network when k <= kTopKSortedMax; loss:
// (m - x_t) + log s, (m, log s) and the kept indices).
#include <cstdint>
#include <type_traits>

#include "../common/row_softmax.h"
#include "dtype.cuh"
#include "sparse_softmax.h"

namespace seqfuse::cuda {
namespace {

constexpr int kWarp = 32;
constexpr int kBins = 256;  // 8-bit radix digits
constexpr int kBlockThreads = 512;
constexpr int kWarpsPerBlock = 4;
constexpr int64_t kWarpRowMax = 2048;
constexpr int64_t kStageBytesMax = 64 * 1024;  // keeps 3 staged blocks per SM on sm80
constexpr int kPerThread = 4;                  // loads in flight per thread in the filter
constexpr int kTile = kBlockThreads * kPerThread;
constexpr int64_t kMinCandidates = 4096;
constexpr int kRowThreads = 256;  // the dense normalisers

// Thread groups that work on one row: a warp, or a whole block. sync() is the barrier
// of the group only (with the memory ordering of shared and global writes among its
// threads); callers keep every thread of a group on the same path to each sync().
struct WarpGroup {
  static constexpr int kSize = kWarp;
  __device__ static int rank() { return int(threadIdx.x) % kWarp; }
  __device__ static void sync() { __syncwarp(); }
};
template <int kThreads>
struct BlockGroup {
  static constexpr int kSize = kThreads;
  __device__ static int rank() { return int(threadIdx.x); }
  __device__ static void sync() { __syncthreads(); }
};
using RowBlock = BlockGroup<kRowThreads>;

struct Sum {
  __device__ float operator()(float a, float b) const { return a + b; }
};
struct NanMax {
  __device__ float operator()(float a, float b) const { return (b > a || b != b) ? b : a; }
};
struct UMax {
  __device__ unsigned operator()(unsigned a, unsigned b) const { return a > b ? a : b; }
};

// Every thread of the group gets the reduction of v. scratch: kSize / 32 entries
// (unused by a warp).
template <class G, typename T, typename Op>
__device__ T group_reduce(T v, Op op, T* scratch) {
  for (int o = kWarp / 2; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, o));
  if constexpr (G::kSize > kWarp) {
    __syncthreads();  // a previous reduction may still be reading scratch
    if (threadIdx.x % kWarp == 0) scratch[threadIdx.x / kWarp] = v;
    __syncthreads();
    v = scratch[0];
    for (int w = 1; w < G::kSize / kWarp; ++w) v = op(v, scratch[w]);
  }
  return v;
}

// The sum of v over the group's threads of lower rank; `total` gets the group's sum.
template <class G>
__device__ int group_exclusive_sum(int v, int* scratch, int& total) {
  const int lane = threadIdx.x % kWarp;
  int inclusive = v;
  for (int o = 1; o < kWarp; o <<= 1) {
    const int n = __shfl_up_sync(0xffffffffu, inclusive, o);
    if (lane >= o) inclusive += n;
  }
  if constexpr (G::kSize == kWarp) {
    total = __shfl_sync(0xffffffffu, inclusive, kWarp - 1);
    return inclusive - v;
  } else {
    const int warp = threadIdx.x / kWarp;
    __syncthreads();
    if (lane == kWarp - 1) scratch[warp] = inclusive;
    __syncthreads();
    int before = 0;
    total = 0;
    for (int w = 0; w < G::kSize / kWarp; ++w) {
      if (w < warp) before += scratch[w];
      total += scratch[w];
    }
    return before + inclusive - v;
  }
}

using Composite = uint64_t;
// Below every real composite (real keys are at least order_key(-inf) > 0).
constexpr Composite kNone = 0;

__device__ __forceinline__ Composite composite(float x, int64_t i) {
  return (Composite(order_key(x)) << 32) | Composite(~uint32_t(i));
}
__device__ __forceinline__ int64_t index_of(Composite c) { return int64_t(~uint32_t(c)); }
// The value a composite was made from (NaN for NaN, +0 for -0).
__device__ __forceinline__ float value_of(Composite c) {
  const uint32_t key = uint32_t(c >> 32);
  return __uint_as_float((key & 0x80000000u) ? (key ^ 0x80000000u) : ~key);
}

// The entries of one row in shared or global memory, in index order.
template <typename scalar_t>
struct RowView {
  const scalar_t* x;
  int64_t n;
  __device__ Composite at(int64_t j) const { return composite(to_acc(x[j]), j); }
};
// Candidate composites in shared memory, in any order.
struct CandidateView {
  const Composite* c;
  int64_t n;
  __device__ Composite at(int64_t j) const { return c[j]; }
};

// Shared state of one group's selection.
struct SelectShared {
  unsigned hist[kBins];
  float red[kBlockThreads / kWarp];
  int scan[kBlockThreads / kWarp];
  unsigned digit;
  int remaining;
  int bin_count;
  int n_kept;
  int n_candidates;
  Composite threshold;
  float target_value;
};

// Finds the bin holding the `remaining`-th highest composite of the histogram; sets
// sh.digit, sh.remaining (still wanted from that bin) and sh.bin_count.
template <class G>
__device__ void find_digit(SelectShared& sh, int remaining) {
  constexpr int kPer = kBins > G::kSize ? kBins / G::kSize : 1;
  // This thread's bins, descending from `top`; ranks past the last bin hold none.
  const int top = kBins - 1 - G::rank() * kPer;
  const bool has_bins = top >= 0;
  int local = 0;
  if (has_bins) {
    for (int b = 0; b < kPer; ++b) local += sh.hist[top - b];
  }
  int total;
  const int above = group_exclusive_sum<G>(local, sh.scan, total);
  if (has_bins && above < remaining && above + local >= remaining) {
    int acc = above;
    for (int b = 0; b < kPer; ++b) {
      const int c = sh.hist[top - b];
      if (acc + c >= remaining) {
        sh.digit = unsigned(top - b);
        sh.remaining = remaining - acc;
        sh.bin_count = c;
        break;
      }
      acc += c;
    }
  }
  G::sync();
}

// The k-th highest composite of view (0 < kk <= view.n), so that exactly kk entries
// reach it. Every thread of the group calls it and gets the same result.
template <class G, class View>
__device__ Composite select_threshold(const View& view, int64_t kk, SelectShared& sh) {
  Composite prefix = 0;
  int remaining = int(kk);
#pragma unroll 1
  for (int shift = 56; shift >= 0; shift -= 8) {
    // Only entries that share the digits already fixed are counted.
    const Composite high = shift == 56 ? 0 : ~Composite(0) << (shift + 8);
    for (int b = G::rank(); b < kBins; b += G::kSize) sh.hist[b] = 0;
    G::sync();
    for (int64_t j = G::rank(); j < view.n; j += G::kSize) {
      const Composite c = view.at(j);
      if ((c & high) == prefix) atomicAdd(&sh.hist[(c >> shift) & (kBins - 1)], 1u);
    }
    G::sync();
    find_digit<G>(sh, remaining);
    prefix |= Composite(sh.digit) << shift;
    remaining = sh.remaining;
    // Every entry with this prefix is wanted, and only those and the ones above it.
    if (sh.bin_count == remaining) break;
  }
  G::sync();  // sh is free for the caller's next use
  return prefix;
}

// Sorts n (a power of two) composites in shared memory, highest first.
template <class G>
__device__ void sort_descending(Composite* a, int n) {
  for (int size = 2; size <= n; size <<= 1) {
    for (int stride = size / 2; stride > 0; stride >>= 1) {
      for (int t = G::rank(); t < n / 2; t += G::kSize) {
        const int i = 2 * stride * (t / stride) + t % stride, j = i + stride;
        if ((a[j] > a[i]) == ((i & size) == 0)) {
          const Composite tmp = a[i];
          a[i] = a[j];
          a[j] = tmp;
        }
      }
      G::sync();
    }
  }
}

enum class Mode { Dense, Compact, Loss };

struct TopKArgs {
  const void* x;
  RowShape shape;
  int64_t kk;  // min(k, V)
  void* out;   // Dense: [R, V]; Compact: probs [R, kk]
  int64_t* indices;
  const int64_t* target;
  int64_t ignore_index;
  float* loss;
  float* lse;
};

SEQFUSE_HD int64_t sort_capacity(Mode mode, int64_t kk) {
  if (mode != Mode::Compact || kk > kTopKSortedMax) return 0;
  int64_t n = 1;
  while (n < kk) n <<= 1;
  return n;
}
SEQFUSE_HD int64_t align16(int64_t bytes) { return (bytes + 15) / 16 * 16; }
// Shared memory of one group: its SelectShared, the compact sort buffer, then `slots`
// bytes of row or candidates.
SEQFUSE_HD int64_t group_bytes(Mode mode, int64_t kk, int64_t slots) {
  return align16(sizeof(SelectShared)) + sort_capacity(mode, kk) * 8 + align16(slots);
}
// Candidate buffer entries: room for kk survivors and a whole tile after each cut.
SEQFUSE_HD int64_t filter_capacity(int64_t kk) {
  const int64_t room = kk > kTile ? kk : kTile;
  return kk + room > kMinCandidates ? kk + room : kMinCandidates;
}

// Given the group's Omega_k = {entries of view with composite >= T}: m and s, then the
// mode's output. x_t is the target logit (Loss mode; NaN when out of range).
template <class G, typename scalar_t, Mode kMode, class View>
__device__ void finish_row(const View& view, Composite T, float x_t, int64_t r,
                           const TopKArgs& args, SelectShared& sh, Composite* sort_buf) {
  const int64_t V = args.shape.V, kk = args.kk;
  // m is the top kept value, which is the row's maximum (the top entry is always kept).
  unsigned top_key = 0;
  for (int64_t j = G::rank(); j < view.n; j += G::kSize) {
    const Composite c = view.at(j);
    if (c >= T) top_key = UMax{}(top_key, unsigned(c >> 32));
  }
  top_key = group_reduce<G>(top_key, UMax{}, reinterpret_cast<unsigned*>(sh.scan));
  const float m = value_of(Composite(top_key) << 32);
  float local = 0.f;
  for (int64_t j = G::rank(); j < view.n; j += G::kSize) {
    const Composite c = view.at(j);
    if (c >= T) local += expf(value_of(c) - m);
  }
  const float s = group_reduce<G>(local, Sum{}, sh.red);
  auto prob = [&](Composite c) { return expf(value_of(c) - m) / s; };

  if (G::rank() == 0) sh.n_kept = 0;
  G::sync();
  if constexpr (kMode == Mode::Dense) {
    scalar_t* out = static_cast<scalar_t*>(args.out) + r * V;
    // A NaN normaliser (NaN kept, +inf kept, or nothing kept above -inf) poisons the
    // whole row, as the dense reference does.
    const bool poisoned = s != s;
    const scalar_t fill = from_acc<scalar_t>(poisoned ? s : 0.f);
    for (int64_t i = G::rank(); i < V; i += G::kSize) out[i] = fill;
    G::sync();  // the fill lands before the kept entries are written over it
    if (!poisoned) {
      for (int64_t j = G::rank(); j < view.n; j += G::kSize) {
        const Composite c = view.at(j);
        if (c >= T) out[index_of(c)] = from_acc<scalar_t>(prob(c));
      }
    }
  } else if constexpr (kMode == Mode::Compact) {
    scalar_t* probs = static_cast<scalar_t*>(args.out) + r * kk;
    int64_t* indices = args.indices + r * kk;
    const int n_sort = int(sort_capacity(kMode, kk));
    for (int64_t j = G::rank(); j < view.n; j += G::kSize) {
      const Composite c = view.at(j);
      if (c < T) continue;
      const int pos = atomicAdd(&sh.n_kept, 1);
      if (n_sort > 0) {
        sort_buf[pos] = c;
      } else {  // long lists go out in any order; the binding sorts them
        probs[pos] = from_acc<scalar_t>(prob(c));
        indices[pos] = index_of(c);
      }
    }
    if (n_sort > 0) {
      for (int j = int(kk) + G::rank(); j < n_sort; j += G::kSize) sort_buf[j] = kNone;
      G::sync();
      sort_descending<G>(sort_buf, n_sort);
      for (int j = G::rank(); j < kk; j += G::kSize) {
        probs[j] = from_acc<scalar_t>(prob(sort_buf[j]));
        indices[j] = index_of(sort_buf[j]);
      }
    }
  } else {
    if (kk < V) {
      for (int64_t j = G::rank(); j < view.n; j += G::kSize) {
        const Composite c = view.at(j);
        if (c >= T) args.indices[r * kk + atomicAdd(&sh.n_kept, 1)] = index_of(c);
      }
    }
    if (G::rank() == 0) {
      const int64_t t = args.target[r];
      const KeptLse<float> kept = KeptLse<float>{m, s, logf(s)}.for_loss();
      args.loss[r] = t == args.ignore_index ? 0.f : (kept.m - x_t) + kept.log_s;
      args.lse[2 * r] = kept.m;
      args.lse[2 * r + 1] = kept.log_s;
    }
  }
}

// Carves one group's shared memory (see group_bytes).
struct GroupSmem {
  SelectShared* sh;
  Composite* sort_buf;
  unsigned char* slots;
};
__device__ GroupSmem carve(unsigned char* base, Mode mode, int64_t kk) {
  GroupSmem g;
  g.sh = reinterpret_cast<SelectShared*>(base);
  g.sort_buf = reinterpret_cast<Composite*>(base + align16(sizeof(SelectShared)));
  g.slots = base + align16(sizeof(SelectShared)) + sort_capacity(mode, kk) * 8;
  return g;
}

// The warp and staged paths (kStage), and the global fallback (!kStage): one group of
// G per row, kThreads / G::kSize rows per block.
template <class G, int kThreads, typename scalar_t, Mode kMode, bool kStage>
__global__ void __launch_bounds__(kThreads) topk_row_kernel(TopKArgs args) {
  SEQFUSE_DYNAMIC_SHARED(unsigned char, smem, 16);
  constexpr int kGroups = kThreads / G::kSize;
  const int64_t V = args.shape.V, kk = args.kk;
  const int group = int(threadIdx.x) / G::kSize;
  const int64_t r = int64_t(blockIdx.x) * kGroups + group;
  // The last block may have groups past the last row: they leave as a whole, and no
  // barrier below spans more than one group (block groups have kGroups == 1).
  if (r >= args.shape.R) return;
  const GroupSmem g =
      carve(smem + group * group_bytes(kMode, kk, kStage ? V * int64_t(sizeof(scalar_t)) : 0),
            kMode, kk);
  const scalar_t* row = static_cast<const scalar_t*>(args.x) + r * V;
  const scalar_t* src = row;
  if constexpr (kStage) {
    scalar_t* stage = reinterpret_cast<scalar_t*>(g.slots);
    for (int64_t i = G::rank(); i < V; i += G::kSize) stage[i] = row[i];
    G::sync();
    src = stage;
  }
  const RowView<scalar_t> view{src, V};
  const Composite T = kk < V ? select_threshold<G>(view, kk, *g.sh) : Composite(1);
  float x_t = __int_as_float(0x7fc00000);  // NaN
  if constexpr (kMode == Mode::Loss) {
    const int64_t t = args.target[r];
    if (t >= 0 && t < V) x_t = to_acc(src[t]);
  }
  finish_row<G, scalar_t, kMode>(view, T, x_t, r, args, *g.sh, g.sort_buf);
}

// Cuts the candidate buffer to its top kk and raises the threshold to the kk-th.
template <class G>
__device__ void cut_candidates(Composite* cand, int n, int64_t kk, SelectShared& sh) {
  G::sync();  // every thread has read sh.n_candidates and sh.threshold
  const Composite T = select_threshold<G>(CandidateView{cand, n}, kk, sh);
  if (G::rank() == 0) sh.n_kept = 0;
  G::sync();
  // Survivors move to the front chunk by chunk: a chunk is read into registers before
  // anyone writes, and the writes land below the end of the chunk (at most one
  // survivor per entry read so far), so no unread entry is overwritten.
  for (int base = 0; base < n; base += G::kSize) {
    const int j = base + G::rank();
    const Composite c = j < n ? cand[j] : kNone;
    G::sync();
    if (c >= T) cand[atomicAdd(&sh.n_kept, 1)] = c;
  }
  G::sync();
  if (G::rank() == 0) {
    sh.n_candidates = int(kk);
    sh.threshold = T;
  }
  G::sync();
}

// The filter path (see the top of this file): one block per row, kk < V.
template <typename scalar_t, Mode kMode>
__global__ void __launch_bounds__(kBlockThreads) topk_filter_kernel(TopKArgs args, int capacity) {
  using G = BlockGroup<kBlockThreads>;
  SEQFUSE_DYNAMIC_SHARED(unsigned char, smem, 16);
  const int64_t V = args.shape.V, kk = args.kk;
  const int64_t r = blockIdx.x;
  const GroupSmem g = carve(smem, kMode, kk);
  SelectShared& sh = *g.sh;
  Composite* cand = reinterpret_cast<Composite*>(g.slots);
  const scalar_t* row = static_cast<const scalar_t*>(args.x) + r * V;
  const int64_t t = kMode == Mode::Loss ? args.target[r] : -1;
  const int lane = int(threadIdx.x) % kWarp;
  if (threadIdx.x == 0) {
    sh.n_candidates = 0;
    sh.threshold = kNone + 1;  // every real entry reaches it
    sh.target_value = __int_as_float(0x7fc00000);
  }
  __syncthreads();
  for (int64_t base = 0; base < V; base += kTile) {
    scalar_t v[kPerThread];
#pragma unroll
    for (int e = 0; e < kPerThread; ++e) {  // the tile's loads go out before any wait
      const int64_t i = base + e * kBlockThreads + threadIdx.x;
      v[e] = i < V ? row[i] : from_acc<scalar_t>(0.f);
    }
    // Both were last written before the barrier that ended the previous tile.
    const int n = sh.n_candidates;
    if (n + kTile > capacity) cut_candidates<G>(cand, n, kk, sh);
    const Composite threshold = sh.threshold;
    __syncthreads();  // every thread has read the count before any appends to it
#pragma unroll
    for (int e = 0; e < kPerThread; ++e) {
      const int64_t i = base + e * kBlockThreads + threadIdx.x;
      const float x = to_acc(v[e]);
      if (i == t) sh.target_value = x;
      const Composite c = i < V ? composite(x, i) : kNone;
      const bool take = c >= threshold;
      // One atomic per warp: the taking lanes get consecutive slots by lane order.
      const unsigned takers = __ballot_sync(0xffffffffu, take);
      if (takers != 0) {
        const int leader = __ffs(takers) - 1;
        int first = 0;
        if (lane == leader) first = atomicAdd(&sh.n_candidates, __popc(takers));
        first = __shfl_sync(0xffffffffu, first, leader);
        if (take) cand[first + __popc(takers & ((1u << lane) - 1u))] = c;
      }
    }
    __syncthreads();  // the tile's appends are in before the next tile reads the count
  }
  const int n = sh.n_candidates;
  const CandidateView view{cand, n};
  const Composite T = select_threshold<G>(view, kk, sh);
  finish_row<G, scalar_t, kMode>(view, T, sh.target_value, r, args, sh, g.sort_buf);
}

// Launches kernel with `bytes` of dynamic shared memory, opting in past the default
// 48 KB; the caller has checked bytes against the device's limit.
template <typename Kernel, typename... Args>
cudaError_t launch_with_smem(Kernel kernel, unsigned grid, int threads, int64_t bytes,
                             cudaStream_t stream, Args... args) {
  if (bytes > 48 * 1024) {
    const cudaError_t err = cudaFuncSetAttribute(reinterpret_cast<const void*>(kernel),
                                                 cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                 int(bytes));
    if (err != cudaSuccess) return err;
  }
  SEQFUSE_LAUNCH(grid, threads, size_t(bytes), stream, kernel)(args...);
  return cudaGetLastError();
}

// Picks the path (see the top of this file) and launches it.
template <Mode kMode>
cudaError_t launch_topk(const TopKArgs& args, DType dtype, cudaStream_t stream) {
  const int64_t R = args.shape.R, V = args.shape.V, kk = args.kk;
  if (R == 0 || V == 0) return cudaSuccess;
  if (R >= (int64_t(1) << 31) || V > INT32_MAX) return cudaErrorInvalidConfiguration;
  int device = 0, limit = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) {
    err = cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  }
  if (err != cudaSuccess) return err;
  err = cudaErrorInvalidValue;
  dispatch_float_types(dtype, [&](auto tag) {
    using scalar_t = decltype(tag);
    if constexpr (!std::is_same_v<scalar_t, double>) {
      const int64_t row_bytes = V * int64_t(sizeof(scalar_t));
      const int64_t warp_bytes = kWarpsPerBlock * group_bytes(kMode, kk, row_bytes);
      const int64_t stage_bytes = group_bytes(kMode, kk, row_bytes);
      const int64_t capacity = filter_capacity(kk);
      const int64_t filter_bytes = group_bytes(kMode, kk, capacity * int64_t(sizeof(Composite)));
      if (V <= kWarpRowMax && warp_bytes <= limit) {
        const unsigned grid = unsigned((R + kWarpsPerBlock - 1) / kWarpsPerBlock);
        err = launch_with_smem(
            topk_row_kernel<WarpGroup, kWarpsPerBlock * kWarp, scalar_t, kMode, true>, grid,
            kWarpsPerBlock * kWarp, warp_bytes, stream, args);
      } else if (row_bytes <= kStageBytesMax && stage_bytes <= limit) {
        err = launch_with_smem(
            topk_row_kernel<BlockGroup<kBlockThreads>, kBlockThreads, scalar_t, kMode, true>,
            unsigned(R), kBlockThreads, stage_bytes, stream, args);
      } else if (kk < V && filter_bytes <= limit) {
        err = launch_with_smem(topk_filter_kernel<scalar_t, kMode>, unsigned(R), kBlockThreads,
                               filter_bytes, stream, args, int(capacity));
      } else {
        err = launch_with_smem(
            topk_row_kernel<BlockGroup<kBlockThreads>, kBlockThreads, scalar_t, kMode, false>,
            unsigned(R), kBlockThreads, group_bytes(kMode, kk, 0), stream, args);
      }
    }
  });
  return err;
}

// The dense row kernels: one block of kRowThreads per row.

template <typename scalar_t>
__global__ void __launch_bounds__(kRowThreads)
    softmax_backward_kernel(const scalar_t* grad, const scalar_t* probs, int64_t V,
                            scalar_t* grad_x) {
  SEQFUSE_SHARED(float, red, [kRowThreads / kWarp]);
  const int64_t o = int64_t(blockIdx.x) * V;
  float local = 0.f;
  for (int64_t i = threadIdx.x; i < V; i += kRowThreads) {
    const float p = to_acc(probs[o + i]);
    if (p != 0.f) local += p * to_acc(grad[o + i]);
  }
  const float dot = group_reduce<RowBlock>(local, Sum{}, red);
  for (int64_t i = threadIdx.x; i < V; i += kRowThreads) {
    const float p = to_acc(probs[o + i]);
    grad_x[o + i] = from_acc<scalar_t>(p != 0.f ? p * (to_acc(grad[o + i]) - dot) : 0.f);
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kRowThreads)
    topk_backward_kernel(const scalar_t* grad, const scalar_t* probs, const int64_t* indices,
                         int64_t kk, int64_t V, scalar_t* grad_x) {
  SEQFUSE_SHARED(float, red, [kRowThreads / kWarp]);
  const int64_t r = blockIdx.x;
  float local = 0.f;
  for (int64_t j = threadIdx.x; j < kk; j += kRowThreads) {
    local += to_acc(probs[r * kk + j]) * to_acc(grad[r * kk + j]);
  }
  const float dot = group_reduce<RowBlock>(local, Sum{}, red);
  scalar_t* dx = grad_x + r * V;
  for (int64_t i = threadIdx.x; i < V; i += kRowThreads) dx[i] = from_acc<scalar_t>(0.f);
  __syncthreads();  // the zeros land before the scatter
  for (int64_t j = threadIdx.x; j < kk; j += kRowThreads) {
    const float p = to_acc(probs[r * kk + j]);
    dx[indices[r * kk + j]] = from_acc<scalar_t>(p * (to_acc(grad[r * kk + j]) - dot));
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kRowThreads)
    cross_entropy_backward_kernel(const float* grad_loss, const scalar_t* logits,
                                  const int64_t* target, const float* lse,
                                  const int64_t* indices, int64_t V, int64_t kk,
                                  int64_t ignore_index, scalar_t* grad) {
  SEQFUSE_SHARED(int, target_kept);
  const int64_t r = blockIdx.x;
  const scalar_t* row = logits + r * V;
  scalar_t* g = grad + r * V;
  const int64_t t = target[r];
  const float gl = t == ignore_index ? 0.f : grad_loss[r];
  const float m = lse[2 * r], log_s = lse[2 * r + 1];
  if (kk == 0) {  // the plain softmax: the whole row is read
    for (int64_t i = threadIdx.x; i < V; i += kRowThreads) {
      const float p = t == ignore_index ? 0.f : expf((to_acc(row[i]) - m) - log_s);
      g[i] = from_acc<scalar_t>(gl * p - (i == t ? gl : 0.f));
    }
    return;
  }
  for (int64_t i = threadIdx.x; i < V; i += kRowThreads) g[i] = from_acc<scalar_t>(0.f);
  if (threadIdx.x == 0) target_kept = 0;
  __syncthreads();
  if (t == ignore_index) return;
  // Only the kept logits are read.
  for (int64_t j = threadIdx.x; j < kk; j += kRowThreads) {
    const int64_t i = indices[r * kk + j];
    const float p = expf((to_acc(row[i]) - m) - log_s);
    if (i == t) target_kept = 1;
    g[i] = from_acc<scalar_t>(gl * (p - (i == t ? 1.f : 0.f)));
  }
  __syncthreads();
  if (threadIdx.x == 0 && !target_kept) g[t] = from_acc<scalar_t>(-gl);
}

// The row's TaylorRow (csrc/common/row_softmax.h), the same in every thread of the block:
// the plain sum, or the scaled one where that is not finite.
template <typename scalar_t>
__device__ TaylorRow<float> taylor_row(const scalar_t* row, int64_t V, int order, float* red) {
  TaylorRow<float> t{order, false, 0, 0.f};
  float local = 0.f;
  for (int64_t i = threadIdx.x; i < V; i += kRowThreads) {
    local += Taylor<float>::at(to_acc(row[i]), order).f;
  }
  t.S = group_reduce<RowBlock>(local, Sum{}, red);
  if (isfinite(t.S)) return t;
  t.scaled = true;
  float E = 0.f;  // a small integer, exact in a float
  for (int64_t i = threadIdx.x; i < V; i += kRowThreads) {
    const float x = to_acc(row[i]);
    if (isfinite(x)) E = fmaxf(E, float(ScaledTaylor<float>::at(x, order).e));
  }
  t.E = int(group_reduce<RowBlock>(E, NanMax{}, red));
  local = 0.f;
  for (int64_t i = threadIdx.x; i < V; i += kRowThreads) local += t.term(to_acc(row[i]));
  t.S = group_reduce<RowBlock>(local, Sum{}, red);
  return t;
}

template <typename scalar_t>
__global__ void __launch_bounds__(kRowThreads)
    taylor_kernel(const scalar_t* x, int64_t V, int order, scalar_t* out) {
  SEQFUSE_SHARED(float, red, [kRowThreads / kWarp]);
  const int64_t o = int64_t(blockIdx.x) * V;
  const TaylorRow<float> t = taylor_row(x + o, V, order, red);
  for (int64_t i = threadIdx.x; i < V; i += kRowThreads) {
    out[o + i] = from_acc<scalar_t>(t.normalised(to_acc(x[o + i])).f);
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kRowThreads)
    taylor_backward_kernel(const scalar_t* grad, const scalar_t* x, const scalar_t* out,
                           int64_t V, int order, scalar_t* grad_x) {
  SEQFUSE_SHARED(float, red, [kRowThreads / kWarp]);
  const int64_t o = int64_t(blockIdx.x) * V;
  const TaylorRow<float> t = taylor_row(x + o, V, order, red);
  float dot_local = 0.f;
  for (int64_t i = threadIdx.x; i < V; i += kRowThreads) {
    dot_local += to_acc(grad[o + i]) * to_acc(out[o + i]);
  }
  const float dot = group_reduce<RowBlock>(dot_local, Sum{}, red);
  for (int64_t i = threadIdx.x; i < V; i += kRowThreads) {
    const float df = t.normalised(to_acc(x[o + i])).df;
    grad_x[o + i] = from_acc<scalar_t>(df * (to_acc(grad[o + i]) - dot));
  }
}

// Entropy normalisation. L_i = log p_i is recomputed from p; -inf marks a zero.
__device__ __forceinline__ bool on_support(float L) { return L != -INFINITY; }

// One row's iterate t (log q_t = it.log_q(L)) and step t's scalars (EntropyStep).
struct TraceSlot {
  EntropyIterate<float> it;
  float H, D, u, gamma;
};

// Runs the iterations; writes the trace when `trace` is not null and the largest L of
// the support to L_max. Returns the last slot.
template <typename scalar_t>
__device__ TraceSlot entropy_trace(const scalar_t* p, int64_t V, float target, int iters,
                                   float* red, TraceSlot* trace, float& L_max) {
  L_max = -INFINITY;
  float neg_L_min = -INFINITY;
  for (int64_t i = threadIdx.x; i < V; i += kRowThreads) {
    const float L = logf(to_acc(p[i]));
    if (!on_support(L)) continue;
    L_max = NanMax{}(L_max, L);
    neg_L_min = NanMax{}(neg_L_min, -L);
  }
  L_max = group_reduce<RowBlock>(L_max, NanMax{}, red);
  const float L_min = -group_reduce<RowBlock>(neg_L_min, NanMax{}, red);
  TraceSlot s{EntropyIterate<float>::input(), 0.f, 0.f, 0.f, 1.f};
  for (int t = 0; t < iters; ++t) {
    float qL = 0.f, qL2 = 0.f;
    for (int64_t i = threadIdx.x; i < V; i += kRowThreads) {
      const float L = logf(to_acc(p[i]));
      if (!on_support(L)) continue;
      const float l = s.it.log_q(L);
      const float q = expf(l);
      if (q == 0.f) continue;
      qL += q * l;
      qL2 += q * l * l;
    }
    qL = group_reduce<RowBlock>(qL, Sum{}, red);
    qL2 = group_reduce<RowBlock>(qL2, Sum{}, red);
    const EntropyStep<float> step = EntropyStep<float>::of(qL, qL2, target);
    s.H = step.H;
    s.D = step.D;
    s.u = step.u;
    s.gamma = step.gamma;
    if (trace && threadIdx.x == 0) trace[t] = s;
    EntropyIterate<float> next = s.it.next(step.gamma, L_min, L_max);
    float sum = 0.f;
    for (int64_t i = threadIdx.x; i < V; i += kRowThreads) {
      const float L = logf(to_acc(p[i]));
      if (on_support(L)) sum += expf(next.log_q(L));
    }
    next.z = logf(group_reduce<RowBlock>(sum, Sum{}, red));
    s.it = next;
  }
  if (trace && threadIdx.x == 0) trace[iters] = s;
  return s;
}

template <typename scalar_t>
__global__ void __launch_bounds__(kRowThreads)
    entropy_kernel(const scalar_t* p, const float* target, int64_t V, int iters, scalar_t* out) {
  SEQFUSE_SHARED(float, red, [kRowThreads / kWarp]);
  const int64_t o = int64_t(blockIdx.x) * V;
  float L_max;
  const TraceSlot s = entropy_trace(p + o, V, target[blockIdx.x], iters, red, nullptr, L_max);
  for (int64_t i = threadIdx.x; i < V; i += kRowThreads) {
    const float L = logf(to_acc(p[o + i]));
    out[o + i] = from_acc<scalar_t>(on_support(L) ? expf(s.it.log_q(L)) : 0.f);
  }
}

// The adjoint in log space (csrc/common/row_softmax.h): adj holds a = dJ/dl of the
// iterate after the step being undone, and at the end dJ/dp.
template <typename scalar_t>
__global__ void __launch_bounds__(kRowThreads)
    entropy_backward_kernel(const scalar_t* grad, const scalar_t* p, const float* target,
                            int64_t V, int iters, scalar_t* grad_p, float* grad_target,
                            float* adjoint, TraceSlot* traces) {
  SEQFUSE_SHARED(float, red, [kRowThreads / kWarp]);
  const int64_t r = blockIdx.x, o = r * V;
  if (iters == 0) {
    // The identity: the gradient passes through everywhere, zeros of p included.
    for (int64_t i = threadIdx.x; i < V; i += kRowThreads) grad_p[o + i] = grad[o + i];
    if (threadIdx.x == 0) grad_target[r] = 0.f;
    return;
  }
  TraceSlot* trace = traces + r * (iters + 1);
  float* adj = adjoint + o;
  float L_max;
  entropy_trace(p + o, V, target[r], iters, red, trace, L_max);
  __syncthreads();  // the trace written by thread 0 is visible to the block
  const EntropyIterate<float> last = trace[iters].it;
  for (int64_t i = threadIdx.x; i < V; i += kRowThreads) {
    const float L = logf(to_acc(p[o + i]));
    adj[i] = on_support(L) ? to_acc(grad[o + i]) * expf(last.log_q(L)) : 0.f;
  }
  float target_bar = 0.f;
  for (int t = iters - 1; t >= 0; --t) {
    const EntropyIterate<float> cur = trace[t].it, nxt = trace[t + 1].it;
    const float c = t == 0 ? L_max : -cur.z;  // the row's largest l
    // l_i, or -inf where q_i is 0: zeros of p stay zero whatever p is after a step (and
    // entries below the float range add nothing), so no gradient reaches them.
    auto log_q = [&](float L) { return on_support(L) ? cur.log_q(L) : -INFINITY; };
    float S = 0.f;
    for (int64_t i = threadIdx.x; i < V; i += kRowThreads) {
      if (log_q(logf(to_acc(p[o + i]))) != -INFINITY) S += adj[i];
    }
    S = group_reduce<RowBlock>(S, Sum{}, red);
    // adj <- a'_i - q'_i S, which sums to 0 (exactly 0 entry by entry on a one-hot row),
    // and gbar = sum of it times (l - c).
    float gamma_bar = 0.f;
    for (int64_t i = threadIdx.x; i < V; i += kRowThreads) {
      const float L = logf(to_acc(p[o + i]));
      const float l = log_q(L);
      adj[i] = l == -INFINITY ? 0.f : adj[i] - expf(nxt.log_q(L)) * S;
      if (l != -INFINITY) gamma_bar += adj[i] * (l - c);
    }
    gamma_bar = group_reduce<RowBlock>(gamma_bar, Sum{}, red);
    // The step's scalars are read only once the sums are in, to keep the sweeps light
    // on registers.
    const TraceSlot step = trace[t];
    float H_bar = 0.f, M_bar = 0.f;
    if (step.D != 0.f && gamma_bar != 0.f) {
      H_bar = -gamma_bar * (1.f + 2.f * step.H * step.u) / step.D;
      M_bar = gamma_bar * step.u / step.D;
      target_bar += gamma_bar / step.D;
    }
    for (int64_t i = threadIdx.x; i < V; i += kRowThreads) {
      const float p_i = to_acc(p[o + i]);
      const float l = log_q(logf(p_i));
      if (l == -INFINITY) continue;
      const float b = entropy_scale(step.gamma, adj[i]);
      const float via_H = -H_bar * (l + 1.f) + M_bar * (l * l + 2.f * l);
      if (t == 0) {
        adj[i] = b / p_i + via_H;  // dJ/dp = a / p, the 1/p taken before the sum
      } else {
        const float q = expf(l);
        adj[i] = q != 0.f ? b + q * via_H : b;  // q l^2 -> 0 below the range
      }
    }
  }
  for (int64_t i = threadIdx.x; i < V; i += kRowThreads) grad_p[o + i] = from_acc<scalar_t>(adj[i]);
  if (threadIdx.x == 0) grad_target[r] = target_bar;
}

// Launches kernel_for(tag) with one kRowThreads block per row, for the float types.
template <typename Launch>
cudaError_t launch_rows(RowShape s, DType dtype, Launch&& launch) {
  if (s.R == 0 || s.V == 0) return cudaSuccess;
  if (s.R >= (int64_t(1) << 31)) return cudaErrorInvalidConfiguration;
  cudaError_t err = cudaErrorInvalidValue;
  dispatch_float_types(dtype, [&](auto tag) {
    using scalar_t = decltype(tag);
    if constexpr (!std::is_same_v<scalar_t, double>) {
      launch(tag, dim3(unsigned(s.R)), dim3(kRowThreads));
      err = cudaGetLastError();
    }
  });
  return err;
}

template <typename T>
const T* as(const void* p) {
  return static_cast<const T*>(p);
}
template <typename T>
T* as(void* p) {
  return static_cast<T*>(p);
}

}  // namespace

cudaError_t sparse_softmax_forward(const void* x, RowShape s, int64_t k, void* out, DType dtype,
                                   cudaStream_t stream) {
  TopKArgs args{};
  args.x = x;
  args.shape = s;
  args.kk = k < s.V ? k : s.V;
  args.out = out;
  return launch_topk<Mode::Dense>(args, dtype, stream);
}

cudaError_t topk_softmax_forward(const void* x, RowShape s, int64_t kk, void* probs,
                                 int64_t* indices, DType dtype, cudaStream_t stream) {
  TopKArgs args{};
  args.x = x;
  args.shape = s;
  args.kk = kk;
  args.out = probs;
  args.indices = indices;
  return launch_topk<Mode::Compact>(args, dtype, stream);
}

cudaError_t cross_entropy_forward(const void* logits, const int64_t* target, RowShape s, int64_t k,
                                  int64_t ignore_index, float* loss, float* lse, int64_t* indices,
                                  DType dtype, cudaStream_t stream) {
  TopKArgs args{};
  args.x = logits;
  args.shape = s;
  args.kk = k < s.V ? k : s.V;
  args.indices = indices;
  args.target = target;
  args.ignore_index = ignore_index;
  args.loss = loss;
  args.lse = lse;
  return launch_topk<Mode::Loss>(args, dtype, stream);
}

cudaError_t sparse_softmax_backward(const void* grad, const void* probs, RowShape s, void* grad_x,
                                    DType dtype, cudaStream_t stream) {
  return launch_rows(s, dtype, [&](auto tag, dim3 grid, dim3 block) {
    using T = decltype(tag);
    SEQFUSE_LAUNCH(grid, block, 0, stream, softmax_backward_kernel<T>)(as<T>(grad), as<T>(probs), s.V,
                                                           as<T>(grad_x));
  });
}

cudaError_t topk_softmax_backward(const void* grad, const void* probs, const int64_t* indices,
                                  RowShape s, int64_t kk, void* grad_x, DType dtype,
                                  cudaStream_t stream) {
  return launch_rows(s, dtype, [&](auto tag, dim3 grid, dim3 block) {
    using T = decltype(tag);
    SEQFUSE_LAUNCH(grid, block, 0, stream, topk_backward_kernel<T>)(as<T>(grad), as<T>(probs), indices, kk,
                                                        s.V, as<T>(grad_x));
  });
}

cudaError_t cross_entropy_backward(const float* grad_loss, const void* logits,
                                   const int64_t* target, const float* lse,
                                   const int64_t* indices, RowShape s, int64_t kk,
                                   int64_t ignore_index, void* grad, DType dtype,
                                   cudaStream_t stream) {
  return launch_rows(s, dtype, [&](auto tag, dim3 grid, dim3 block) {
    using T = decltype(tag);
    SEQFUSE_LAUNCH(grid, block, 0, stream, cross_entropy_backward_kernel<T>)(
        grad_loss, as<T>(logits), target, lse, indices, s.V, kk, ignore_index, as<T>(grad));
  });
}

cudaError_t taylor_softmax_forward(const void* x, RowShape s, int order, void* out, DType dtype,
                                   cudaStream_t stream) {
  return launch_rows(s, dtype, [&](auto tag, dim3 grid, dim3 block) {
    using T = decltype(tag);
    SEQFUSE_LAUNCH(grid, block, 0, stream, taylor_kernel<T>)(as<T>(x), s.V, order, as<T>(out));
  });
}

cudaError_t taylor_softmax_backward(const void* grad, const void* x, const void* out, RowShape s,
                                    int order, void* grad_x, DType dtype, cudaStream_t stream) {
  return launch_rows(s, dtype, [&](auto tag, dim3 grid, dim3 block) {
    using T = decltype(tag);
    SEQFUSE_LAUNCH(grid, block, 0, stream, taylor_backward_kernel<T>)(as<T>(grad), as<T>(x), as<T>(out), s.V,
                                                          order, as<T>(grad_x));
  });
}

cudaError_t entropy_normalize_forward(const void* p, const float* target, RowShape s, int iters,
                                      void* out, DType dtype, cudaStream_t stream) {
  return launch_rows(s, dtype, [&](auto tag, dim3 grid, dim3 block) {
    using T = decltype(tag);
    SEQFUSE_LAUNCH(grid, block, 0, stream, entropy_kernel<T>)(as<T>(p), target, s.V, iters, as<T>(out));
  });
}

size_t entropy_backward_workspace_bytes(RowShape s, int iters) {
  const size_t adjoint = size_t(s.R) * size_t(s.V) * sizeof(float);
  return (adjoint + 255) / 256 * 256 + size_t(s.R) * size_t(iters + 1) * sizeof(TraceSlot);
}

cudaError_t entropy_normalize_backward(const void* grad, const void* p, const float* target,
                                       RowShape s, int iters, void* grad_p, float* grad_target,
                                       void* workspace, DType dtype, cudaStream_t stream) {
  const size_t adjoint = size_t(s.R) * size_t(s.V) * sizeof(float);
  float* adj = static_cast<float*>(workspace);
  auto* traces = reinterpret_cast<TraceSlot*>(static_cast<char*>(workspace) +
                                              (adjoint + 255) / 256 * 256);
  return launch_rows(s, dtype, [&](auto tag, dim3 grid, dim3 block) {
    using T = decltype(tag);
    SEQFUSE_LAUNCH(grid, block, 0, stream, entropy_backward_kernel<T>)(as<T>(grad), as<T>(p), target, s.V,
                                                           iters, as<T>(grad_p), grad_target, adj,
                                                           traces);
  });
}

}  // namespace seqfuse::cuda
