"""The fused ops, one module per family; each registers its fake kernel and autograd."""

from seqfuse.ops.global_pointer import (
    global_pointer_loss,
    global_pointer_scores,
    multilabel_categorical_crossentropy,
    rope,
    sparse_multilabel_categorical_crossentropy,
)
from seqfuse.ops.scan import linear_scan

__all__ = [
    "global_pointer_loss",
    "global_pointer_scores",
    "linear_scan",
    "multilabel_categorical_crossentropy",
    "rope",
    "sparse_multilabel_categorical_crossentropy",
]
