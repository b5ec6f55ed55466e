"""The fused ops, one module per family; each registers its fake kernel and autograd."""

from seqfuse.ops.linear_attention import causal_linear_attention
from seqfuse.ops.scan import linear_scan

__all__ = ["causal_linear_attention", "linear_scan"]
