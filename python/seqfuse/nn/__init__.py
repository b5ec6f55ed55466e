"""seqfuse modules, one file per family."""

from seqfuse.nn.global_pointer import EfficientGlobalPointer, GlobalPointer, global_pointer_decode
from seqfuse.nn.lru import LRU

__all__ = ["EfficientGlobalPointer", "GlobalPointer", "LRU", "global_pointer_decode"]
