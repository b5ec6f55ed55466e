"""GlobalPointer ops: RoPE, fused span scores, exact multilabel losses and the fused loss.

    R x:  pairs (2i, 2i+1) rotated by pos * base^(-2i/D)
    s[b,h,i,j] = scale * (R_i q[b,i,h]) . (R_j k[b,j,h]) + bias_start[b,h,i] + bias_end[b,h,j]
                 (-inf where a token is padding or, with tril, i > j)
    loss(row)  = log(1 + sum_{neg} e^{s}) + log(1 + sum_{pos} e^{-s})   (s = -inf ignored)

The loss ops return the two terms (neg, pos) of every row, [..., 2], in the accumulation
type (float32 for half inputs: they are the normalisers of the backward); the wrappers sum
them and apply the reduction, so autograd of the reduction is plain PyTorch.
"""

from __future__ import annotations

import torch

from seqfuse._extension import check_backend

_REDUCTIONS = ("none", "mean", "sum")


def _reduce(terms: torch.Tensor, reduction: str, dtype: torch.dtype) -> torch.Tensor:
    # The terms come in the accumulation type (float32 for half inputs): they are the
    # normalisers of the backward, so they are rounded to the input's dtype only here.
    # The mean is taken in float64: rows' losses near the dtype's max have a mean within
    # its range whose sum is not.
    loss = terms.sum(-1)
    if reduction == "mean":
        loss = loss.mean(dtype=torch.float64)
    elif reduction == "sum":
        loss = loss.sum()
    return loss.to(dtype)


def _check_reduction(op: str, reduction: str) -> None:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"{op}: reduction must be one of {_REDUCTIONS}, got {reduction!r}")


def rope(x: torch.Tensor, positions: torch.Tensor | None = None, *,
         base: float = 10000.0) -> torch.Tensor:
    """Rotary position embedding as RoFormer and GlobalPointer use it.

    ``out = x * cos + rotate(x) * sin`` with ``rotate(x) = [-x1, x0, -x3, x2, ...]``,
    angle ``pos * base^(-2i/D)`` for pair ``(2i, 2i+1)``.

    Args:
        x: ``[B, L, H, D]`` or ``[B, L, D]``, D even; float32/float64 (CPU), also
            float16/bfloat16 on CUDA.
        positions: integer ``[L]`` or ``[B, L]``; ``0..L-1`` if None. Not differentiated.
        base: the frequency base (10000 in RoFormer).

    Returns:
        ``x`` rotated, same shape and dtype.
    """
    check_backend("rope", x, positions)
    return torch.ops.seqfuse.rope(x, positions, base, False)


def global_pointer_scores(
    q: torch.Tensor, k: torch.Tensor, *, mask: torch.Tensor | None = None, rope: bool = True,
    tril: bool = True, scale: float | None = None, bias_start: torch.Tensor | None = None,
    bias_end: torch.Tensor | None = None,
) -> torch.Tensor:
    """Span scores of GlobalPointer / Efficient GlobalPointer in one kernel.

    Args:
        q, k: ``[B, L, H, D]``, or ``[B, L, 1, D]`` shared by every head (Efficient
            GlobalPointer; the heads then come from the biases). D even with rope.
        mask: ``[B, L]``, nonzero for real tokens; spans touching padding get -inf.
        rope: rotate q and k by their positions (0..L-1, base 10000) first.
        tril: give -inf to spans ending before they start (i > j).
        scale: multiplies q.k; ``D ** -0.5`` if None.
        bias_start: ``[B, H, L]`` added along rows i. bias_end: ``[B, H, L]`` along columns j.

    Returns:
        scores ``[B, H, L, L]`` in q's dtype.
    """
    check_backend("global_pointer_scores", q, k, mask, bias_start, bias_end)
    return torch.ops.seqfuse.global_pointer_scores(q, k, mask, rope, tril, scale, bias_start,
                                                   bias_end)


def multilabel_categorical_crossentropy(scores: torch.Tensor, labels: torch.Tensor,
                                        reduction: str = "mean") -> torch.Tensor:
    """Multilabel categorical crossentropy (Su Jianlin) of each row of ``scores``.

    ``log(1 + sum_i (1 - t_i) e^{s_i}) + log(1 + sum_i t_i e^{-s_i})``; hard labels
    (t in {0, 1}) or soft labels in [0, 1]; entries with s = -inf are ignored.

    Args:
        scores: ``[..., N]`` float. labels: same shape, values in [0, 1] (not
            differentiated).
        reduction: ``"none"`` (``[...]``), ``"mean"`` or ``"sum"`` over rows.
    """
    _check_reduction("multilabel_categorical_crossentropy", reduction)
    check_backend("multilabel_categorical_crossentropy", scores, labels)
    terms = torch.ops.seqfuse.multilabel_categorical_crossentropy(scores, labels)
    return _reduce(terms, reduction, scores.dtype)


def sparse_multilabel_categorical_crossentropy(
    scores: torch.Tensor, pos_index: torch.Tensor, mask_zero: bool = False,
    reduction: str = "mean",
) -> torch.Tensor:
    """The multilabel categorical crossentropy with positives given as indices.

    The negative term is a log-sum-exp over the negatives themselves, never
    ``lse_all + log(1 - e^{lse_pos - lse_all})``, so it cannot cancel: the loss stays
    finite and non-negative. Repeated indices count once.

    Args:
        scores: ``[..., N]`` float.
        pos_index: integer ``[..., P]`` (same leading dims), flat indices in ``[0, N)``
            (``i * L + j`` for GlobalPointer scores flattened over the last two dims).
        mask_zero: flat index 0 is a padding slot and is ignored entirely, as in
            bert4keras: entries 0 of ``pos_index`` are no positives, and score 0 (span
            (0, 0) for GlobalPointer) is left out of the negatives too (zero gradient).
        reduction: ``"none"`` (``[...]``), ``"mean"`` or ``"sum"`` over rows.
    """
    _check_reduction("sparse_multilabel_categorical_crossentropy", reduction)
    check_backend("sparse_multilabel_categorical_crossentropy", scores, pos_index)
    terms = torch.ops.seqfuse.sparse_multilabel_categorical_crossentropy(scores, pos_index,
                                                                         mask_zero)
    return _reduce(terms, reduction, scores.dtype)


def global_pointer_loss(
    q: torch.Tensor, k: torch.Tensor, pos_index: torch.Tensor, *,
    mask: torch.Tensor | None = None, rope: bool = True, tril: bool = True,
    scale: float | None = None, bias_start: torch.Tensor | None = None,
    bias_end: torch.Tensor | None = None, mask_zero: bool = True, reduction: str = "mean",
) -> torch.Tensor:
    """The sparse loss of GlobalPointer scores straight from q and k.

    Equal to ``sparse_multilabel_categorical_crossentropy(global_pointer_scores(q, k,
    ...).flatten(-2), pos_index, mask_zero, reduction)`` but computed tile by tile:
    ``[B, H, L, L]`` is never materialised, forward or backward (which recomputes the
    tiles), so memory is O(B*H*L*D).

    Args:
        q, k, mask, rope, tril, scale, bias_start, bias_end: as global_pointer_scores.
        pos_index: integer ``[B, H, P]`` of flat span indices ``i * L + j``.
        mask_zero: flat index 0 is padding (as bert4keras pads its sparse labels) and is
            ignored entirely: no positive, and span (0, 0) is no negative either.
        reduction: ``"none"`` (``[B, H]``), ``"mean"`` or ``"sum"`` over (b, h).
    """
    _check_reduction("global_pointer_loss", reduction)
    check_backend("global_pointer_loss", q, k, pos_index, mask, bias_start, bias_end)
    terms = torch.ops.seqfuse.global_pointer_loss(q, k, pos_index, mask, rope, tril, scale,
                                                  bias_start, bias_end, mask_zero)
    return _reduce(terms, reduction, q.dtype)


# ---- fake kernels -------------------------------------------------------------------

def _heads(q, bias_start, bias_end):
    if q.shape[2] != 1:
        return q.shape[2]
    for bias in (bias_start, bias_end):
        if bias is not None:
            return bias.shape[1]
    return 1


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


@torch.library.register_fake("seqfuse::rope")
def _rope_fake(x, positions=None, base=10000.0, inverse=False):
    return x.new_empty(x.shape)


@torch.library.register_fake("seqfuse::global_pointer_scores")
def _scores_fake(q, k, mask=None, rope=True, tril=True, scale=None, bias_start=None,
                 bias_end=None):
    B, L = q.shape[0], q.shape[1]
    return q.new_empty((B, _heads(q, bias_start, bias_end), L, L))


def _gp_grads_fake(q, bias_start, bias_end):
    B, L = q.shape[0], q.shape[1]
    H = _heads(q, bias_start, bias_end)
    bias_grad = (B, H, L)
    return q.new_empty(q.shape), q.new_empty(q.shape), q.new_empty(bias_grad), q.new_empty(bias_grad)


@torch.library.register_fake("seqfuse::global_pointer_scores_backward")
def _scores_backward_fake(grad, q, k, mask, rope, tril, scale, bias_start, bias_end):
    return _gp_grads_fake(q, bias_start, bias_end)


@torch.library.register_fake("seqfuse::multilabel_categorical_crossentropy")
def _mce_fake(scores, labels):
    return scores.new_empty((*scores.shape[:-1], 2), dtype=_acc_dtype(scores.dtype))


@torch.library.register_fake("seqfuse::multilabel_categorical_crossentropy_backward")
def _mce_backward_fake(grad_terms, terms, scores, labels):
    return scores.new_empty(scores.shape)


@torch.library.register_fake("seqfuse::sparse_multilabel_categorical_crossentropy")
def _sparse_fake(scores, pos_index, mask_zero=False):
    return scores.new_empty((*scores.shape[:-1], 2), dtype=_acc_dtype(scores.dtype))


@torch.library.register_fake("seqfuse::sparse_multilabel_categorical_crossentropy_backward")
def _sparse_backward_fake(grad_terms, terms, scores, pos_index, mask_zero):
    return scores.new_empty(scores.shape)


@torch.library.register_fake("seqfuse::global_pointer_loss")
def _loss_fake(q, k, pos_index, mask=None, rope=True, tril=True, scale=None, bias_start=None,
               bias_end=None, mask_zero=True):
    return q.new_empty((q.shape[0], _heads(q, bias_start, bias_end), 2),
                       dtype=_acc_dtype(q.dtype))


@torch.library.register_fake("seqfuse::global_pointer_loss_backward")
def _loss_backward_fake(grad_terms, terms, q, k, pos_index, mask, rope, tril, scale, bias_start,
                        bias_end, mask_zero):
    return _gp_grads_fake(q, bias_start, bias_end)


# ---- autograd -----------------------------------------------------------------------

def _rope_setup(ctx, inputs, output):
    _, ctx.positions, ctx.base, ctx.inverse = inputs


def _rope_backward(ctx, grad):
    # R is a rotation, so its transpose is the rotation the other way.
    return torch.ops.seqfuse.rope(grad, ctx.positions, ctx.base, not ctx.inverse), None, None, None


torch.library.register_autograd("seqfuse::rope", _rope_backward, setup_context=_rope_setup)


def _bias_grad(grad, bias):
    return None if bias is None else grad.to(bias.dtype)


def _scores_setup(ctx, inputs, output):
    q, k, mask, rope, tril, scale, bias_start, bias_end = inputs
    ctx.save_for_backward(q, k, mask, bias_start, bias_end)
    ctx.args = (rope, tril, scale)


def _scores_backward(ctx, grad):
    q, k, mask, bias_start, bias_end = ctx.saved_tensors
    gq, gk, gbs, gbe = torch.ops.seqfuse.global_pointer_scores_backward(
        grad, q, k, mask, *ctx.args, bias_start, bias_end)
    return gq, gk, None, None, None, None, _bias_grad(gbs, bias_start), _bias_grad(gbe, bias_end)


torch.library.register_autograd("seqfuse::global_pointer_scores", _scores_backward,
                                setup_context=_scores_setup)


def _mce_setup(ctx, inputs, output):
    scores, labels = inputs
    ctx.save_for_backward(output, scores, labels)


def _mce_backward(ctx, grad_terms):
    terms, scores, labels = ctx.saved_tensors
    grad = torch.ops.seqfuse.multilabel_categorical_crossentropy_backward(grad_terms, terms,
                                                                          scores, labels)
    return grad, None


torch.library.register_autograd("seqfuse::multilabel_categorical_crossentropy", _mce_backward,
                                setup_context=_mce_setup)


def _sparse_setup(ctx, inputs, output):
    scores, pos_index, ctx.mask_zero = inputs
    ctx.save_for_backward(output, scores, pos_index)


def _sparse_backward(ctx, grad_terms):
    terms, scores, pos_index = ctx.saved_tensors
    grad = torch.ops.seqfuse.sparse_multilabel_categorical_crossentropy_backward(
        grad_terms, terms, scores, pos_index, ctx.mask_zero)
    return grad, None, None


torch.library.register_autograd("seqfuse::sparse_multilabel_categorical_crossentropy",
                                _sparse_backward, setup_context=_sparse_setup)


def _loss_setup(ctx, inputs, output):
    q, k, pos_index, mask, rope, tril, scale, bias_start, bias_end, mask_zero = inputs
    ctx.save_for_backward(output, q, k, pos_index, mask, bias_start, bias_end)
    ctx.args = (rope, tril, scale)
    ctx.mask_zero = mask_zero


def _loss_backward(ctx, grad_terms):
    terms, q, k, pos_index, mask, bias_start, bias_end = ctx.saved_tensors
    gq, gk, gbs, gbe = torch.ops.seqfuse.global_pointer_loss_backward(
        grad_terms, terms, q, k, pos_index, mask, *ctx.args, bias_start, bias_end, ctx.mask_zero)
    return (gq, gk, None, None, None, None, None, _bias_grad(gbs, bias_start),
            _bias_grad(gbe, bias_end), None)


torch.library.register_autograd("seqfuse::global_pointer_loss", _loss_backward,
                                setup_context=_loss_setup)
