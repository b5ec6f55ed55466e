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

}  // namespace seqfuse
