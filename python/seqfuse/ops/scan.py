"""linear_scan: the public wrapper, its fake kernel and its autograd formula.

    h_t = a_t * h_{t-1} + b_t,   h_{-1} = h0        (reverse: h_t = a_t * h_{t+1} + b_t)
"""

from __future__ import annotations

import torch

from seqfuse._extension import check_backend


def linear_scan(
    a: torch.Tensor,
    b: torch.Tensor,
    h0: torch.Tensor | None = None,
    *,
    reverse: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor:
    """Elementwise linear recurrence along time (dim 1).

    Args:
        a: coefficients, broadcastable to ``b`` — e.g. ``[B, T, C]``, or ``[C]`` /
            ``[1, 1, C]`` for a time-invariant recurrence (never expanded in memory).
        b: inputs ``[B, T, C]``; float16/bfloat16/float32/float64 or complex64
            (complex128 on CPU). ``a`` has the same dtype.
        h0: initial state ``[B, C]`` (zeros if None), real or complex like ``b``;
            ``[N, C]`` with ``cu_seqlens``.
        reverse: run from ``t = T-1`` down to 0 (then ``h[:, 0]`` is the final state);
            with ``cu_seqlens``, each sequence backwards within its own span.
        cu_seqlens: packed sequences: int32/int64 ``[N + 1]``, 0 first, non-decreasing,
            the packed length ``T`` last; ``b`` is ``[1, T, C]`` and sequence ``n`` is
            ``b[:, cu_seqlens[n]:cu_seqlens[n+1]]``, a recurrence of its own from
            ``h0[n]``: no state crosses a boundary, and empty sequences are allowed.
            ``a`` is ``[1, T, C]`` or broadcast (``[C]``). The values are read by the
            kernels, never by the host: on CUDA, offsets that break the rules give NaN
            outputs instead of an error (checking them would synchronise every call).

    Returns:
        ``h``: ``[B, T, C]`` in ``b``'s dtype; ``h[:, -1]`` is the final state, so a
        long sequence can be scanned in chunks by passing it as the next ``h0``. With
        ``cu_seqlens``, sequence n's final state is ``h[0, cu_seqlens[n+1] - 1]``
        (``cu_seqlens[n]`` with ``reverse``) when it is not empty.
    """
    check_backend("linear_scan", a, b, h0, cu_seqlens)
    return torch.ops.seqfuse.linear_scan(a, b, h0, reverse, cu_seqlens)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


@torch.library.register_fake("seqfuse::linear_scan")
def _linear_scan_fake(a, b, h0=None, reverse=False, cu_seqlens=None):
    torch._check(b.dim() == 3, lambda: f"linear_scan: b must be [B, T, C], got {tuple(b.shape)}")
    return b.new_empty(b.shape)


@torch.library.register_fake("seqfuse::linear_scan_backward")
def _linear_scan_backward_fake(grad_h, a, h, h0, reverse, cu_seqlens=None):
    B, _, C = h.shape
    S = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
    h0_dtype = h0.dtype if h0 is not None else _acc_dtype(h.dtype)
    return a.new_empty(a.shape), h.new_empty(h.shape), h.new_empty((S, C), dtype=h0_dtype)


def _setup_context(ctx, inputs, output):
    a, _, h0, reverse, cu_seqlens = inputs
    ctx.save_for_backward(a, output, h0, cu_seqlens)
    ctx.reverse = reverse


def _backward(ctx, grad_h):
    a, h, h0, cu_seqlens = ctx.saved_tensors
    grad_a, grad_b, grad_h0 = torch.ops.seqfuse.linear_scan_backward(
        grad_h, a, h, h0, ctx.reverse, cu_seqlens)
    return grad_a, grad_b, grad_h0 if h0 is not None else None, None, None


torch.library.register_autograd("seqfuse::linear_scan", _backward, setup_context=_setup_context)
