// CPU GlobalPointer kernels. Work items are (batch, q/k head): each rotates its q (scaled)
// and k into [L, D] scratch once, forms score tiles with ATen matmuls (MKL) and applies
// biases, masks and loss terms while a tile is hot in cache. Shared q/k (Efficient
// GlobalPointer) forms each product once for all heads, and its backward sums the heads'
// score gradients before the two matmuls. The losses walk a row's entries in flat order
// beside the sorted list of its positives, so the negative sum is formed directly.
#include "global_pointer.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "dtype.h"

namespace seqfuse::cpu {
namespace {

constexpr int64_t kRowTile = 64;

template <typename T>
at::Tensor matrix(const T* data, int64_t rows, int64_t cols, int64_t ld) {
  return at::from_blob(const_cast<T*>(data), {rows, cols}, {ld, 1},
                       at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value));
}

template <typename acc_t>
constexpr acc_t neg_inf() {
  return -std::numeric_limits<acc_t>::infinity();
}

// (cos, sin) of every pair at positions 0..L-1: [L, D/2, 2].
template <typename acc_t>
std::vector<acc_t> rope_table(int64_t L, int64_t D) {
  std::vector<acc_t> table(L * D);
  const double log_base = std::log(kScoresRopeBase);
  for (int64_t l = 0; l < L; ++l) {
    for (int64_t i = 0; i < D / 2; ++i) {
      acc_t* cs = table.data() + (l * (D / 2) + i) * 2;
      rope_cos_sin<acc_t>(double(l), i, D, log_base, false, cs[0], cs[1]);
    }
  }
  return table;
}

// Work items per task of at::parallel_for, so that a small problem runs on the calling
// thread instead of paying for a parallel region; `cost` is the work of one item.
int64_t grain(int64_t cost) {
  return std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(cost, 1));
}

// The work of one (batch, q/k head) item: its heads' products.
int64_t pair_cost(const GPGeometry& g) { return g.H / g.Hqk * g.L * g.L * g.D; }

// The output heads computed from q/k head hq: all of them when q and k are shared.
struct HeadRange {
  int64_t first, count;
};
HeadRange heads_of(const GPGeometry& g, int64_t hq) {
  return g.Hqk == 1 ? HeadRange{0, g.H} : HeadRange{hq, 1};
}

// Per-thread scratch: rq = scale * R q and rk = R k of one (batch, q/k head), [L, D].
template <typename acc_t>
struct Rotated {
  const GPGeometry& g;
  const acc_t* table;  // null without rope
  std::vector<acc_t> rq, rk;

  Rotated(const GPGeometry& geom, const std::vector<acc_t>& t)
      : g(geom), table(geom.rope ? t.data() : nullptr), rq(geom.L * geom.D), rk(geom.L * geom.D) {}

  void load(const acc_t* q, const acc_t* k, int64_t b, int64_t hq) {
    load_one(q, b, hq, acc_t(g.scale), rq.data());
    load_one(k, b, hq, acc_t(1), rk.data());
  }
  void load_one(const acc_t* src, int64_t b, int64_t hq, acc_t mult, acc_t* dst) const {
    for (int64_t l = 0; l < g.L; ++l) {
      const acc_t* x = src + g.qk_offset(b, l, hq);
      acc_t* y = dst + l * g.D;
      for (int64_t d = 0; d < g.D; ++d) y[d] = mult * x[d];
      if (table) {
        for (int64_t i = 0; i < g.D / 2; ++i) {
          const acc_t* cs = table + (l * (g.D / 2) + i) * 2;
          rope_rotate(y[2 * i], y[2 * i + 1], cs[0], cs[1]);
        }
      }
    }
  }
  // dst[b, hq] = R^T src ([B, Hqk, L, D] gradient layout).
  void store_unrotated(const acc_t* src, int64_t b, int64_t hq, acc_t* dst) const {
    acc_t* out = dst + (b * g.Hqk + hq) * g.L * g.D;
    std::copy(src, src + g.L * g.D, out);
    if (!table) return;
    for (int64_t l = 0; l < g.L; ++l) {
      for (int64_t i = 0; i < g.D / 2; ++i) {
        const acc_t* cs = table + (l * (g.D / 2) + i) * 2;
        rope_rotate(out[l * g.D + 2 * i], out[l * g.D + 2 * i + 1], cs[0], -cs[1]);
      }
    }
  }
  // tile[r, c] = rq[i0 + r] . rk[j0 + c] for rows [i0, i1) and columns [j0, L).
  void product(int64_t i0, int64_t i1, int64_t j0, acc_t* tile) const {
    const int64_t w = g.L - j0;
    at::Tensor out = matrix(tile, i1 - i0, w, w);
    at::mm_out(out, matrix(rq.data() + i0 * g.D, i1 - i0, g.D, g.D),
               matrix(rk.data() + j0 * g.D, w, g.D, g.D).t());
  }
  // grad_rq[i0:i1] += scale * ds @ rk[j0:],  grad_rk[j0:] += ds^T @ rq[i0:i1], summed over
  // the live spans (live: [n, w] like ds, nonzero where the span has a score). ds is 0
  // on the others, but a matrix product would still multiply that 0 by their q or k
  // row, and 0 * NaN would carry a non-finite q_i into dk_j of a span masked for it. So
  // rows holding a NaN or an infinity are zeroed for the products and added span by span.
  void product_backward(int64_t i0, int64_t i1, int64_t j0, const acc_t* ds, const uint8_t* live,
                        acc_t* grad_rq, acc_t* grad_rk) const {
    const int64_t w = g.L - j0, n = i1 - i0, D = g.D;
    std::vector<int64_t> bad_q = non_finite_rows(rq.data() + i0 * D, n);
    std::vector<int64_t> bad_k = non_finite_rows(rk.data() + j0 * D, w);
    at::Tensor dst = matrix(ds, n, w, w);
    at::Tensor gq = matrix(grad_rq + i0 * D, n, D, D);
    at::Tensor gk = matrix(grad_rk + j0 * D, w, D, D);
    at::Tensor mq = matrix(rq.data() + i0 * D, n, D, D);
    at::Tensor mk = matrix(rk.data() + j0 * D, w, D, D);
    if (!bad_k.empty()) {
      mk = mk.clone();
      for (int64_t j : bad_k) mk[j].zero_();
    }
    if (!bad_q.empty()) {
      mq = mq.clone();
      for (int64_t i : bad_q) mq[i].zero_();
    }
    gq.addmm_(dst, mk, 1, g.scale);
    gk.addmm_(dst.t(), mq);
    for (int64_t j : bad_k) {
      const acc_t* x = rk.data() + (j0 + j) * D;
      for (int64_t i = 0; i < n; ++i) {
        if (!live[i * w + j]) continue;
        const acc_t f = acc_t(g.scale) * ds[i * w + j];
        for (int64_t d = 0; d < D; ++d) grad_rq[(i0 + i) * D + d] += f * x[d];
      }
    }
    for (int64_t i : bad_q) {
      const acc_t* x = rq.data() + (i0 + i) * D;
      for (int64_t j = 0; j < w; ++j) {
        if (!live[i * w + j]) continue;
        for (int64_t d = 0; d < D; ++d) grad_rk[(j0 + j) * D + d] += ds[i * w + j] * x[d];
      }
    }
  }
  std::vector<int64_t> non_finite_rows(const acc_t* x, int64_t rows) const {
    std::vector<int64_t> out;
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t d = 0; d < g.D; ++d) {
        if (!std::isfinite(x[r * g.D + d])) {
          out.push_back(r);
          break;
        }
      }
    }
    return out;
  }
};

// The positives of one row as sorted distinct flat indices (0 dropped when mask_zero).
void sorted_positives(const int64_t* idx, int64_t P, bool mask_zero, std::vector<int64_t>& out) {
  out.clear();
  for (int64_t p = 0; p < P; ++p) {
    if (!(mask_zero && idx[p] == 0)) out.push_back(idx[p]);
  }
  std::sort(out.begin(), out.end());
  out.erase(std::unique(out.begin(), out.end()), out.end());
}

// Walks flat indices in increasing order and says which are positives.
struct PositiveCursor {
  const std::vector<int64_t>* list;
  size_t at = 0;
  bool is_positive(int64_t flat) {
    while (at < list->size() && (*list)[at] < flat) ++at;
    return at < list->size() && (*list)[at] == flat;
  }
};

// ---- RoPE --------------------------------------------------------------------------

template <typename acc_t>
void rope_kernel(const acc_t* x, const int64_t* positions, int64_t B, int64_t L, int64_t H,
                 int64_t D, double base, bool inverse, acc_t* out) {
  const double log_base = std::log(base);
  at::parallel_for(0, B * L, grain(H * D), [&](int64_t begin, int64_t end) {
    for (int64_t bl = begin; bl < end; ++bl) {
      const double pos = positions ? double(positions[bl]) : double(bl % L);
      for (int64_t i = 0; i < D / 2; ++i) {
        acc_t c, s;
        rope_cos_sin<acc_t>(pos, i, D, log_base, inverse, c, s);
        for (int64_t h = 0; h < H; ++h) {
          const int64_t o = (bl * H + h) * D + 2 * i;
          acc_t x0 = x[o], x1 = x[o + 1];
          rope_rotate(x0, x1, c, s);
          out[o] = x0;
          out[o + 1] = x1;
        }
      }
    }
  });
}

// ---- scores ------------------------------------------------------------------------

template <typename acc_t>
void scores_forward_kernel(const GPGeometry& g, const acc_t* q, const acc_t* k, const uint8_t* mask,
                           const acc_t* bs, const acc_t* be, acc_t* out) {
  const auto table = g.rope ? rope_table<acc_t>(g.L, g.D) : std::vector<acc_t>();
  const int64_t LL = g.L * g.L;
  at::parallel_for(0, g.B * g.Hqk, grain(pair_cost(g)), [&](int64_t begin, int64_t end) {
    Rotated<acc_t> r(g, table);
    std::vector<acc_t> shared(g.Hqk == 1 && g.H > 1 ? LL : 0);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / g.Hqk, hq = item % g.Hqk;
      const HeadRange heads = heads_of(g, hq);
      r.load(q, k, b, hq);
      // The product lands in the first head's scores unless other heads need it too.
      acc_t* first = out + g.score_offset(b, heads.first, 0, 0);
      acc_t* prod = shared.empty() ? first : shared.data();
      r.product(0, g.L, 0, prod);
      for (int64_t h = heads.first; h < heads.first + heads.count; ++h) {
        acc_t* o = out + g.score_offset(b, h, 0, 0);
        const acc_t* bsr = bs ? bs + g.bias_offset(b, h, 0) : nullptr;
        const acc_t* ber = be ? be + g.bias_offset(b, h, 0) : nullptr;
        for (int64_t i = 0; i < g.L; ++i) {
          const acc_t bi = bsr ? bsr[i] : acc_t(0);
          for (int64_t j = 0; j < g.L; ++j) {
            o[i * g.L + j] = g.masked(mask, b, i, j)
                                 ? neg_inf<acc_t>()
                                 : prod[i * g.L + j] + bi + (ber ? ber[j] : acc_t(0));
          }
        }
      }
    }
  });
}

template <typename acc_t>
void scores_backward_kernel(const GPGeometry& g, const acc_t* grad, const acc_t* q, const acc_t* k,
                            const uint8_t* mask, acc_t* grad_q, acc_t* grad_k, acc_t* grad_bs,
                            acc_t* grad_be) {
  const auto table = g.rope ? rope_table<acc_t>(g.L, g.D) : std::vector<acc_t>();
  const int64_t LL = g.L * g.L;
  at::parallel_for(0, g.B * g.Hqk, grain(pair_cost(g)), [&](int64_t begin, int64_t end) {
    Rotated<acc_t> r(g, table);
    std::vector<acc_t> ds(LL), grq(g.L * g.D), grk(g.L * g.D);
    std::vector<uint8_t> live(LL);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / g.Hqk, hq = item % g.Hqk;
      const HeadRange heads = heads_of(g, hq);
      r.load(q, k, b, hq);
      std::fill(ds.begin(), ds.end(), acc_t(0));
      for (int64_t i = 0; i < g.L; ++i) {
        for (int64_t j = 0; j < g.L; ++j) live[i * g.L + j] = !g.masked(mask, b, i, j);
      }
      for (int64_t h = heads.first; h < heads.first + heads.count; ++h) {
        const acc_t* gr = grad + g.score_offset(b, h, 0, 0);
        acc_t* gbs = grad_bs + g.bias_offset(b, h, 0);
        acc_t* gbe = grad_be + g.bias_offset(b, h, 0);
        for (int64_t i = 0; i < g.L; ++i) {
          acc_t row = acc_t(0);
          for (int64_t j = 0; j < g.L; ++j) {
            const acc_t v = g.masked(mask, b, i, j) ? acc_t(0) : gr[i * g.L + j];
            ds[i * g.L + j] += v;
            row += v;
            gbe[j] += v;
          }
          gbs[i] = row;
        }
      }
      std::fill(grq.begin(), grq.end(), acc_t(0));
      std::fill(grk.begin(), grk.end(), acc_t(0));
      r.product_backward(0, g.L, 0, ds.data(), live.data(), grq.data(), grk.data());
      r.store_unrotated(grq.data(), b, hq, grad_q);
      r.store_unrotated(grk.data(), b, hq, grad_k);
    }
  });
}

// ---- losses on materialised scores -------------------------------------------------

template <typename acc_t>
void mce_forward_kernel(const acc_t* x, const acc_t* t, int64_t R, int64_t N, acc_t* terms) {
  at::parallel_for(0, R, grain(N), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      Log1pSumExp<acc_t> neg, pos;
      for (int64_t n = r * N; n < (r + 1) * N; ++n) {
        const acc_t s = x[n], label = t[n];
        if (s == neg_inf<acc_t>()) continue;
        if (label != acc_t(1)) neg.add(s + std::log1p(-label));
        if (label != acc_t(0)) pos.add(std::log(label) - s);
      }
      terms[2 * r] = neg.value();
      terms[2 * r + 1] = pos.value();
    }
  });
}

template <typename acc_t>
void mce_backward_kernel(const acc_t* grad_terms, const acc_t* terms, const acc_t* x,
                         const acc_t* t, int64_t R, int64_t N, acc_t* grad) {
  at::parallel_for(0, R, grain(N), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      for (int64_t n = r * N; n < (r + 1) * N; ++n) {
        grad[n] = mce_grad(x[n], acc_t(1) - t[n], t[n], terms[2 * r], terms[2 * r + 1],
                           grad_terms[2 * r], grad_terms[2 * r + 1]);
      }
    }
  });
}

template <typename acc_t>
void sparse_forward_kernel(const acc_t* x, const int64_t* idx, int64_t R, int64_t N, int64_t P,
                           bool mask_zero, acc_t* terms) {
  at::parallel_for(0, R, grain(N), [&](int64_t begin, int64_t end) {
    std::vector<int64_t> positives;
    for (int64_t r = begin; r < end; ++r) {
      sorted_positives(idx + r * P, P, mask_zero, positives);
      PositiveCursor cursor{&positives};
      Log1pSumExp<acc_t> neg, pos;
      const acc_t* row = x + r * N;
      for (int64_t n = 0; n < N; ++n) {
        if (row[n] == neg_inf<acc_t>() || padding_slot(n, mask_zero)) continue;
        if (cursor.is_positive(n)) {
          pos.add(-row[n]);
        } else {
          neg.add(row[n]);
        }
      }
      terms[2 * r] = neg.value();
      terms[2 * r + 1] = pos.value();
    }
  });
}

template <typename acc_t>
void sparse_backward_kernel(const acc_t* grad_terms, const acc_t* terms, const acc_t* x,
                            const int64_t* idx, int64_t R, int64_t N, int64_t P, bool mask_zero,
                            acc_t* grad) {
  at::parallel_for(0, R, grain(N), [&](int64_t begin, int64_t end) {
    std::vector<int64_t> positives;
    for (int64_t r = begin; r < end; ++r) {
      sorted_positives(idx + r * P, P, mask_zero, positives);
      PositiveCursor cursor{&positives};
      for (int64_t n = 0; n < N; ++n) {
        const acc_t t = cursor.is_positive(n) ? acc_t(1) : acc_t(0);
        const acc_t s = padding_slot(n, mask_zero) ? neg_inf<acc_t>() : x[r * N + n];
        grad[r * N + n] = mce_grad(s, acc_t(1) - t, t, terms[2 * r], terms[2 * r + 1],
                                   grad_terms[2 * r], grad_terms[2 * r + 1]);
      }
    }
  });
}

// ---- the fused loss ----------------------------------------------------------------

// Visits the unmasked entries of one row tile of every head served by (b, hq):
// fn(head offset, i, j, s) with s the score; columns start at j0. With mask_zero the
// padding slot (0, 0) counts as masked.
template <typename acc_t, typename Fn>
void for_each_entry(const GPGeometry& g, const uint8_t* mask, const acc_t* bs, const acc_t* be,
                    bool mask_zero, int64_t b, HeadRange heads, int64_t i0, int64_t i1,
                    int64_t j0, const acc_t* tile, const Fn& fn) {
  const int64_t w = g.L - j0;
  for (int64_t hh = 0; hh < heads.count; ++hh) {
    const int64_t h = heads.first + hh;
    const acc_t* ber = be ? be + g.bias_offset(b, h, 0) : nullptr;
    for (int64_t i = i0; i < i1; ++i) {
      if (mask && !mask[b * g.L + i]) continue;
      const acc_t bi = bs ? bs[g.bias_offset(b, h, i)] : acc_t(0);
      for (int64_t j = g.tril ? std::max(i, j0) : j0; j < g.L; ++j) {
        if ((mask && !mask[b * g.L + j]) || padding_slot(i * g.L + j, mask_zero)) continue;
        fn(hh, i, j, tile[(i - i0) * w + (j - j0)] + bi + (ber ? ber[j] : acc_t(0)));
      }
    }
  }
}

template <typename acc_t>
struct LossRows {
  std::vector<std::vector<int64_t>> positives;
  std::vector<PositiveCursor> cursors;

  void load(const GPGeometry& g, const int64_t* idx, int64_t P, bool mask_zero, int64_t b,
            HeadRange heads) {
    positives.resize(heads.count);
    cursors.clear();
    for (int64_t hh = 0; hh < heads.count; ++hh) {
      sorted_positives(idx + g.row(b, heads.first + hh) * P, P, mask_zero, positives[hh]);
      cursors.push_back(PositiveCursor{&positives[hh]});
    }
  }
};

template <typename acc_t>
void loss_forward_kernel(const GPGeometry& g, const acc_t* q, const acc_t* k, const uint8_t* mask,
                         const acc_t* bs, const acc_t* be, const int64_t* idx, int64_t P,
                         bool mask_zero, acc_t* terms) {
  const auto table = g.rope ? rope_table<acc_t>(g.L, g.D) : std::vector<acc_t>();
  at::parallel_for(0, g.B * g.Hqk, grain(pair_cost(g)), [&](int64_t begin, int64_t end) {
    Rotated<acc_t> r(g, table);
    std::vector<acc_t> tile(kRowTile * g.L);
    LossRows<acc_t> rows;
    std::vector<Log1pSumExp<acc_t>> neg, pos;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / g.Hqk, hq = item % g.Hqk;
      const HeadRange heads = heads_of(g, hq);
      r.load(q, k, b, hq);
      rows.load(g, idx, P, mask_zero, b, heads);
      neg.assign(heads.count, {});
      pos.assign(heads.count, {});
      for (int64_t i0 = 0; i0 < g.L; i0 += kRowTile) {
        const int64_t i1 = std::min(g.L, i0 + kRowTile), j0 = g.tril ? i0 : 0;
        r.product(i0, i1, j0, tile.data());
        for_each_entry(g, mask, bs, be, mask_zero, b, heads, i0, i1, j0, tile.data(),
                       [&](int64_t hh, int64_t i, int64_t j, acc_t s) {
                         if (s == neg_inf<acc_t>()) return;
                         if (rows.cursors[hh].is_positive(i * g.L + j)) {
                           pos[hh].add(-s);
                         } else {
                           neg[hh].add(s);
                         }
                       });
      }
      for (int64_t hh = 0; hh < heads.count; ++hh) {
        const int64_t row = g.row(b, heads.first + hh);
        terms[2 * row] = neg[hh].value();
        terms[2 * row + 1] = pos[hh].value();
      }
    }
  });
}

template <typename acc_t>
void loss_backward_kernel(const GPGeometry& g, const acc_t* grad_terms, const acc_t* terms,
                          const acc_t* q, const acc_t* k, const uint8_t* mask, const acc_t* bs,
                          const acc_t* be, const int64_t* idx, int64_t P, bool mask_zero,
                          acc_t* grad_q, acc_t* grad_k, acc_t* grad_bs, acc_t* grad_be) {
  const auto table = g.rope ? rope_table<acc_t>(g.L, g.D) : std::vector<acc_t>();
  at::parallel_for(0, g.B * g.Hqk, grain(pair_cost(g)), [&](int64_t begin, int64_t end) {
    Rotated<acc_t> r(g, table);
    std::vector<acc_t> tile(kRowTile * g.L), ds(kRowTile * g.L), grq(g.L * g.D), grk(g.L * g.D);
    std::vector<uint8_t> live(kRowTile * g.L);
    LossRows<acc_t> rows;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / g.Hqk, hq = item % g.Hqk;
      const HeadRange heads = heads_of(g, hq);
      r.load(q, k, b, hq);
      rows.load(g, idx, P, mask_zero, b, heads);
      std::fill(grq.begin(), grq.end(), acc_t(0));
      std::fill(grk.begin(), grk.end(), acc_t(0));
      for (int64_t i0 = 0; i0 < g.L; i0 += kRowTile) {
        const int64_t i1 = std::min(g.L, i0 + kRowTile), j0 = g.tril ? i0 : 0, w = g.L - j0;
        r.product(i0, i1, j0, tile.data());
        std::fill(ds.begin(), ds.end(), acc_t(0));
        std::fill(live.begin(), live.end(), uint8_t(0));
        for_each_entry(g, mask, bs, be, mask_zero, b, heads, i0, i1, j0, tile.data(),
                       [&](int64_t hh, int64_t i, int64_t j, acc_t s) {
                         live[(i - i0) * w + (j - j0)] = 1;
                         const int64_t row = g.row(b, heads.first + hh);
                         const acc_t t = rows.cursors[hh].is_positive(i * g.L + j) ? 1 : 0;
                         const acc_t d = mce_grad(s, acc_t(1) - t, t, terms[2 * row],
                                                  terms[2 * row + 1], grad_terms[2 * row],
                                                  grad_terms[2 * row + 1]);
                         ds[(i - i0) * w + (j - j0)] += d;
                         grad_bs[row * g.L + i] += d;
                         grad_be[row * g.L + j] += d;
                       });
        r.product_backward(i0, i1, j0, ds.data(), live.data(), grq.data(), grk.data());
      }
      r.store_unrotated(grq.data(), b, hq, grad_q);
      r.store_unrotated(grk.data(), b, hq, grad_k);
    }
  });
}

}  // namespace

void rope(const at::Tensor& x, const at::Tensor& positions, double base, bool inverse,
          at::Tensor& out) {
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "rope_cpu", [&] {
    const int64_t* pos = positions.defined() ? positions.data_ptr<int64_t>() : nullptr;
    rope_kernel<scalar_t>(x.data_ptr<scalar_t>(), pos, x.size(0), x.size(1), x.size(2), x.size(3),
                          base, inverse, out.data_ptr<scalar_t>());
  });
}

void global_pointer_scores_forward(const GPGeometry& g, const at::Tensor& q, const at::Tensor& k,
                                   const at::Tensor& mask, const at::Tensor& bias_start,
                                   const at::Tensor& bias_end, at::Tensor& scores) {
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "global_pointer_scores_cpu", [&] {
    scores_forward_kernel<scalar_t>(g, q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(),
                                    data_or_null<const uint8_t>(mask), data_or_null<const scalar_t>(bias_start),
                                    data_or_null<const scalar_t>(bias_end), scores.data_ptr<scalar_t>());
  });
}

void global_pointer_scores_backward(const GPGeometry& g, const at::Tensor& grad,
                                    const at::Tensor& q, const at::Tensor& k,
                                    const at::Tensor& mask, at::Tensor& grad_q,
                                    at::Tensor& grad_k, at::Tensor& grad_bias_start,
                                    at::Tensor& grad_bias_end) {
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "global_pointer_scores_backward_cpu", [&] {
    scores_backward_kernel<scalar_t>(
        g, grad.data_ptr<scalar_t>(), q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(),
        data_or_null<const uint8_t>(mask), grad_q.data_ptr<scalar_t>(), grad_k.data_ptr<scalar_t>(),
        grad_bias_start.data_ptr<scalar_t>(), grad_bias_end.data_ptr<scalar_t>());
  });
}

void mce_forward(const at::Tensor& scores, const at::Tensor& labels, at::Tensor& terms) {
  AT_DISPATCH_FLOATING_TYPES(scores.scalar_type(), "mce_cpu", [&] {
    mce_forward_kernel<scalar_t>(scores.data_ptr<scalar_t>(), labels.data_ptr<scalar_t>(),
                                 scores.size(0), scores.size(1), terms.data_ptr<scalar_t>());
  });
}

void mce_backward(const at::Tensor& grad_terms, const at::Tensor& terms, const at::Tensor& scores,
                  const at::Tensor& labels, at::Tensor& grad_scores) {
  AT_DISPATCH_FLOATING_TYPES(scores.scalar_type(), "mce_backward_cpu", [&] {
    mce_backward_kernel<scalar_t>(grad_terms.data_ptr<scalar_t>(), terms.data_ptr<scalar_t>(),
                                  scores.data_ptr<scalar_t>(), labels.data_ptr<scalar_t>(),
                                  scores.size(0), scores.size(1), grad_scores.data_ptr<scalar_t>());
  });
}

void sparse_mce_forward(const at::Tensor& scores, const at::Tensor& pos_index, bool mask_zero,
                        at::Tensor& terms) {
  AT_DISPATCH_FLOATING_TYPES(scores.scalar_type(), "sparse_mce_cpu", [&] {
    sparse_forward_kernel<scalar_t>(scores.data_ptr<scalar_t>(), pos_index.data_ptr<int64_t>(),
                                    scores.size(0), scores.size(1), pos_index.size(1), mask_zero,
                                    terms.data_ptr<scalar_t>());
  });
}

void sparse_mce_backward(const at::Tensor& grad_terms, const at::Tensor& terms,
                         const at::Tensor& scores, const at::Tensor& pos_index, bool mask_zero,
                         at::Tensor& grad_scores) {
  AT_DISPATCH_FLOATING_TYPES(scores.scalar_type(), "sparse_mce_backward_cpu", [&] {
    sparse_backward_kernel<scalar_t>(grad_terms.data_ptr<scalar_t>(), terms.data_ptr<scalar_t>(),
                                     scores.data_ptr<scalar_t>(), pos_index.data_ptr<int64_t>(),
                                     scores.size(0), scores.size(1), pos_index.size(1), mask_zero,
                                     grad_scores.data_ptr<scalar_t>());
  });
}

void global_pointer_loss_forward(const GPGeometry& g, const at::Tensor& q, const at::Tensor& k,
                                 const at::Tensor& mask, const at::Tensor& bias_start,
                                 const at::Tensor& bias_end, const at::Tensor& pos_index,
                                 bool mask_zero, at::Tensor& terms) {
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "global_pointer_loss_cpu", [&] {
    loss_forward_kernel<scalar_t>(g, q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(),
                                  data_or_null<const uint8_t>(mask), data_or_null<const scalar_t>(bias_start),
                                  data_or_null<const scalar_t>(bias_end), pos_index.data_ptr<int64_t>(),
                                  pos_index.size(2), mask_zero, terms.data_ptr<scalar_t>());
  });
}

void global_pointer_loss_backward(const GPGeometry& g, const at::Tensor& grad_terms,
                                  const at::Tensor& terms, const at::Tensor& q,
                                  const at::Tensor& k, const at::Tensor& mask,
                                  const at::Tensor& bias_start, const at::Tensor& bias_end,
                                  const at::Tensor& pos_index, bool mask_zero,
                                  at::Tensor& grad_q, at::Tensor& grad_k,
                                  at::Tensor& grad_bias_start, at::Tensor& grad_bias_end) {
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "global_pointer_loss_backward_cpu", [&] {
    loss_backward_kernel<scalar_t>(
        g, grad_terms.data_ptr<scalar_t>(), terms.data_ptr<scalar_t>(), q.data_ptr<scalar_t>(),
        k.data_ptr<scalar_t>(), data_or_null<const uint8_t>(mask), data_or_null<const scalar_t>(bias_start),
        data_or_null<const scalar_t>(bias_end), pos_index.data_ptr<int64_t>(), pos_index.size(2),
        mask_zero, grad_q.data_ptr<scalar_t>(), grad_k.data_ptr<scalar_t>(),
        grad_bias_start.data_ptr<scalar_t>(), grad_bias_end.data_ptr<scalar_t>());
  });
}

}  // namespace seqfuse::cpu
