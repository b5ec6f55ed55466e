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

}  // namespace seqfuse
