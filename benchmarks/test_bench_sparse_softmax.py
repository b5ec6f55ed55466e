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


@pytest.mark.parametrize("op", ["taylor_softmax", "entropy_normalize"])
@pytest.mark.parametrize("impl", ["seqfuse", "reference"])
def test_dense_normalisers_forward_backward(benchmark, logits, op, impl):
    # Against the plain-PyTorch references (seqfuse.reference); entropy_normalize moves
    # each row 0.1 nats from its own entropy in 4 Newton steps.
    fn = getattr(seqfuse if impl == "seqfuse" else seqfuse.reference, op)
    p = logits.softmax(-1)
    target = -(p * p.log()).sum(-1) + 0.1
    x = (logits if op == "taylor_softmax" else p).requires_grad_()
    g = torch.randn_like(logits)

    def step():
        out = fn(x, 2) if op == "taylor_softmax" else fn(x, target, 4)
        return torch.autograd.grad(out, x, g)[0]

    grad = benchmark(step)
    assert grad.shape == logits.shape and torch.isfinite(grad).all()
