"""seqfuse modules, one file per family."""

from seqfuse.nn.global_pointer import EfficientGlobalPointer, GlobalPointer, global_pointer_decode
from seqfuse.nn.lru import LRU
from seqfuse.nn.sparse_softmax import SparseSoftmaxCrossEntropyLoss

__all__ = ["LRU", "SparseSoftmaxCrossEntropyLoss", "GlobalPointer", "EfficientGlobalPointer",
           "global_pointer_decode"]
