// CPU linear recurrence scan. Work items are (batch, block of channels): each walks
// time in scan order with the block's states in a scratch array, so the inner loop is a
// contiguous, vectorisable sweep over channels and memory is streamed once.
#include "scan.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "dtype.h"

namespace seqfuse::cpu {
namespace {

// Calls fn(span, n, c0, nc, state) for every block of channels of every sequence n, in
// parallel; `state` holds 2 * nc accumulators for the caller. Blocks span whole rows
// where there are enough sequences to keep every thread busy: then consecutive time
// steps are adjacent in memory and each item reads and writes a few purely sequential
// streams.
template <typename acc_t, typename Fn>
void for_each_channel_block(const ScanGeometry& g, const Fn& fn) {
  const int64_t S = g.sequences();
  const int64_t threads = at::get_num_threads();
  const int64_t splits = std::max<int64_t>(1, (threads + S - 1) / std::max<int64_t>(S, 1));
  const int64_t block = std::max<int64_t>(16, ((g.C + splits - 1) / splits + 15) / 16 * 16);
  const int64_t blocks = (g.C + block - 1) / block;
  at::parallel_for(0, S * blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> state(2 * block);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t n = item / blocks, c0 = (item % blocks) * block;
      fn(g.span(n), n, c0, std::min(block, g.C - c0), state.data());
    }
  });
}

// a's channel stride is 1 (A_VEC) or 0 (one coefficient for every channel).
template <typename scalar_t, typename acc_t, bool A_VEC>
void forward_kernel(const ScanGeometry& g, const scalar_t* __restrict a,
                    const scalar_t* __restrict b, const acc_t* __restrict h0,
                    scalar_t* __restrict h) {
  for_each_channel_block<acc_t>(g, [&](const ScanGeometry::Span& s, int64_t n, int64_t c0,
                                       int64_t nc, acc_t* state) {
    for (int64_t c = 0; c < nc; ++c) state[c] = h0 ? h0[n * g.C + c0 + c] : acc_t(0);
    for (int64_t p = 0; p < s.length; ++p) {
      const int64_t t = g.time_in(s, p);
      const scalar_t* ap = a + g.a_offset(s.row, t, c0);
      const scalar_t* bp = b + g.offset(s.row, t, c0);
      scalar_t* hp = h + g.offset(s.row, t, c0);
      for (int64_t c = 0; c < nc; ++c) {
        state[c] = acc_t(ap[A_VEC ? c : 0]) * state[c] + acc_t(bp[c]);
        hp[c] = scalar_t(state[c]);
      }
    }
  });
}

// grad_a: [T steps] or, when a is time-invariant, one sum per sequence ([S, 1, C]).
template <typename scalar_t, typename acc_t, bool A_VEC>
void backward_kernel(const ScanGeometry& g, const scalar_t* __restrict a,
                     const scalar_t* __restrict grad_h, const scalar_t* __restrict h,
                     const acc_t* __restrict h0, scalar_t* __restrict grad_b,
                     acc_t* __restrict grad_a, acc_t* __restrict grad_h0) {
  const bool sum_over_time = g.a_sT == 0;
  for_each_channel_block<acc_t>(g, [&](const ScanGeometry::Span& s, int64_t n, int64_t c0,
                                       int64_t nc, acc_t* state) {
    acc_t* carry = state;        // g_{t(p+1)}, the gradient flowing backwards
    acc_t* da_sum = state + nc;  // only when a is time-invariant
    std::fill_n(carry, nc, acc_t(0));
    std::fill_n(da_sum, nc, acc_t(0));
    for (int64_t p = s.length - 1; p >= 0; --p) {
      const int64_t t = g.time_in(s, p);
      const scalar_t* a_next =
          p + 1 < s.length ? a + g.a_offset(s.row, g.time_in(s, p + 1), c0) : nullptr;
      const scalar_t* h_prev = p > 0 ? h + g.offset(s.row, g.time_in(s, p - 1), c0) : nullptr;
      const scalar_t* gh = grad_h + g.offset(s.row, t, c0);
      scalar_t* gb = grad_b + g.offset(s.row, t, c0);
      for (int64_t c = 0; c < nc; ++c) {
        const acc_t coef = a_next ? conj_of(acc_t(a_next[A_VEC ? c : 0])) : acc_t(0);
        carry[c] = acc_t(gh[c]) + coef * carry[c];
        gb[c] = scalar_t(carry[c]);
      }
      for (int64_t c = 0; c < nc; ++c) {
        const acc_t prev = h_prev ? acc_t(h_prev[c]) : (h0 ? h0[n * g.C + c0 + c] : acc_t(0));
        const acc_t da = carry[c] * conj_of(prev);
        if (sum_over_time) {
          da_sum[c] += da;
        } else {
          grad_a[g.offset(s.row, t, c0 + c)] = da;
        }
      }
    }
    // An empty sequence passes h0 through untouched: its gradient is zero.
    const scalar_t* a_first = s.length > 0 ? a + g.a_offset(s.row, g.time_in(s, 0), c0) : nullptr;
    for (int64_t c = 0; c < nc; ++c) {
      grad_h0[n * g.C + c0 + c] =
          a_first ? conj_of(acc_t(a_first[A_VEC ? c : 0])) * carry[c] : acc_t(0);
      if (sum_over_time) grad_a[n * g.C + c0 + c] = da_sum[c];
    }
  });
}

// Calls fn(storage_t{}, acc_t{}, a_vec) with the kernel types of `dtype` and whether
// a's channel stride is 1 (std::true_type) or 0 (std::false_type).
template <typename Fn>
void dispatch(at::ScalarType dtype, const ScanGeometry& g, const Fn& fn) {
  AT_DISPATCH_FLOATING_AND_COMPLEX_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "linear_scan_cpu", [&] {
    using storage_t = typename Types<scalar_t>::storage;
    using acc_t = typename Types<scalar_t>::acc;
    g.a_sC == 1 ? fn(storage_t{}, acc_t{}, std::true_type{})
                : fn(storage_t{}, acc_t{}, std::false_type{});
  });
}

}  // namespace

void linear_scan_forward(const ScanGeometry& g, const at::Tensor& a, const at::Tensor& b,
                         const at::Tensor& h0, at::Tensor& h) {
  dispatch(b.scalar_type(), g, [&](auto storage, auto acc, auto a_vec) {
    using storage_t = decltype(storage);
    using acc_t = decltype(acc);
    forward_kernel<storage_t, acc_t, decltype(a_vec)::value>(
        g, data_or_null<const storage_t>(a), data_or_null<const storage_t>(b), data_or_null<const acc_t>(h0),
        data_or_null<storage_t>(h));
  });
}

void linear_scan_backward(const ScanGeometry& g, const at::Tensor& a, const at::Tensor& grad_h,
                          const at::Tensor& h, const at::Tensor& h0, at::Tensor& grad_b,
                          at::Tensor& grad_a, at::Tensor& grad_h0) {
  dispatch(grad_h.scalar_type(), g, [&](auto storage, auto acc, auto a_vec) {
    using storage_t = decltype(storage);
    using acc_t = decltype(acc);
    backward_kernel<storage_t, acc_t, decltype(a_vec)::value>(
        g, data_or_null<const storage_t>(a), data_or_null<const storage_t>(grad_h), data_or_null<const storage_t>(h),
        data_or_null<const acc_t>(h0), data_or_null<storage_t>(grad_b), data_or_null<acc_t>(grad_a),
        data_or_null<acc_t>(grad_h0));
  });
}

}  // namespace seqfuse::cpu
