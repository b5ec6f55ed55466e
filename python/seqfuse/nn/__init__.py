"""seqfuse modules, one file per family."""

from seqfuse.nn.global_pointer import EfficientGlobalPointer, GlobalPointer, global_pointer_decode
from seqfuse.nn.linear_attention import CausalLinearAttention
from seqfuse.nn.lru import LRU
from seqfuse.nn.sparse_softmax import (
    LinearSparseSoftmaxCrossEntropyLoss,
    SparseSoftmaxCrossEntropyLoss,
)

__all__ = [
    "LRU",
    "CausalLinearAttention",
    "SparseSoftmaxCrossEntropyLoss",
    "LinearSparseSoftmaxCrossEntropyLoss",
    "GlobalPointer",
    "EfficientGlobalPointer",
    "global_pointer_decode",
]
