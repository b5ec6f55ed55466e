"""seqfuse modules, one file per family."""

from seqfuse.nn.linear_attention import CausalLinearAttention
from seqfuse.nn.lru import LRU

__all__ = ["CausalLinearAttention", "LRU"]
