// Input checks shared by every op: each failure names the op, the argument and what
// was expected, and is raised before any kernel runs.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <string>

namespace seqfuse {

inline std::string shape_str(const at::Tensor& t) { return c10::str(t.sizes()); }

inline void check_same_device(const char* op, const char* name, const at::Tensor& t,
                              const char* ref_name, const at::Tensor& ref) {
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " is on ", t.device(), " but ",
              ref_name, " is on ", ref.device(), "; all inputs must be on one device");
}

inline void check_same_dtype(const char* op, const char* name, const at::Tensor& t,
                             const char* ref_name, const at::Tensor& ref) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": ", name, " has dtype ",
              t.scalar_type(), " but ", ref_name, " has dtype ", ref.scalar_type(),
              "; they must match");
}

inline void check_dim(const char* op, const char* name, const at::Tensor& t, int64_t dim,
                      const char* layout) {
  TORCH_CHECK_VALUE(t.dim() == dim, op, ": ", name, " must be ", layout, " (", dim,
                    " dims), got shape ", shape_str(t));
}

// The dtype kernels accumulate in: float for the half types, the dtype itself otherwise.
inline at::ScalarType acc_dtype(at::ScalarType t) {
  return t == at::kHalf || t == at::kBFloat16 ? at::kFloat : t;
}

// target: int64 [N] class indices in [0, V) or ignore_index, on ref's device, N =
// ref.size(0). Reading the values is one reduction (a synchronisation on CUDA).
inline void check_class_target(const char* op, const at::Tensor& target, int64_t V,
                               int64_t ignore_index, const char* ref_name, const at::Tensor& ref) {
  check_same_device(op, "target", target, ref_name, ref);
  TORCH_CHECK(target.scalar_type() == at::kLong, op, ": target must be an int64 tensor, got ",
              target.scalar_type());
  TORCH_CHECK_VALUE(target.dim() == 1 && target.size(0) == ref.size(0), op,
                    ": target must be [N] = [", ref.size(0), "] to match ", ref_name, " ",
                    shape_str(ref), ", got shape ", shape_str(target));
  if (target.numel() > 0) {
    const at::Tensor bad =
        target.ne(ignore_index).logical_and(target.lt(0).logical_or(target.ge(V)));
    TORCH_CHECK_VALUE(!bad.any().item<bool>(), op, ": target must hold class indices in [0, ", V,
                      ") or ignore_index (", ignore_index, "); got ",
                      target.masked_select(bad)[0].item<int64_t>());
  }
}

// cu_seqlens: the offsets of N packed sequences in a time axis of `total` steps, an
// integer [N + 1] tensor on ref's device, for a tensor `ref` whose batch dim must be 1.
// Returns it as contiguous int64. Its values (0 first, non-decreasing, `total` last)
// are checked here for the CPU kernels (check_values); the CUDA kernels check them
// on the device, since reading them here would synchronise every call (invalid
// offsets make their outputs NaN).
inline at::Tensor check_cu_seqlens(const char* op, const at::Tensor& cu_seqlens, int64_t total,
                                   const char* ref_name, const at::Tensor& ref,
                                   bool check_values) {
  check_same_device(op, "cu_seqlens", cu_seqlens, ref_name, ref);
  TORCH_CHECK(cu_seqlens.scalar_type() == at::kInt || cu_seqlens.scalar_type() == at::kLong, op,
              ": cu_seqlens must be an int32 or int64 tensor, got ", cu_seqlens.scalar_type());
  TORCH_CHECK_VALUE(cu_seqlens.dim() == 1 && cu_seqlens.size(0) >= 1, op,
                    ": cu_seqlens must be [N + 1] (the start of each of N packed sequences, "
                    "then the packed length), got shape ", shape_str(cu_seqlens));
  TORCH_CHECK_VALUE(ref.size(0) == 1, op, ": with cu_seqlens, ", ref_name,
                    " must hold the packed sequences in one row (batch size 1), got shape ",
                    shape_str(ref));
  TORCH_CHECK_VALUE(cu_seqlens.size(0) > 1 || total == 0, op, ": cu_seqlens must end at the "
                    "packed length ", total, " (", ref_name, "'s time dim), got one offset");
  at::Tensor cu = cu_seqlens.to(at::kLong).contiguous();
  if (check_values) {
    const int64_t* v = cu.data_ptr<int64_t>();
    const int64_t N = cu.size(0) - 1;
    TORCH_CHECK_VALUE(v[0] == 0, op, ": cu_seqlens must start at 0, got ", v[0]);
    for (int64_t n = 0; n < N; ++n) {
      TORCH_CHECK_VALUE(v[n + 1] >= v[n], op, ": cu_seqlens must be non-decreasing, got ", v[n],
                        " then ", v[n + 1], " at index ", n);
    }
    TORCH_CHECK_VALUE(v[N] == total, op, ": cu_seqlens must end at the packed length ", total,
                      " (", ref_name, "'s time dim), got ", v[N]);
  }
  return cu;
}

}  // namespace seqfuse
