// The Python module of the emulated device. While enabled, seqfuse's ops on CPU
// tensors run the CUDA registrations of pyext/*_cuda.cpp (compiled here against the CPU
// torch) on the emulated kernels, in place of the CPU kernels; disabling restores them.
#include <torch/extension.h>
#include <torch/library.h>

#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "../../pyext/cuda_utils.h"
#include "runtime.h"

namespace seqfuse::emu {
namespace {

std::vector<void (*)(torch::Library&)>& registrations() {
  static std::vector<void (*)(torch::Library&)> all;
  return all;
}

std::unique_ptr<torch::Library> g_library;

void enable() {
  if (g_library) return;
  g_library = std::make_unique<torch::Library>(torch::Library::IMPL, "seqfuse",
                                               c10::DispatchKey::CPU, __FILE__, __LINE__);
  for (auto add : registrations()) add(*g_library);
}

void disable() { g_library.reset(); }

Order order_of(const std::string& name) {
  if (name == "forward") return Order::Forward;
  if (name == "reverse") return Order::Reverse;
  if (name == "random") return Order::Random;
  throw std::invalid_argument("order must be 'forward', 'reverse' or 'random', got '" + name +
                              "'");
}

}  // namespace

int selftest(const std::string& name, void* out);  // selftest.cu

Registration::Registration(void (*add)(torch::Library&)) { registrations().push_back(add); }

}  // namespace seqfuse::emu

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace emu = seqfuse::emu;
  m.doc() = "seqfuse's CUDA kernels on an emulated device (tests only)";
  m.def("enable", &emu::enable, "Route torch.ops.seqfuse on CPU tensors to the emulated kernels.");
  m.def("disable", &emu::disable, "Restore seqfuse's CPU kernels.");
  m.def("enabled", [] { return emu::g_library != nullptr; });
  m.def(
      "configure",
      [](const std::string& threads, const std::string& blocks, int resident, uint64_t seed) {
        emu::configure(emu::order_of(threads), emu::order_of(blocks), resident, seed);
      },
      pybind11::arg("threads") = "forward", pybind11::arg("blocks") = "forward",
      pybind11::arg("resident") = 1, pybind11::arg("seed") = 0,
      "The schedule of later launches: thread and block orders, blocks resident at once, "
      "and the seed of the random orders.");
  m.def(
      "selftest",
      [](const std::string& name, const at::Tensor& out) {
        return emu::selftest(name, out.data_ptr());
      },
      "Runs one of selftest.cu's defective kernels on `out`; returns its cudaError_t.");
  m.def("stats", [] {
    const emu::Stats s = emu::stats();
    pybind11::dict d;
    d["launches"] = s.launches;
    d["blocks"] = s.blocks;
    d["switches"] = s.switches;
    return d;
  });
}
