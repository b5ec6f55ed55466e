// The seqfuse._C Python module. Ops register themselves with the dispatcher from
// their own files (TORCH_LIBRARY_FRAGMENT); this file only records how the
// extension was built.
#include <torch/extension.h>

#ifdef SEQFUSE_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

#ifndef SEQFUSE_CUDA_ARCHS
#define SEQFUSE_CUDA_ARCHS ""
#endif

namespace {

pybind11::dict build_info() {
  pybind11::dict info;
  info["torch"] = TORCH_VERSION;
#ifdef SEQFUSE_WITH_CUDA
  info["cuda"] = std::to_string(CUDART_VERSION / 1000) + "." +
                 std::to_string(CUDART_VERSION % 1000 / 10);
  info["cuda_archs"] = SEQFUSE_CUDA_ARCHS;
  info["backends"] = pybind11::make_tuple("cpu", "cuda");
#else
  info["cuda"] = pybind11::none();
  info["cuda_archs"] = "";
  info["backends"] = pybind11::make_tuple("cpu");
#endif
  return info;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "seqfuse kernels; the ops live in torch.ops.seqfuse";
  m.def("build_info", &build_info, "How this extension was built.");
}
