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

    Returns:
        ``o`` ``[B, T, H, Dv]`` in q's dtype, or ``(o, (S_T, z_T))`` with return_state.
    """
    check_backend("causal_linear_attention", q, k, v)
    if scale is None:
        scale = q.shape[-1] ** -0.5 if q.dim() > 0 and q.shape[-1] > 0 else 1.0
    if initial_state is None:
        S0 = z0 = None
    else:
        if not isinstance(initial_state, (tuple, list)) or len(initial_state) != 2:
            raise ValueError("causal_linear_attention: initial_state must be a pair "
                             "(S [B, H, Dk, Dv], z [B, H, Dk])")
        S0, z0 = initial_state
    o, S, z, _ = torch.ops.seqfuse.causal_linear_attention(
        q, k, v, feature_map, normalize, decay, float(scale), S0, z0, float(eps))
    return (o, (S, z)) if return_state else o


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


@torch.library.register_fake("seqfuse::causal_linear_attention")
def _causal_linear_attention_fake(q, k, v, feature_map, normalize, decay, scale, S0, z0, eps):
    torch._check(q.dim() == 4, lambda: f"causal_linear_attention: q must be [B, T, H, Dk], got {tuple(q.shape)}")
    torch._check(v.dim() == 4, lambda: f"causal_linear_attention: v must be [B, T, H, Dv], got {tuple(v.shape)}")
    B, T, H, Dk = q.shape
    Dv = v.shape[-1]
    acc = _acc_dtype(q.dtype)
    return (q.new_empty((B, T, H, Dv)), q.new_empty((B, H, Dk, Dv), dtype=acc),
            q.new_empty((B, H, Dk), dtype=acc), q.new_empty((B, H, T), dtype=acc))


@torch.library.register_fake("seqfuse::causal_linear_attention_backward")
def _causal_linear_attention_backward_fake(grad_o, grad_S, grad_z, q, k, v, o, den, feature_map,
                                           normalize, decay, scale, S0, z0):
    B, _, H, Dk = q.shape
    Dv = v.shape[-1]
    acc = _acc_dtype(q.dtype)
    return (q.new_empty(q.shape), q.new_empty(k.shape), q.new_empty(v.shape),
            q.new_empty((B, H, Dk, Dv), dtype=acc), q.new_empty((B, H, Dk), dtype=acc))


def _setup_context(ctx, inputs, output):
    q, k, v, feature_map, normalize, decay, scale, S0, z0, _ = inputs
    o, _, _, den = output
    ctx.save_for_backward(q, k, v, o, den, decay, S0, z0)
    ctx.feature_map, ctx.normalize, ctx.scale = feature_map, normalize, scale


def _backward(ctx, grad_o, grad_S, grad_z, _grad_den):
    q, k, v, o, den, decay, S0, z0 = ctx.saved_tensors
    dq, dk, dv, dS0, dz0 = torch.ops.seqfuse.causal_linear_attention_backward(
        grad_o, grad_S, grad_z, q, k, v, o, den, ctx.feature_map, ctx.normalize, decay,
        ctx.scale, S0, z0)
    dS0 = dS0.to(S0.dtype) if S0 is not None else None
    dz0 = dz0.to(z0.dtype) if z0 is not None else None
    return dq, dk, dv, None, None, None, None, dS0, dz0, None


torch.library.register_autograd(
    "seqfuse::causal_linear_attention", _backward, setup_context=_setup_context)


def _no_double_backward(ctx, *grads):
    raise NotImplementedError(
        "causal_linear_attention: double backward (differentiating its gradients, e.g. "
        "torch.autograd.grad(..., create_graph=True) then backward again) is not supported")


# The backward op gets an autograd formula too, one that refuses: without it, gradients
# taken with create_graph=True would be differentiated as if they were constants.
torch.library.register_autograd("seqfuse::causal_linear_attention_backward", _no_double_backward)
