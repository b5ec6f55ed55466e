"""causal_linear_attention: the public wrapper, its fake kernels and its autograd formula.

    S_i = gamma S_{i-1} + phi(k_i) v_i^T,   z_i = gamma z_{i-1} + phi(k_i)
    o_i = scale phi(q_i)^T S_i / (scale phi(q_i)^T z_i + eps)     (normalize=True)
    o_i = scale phi(q_i)^T S_i                                    (normalize=False)
"""

from __future__ import annotations

import torch

from seqfuse._extension import check_backend

FEATURE_MAPS = ("identity", "elu1", "relu")


def causal_linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    feature_map: str = "identity",
    normalize: bool = True,
    decay: torch.Tensor | None = None,
    scale: float | None = None,
    initial_state: tuple[torch.Tensor, torch.Tensor] | None = None,
    return_state: bool = False,
    eps: float = 1e-6,
    cu_seqlens: torch.Tensor | None = None,
    prefix_lengths: torch.Tensor | None = None,
):
    """Causal linear attention with the feature map and the normaliser inside the kernel.

    Args:
        q, k: ``[B, T, H, Dk]``; v: ``[B, T, H, Dv]``; one floating dtype (float16,
            bfloat16, float32; float64 on CPU). Dk, Dv up to 256.
        feature_map: ``"identity"``, ``"elu1"`` (elu(x) + 1) or ``"relu"``, applied to q
            and k. Maps with parameters (Performer FAVOR+) are applied by the caller
            (see ``seqfuse.nn.CausalLinearAttention``) with ``"identity"`` here.
        normalize: divide by ``scale phi(q_i)^T z_i + eps``.
        decay: per-head factor gamma, ``[H]`` in (0, 1] (None: 1). Not differentiated.
            Out of range is a ValueError on CPU; on CUDA it is not checked on the host
            (that would synchronise every call, every decoding step): the head's
            outputs and state come out NaN instead.
        scale: defaults to ``Dk ** -0.5``.
        initial_state: ``(S [B, H, Dk, Dv], z [B, H, Dk])``, the state before step 0;
            differentiable.
        return_state: also return the final state ``(S_T, z_T)`` (float32; float64 for
            float64 inputs): feed it back as ``initial_state`` to continue the sequence,
            e.g. one token at a time (T = 1) when decoding.
        eps: added to the normaliser.
        cu_seqlens: packed sequences: int32/int64 ``[N + 1]``, 0 first, non-decreasing,
            the packed length ``T`` last. ``q, k, v`` are ``[1, T, H, D]`` and hold N
            sequences back to back (sequence n: steps ``cu_seqlens[n]`` to
            ``cu_seqlens[n+1] - 1``); no state crosses a boundary, empty sequences are
            allowed, and the states (initial and final) are per sequence, ``[N, ...]``.
            The values are read by the kernels, never by the host: on CUDA, offsets
            that break the rules give NaN outputs instead of an error.
        prefix_lengths: a UniLM prefix-LM mask: integers ``P_b`` in ``[0, T_b]``, ``[B]``
            (``[N]`` with cu_seqlens). Positions ``i < P_b`` attend to every ``j < P_b``
            (a bidirectional prefix), positions ``i >= P_b`` to every ``j <= i``;
            ``P_b = 0`` is the causal case. An initial state adds to the prefix's.
            Not with ``decay``. Runs as two packed passes of the kernel (the prefix's
            state, then every output from it): about twice a causal call.

    Returns:
        ``o`` ``[B, T, H, Dv]`` in q's dtype, or ``(o, (S_T, z_T))`` with return_state.
    """
    check_backend("causal_linear_attention", q, k, v, cu_seqlens, prefix_lengths)
    if scale is None:
        scale = q.shape[-1] ** -0.5 if q.dim() > 0 and q.shape[-1] > 0 else 1.0
    if initial_state is None:
        S0 = z0 = None
    else:
        if not isinstance(initial_state, (tuple, list)) or len(initial_state) != 2:
            raise ValueError("causal_linear_attention: initial_state must be a pair "
                             "(S [B, H, Dk, Dv], z [B, H, Dk])")
        S0, z0 = initial_state
    if prefix_lengths is not None:
        o, S, z = _prefix_lm(q, k, v, feature_map, normalize, decay, float(scale), S0, z0,
                             float(eps), cu_seqlens, prefix_lengths)
    else:
        o, S, z, _ = torch.ops.seqfuse.causal_linear_attention(
            q, k, v, feature_map, normalize, decay, float(scale), S0, z0, float(eps), cu_seqlens)
    return (o, (S, z)) if return_state else o


_FEATURES = {"identity": lambda x: x, "elu1": lambda x: torch.nn.functional.elu(x) + 1,
             "relu": torch.relu}


def _prefix_lm(q, k, v, feature_map, normalize, decay, scale, S0, z0, eps, cu_seqlens, lengths):
    """The prefix-LM mask as two packed passes of the causal kernel.

    Cut every sequence n into its prefix (the first P_n steps) and the rest: 2N packed
    sequences over the same steps, no data moved. Pass 1 runs them causally from S0
    (the prefixes) and zeros: the prefixes' final states are S_P = S0 + sum_{j<P}
    phi(k_j) v_j^T (and z_P). Pass 2 runs them again from S_P, with the prefixes' keys
    and values zeroed: a prefix position then sees the state S_P alone, the full
    prefix, and the rest runs causally on from S_P, as the mask says; the final state
    of the rest is the sequence's. phi is applied here (identity in the kernel) so that
    a zeroed key is a zero feature for every map. Both passes carry autograd."""
    op = "causal_linear_attention"
    if decay is not None:
        raise ValueError(f"{op}: prefix_lengths with decay is not defined (the prefix is "
                         "bidirectional: which position's decay would weight it?); pass one")
    if feature_map not in _FEATURES:
        raise ValueError(f'{op}: feature_map must be "identity", "elu1" or "relu", got '
                         f'"{feature_map}"')
    if q.dim() != 4 or v.dim() != 4:
        raise ValueError(f"{op}: q, k must be [B, T, H, Dk] and v [B, T, H, Dv], got shapes "
                         f"{tuple(q.shape)}, {tuple(v.shape)}")
    B, T, H, Dk = q.shape
    packed = cu_seqlens is not None
    if not packed:  # B rows of T steps: B sequences packed in one row (a free view)
        cu_seqlens = torch.arange(B + 1, device=q.device) * T
        q, k, v = (x.reshape(1, B * T, H, x.shape[-1]) for x in (q, k, v))
    elif cu_seqlens.dim() != 1:
        raise ValueError(f"{op}: cu_seqlens must be [N + 1], got shape {tuple(cu_seqlens.shape)}")
    N = cu_seqlens.shape[0] - 1
    if lengths.dim() != 1 or lengths.shape[0] != N:
        raise ValueError(f"{op}: prefix_lengths must be [{'N' if packed else 'B'}] = [{N}] "
                         f"(one prefix length per sequence), got shape {tuple(lengths.shape)}")
    if lengths.dtype.is_floating_point or lengths.dtype.is_complex or lengths.dtype == torch.bool:
        raise TypeError(f"{op}: prefix_lengths must be an integer tensor, got {lengths.dtype}")
    if lengths.device != q.device:
        raise RuntimeError(f"{op}: prefix_lengths is on {lengths.device} but q is on {q.device}")
    starts, ends = cu_seqlens[:-1].long(), cu_seqlens[1:].long()
    cut = starts + lengths.long()
    # Checked where it is free: on the CPU (eagerly). On a GPU, or under torch.compile
    # (data-dependent), a length out of range is clamped into it instead.
    if (q.device.type == "cpu" and not torch.compiler.is_compiling()
            and bool(((cut < starts) | (cut > ends)).any())):
        raise ValueError(f"{op}: prefix_lengths must lie in [0, T_n] for each sequence n")
    cut = torch.minimum(torch.maximum(cut, starts), ends)
    halves = torch.stack([starts, cut], 1).flatten()  # prefix n, then the rest of n
    cu2 = torch.cat([halves, ends[-1:]]) if N > 0 else cu_seqlens.long()
    phi_q, phi_k = _FEATURES[feature_map](q), _FEATURES[feature_map](k)
    acc = _acc_dtype(q.dtype)
    Dv = v.shape[-1]

    def interleave(first, second):  # [N, ...] x2 -> [2N, ...]: prefix n, rest of n
        return torch.stack([first, second], 1).flatten(0, 1)

    zeros_S = q.new_zeros(N, H, Dk, Dv, dtype=acc)
    zeros_z = q.new_zeros(N, H, Dk, dtype=acc)
    S_start = zeros_S if S0 is None else S0.to(acc)
    z_start = zeros_z if z0 is None else z0.to(acc)
    _, S1, z1, _ = torch.ops.seqfuse.causal_linear_attention(
        phi_q, phi_k, v, "identity", normalize, None, scale, interleave(S_start, zeros_S),
        interleave(z_start, zeros_z), eps, cu2)
    S_P, z_P = S1[0::2], z1[0::2]
    steps = torch.arange(q.shape[1], device=q.device)
    seq = torch.searchsorted(ends, steps, right=True).clamp(max=max(N - 1, 0))
    in_prefix = (steps < cut[seq])[None, :, None, None]
    o, S2, z2, _ = torch.ops.seqfuse.causal_linear_attention(
        phi_q, torch.where(in_prefix, 0, phi_k), torch.where(in_prefix, 0, v), "identity",
        normalize, None, scale, interleave(S_P, S_P), interleave(z_P, z_P), eps, cu2)
    return (o if packed else o.reshape(B, T, H, Dv)), S2[1::2], z2[1::2]


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


@torch.library.register_fake("seqfuse::causal_linear_attention")
def _causal_linear_attention_fake(q, k, v, feature_map, normalize, decay, scale, S0, z0, eps,
                                  cu_seqlens=None):
    torch._check(q.dim() == 4, lambda: f"causal_linear_attention: q must be [B, T, H, Dk], got {tuple(q.shape)}")
    torch._check(v.dim() == 4, lambda: f"causal_linear_attention: v must be [B, T, H, Dv], got {tuple(v.shape)}")
    B, T, H, Dk = q.shape
    S = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
    Dv = v.shape[-1]
    acc = _acc_dtype(q.dtype)
    return (q.new_empty((B, T, H, Dv)), q.new_empty((S, H, Dk, Dv), dtype=acc),
            q.new_empty((S, H, Dk), dtype=acc), q.new_empty((B, H, T), dtype=acc))


@torch.library.register_fake("seqfuse::causal_linear_attention_backward")
def _causal_linear_attention_backward_fake(grad_o, grad_S, grad_z, q, k, v, o, den, feature_map,
                                           normalize, decay, scale, S0, z0, cu_seqlens=None):
    B, _, H, Dk = q.shape
    S = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
    Dv = v.shape[-1]
    acc = _acc_dtype(q.dtype)
    return (q.new_empty(q.shape), q.new_empty(k.shape), q.new_empty(v.shape),
            q.new_empty((S, H, Dk, Dv), dtype=acc), q.new_empty((S, H, Dk), dtype=acc))


def _setup_context(ctx, inputs, output):
    q, k, v, feature_map, normalize, decay, scale, S0, z0, _, cu_seqlens = inputs
    o, _, _, den = output
    ctx.save_for_backward(q, k, v, o, den, decay, S0, z0, cu_seqlens)
    ctx.feature_map, ctx.normalize, ctx.scale = feature_map, normalize, scale


def _backward(ctx, grad_o, grad_S, grad_z, _grad_den):
    q, k, v, o, den, decay, S0, z0, cu_seqlens = ctx.saved_tensors
    dq, dk, dv, dS0, dz0 = torch.ops.seqfuse.causal_linear_attention_backward(
        grad_o, grad_S, grad_z, q, k, v, o, den, ctx.feature_map, ctx.normalize, decay,
        ctx.scale, S0, z0, cu_seqlens)
    dS0 = dS0.to(S0.dtype) if S0 is not None else None
    dz0 = dz0.to(z0.dtype) if z0 is not None else None
    return dq, dk, dv, None, None, None, None, dS0, dz0, None, None


torch.library.register_autograd(
    "seqfuse::causal_linear_attention", _backward, setup_context=_setup_context)


def _no_double_backward(ctx, *grads):
    raise NotImplementedError(
        "causal_linear_attention: double backward (differentiating its gradients, e.g. "
        "torch.autograd.grad(..., create_graph=True) then backward again) is not supported")


# The backward op gets an autograd formula too, one that refuses: without it, gradients
# taken with create_graph=True would be differentiated as if they were constants.
torch.library.register_autograd("seqfuse::causal_linear_attention_backward", _no_double_backward)
