"""The emulated CUDA device of the tests: seqfuse's CUDA kernels, compiled as host C++.

`load()` builds (incrementally, with ninja: build.py) and imports the extension
`seqfuse_emulated`: the real `csrc/cuda/*.cu` sources compiled by the host compiler
with `cuda_emulator.h` force-included, the real CUDA registrations `pyext/*_cuda.cpp`
compiled against the installed CPU torch, and the scheduler in `runtime.cpp`. It links
to the installed `seqfuse._C` for the argument handling the registrations share with
the CPU ones. Nothing of this reaches a user's install.

    emu = load()
    emu.configure(threads="random", blocks="random", resident=4, seed=1)
    with enabled(emu):
        seqfuse.linear_scan(a, b)   # CPU tensors, the CUDA scan kernel

`SEQFUSE_EMULATOR=asan` takes the kernels built under AddressSanitizer instead (the
process must have libasan preloaded; see tests/test_emulator.py).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os

from .build import FAMILIES, MissingHeaders, build, cuda_include_dirs


@functools.cache
def load(asan: bool | None = None):
    """Builds (if needed) and imports the emulated-device extension. `asan` (default:
    SEQFUSE_EMULATOR=asan) takes the AddressSanitizer build, which needs libasan
    preloaded into the process."""
    if asan is None:
        asan = os.environ.get("SEQFUSE_EMULATOR") == "asan"
    spec = importlib.util.spec_from_file_location("seqfuse_emulated", build(asan))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def enabled(emu):
    """seqfuse's ops on CPU tensors run the emulated CUDA kernels inside the block."""
    was = emu.enabled()
    emu.enable()
    try:
        yield emu
    finally:
        if not was:
            emu.disable()


@contextlib.contextmanager
def disabled(emu):
    """seqfuse's own CPU kernels inside the block, e.g. to compare them with the emulated."""
    was = emu.enabled()
    emu.disable()
    try:
        yield
    finally:
        if was:
            emu.enable()


__all__ = ["load", "enabled", "disabled", "cuda_include_dirs", "FAMILIES", "MissingHeaders"]
