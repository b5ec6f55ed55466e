"""pytest-benchmark cases of GlobalPointer forward+backward on small CPU shapes:
the PyTorch formulation vs seqfuse scores + sparse loss vs the fused loss.

    PYTHONPATH=python pytest benchmarks/test_bench_global_pointer.py --benchmark-only
"""

import pytest
import torch

from seqfuse.bench.global_pointer import leaf_inputs, fwd_bwd_step


@pytest.mark.parametrize("method", ["torch_sparse", "torch_dense", "seqfuse", "fused"])
@pytest.mark.parametrize("shape", [(4, 128, 10, 64), (2, 128, 34, 64)], ids=["ner", "gplinker"])
def test_global_pointer_fwd_bwd(benchmark, method, shape):
    q, k, mask, idx = leaf_inputs(*shape, torch.float32, "cpu")
    benchmark.group = "global_pointer " + "x".join(map(str, shape))
    benchmark(fwd_bwd_step(method, q, k, mask, idx))
    assert torch.isfinite(q.grad).all() and torch.isfinite(k.grad).all()
