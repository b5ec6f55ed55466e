"""Plain-PyTorch references for the row-wise normalisers: readable first, fast never.

Each is what a user writes today without seqfuse (topk + scatter + softmax; the SPACES
loss as logsumexp of the top k minus the target logit), so the benchmarks time them
as the baseline.
"""

from __future__ import annotations

import math

import torch


def _acc(x: torch.Tensor) -> torch.Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _stable_topk(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """torch.topk on the last dim with ties broken towards the lower index."""
    order = torch.sort(x, dim=-1, descending=True, stable=True).indices[..., :k]
    return torch.gather(x, -1, order), order


def sparse_softmax(x: torch.Tensor, k: int, dim: int = -1) -> torch.Tensor:
    """topk + scatter into -inf + softmax (see ``seqfuse.sparse_softmax``)."""
    rows = _acc(x.movedim(dim, -1))
    k = min(k, rows.shape[-1])
    values, indices = _stable_topk(rows, k)
    masked = torch.full_like(rows, -math.inf).scatter(-1, indices, values)
    return torch.softmax(masked, dim=-1).to(x.dtype).movedim(-1, dim)


def topk_softmax(x: torch.Tensor, k: int, dim: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
    """topk + softmax over the kept values (see ``seqfuse.topk_softmax``)."""
    rows = _acc(x.movedim(dim, -1))
    values, indices = _stable_topk(rows, min(k, rows.shape[-1]))
    probs = torch.softmax(values, dim=-1).to(x.dtype)
    return probs.movedim(-1, dim), indices.movedim(-1, dim)


def sparse_softmax_cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    k: int,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> torch.Tensor:
    """``logsumexp(topk(s)) - s_target`` (see ``seqfuse.sparse_softmax_cross_entropy``).

    Ignored rows are left out before anything is computed: masking their loss afterwards
    would send 0 * NaN = NaN into the gradient of a row holding a NaN or an infinity."""
    s = _acc(logits)
    keep = target != ignore_index
    rows = s[keep]
    values, _ = _stable_topk(rows, min(k, s.shape[-1]))
    # The log-sum-exp as m + log sum exp(v - m), m the row's (constant) maximum, added to
    # the target's term last: m + log(...) rounded first would lose the log to the
    # rounding of m for large logits, and exp(v - lse) in the gradient with it.
    m = values.detach().amax(-1, keepdim=True) if values.shape[-1] else \
        values.new_zeros(values.shape[0], 1)  # V = 0 (values[..., :1] was [R, 0])
    m = torch.where(torch.isfinite(m), m, 0.0)
    picked = rows.gather(-1, target[keep][:, None])
    kept = ((m - picked) + torch.logsumexp(values - m, dim=-1, keepdim=True))[:, 0]
    loss = s.new_zeros(keep.shape).masked_scatter(keep, kept)
    if reduction == "sum":
        loss = loss.sum()
    elif reduction == "mean":
        loss = loss.sum() / keep.sum()
    return loss.to(logits.dtype)


def taylor_softmax(x: torch.Tensor, order: int = 2, dim: int = -1) -> torch.Tensor:
    """``f_n(x_i) / sum_j f_n(x_j)``, ``f_n(x) = sum_{m<=n} x^m / m!``.

    Each row is divided by ``c^n``, ``c = max(1, max |x_j|)`` over its finite entries (p
    does not change), so that ``f_n`` of a large finite x, which passes the float range
    long before x does, stays finite: ``f_n(x) / c^n = sum_m (x/c)^m c^(m-n) / m!``. An
    infinite or NaN x keeps its plain ``f_n``: inf for +inf, NaN for -inf (inf - inf
    between its terms) and NaN, so the row is NaN there and 0 at its finite entries.
    """
    xs = _acc(x)
    finite = xs.detach().isfinite()
    if xs.numel():
        c = torch.where(finite, xs.detach().abs(), 0).amax(dim, keepdim=True).clamp(min=1)
    else:
        c = xs.new_ones(())
    u = torch.where(finite, xs / c, xs)
    scale = torch.where(finite, c, 1.0)
    f = sum(u**m * scale ** (m - order) / float(math.factorial(m)) for m in range(order + 1))
    return (f / f.sum(dim, keepdim=True)).to(x.dtype)


def entropy_normalize(
    p: torch.Tensor, target_entropy: float | torch.Tensor, iters: int = 4, dim: int = -1
) -> torch.Tensor:
    """Newton's method on gamma for ``p^gamma / sum p^gamma``, unrolled ``iters`` times:

        H = -sum p log p,  D = H^2 - sum p (log p)^2,  gamma = 1 + (H* - H) / D

    (gamma = 1 where D = 0: a uniform row cannot move). Zeros stay zero. The iterates
    are carried as logs, ``log q <- log_softmax(gamma (log q - c))``, with c the log q
    at which ``gamma log q`` is largest, so no logit overflows to +inf (a one-hot row
    takes gammas past 1e150 and logs past -1e150). Entries whose q is 0 in the dtype
    add nothing to H and D (the limit of ``q log q``), where ``0 * inf`` would be NaN;
    one whose log falls below the dtype's range stays at 0.
    """
    q = _acc(p.movedim(dim, -1))
    target = torch.as_tensor(target_entropy, dtype=q.dtype, device=q.device)
    support = q != 0
    any_support = support.any(-1, keepdim=True)
    big = torch.finfo(q.dtype).max
    log_q = torch.log(torch.where(support, q, 1.0))
    for _ in range(iters if q.shape[-1] else 0):  # (an empty row has nothing to move)
        q = torch.where(support, torch.exp(log_q), 0.0)
        live = q != 0
        l = torch.where(live, log_q, 0.0)
        H = -(q * l).sum(-1)
        D = H**2 - (q * l**2).sum(-1)
        moves = D != 0
        with torch.no_grad():  # (T - H) / D past the dtype's range: a D near 0
            wild = moves & torch.isinf((target - H) / torch.where(moves, D, 1.0))
        # There gamma is held at +-max (a constant: the step's output is one-hot, its
        # gradient 0, where autograd through an infinite gamma would take 0 * inf).
        u = torch.where(wild, ((target - H) / torch.where(moves, D, 1.0)).detach().clamp(-big, big),
                        (target - H) / torch.where(moves & ~wild, D, 1.0))
        gamma = (1 + torch.where(moves, u, 0.0))[..., None]
        alive = support & (log_q > -math.inf)
        top = torch.where(alive, log_q, -math.inf).amax(-1, keepdim=True)
        bottom = torch.where(alive, log_q, math.inf).amin(-1, keepdim=True)
        c = torch.where(gamma >= 0, top, bottom).detach()  # log_softmax ignores a shift
        # A row with no support takes logits 0 (left out below): -inf throughout would
        # send NaN into the gradient.
        logits = torch.where(alive, gamma * (torch.where(alive, log_q, c) - c),
                             torch.where(any_support, -math.inf, 0.0))
        log_q = torch.log_softmax(logits, dim=-1)
    out = torch.where(support, torch.exp(log_q), 0.0) if iters else q
    return out.to(p.dtype).movedim(-1, dim)


def linear_sparse_softmax_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    k: int,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> torch.Tensor:
    """The LM head's logits in full, then the SPACES loss on them (see
    ``seqfuse.linear_sparse_softmax_cross_entropy``); the loss in float32 for half inputs.

    The full logits only rank: the kept ones and the target's are then taken again as
    products of their own weight rows, so that the gradient reaches exactly those rows
    (at most k + 1 per token), as the maths has it. Through the full product it would
    also reach every other row as 0 times the hidden state, which is NaN for a NaN
    state. Ignored rows are left out before anything is computed, for the same reason.
    """
    h = hidden.reshape(-1, hidden.shape[-1])
    t = target.reshape(-1)
    keep = t != ignore_index
    h, t = h[keep], t[keep]
    with torch.no_grad():
        ranked = _acc(torch.nn.functional.linear(h, weight, bias))
        _, top = _stable_topk(ranked, min(k, weight.shape[0]))
    def logits_at(rows, cols):
        out = (h[rows, None, :] * weight[cols]).sum(-1)
        return _acc(out if bias is None else out + bias[cols])

    values = logits_at(slice(None), top)                   # Omega
    # The target's logit is its kept entry where it is kept, so that its gradient meets
    # the softmax's in one coefficient, p - 1, as in the maths (taken apart, p h + (-1) h
    # is NaN for an infinite h, where p = 0); else a product of its own.
    kept_at = top == t[:, None]
    is_kept = kept_at.any(-1)
    own = logits_at(~is_kept, t[~is_kept, None])[:, 0]
    target_logit = values.gather(-1, kept_at.int().argmax(-1, keepdim=True))[:, 0]
    target_logit = target_logit.masked_scatter(~is_kept, own)[:, None]
    m = values.detach().amax(-1, keepdim=True) if values.shape[-1] else target_logit.detach()
    m = torch.where(torch.isfinite(m), m, 0.0)
    kept = ((m - target_logit) + torch.logsumexp(values - m, dim=-1, keepdim=True))[:, 0]
    loss = kept.new_zeros(keep.shape).masked_scatter(keep, kept)
    if reduction == "sum":
        return loss.sum()
    if reduction == "mean":
        return loss.sum() / keep.sum()
    return loss.view(target.shape)
