// CPU row-wise normalisers. Rows are independent work items spread over threads;
// each row is a contiguous sweep (maths: csrc/common/row_softmax.h).
//
// Top-k never sorts the row: one pass keeps the k best entries seen so far in a
// heap whose root is the weakest of them. Ranked by (value, lower index), and scanned
// in index order, an entry enters only when its key beats the root's; chunks of 16
// entries all below the root's value are skipped by a vectorised comparison, so after
// the first few thousand entries the pass runs at memory speed. Dense [R, V] outputs
// and gradients are advised onto huge pages before their first write (huge_pages.h).
// The dense sweeps (whole-row log-sum-exp, exp, the backward's dot and product) run on
// at::vec::Vectorized lanes of the accumulation type; half rows are widened lane by lane.
#include "sparse_softmax.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "../common/row_softmax.h"
#include "dtype.h"
#include "huge_pages.h"

namespace seqfuse::cpu {
namespace {

// Runs fn(begin, end) over blocks of rows in parallel, ~32k elements per task.
template <typename Fn>
void for_rows(int64_t R, int64_t V, const Fn& fn) {
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(V, 1));
  at::parallel_for(0, R, grain, fn);
}

template <typename T>
const T* ptr(const at::Tensor& t) {
  return reinterpret_cast<const T*>(t.data_ptr());
}
template <typename T>
T* mut_ptr(at::Tensor& t) {
  return reinterpret_cast<T*>(t.data_ptr());
}

template <typename acc_t>
acc_t nan_max(acc_t a, acc_t b) {
  return (b > a || b != b) ? b : a;
}

// The log-sum-exp of n values produced by value(j), as its maximum and sum (KeptLse);
// NaN in, NaN out.
template <typename acc_t, typename Fn>
KeptLse<acc_t> logsumexp(int64_t n, const Fn& value) {
  acc_t m = -std::numeric_limits<acc_t>::infinity();
  for (int64_t j = 0; j < n; ++j) m = nan_max(m, value(j));
  acc_t s = 0;
  for (int64_t j = 0; j < n; ++j) s += std::exp(value(j) - m);
  return {m, s, std::log(s)};
}

template <typename scalar_t>
using AccVec = at::vec::Vectorized<typename Types<scalar_t>::acc>;

// n <= AccVec::size() entries of p as accumulation lanes; lanes past n are zero.
template <typename scalar_t>
AccVec<scalar_t> load_acc(const scalar_t* p, int64_t n) {
  using Vec = AccVec<scalar_t>;
  using acc_t = typename Types<scalar_t>::acc;
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return n == Vec::size() ? Vec::loadu(p) : Vec::loadu(p, n);
  } else {
    acc_t lanes[Vec::size()] = {};
    for (int64_t j = 0; j < n; ++j) lanes[j] = acc_t(p[j]);
    return Vec::loadu(lanes);
  }
}

// Stores the first n <= AccVec::size() lanes of v to p, rounded to scalar_t.
template <typename scalar_t>
void store_acc(const AccVec<scalar_t>& v, scalar_t* p, int64_t n) {
  using Vec = AccVec<scalar_t>;
  using acc_t = typename Types<scalar_t>::acc;
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    v.store(p, int(n));
  } else {
    acc_t lanes[Vec::size()];
    v.store(lanes);
    for (int64_t j = 0; j < n; ++j) p[j] = scalar_t(lanes[j]);
  }
}

// Calls fn(i, n) for the lane groups [i, i + n) of [0, V), n = AccVec::size() but at
// the tail.
template <typename scalar_t, typename Fn>
void for_lanes(int64_t V, const Fn& fn) {
  constexpr int64_t kLanes = AccVec<scalar_t>::size();
  for (int64_t i = 0; i < V; i += kLanes) fn(i, std::min(kLanes, V - i));
}

// The log-sum-exp of a whole row, as logsumexp above.
template <typename scalar_t>
KeptLse<typename Types<scalar_t>::acc> row_logsumexp(const scalar_t* row, int64_t V) {
  using acc_t = typename Types<scalar_t>::acc;
  using Vec = AccVec<scalar_t>;
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
  Vec m_lanes(kNegInf);
  for_lanes<scalar_t>(V, [&](int64_t i, int64_t n) {
    // Tail lanes load as 0: they must not raise the maximum, so -inf takes their place.
    Vec x = load_acc(row + i, n);
    if (n < Vec::size()) x = Vec::set(Vec(kNegInf), x, n);
    m_lanes = at::vec::maximum(m_lanes, x);  // propagates NaN
  });
  acc_t m = kNegInf;
  acc_t lanes[Vec::size()];
  m_lanes.store(lanes);
  for (int64_t j = 0; j < Vec::size(); ++j) m = nan_max(m, lanes[j]);
  Vec s_lanes(acc_t(0));
  const Vec mv(m);
  for_lanes<scalar_t>(V, [&](int64_t i, int64_t n) {
    const Vec e = (load_acc(row + i, n) - mv).exp();
    s_lanes += n < Vec::size() ? Vec::set(Vec(acc_t(0)), e, n) : e;
  });
  s_lanes.store(lanes);
  acc_t s = 0;
  for (int64_t j = 0; j < Vec::size(); ++j) s += lanes[j];
  return {m, s, std::log(s)};
}

// The top-k selection of one row at a time (see the top of this file).
template <typename scalar_t>
class TopK {
 public:
  using acc_t = typename Types<scalar_t>::acc;
  using key_t = typename OrderKey<acc_t>::type;
  using Entry = Ranked<key_t>;

  // The min(k, V) best entries of row, in heap order.
  const std::vector<Entry>& select(const scalar_t* row, int64_t V, int64_t k) {
    constexpr int64_t kChunk = 16;
    const int64_t kk = std::min(k, V);
    heap_.clear();
    for (int64_t i = 0; i < kk; ++i) heap_.push_back({order_key(acc_t(row[i])), i});
    std::make_heap(heap_.begin(), heap_.end(), root_is_weakest);
    acc_t floor = acc_t(row[heap_.front().index]);
    int64_t i = kk;
    while (i < V) {
      if (i + kChunk <= V) {
        int reaches = 0;
        for (int64_t j = 0; j < kChunk; ++j) reaches |= !(acc_t(row[i + j]) < floor);
        if (!reaches) {
          i += kChunk;
          continue;
        }
      }
      for (const int64_t end = std::min(i + kChunk, V); i < end; ++i) {
        if (acc_t(row[i]) < floor) continue;
        const key_t key = order_key(acc_t(row[i]));
        if (key <= heap_.front().key) continue;  // a tie loses: its index is higher
        std::pop_heap(heap_.begin(), heap_.end(), root_is_weakest);
        heap_.back() = {key, i};
        std::push_heap(heap_.begin(), heap_.end(), root_is_weakest);
        floor = acc_t(row[heap_.front().index]);
      }
    }
    return heap_;
  }

  // The selection, best first.
  const std::vector<Entry>& select_sorted(const scalar_t* row, int64_t V, int64_t k) {
    select(row, V, k);
    std::sort_heap(heap_.begin(), heap_.end(), root_is_weakest);
    return heap_;
  }

 private:
  static bool root_is_weakest(const Entry& a, const Entry& b) { return a.outranks(b); }
  std::vector<Entry> heap_;
};

template <typename scalar_t>
void sparse_softmax_kernel(const scalar_t* x, int64_t R, int64_t V, int64_t k, scalar_t* out) {
  using acc_t = typename Types<scalar_t>::acc;
  for_rows(R, V, [&](int64_t begin, int64_t end) {
    TopK<scalar_t> topk;
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* row = x + r * V;
      scalar_t* o = out + r * V;
      if (k >= V) {
        const KeptLse<acc_t> lse = row_logsumexp(row, V);
        const AccVec<scalar_t> m(lse.m), inv_s(acc_t(1) / lse.s);
        for_lanes<scalar_t>(V, [&](int64_t i, int64_t n) {
          store_acc((load_acc(row + i, n) - m).exp() * inv_s, o + i, n);
        });
        continue;
      }
      const auto& top = topk.select(row, V, k);
      auto value = [&](int64_t j) { return acc_t(row[top[j].index]); };
      const KeptLse<acc_t> lse = logsumexp<acc_t>(k, value);
      // A NaN normaliser (NaN in the row, a kept +inf, or nothing above -inf) poisons
      // the whole row, as the dense reference does; other rows are untouched.
      std::fill_n(o, V, scalar_t(lse.s != lse.s ? lse.s : acc_t(0)));
      for (int64_t j = 0; j < k; ++j) {
        o[top[j].index] = scalar_t(std::exp(value(j) - lse.m) / lse.s);
      }
    }
  });
}

template <typename scalar_t>
void softmax_backward_kernel(const scalar_t* grad, const scalar_t* probs, int64_t R, int64_t V,
                             scalar_t* grad_x) {
  using acc_t = typename Types<scalar_t>::acc;
  for_rows(R, V, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* g = grad + r * V;
      const scalar_t* p = probs + r * V;
      scalar_t* dx = grad_x + r * V;
      // Entries outside Omega_k (p = 0) take no part, even where g is inf or NaN.
      using Vec = AccVec<scalar_t>;
      const Vec zero(acc_t(0));
      Vec dot_lanes = zero;
      for_lanes<scalar_t>(V, [&](int64_t i, int64_t n) {
        const Vec pi = load_acc(p + i, n);
        dot_lanes += Vec::blendv(zero, pi * load_acc(g + i, n), pi != zero);
      });
      acc_t lanes[Vec::size()];
      dot_lanes.store(lanes);
      acc_t dot_sum = 0;
      for (int64_t j = 0; j < Vec::size(); ++j) dot_sum += lanes[j];
      const Vec dot(dot_sum);
      for_lanes<scalar_t>(V, [&](int64_t i, int64_t n) {
        const Vec pi = load_acc(p + i, n);
        store_acc(Vec::blendv(zero, pi * (load_acc(g + i, n) - dot), pi != zero), dx + i, n);
      });
    }
  });
}

template <typename scalar_t>
void topk_softmax_kernel(const scalar_t* x, int64_t R, int64_t V, int64_t kk, scalar_t* probs,
                         int64_t* indices) {
  using acc_t = typename Types<scalar_t>::acc;
  for_rows(R, V, [&](int64_t begin, int64_t end) {
    TopK<scalar_t> topk;
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* row = x + r * V;
      const auto& top = topk.select_sorted(row, V, kk);
      auto value = [&](int64_t j) { return acc_t(row[top[j].index]); };
      const KeptLse<acc_t> lse = logsumexp<acc_t>(kk, value);
      for (int64_t j = 0; j < kk; ++j) {
        probs[r * kk + j] = scalar_t(std::exp(value(j) - lse.m) / lse.s);
        indices[r * kk + j] = top[j].index;
      }
    }
  });
}

template <typename scalar_t>
void topk_softmax_backward_kernel(const scalar_t* grad, const scalar_t* probs,
                                  const int64_t* indices, int64_t R, int64_t kk, int64_t V,
                                  scalar_t* grad_x) {
  using acc_t = typename Types<scalar_t>::acc;
  for_rows(R, V, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* g = grad + r * kk;
      const scalar_t* p = probs + r * kk;
      acc_t dot = 0;
      for (int64_t j = 0; j < kk; ++j) dot += acc_t(p[j]) * acc_t(g[j]);
      scalar_t* dx = grad_x + r * V;
      std::fill_n(dx, V, scalar_t(0));
      for (int64_t j = 0; j < kk; ++j) {
        dx[indices[r * kk + j]] = scalar_t(acc_t(p[j]) * (acc_t(g[j]) - dot));
      }
    }
  });
}

template <typename scalar_t>
void cross_entropy_kernel(const scalar_t* logits, const int64_t* target, int64_t N, int64_t V,
                          int64_t k, int64_t ignore_index,
                          typename Types<scalar_t>::acc* loss,
                          typename Types<scalar_t>::acc* lse, int64_t* indices) {
  using acc_t = typename Types<scalar_t>::acc;
  for_rows(N, V, [&](int64_t begin, int64_t end) {
    TopK<scalar_t> topk;
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* row = logits + r * V;
      KeptLse<acc_t> kept;
      if (k >= V) {
        kept = row_logsumexp(row, V).for_loss();
      } else {
        const auto& top = topk.select(row, V, k);
        kept = logsumexp<acc_t>(k, [&](int64_t j) { return acc_t(row[top[j].index]); })
                   .for_loss();
        for (int64_t j = 0; j < k; ++j) indices[r * k + j] = top[j].index;
      }
      lse[2 * r] = kept.m;
      lse[2 * r + 1] = kept.log_s;
      const int64_t t = target[r];
      loss[r] = t == ignore_index ? acc_t(0) : (kept.m - acc_t(row[t])) + kept.log_s;
    }
  });
}

template <typename scalar_t>
void cross_entropy_backward_kernel(const typename Types<scalar_t>::acc* grad_loss,
                                   const scalar_t* logits, const int64_t* target,
                                   const typename Types<scalar_t>::acc* lse,
                                   const int64_t* indices, int64_t N, int64_t V, int64_t kk,
                                   int64_t ignore_index, scalar_t* grad) {
  using acc_t = typename Types<scalar_t>::acc;
  for_rows(N, V, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* row = logits + r * V;
      scalar_t* g = grad + r * V;
      const int64_t t = target[r];
      if (t == ignore_index) {
        std::fill_n(g, V, scalar_t(0));
        continue;
      }
      const acc_t gl = grad_loss[r], m = lse[2 * r], log_s = lse[2 * r + 1];
      // Only the k selected logits are read: the rest of the gradient is zero.
      if (kk == 0) {
        const AccVec<scalar_t> glv(gl), mv(m), log_sv(log_s);
        for_lanes<scalar_t>(V, [&](int64_t i, int64_t n) {
          store_acc(glv * ((load_acc(row + i, n) - mv) - log_sv).exp(), g + i, n);
        });
      } else {
        std::fill_n(g, V, scalar_t(0));
        for (int64_t j = 0; j < kk; ++j) {
          const int64_t i = indices[r * kk + j];
          g[i] = scalar_t(gl * std::exp((acc_t(row[i]) - m) - log_s));
        }
      }
      g[t] = scalar_t(acc_t(g[t]) - gl);
    }
  });
}

// The row's TaylorRow (csrc/common/row_softmax.h): the plain sum, or the scaled one
// where that is not finite.
template <typename acc_t, typename scalar_t>
TaylorRow<acc_t> taylor_row(const scalar_t* row, int64_t V, int order) {
  TaylorRow<acc_t> t{order, false, 0, acc_t(0)};
  for (int64_t i = 0; i < V; ++i) t.S += Taylor<acc_t>::at(acc_t(row[i]), order).f;
  if (std::isfinite(t.S)) return t;
  t.scaled = true;
  for (int64_t i = 0; i < V; ++i) {
    const acc_t x = acc_t(row[i]);
    if (std::isfinite(x)) t.E = std::max(t.E, ScaledTaylor<acc_t>::at(x, order).e);
  }
  t.S = 0;
  for (int64_t i = 0; i < V; ++i) t.S += t.term(acc_t(row[i]));
  return t;
}

template <typename scalar_t>
void taylor_kernel(const scalar_t* x, int64_t R, int64_t V, int order, scalar_t* out) {
  using acc_t = typename Types<scalar_t>::acc;
  for_rows(R, V, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* row = x + r * V;
      const TaylorRow<acc_t> t = taylor_row<acc_t>(row, V, order);
      for (int64_t i = 0; i < V; ++i) out[r * V + i] = scalar_t(t.normalised(acc_t(row[i])).f);
    }
  });
}

template <typename scalar_t>
void taylor_backward_kernel(const scalar_t* grad, const scalar_t* x, const scalar_t* out,
                            int64_t R, int64_t V, int order, scalar_t* grad_x) {
  using acc_t = typename Types<scalar_t>::acc;
  for_rows(R, V, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t o = r * V;
      const TaylorRow<acc_t> t = taylor_row<acc_t>(x + o, V, order);
      acc_t dot = 0;
      for (int64_t i = 0; i < V; ++i) dot += acc_t(grad[o + i]) * acc_t(out[o + i]);
      for (int64_t i = 0; i < V; ++i) {
        const acc_t df = t.normalised(acc_t(x[o + i])).df;
        grad_x[o + i] = scalar_t(df * (acc_t(grad[o + i]) - dot));
      }
    }
  });
}

// The row sums of entropy normalisation run in double for float rows: a sequential
// float sum over thousands of entries carries V ulp, and the Newton steps amplify it
// (CUDA's block reductions sum in a tree).
template <typename acc_t>
using EntropySum = std::conditional_t<std::is_same_v<acc_t, float>, double, acc_t>;

// Every Newton step of one row, from L = log p (-inf off the support): the iterates
// it[t] (log q_t = it[t].log_q(L)) and the steps' scalars.
template <typename acc_t>
struct EntropyTrace {
  std::vector<EntropyIterate<acc_t>> it;
  std::vector<EntropyStep<acc_t>> steps;
  acc_t L_min, L_max;  // over the support

  static bool on_support(acc_t L) { return L != -std::numeric_limits<acc_t>::infinity(); }

  void run(const acc_t* L, int64_t V, acc_t target, int64_t iters) {
    L_min = std::numeric_limits<acc_t>::infinity();
    L_max = -std::numeric_limits<acc_t>::infinity();
    for (int64_t i = 0; i < V; ++i) {
      if (!on_support(L[i])) continue;
      L_min = -nan_max(-L_min, -L[i]);
      L_max = nan_max(L_max, L[i]);
    }
    it.assign(1, EntropyIterate<acc_t>::input());
    steps.clear();
    for (int64_t t = 0; t < iters; ++t) {
      EntropySum<acc_t> sum_qL = 0, sum_qL2 = 0;
      for (int64_t i = 0; i < V; ++i) {
        if (!on_support(L[i])) continue;
        const acc_t l = it[t].log_q(L[i]);
        const acc_t q = std::exp(l);
        if (q == acc_t(0)) continue;
        sum_qL += q * l;
        sum_qL2 += q * l * l;
      }
      steps.push_back(EntropyStep<acc_t>::of(acc_t(sum_qL), acc_t(sum_qL2), target));
      EntropyIterate<acc_t> next = it[t].next(steps.back().gamma, L_min, L_max);
      EntropySum<acc_t> s = 0;
      for (int64_t i = 0; i < V; ++i) {
        if (on_support(L[i])) s += std::exp(next.log_q(L[i]));
      }
      next.z = std::log(acc_t(s));
      it.push_back(next);
    }
  }
};

template <typename scalar_t>
void entropy_kernel(const scalar_t* p, const typename Types<scalar_t>::acc* target, int64_t R,
                    int64_t V, int64_t iters, scalar_t* out) {
  using acc_t = typename Types<scalar_t>::acc;
  for_rows(R, V, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> L(V);
    EntropyTrace<acc_t> trace;
    for (int64_t r = begin; r < end; ++r) {
      for (int64_t i = 0; i < V; ++i) L[i] = std::log(acc_t(p[r * V + i]));
      trace.run(L.data(), V, target[r], iters);
      const EntropyIterate<acc_t>& last = trace.it.back();
      for (int64_t i = 0; i < V; ++i) {
        out[r * V + i] = scalar_t(trace.on_support(L[i]) ? std::exp(last.log_q(L[i])) : acc_t(0));
      }
    }
  });
}

template <typename scalar_t>
void entropy_backward_kernel(const scalar_t* grad, const scalar_t* p,
                             const typename Types<scalar_t>::acc* target, int64_t R, int64_t V,
                             int64_t iters, scalar_t* grad_p,
                             typename Types<scalar_t>::acc* grad_target) {
  using acc_t = typename Types<scalar_t>::acc;
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
  for_rows(R, V, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> L(V), adj(V);
    EntropyTrace<acc_t> trace;
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* pr = p + r * V;
      for (int64_t i = 0; i < V; ++i) L[i] = std::log(acc_t(pr[i]));
      if (iters == 0) {
        // The identity: the gradient passes through everywhere, zeros of p included.
        for (int64_t i = 0; i < V; ++i) grad_p[r * V + i] = grad[r * V + i];
        grad_target[r] = 0;
        continue;
      }
      trace.run(L.data(), V, target[r], iters);
      // a = dJ/dl at the output: g q.
      for (int64_t i = 0; i < V; ++i) {
        const bool on = trace.on_support(L[i]);
        adj[i] = on ? acc_t(grad[r * V + i]) * std::exp(trace.it[iters].log_q(L[i])) : acc_t(0);
      }
      acc_t target_bar = 0;
      for (int64_t t = iters - 1; t >= 0; --t) {
        const EntropyStep<acc_t>& s = trace.steps[t];
        const EntropyIterate<acc_t>&cur = trace.it[t], &nxt = trace.it[t + 1];
        const acc_t c = t == 0 ? trace.L_max : -cur.z;  // the row's largest l
        // l_i, or -inf where q_i is 0: zeros of p stay zero whatever p is after a step
        // (and entries below the float range add nothing), so no gradient reaches them.
        auto log_q = [&](int64_t i) { return trace.on_support(L[i]) ? cur.log_q(L[i]) : kNegInf; };
        EntropySum<acc_t> S = 0;
        for (int64_t i = 0; i < V; ++i) {
          if (log_q(i) != kNegInf) S += adj[i];
        }
        // adj <- a'_i - q'_i S, which sums to 0 (exactly 0 entry by entry on a one-hot
        // row), and gbar = sum of it times (l - c).
        EntropySum<acc_t> gbar = 0;
        for (int64_t i = 0; i < V; ++i) {
          const acc_t l = log_q(i);
          adj[i] = l == kNegInf ? acc_t(0) : adj[i] - std::exp(nxt.log_q(L[i])) * acc_t(S);
          if (l != kNegInf) gbar += EntropySum<acc_t>(adj[i]) * (l - c);
        }
        const acc_t gamma_bar = acc_t(gbar);
        acc_t H_bar = 0, M_bar = 0;
        if (s.D != acc_t(0) && gamma_bar != acc_t(0)) {
          H_bar = -gamma_bar * (acc_t(1) + acc_t(2) * s.H * s.u) / s.D;
          M_bar = gamma_bar * s.u / s.D;
          target_bar += gamma_bar / s.D;
        }
        for (int64_t i = 0; i < V; ++i) {
          const acc_t l = log_q(i);
          if (l == kNegInf) continue;
          const acc_t b = entropy_scale(s.gamma, adj[i]);
          const acc_t via_H = -H_bar * (l + acc_t(1)) + M_bar * (l * l + acc_t(2) * l);
          if (t == 0) {
            // At the input dJ/dp = a / p, the 1/p taken before the sum (q = p is not
            // multiplied in: a q of a tiny p would lose its precision).
            adj[i] = b / acc_t(pr[i]) + via_H;
          } else {
            const acc_t q = std::exp(l);
            adj[i] = q != acc_t(0) ? b + q * via_H : b;  // q l^2 -> 0 below the range
          }
        }
      }
      for (int64_t i = 0; i < V; ++i) grad_p[r * V + i] = scalar_t(adj[i]);
      grad_target[r] = target_bar;
    }
  });
}

#define SEQFUSE_DISPATCH_ROW_TYPES(dtype, name, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, name, __VA_ARGS__)

}  // namespace

void sparse_softmax_forward(const at::Tensor& x, int64_t k, at::Tensor& out) {
  advise_huge_pages(out);
  SEQFUSE_DISPATCH_ROW_TYPES(x.scalar_type(), "sparse_softmax_cpu", [&] {
    sparse_softmax_kernel(ptr<scalar_t>(x), x.size(0), x.size(1), k, mut_ptr<scalar_t>(out));
  });
}

void sparse_softmax_backward(const at::Tensor& grad, const at::Tensor& probs, at::Tensor& grad_x) {
  advise_huge_pages(grad_x);
  SEQFUSE_DISPATCH_ROW_TYPES(probs.scalar_type(), "sparse_softmax_backward_cpu", [&] {
    softmax_backward_kernel(ptr<scalar_t>(grad), ptr<scalar_t>(probs), probs.size(0),
                            probs.size(1), mut_ptr<scalar_t>(grad_x));
  });
}

void topk_softmax_forward(const at::Tensor& x, at::Tensor& probs, at::Tensor& indices) {
  SEQFUSE_DISPATCH_ROW_TYPES(x.scalar_type(), "topk_softmax_cpu", [&] {
    topk_softmax_kernel(ptr<scalar_t>(x), x.size(0), x.size(1), probs.size(1),
                        mut_ptr<scalar_t>(probs), mut_ptr<int64_t>(indices));
  });
}

void topk_softmax_backward(const at::Tensor& grad, const at::Tensor& probs,
                           const at::Tensor& indices, at::Tensor& grad_x) {
  advise_huge_pages(grad_x);
  SEQFUSE_DISPATCH_ROW_TYPES(probs.scalar_type(), "topk_softmax_backward_cpu", [&] {
    topk_softmax_backward_kernel(ptr<scalar_t>(grad), ptr<scalar_t>(probs), ptr<int64_t>(indices),
                                 probs.size(0), probs.size(1), grad_x.size(1),
                                 mut_ptr<scalar_t>(grad_x));
  });
}

void cross_entropy_forward(const at::Tensor& logits, const at::Tensor& target, int64_t k,
                           int64_t ignore_index, at::Tensor& loss, at::Tensor& lse,
                           at::Tensor& indices) {
  SEQFUSE_DISPATCH_ROW_TYPES(logits.scalar_type(), "sparse_softmax_cross_entropy_cpu", [&] {
    using acc_t = typename Types<scalar_t>::acc;
    cross_entropy_kernel(ptr<scalar_t>(logits), ptr<int64_t>(target), logits.size(0),
                         logits.size(1), k, ignore_index, mut_ptr<acc_t>(loss),
                         mut_ptr<acc_t>(lse), mut_ptr<int64_t>(indices));
  });
}

void cross_entropy_backward(const at::Tensor& grad_loss, const at::Tensor& logits,
                            const at::Tensor& target, const at::Tensor& lse,
                            const at::Tensor& indices, int64_t ignore_index,
                            at::Tensor& grad_logits) {
  advise_huge_pages(grad_logits);
  SEQFUSE_DISPATCH_ROW_TYPES(logits.scalar_type(), "sparse_softmax_cross_entropy_backward_cpu",
                             [&] {
    using acc_t = typename Types<scalar_t>::acc;
    cross_entropy_backward_kernel(ptr<acc_t>(grad_loss), ptr<scalar_t>(logits),
                                  ptr<int64_t>(target), ptr<acc_t>(lse), ptr<int64_t>(indices),
                                  logits.size(0), logits.size(1), indices.size(1), ignore_index,
                                  mut_ptr<scalar_t>(grad_logits));
  });
}

void taylor_softmax_forward(const at::Tensor& x, int64_t order, at::Tensor& out) {
  advise_huge_pages(out);
  SEQFUSE_DISPATCH_ROW_TYPES(x.scalar_type(), "taylor_softmax_cpu", [&] {
    taylor_kernel(ptr<scalar_t>(x), x.size(0), x.size(1), int(order), mut_ptr<scalar_t>(out));
  });
}

void taylor_softmax_backward(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& out,
                             int64_t order, at::Tensor& grad_x) {
  advise_huge_pages(grad_x);
  SEQFUSE_DISPATCH_ROW_TYPES(x.scalar_type(), "taylor_softmax_backward_cpu", [&] {
    taylor_backward_kernel(ptr<scalar_t>(grad), ptr<scalar_t>(x), ptr<scalar_t>(out), x.size(0),
                           x.size(1), int(order), mut_ptr<scalar_t>(grad_x));
  });
}

void entropy_normalize_forward(const at::Tensor& p, const at::Tensor& target, int64_t iters,
                               at::Tensor& out) {
  advise_huge_pages(out);
  SEQFUSE_DISPATCH_ROW_TYPES(p.scalar_type(), "entropy_normalize_cpu", [&] {
    using acc_t = typename Types<scalar_t>::acc;
    entropy_kernel(ptr<scalar_t>(p), ptr<acc_t>(target), p.size(0), p.size(1), iters,
                   mut_ptr<scalar_t>(out));
  });
}

void entropy_normalize_backward(const at::Tensor& grad, const at::Tensor& p,
                                const at::Tensor& target, int64_t iters, at::Tensor& grad_p,
                                at::Tensor& grad_target) {
  advise_huge_pages(grad_p);
  SEQFUSE_DISPATCH_ROW_TYPES(p.scalar_type(), "entropy_normalize_backward_cpu", [&] {
    using acc_t = typename Types<scalar_t>::acc;
    entropy_backward_kernel(ptr<scalar_t>(grad), ptr<scalar_t>(p), ptr<acc_t>(target), p.size(0),
                            p.size(1), iters, mut_ptr<scalar_t>(grad_p),
                            mut_ptr<acc_t>(grad_target));
  });
}

}  // namespace seqfuse::cpu
