// Transparent huge pages for large, freshly allocated outputs. The first write to a
// fresh buffer of hundreds of MB (a [N, V] gradient) costs more in 4 KiB page faults
// than the write itself; advising the kernel before that first touch lets it map 2 MiB
// pages instead (the same idea as torch's THP_MEM_ALLOC_ENABLE, applied to our own
// outputs only). Advisory: where it is unsupported or refused nothing changes.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace seqfuse::cpu {

// t must be an output this op has just allocated (at::empty*), never a caller's tensor
// or a view of one: the advice outlives the call. Only the 2 MiB pages lying wholly
// inside t's bytes are advised, so no memory outside t is touched.
inline void advise_huge_pages(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(1) << 21;
  const size_t bytes = t.nbytes();
  if (bytes < 8 * kHuge) return;
  const auto begin = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t first = (begin + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t last = (begin + bytes) & ~(kHuge - 1);
  if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
#endif
}

}  // namespace seqfuse::cpu
