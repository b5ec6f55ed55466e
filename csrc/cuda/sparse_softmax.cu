// CUDA row-wise normalisers: one block per row (maths: csrc/common/row_softmax.h).
//
// Top-k is a radix select on the order keys of the row: three passes of 11, 11 and 10
// bits narrow a block-wide histogram (2048 bins in shared memory) down to the key of
// the k-th entry, stopping early once a bin holds exactly the entries still wanted.
// The first pass streams the row from HBM and also finds its maximum; the later passes
// rescan the row and count only entries whose high bits match, reading from L2 when the
// rows in flight fit there (not yet measured: a shared-memory copy of short rows is the
// next step towards reading HBM exactly once). The selection is then
//
//   Omega_k = { i : key_i > T } + the first `ties` entries (by index) with key_i == T,
//
// kept as (T, last_tie) so any later pass can test membership of an entry on its own.
// Ties are ranked by an ordered block scan only when the threshold bin holds more
// entries than are wanted. A pass over the row then sums exp(x - max) over Omega_k and
// collects the kept entries; the compact top list (k <= 1024) is sorted in shared
// memory by a bitonic network. Everything accumulates in float32.
#include <cstdint>
#include <type_traits>

#include "../common/row_softmax.h"
#include "dtype.cuh"
#include "sparse_softmax.h"

namespace seqfuse::cuda {
namespace {

constexpr int kWarp = 32;
constexpr int kBins = 2048;
constexpr int kSmallThreads = 128;  // rows up to kSmallRow entries
constexpr int kLargeThreads = 512;
constexpr int64_t kSmallRow = 4096;
constexpr int kRowThreads = 256;  // the dense normalisers
constexpr int64_t kNoTieLimit = INT64_MAX;

using Key = uint32_t;

__device__ __forceinline__ Key key_of(float x) { return order_key(x); }

// The value a key was made from (NaN for the NaN key).
__device__ __forceinline__ float value_of(Key key) {
  return __uint_as_float((key & 0x80000000u) ? (key ^ 0x80000000u) : ~key);
}

struct Sum {
  __device__ float operator()(float a, float b) const { return a + b; }
};
struct NanMax {
  __device__ float operator()(float a, float b) const { return (b > a || b != b) ? b : a; }
};

// All threads get the reduction of v over the block. scratch: kThreads / 32 entries.
template <int kThreads, typename T, typename Op>
__device__ T block_reduce(T v, Op op, T* scratch) {
  for (int o = kWarp / 2; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, o));
  __syncthreads();  // a previous reduction may still be reading scratch
  if (threadIdx.x % kWarp == 0) scratch[threadIdx.x / kWarp] = v;
  __syncthreads();
  v = scratch[0];
  for (int w = 1; w < kThreads / kWarp; ++w) v = op(v, scratch[w]);
  return v;
}

// The sum of v over the threads below this one; `total` gets the block's sum.
template <int kThreads>
__device__ int block_exclusive_sum(int v, int* scratch, int& total) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  int inclusive = v;
  for (int o = 1; o < kWarp; o <<= 1) {
    const int n = __shfl_up_sync(0xffffffffu, inclusive, o);
    if (lane >= o) inclusive += n;
  }
  __syncthreads();
  if (lane == kWarp - 1) scratch[warp] = inclusive;
  __syncthreads();
  int before = 0;
  total = 0;
  for (int w = 0; w < kThreads / kWarp; ++w) {
    if (w < warp) before += scratch[w];
    total += scratch[w];
  }
  return before + inclusive - v;
}

// Omega_k of one row (see the top of this file).
struct Cut {
  Key threshold;
  int64_t last_tie;
  __device__ bool keeps(Key key, int64_t i) const {
    return key > threshold || (key == threshold && i <= last_tie);
  }
};

template <int kThreads>
struct SelectShared {
  unsigned hist[kBins];
  float red[kThreads / kWarp];
  int scan[kThreads / kWarp];
  unsigned max_key;
  unsigned digit;
  int remaining;
  int bin_count;
  int n_kept;
  int64_t last_tie;
};

// Finds the bin holding the `remaining`-th highest key; sets sh.digit, sh.remaining
// (wanted from that bin) and sh.bin_count.
template <int kThreads>
__device__ void find_digit(SelectShared<kThreads>& sh, int remaining) {
  constexpr int kPer = kBins / kThreads;
  const int top = kBins - 1 - int(threadIdx.x) * kPer;  // this thread's bins, descending
  int local = 0;
  for (int b = 0; b < kPer; ++b) local += sh.hist[top - b];
  int total;
  const int above = block_exclusive_sum<kThreads>(local, sh.scan, total);
  if (above < remaining && above + local >= remaining) {
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
  __syncthreads();
}

// Radix-selects the top kk of row (kk < V) and returns its cut; max_key gets the
// row's highest key. Every thread must call it.
template <int kThreads, typename scalar_t>
__device__ Cut select_top(const scalar_t* row, int64_t V, int64_t kk, SelectShared<kThreads>& sh,
                          Key& max_key) {
  Key prefix = 0, mask = 0;
  int remaining = int(kk);
#pragma unroll 1
  for (int pass = 0; pass < 3; ++pass) {
    const int shift = pass == 0 ? 21 : (pass == 1 ? 10 : 0);  // digits of 11, 11, 10 bits
    const Key digit_mask = pass == 2 ? 0x3FFu : 0x7FFu;
    for (int b = threadIdx.x; b < kBins; b += kThreads) sh.hist[b] = 0;
    if (pass == 0 && threadIdx.x == 0) sh.max_key = 0;
    __syncthreads();
    Key local_max = 0;
    for (int64_t i = threadIdx.x; i < V; i += kThreads) {
      const Key key = key_of(to_acc(row[i]));
      if (pass == 0) local_max = max(local_max, key);
      if ((key & mask) == prefix) atomicAdd(&sh.hist[(key >> shift) & digit_mask], 1u);
    }
    if (pass == 0) {
      local_max = __reduce_max_sync(0xffffffffu, local_max);
      if (threadIdx.x % kWarp == 0) atomicMax(&sh.max_key, local_max);
    }
    __syncthreads();
    if (pass == 0) max_key = sh.max_key;
    find_digit<kThreads>(sh, remaining);
    prefix |= Key(sh.digit) << shift;
    mask |= digit_mask << shift;
    remaining = sh.remaining;
    // Every key with this prefix is wanted: the cut is the prefix itself.
    if (sh.bin_count == remaining) return {prefix, kNoTieLimit};
  }
  // More entries equal the k-th key than are wanted: rank them by index.
  int seen = 0;
  if (threadIdx.x == 0) sh.last_tie = -1;
  for (int64_t base = 0; base < V && seen < remaining; base += kThreads) {
    const int64_t i = base + threadIdx.x;
    const int eq = i < V && key_of(to_acc(row[i])) == prefix;
    int total;
    const int rank = block_exclusive_sum<kThreads>(eq, sh.scan, total);
    if (eq && seen + rank == remaining - 1) sh.last_tie = i;
    seen += total;
  }
  __syncthreads();
  return {prefix, sh.last_tie};
}

// Sorts n (a power of two) entries best first: higher key, then lower index.
template <int kThreads>
__device__ void bitonic_sort(Key* keys, int64_t* idx, int n) {
  for (int size = 2; size <= n; size <<= 1) {
    for (int stride = size / 2; stride > 0; stride >>= 1) {
      for (int t = threadIdx.x; t < n / 2; t += kThreads) {
        const int i = 2 * stride * (t / stride) + t % stride, j = i + stride;
        const bool j_better = keys[j] > keys[i] || (keys[j] == keys[i] && idx[j] < idx[i]);
        if (j_better == ((i & size) == 0)) {
          const Key k = keys[i];
          keys[i] = keys[j];
          keys[j] = k;
          const int64_t x = idx[i];
          idx[i] = idx[j];
          idx[j] = x;
        }
      }
      __syncthreads();
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

template <int kThreads, typename scalar_t, Mode kMode>
__global__ void __launch_bounds__(kThreads) topk_kernel(TopKArgs args) {
  __shared__ SelectShared<kThreads> sh;
  const int64_t V = args.shape.V, kk = args.kk;
  const int64_t r = blockIdx.x;
  const scalar_t* row = static_cast<const scalar_t*>(args.x) + r * V;
  const bool whole_row = kk >= V;

  Key max_key = 0;
  Cut cut{0, kNoTieLimit};  // every real key is above 0: the whole row
  if (!whole_row) {
    cut = select_top<kThreads>(row, V, kk, sh, max_key);
  } else {
    Key local_max = 0;
    for (int64_t i = threadIdx.x; i < V; i += kThreads) {
      local_max = max(local_max, key_of(to_acc(row[i])));
    }
    local_max = __reduce_max_sync(0xffffffffu, local_max);
    if (threadIdx.x == 0) sh.max_key = 0;
    __syncthreads();
    if (threadIdx.x % kWarp == 0) atomicMax(&sh.max_key, local_max);
    __syncthreads();
    max_key = sh.max_key;
  }
  const float m = value_of(max_key);

  // The compact list, sorted in shared memory when short enough.
  constexpr bool kCompact = kMode == Mode::Compact;
  __shared__ Key s_keys[kCompact ? kTopKSortedMax : 1];
  __shared__ int64_t s_idx[kCompact ? kTopKSortedMax : 1];
  const bool in_shared = kCompact && kk <= kTopKSortedMax;
  const bool collect = kMode == Mode::Compact || (kMode == Mode::Loss && !whole_row);
  if (threadIdx.x == 0) sh.n_kept = 0;
  __syncthreads();

  float local = 0.f;
  for (int64_t i = threadIdx.x; i < V; i += kThreads) {
    const float v = to_acc(row[i]);
    const Key key = key_of(v);
    if (!cut.keeps(key, i)) continue;
    local += expf(v - m);
    if (collect) {
      const int pos = atomicAdd(&sh.n_kept, 1);
      if (pos >= kk) continue;
      if (in_shared) {
        s_keys[pos] = key;
        s_idx[pos] = i;
      } else {
        args.indices[r * kk + pos] = i;
      }
    }
  }
  const float lse = m + logf(block_reduce<kThreads>(local, Sum{}, sh.red));

  if constexpr (kMode == Mode::Dense) {
    scalar_t* out = static_cast<scalar_t*>(args.out) + r * V;
    const bool poisoned = lse != lse;  // as the dense reference: NaN throughout
    for (int64_t i = threadIdx.x; i < V; i += kThreads) {
      const float v = to_acc(row[i]);
      const float p = poisoned ? lse : (cut.keeps(key_of(v), i) ? expf(v - lse) : 0.f);
      out[i] = from_acc<scalar_t>(p);
    }
  } else if constexpr (kMode == Mode::Compact) {
    scalar_t* probs = static_cast<scalar_t*>(args.out) + r * kk;
    int64_t* indices = args.indices + r * kk;
    if (in_shared) {
      int n = 1;
      while (n < kk) n <<= 1;
      for (int j = int(kk) + int(threadIdx.x); j < n; j += kThreads) {
        s_keys[j] = 0;  // below every real key
        s_idx[j] = kNoTieLimit;
      }
      __syncthreads();
      bitonic_sort<kThreads>(s_keys, s_idx, n);
      for (int j = int(threadIdx.x); j < kk; j += kThreads) {
        probs[j] = from_acc<scalar_t>(expf(value_of(s_keys[j]) - lse));
        indices[j] = s_idx[j];
      }
    } else {
      __syncthreads();  // the indices written above are visible to the whole block
      for (int64_t j = threadIdx.x; j < kk; j += kThreads) {
        probs[j] = from_acc<scalar_t>(expf(to_acc(row[indices[j]]) - lse));
      }
    }
  } else {
    if (threadIdx.x == 0) {
      const int64_t t = args.target[r];
      args.loss[r] = t == args.ignore_index ? 0.f : lse - to_acc(row[t]);
      args.lse[r] = lse;
    }
  }
}

template <Mode kMode>
cudaError_t launch_topk(const TopKArgs& args, DType dtype, cudaStream_t stream) {
  if (args.shape.R == 0 || args.shape.V == 0) return cudaSuccess;
  if (args.shape.R >= (int64_t(1) << 31) || args.shape.V > INT32_MAX) {
    return cudaErrorInvalidConfiguration;
  }
  cudaError_t err = cudaErrorInvalidValue;
  dispatch_float_types(dtype, [&](auto tag) {
    using scalar_t = decltype(tag);
    if constexpr (!std::is_same_v<scalar_t, double>) {
      const unsigned grid = unsigned(args.shape.R);
      if (args.shape.V <= kSmallRow) {
        topk_kernel<kSmallThreads, scalar_t, kMode><<<grid, kSmallThreads, 0, stream>>>(args);
      } else {
        topk_kernel<kLargeThreads, scalar_t, kMode><<<grid, kLargeThreads, 0, stream>>>(args);
      }
      err = cudaGetLastError();
    }
  });
  return err;
}

// The dense row kernels: one block of kRowThreads per row.

template <typename scalar_t>
__global__ void __launch_bounds__(kRowThreads)
    softmax_backward_kernel(const scalar_t* grad, const scalar_t* probs, int64_t V,
                            scalar_t* grad_x) {
  __shared__ float red[kRowThreads / kWarp];
  const int64_t o = int64_t(blockIdx.x) * V;
  float local = 0.f;
  for (int64_t i = threadIdx.x; i < V; i += kRowThreads) {
    const float p = to_acc(probs[o + i]);
    if (p != 0.f) local += p * to_acc(grad[o + i]);
  }
  const float dot = block_reduce<kRowThreads>(local, Sum{}, red);
  for (int64_t i = threadIdx.x; i < V; i += kRowThreads) {
    const float p = to_acc(probs[o + i]);
    grad_x[o + i] = from_acc<scalar_t>(p != 0.f ? p * (to_acc(grad[o + i]) - dot) : 0.f);
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kRowThreads)
    topk_backward_kernel(const scalar_t* grad, const scalar_t* probs, const int64_t* indices,
                         int64_t kk, int64_t V, scalar_t* grad_x) {
  __shared__ float red[kRowThreads / kWarp];
  const int64_t r = blockIdx.x;
  float local = 0.f;
  for (int64_t j = threadIdx.x; j < kk; j += kRowThreads) {
    local += to_acc(probs[r * kk + j]) * to_acc(grad[r * kk + j]);
  }
  const float dot = block_reduce<kRowThreads>(local, Sum{}, red);
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
  __shared__ int target_kept;
  const int64_t r = blockIdx.x;
  const scalar_t* row = logits + r * V;
  scalar_t* g = grad + r * V;
  const int64_t t = target[r];
  const float gl = t == ignore_index ? 0.f : grad_loss[r];
  const float l = lse[r];
  if (kk == 0) {  // the plain softmax: the whole row is read
    for (int64_t i = threadIdx.x; i < V; i += kRowThreads) {
      const float p = t == ignore_index ? 0.f : expf(to_acc(row[i]) - l);
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
    const float p = expf(to_acc(row[i]) - l);
    if (i == t) target_kept = 1;
    g[i] = from_acc<scalar_t>(gl * (p - (i == t ? 1.f : 0.f)));
  }
  __syncthreads();
  if (threadIdx.x == 0 && !target_kept) g[t] = from_acc<scalar_t>(-gl);
}

template <typename scalar_t>
__global__ void __launch_bounds__(kRowThreads)
    taylor_kernel(const scalar_t* x, int64_t V, int order, scalar_t* out) {
  __shared__ float red[kRowThreads / kWarp];
  const int64_t o = int64_t(blockIdx.x) * V;
  float local = 0.f;
  for (int64_t i = threadIdx.x; i < V; i += kRowThreads) {
    local += Taylor<float>::at(to_acc(x[o + i]), order).f;
  }
  const float S = block_reduce<kRowThreads>(local, Sum{}, red);
  for (int64_t i = threadIdx.x; i < V; i += kRowThreads) {
    out[o + i] = from_acc<scalar_t>(Taylor<float>::at(to_acc(x[o + i]), order).f / S);
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kRowThreads)
    taylor_backward_kernel(const scalar_t* grad, const scalar_t* x, const scalar_t* out,
                           int64_t V, int order, scalar_t* grad_x) {
  __shared__ float red[kRowThreads / kWarp];
  const int64_t o = int64_t(blockIdx.x) * V;
  float s_local = 0.f, dot_local = 0.f;
  for (int64_t i = threadIdx.x; i < V; i += kRowThreads) {
    s_local += Taylor<float>::at(to_acc(x[o + i]), order).f;
    dot_local += to_acc(grad[o + i]) * to_acc(out[o + i]);
  }
  const float inv = 1.f / block_reduce<kRowThreads>(s_local, Sum{}, red);
  const float dot = block_reduce<kRowThreads>(dot_local, Sum{}, red);
  for (int64_t i = threadIdx.x; i < V; i += kRowThreads) {
    const float df = Taylor<float>::at(to_acc(x[o + i]), order).df;
    grad_x[o + i] = from_acc<scalar_t>(df * inv * (to_acc(grad[o + i]) - dot));
  }
}

// Entropy normalisation. L_i = log p_i is recomputed from p; -inf marks a zero.
__device__ __forceinline__ bool on_support(float L) { return L != -INFINITY; }

// One row's Newton steps: log q_t = G[t] L - logZ[t]; steps[t] as in EntropyStep.
struct TraceSlot {
  float G, logZ, H, D, u, gamma;
};

// Runs the iterations; writes the trace when `trace` is not null. Returns the last slot.
template <typename scalar_t>
__device__ TraceSlot entropy_trace(const scalar_t* p, int64_t V, float target, int iters,
                                   float* red, TraceSlot* trace) {
  TraceSlot s{1.f, 0.f, 0.f, 0.f, 0.f, 1.f};
  for (int t = 0; t < iters; ++t) {
    float qL = 0.f, qL2 = 0.f;
    for (int64_t i = threadIdx.x; i < V; i += kRowThreads) {
      const float L = logf(to_acc(p[i]));
      if (!on_support(L)) continue;
      const float Lt = s.G * L - s.logZ;
      const float q = expf(Lt);
      qL += q * Lt;
      qL2 += q * Lt * Lt;
    }
    qL = block_reduce<kRowThreads>(qL, Sum{}, red);
    qL2 = block_reduce<kRowThreads>(qL2, Sum{}, red);
    const EntropyStep<float> step = EntropyStep<float>::of(qL, qL2, target);
    s.H = step.H;
    s.D = step.D;
    s.u = step.u;
    s.gamma = step.gamma;
    if (trace && threadIdx.x == 0) trace[t] = s;
    const float g = s.G * step.gamma;
    float m = -INFINITY;
    for (int64_t i = threadIdx.x; i < V; i += kRowThreads) {
      const float L = logf(to_acc(p[i]));
      if (on_support(L)) m = NanMax{}(m, g * L);
    }
    m = block_reduce<kRowThreads>(m, NanMax{}, red);
    float sum = 0.f;
    for (int64_t i = threadIdx.x; i < V; i += kRowThreads) {
      const float L = logf(to_acc(p[i]));
      if (on_support(L)) sum += expf(g * L - m);
    }
    s.G = g;
    s.logZ = m + logf(block_reduce<kRowThreads>(sum, Sum{}, red));
  }
  if (trace && threadIdx.x == 0) trace[iters] = s;
  return s;
}

template <typename scalar_t>
__global__ void __launch_bounds__(kRowThreads)
    entropy_kernel(const scalar_t* p, const float* target, int64_t V, int iters, scalar_t* out) {
  __shared__ float red[kRowThreads / kWarp];
  const int64_t o = int64_t(blockIdx.x) * V;
  const TraceSlot s = entropy_trace(p + o, V, target[blockIdx.x], iters, red, nullptr);
  for (int64_t i = threadIdx.x; i < V; i += kRowThreads) {
    const float L = logf(to_acc(p[o + i]));
    out[o + i] = from_acc<scalar_t>(on_support(L) ? expf(s.G * L - s.logZ) : 0.f);
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kRowThreads)
    entropy_backward_kernel(const scalar_t* grad, const scalar_t* p, const float* target,
                            int64_t V, int iters, scalar_t* grad_p, float* grad_target,
                            float* adjoint, TraceSlot* traces) {
  __shared__ float red[kRowThreads / kWarp];
  const int64_t r = blockIdx.x, o = r * V;
  TraceSlot* trace = traces + r * (iters + 1);
  float* adj = adjoint + o;
  for (int64_t i = threadIdx.x; i < V; i += kRowThreads) adj[i] = to_acc(grad[o + i]);
  entropy_trace(p + o, V, target[r], iters, red, trace);
  __syncthreads();  // the trace written by thread 0 is visible to the block
  float target_bar = 0.f;
  for (int t = iters - 1; t >= 0; --t) {
    // log q_t = Gc L - Zc and log q_{t+1} = Gn L - Zn; the step's scalars are read
    // only once the sums are in, to keep the sweeps light on registers.
    const float Gc = trace[t].G, Zc = trace[t].logZ, Gn = trace[t + 1].G, Zn = trace[t + 1].logZ;
    float c = 0.f, mean_L = 0.f, gL = 0.f;
    for (int64_t i = threadIdx.x; i < V; i += kRowThreads) {
      const float L = logf(to_acc(p[o + i]));
      if (!on_support(L)) continue;
      const float Lt = Gc * L - Zc;
      const float qn = expf(Gn * L - Zn);
      c += adj[i] * qn;
      mean_L += qn * Lt;
      gL += adj[i] * qn * Lt;
    }
    c = block_reduce<kRowThreads>(c, Sum{}, red);
    mean_L = block_reduce<kRowThreads>(mean_L, Sum{}, red);
    gL = block_reduce<kRowThreads>(gL, Sum{}, red);
    const TraceSlot step = trace[t];
    const float gamma_bar = gL - c * mean_L;
    float H_bar = 0.f, M_bar = 0.f;
    if (step.D != 0.f) {
      H_bar = -gamma_bar * (1.f + 2.f * step.H * step.u) / step.D;
      M_bar = gamma_bar * step.u / step.D;
      target_bar += gamma_bar / step.D;
    }
    const float gamma = step.gamma;
    for (int64_t i = threadIdx.x; i < V; i += kRowThreads) {
      const float L = logf(to_acc(p[o + i]));
      if (!on_support(L)) {
        adj[i] = 0.f;
        continue;
      }
      const float Lt = Gc * L - Zc;
      adj[i] = -H_bar * (Lt + 1.f) + M_bar * (Lt * Lt + 2.f * Lt) +
               gamma * expf(Gn * L - Zn - Lt) * (adj[i] - c);
    }
  }
  for (int64_t i = threadIdx.x; i < V; i += kRowThreads) {
    const float L = logf(to_acc(p[o + i]));
    grad_p[o + i] = from_acc<scalar_t>(on_support(L) ? adj[i] : 0.f);
  }
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
    softmax_backward_kernel<T><<<grid, block, 0, stream>>>(as<T>(grad), as<T>(probs), s.V,
                                                           as<T>(grad_x));
  });
}

cudaError_t topk_softmax_backward(const void* grad, const void* probs, const int64_t* indices,
                                  RowShape s, int64_t kk, void* grad_x, DType dtype,
                                  cudaStream_t stream) {
  return launch_rows(s, dtype, [&](auto tag, dim3 grid, dim3 block) {
    using T = decltype(tag);
    topk_backward_kernel<T><<<grid, block, 0, stream>>>(as<T>(grad), as<T>(probs), indices, kk,
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
    cross_entropy_backward_kernel<T><<<grid, block, 0, stream>>>(
        grad_loss, as<T>(logits), target, lse, indices, s.V, kk, ignore_index, as<T>(grad));
  });
}

cudaError_t taylor_softmax_forward(const void* x, RowShape s, int order, void* out, DType dtype,
                                   cudaStream_t stream) {
  return launch_rows(s, dtype, [&](auto tag, dim3 grid, dim3 block) {
    using T = decltype(tag);
    taylor_kernel<T><<<grid, block, 0, stream>>>(as<T>(x), s.V, order, as<T>(out));
  });
}

cudaError_t taylor_softmax_backward(const void* grad, const void* x, const void* out, RowShape s,
                                    int order, void* grad_x, DType dtype, cudaStream_t stream) {
  return launch_rows(s, dtype, [&](auto tag, dim3 grid, dim3 block) {
    using T = decltype(tag);
    taylor_backward_kernel<T><<<grid, block, 0, stream>>>(as<T>(grad), as<T>(x), as<T>(out), s.V,
                                                          order, as<T>(grad_x));
  });
}

cudaError_t entropy_normalize_forward(const void* p, const float* target, RowShape s, int iters,
                                      void* out, DType dtype, cudaStream_t stream) {
  return launch_rows(s, dtype, [&](auto tag, dim3 grid, dim3 block) {
    using T = decltype(tag);
    entropy_kernel<T><<<grid, block, 0, stream>>>(as<T>(p), target, s.V, iters, as<T>(out));
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
    entropy_backward_kernel<T><<<grid, block, 0, stream>>>(as<T>(grad), as<T>(p), target, s.V,
                                                           iters, as<T>(grad_p), grad_target, adj,
                                                           traces);
  });
}

}  // namespace seqfuse::cuda
