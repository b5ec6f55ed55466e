"""The emulated CUDA device of the tests: seqfuse's CUDA kernels, compiled as host C++.

`load()` builds (incrementally, with ninja) and imports the extension
`seqfuse_emulated`: the real `csrc/cuda/*.cu` sources compiled by the host compiler
with `cuda_emulator.h` force-included, the real CUDA registrations `pyext/*_cuda.cpp`
compiled against the installed CPU torch, and the scheduler in `runtime.cpp`. It links
to the installed `seqfuse._C` for the argument handling the registrations share with
the CPU ones. Nothing of this reaches a user's install.

    emu = load()
    emu.configure(threads="random", blocks="random", resident=4, seed=1)
    with enabled(emu):
        seqfuse.linear_scan(a, b)   # CPU tensors, the CUDA scan kernel

`SEQFUSE_EMULATOR=asan` builds a second copy under AddressSanitizer (the process must
have libasan preloaded; see tests/test_emulator.py).
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import shutil
import subprocess
from pathlib import Path

from torch.utils import cpp_extension

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
FAMILIES = ("scan", "linear_attention", "sparse_softmax", "global_pointer")


def cuda_include_dirs() -> list[str]:
    """The include folders of the nvcc on PATH (its headers and CCCL), else CUDA_HOME's."""
    nvcc = shutil.which("nvcc")
    dirs: list[str] = []
    if nvcc:
        out = subprocess.run(
            [nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
            capture_output=True, text=True, check=False,
        ).stderr
        for line in out.splitlines():
            if "INCLUDES=" in line:
                dirs += re.findall(r'(/[^"\s]+)', line.split("=", 1)[1])
    home = os.environ.get("CUDA_HOME") or cpp_extension.CUDA_HOME
    if home:
        dirs += [os.path.join(home, "include"), os.path.join(home, "include", "cccl")]
    dirs = [d for d in dict.fromkeys(os.path.normpath(d) for d in dirs) if os.path.isdir(d)]
    if not any(os.path.exists(os.path.join(d, "cuda_fp16.h")) for d in dirs):
        raise RuntimeError(
            "the emulated CUDA device needs the CUDA headers (cuda_fp16.h, CCCL): put nvcc "
            "on PATH or set CUDA_HOME"
        )
    return dirs


def _kernel_wrappers(build_dir: Path) -> list[str]:
    """One host-C++ translation unit per .cu file, written only when it changes."""
    paths = []
    kernels = {f: ROOT / "csrc" / "cuda" / f"{f}.cu" for f in FAMILIES}
    kernels["selftest"] = HERE / "selftest.cu"
    for name, source in kernels.items():
        path = build_dir / f"kernels_{name}.cpp"
        text = f'#include "{HERE / "cuda_emulator.h"}"\n#include "{source}"\n'
        if not path.exists() or path.read_text() != text:
            path.write_text(text)
        paths.append(str(path))
    return paths


@functools.cache
def load(asan: bool | None = None):
    """Builds (if needed) and imports the emulated-device extension."""
    if asan is None:
        asan = os.environ.get("SEQFUSE_EMULATOR") == "asan"
    import seqfuse._C as seqfuse_c  # the emulated registrations link to its helpers

    name = "seqfuse_emulated_asan" if asan else "seqfuse_emulated"
    build_dir = ROOT / "build" / name
    build_dir.mkdir(parents=True, exist_ok=True)
    sources = (
        [str(HERE / "runtime.cpp"), str(HERE / "module.cpp")]
        + _kernel_wrappers(build_dir)
        + sorted(str(p) for p in (ROOT / "pyext").glob("*_cuda.cpp"))
    )
    flags = [
        "-std=c++20", "-DSEQFUSE_EMULATED=1",
        # the same half-precision restrictions as torch's CUDA extension builds
        "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
        "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__",
        "-Wno-unused-parameter",
    ]
    flags += [f"-isystem{d}" for d in cuda_include_dirs()]
    ldflags = [seqfuse_c.__file__, f"-Wl,-rpath,{os.path.dirname(seqfuse_c.__file__)}"]
    if asan:
        flags += ["-O1", "-g", "-fsanitize=address", "-fno-omit-frame-pointer"]
        ldflags += ["-fsanitize=address"]
    else:
        flags += ["-O2", "-g1"]
    os.environ.setdefault("MAX_JOBS", str(os.cpu_count() or 2))
    return cpp_extension.load(
        name=name, sources=sources, extra_cflags=flags, extra_ldflags=ldflags,
        build_directory=str(build_dir), verbose=os.environ.get("SEQFUSE_EMULATOR_VERBOSE") == "1",
    )


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


__all__ = ["load", "enabled", "disabled", "cuda_include_dirs", "FAMILIES"]
