"""Builds seqfuse._C: the CPU kernels always, the CUDA kernels when torch has CUDA and
nvcc is found (or FORCE_CUDA=1, for build machines with no GPU visible)."""

import glob
import os

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

DEFAULT_CUDA_ARCHS = "8.0;9.0"


def build_cuda() -> bool:
    if os.environ.get("FORCE_CUDA", "0") == "1":
        return True
    return torch.version.cuda is not None and CUDA_HOME is not None


def extension():
    cpu_sources = sorted(glob.glob("csrc/cpu/*.cpp"))
    binding_sources = sorted(glob.glob("pyext/*.cpp"))
    cuda_bindings = [s for s in binding_sources if s.endswith("_cuda.cpp")]
    sources = cpu_sources + [s for s in binding_sources if s not in cuda_bindings]
    cxx_flags = ["-O3", "-fopenmp"]  # torch picks the C++ standard its headers need
    macros = []
    if not build_cuda():
        return CppExtension(
            "seqfuse._C", sources,
            extra_compile_args={"cxx": cxx_flags}, extra_link_args=["-fopenmp"],
        )
    # torch turns this list into -gencode flags; an explicit default lets the build
    # run where no GPU is visible.
    archs = os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
    macros += [("SEQFUSE_WITH_CUDA", None), ("SEQFUSE_CUDA_ARCHS", f'"{archs}"')]
    return CUDAExtension(
        "seqfuse._C",
        sources + cuda_bindings + sorted(glob.glob("csrc/cuda/*.cu")),
        define_macros=macros,
        extra_compile_args={
            "cxx": cxx_flags,
            "nvcc": ["-O3", "-lineinfo", "-Xptxas=-warn-spills"],
        },
        extra_link_args=["-fopenmp"],
    )


setup(
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension},
)
