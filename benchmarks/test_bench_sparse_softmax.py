"""pytest-benchmark cases for the top-k normalisers on small shapes (CPU):
`pytest benchmarks/test_bench_sparse_softmax.py`. Timings are recorded, never asserted."""

import pytest
import torch

import seqfuse
from seqfuse.bench.sparse_softmax import torch_cross_entropy, torch_sparse_softmax

ROWS, V, K = 256, 8192, 10


@pytest.fixture
def logits():
    return torch.randn(ROWS, V)


@pytest.fixture
def target():
    return torch.randint(0, V, (ROWS,))


@pytest.mark.parametrize("impl", ["seqfuse", "torch"])
def test_sparse_softmax_forward(benchmark, logits, impl):
    fn = seqfuse.sparse_softmax if impl == "seqfuse" else torch_sparse_softmax
    out = benchmark(fn, logits, K)
    assert out.shape == logits.shape


@pytest.mark.parametrize("impl", ["seqfuse", "torch"])
def test_cross_entropy_forward_backward(benchmark, logits, target, impl):
    x = logits.requires_grad_()

    def step():
        if impl == "seqfuse":
            loss = seqfuse.sparse_softmax_cross_entropy(x, target, K)
        else:
            loss = torch_cross_entropy(x, target, K)
        return torch.autograd.grad(loss, x)[0]

    grad = benchmark(step)
    assert grad.shape == logits.shape


def test_topk_softmax_forward(benchmark, logits):
    probs, indices = benchmark(seqfuse.topk_softmax, logits, 64)
    assert probs.shape == indices.shape == (ROWS, 64)
