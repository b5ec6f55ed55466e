"""The Linear Recurrent Unit (Orvieto et al. 2023, "Resurrecting Recurrent Neural
Networks for Long Sequences"), its recurrence run by seqfuse.linear_scan."""

from __future__ import annotations

import math

import torch
from torch import nn

from seqfuse.ops.scan import linear_scan


class LRU(nn.Module):
    """Linear Recurrent Unit with the published parameterisation and initialisation.

        lambda = exp(-exp(nu_log) + i exp(theta_log))                     [N]
        h_t = lambda * h_{t-1} + B u_t,   B = (B_re + i B_im) exp(gamma_log)[:, None]
        y_t = Re(C h_t) + D * u_t,        C = C_re + i C_im

    Args:
        d_model: H, the input and output width.
        d_state: N, the number of complex state channels.
        r_min, r_max: the ring of initial eigenvalue moduli, ``r_min <= |lambda| <= r_max``.
        max_phase: initial phases are drawn uniformly from ``[0, max_phase]``.

    ``forward(u [B, T, H], h0=None)`` returns ``(y [B, T, H], h_T [B, N])``: pass
    ``h_T`` back as ``h0`` to continue the sequence (streaming, or decoding with T=1).
    The state is complex64 (complex128 for float64 modules). With
    ``cu_seqlens`` (packed sequences, see ``seqfuse.linear_scan``), ``u`` is
    ``[1, T, H]`` and ``h0`` and ``h_T`` are ``[S, N]``, one state per sequence.
    """

    def __init__(
        self,
        d_model: int,
        d_state: int,
        r_min: float = 0.0,
        r_max: float = 1.0,
        max_phase: float = 6.28,
        *,
        device=None,
        dtype=None,
    ):
        super().__init__()
        if not 0.0 <= r_min < r_max <= 1.0:
            raise ValueError(f"LRU: need 0 <= r_min < r_max <= 1, got r_min={r_min}, r_max={r_max}")
        if d_model < 1 or d_state < 1:
            raise ValueError(f"LRU: d_model and d_state must be positive, got {d_model}, {d_state}")
        self.d_model, self.d_state = d_model, d_state
        self.r_min, self.r_max, self.max_phase = r_min, r_max, max_phase
        factory = {"device": device, "dtype": dtype}
        N, H = d_state, d_model
        self.nu_log = nn.Parameter(torch.empty(N, **factory))
        self.theta_log = nn.Parameter(torch.empty(N, **factory))
        self.gamma_log = nn.Parameter(torch.empty(N, **factory))
        self.B_re = nn.Parameter(torch.empty(N, H, **factory))
        self.B_im = nn.Parameter(torch.empty(N, H, **factory))
        self.C_re = nn.Parameter(torch.empty(H, N, **factory))
        self.C_im = nn.Parameter(torch.empty(H, N, **factory))
        self.D = nn.Parameter(torch.empty(H, **factory))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        N, H = self.d_state, self.d_model
        u1, u2 = torch.rand_like(self.nu_log), torch.rand_like(self.theta_log)
        r2 = u1 * (self.r_max**2 - self.r_min**2) + self.r_min**2
        self.nu_log.copy_(torch.log(-0.5 * torch.log(r2)))
        self.theta_log.copy_(torch.log(self.max_phase * u2))
        modulus = torch.exp(-torch.exp(self.nu_log))
        self.gamma_log.copy_(torch.log(torch.sqrt(1 - modulus**2)))
        for w, fan in ((self.B_re, 2 * H), (self.B_im, 2 * H), (self.C_re, N), (self.C_im, N)):
            nn.init.normal_(w, std=1 / math.sqrt(fan))
        nn.init.normal_(self.D)

    def eigenvalues(self) -> torch.Tensor:
        """lambda, the complex diagonal of the recurrence, [N]."""
        modulus = torch.exp(-torch.exp(self.nu_log))
        phase = torch.exp(self.theta_log)
        return torch.complex(modulus * torch.cos(phase), modulus * torch.sin(phase))

    def forward(
        self, u: torch.Tensor, h0: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``u``: [B, T, H]; ``h0``: complex [B, N] or None. Returns ``(y, h_T)``.
        With ``cu_seqlens`` [S + 1]: ``u`` [1, T, H], ``h0`` and ``h_T`` [S, N]."""
        if u.dim() != 3 or u.shape[-1] != self.d_model:
            raise ValueError(f"LRU: u must be [B, T, {self.d_model}], got {tuple(u.shape)}")
        x = u.to(self.B_re.dtype)
        gamma = torch.exp(self.gamma_log)[:, None]
        bu = torch.complex(x @ (self.B_re * gamma).T, x @ (self.B_im * gamma).T)
        h = linear_scan(self.eigenvalues(), bu, h0, cu_seqlens=cu_seqlens)
        y = h.real @ self.C_re.T - h.imag @ self.C_im.T + self.D * x
        if cu_seqlens is not None:
            return y.to(u.dtype), self._final_states(h, h0, cu_seqlens)
        if h.shape[1] == 0:  # no steps: the state is h0 as it came (zeros if None)
            return y.to(u.dtype), h0 if h0 is not None else h.new_zeros(h.shape[0], h.shape[2])
        return y.to(u.dtype), h[:, -1]

    @staticmethod
    def _final_states(h, h0, cu_seqlens):
        """Each packed sequence's last state (h0, or zeros, for an empty one), gathered on
        the device: no host synchronisation, as a decoding loop needs."""
        ends = cu_seqlens.long()[1:]
        # A zero row in front: ends - 1 + 1 indexes the padded steps, in range also
        # for empty sequences (masked below) and T = 0.
        padded = torch.cat([h.new_zeros(1, h.shape[2]), h[0]])
        last = padded.index_select(0, ends)
        empty = (ends == cu_seqlens.long()[:-1])[:, None]
        start = h0 if h0 is not None else torch.zeros_like(last)
        return torch.where(empty, start.to(last.dtype), last)

    def step(
        self, u_t: torch.Tensor, h: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One decoding step: ``u_t`` [B, H] -> ``(y_t [B, H], h [B, N])``."""
        y, h = self.forward(u_t[:, None], h)
        return y[:, 0], h

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, d_state={self.d_state}, r_min={self.r_min}, "
                f"r_max={self.r_max}, max_phase={self.max_phase}")
