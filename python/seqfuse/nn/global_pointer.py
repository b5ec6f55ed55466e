"""GlobalPointer and Efficient GlobalPointer (Su Jianlin) on the fused seqfuse ops.

The layers keep the weight layouts of bert4keras' ``GlobalPointer`` and
``EfficientGlobalPointer``, so trained weights map across: a Keras Dense kernel
``[in, out]`` is the transpose of the ``weight`` of the nn.Linear here, units in the
same order.
"""

from __future__ import annotations

import torch
from torch import nn

from seqfuse.ops.global_pointer import global_pointer_loss, global_pointer_scores


class GlobalPointer(nn.Module):
    """Span scores ``s[b, h, i, j]`` for ``heads`` span types.

    One dense layer to ``heads * head_size * 2`` units; head h owns units
    ``[2 * head_size * h, 2 * head_size * (h + 1))``, q the first half and k the second.
    Scores are ``(R_i q_i) . (R_j k_j) / sqrt(head_size)``, -inf on padding and (tril)
    below the diagonal.

    ``forward(x [B, L, hidden_size], mask [B, L] or None)`` -> scores ``[B, heads, L, L]``;
    ``loss(x, pos_index [B, heads, P], mask)`` -> the sparse multilabel loss, computed
    by the fused op without materialising the scores.
    """

    def __init__(self, hidden_size: int, heads: int, head_size: int = 64, rope: bool = True,
                 tril: bool = True, use_bias: bool = True, *, device=None, dtype=None):
        super().__init__()
        self.heads, self.head_size, self.rope, self.tril = heads, head_size, rope, tril
        self.dense = nn.Linear(hidden_size, heads * head_size * 2, bias=use_bias, device=device,
                               dtype=dtype)

    def _qk(self, x: torch.Tensor):
        B, L, _ = x.shape
        units = self.dense(x).view(B, L, self.heads, 2 * self.head_size)
        return units[..., :self.head_size], units[..., self.head_size:]

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        q, k = self._qk(x)
        return global_pointer_scores(q, k, mask=mask, rope=self.rope, tril=self.tril)

    def loss(self, x: torch.Tensor, pos_index: torch.Tensor, mask: torch.Tensor | None = None, *,
             mask_zero: bool = True, reduction: str = "mean") -> torch.Tensor:
        """Sparse multilabel loss of the scores; ``pos_index`` holds flat spans ``i * L + j``."""
        q, k = self._qk(x)
        return global_pointer_loss(q, k, pos_index, mask=mask, rope=self.rope, tril=self.tril,
                                   mask_zero=mask_zero, reduction=reduction)

    def extra_repr(self) -> str:
        return f"heads={self.heads}, head_size={self.head_size}, rope={self.rope}, tril={self.tril}"


class EfficientGlobalPointer(nn.Module):
    """GlobalPointer with one shared q/k projection and per-type biases.

    ``p_dense`` maps to ``2 * head_size`` units: q = even units, k = odd units (shared
    by every type). ``q_dense`` maps the pre-RoPE ``p_dense`` output to ``2 * heads``
    units, halved: unit ``2h`` is type h's end bias (added along columns j), unit
    ``2h + 1`` its start bias (along rows i). Scores are
    ``(R_i q_i) . (R_j k_j) / sqrt(head_size) + start[h, i] + end[h, j]``, masked as in
    GlobalPointer. ``forward`` and ``loss`` as in GlobalPointer.
    """

    def __init__(self, hidden_size: int, heads: int, head_size: int = 64, rope: bool = True,
                 tril: bool = True, *, device=None, dtype=None):
        super().__init__()
        self.heads, self.head_size, self.rope, self.tril = heads, head_size, rope, tril
        self.p_dense = nn.Linear(hidden_size, 2 * head_size, device=device, dtype=dtype)
        self.q_dense = nn.Linear(2 * head_size, 2 * heads, device=device, dtype=dtype)

    def _parts(self, x: torch.Tensor):
        p = self.p_dense(x)                                  # [B, L, 2 * head_size]
        q, k = p[..., ::2].unsqueeze(2), p[..., 1::2].unsqueeze(2)
        bias = (self.q_dense(p) / 2).transpose(1, 2)         # [B, 2 * heads, L]
        return q, k, bias[:, 1::2], bias[:, ::2]

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        q, k, start, end = self._parts(x)
        return global_pointer_scores(q, k, mask=mask, rope=self.rope, tril=self.tril,
                                     bias_start=start, bias_end=end)

    def loss(self, x: torch.Tensor, pos_index: torch.Tensor, mask: torch.Tensor | None = None, *,
             mask_zero: bool = True, reduction: str = "mean") -> torch.Tensor:
        """Sparse multilabel loss of the scores; ``pos_index`` holds flat spans ``i * L + j``."""
        q, k, start, end = self._parts(x)
        return global_pointer_loss(q, k, pos_index, mask=mask, rope=self.rope, tril=self.tril,
                                   bias_start=start, bias_end=end, mask_zero=mask_zero,
                                   reduction=reduction)

    def extra_repr(self) -> str:
        return f"heads={self.heads}, head_size={self.head_size}, rope={self.rope}, tril={self.tril}"


def global_pointer_decode(scores: torch.Tensor, threshold: float = 0.0) -> torch.Tensor:
    """Spans scoring above ``threshold``: scores ``[B, H, L, L]`` -> int64 ``[n, 4]`` rows
    ``(b, h, i, j)`` (start i, end j), in lexicographic order. Masked spans (-inf) never
    pass."""
    if scores.dim() != 4:
        raise ValueError(f"global_pointer_decode: scores must be [B, H, L, L], got shape "
                         f"{tuple(scores.shape)}")
    return torch.nonzero(scores > threshold)
