"""Builds the emulated-device extension with ninja, incrementally.

One build.ninja (in build/seqfuse_emulated/) holds both variants:
- the kernels, csrc/cuda/*.cu and selftest.cu, compiled as C++ with cuda_emulator.h
  force-included and no torch headers, and the scheduler runtime.cpp, once plain
  (plain/) and once under AddressSanitizer (asan/);
- the torch-facing objects, module.cpp and the real CUDA registrations
  pyext/*_cuda.cpp, compiled once (torch/) and linked into both.
Editing one .cu recompiles that file only; the ASan variant costs the kernels alone.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import torch
from torch.utils import cpp_extension

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
BUILD = ROOT / "build" / "seqfuse_emulated"
FAMILIES = ("scan", "linear_attention", "sparse_softmax", "linear_cross_entropy", "global_pointer")

COMMON = [
    "-std=c++20", "-fPIC", "-DSEQFUSE_EMULATED=1",
    # the same half-precision restrictions as torch's CUDA extension builds
    "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__",
    "-Wno-unused-parameter",
]
OPT = ["-O2", "-g1"]
ASAN = ["-O1", "-g", "-fsanitize=address", "-fno-omit-frame-pointer"]


class MissingHeaders(RuntimeError):
    pass


def cuda_include_dirs() -> list[str]:
    """The include folders of the nvcc on PATH (its headers and CCCL), else CUDA_HOME's,
    else those of NVIDIA's header wheels (nvidia-cuda-runtime-cu12, nvidia-cuda-cccl-cu12)."""
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
    for site in sys.path:
        dirs += [str(p) for p in Path(site).glob("nvidia/*/include")]
    dirs = [d for d in dict.fromkeys(os.path.normpath(d) for d in dirs) if os.path.isdir(d)]
    has = lambda name: any(os.path.exists(os.path.join(d, name)) for d in dirs)  # noqa: E731
    if not (has("cuda_fp16.h") and has("cuda_runtime_api.h") and has("cuda/atomic")):
        raise MissingHeaders(
            "the emulated CUDA device needs the CUDA headers (cuda_runtime_api.h, cuda_fp16.h "
            "and CCCL's cuda/atomic): put nvcc on PATH, set CUDA_HOME, or pip install "
            "nvidia-cuda-runtime-cu12 nvidia-cuda-cccl-cu12"
        )
    return dirs


def ninja_file() -> str:
    import seqfuse._C as seqfuse_c  # the registrations link to its argument handling

    cuda = [f"-isystem {d}" for d in cuda_include_dirs()]
    torch_inc = [f"-isystem {p}" for p in cpp_extension.include_paths()]
    torch_inc.append(f"-isystem {sysconfig.get_paths()['include']}")
    torch_lib = os.path.join(os.path.dirname(torch.__file__), "lib")
    c_dir = os.path.dirname(seqfuse_c.__file__)
    kernels = {f: ROOT / "csrc" / "cuda" / f"{f}.cu" for f in FAMILIES}
    kernels["selftest"] = HERE / "selftest.cu"
    lines = [
        "ninja_required_version = 1.3",
        f"common = {' '.join(COMMON + cuda)}",
        "torch = -DTORCH_EXTENSION_NAME=seqfuse_emulated -DTORCH_API_INCLUDE_EXTENSION_H "
        + " ".join(torch_inc),
        f"emulator = -include {HERE / 'cuda_emulator.h'} -x c++",
        f"opt = {' '.join(OPT)}",
        f"asan = {' '.join(ASAN)}",
        f"ldflags = -shared {seqfuse_c.__file__} -Wl,-rpath,{c_dir} -L{torch_lib} "
        f"-Wl,-rpath,{torch_lib} -lc10 -ltorch_cpu -ltorch -ltorch_python",
        "rule cxx",
        "  command = c++ -MMD -MF $out.d $common $flags -c $in -o $out",
        "  depfile = $out.d",
        "  deps = gcc",
        "  description = CXX $out",
        "rule link",
        "  command = c++ $in $ldflags $extra -o $out",
        "  description = LINK $out",
    ]
    shared = []
    for src in [HERE / "module.cpp", *sorted((ROOT / "pyext").glob("*_cuda.cpp"))]:
        shared.append(f"torch/{src.stem}.o")
        lines += [f"build {shared[-1]}: cxx {src}", "  flags = $torch $opt"]
    for variant in ("plain", "asan"):
        flags = "$opt" if variant == "plain" else "$asan"
        objs = []
        for name, src in kernels.items():
            objs.append(f"{variant}/kernels_{name}.o")
            lines += [f"build {objs[-1]}: cxx {src}", f"  flags = $emulator {flags}"]
        objs.append(f"{variant}/runtime.o")
        lines += [f"build {objs[-1]}: cxx {HERE / 'runtime.cpp'}", f"  flags = {flags}"]
        lines += [f"build {variant}/seqfuse_emulated.so: link {' '.join(objs + shared)}",
                  f"  extra = {'-fsanitize=address' if variant == 'asan' else ''}"]
    return "\n".join(lines) + "\n"


def build(asan: bool) -> Path:
    """Brings the variant's shared library up to date and returns its path."""
    BUILD.mkdir(parents=True, exist_ok=True)
    target = f"{'asan' if asan else 'plain'}/seqfuse_emulated.so"
    with open(BUILD / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one build at a time per checkout
        text = ninja_file()
        path = BUILD / "build.ninja"
        if not path.exists() or path.read_text() != text:
            path.write_text(text)
        jobs = os.environ.get("MAX_JOBS", str(os.cpu_count() or 2))
        run = subprocess.run([shutil.which("ninja") or "ninja", "-C", str(BUILD), "-j", jobs,
                              target], capture_output=True, text=True)
        if os.environ.get("SEQFUSE_EMULATOR_VERBOSE") == "1":
            print(run.stdout[-20000:], file=sys.stderr)
        if run.returncode != 0:
            raise RuntimeError("building the emulated CUDA device failed:\n"
                               + run.stdout[-12000:] + run.stderr[-4000:])
    return BUILD / target
