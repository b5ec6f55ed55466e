"""seqfuse modules, one file per family."""

from seqfuse.nn.lru import LRU

__all__ = ["LRU"]
