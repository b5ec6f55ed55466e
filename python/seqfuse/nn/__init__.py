"""seqfuse modules, one file per family."""

from seqfuse.nn.lru import LRU
from seqfuse.nn.sparse_softmax import SparseSoftmaxCrossEntropyLoss

__all__ = ["LRU", "SparseSoftmaxCrossEntropyLoss"]
