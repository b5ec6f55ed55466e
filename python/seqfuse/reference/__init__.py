"""Plain-PyTorch reference implementations, one module per family."""

from seqfuse.reference.global_pointer import (
    global_pointer_loss,
    global_pointer_scores,
    multilabel_categorical_crossentropy,
    rope,
    sparse_multilabel_categorical_crossentropy,
    sparse_multilabel_categorical_crossentropy_textbook,
)
from seqfuse.reference.scan import linear_scan, linear_scan_logspace, lru
from seqfuse.reference.sparse_softmax import (
    entropy_normalize,
    sparse_softmax,
    sparse_softmax_cross_entropy,
    taylor_softmax,
    topk_softmax,
)

__all__ = [
    "linear_scan",
    "linear_scan_logspace",
    "lru",
    "sparse_softmax",
    "topk_softmax",
    "sparse_softmax_cross_entropy",
    "taylor_softmax",
    "entropy_normalize",
    "rope",
    "global_pointer_scores",
    "multilabel_categorical_crossentropy",
    "sparse_multilabel_categorical_crossentropy",
    "sparse_multilabel_categorical_crossentropy_textbook",
    "global_pointer_loss",
]
