"""Shared test setup: devices, dtype tolerances, fresh random inputs.

A test's `device` is one of
- "cpu": the CPU kernels;
- the emulated CUDA device (marker `emulated`, ids "emulated" and "emulated-random"):
  tensors on the CPU, and seqfuse's ops running the real CUDA kernels and bindings
  compiled for the CPU (tests/emulator), under the forward schedule, or under random
  thread and block orders with 4 blocks resident at once;
- "cuda": a GPU (marker `cuda`), skipped when none is present; the check runs when a
  test starts, never at import.
An emulated `device` is the string "cpu" to torch, so tensors are made the same way on
every device; `runs_cuda_kernels(device)` tells a test which kernels it is exercising.
"""

import contextlib
import os

import pytest
import torch
from hypothesis import HealthCheck, settings

import seqfuse


class EmulatedDevice(str):
    """The emulated CUDA device as a test's `device`: "cpu" to torch, CUDA kernels inside."""

    def __new__(cls, schedule: dict):
        self = super().__new__(cls, "cpu")
        self.schedule = schedule
        return self


EMULATED_SCHEDULES = {
    "emulated": dict(threads="forward", blocks="forward", resident=1),
    "emulated-random": dict(threads="random", blocks="random", resident=4),
}
EMULATED = [
    pytest.param(EmulatedDevice(schedule), id=name, marks=pytest.mark.emulated)
    for name, schedule in EMULATED_SCHEDULES.items()
]
CUDA = pytest.param("cuda", marks=pytest.mark.cuda)
DEVICES = ["cpu", *EMULATED, CUDA]
CUDA_DEVICES = [*EMULATED, CUDA]  # the CUDA kernels, emulated and on a GPU


def runs_cuda_kernels(device) -> bool:
    """Whether seqfuse's ops run their CUDA kernels on `device` (a GPU or the emulator)."""
    return isinstance(device, EmulatedDevice) or str(device).startswith("cuda")


def emulated(device) -> bool:
    return isinstance(device, EmulatedDevice)


def pytest_runtest_setup(item):
    if item.get_closest_marker("cuda") is None:
        return
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    if "cuda" not in seqfuse.build_info()["backends"]:
        pytest.skip("seqfuse was built without CUDA kernels")


@pytest.fixture(scope="session")
def emulator():
    """The emulated-device extension, built on first use (incremental afterwards)."""
    import os

    import emulator as emu_build

    try:
        return emu_build.load()
    except emu_build.MissingHeaders as err:
        if os.environ.get("CI"):
            raise  # CI has the headers: their absence is a failure there
        pytest.skip(str(err))


# Hypothesis profiles of the property tests (tests/test_property_*.py), chosen by
# SEQFUSE_HYPOTHESIS_PROFILE: "ci" (the default) draws a fixed sequence of examples
# (derandomize), 100 per property on the CPU kernels and a quarter of that on the
# emulated device (tests/property_support.py: examples()); "thorough" draws 10x as many
# from a fresh seed each run. A failure prints the shrunk example, the seed where it was
# random, and a @reproduce_failure blob.
settings.register_profile(
    "ci", max_examples=100, derandomize=True, deadline=None, print_blob=True, database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("thorough", settings.get_profile("ci"), max_examples=1000,
                          derandomize=False)
settings.load_profile(os.environ.get("SEQFUSE_HYPOTHESIS_PROFILE", "ci"))


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
    print(f"seed: {seed}")
    yield seed


@pytest.fixture(autouse=True)
def emulated_kernels(request, fresh_seed):
    """Runs an emulated test with seqfuse's ops on the emulated CUDA kernels."""
    device = request.node.callspec.params.get("device") if hasattr(request.node, "callspec") else None
    if request.node.get_closest_marker("emulated") is None or not emulated(device):
        yield None
        return
    emu = request.getfixturevalue("emulator")
    emu.configure(**device.schedule, seed=fresh_seed)
    print(f"emulated schedule: {device.schedule}, seed {fresh_seed}")
    emu.enable()
    _running["emulator"] = emu
    try:
        yield emu
    finally:
        _running["emulator"] = None
        emu.disable()


_running = {"emulator": None}  # the emulator of the emulated test now running


@contextlib.contextmanager
def cpu_kernels():
    """seqfuse's CPU kernels inside the block, also in an emulated test (to compare)."""
    emu = _running["emulator"]
    if emu is None:
        yield
        return
    emu.disable()
    try:
        yield
    finally:
        emu.enable()


def assert_close(actual, expected, dtype=None, **kw):
    """Compares in float64 (complex128) with the tolerance of `dtype`."""
    tol = dict(TOL[dtype or actual.dtype])
    tol.update(kw)
    target = torch.complex128 if actual.is_complex() else torch.float64
    torch.testing.assert_close(actual.to(target).cpu(), expected.to(target).cpu(), **tol)
