"""The fused ops, one module per family; each registers its fake kernel and autograd."""

from seqfuse.ops.global_pointer import (
    global_pointer_loss,
    global_pointer_scores,
    multilabel_categorical_crossentropy,
    rope,
    sparse_multilabel_categorical_crossentropy,
)
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
    "rope",
    "global_pointer_scores",
    "multilabel_categorical_crossentropy",
    "sparse_multilabel_categorical_crossentropy",
    "global_pointer_loss",
]
