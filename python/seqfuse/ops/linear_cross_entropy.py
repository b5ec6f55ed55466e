"""The SPACES loss straight from the LM head: public wrapper, fake kernels, autograd.

    s_n = W h_n + b,   L_n = logsumexp_{Omega_n} s_n - s_{n, t_n},   Omega_n = top k of s_n

equal to ``sparse_softmax_cross_entropy(hidden @ weight.T + bias, target, k)`` without
the ``[N, V]`` logits or their gradient (the algorithm: pyext/linear_cross_entropy.cpp).
"""

from __future__ import annotations

import torch

from seqfuse._extension import check_backend
from seqfuse.ops.sparse_softmax import REDUCTIONS, _acc_dtype, _check_int, _mean


def linear_sparse_softmax_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    k: int,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    chunk_size: int | None = None,
) -> torch.Tensor:
    """The SPACES sparse softmax cross-entropy of the logits ``hidden @ weight.T + bias``,
    computed without them.

    The vocabulary is walked in chunks of ``max(k, chunk_size)`` columns: that many
    logits per row, plus the ``k`` kept so far, exist at any time (by default
    ``chunk_size = max(128, 2^22 / N)`` on CPU and ``max(128, 2^25 / N)`` on CUDA), and
    the forward keeps ``O(N k)`` for the backward (the kept indices and probabilities). The backward
    gathers and scatters ``k + 1`` rows of ``weight`` per token, in a fixed order
    (deterministic); with ``k = V`` it recomputes the logits chunk by chunk.

    Args:
        hidden: ``[..., D]`` (the leading dims are the rows, ``N`` in all); float32 or
            float64 on CPU, float32, float16 or bfloat16 on CUDA (float accumulation).
        weight: ``[V, D]``, the LM head's (or tied embedding's) weight; ``hidden``'s dtype.
        target: int64, ``hidden``'s shape without the last dim: class indices in
            ``[0, V)`` or ``ignore_index``.
        k: logits kept per row, in ``[1, V]`` (ties at the cut: the lower index);
            ``k = V`` is the ordinary cross-entropy.
        bias: optional ``[V]``.
        ignore_index: target value whose rows have no loss and no gradient.
        reduction: ``"mean"`` over the rows not ignored, ``"sum"``, or ``"none"``
            (``target``-shaped, 0 for ignored rows).
        chunk_size: vocabulary columns computed at a time (memory against speed).

    Returns:
        The loss, float32 for half inputs and ``hidden``'s dtype otherwise. A target
        outside the top k gets gradient -1 on its logit and a finite loss.
    """
    op = "linear_sparse_softmax_cross_entropy"
    _check_int(op, "k", k)
    _check_int(op, "ignore_index", ignore_index)
    if chunk_size is not None:
        _check_int(op, "chunk_size", chunk_size)
    if reduction not in REDUCTIONS:
        raise ValueError(f"seqfuse.{op}: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    for name, t in (("hidden", hidden), ("weight", weight), ("target", target), ("bias", bias)):
        if t is not None and not isinstance(t, torch.Tensor):
            raise TypeError(f"seqfuse.{op}: {name} must be a tensor, got {type(t).__name__}")
    if hidden.dim() < 1:
        raise ValueError(f"seqfuse.{op}: hidden must be [..., D], got a scalar")
    if target.shape != hidden.shape[:-1]:
        raise ValueError(
            f"seqfuse.{op}: target must be hidden's shape without the last dim, "
            f"{tuple(hidden.shape[:-1])}, got {tuple(target.shape)}"
        )
    for name, t in (("weight", weight), ("target", target), ("bias", bias)):
        if t is not None and t.device != hidden.device:
            raise RuntimeError(
                f"seqfuse.{op}: {name} is on {t.device} but hidden is on {hidden.device}; all "
                "inputs must be on one device"
            )
    check_backend(op, hidden, weight, target, bias)
    loss, _, _, _ = torch.ops.seqfuse.linear_sparse_softmax_cross_entropy(
        hidden.reshape(-1, hidden.shape[-1]), weight, bias, target.reshape(-1), k, ignore_index,
        chunk_size,
    )
    if reduction == "none":
        return loss.view(target.shape)
    if reduction == "sum":
        return loss.sum()
    return _mean(loss, (target != ignore_index).sum())


@torch.library.register_fake("seqfuse::linear_sparse_softmax_cross_entropy")
def _forward_fake(hidden, weight, bias, target, k, ignore_index, chunk_size):
    N, V = hidden.shape[0], weight.shape[0]
    kk = k if k < V else 0
    acc = _acc_dtype(hidden.dtype)
    per_row = hidden.new_empty((N,), dtype=acc)
    # lse [N, 2]: the kept log-sum-exp as (max, log of the sum), kept apart for precision.
    return (per_row, per_row.new_empty((N, 2)), hidden.new_empty((N, kk), dtype=acc),
            hidden.new_empty((N, kk), dtype=torch.int64))


@torch.library.register_fake("seqfuse::linear_sparse_softmax_cross_entropy_backward")
def _backward_fake(grad_loss, hidden, weight, bias, target, lse, probs, indices, k, ignore_index,
                   chunk_size):
    return hidden.new_empty(hidden.shape), weight.new_empty(weight.shape), weight.new_empty(
        (weight.shape[0],))


def _setup(ctx, inputs, output):
    hidden, weight, bias, target, k, ignore_index, chunk_size = inputs
    _, lse, probs, indices = output
    ctx.save_for_backward(hidden, weight, bias, target, lse, probs, indices)
    ctx.mark_non_differentiable(lse, probs, indices)
    ctx.k, ctx.ignore_index, ctx.chunk_size = k, ignore_index, chunk_size


def _backward(ctx, grad_loss, _grad_lse, _grad_probs, _grad_indices):
    hidden, weight, bias, target, lse, probs, indices = ctx.saved_tensors
    grad_hidden, grad_weight, grad_bias = (
        torch.ops.seqfuse.linear_sparse_softmax_cross_entropy_backward(
            grad_loss, hidden, weight, bias, target, lse, probs, indices, ctx.k, ctx.ignore_index,
            ctx.chunk_size,
        )
    )
    grad_bias = grad_bias if bias is not None else None
    return grad_hidden, grad_weight, grad_bias, None, None, None, None


torch.library.register_autograd(
    "seqfuse::linear_sparse_softmax_cross_entropy", _backward, setup_context=_setup
)
