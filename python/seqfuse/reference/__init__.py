"""Plain-PyTorch reference implementations, one module per family."""

from seqfuse.reference.global_pointer import (
    global_pointer_loss,
    global_pointer_scores,
    multilabel_categorical_crossentropy,
    rope,
    sparse_multilabel_categorical_crossentropy,
    sparse_multilabel_categorical_crossentropy_textbook,
)
from seqfuse.reference.linear_attention import (
    causal_linear_attention,
    causal_linear_attention_quadratic,
)
from seqfuse.reference.scan import linear_scan, linear_scan_logspace, lru
from seqfuse.reference.sparse_softmax import (
    entropy_normalize,
    linear_sparse_softmax_cross_entropy,
    sparse_softmax,
    sparse_softmax_cross_entropy,
    taylor_softmax,
    topk_softmax,
)

__all__ = [
    # scan
    "linear_scan",
    "linear_scan_logspace",
    "lru",
    # linear attention
    "causal_linear_attention",
    "causal_linear_attention_quadratic",
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
    "sparse_multilabel_categorical_crossentropy_textbook",
    "global_pointer_loss",
]
