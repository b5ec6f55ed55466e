"""Plain-PyTorch references for causal linear attention: readable first, fast never.

    S_i = gamma S_{i-1} + phi(k_i) v_i^T,   z_i = gamma z_{i-1} + phi(k_i)
    o_i = scale phi(q_i)^T S_i / (scale phi(q_i)^T z_i + eps)     (normalize=True)

``causal_linear_attention`` (the recurrence) is the reference; the quadratic masked form
is kept beside it. Both take the arguments of ``seqfuse.causal_linear_attention`` and
compute in float32 for half inputs (float64 for float64), returning outputs in the input
dtype. Packed sequences (``cu_seqlens``) run one sequence at a time; the prefix-LM mask
(``prefix_lengths``): positions ``i < P`` read the state after the whole prefix,
``S_P = S_0 + sum_{j<P} phi(k_j) v_j^T``, the rest runs on causally from there.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class _Feature(torch.autograd.Function):
    """elu(x) + 1 or relu(x), NaN in, NaN out, with the kernels' derivative: 1 for x > 0,
    e^x (elu1) or 0 (relu) for x <= 0, and NaN at a NaN x (torch's own elu gives 1 or NaN
    there depending on the tensor's size, its relu 1)."""

    @staticmethod
    def forward(ctx, x, name):
        ctx.save_for_backward(x)
        ctx.name = name
        return F.elu(x) + 1 if name == "elu1" else torch.relu(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        below = torch.exp(x) if ctx.name == "elu1" else torch.zeros_like(x)
        slope = torch.where(x > 0, 1.0, torch.where(torch.isnan(x), x, below))
        return grad * slope, None


def feature_map(x: torch.Tensor, name: str) -> torch.Tensor:
    """phi: ``"identity"``, ``"elu1"`` (elu(x) + 1) or ``"relu"``."""
    if name == "identity":
        return x
    if name in ("elu1", "relu"):
        return _Feature.apply(x, name)
    raise ValueError(f"feature_map must be 'identity', 'elu1' or 'relu', got {name!r}")


def _prepare(q, k, v, fmap, decay, scale, initial_state):
    acc = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    B, T, H, Dk = q.shape
    Dv = v.shape[-1]
    qf = feature_map(q.to(acc), fmap).transpose(1, 2)  # [B, H, T, Dk]
    kf = feature_map(k.to(acc), fmap).transpose(1, 2)
    vv = v.to(acc).transpose(1, 2)                     # [B, H, T, Dv]
    gamma = torch.ones(H, dtype=acc, device=q.device) if decay is None else decay.to(acc)
    if initial_state is None:
        S0 = torch.zeros(B, H, Dk, Dv, dtype=acc, device=q.device)
        z0 = torch.zeros(B, H, Dk, dtype=acc, device=q.device)
    else:
        S0, z0 = (s.to(acc) for s in initial_state)
    scale = Dk ** -0.5 if scale is None else scale
    return qf, kf, vv, gamma, S0, z0, scale


def _per_sequence(fn, q, k, v, kw, cu_seqlens, prefix_lengths):
    """Calls fn once per packed sequence (or, for a prefix mask, per batch row) and joins
    the outputs along time (batch) and the states along their first dim."""
    initial_state = kw.pop("initial_state")
    if cu_seqlens is not None:
        bounds = cu_seqlens.tolist()
        if q.shape[0] != 1 or bounds[0] != 0 or bounds[-1] != q.shape[1] or any(
                y < x for x, y in zip(bounds, bounds[1:])):
            raise ValueError("cu_seqlens must be offsets 0, ..., T of packed sequences in [1, T, ...]")
        pieces = [(slice(None), slice(s, e)) for s, e in zip(bounds, bounds[1:])]
        join = 1
    else:
        pieces = [(slice(b, b + 1), slice(None)) for b in range(q.shape[0])]
        join = 0
    outs, states = [], []
    for n, (rows, steps) in enumerate(pieces):
        state = None if initial_state is None else tuple(s[n:n + 1] for s in initial_state)
        P = None if prefix_lengths is None else prefix_lengths[n:n + 1]
        o, st = fn(q[rows, steps], k[rows, steps], v[rows, steps], initial_state=state,
                   prefix_lengths=P, return_state=True, **kw)
        outs.append(o)
        states.append(st)
    if not outs:  # no sequences at all
        H, Dk, Dv = q.shape[2], q.shape[3], v.shape[3]
        return v[:, :0] if join else v[:0], (v.new_zeros(0, H, Dk, Dv), v.new_zeros(0, H, Dk))
    return torch.cat(outs, join), tuple(torch.cat(parts) for parts in zip(*states))


def causal_linear_attention(q, k, v, *, feature_map="identity", normalize=True, decay=None,
                            scale=None, initial_state=None, return_state=False, eps=1e-6,
                            cu_seqlens=None, prefix_lengths=None):
    """The reference: the recurrence, one step at a time. Step i reads only steps <= i
    (steps < P too, for a prefix position i < P), so a NaN or an infinity at step t
    changes no output before t outside a prefix (docs/linear_attention.md)."""
    if cu_seqlens is not None or (prefix_lengths is not None and q.shape[0] != 1):
        kw = dict(feature_map=feature_map, normalize=normalize, decay=decay, scale=scale,
                  initial_state=initial_state, eps=eps)
        out, state = _per_sequence(causal_linear_attention, q, k, v, kw, cu_seqlens,
                                   prefix_lengths)
        return (out, state) if return_state else out
    P = 0 if prefix_lengths is None else int(prefix_lengths[0])
    if P and decay is not None:
        raise ValueError("prefix_lengths with decay is not defined")
    qf, kf, vv, gamma, S, z, scale = _prepare(q, k, v, feature_map, decay, scale, initial_state)
    g = gamma[:, None]

    def update(S, z, i):
        return (g[..., None] * S + kf[:, :, i, :, None] * vv[:, :, i, None, :],
                g * z + kf[:, :, i])

    def read(S, z, i):
        o = scale * (qf[:, :, i, None, :] @ S)[:, :, 0]
        if normalize:
            o = o / (scale * (qf[:, :, i] * z).sum(-1, keepdim=True) + eps)
        return o

    for i in range(P):  # the prefix's state first: its positions all read it
        S, z = update(S, z, i)
    outs = [read(S, z, i) for i in range(P)]
    for i in range(P, q.shape[1]):
        S, z = update(S, z, i)
        outs.append(read(S, z, i))
    out = (torch.stack(outs, dim=2) if outs else vv).transpose(1, 2).to(q.dtype)
    return (out, (S, z)) if return_state else out


def causal_linear_attention_quadratic(q, k, v, *, feature_map="identity", normalize=True,
                                      decay=None, scale=None, initial_state=None,
                                      return_state=False, eps=1e-6, cu_seqlens=None,
                                      prefix_lengths=None):
    """The quadratic masked form: ``o = scale ((phi(Q) phi(K)^T . M) V + gamma^(i+1) phi(Q) S0)``
    with ``M_ij = gamma^(i-j)`` for ``j <= i``, divided by the same with ``V -> 1``. With
    ``prefix_lengths`` (no decay), the UniLM mask ``M_ij = 1`` for ``j < P or j <= i``.

    The maths of the chunked kernels and a benchmark baseline, not the reference: its
    matrix products multiply the mask's zeros by every score and value, so a NaN or an
    infinity in k or v at step t turns outputs before t NaN too (0 * NaN = NaN). Equal to
    ``causal_linear_attention`` for finite inputs."""
    if cu_seqlens is not None:
        kw = dict(feature_map=feature_map, normalize=normalize, decay=decay, scale=scale,
                  initial_state=initial_state, eps=eps)
        out, state = _per_sequence(causal_linear_attention_quadratic, q, k, v, kw, cu_seqlens,
                                   prefix_lengths)
        return (out, state) if return_state else out
    qf, kf, vv, gamma, S0, z0, scale = _prepare(q, k, v, feature_map, decay, scale, initial_state)
    T = q.shape[1]
    t = torch.arange(T, device=q.device)
    lag = (t[:, None] - t[None, :]).to(qf.dtype)                       # i - j
    g = gamma[:, None, None]
    mask = torch.where(lag >= 0, g ** lag.clamp(min=0), torch.zeros_like(lag))  # [H, T, T]
    carry = g[..., 0] ** (t + 1).to(qf.dtype)                           # gamma^(i+1), [H, T]
    if prefix_lengths is not None:
        if decay is not None:
            raise ValueError("prefix_lengths with decay is not defined")
        P = prefix_lengths.to(q.device)[:, None, None, None]           # [B, 1, 1, 1]
        unilm = (t[None, :] < P) | (t[None, :] <= t[:, None])            # M_ij: j < P or j <= i
        mask = unilm.to(qf.dtype)                                       # [B, 1, T, T]
    scores = (qf @ kf.transpose(-1, -2)) * mask
    num = scores @ vv + carry[..., None] * (qf @ S0)
    out = scale * num
    if normalize:
        den = scores.sum(-1) + carry * (qf @ z0[..., None])[..., 0]
        out = out / (scale * den + eps)[..., None]
    out = out.transpose(1, 2).to(q.dtype)
    if not return_state:
        return out
    tail = g[..., 0] ** (T - 1 - t).to(qf.dtype)                        # gamma^(T-1-j), [H, T]
    decay_T = (gamma ** T)[:, None]
    S_T = decay_T[..., None] * S0 + (kf * tail[..., None]).transpose(-1, -2) @ vv
    z_T = decay_T * z0 + (kf * tail[..., None]).sum(-2)
    return out, (S_T, z_T)
