"""Plain-PyTorch reference implementations, one module per family."""

from seqfuse.reference.linear_attention import (
    causal_linear_attention,
    causal_linear_attention_recurrent,
)
from seqfuse.reference.scan import linear_scan, linear_scan_logspace, lru

__all__ = ["causal_linear_attention", "causal_linear_attention_recurrent", "linear_scan",
           "linear_scan_logspace", "lru"]
