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

__all__ = [
    "global_pointer_loss",
    "global_pointer_scores",
    "linear_scan",
    "linear_scan_logspace",
    "lru",
    "multilabel_categorical_crossentropy",
    "rope",
    "sparse_multilabel_categorical_crossentropy",
    "sparse_multilabel_categorical_crossentropy_textbook",
]
