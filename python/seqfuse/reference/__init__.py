"""Plain-PyTorch reference implementations, one module per family."""

from seqfuse.reference.scan import linear_scan, linear_scan_logspace, lru

__all__ = ["linear_scan", "linear_scan_logspace", "lru"]
