"""The fused ops, one module per family; each registers its fake kernel and autograd."""

from seqfuse.ops.global_pointer import (
    global_pointer_loss,
    global_pointer_scores,
    multilabel_categorical_crossentropy,
    rope,
    sparse_multilabel_categorical_crossentropy,
)
from seqfuse.ops.linear_attention import causal_linear_attention
from seqfuse.ops.linear_cross_entropy import linear_sparse_softmax_cross_entropy
from seqfuse.ops.scan import linear_scan
from seqfuse.ops.sparse_softmax import (
    entropy_normalize,
    sparse_softmax,
    sparse_softmax_cross_entropy,
    taylor_softmax,
    topk_softmax,
)

__all__ = [
    # scan
    "linear_scan",
    # linear attention
    "causal_linear_attention",
    # row-wise normalisers
    "sparse_softmax",
    "topk_softmax",
    "sparse_softmax_cross_entropy",
    "linear_sparse_softmax_cross_entropy",
    "taylor_softmax",
    "entropy_normalize",
    # GlobalPointer
    "rope",
    "global_pointer_scores",
    "multilabel_categorical_crossentropy",
    "sparse_multilabel_categorical_crossentropy",
    "global_pointer_loss",
]
