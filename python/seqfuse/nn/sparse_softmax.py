"""The SPACES sparse softmax cross-entropy as loss modules: on logits, and straight from
the LM head."""

from __future__ import annotations

import torch
from torch import nn

from seqfuse.ops.linear_cross_entropy import linear_sparse_softmax_cross_entropy
from seqfuse.ops.sparse_softmax import REDUCTIONS, sparse_softmax_cross_entropy


class SparseSoftmaxCrossEntropyLoss(nn.Module):
    """Cross-entropy over each row's top ``k`` logits: ``logsumexp_{top k}(s) - s_target``.

    The target is not forced into the top k (as in the SPACES summariser): an
    out-of-top-k target gets gradient -1 and a finite loss.

    Args:
        k: logits kept per row, >= 1 (``k >= V`` is the ordinary cross-entropy).
        ignore_index: target value whose rows count for nothing.
        reduction: ``"mean"`` (over rows not ignored), ``"sum"`` or ``"none"``.

    ``forward(logits [..., V], target [...])`` flattens the leading dims into rows and
    returns a scalar, or the ``target``-shaped per-row losses for ``"none"``.
    """

    def __init__(self, k: int, ignore_index: int = -100, reduction: str = "mean") -> None:
        super().__init__()
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"SparseSoftmaxCrossEntropyLoss: k must be a positive int, got {k!r}")
        if reduction not in REDUCTIONS:
            raise ValueError(
                f"SparseSoftmaxCrossEntropyLoss: reduction must be one of {REDUCTIONS}, "
                f"got {reduction!r}"
            )
        self.k = k
        self.ignore_index = ignore_index
        self.reduction = reduction

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if logits.dim() < 1 or target.shape != logits.shape[:-1]:
            raise ValueError(
                "SparseSoftmaxCrossEntropyLoss: target must be logits' shape without the "
                f"last dim, got logits {tuple(logits.shape)} and target {tuple(target.shape)}"
            )
        loss = sparse_softmax_cross_entropy(
            logits.reshape(-1, logits.shape[-1]), target.reshape(-1), self.k,
            self.ignore_index, self.reduction,
        )
        return loss.view(target.shape) if self.reduction == "none" else loss

    def extra_repr(self) -> str:
        return f"k={self.k}, ignore_index={self.ignore_index}, reduction={self.reduction!r}"


class LinearSparseSoftmaxCrossEntropyLoss(nn.Module):
    """The SPACES loss of an LM head's logits, without materialising them:
    ``forward(hidden, lm_head_weight, target, bias=None)`` equals
    ``SparseSoftmaxCrossEntropyLoss(k)(hidden @ lm_head_weight.T + bias, target)``.

    Pass the head's parameter itself (``model.lm_head.weight``, or the tied input
    embedding's weight): the gradient flows into it.

    Args:
        k: logits kept per row, in ``[1, V]``.
        ignore_index: target value whose rows count for nothing.
        reduction: ``"mean"`` (over rows not ignored), ``"sum"`` or ``"none"``.
        chunk_size: vocabulary columns computed at a time (see
            ``seqfuse.linear_sparse_softmax_cross_entropy``).

    Shapes: ``hidden [..., D]``, ``lm_head_weight [V, D]``, ``target [...]`` (int64),
    ``bias [V]``; the loss is a scalar, or ``target``-shaped for ``"none"``.
    """

    def __init__(self, k: int, ignore_index: int = -100, reduction: str = "mean",
                 chunk_size: int | None = None) -> None:
        super().__init__()
        name = type(self).__name__
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"{name}: k must be a positive int, got {k!r}")
        if reduction not in REDUCTIONS:
            raise ValueError(f"{name}: reduction must be one of {REDUCTIONS}, got {reduction!r}")
        self.k = k
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.chunk_size = chunk_size

    def forward(self, hidden: torch.Tensor, lm_head_weight: torch.Tensor, target: torch.Tensor,
                bias: torch.Tensor | None = None) -> torch.Tensor:
        return linear_sparse_softmax_cross_entropy(
            hidden, lm_head_weight, target, self.k, bias=bias, ignore_index=self.ignore_index,
            reduction=self.reduction, chunk_size=self.chunk_size,
        )

    def extra_repr(self) -> str:
        return f"k={self.k}, ignore_index={self.ignore_index}, reduction={self.reduction!r}"
