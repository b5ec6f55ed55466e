"""Causal linear attention layer (Katharopoulos et al. 2020; Performer, Choromanski et
al. 2021), its attention run by seqfuse.causal_linear_attention."""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from seqfuse.ops.linear_attention import FEATURE_MAPS, causal_linear_attention


def orthogonal_gaussian(m: int, d: int, *, device=None, dtype=None,
                        generator: torch.Generator | None = None) -> torch.Tensor:
    """``[m, d]`` rows drawn as in Performer: blocks of d orthonormal directions (QR of a
    Gaussian matrix), each row rescaled by the norm of an independent Gaussian d-vector,
    so every row has the length distribution of a Gaussian vector."""
    blocks = []
    for _ in range(math.ceil(m / d)):
        g = torch.randn(d, d, generator=generator, dtype=torch.float64)
        blocks.append(torch.linalg.qr(g).Q.T)
    w = torch.cat(blocks)[:m]
    norms = torch.randn(m, d, generator=generator, dtype=torch.float64).norm(dim=1, keepdim=True)
    return (w * norms).to(device=device, dtype=dtype)


class CausalLinearAttention(nn.Module):
    """Multi-head causal linear attention with q/k/v/o projections.

        q, k, v = x W_q, x W_k, x W_v       split into H heads of size D = d_model / H
        o_i = phi(q_i)^T S_i / (phi(q_i)^T z_i + eps) per head, y = o W_o
        (docs/linear_attention.md)

    Args:
        d_model: model width; n_heads must divide it.
        feature_map: ``"elu1"``, ``"relu"``, ``"identity"`` (applied inside the kernel),
            or ``"favor"``: Performer FAVOR+ positive orthogonal random features
            ``phi(x) = exp(w^T x - |x|^2 / 2) / sqrt(m)`` of ``x = D^(-1/4) q`` (and k),
            computed here and passed to the kernel as ``"identity"``, so that
            ``phi(q)^T phi(k)`` estimates ``exp(q^T k / sqrt(D))``.
        n_features: m, the number of random features for ``"favor"`` (default D, at
            most 256).
        normalize: divide by the normaliser (off: unnormalised linear attention).
        decay: None, one gamma for every head, or H values in (0, 1] (RetNet style).
        bias: biases in the projections.

    ``forward(x [B, T, d_model], state=None, return_state=False, *, cu_seqlens=None,
    prefix_lengths=None)`` returns ``y`` (and the final state ``(S [B, H, Dk, D], z [B, H,
    Dk])`` with return_state); ``step(x_t [B, d_model], state)`` decodes one token and
    returns ``(y_t, state)``, equal to the matching row of the full forward. With
    ``cu_seqlens`` (packed sequences, ``x`` [1, T, d_model]) the states are per sequence,
    ``[N, ...]``; ``prefix_lengths`` ([B], or [N] with cu_seqlens) makes the first P
    positions of each sequence a bidirectional prefix (UniLM), the rest causal; see
    ``seqfuse.causal_linear_attention``.
    """

    def __init__(self, d_model: int, n_heads: int, feature_map: str = "elu1", *,
                 n_features: int | None = None, normalize: bool = True,
                 decay: float | Sequence[float] | torch.Tensor | None = None, bias: bool = True,
                 eps: float = 1e-6, device=None, dtype=None):
        super().__init__()
        if n_heads < 1 or d_model % n_heads:
            raise ValueError(f"CausalLinearAttention: n_heads={n_heads} must divide d_model={d_model}")
        if feature_map not in (*FEATURE_MAPS, "favor"):
            raise ValueError(f"CausalLinearAttention: feature_map must be one of "
                             f"{(*FEATURE_MAPS, 'favor')}, got {feature_map!r}")
        factory = {"device": device, "dtype": dtype}
        self.d_model, self.n_heads, self.head_dim = d_model, n_heads, d_model // n_heads
        self.feature_map, self.normalize, self.eps = feature_map, normalize, eps
        self.q_proj = nn.Linear(d_model, d_model, bias=bias, **factory)
        self.k_proj = nn.Linear(d_model, d_model, bias=bias, **factory)
        self.v_proj = nn.Linear(d_model, d_model, bias=bias, **factory)
        self.o_proj = nn.Linear(d_model, d_model, bias=bias, **factory)
        if decay is None:
            self.register_buffer("decay", None)
        else:
            gamma = torch.as_tensor(decay, dtype=torch.float32).flatten().expand(n_heads).clone()
            if not bool(((gamma > 0) & (gamma <= 1)).all()):
                raise ValueError(f"CausalLinearAttention: decay must lie in (0, 1], got {decay}")
            self.register_buffer("decay", gamma.to(device))
        if feature_map == "favor":
            self.n_features = n_features or self.head_dim
            if not 1 <= self.n_features <= 256:
                raise ValueError("CausalLinearAttention: n_features must be in [1, 256] (the "
                                 f"kernel's largest head dim), got {self.n_features}")
            self.register_buffer("features", torch.empty(self.n_features, self.head_dim, **factory))
            self.redraw_features()
        else:
            self.n_features = None
            self.register_buffer("features", None)

    @torch.no_grad()
    def redraw_features(self, generator: torch.Generator | None = None) -> None:
        """Draws new orthogonal random features for ``"favor"`` (shared by the heads)."""
        if self.features is None:
            raise RuntimeError("CausalLinearAttention.redraw_features: feature_map is "
                               f"{self.feature_map!r}, not 'favor'")
        self.features.copy_(orthogonal_gaussian(self.n_features, self.head_dim, generator=generator))

    def _favor(self, x: torch.Tensor) -> torch.Tensor:
        x = x * self.head_dim ** -0.25
        proj = x @ self.features.T.to(x.dtype)
        return torch.exp(proj - 0.5 * (x * x).sum(-1, keepdim=True)) * self.n_features ** -0.5

    def forward(self, x: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor] | None = None,
                return_state: bool = False, *, cu_seqlens: torch.Tensor | None = None,
                prefix_lengths: torch.Tensor | None = None):
        if x.dim() != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"CausalLinearAttention: x must be [B, T, {self.d_model}], "
                             f"got {tuple(x.shape)}")
        B, T, _ = x.shape
        heads = (B, T, self.n_heads, self.head_dim)
        q, k, v = (p(x).view(heads) for p in (self.q_proj, self.k_proj, self.v_proj))
        fmap, scale = self.feature_map, None
        if fmap == "favor":
            q, k, fmap, scale = self._favor(q), self._favor(k), "identity", 1.0
        o, new_state = causal_linear_attention(
            q, k, v, feature_map=fmap, normalize=self.normalize, decay=self.decay, scale=scale,
            initial_state=state, return_state=True, eps=self.eps, cu_seqlens=cu_seqlens,
            prefix_lengths=prefix_lengths)
        y = self.o_proj(o.reshape(B, T, self.d_model))
        return (y, new_state) if return_state else y

    def step(self, x_t: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor] | None = None):
        """One decoding step: ``x_t`` [B, d_model] -> ``(y_t [B, d_model], state)``."""
        y, state = self.forward(x_t[:, None], state, return_state=True)
        return y[:, 0], state

    def extra_repr(self) -> str:
        extra = f", n_features={self.n_features}" if self.n_features else ""
        return (f"d_model={self.d_model}, n_heads={self.n_heads}, "
                f"feature_map={self.feature_map!r}{extra}, normalize={self.normalize}")
