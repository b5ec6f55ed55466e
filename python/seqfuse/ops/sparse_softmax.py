"""The row-wise normalisers: public wrappers, fake kernels and autograd formulas.

    sparse softmax:  p_i = exp(x_i) / sum_{j in Omega_k} exp(x_j)  on the top k, 0 elsewhere
    SPACES loss:     L = logsumexp_{Omega_k}(s) - s_t
    Taylor softmax:  p_i = f_n(x_i) / sum_j f_n(x_j),  f_n(x) = sum_{m<=n} x^m / m!
    entropy normalisation:  p <- p^gamma / sum p^gamma, gamma by Newton's method

The registered ops normalise the last dim; the wrappers move ``dim`` there and back.
"""

from __future__ import annotations

import torch

from seqfuse._extension import check_backend

REDUCTIONS = ("mean", "sum", "none")


def _check_int(op: str, name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, torch.SymInt)):
        raise TypeError(
            f"seqfuse.{op}: {name} must be an int, got {type(value).__name__} {value!r}"
        )


def _check_k(op: str, k) -> None:
    _check_int(op, "k", k)
    if k < 1:
        raise ValueError(f"seqfuse.{op}: k must be a positive int (entries kept per row), got {k}")


def _check_dim(op: str, x: torch.Tensor, dim) -> int:
    _check_int(op, "dim", dim)
    if x.dim() == 0:
        raise ValueError(f"seqfuse.{op}: the input must have at least one dimension, got a scalar")
    if not -x.dim() <= dim < x.dim():
        raise IndexError(f"seqfuse.{op}: dim {dim} is out of range for a {x.dim()}-dim input")
    return dim % x.dim()


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def sparse_softmax(x: torch.Tensor, k: int, dim: int = -1) -> torch.Tensor:
    """Softmax over the ``k`` largest entries along ``dim``; zeros elsewhere.

    Args:
        x: any shape ``[..., V, ...]``; float32/float64 (+ float16/bfloat16).
        k: entries kept per row, >= 1. Ties go to the lower index; ``k >= V`` is the
            plain softmax.
        dim: the dim normalised.

    Returns:
        ``x``-shaped probabilities in ``x``'s dtype, exactly 0 outside the top k (a row
        whose top k hold NaN, or only -inf, is NaN throughout, like the dense softmax).
    """
    _check_k("sparse_softmax", k)
    dim = _check_dim("sparse_softmax", x, dim)
    check_backend("sparse_softmax", x)
    return torch.ops.seqfuse.sparse_softmax(x.movedim(dim, -1), k).movedim(-1, dim)


def topk_softmax(x: torch.Tensor, k: int, dim: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
    """The sparse softmax in compact form, for decoding over large vocabularies.

    Args:
        x: any shape ``[..., V, ...]``; float32/float64 (+ float16/bfloat16).
        k: entries kept per row, >= 1 (``min(k, V)`` are returned).
        dim: the dim normalised.

    Returns:
        ``(probs, indices)``, both ``x``'s shape with ``dim`` of size ``min(k, V)``:
        the probabilities (``x``'s dtype) of the top entries, highest first (ties: the
        lower index first), and their int64 positions along ``dim``.
    """
    _check_k("topk_softmax", k)
    dim = _check_dim("topk_softmax", x, dim)
    check_backend("topk_softmax", x)
    probs, indices = torch.ops.seqfuse.topk_softmax(x.movedim(dim, -1), k)
    return probs.movedim(-1, dim), indices.movedim(-1, dim)


def sparse_softmax_cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    k: int,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> torch.Tensor:
    """The SPACES sparse softmax cross-entropy ``logsumexp_{top k}(s) - s_target``.

    The target is not forced into the top k: when it falls outside, its gradient is
    exactly -1 (times the incoming gradient) and the loss stays finite.

    Args:
        logits: ``[N, V]`` float32/float64 (+ float16/bfloat16).
        target: ``[N]`` int64 class indices in ``[0, V)`` or ``ignore_index``.
        k: logits kept per row, >= 1 (``k >= V`` is the ordinary cross-entropy).
        ignore_index: target value whose rows count for nothing.
        reduction: ``"mean"`` over the rows not ignored, ``"sum"``, or ``"none"``
            (``[N]``, 0 for ignored rows).

    Returns:
        The loss in ``logits``' dtype: a scalar, or ``[N]`` for ``"none"``.
    """
    op = "sparse_softmax_cross_entropy"
    _check_k(op, k)
    _check_int(op, "ignore_index", ignore_index)
    if reduction not in REDUCTIONS:
        raise ValueError(f"seqfuse.{op}: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    check_backend(op, logits, target)
    loss, _, _ = torch.ops.seqfuse.sparse_softmax_cross_entropy(logits, target, k, ignore_index)
    if reduction == "sum":
        loss = loss.sum()
    elif reduction == "mean":
        loss = _mean(loss, (target != ignore_index).sum())
    return loss.to(logits.dtype)


def _mean(loss: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """sum(loss) / count with each term divided first, so that a mean of losses near the
    dtype's max does not overflow; no rows at all give 0 / 0 = NaN."""
    return (loss / count).sum() if loss.numel() else loss.sum() / count


def taylor_softmax(x: torch.Tensor, order: int = 2, dim: int = -1) -> torch.Tensor:
    """Taylor softmax ``f_n(x_i) / sum_j f_n(x_j)`` with ``f_n(x) = sum_{m<=n} x^m / m!``.

    Args:
        x: any shape; float32/float64 (+ float16/bfloat16).
        order: n, even and >= 2 (f_n is positive only for even n).
        dim: the dim normalised.

    Returns:
        ``x``-shaped probabilities in ``x``'s dtype.
    """
    _check_int("taylor_softmax", "order", order)
    if order < 2 or order % 2:
        raise ValueError(f"seqfuse.taylor_softmax: order must be even and >= 2, got {order}")
    dim = _check_dim("taylor_softmax", x, dim)
    check_backend("taylor_softmax", x)
    return torch.ops.seqfuse.taylor_softmax(x.movedim(dim, -1), order).movedim(-1, dim)


def entropy_normalize(
    p: torch.Tensor, target_entropy: float | torch.Tensor, iters: int = 4, dim: int = -1
) -> torch.Tensor:
    """Rescales distributions to a chosen entropy by the power transform
    ``p^gamma / sum p^gamma``, gamma found per row by ``iters`` Newton steps:

        H = -sum p log p,  gamma = 1 + (H* - H) / (H^2 - sum p (log p)^2)

    Zeros in ``p`` stay zero. The gradient (for ``p`` and a tensor ``target_entropy``)
    is exact: the adjoint of the unrolled iterations.

    Args:
        p: distributions along ``dim``, any shape; float32/float64 (+ float16/bfloat16).
        target_entropy: H* in nats: a number, or a tensor broadcastable to ``p``'s
            shape without ``dim``.
        iters: Newton steps, >= 0.
        dim: the dim normalised.

    Returns:
        ``p``-shaped distributions in ``p``'s dtype.
    """
    _check_int("entropy_normalize", "iters", iters)
    if iters < 0:
        raise ValueError(f"seqfuse.entropy_normalize: iters must be >= 0, got {iters}")
    dim = _check_dim("entropy_normalize", p, dim)
    rows = p.movedim(dim, -1)
    if not isinstance(target_entropy, torch.Tensor):
        # In the accumulation dtype: a default (float32) tensor would round a float64 H*.
        target_entropy = torch.tensor(float(target_entropy), dtype=_acc_dtype(p.dtype),
                                      device=p.device)
    check_backend("entropy_normalize", p, target_entropy)
    try:
        target = target_entropy.to(_acc_dtype(p.dtype)).expand(rows.shape[:-1])
    except RuntimeError as err:
        raise ValueError(
            f"seqfuse.entropy_normalize: target_entropy of shape {tuple(target_entropy.shape)} "
            f"does not broadcast to p's rows {tuple(rows.shape[:-1])}"
        ) from err
    return torch.ops.seqfuse.entropy_normalize(rows, target, iters).movedim(-1, dim)


# Fake kernels: shapes and dtypes only.


def _rows_like(x, last):
    return x.new_empty((*x.shape[:-1], last))


@torch.library.register_fake("seqfuse::sparse_softmax")
def _sparse_softmax_fake(x, k):
    return x.new_empty(x.shape)


@torch.library.register_fake("seqfuse::sparse_softmax_backward")
def _sparse_softmax_backward_fake(grad, probs):
    return probs.new_empty(probs.shape)


@torch.library.register_fake("seqfuse::topk_softmax")
def _topk_softmax_fake(x, k):
    kk = min(k, x.shape[-1])
    return _rows_like(x, kk), _rows_like(x, kk).to(torch.int64)


@torch.library.register_fake("seqfuse::topk_softmax_backward")
def _topk_softmax_backward_fake(grad, probs, indices, V):
    return _rows_like(probs, V)


@torch.library.register_fake("seqfuse::sparse_softmax_cross_entropy")
def _cross_entropy_fake(logits, target, k, ignore_index):
    N, V = logits.shape
    acc = _acc_dtype(logits.dtype)
    indices = logits.new_empty((N, k if k < V else 0), dtype=torch.int64)
    # lse [N, 2]: the kept log-sum-exp as (max, log of the sum), kept apart for precision.
    return logits.new_empty((N,), dtype=acc), logits.new_empty((N, 2), dtype=acc), indices


@torch.library.register_fake("seqfuse::sparse_softmax_cross_entropy_backward")
def _cross_entropy_backward_fake(grad_loss, logits, target, lse, indices, ignore_index):
    return logits.new_empty(logits.shape)


@torch.library.register_fake("seqfuse::taylor_softmax")
def _taylor_softmax_fake(x, order):
    return x.new_empty(x.shape)


@torch.library.register_fake("seqfuse::taylor_softmax_backward")
def _taylor_softmax_backward_fake(grad, x, out, order):
    return x.new_empty(x.shape)


@torch.library.register_fake("seqfuse::entropy_normalize")
def _entropy_normalize_fake(p, target_entropy, iters):
    return p.new_empty(p.shape)


@torch.library.register_fake("seqfuse::entropy_normalize_backward")
def _entropy_normalize_backward_fake(grad, p, target_entropy, iters):
    return p.new_empty(p.shape), target_entropy.new_empty(target_entropy.shape)


# Autograd.


def _sparse_softmax_setup(ctx, inputs, output):
    ctx.save_for_backward(output)


def _sparse_softmax_backward(ctx, grad):
    (probs,) = ctx.saved_tensors
    return torch.ops.seqfuse.sparse_softmax_backward(grad, probs), None


def _topk_softmax_setup(ctx, inputs, output):
    x, _ = inputs
    probs, indices = output
    ctx.save_for_backward(probs, indices)
    ctx.mark_non_differentiable(indices)
    ctx.V = x.shape[-1]


def _topk_softmax_backward(ctx, grad_probs, _grad_indices):
    probs, indices = ctx.saved_tensors
    return torch.ops.seqfuse.topk_softmax_backward(grad_probs, probs, indices, ctx.V), None


def _cross_entropy_setup(ctx, inputs, output):
    logits, target, _, ignore_index = inputs
    _, lse, indices = output
    ctx.save_for_backward(logits, target, lse, indices)
    ctx.mark_non_differentiable(lse, indices)
    ctx.ignore_index = ignore_index


def _cross_entropy_backward(ctx, grad_loss, _grad_lse, _grad_indices):
    logits, target, lse, indices = ctx.saved_tensors
    grad = torch.ops.seqfuse.sparse_softmax_cross_entropy_backward(
        grad_loss, logits, target, lse, indices, ctx.ignore_index
    )
    return grad, None, None, None


def _taylor_setup(ctx, inputs, output):
    x, order = inputs
    ctx.save_for_backward(x, output)
    ctx.order = order


def _taylor_backward(ctx, grad):
    x, out = ctx.saved_tensors
    return torch.ops.seqfuse.taylor_softmax_backward(grad, x, out, ctx.order), None


def _entropy_setup(ctx, inputs, output):
    p, target, iters = inputs
    ctx.save_for_backward(p, target)
    ctx.iters = iters


def _entropy_backward(ctx, grad):
    p, target = ctx.saved_tensors
    grad_p, grad_target = torch.ops.seqfuse.entropy_normalize_backward(grad, p, target, ctx.iters)
    return grad_p, grad_target, None


torch.library.register_autograd(
    "seqfuse::sparse_softmax", _sparse_softmax_backward, setup_context=_sparse_softmax_setup
)
torch.library.register_autograd(
    "seqfuse::topk_softmax", _topk_softmax_backward, setup_context=_topk_softmax_setup
)
torch.library.register_autograd(
    "seqfuse::sparse_softmax_cross_entropy", _cross_entropy_backward,
    setup_context=_cross_entropy_setup,
)
torch.library.register_autograd(
    "seqfuse::taylor_softmax", _taylor_backward, setup_context=_taylor_setup
)
torch.library.register_autograd(
    "seqfuse::entropy_normalize", _entropy_backward, setup_context=_entropy_setup
)
