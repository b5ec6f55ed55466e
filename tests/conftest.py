"""Shared test setup: devices, dtype tolerances, fresh random inputs.

CUDA cases carry the `cuda` marker and are skipped when no GPU is present; the check
runs when a test starts, never at import.
"""

import pytest
import torch

import seqfuse


def pytest_runtest_setup(item):
    if item.get_closest_marker("cuda") is None:
        return
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    if "cuda" not in seqfuse.build_info()["backends"]:
        pytest.skip("seqfuse was built without CUDA kernels")


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]

# Tolerances against a float64 reference, by the dtype the kernel ran in.
TOL = {
    torch.float64: dict(rtol=1e-12, atol=1e-12),
    torch.complex128: dict(rtol=1e-12, atol=1e-12),
    torch.float32: dict(rtol=1e-4, atol=1e-5),
    torch.complex64: dict(rtol=1e-4, atol=1e-5),
    torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
    torch.float16: dict(rtol=5e-3, atol=5e-3),
}


@pytest.fixture(autouse=True)
def fresh_seed():
    """Each test draws fresh inputs; the seed is printed on failure to reproduce it."""
    seed = torch.seed() % 2**31
    torch.manual_seed(seed)
    yield seed


def assert_close(actual, expected, dtype=None, **kw):
    """Compares in float64 (complex128) with the tolerance of `dtype`."""
    tol = dict(TOL[dtype or actual.dtype])
    tol.update(kw)
    target = torch.complex128 if actual.is_complex() else torch.float64
    torch.testing.assert_close(actual.to(target).cpu(), expected.to(target).cpu(), **tol)
