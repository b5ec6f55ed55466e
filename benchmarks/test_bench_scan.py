"""pytest-benchmark cases for linear_scan (CPU, or CUDA when present), side by side with
the loop reference and torch.addcmul (the same memory traffic).

    python -m pytest benchmarks/test_bench_scan.py --benchmark-group-by=param:shape
"""

import pytest
import torch

import seqfuse
from seqfuse import reference

DEVICE = "cpu"
SHAPES = [(8, 1024, 512), (2, 4096, 64)]


def sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def inputs(shape):
    a = torch.empty(shape, device=DEVICE).uniform_(0.5, 1.0)
    return a, torch.randn(shape, device=DEVICE)


IMPLS = {
    "seqfuse": lambda a, b: seqfuse.linear_scan(a, b),
    "seqfuse_a_per_channel": lambda a, b: seqfuse.linear_scan(a[0, 0], b),
    "reference_loop": lambda a, b: reference.linear_scan(a, b),
    "addcmul_floor": lambda a, b: torch.addcmul(b, a, b),
}


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("impl", list(IMPLS))
def test_scan_forward(benchmark, impl, shape):
    a, b = inputs(shape)
    fn = IMPLS[impl]
    out = benchmark(lambda: (fn(a, b), sync()))[0]
    assert out.shape == b.shape


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("impl", ["seqfuse", "reference_loop"])
def test_scan_forward_backward(benchmark, impl, shape):
    a, b = (x.requires_grad_() for x in inputs(shape))
    fn = IMPLS[impl]

    def step():
        a.grad = b.grad = None
        fn(a, b).sum().backward()
        sync()

    benchmark(step)
    assert a.grad.shape == shape and b.grad.shape == shape
