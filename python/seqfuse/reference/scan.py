"""Plain-PyTorch references for the scan family: readable first, fast never."""

from __future__ import annotations

import torch


def _acc(x: torch.Tensor) -> torch.Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _complex_step(a: torch.Tensor, h: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a * h + b`` on (real, imaginary) pairs ``[..., 2]``, the textbook product."""
    (ar, ai), (hr, hi), (br, bi) = a.unbind(-1), h.unbind(-1), b.unbind(-1)
    return torch.stack([ar * hr - ai * hi + br, ar * hi + ai * hr + bi], -1)


def _packed(cu_seqlens: torch.Tensor | None, b: torch.Tensor):
    """The spans (start, end) of packed sequences, checked; None without cu_seqlens."""
    if cu_seqlens is None:
        return None
    offsets = cu_seqlens.tolist()
    if b.shape[0] != 1 or cu_seqlens.dim() != 1 or not offsets or offsets[0] != 0 or any(
            y < x for x, y in zip(offsets, offsets[1:])) or offsets[-1] != b.shape[1]:
        raise ValueError("cu_seqlens must be [N + 1] offsets 0, ..., T of packed sequences "
                         "in b [1, T, C]")
    return list(zip(offsets[:-1], offsets[1:]))


def linear_scan(
    a: torch.Tensor,
    b: torch.Tensor,
    h0: torch.Tensor | None = None,
    *,
    reverse: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor:
    """``h_t = a_t * h_{t-1} + b_t`` one step at a time (see ``seqfuse.linear_scan``);
    packed sequences (``cu_seqlens``) one sequence at a time.

    Complex scans run on (real, imaginary) pairs: torch's complex add, and autograd's
    sum of complex gradients, compute ``x + 1 * y`` with a complex product, which turns
    inf + 0j into inf + nanj where the textbook arithmetic (the kernels') keeps it."""
    spans = _packed(cu_seqlens, b)
    if spans is not None:
        a = a.expand_as(b)
        parts = [linear_scan(a[:, s:e], b[:, s:e], None if h0 is None else h0[n:n + 1],
                             reverse=reverse) for n, (s, e) in enumerate(spans)]
        return torch.cat(parts, dim=1) if parts else b.clone()
    dtype = b.dtype
    a, b = _acc(a).expand_as(b), _acc(b)
    h = b.new_zeros(b.shape[0], b.shape[2]) if h0 is None else h0.to(b.dtype)
    step = (lambda a_t, h, b_t: a_t * h + b_t)
    if b.is_complex():
        a, b, h = torch.view_as_real(a), torch.view_as_real(b), torch.view_as_real(h)
        step = _complex_step
    a_t, b_t = a.unbind(1), b.unbind(1)
    steps = range(len(b_t) - 1, -1, -1) if reverse else range(len(b_t))
    out = [None] * len(b_t)
    for t in steps:
        h = step(a_t[t], h, b_t[t])
        out[t] = h
    h = torch.stack(out, dim=1) if out else b
    return (torch.view_as_complex(h) if dtype.is_complex else h).to(dtype)


def linear_scan_logspace(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The same scan in closed form, valid only for ``a > 0`` and ``b > 0``:

        h_t = prod_{s<=t} a_s * sum_{s<=t} b_s / prod_{r<=s} a_r
        log h_t = cumsum(log a)_t + logcumsumexp(log b - cumsum(log a))_t
    """
    log_a = torch.cumsum(torch.log(a.expand_as(b)), dim=1)
    return torch.exp(log_a + torch.logcumsumexp(torch.log(b) - log_a, dim=1))


def lru(
    u: torch.Tensor,
    nu_log: torch.Tensor,
    theta_log: torch.Tensor,
    gamma_log: torch.Tensor,
    B_re: torch.Tensor,
    B_im: torch.Tensor,
    C_re: torch.Tensor,
    C_im: torch.Tensor,
    D: torch.Tensor,
    h0: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The Linear Recurrent Unit (Orvieto et al. 2023), one step at a time.

        lambda = exp(-exp(nu_log) + i exp(theta_log))
        h_t = lambda * h_{t-1} + (B_re + i B_im) diag(exp(gamma_log)) u_t
        y_t = Re(C h_t) + D * u_t

    ``u``: [B, T, H]; returns ``(y [B, T, H], h_T [B, N])``. With ``cu_seqlens``
    (packed sequences in ``u`` [1, T, H]): ``h_T`` [S, N], one final state per sequence.
    """
    spans = _packed(cu_seqlens, u)
    if spans is not None:
        params = (nu_log, theta_log, gamma_log, B_re, B_im, C_re, C_im, D)
        runs = [lru(u[:, s:e], *params, None if h0 is None else h0[n:n + 1])
                for n, (s, e) in enumerate(spans)]
        if not runs:  # no sequences at all
            lam_dtype = torch.complex128 if nu_log.dtype == torch.float64 else torch.complex64
            return u * D, torch.zeros(0, nu_log.shape[0], dtype=lam_dtype, device=u.device)
        return torch.cat([y for y, _ in runs], dim=1), torch.cat([h for _, h in runs])
    lam = torch.exp(torch.complex(-torch.exp(nu_log), torch.exp(theta_log)))
    B = torch.complex(B_re, B_im) * torch.exp(gamma_log)[:, None]
    C = torch.complex(C_re, C_im)
    h = (torch.zeros(u.shape[0], nu_log.shape[0], dtype=lam.dtype, device=u.device)
         if h0 is None else h0)
    ys = []
    for t in range(u.shape[1]):
        h = lam * h + u[:, t].to(B.dtype) @ B.T
        ys.append((h @ C.T).real + D * u[:, t])
    return (torch.stack(ys, dim=1) if ys else D * u), h  # T = 0: empty y, h = h0

