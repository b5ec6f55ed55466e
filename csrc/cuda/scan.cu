// CUDA linear recurrence scan: one pass over memory with decoupled look-back.
//
//   h_t = a_t * h_{t-1} + b_t                      (maths: csrc/common/scan.h)
//
// A block owns a tile of 32 channels of one batch row (lane = channel, so every warp
// access is coalesced) and a chunk of kChunk time steps (warp w holds kSteps of them
// in registers). Blocks take tiles in chunk-major order from an atomic counter, so a
// block only ever waits on chunks that have already started. Each block
//   1. composes its steps into one affine map per channel (thread, then warp level),
//   2. publishes that aggregate, looks back over earlier chunks of its channels until
//      it meets a published inclusive prefix, and publishes its own inclusive prefix,
//   3. replays its registers from the resulting carry-in and writes the outputs.
// a and b are read once and h written once, whatever the ratio of B*C to T.
//
// The backward pass is the same kernel walking the other way over
//   g_p = dL/dh_p + conj(a_{p+1}) * g_{p+1}
// with an epilogue writing db = g, da = g * conj(h_{p-1}) and dh0.
//
// Packed sequences (cu_seqlens) are one row of steps in which each sequence's first
// step (in the direction of the walk) cuts the carry: h = a h0[n] + b there, and the
// gradient walk starts afresh at each sequence's last step. A cut is an Affine flag,
// so the look-back needs no knowledge of where sequences lie and a chunk may hold any
// number of boundaries; each step finds its sequence by a binary search of cu_seqlens.
//
// The look-back never composes the aggregates it meets: from the nearest published
// inclusive prefix it applies them one by one, in time order. The carry is then the
// same nested expression, agg_{c-1}(agg_{c-2}(... inclusive_j)), that the chunks in
// between publish as their own inclusive prefixes, bit for bit: the result does not
// depend on how far a block had to look back, i.e. on timing, and is the same on every
// run and schedule.
//
// Non-finite values. A composed map equals the recurrence only while it is finite:
// (A2 A1) x + (A2 B1 + B2) against A2 (A1 x + B1) + B2 meets inf - inf and inf * 0 where
// the recurrence has +-inf (inf times a sum against the sum of inf times its terms; the
// identity map {1, 0}, whose 0 multiplies an infinite A, as a starting point). So warp
// w's carry-in is agg_{w-1}(carry_{w-1}) only while both are finite; from the first warp
// where one is not, the channel takes the exact path: the later warps replay one after
// another, each from the last value of the one before. Everything before that warp is
// computed as without the non-finite value, so earlier outputs and the other channels
// keep their bits. The inclusive prefix is chunk_agg(carry) where both are finite, else
// the replay's last value, and the look-back applies an aggregate under the same rule,
// otherwise waiting for that chunk's own prefix. Compositions start from a step, never
// from the identity, and skip steps past T. A cut map ignores the carry, so only its B
// need be finite (Affine::applies_to).
#include <cuda/atomic>

#include "dtype.cuh"
#include "scan.h"
#include "seqlens.cuh"

namespace seqfuse::cuda {
namespace {

constexpr int kLanes = 32;
constexpr int kWarps = 8;
constexpr int kSteps = 8;
constexpr int kChunk = kWarps * kSteps;

SEQFUSE_HD int64_t chunks_for(int64_t T) { return (T + kChunk - 1) / kChunk; }

enum : int { kFlagEmpty = 0, kFlagAggregate = 1, kFlagInclusive = 2 };

// Scratch for the look-back, one slot per tile (chunk-major, as tiles are numbered).
// counter, invalid and flags must be zero at launch.
template <typename acc_t>
struct Lookback {
  unsigned* counter;
  int* invalid;  // packed sequences: validate_offsets' verdict
  int* flags;    // [tiles]
  acc_t* agg_a;  // [tiles * 32] each
  acc_t* agg_b;
  acc_t* inclusive;
  bool* agg_cut;

  __device__ void publish(int64_t tile, int lane, const Affine<acc_t>& agg) {
    agg_a[tile * kLanes + lane] = agg.A;
    agg_b[tile * kLanes + lane] = agg.B;
    agg_cut[tile * kLanes + lane] = agg.cut;
    release(tile, lane, kFlagAggregate);
  }
  __device__ void publish(int64_t tile, int lane, acc_t prefix) {
    inclusive[tile * kLanes + lane] = prefix;
    release(tile, lane, kFlagInclusive);
  }
  __device__ void release(int64_t tile, int lane, int flag) {
    __threadfence();
    __syncwarp();
    if (lane == 0) {
      ::cuda::atomic_ref<int, ::cuda::thread_scope_device>(flags[tile]).store(
          flag, ::cuda::memory_order_release);
    }
  }
  __device__ int wait(int64_t tile) const {
    ::cuda::atomic_ref<int, ::cuda::thread_scope_device> flag(flags[tile]);
    int f;
    while ((f = flag.load(::cuda::memory_order_acquire)) == kFlagEmpty) __nanosleep(32);
    return f;
  }

  __device__ void wait_inclusive(int64_t tile) const {
    ::cuda::atomic_ref<int, ::cuda::thread_scope_device> flag(flags[tile]);
    while (flag.load(::cuda::memory_order_acquire) != kFlagInclusive) __nanosleep(32);
  }

  // The carry-in of chunk `chunk` (> 0) for this lane's channel, after publishing this
  // chunk's aggregate (see the top of this file). Called by one full warp.
  __device__ acc_t carry_in(int64_t chunk, int64_t n_series, int64_t series, int lane,
                            const Affine<acc_t>& agg) {
    publish(chunk * n_series + series, lane, agg);
    int64_t j = chunk - 1;
    while (wait(j * n_series + series) != kFlagInclusive) --j;
    acc_t carry = inclusive[(j * n_series + series) * kLanes + lane];
    for (int64_t m = j + 1; m < chunk; ++m) {
      const int64_t tile = m * n_series + series;
      const int64_t slot = tile * kLanes + lane;
      const Affine<acc_t> step{agg_a[slot], agg_b[slot], agg_cut[slot]};
      if (step.applies_to(carry)) {
        carry = step.apply(carry);
      } else {
        wait_inclusive(tile);
        carry = inclusive[tile * kLanes + lane];
      }
    }
    return carry;
  }
};

// Byte offsets in the workspace; [0, values) is zeroed before each launch.
struct Layout {
  size_t counter, invalid, flags, values, stride, cuts, total;
};

template <typename acc_t>
Layout workspace_layout(const ScanGeometry& g) {
  auto align = [](size_t n) { return (n + 255) / 256 * 256; };
  const size_t tiles = size_t(g.B) * ((g.C + kLanes - 1) / kLanes) * scan_chunks(g.T);
  Layout l;
  l.counter = 0;
  l.invalid = align(sizeof(unsigned));
  l.flags = l.invalid + align(sizeof(int));
  l.values = l.flags + align(tiles * sizeof(int));
  l.stride = align(tiles * kLanes * sizeof(acc_t));
  l.cuts = l.values + 3 * l.stride;
  l.total = l.cuts + align(tiles * kLanes * sizeof(bool));
  return l;
}

template <typename acc_t>
Lookback<acc_t> lookback_in(void* workspace, const ScanGeometry& g) {
  const Layout l = workspace_layout<acc_t>(g);
  char* base = static_cast<char*>(workspace);
  return {reinterpret_cast<unsigned*>(base + l.counter), reinterpret_cast<int*>(base + l.invalid),
          reinterpret_cast<int*>(base + l.flags), reinterpret_cast<acc_t*>(base + l.values),
          reinterpret_cast<acc_t*>(base + l.values + l.stride),
          reinterpret_cast<acc_t*>(base + l.values + 2 * l.stride),
          reinterpret_cast<bool*>(base + l.cuts)};
}

// Where a step lies among packed sequences. Forward walk: the sequence's first step
// cuts the carry; backward walk: its last one (the first the gradient walk meets).
struct Boundary {
  int64_t n;   // the sequence (the row's index without cu_seqlens)
  bool first;  // the sequence's first step in scan order
  bool last;   // its last step in scan order
};

__device__ inline Boundary boundary_at(const ScanGeometry& g, int64_t bi, int64_t t) {
  if (!g.cu_seqlens) return {bi, t == g.time_at(0), t == g.time_at(g.T - 1)};
  const int64_t n = sequence_of(g.cu_seqlens, g.N, t);
  const int64_t begin = g.cu_seqlens[n], end = g.cu_seqlens[n + 1] - 1;
  return {n, t == (g.reverse ? end : begin), t == (g.reverse ? begin : end)};
}

// One resident block per SM is all the bound asks: without it ptxas held the backward
// (packed boundaries and the exact path) to 80 registers on sm_80 and spilled.
template <typename scalar_t, bool BACKWARD>
__global__ void __launch_bounds__(kWarps * kLanes, 1)
    scan_kernel(ScanArgs args, Lookback<acc_of<scalar_t>> lookback) {
  using acc_t = acc_of<scalar_t>;
  const ScanGeometry& g = args.geom;
  const auto* a = static_cast<const scalar_t*>(args.a);
  const auto* b = static_cast<const scalar_t*>(args.b);
  const auto* h0 = static_cast<const acc_t*>(args.h0);

  SEQFUSE_SHARED(unsigned, s_tile);
  SEQFUSE_SHARED(Affine<acc_t>, s_agg, [kWarps][kLanes]);
  // s_carry[w]: warp w's carry-in; s_carry[kWarps]: the inclusive prefix, when deferred.
  SEQFUSE_SHARED(acc_t, s_carry, [kWarps + 1][kLanes]);
  // Per channel: the first warp of the exact path (kWarps: none), and whether its
  // inclusive prefix was known in step 2; per block: any exact path, any deferred prefix.
  SEQFUSE_SHARED(int, s_exact_from, [kLanes]);
  SEQFUSE_SHARED(int, s_known, [kLanes]);
  SEQFUSE_SHARED(int, s_any_exact);
  SEQFUSE_SHARED(int, s_deferred);

  const int lane = threadIdx.x % kLanes;
  const int warp = threadIdx.x / kLanes;
  if (threadIdx.x == 0) s_tile = atomicAdd(lookback.counter, 1u);
  __syncthreads();

  const int64_t c_tiles = (g.C + kLanes - 1) / kLanes;
  const int64_t n_series = g.B * c_tiles;
  const int64_t chunk = s_tile / n_series;
  const int64_t series = s_tile % n_series;
  const int64_t tile = chunk * n_series + series;
  const int64_t bi = series / c_tiles;
  const int64_t c = (series % c_tiles) * kLanes + lane;
  const bool active = c < g.C;
  const int64_t q0 = chunk * kChunk + warp * kSteps;
  const bool packed = g.cu_seqlens != nullptr;
  // Packed sequences with invalid offsets: every output is NaN (seqlens.cuh).
  const bool poisoned = packed && *lookback.invalid != 0;

  // Scan position q visits forward position p = q (forward) or T-1-q (backward).
  auto position = [&](int64_t q) { return BACKWARD ? g.T - 1 - q : q; };
  auto a_at = [&](int64_t p) { return to_acc(a[g.a_offset(bi, g.time_at(p), c)]); };

  // 1. Load this thread's steps and compose them (steps past T take no part; a thread
  // with none is left with {1, 0}, which nothing composes with). A step that starts a
  // recurrence (a sequence's first step forwards, its last one backwards) cuts the
  // carry; a packed sequence's first step takes h0 here, a row's first step at its
  // carry-in.
  acc_t coef[kSteps], val[kSteps];
  bool cut[kSteps];
#pragma unroll
  for (int k = 0; k < kSteps; ++k) {
    const int64_t q = q0 + k;
    coef[k] = acc_t(1);
    val[k] = acc_t(0);
    cut[k] = false;
    if (!active || q >= g.T) continue;
    const int64_t p = position(q);
    const Boundary at = boundary_at(g, bi, g.time_at(p));
    val[k] = to_acc(b[g.offset(bi, g.time_at(p), c)]);
    if (!BACKWARD) {
      coef[k] = a_at(p);
      if (packed && at.first) {
        cut[k] = true;
        if (h0) val[k] = coef[k] * h0[at.n * g.C + c] + val[k];
      }
    } else {
      coef[k] = p + 1 < g.T ? conj_of(a_at(p + 1)) : acc_t(0);
      cut[k] = packed && at.last;
    }
  }
  Affine<acc_t> agg{coef[0], val[0], cut[0]};
#pragma unroll
  for (int k = 1; k < kSteps; ++k) {
    if (q0 + k < g.T) agg = agg.then({coef[k], val[k], cut[k]});
  }
  s_agg[warp][lane] = agg;
  __syncthreads();

  // 2. Warp 0 composes the warps that hold steps, looks back, and hands each warp its
  // carry-in: agg_{w-1}(carry_{w-1}) while both are finite; from the first warp e where
  // one is not, the channel is on the exact path and warps e+1.. take theirs from the
  // replay. The inclusive prefix is chunk_agg(carry) where both are finite (published
  // now if so in every channel), else the replay's last value (published after it).
  if (warp == 0) {
    Affine<acc_t> chunk_agg = s_agg[0][lane];
    for (int w = 1; w < kWarps && chunk * kChunk + w * kSteps < g.T; ++w) {
      chunk_agg = chunk_agg.then(s_agg[w][lane]);
    }
    const acc_t first = !BACKWARD && !packed && h0 && active ? h0[bi * g.C + c] : acc_t(0);
    acc_t carry = chunk == 0 ? first : lookback.carry_in(chunk, n_series, series, lane, chunk_agg);
    const bool known = chunk_agg.applies_to(carry);
    const bool deferred = !__all_sync(0xffffffffu, known);
    s_carry[kWarps][lane] = known ? chunk_agg.apply(carry) : acc_t(0);
    if (!deferred) lookback.publish(tile, lane, s_carry[kWarps][lane]);
    int e = kWarps;
    for (int w = 0; w < kWarps; ++w) {
      s_carry[w][lane] = carry;
      if (e < kWarps) continue;
      if (s_agg[w][lane].applies_to(carry)) {
        carry = s_agg[w][lane].apply(carry);
      } else {
        e = w;
      }
    }
    const bool any_exact = __any_sync(0xffffffffu, e < kWarps);
    s_exact_from[lane] = e;
    s_known[lane] = known;
    if (lane == 0) {
      s_any_exact = any_exact;
      s_deferred = deferred;
    }
  }
  __syncthreads();

  // 3. Replay from the carry-in and write, every warp at once; on the exact path warp
  // w > e replays in turn w - e, from the last value of warp w - 1.
  const int turns = s_any_exact ? kWarps : 1;
  const int e = s_exact_from[lane];
  const bool known = s_known[lane];
  const acc_t nan = acc_t(NAN);
  acc_t da_sum = acc_t(0);
  for (int turn = 0; turn < turns; ++turn) {
    if (turn == (warp > e ? warp - e : 0)) {
      acc_t x = s_carry[warp][lane];
#pragma unroll
      for (int k = 0; k < kSteps; ++k) {
        const int64_t q = q0 + k;
        if (!active || q >= g.T) continue;
        x = cut[k] ? val[k] : coef[k] * x + val[k];
        const int64_t p = position(q);
        const int64_t t = g.time_at(p);
        const int64_t i = g.offset(bi, t, c);
        static_cast<scalar_t*>(args.out)[i] = from_acc<scalar_t>(poisoned ? nan : x);
        if constexpr (BACKWARD) {
          const Boundary at = boundary_at(g, bi, t);
          const auto* h = static_cast<const scalar_t*>(args.h);
          const acc_t h_prev = !at.first ? to_acc(h[g.offset(bi, g.time_at(p - 1), c)])
                                         : (h0 ? h0[at.n * g.C + c] : acc_t(0));
          const acc_t da = poisoned ? nan : x * conj_of(h_prev);
          if (g.a_sT == 0) {
            da_sum += da;
          } else {
            static_cast<acc_t*>(args.grad_a)[i] = da;
          }
          if (at.first) {
            static_cast<acc_t*>(args.grad_h0)[at.n * g.C + c] =
                poisoned ? nan : conj_of(a_at(p)) * x;
          }
        }
      }
      if ((warp >= e && warp + 1 < kWarps) || (!known && warp + 1 == kWarps)) {
        s_carry[warp + 1][lane] = x;
      }
    }
    if (turns > 1) __syncthreads();
  }
  if (s_deferred) {
    __syncthreads();
    if (warp == 0) lookback.publish(tile, lane, s_carry[kWarps][lane]);
  }

  // A time-invariant `a` gets one partial sum of da per chunk instead of [B, T, C].
  if constexpr (BACKWARD) {
    if (g.a_sT == 0) {
      // Each thread read only its own s_carry slot in step 3 and writes only that one,
      // or step 3 ended on a barrier; warp 0's deferred publish reads slot kWarps,
      // which no one writes here.
      s_carry[warp][lane] = da_sum;
      __syncthreads();
      if (warp == 0 && active) {
        acc_t sum = acc_t(0);
        for (int w = 0; w < kWarps; ++w) sum += s_carry[w][lane];
        static_cast<acc_t*>(args.grad_a)[(bi * chunks_for(g.T) + chunk) * g.C + c] = sum;
      }
    }
  }
}

template <bool BACKWARD>
cudaError_t launch(const ScanArgs& args, DType dtype, cudaStream_t stream) {
  const ScanGeometry& g = args.geom;
  const int64_t tiles = g.B * ((g.C + kLanes - 1) / kLanes) * scan_chunks(g.T);
  if (tiles == 0) return cudaSuccess;
  if (tiles >= (int64_t(1) << 31)) return cudaErrorInvalidConfiguration;
  cudaError_t err = cudaErrorInvalidValue;
  dispatch_float_and_complex_types(dtype, [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc_t = acc_of<scalar_t>;
    const Layout layout = workspace_layout<acc_t>(g);
    err = cudaMemsetAsync(args.workspace, 0, layout.values, stream);
    if (err != cudaSuccess) return;
    const Lookback<acc_t> lookback = lookback_in<acc_t>(args.workspace, g);
    if (g.cu_seqlens) {
      err = validate_offsets(g.cu_seqlens, g.N, g.T, lookback.invalid, stream);
      if (err != cudaSuccess) return;
    }
    SEQFUSE_LAUNCH(unsigned(tiles), kWarps * kLanes, 0, stream, scan_kernel<scalar_t, BACKWARD>)(
        args, lookback);
    err = cudaGetLastError();
  });
  return err;
}

}  // namespace

int64_t scan_chunks(int64_t T) { return chunks_for(T); }

size_t scan_workspace_bytes(const ScanGeometry& geom, DType dtype) {
  size_t bytes = 0;
  dispatch_float_and_complex_types(dtype, [&](auto tag) {
    bytes = workspace_layout<acc_of<decltype(tag)>>(geom).total;
  });
  return bytes;
}

cudaError_t linear_scan_forward(const ScanArgs& args, DType dtype, cudaStream_t stream) {
  return launch<false>(args, dtype, stream);
}

cudaError_t linear_scan_backward(const ScanArgs& args, DType dtype, cudaStream_t stream) {
  return launch<true>(args, dtype, stream);
}

}  // namespace seqfuse::cuda
