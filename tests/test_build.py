"""The build: what seqfuse reports about itself, and the standalone CUDA compile check."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import seqfuse

ROOT = Path(__file__).resolve().parents[1]


def test_build_info_describes_this_build():
    info = seqfuse.build_info()
    assert set(info) == {"torch", "cuda", "cuda_archs", "backends"}
    assert torch.__version__.startswith(info["torch"])
    assert "cpu" in info["backends"]
    assert ("cuda" in info["backends"]) == (info["cuda"] is not None)
    if info["cuda"] is not None:
        assert info["cuda_archs"]


def test_ops_are_registered_with_the_dispatcher():
    assert torch.ops.seqfuse.linear_scan.default is not None
    assert torch.ops.seqfuse.linear_scan_backward.default is not None


def parse_ptxas(log: str):
    """(kernel, arch, registers, spill stores, spill loads) for each compiled kernel."""
    pattern = re.compile(
        r"Compiling entry function '(\S+)' for '(sm_\d+)'.*?"
        r"(\d+) bytes spill stores, (\d+) bytes spill loads.*?Used (\d+) registers", re.S)
    return [(k, arch, int(regs), int(st), int(ld)) for k, arch, st, ld, regs in pattern.findall(log)]


@pytest.mark.skipif(shutil.which("nvcc") is None or shutil.which("cmake") is None,
                    reason="needs nvcc and cmake")
def test_cuda_kernels_compile_for_sm80_sm90_without_spills(tmp_path):
    """Compiles every CUDA kernel (and the CUDA bindings) with CMake, no GPU needed."""
    env = dict(os.environ, CMAKE_BUILD_PARALLEL_LEVEL="2")
    configure = subprocess.run(
        ["cmake", "-S", str(ROOT), "-B", str(tmp_path), f"-DPython3_EXECUTABLE={sys.executable}"],
        capture_output=True, text=True, env=env)
    assert configure.returncode == 0, configure.stdout + configure.stderr
    build = subprocess.run(["cmake", "--build", str(tmp_path)], capture_output=True, text=True, env=env)
    log = build.stdout + build.stderr
    assert build.returncode == 0, log[-8000:]
    kernels = parse_ptxas(log)
    assert {arch for _, arch, *_ in kernels} == {"sm_80", "sm_90"}, log[-4000:]
    spilling = [k for k in kernels if k[3] or k[4]]
    assert not spilling, f"kernels spill registers: {spilling}"
    print("\n".join(f"{arch} {regs:3d} regs  {name}" for name, arch, regs, *_ in kernels))
