"""Plain-PyTorch references for the scan family: readable first, fast never."""

from __future__ import annotations

import torch


def _acc(x: torch.Tensor) -> torch.Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _step(a: torch.Tensor, h: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a * h + b``; complex in real and imaginary parts, the textbook product, since
    torch's complex add computes ``h + 1 * b`` with a complex product (inf + 0j -> inf + nanj)."""
    if not h.is_complex():
        return a * h + b
    re = a.real * h.real - a.imag * h.imag + b.real
    im = a.real * h.imag + a.imag * h.real + b.imag
    return torch.complex(re, im)


def linear_scan(
    a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor | None = None, *, reverse: bool = False
) -> torch.Tensor:
    """``h_t = a_t * h_{t-1} + b_t`` one step at a time (see ``seqfuse.linear_scan``)."""
    dtype = b.dtype
    a_t, b_t = _acc(a).expand_as(b).unbind(1), _acc(b).unbind(1)
    acc = _acc(b)
    h = acc.new_zeros(acc.shape[0], acc.shape[2]) if h0 is None else h0.to(acc.dtype)
    steps = range(len(b_t) - 1, -1, -1) if reverse else range(len(b_t))
    out = [None] * len(b_t)
    for t in steps:
        h = _step(a_t[t], h, b_t[t])
        out[t] = h
    if not out:
        return _acc(b).to(dtype)
    return torch.stack(out, dim=1).to(dtype)


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
) -> tuple[torch.Tensor, torch.Tensor]:
    """The Linear Recurrent Unit (Orvieto et al. 2023), one step at a time.

        lambda = exp(-exp(nu_log) + i exp(theta_log))
        h_t = lambda * h_{t-1} + (B_re + i B_im) diag(exp(gamma_log)) u_t
        y_t = Re(C h_t) + D * u_t

    ``u``: [B, T, H]; returns ``(y [B, T, H], h_T [B, N])``.
    """
    lam = torch.exp(torch.complex(-torch.exp(nu_log), torch.exp(theta_log)))
    B = torch.complex(B_re, B_im) * torch.exp(gamma_log)[:, None]
    C = torch.complex(C_re, C_im)
    h = torch.zeros(u.shape[0], nu_log.shape[0], dtype=lam.dtype) if h0 is None else h0
    ys = []
    for t in range(u.shape[1]):
        h = lam * h + u[:, t].to(B.dtype) @ B.T
        ys.append((h @ C.T).real + D * u[:, t])
    return torch.stack(ys, dim=1), h
