// CPU backward of linear_sparse_softmax_cross_entropy: the gather of k + 1 weight rows
// per token and its transpose (maths: linear_cross_entropy.h). Tokens (the gather) and
// runs of one vocabulary row (the scatter) are the work items spread over threads; a
// run belongs to the task that holds its first entry, so no two threads write one row
// and the order of every sum is fixed by the sort: the result is the same on every run
// and for every thread count.
#include "linear_cross_entropy.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>

namespace seqfuse::cpu {
namespace {

// y[0..D) += a * x[0..D)
template <typename T>
void axpy(int64_t D, T a, const T* x, T* y) {
  for (int64_t d = 0; d < D; ++d) y[d] += a * x[d];
}

template <typename T>
void gather_kernel(const T* coef, const int64_t* index, const T* weight, int64_t N, int64_t J,
                   int64_t V, int64_t D, T* out) {
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(J * D, 1));
  at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      T* o = out + n * D;
      std::fill_n(o, D, T(0));
      for (int64_t j = 0; j < J; ++j) {
        const int64_t v = index[n * J + j];
        if (v < V) axpy(D, coef[n * J + j], weight + v * D, o);
      }
    }
  });
}

template <typename T>
void scatter_kernel(const int64_t* sorted, const int64_t* order, const T* coef, const T* hidden,
                    int64_t M, int64_t J, int64_t V, int64_t D, T* grad_weight, T* grad_bias) {
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(D, 1));
  at::parallel_for(0, M, grain, [&](int64_t begin, int64_t end) {
    // The runs that start in [begin, end), each followed to its end.
    for (int64_t p = begin; p < end; ++p) {
      const int64_t v = sorted[p];
      if ((p > 0 && sorted[p - 1] == v) || v >= V) continue;
      T* gw = grad_weight + v * D;
      std::fill_n(gw, D, T(0));
      T gb = 0;
      for (int64_t q = p; q < M && sorted[q] == v; ++q) {
        const int64_t e = order[q];
        axpy(D, coef[e], hidden + (e / J) * D, gw);
        gb += coef[e];
      }
      grad_bias[v] = gb;
    }
  });
}

}  // namespace

void gather_weight_rows(const at::Tensor& coef, const at::Tensor& index,
                        const at::Tensor& weight, at::Tensor& out) {
  AT_DISPATCH_FLOATING_TYPES(weight.scalar_type(), "gather_weight_rows", [&] {
    gather_kernel<scalar_t>(coef.data_ptr<scalar_t>(), index.data_ptr<int64_t>(),
                            weight.data_ptr<scalar_t>(), coef.size(0), coef.size(1),
                            weight.size(0), weight.size(1), out.data_ptr<scalar_t>());
  });
}

void scatter_weight_rows(const at::Tensor& sorted, const at::Tensor& order,
                         const at::Tensor& coef, const at::Tensor& hidden, int64_t J,
                         at::Tensor& grad_weight, at::Tensor& grad_bias) {
  AT_DISPATCH_FLOATING_TYPES(hidden.scalar_type(), "scatter_weight_rows", [&] {
    scatter_kernel<scalar_t>(sorted.data_ptr<int64_t>(), order.data_ptr<int64_t>(),
                             coef.data_ptr<scalar_t>(), hidden.data_ptr<scalar_t>(),
                             sorted.numel(), J, grad_weight.size(0), grad_weight.size(1),
                             grad_weight.data_ptr<scalar_t>(),
                             grad_bias.data_ptr<scalar_t>());
  });
}

}  // namespace seqfuse::cpu
