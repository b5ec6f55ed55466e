"""seqfuse: fused CPU and CUDA kernels for sequence-model operators.

Ops are registered as ``torch.ops.seqfuse.*`` and exposed here with docstrings;
``seqfuse.nn`` holds the modules and ``seqfuse.reference`` the plain-PyTorch
implementations the kernels are tested against.
"""

from seqfuse._extension import build_info
from seqfuse.ops import *  # noqa: F401,F403
from seqfuse.ops import __all__ as _ops_all
from seqfuse import nn, reference  # noqa: E402

__version__ = "0.1.0"
__all__ = ["build_info", "nn", "reference", *_ops_all]
