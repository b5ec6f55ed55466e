"""pytest-benchmark cases for causal_linear_attention (CPU, or CUDA when present), side
by side with the quadratic and recurrent references.

    python -m pytest benchmarks/test_bench_linear_attention.py --benchmark-group-by=param:shape
"""

import pytest
import torch

import seqfuse
from seqfuse import reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHAPES = [(2, 512, 8, 64), (1, 1024, 4, 128)]  # [B, T, H, D]


def sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def inputs(shape):
    return [torch.randn(shape, device=DEVICE) for _ in range(3)]


IMPLS = {
    "seqfuse": seqfuse.causal_linear_attention,
    "reference_quadratic": reference.causal_linear_attention_quadratic,
    "reference_recurrent": reference.causal_linear_attention,
}


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("impl", list(IMPLS))
def test_linear_attention_forward(benchmark, impl, shape):
    q, k, v = inputs(shape)
    fn = IMPLS[impl]
    out = benchmark(lambda: (fn(q, k, v, feature_map="elu1"), sync()))[0]
    assert out.shape == v.shape


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("impl", ["seqfuse", "reference_quadratic"])
def test_linear_attention_forward_backward(benchmark, impl, shape):
    q, k, v = (x.requires_grad_() for x in inputs(shape))
    fn = IMPLS[impl]

    def step():
        q.grad = k.grad = v.grad = None
        fn(q, k, v, feature_map="elu1").sum().backward()
        sync()

    benchmark(step)
    assert q.grad.shape == q.shape and v.grad.shape == v.shape


@pytest.mark.parametrize("impl", ["seqfuse", "reference_recurrent"])
def test_linear_attention_decode_step(benchmark, impl):
    B, H, D = 1, 16, 128
    q, k, v = inputs((B, 1, H, D))
    state = (torch.randn(B, H, D, D, device=DEVICE), torch.rand(B, H, D, device=DEVICE) + 1)
    fn = IMPLS[impl]
    o, (S, z) = benchmark(lambda: fn(q, k, v, feature_map="elu1", initial_state=state,
                                     return_state=True))
    assert o.shape == v.shape and S.shape == state[0].shape
