"""The fused ops, one module per family; each registers its fake kernel and autograd."""

from seqfuse.ops.scan import linear_scan
from seqfuse.ops.sparse_softmax import (
    entropy_normalize,
    sparse_softmax,
    sparse_softmax_cross_entropy,
    taylor_softmax,
    topk_softmax,
)

__all__ = [
    "linear_scan",
    "sparse_softmax",
    "topk_softmax",
    "sparse_softmax_cross_entropy",
    "taylor_softmax",
    "entropy_normalize",
]
