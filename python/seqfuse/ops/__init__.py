"""The fused ops, one module per family; each registers its fake kernel and autograd."""

from seqfuse.ops.scan import linear_scan

__all__ = ["linear_scan"]
