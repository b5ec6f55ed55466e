"""The emulated CUDA device itself: that emulated tests really run the CUDA kernels, that
the emulator reports what a GPU would not forgive, and an AddressSanitizer run of a
subset of every family's emulated tests."""

import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

import torch

import seqfuse
from conftest import EMULATED

pytestmark = pytest.mark.emulated
ROOT = Path(__file__).resolve().parent.parent


def launches(emulator):
    return emulator.stats()["launches"]


CALLS = {
    "scan": lambda: seqfuse.linear_scan(torch.rand(2, 70, 33), torch.randn(2, 70, 33)),
    "linear_attention": lambda: seqfuse.causal_linear_attention(
        *(torch.randn(1, 20, 2, 8) for _ in range(3))),
    "sparse_softmax": lambda: seqfuse.sparse_softmax(torch.randn(3, 50), 5),
    "linear_cross_entropy": lambda: _linear_cross_entropy_gradients(),
    "global_pointer": lambda: seqfuse.global_pointer_scores(
        torch.randn(1, 9, 2, 8), torch.randn(1, 9, 2, 8)),
}


def _linear_cross_entropy_gradients():
    hidden = torch.randn(6, 9, requires_grad=True)
    weight = torch.randn(40, 9, requires_grad=True)
    target = torch.randint(0, 40, (6,))
    loss = seqfuse.linear_sparse_softmax_cross_entropy(hidden, weight, target, 4)
    return torch.autograd.grad(loss, (hidden, weight))  # the gather and scatter kernels


@pytest.mark.parametrize("device", EMULATED)
@pytest.mark.parametrize("family", sorted(CALLS))
def test_emulated_tests_run_the_cuda_kernels(device, family, emulated_kernels):
    torch.manual_seed(0)
    before = launches(emulated_kernels)
    emulated_out = CALLS[family]()
    torch.manual_seed(0)
    assert launches(emulated_kernels) > before, "the op did not reach the emulated kernels"
    emulated_kernels.disable()
    try:
        before = launches(emulated_kernels)
        cpu_out = CALLS[family]()
        assert launches(emulated_kernels) == before, "disabled, the CPU kernels must run"
    finally:
        emulated_kernels.enable()
    torch.testing.assert_close(emulated_out, cpu_out, rtol=1e-4, atol=1e-5)


def selftest(emulator, name, **schedule):
    emulator.configure(**schedule)
    out = torch.zeros(128)
    err = emulator.selftest(name, out)
    return err, out[:64]


def test_a_missing_barrier_shows_under_another_thread_order(emulator):
    want = torch.arange(63, -1, -1, dtype=torch.float32)
    for threads in ("forward", "reverse", "random"):
        assert torch.equal(selftest(emulator, "with_barrier", threads=threads, seed=1)[1], want)
    _, forward = selftest(emulator, "missing_barrier", threads="forward")
    _, reverse = selftest(emulator, "missing_barrier", threads="reverse")
    assert not torch.equal(forward, reverse)
    assert torch.isnan(forward).any() or torch.isnan(reverse).any()  # poison, not zeros


def test_unwritten_shared_memory_reads_as_nan(emulator):
    _, out = selftest(emulator, "uninitialised_shared")
    assert torch.isnan(out).all()


def test_random_schedule_also_poisons_with_a_finite_value(emulator):
    # Under the random schedule half the blocks start from 0x3F bytes, a finite float
    # (0.747...), so that a kernel which handles NaN specially still shows the read.
    finite = struct.unpack("<f", b"\x3f" * 4)[0]
    seen = set()
    for seed in range(16):
        _, out = selftest(emulator, "uninitialised_shared", threads="random", seed=seed)
        if torch.isnan(out).all():
            seen.add("nan")
        elif torch.equal(out, torch.full_like(out, finite)):
            seen.add("finite")
        else:
            raise AssertionError(f"seed {seed}: neither poison: {out[:4]}")
    assert seen == {"nan", "finite"}


@pytest.mark.parametrize("name, match", [
    ("divergent_barrier", "divergent __syncthreads"),
    ("exit_before_barrier", "divergent __syncthreads"),
    ("shuffle_with_absent_lanes", "exited"),
    ("shuffle_masks_disagree", "disagree on the mask"),
    ("waits_on_a_later_block", "forward-progress deadlock"),
])
def test_what_a_gpu_would_not_forgive_fails_loudly(emulator, name, match):
    with pytest.raises(RuntimeError, match=match):
        selftest(emulator, name)
    err, out = selftest(emulator, "warp_sums")  # the emulator is usable afterwards
    assert err == 0 and torch.equal(out[:32], torch.full((32,), 496.0))


def test_a_look_back_on_a_resident_block_makes_progress(emulator):
    # With both blocks resident, the spinning block yields to the one that sets the flag.
    for blocks in ("forward", "reverse"):
        assert selftest(emulator, "waits_on_a_later_block", blocks=blocks, resident=2)[0] == 0
    assert selftest(emulator, "waits_on_a_later_block", blocks="reverse")[0] == 0


@pytest.mark.parametrize("name", ["too_many_threads", "too_much_dynamic_shared"])
def test_bad_launch_configurations_are_launch_errors(emulator, name):
    err, _ = selftest(emulator, name)
    assert err != 0  # cudaErrorInvalidConfiguration / cudaErrorInvalidValue, not a crash
    assert selftest(emulator, "warp_sums")[0] == 0  # and cudaGetLastError cleared it


# A subset of every family's emulated tests, small enough for CI, under ASan: an
# out-of-bounds access to global memory, or to shared memory (allocated per block at
# its exact size), is a report and a failure.
ASAN_SUBSET = {
    "tests/test_scan.py": "test_non_contiguous_inputs or test_empty",
    "tests/test_linear_attention.py": "test_odd_sizes or test_cuda_float16_zero_rows",
    "tests/test_sparse_softmax.py": "test_every_topk_path_in_half_types or test_single_entry_rows",
    "tests/test_global_pointer.py": "test_scores_and_fused_loss_edge_shapes",
    "tests/test_linear_cross_entropy.py": "test_small_shapes or test_half_precision",
}


def libasan():
    out = subprocess.run(["g++", "-print-file-name=libasan.so"], capture_output=True, text=True)
    path = out.stdout.strip()
    return path if os.path.isabs(path) and os.path.exists(path) else None


@pytest.mark.skipif(libasan() is None, reason="needs g++ with libasan")
@pytest.mark.parametrize("path", sorted(ASAN_SUBSET))
def test_asan_subset(path, emulator):  # `emulator`: builds the shared objects first
    env = dict(os.environ, SEQFUSE_EMULATOR="asan", LD_PRELOAD=libasan(),
               ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:alloc_dealloc_mismatch=0:"
                            "new_delete_type_mismatch=0:detect_odr_violation=0")
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-m", "emulated",
           "-k", ASAN_SUBSET[path], path]
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
    log = run.stdout + run.stderr
    assert "AddressSanitizer" not in log, log[-6000:]
    assert run.returncode == 0, log[-6000:]
    assert " passed" in log and " 0 passed" not in log, log[-3000:]
