"""GlobalPointer in plain PyTorch: einsum, RoPE, masks and the textbook losses.

Readable first and fast never. The sparse loss here is exact (it scatters the
positives into dense labels); ``sparse_multilabel_categorical_crossentropy_textbook``
keeps the usual formula, which cancels, for comparison.
"""

from __future__ import annotations

import torch


def rope(x: torch.Tensor, positions: torch.Tensor | None = None, *,
         base: float = 10000.0) -> torch.Tensor:
    """RoPE of ``x`` ``[B, L, H, D]`` or ``[B, L, D]`` at ``positions`` ``[L]``/``[B, L]``."""
    L, D = x.shape[1], x.shape[-1]
    pos = torch.arange(L, device=x.device) if positions is None else positions
    theta = base ** (-2 * torch.arange(D // 2, dtype=torch.float64, device=x.device) / D)
    angle = pos.to(torch.float64)[..., None] * theta              # [(B,) L, D/2]
    cos = angle.cos().repeat_interleave(2, -1)
    sin = angle.sin().repeat_interleave(2, -1)
    if x.dim() == 4:
        cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    rotated = torch.stack([-x[..., 1::2], x[..., ::2]], -1).reshape(x.shape)
    return (x * cos + rotated * sin).to(x.dtype)


_rope = rope  # global_pointer_scores' `rope` flag shadows the function


def global_pointer_scores(q, k, *, mask=None, rope=True, tril=True, scale=None,
                          bias_start=None, bias_end=None, mask_zero=False) -> torch.Tensor:
    """Scores ``[B, H, L, L]`` of q, k ``[B, L, H|1, D]``; see seqfuse.global_pointer_scores.
    ``mask_zero`` masks span (0, 0) too (the sparse losses' padding slot)."""
    B, L, _, D = q.shape
    if rope:
        q, k = _rope(q), _rope(k)
    masked = torch.zeros(L, L, dtype=torch.bool, device=q.device)
    if tril:
        masked = torch.ones_like(masked).tril(-1)
    if mask_zero and L:
        masked[0, 0] = True
    masked = masked.expand(B, 1, L, L)
    if mask is not None:
        pad = mask == 0
        masked = masked | pad[:, None, :, None] | pad[:, None, None, :]
    # c q . k with c on q first, as the kernels: (q . k) c would overflow for a product
    # beyond the dtype's range whose scaled value is within it. Each span multiplies its
    # own q_i and k_j, both zeroed where it is masked: a product of matrices would give
    # the masked spans' zero gradients times q_i or k_j, 0 * NaN for a non-finite one.
    c = D ** -0.5 if scale is None else scale
    keep = ~masked[..., None]                                      # [B, 1, L, L, 1]
    qi = (q * c).permute(0, 2, 1, 3)[:, :, :, None, :]             # [B, H, L, 1, D]
    kj = k.permute(0, 2, 1, 3)[:, :, None, :, :]                   # [B, H, 1, L, D]
    s = (torch.where(keep, qi, 0.0) * torch.where(keep, kj, 0.0)).sum(-1)
    if bias_start is not None:
        s = s + bias_start[..., :, None]
    if bias_end is not None:
        s = s + bias_end[..., None, :]
    return s.masked_fill(masked, float("-inf"))


def _reduce(loss, reduction):
    return {"none": loss, "mean": loss.mean(), "sum": loss.sum()}[reduction]


def multilabel_categorical_crossentropy(scores, labels, reduction="mean"):
    """``log(1 + sum (1-t) e^s) + log(1 + sum t e^-s)`` per row; -inf scores ignored."""
    t = labels.to(scores.dtype)
    keep = scores != float("-inf")
    neg = torch.where(keep & (t < 1), scores + torch.log1p(-t), float("-inf"))
    pos = torch.where(keep & (t > 0), torch.log(t) - scores, float("-inf"))
    zero = scores.new_zeros(*scores.shape[:-1], 1)  # the "1 +" (also of an empty row)
    loss = (torch.logsumexp(torch.cat([zero, neg], -1), -1)
            + torch.logsumexp(torch.cat([zero, pos], -1), -1))
    return _reduce(loss, reduction)


def sparse_labels(scores, pos_index, mask_zero=False):
    """Dense {0, 1} labels of scores' shape with 1 at every listed positive."""
    index = pos_index.long()
    ones = torch.ones_like(index, dtype=scores.dtype)
    src = (index != 0).to(scores.dtype) if mask_zero else ones
    return torch.zeros_like(scores).scatter_reduce(-1, index, src, "amax")


def sparse_multilabel_categorical_crossentropy(scores, pos_index, mask_zero=False,
                                               reduction="mean"):
    """Exact sparse loss: the dense loss on the scattered labels. With ``mask_zero``,
    flat index 0 is bert4keras' padding slot: no positive, and its score is masked
    (-inf) so it is no negative either."""
    labels = sparse_labels(scores, pos_index, mask_zero)
    if mask_zero and scores.shape[-1] > 0:
        slot = torch.zeros(scores.shape[-1], dtype=torch.bool, device=scores.device)
        slot[0] = True
        scores = scores.masked_fill(slot, float("-inf"))
    return multilabel_categorical_crossentropy(scores, labels, reduction)


def sparse_multilabel_categorical_crossentropy_textbook(scores, pos_index, mask_zero=False,
                                                        reduction="mean", epsilon=1e-7):
    """The formula of bert4keras / bert4torch: negative term as
    ``lse_all + log(clip(1 - e^{lse_pos - lse_all}, epsilon, 1))``. It cancels when
    the positives dominate the row and then goes negative or NaN."""
    zeros = torch.zeros_like(scores[..., :1])
    y_pred = torch.cat([scores, zeros], -1)
    if mask_zero:
        infs = zeros + float("inf")
        y_pred = torch.cat([infs, y_pred[..., 1:]], -1)
    y_pos_2 = torch.gather(y_pred, -1, pos_index.long())
    y_pos_1 = torch.cat([y_pos_2, zeros], -1)
    if mask_zero:
        y_pred = torch.cat([-infs, y_pred[..., 1:]], -1)
        y_pos_2 = torch.gather(y_pred, -1, pos_index.long())
    pos_loss = torch.logsumexp(-y_pos_1, -1)
    all_loss = torch.logsumexp(y_pred, -1)
    aux_loss = torch.logsumexp(y_pos_2, -1) - all_loss
    aux_loss = torch.clamp(1 - torch.exp(aux_loss), epsilon, 1)
    neg_loss = all_loss + torch.log(aux_loss)
    return _reduce(pos_loss + neg_loss, reduction)


def global_pointer_loss(q, k, pos_index, *, mask=None, rope=True, tril=True, scale=None,
                        bias_start=None, bias_end=None, mask_zero=True, reduction="mean"):
    """The sparse loss of the materialised scores, flattened to ``[B, H, L*L]``."""
    scores = global_pointer_scores(q, k, mask=mask, rope=rope, tril=tril, scale=scale,
                                   bias_start=bias_start, bias_end=bias_end,
                                   mask_zero=mask_zero)
    return sparse_multilabel_categorical_crossentropy(scores.flatten(-2), pos_index, mask_zero,
                                                      reduction)
