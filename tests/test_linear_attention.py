"""causal_linear_attention: the kernels against the references, gradients, the
custom-op contract, bad inputs, extremes, decoding with state, and the module."""

import os
import subprocess
import sys
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch

import seqfuse
from seqfuse import reference
from seqfuse.nn import CausalLinearAttention

from conftest import CUDA_DEVICES, DEVICES, assert_close, cpu_kernels, runs_cuda_kernels

FEATURE_MAPS = ["identity", "elu1", "relu"]


def make_inputs(B, T, H, Dk, Dv, *, dtype=torch.float64, device="cpu", feature_map="identity",
                normalize=True, state=False, requires_grad=False):
    """q, k, v and an optional initial state; identity with normalize gets positive q, k
    so the normaliser stays away from zero, and relu gets q, k at least 0.1 from its kink
    (near it, finite differences step across the kink and small normalisers amplify it)."""
    def draw(*s):
        if feature_map == "identity" and normalize:
            return torch.rand(*s, dtype=torch.float64) + 0.2
        x = torch.randn(*s, dtype=torch.float64)
        return x.sign() * (x.abs() + 0.1) if feature_map == "relu" else x
    q, k = draw(B, T, H, Dk), draw(B, T, H, Dk)
    v = torch.randn(B, T, H, Dv, dtype=torch.float64)
    tensors = [q, k, v]
    if state:
        tensors += [torch.randn(B, H, Dk, Dv, dtype=torch.float64),
                    torch.rand(B, H, Dk, dtype=torch.float64) + 0.5]
    return [t.to(device=device, dtype=dtype if t.dim() == 4 else torch.float64)
            .requires_grad_(requires_grad) for t in tensors]


def kwargs_for(feature_map, normalize, decay, H, device):
    gamma = torch.empty(H, dtype=torch.float64).uniform_(0.8, 1.0).to(device) if decay else None
    return dict(feature_map=feature_map, normalize=normalize, decay=gamma)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("feature_map", FEATURE_MAPS)
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("decay", [False, True])
@pytest.mark.parametrize("state", [False, True])
def test_forward_backward_match_reference(device, feature_map, normalize, decay, state):
    B, T, H, Dk, Dv = 2, 150, 3, 16, 12
    inputs = make_inputs(B, T, H, Dk, Dv, device=device, feature_map=feature_map,
                         normalize=normalize, state=state, requires_grad=True)
    kw = kwargs_for(feature_map, normalize, decay, H, device)
    init = tuple(inputs[3:]) if state else None
    grad_o = torch.randn(B, T, H, Dv, dtype=torch.float64, device=device)
    grad_S, grad_z = torch.randn(B, H, Dk, Dv, dtype=torch.float64, device=device), torch.randn(
        B, H, Dk, dtype=torch.float64, device=device)

    results = []
    for fn in (seqfuse.causal_linear_attention, reference.causal_linear_attention):
        o, (S, z) = fn(*inputs[:3], initial_state=init, return_state=True, **kw)
        loss = (o * grad_o).sum() + (S * grad_S).sum() + (z * grad_z).sum()
        grads = torch.autograd.grad(loss, inputs)
        results.append((o, S, z, *grads))
    for got, want in zip(*results):
        assert got.dtype == want.dtype and got.shape == want.shape
        assert_close(got, want, rtol=1e-9, atol=1e-9)


GRADCHECK_CASES = [(f, n, d, s) for f in FEATURE_MAPS for n in (True, False)
                   for d, s in ((False, False), (True, True))]


@pytest.mark.parametrize("feature_map,normalize,decay,state", GRADCHECK_CASES)
def test_gradcheck_cpu_kernel(feature_map, normalize, decay, state):
    # T = 67 crosses a chunk boundary of the CPU forward (64 steps); the backward's
    # chunks are 128 steps, crossed by the T = 131 and T = 150 cases above.
    B, T, H, Dk, Dv = 1, 67, 2, 3, 2
    inputs = make_inputs(B, T, H, Dk, Dv, feature_map=feature_map, normalize=normalize,
                         state=state, requires_grad=True)
    kw = kwargs_for(feature_map, normalize, decay, H, "cpu")

    def fn(q, k, v, *init):
        o, (S, z) = seqfuse.causal_linear_attention(
            q, k, v, initial_state=tuple(init) if init else None, return_state=True, **kw)
        return o, S, z

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-5)


def test_references_agree():
    B, T, H, Dk, Dv = 2, 23, 3, 5, 7
    q, k, v, S0, z0 = make_inputs(B, T, H, Dk, Dv, feature_map="elu1", state=True)
    kw = dict(feature_map="elu1", decay=torch.tensor([0.9, 1.0, 0.5], dtype=torch.float64),
              initial_state=(S0, z0), return_state=True, scale=0.7)
    for normalize in (True, False):
        o1, (S1, z1) = reference.causal_linear_attention_quadratic(q, k, v, normalize=normalize, **kw)
        o2, (S2, z2) = reference.causal_linear_attention(q, k, v, normalize=normalize, **kw)
        for got, want in ((o1, o2), (S1, S2), (z1, z2)):
            assert_close(got, want)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [
    (1, 1, 1, 4, 4),      # T = 1
    (3, 1, 4, 16, 8),     # T = 1 (the decoding step) over several heads, Dk != Dv
    (2, 131, 2, 8, 8),    # prime T, several chunks
    (1, 64, 2, 5, 9),     # exactly one chunk, Dk != Dv
    (1, 65, 2, 9, 5),     # one step past a chunk
    (1, 70, 1, 256, 256), # the largest head dims
    (1, 40, 2, 1, 256),   # Dk = 1
])
def test_odd_sizes(device, shape):
    B, T, H, Dk, Dv = shape
    q, k, v, S0, z0 = make_inputs(B, T, H, Dk, Dv, device=device, feature_map="elu1", state=True,
                                  requires_grad=True)
    out = seqfuse.causal_linear_attention(q, k, v, feature_map="elu1", initial_state=(S0, z0))
    want = reference.causal_linear_attention(q, k, v, feature_map="elu1", initial_state=(S0, z0))
    assert_close(out, want, rtol=1e-9, atol=1e-9)
    g = torch.randn_like(out)
    got_grads = torch.autograd.grad(out, (q, k, v, S0, z0), g)
    want_grads = torch.autograd.grad(want, (q, k, v, S0, z0), g)
    for got, ref in zip(got_grads, want_grads):
        assert_close(got, ref, rtol=1e-9, atol=1e-9)


def test_long_sequence_crosses_cpu_forward_segments():
    # The CPU forward batches its chunk products over segments of a bounded scratch
    # (64 Mi elements; about 7900 steps at Dk = Dv = 256 and one head): T = 8200 takes
    # two, the carried state crossing between them.
    B, T, H, D = 1, 8200, 1, 256
    q, k, v, S0, z0 = make_inputs(B, T, H, D, D, feature_map="elu1", state=True)
    kw = dict(feature_map="elu1", decay=torch.tensor([0.999], dtype=torch.float64),
              initial_state=(S0, z0), return_state=True)
    o, (S, z) = seqfuse.causal_linear_attention(q, k, v, **kw)
    want, (S_ref, z_ref) = reference.causal_linear_attention(q, k, v, **kw)
    assert_close(o, want, rtol=1e-9, atol=1e-9)
    assert_close(S, S_ref, rtol=1e-9, atol=1e-9)
    assert_close(z, z_ref, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("B,T,H", [(0, 5, 2), (2, 0, 2), (2, 5, 0)])
def test_empty(device, B, T, H):
    q, k, v = make_inputs(B, T, H, 4, 3, device=device, requires_grad=True)
    o, (S, z) = seqfuse.causal_linear_attention(q, k, v, return_state=True)
    assert o.shape == (B, T, H, 3) and S.shape == (B, H, 4, 3) and z.shape == (B, H, 4)
    assert (S == 0).all() and (z == 0).all()
    (o.sum() + S.sum()).backward()
    assert q.grad.shape == q.shape and v.grad.shape == v.shape


@pytest.mark.parametrize("device", DEVICES)
def test_empty_sequence_passes_the_state_through(device):
    q, k, v, S0, z0 = make_inputs(2, 0, 3, 4, 5, device=device, state=True, requires_grad=True)
    decay = torch.tensor([0.5, 0.9, 1.0], device=device)
    o, (S, z) = seqfuse.causal_linear_attention(q, k, v, decay=decay, initial_state=(S0, z0),
                                                return_state=True)
    assert o.shape == (2, 0, 3, 5)
    assert_close(S, S0)
    assert_close(z, z0)
    gS, gz = torch.randn_like(S), torch.randn_like(z)
    dS0, dz0 = torch.autograd.grad((S * gS).sum() + (z * gz).sum(), (S0, z0))
    assert_close(dS0, gS)
    assert_close(dz0, gz)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("decay", [False, True])
def test_chunked_decoding_with_state_equals_one_call(device, decay):
    B, T, H, Dk, Dv = 2, 100, 4, 16, 8
    q, k, v = make_inputs(B, T, H, Dk, Dv, device=device, feature_map="elu1")
    kw = kwargs_for("elu1", True, decay, H, device)
    whole, (S_all, z_all) = seqfuse.causal_linear_attention(q, k, v, return_state=True, **kw)
    pieces, state = [], None
    for lo, hi in ((0, 1), (1, 2), (2, 37), (37, 99), (99, 100)):
        o, state = seqfuse.causal_linear_attention(q[:, lo:hi], k[:, lo:hi], v[:, lo:hi],
                                                   initial_state=state, return_state=True, **kw)
        pieces.append(o)
    assert_close(torch.cat(pieces, 1), whole, rtol=1e-10, atol=1e-10)
    assert_close(state[0], S_all, rtol=1e-10, atol=1e-10)
    assert_close(state[1], z_all, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_inputs(device):
    q, k, v = make_inputs(2, 30, 3, 8, 8, device=device, feature_map="relu")
    qt, kt, vt = (x.transpose(0, 1).contiguous().transpose(0, 1).requires_grad_()
                  for x in (q, k, v))
    assert not qt.is_contiguous()
    out = seqfuse.causal_linear_attention(qt, kt, vt, feature_map="relu")
    assert_close(out, reference.causal_linear_attention(q, k, v, feature_map="relu"))
    # A non-contiguous output gradient too.
    g = torch.randn(30, 2, 3, 8, dtype=q.dtype, device=device).transpose(0, 1)
    got = torch.autograd.grad(out, (qt, kt, vt), g)
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]
    want = torch.autograd.grad(reference.causal_linear_attention(*leaves, feature_map="relu"),
                               leaves, g)
    for a, b in zip(got, want):
        assert_close(a, b)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_dtypes(device, dtype):
    q, k, v = make_inputs(2, 77, 2, 32, 32, device=device, feature_map="elu1", dtype=dtype)
    o, (S, z) = seqfuse.causal_linear_attention(q, k, v, feature_map="elu1", return_state=True)
    want, (S_ref, z_ref) = reference.causal_linear_attention(
        q.double(), k.double(), v.double(), feature_map="elu1", return_state=True)
    assert o.dtype == dtype and S.dtype == torch.float32 and z.dtype == torch.float32
    assert_close(o, want, dtype=dtype)
    assert_close(S, S_ref, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("normalize", [True, False])
def test_float32_elu1_backward_matches_reference(device, normalize):
    # float32 takes its own feature-map paths (vector exp in the forward and in phi').
    q, k, v = make_inputs(2, 150, 3, 64, 40, device=device, feature_map="elu1",
                          dtype=torch.float32, requires_grad=True)
    out = seqfuse.causal_linear_attention(q, k, v, feature_map="elu1", normalize=normalize)
    wide = [t.detach().double().requires_grad_() for t in (q, k, v)]
    want = reference.causal_linear_attention(*wide, feature_map="elu1", normalize=normalize)
    up = torch.randn_like(want)
    # Sums of T * D float32 products: the error is relative to their size, not to each
    # (possibly cancelled) result.
    def close(got, ref):
        assert_close(got, ref, dtype=torch.float32, atol=1e-5 * ref.abs().max().item())
    close(out, want)
    for got, ref in zip(torch.autograd.grad(out, (q, k, v), up.float()),
                        torch.autograd.grad(want, wide, up)):
        close(got, ref)


@pytest.mark.parametrize("device", DEVICES)
def test_bfloat16_elu1_near_cancelling_normaliser_stays_finite(device):
    # Strongly negative q and k: elu(x) + 1 = e^x ~ 1e-4, so scale phi(q)^T z starts at
    # the order of eps: numerator and normaliser are both tiny and must not cancel to
    # garbage when the inputs are bfloat16.
    B, T, H, D = 2, 200, 2, 64
    q = (torch.randn(B, T, H, D) - 9).to(device=device, dtype=torch.bfloat16).requires_grad_()
    k = (torch.randn(B, T, H, D) - 9).to(device=device, dtype=torch.bfloat16).requires_grad_()
    v = torch.randn(B, T, H, D).to(device=device, dtype=torch.bfloat16).requires_grad_()
    out = seqfuse.causal_linear_attention(q, k, v, feature_map="elu1")
    want = reference.causal_linear_attention(q.double(), k.double(), v.double(), feature_map="elu1")
    assert torch.isfinite(out).all()
    assert want.abs().max() > 0.05  # the normaliser does not simply swamp the output
    assert_close(out, want, dtype=torch.bfloat16)
    out.float().square().sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


def test_nan_stays_in_its_row():
    q, k, v = make_inputs(3, 20, 2, 4, 4, feature_map="elu1")
    q[1, 5, 0, 0] = float("nan")
    out = seqfuse.causal_linear_attention(q, k, v, feature_map="elu1")
    assert torch.isnan(out[1, 5, 0]).all()
    assert torch.isfinite(out[0]).all() and torch.isfinite(out[2]).all()
    assert torch.isfinite(out[1, :, 1]).all() and torch.isfinite(out[1, 6:, 0]).all()


# Steps at which a non-finite value goes in, for T = 150 (chunks of 64 on the CPU: inside
# the first chunk, its last step, the first steps of the next, inside the short last one)
# and for T = 40 (a single chunk shorter than the chunk length). Batch b of one call takes
# the b-th step, so one call covers them all.
POISON_STEPS = {150: (1, 5, 63, 64, 65, 128, 149), 40: (1, 20, 39)}


def poisoned(x, steps, value, tail):
    """x with `value` in feature 1 of every head of batch b at step steps[b] (and after it
    too if `tail`, as in a padded tail)."""
    x = x.clone()
    for b, t in enumerate(steps):
        x[b, t:, :, 1] = value if tail else x[b, t:, :, 1]
        x[b, t, :, 1] = value
    return x


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("which", ["q", "k", "v"])
@pytest.mark.parametrize("value", ["nan", "inf", "max"])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("decay", [False, True])
@pytest.mark.parametrize("T", sorted(POISON_STEPS))
def test_non_finite_input_leaves_earlier_outputs_unchanged(device, dtype, which, value, normalize,
                                                           decay, T):
    # Causality (docs/README.md): a NaN, an infinity or the dtype's largest value at
    # step t changes no output before t, for every feature map: the chunked products
    # must not multiply a masked-out zero by it.
    bad = {"nan": float("nan"), "inf": float("inf"), "max": torch.finfo(dtype).max}[value]
    steps = POISON_STEPS[T]
    H, D = 2, 8
    kw = kwargs_for("identity", normalize, decay, H, device)
    slot = "qkv".index(which)
    for feature_map in FEATURE_MAPS:
        inputs = make_inputs(len(steps), T, H, D, D, dtype=dtype, device=device,
                             feature_map=feature_map, normalize=normalize)
        kw["feature_map"] = feature_map
        clean = seqfuse.causal_linear_attention(*inputs, **kw)
        assert torch.isfinite(clean).all()
        for tail in (False, True):
            args = list(inputs)
            args[slot] = poisoned(inputs[slot], steps, bad, tail)
            out = seqfuse.causal_linear_attention(*args, **kw)
            for b, t in enumerate(steps):
                where = f"{feature_map}, {which}[{b}, {t}{':' if tail else ''}] = {value}"
                assert torch.equal(out[b, :t], clean[b, :t]), where
                if value != "max" and (which == "v" or feature_map != "relu"):
                    # It did go in (relu sends -inf in q, k to 0, and the kernels send
                    # NaN there to 0 too): step t itself is no longer finite.
                    assert not torch.isfinite(out[b, t]).all(), where


# q = inf is left out: the kernels' chunked form sums phi(q_t) phi(k_s)^T v_s over s,
# inf - inf = NaN where the recurrence's phi(q_t)^T S_t may still be infinite.
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("which,value", [("q", "nan"), ("k", "nan"), ("k", "inf"),
                                         ("v", "nan"), ("v", "inf")])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("decay", [False, True])
def test_non_finite_input_propagates_like_the_recurrence(device, which, value, normalize, decay):
    # From the bad step on, outputs follow the recurrence: NaN and infinities where it
    # puts them, the same finite values elsewhere. Two bad steps share a chunk (the rows
    # between them must not see the second), a third starts a chunk, in other heads.
    B, T, H, D = 2, 150, 3, 8
    kw = kwargs_for("elu1", normalize, decay, H, device)
    kw["feature_map"] = "elu1"
    inputs = make_inputs(B, T, H, D, D, device=device, feature_map="elu1", normalize=normalize)
    slot = "qkv".index(which)
    x = inputs[slot].clone()
    for b, t, h, d in ((0, 20, 0, 1), (0, 27, 0, 3), (1, 64, 2, 0), (0, 100, 1, 5), (1, 100, 1, 5)):
        x[b, t, h, d] = float(value)
    inputs[slot] = x
    out = seqfuse.causal_linear_attention(*inputs, **kw)
    want = reference.causal_linear_attention(*inputs, **kw)
    assert not torch.isfinite(want).all()
    assert_close(out, want, rtol=1e-9, atol=1e-9, equal_nan=True)


@pytest.mark.parametrize("which", ["q", "k", "v"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), torch.finfo(torch.float64).max])
def test_reference_is_causal(which, value):
    # The kernels are held to the reference, so it must keep earlier outputs too (the
    # quadratic masked form does not: 0 * NaN through the mask).
    q, k, v, S0, z0 = make_inputs(1, 12, 2, 4, 4, feature_map="elu1", state=True)
    kw = dict(feature_map="elu1", decay=torch.tensor([0.9, 1.0], dtype=torch.float64),
              initial_state=(S0, z0))
    clean = reference.causal_linear_attention(q, k, v, **kw)
    inputs = dict(q=q, k=k, v=v)
    inputs[which] = inputs[which].clone()
    inputs[which][0, 7, 1, 2] = value
    out = reference.causal_linear_attention(**inputs, **kw)
    assert torch.isfinite(clean).all() and torch.equal(out[:, :7], clean[:, :7])
    assert not torch.equal(out[:, 7:], clean[:, 7:])


def test_opcheck():
    for feature_map, normalize, decay, state in GRADCHECK_CASES[::2]:
        q, k, v, *init = make_inputs(2, 70, 2, 4, 3, feature_map=feature_map, normalize=normalize,
                                     state=state, requires_grad=True)
        kw = kwargs_for(feature_map, normalize, decay, 2, "cpu")
        S0, z0 = init if init else (None, None)
        args = (q, k, v, feature_map, normalize, kw["decay"], 0.5, S0, z0, 1e-6)
        torch.library.opcheck(torch.ops.seqfuse.causal_linear_attention.default, args)
        # The backward op as autograd calls it: on saved tensors that require no grad.
        with torch.no_grad():
            o, S, z, den = torch.ops.seqfuse.causal_linear_attention(*args)
        bargs = (torch.randn_like(o), torch.randn_like(S), torch.randn_like(z), q.detach(),
                 k.detach(), v.detach(), o, den, feature_map, normalize, kw["decay"], 0.5,
                 S0 if S0 is None else S0.detach(), z0 if z0 is None else z0.detach())
        torch.library.opcheck(torch.ops.seqfuse.causal_linear_attention_backward.default, bargs)


def test_gradients_with_create_graph_work_and_double_backward_refuses():
    q, k, v = make_inputs(2, 9, 2, 4, 3, feature_map="elu1", requires_grad=True)
    out = seqfuse.causal_linear_attention(q, k, v, feature_map="elu1")
    want = torch.autograd.grad(out.square().sum(), (q, k, v), retain_graph=True)
    got = torch.autograd.grad(out.square().sum(), (q, k, v), create_graph=True)
    for a, b in zip(got, want):
        assert_close(a, b)
    assert got[0].requires_grad
    with pytest.raises(NotImplementedError, match="double backward"):
        got[0].sum().backward()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bad,match", [
    (dict(q=torch.zeros(2, 5, 2)), "q must be"),
    (dict(k=torch.zeros(2, 5, 2, 3)), "k must have q's shape"),
    (dict(v=torch.zeros(2, 4, 2, 4)), "v must be"),
    (dict(k=torch.zeros(2, 5, 2, 4, dtype=torch.float64)), "k has dtype"),
    (dict(q=torch.zeros(2, 5, 2, 300), k=torch.zeros(2, 5, 2, 300)), "Dk"),
    (dict(v=torch.zeros(2, 5, 2, 257)), "Dv"),
    (dict(feature_map="softmax"), "feature_map"),
    (dict(decay=torch.full((3,), 0.5)), "decay must be \\[H\\]"),
    (dict(decay=torch.tensor([0.5, 1.5])), "decay must lie in"),
    (dict(decay=torch.tensor([0.0, 0.5])), "decay must lie in"),
    (dict(initial_state=(torch.zeros(2, 2, 4, 3), torch.zeros(2, 2, 4))), "initial_state S"),
    (dict(initial_state=(torch.zeros(2, 2, 4, 4), torch.zeros(2, 4))), "initial_state z"),
    (dict(initial_state=torch.zeros(2, 2, 4, 4)), "initial_state"),
    (dict(eps=-1.0), "eps"),
    (dict(q=torch.zeros(2, 5, 2, 4, dtype=torch.int32)), "q must be a floating point"),
    (dict(initial_state=(torch.zeros(2, 2, 4, 4, dtype=torch.int64), torch.zeros(2, 2, 4))),
     "initial_state S must be a floating point"),
])
def test_bad_inputs(device, bad, match):
    if device == "cuda" and match == "decay must lie in":
        pytest.skip("CUDA checks the decay range on the device: test_cuda_bad_decay_gives_nan")
    args = dict(q=torch.zeros(2, 5, 2, 4), k=torch.zeros(2, 5, 2, 4), v=torch.zeros(2, 5, 2, 4))
    args.update(bad)
    args = {k: v.to(device) if torch.is_tensor(v) else v for k, v in args.items()}
    if isinstance(args.get("initial_state"), tuple):
        args["initial_state"] = tuple(s.to(device) for s in args["initial_state"])
    with pytest.raises((RuntimeError, ValueError), match=match):
        seqfuse.causal_linear_attention(args.pop("q"), args.pop("k"), args.pop("v"), **args)


@pytest.mark.cuda
@pytest.mark.parametrize("T", [1, 70])  # the decoding kernel and the chunked one
def test_cuda_bad_decay_gives_nan_in_its_head_only(T):
    q, k, v, S0, z0 = make_inputs(2, T, 3, 16, 8, device="cuda", feature_map="elu1", state=True,
                                  dtype=torch.float32)
    decay = torch.tensor([0.9, 1.5, 0.0], device="cuda")
    o, (S, z) = seqfuse.causal_linear_attention(q, k, v, feature_map="elu1", decay=decay,
                                                initial_state=(S0.float(), z0.float()),
                                                return_state=True)
    assert torch.isnan(o[:, :, 1:]).all() and torch.isnan(S[:, 1:]).all() and torch.isnan(z[:, 1:]).all()
    assert torch.isfinite(o[:, :, 0]).all() and torch.isfinite(S[:, 0]).all()


@pytest.mark.cuda
def test_mixed_devices():
    q = torch.zeros(1, 3, 1, 4, device="cuda")
    with pytest.raises(RuntimeError, match="k is on"):
        seqfuse.causal_linear_attention(q, q.cpu(), q)


@pytest.mark.parametrize("feature_map", ["elu1", "relu", "favor"])
@pytest.mark.parametrize("decay", [None, [0.9, 0.99]])
def test_module_step_equals_forward(feature_map, decay):
    layer = CausalLinearAttention(16, 2, feature_map, decay=decay, dtype=torch.float64)
    x = torch.randn(3, 25, 16, dtype=torch.float64)
    y, (S, z) = layer(x, return_state=True)
    state, steps = None, []
    for t in range(x.shape[1]):
        y_t, state = layer.step(x[:, t], state)
        steps.append(y_t)
    assert_close(torch.stack(steps, 1), y, rtol=1e-10, atol=1e-10)
    assert_close(state[0], S, rtol=1e-10, atol=1e-10)


def test_module_favor_estimates_softmax_attention_and_redraws():
    torch.manual_seed(0)
    layer = CausalLinearAttention(32, 1, "favor", n_features=256, dtype=torch.float64)
    x = 0.5 * torch.randn(1, 12, 32, dtype=torch.float64)
    q = layer.q_proj(x).view(1, 12, 1, 32)
    k = layer.k_proj(x).view(1, 12, 1, 32)
    v = layer.v_proj(x).view(1, 12, 1, 32)
    scores = torch.einsum("bihd,bjhd->bhij", q, k) / 32 ** 0.5
    scores = scores.masked_fill(torch.ones(12, 12, dtype=torch.bool).triu(1), float("-inf"))
    softmax = torch.einsum("bhij,bjhd->bihd", scores.softmax(-1), v).reshape(1, 12, 32)
    assert_close(layer(x), layer.o_proj(softmax), rtol=0.1, atol=0.05)
    before = layer.features.clone()
    layer.redraw_features()
    assert not torch.equal(before, layer.features)
    w = layer.features[:32]  # one orthogonal block: rows are orthogonal
    gram = w @ w.T
    assert_close(gram - torch.diag(torch.diag(gram)), torch.zeros_like(gram), atol=1e-8)


def test_module_compiles_without_graph_breaks():
    layer = CausalLinearAttention(32, 4, "elu1", decay=0.95)
    x = torch.randn(2, 40, 32, requires_grad=True)
    compiled = torch.compile(layer, fullgraph=True)
    y = compiled(x)
    assert_close(y, layer(x))
    y.sum().backward()
    grad = x.grad.clone()
    x.grad = None
    layer(x).sum().backward()
    assert_close(grad, x.grad)


def test_module_rejects_bad_arguments():
    with pytest.raises(ValueError, match="n_heads"):
        CausalLinearAttention(30, 4)
    with pytest.raises(ValueError, match="feature_map"):
        CausalLinearAttention(32, 4, "softmax")
    with pytest.raises(ValueError, match="decay"):
        CausalLinearAttention(32, 4, decay=1.5)
    with pytest.raises(ValueError, match="n_features"):
        CausalLinearAttention(32, 4, "favor", n_features=512)
    with pytest.raises(RuntimeError, match="favor"):
        CausalLinearAttention(32, 4, "elu1").redraw_features()


@pytest.mark.parametrize("device", CUDA_DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("D", [64, 128, 100])
def test_cuda_matches_cpu_kernel(device, dtype, D):
    q, k, v, S0, z0 = make_inputs(2, 300, 3, D, D, feature_map="elu1", state=True, dtype=dtype)
    gamma = torch.tensor([0.9, 0.99, 1.0])
    kw = dict(feature_map="elu1", decay=gamma, initial_state=(S0.float(), z0.float()), return_state=True)
    leaves_cpu = [t.detach().float().requires_grad_() for t in (q, k, v)]
    leaves_gpu = [t.detach().to(device).requires_grad_() for t in (q, k, v)]
    with cpu_kernels():
        cpu = seqfuse.causal_linear_attention(*leaves_cpu, **kw)
    kw_cuda = dict(kw, decay=gamma.to(device),
                   initial_state=(S0.float().to(device), z0.float().to(device)))
    gpu = seqfuse.causal_linear_attention(*leaves_gpu, **kw_cuda)
    assert_close(gpu[0], cpu[0], dtype=dtype)
    assert_close(gpu[1][0], cpu[1][0], rtol=1e-3, atol=1e-3)
    grad_o = torch.randn_like(cpu[0])
    with cpu_kernels():
        cpu[0].backward(grad_o)
    gpu[0].backward(grad_o.to(device=device, dtype=dtype))
    for got, want in zip(leaves_gpu, leaves_cpu):
        assert_close(got.grad, want.grad, dtype=dtype)


@pytest.mark.parametrize("device", CUDA_DEVICES)
@pytest.mark.parametrize("shape", [
    (3, 1, 4, 128, 64),   # T = 1: the decoding kernel forward, the chunked backward
    (2, 131, 2, 8, 8),    # prime T, several chunks
    (1, 33, 2, 9, 100),   # Dk != Dv, neither a multiple of the column tile
    (1, 70, 1, 256, 256), # the largest head dims (the most shared memory)
])
@pytest.mark.parametrize("feature_map,normalize,decay", [
    ("elu1", True, True), ("relu", False, False), ("identity", True, False)])
def test_cuda_float64_matches_cpu_kernel(device, shape, feature_map, normalize, decay):
    # Every output and gradient, the state's included, in float64 so that the two
    # kernels must agree to rounding.
    B, T, H, Dk, Dv = shape
    cpu_in = make_inputs(B, T, H, Dk, Dv, feature_map=feature_map, normalize=normalize,
                         state=True, requires_grad=True)
    gpu_in = [t.detach().to(device).requires_grad_() for t in cpu_in]
    kw = kwargs_for(feature_map, normalize, decay, H, "cpu")
    grads_out = [torch.randn(*size, dtype=torch.float64)
                 for size in ((B, T, H, Dv), (B, H, Dk, Dv), (B, H, Dk))]
    results = []
    for inputs, on, kernels in ((cpu_in, "cpu", cpu_kernels()), (gpu_in, device, nullcontext())):
        with kernels:
            gamma = kw["decay"].to(on) if decay else None
            o, (S, z) = seqfuse.causal_linear_attention(
                *inputs[:3], feature_map=feature_map, normalize=normalize, decay=gamma,
                initial_state=tuple(inputs[3:]), return_state=True)
            loss = sum((x * g.to(on)).sum() for x, g in zip((o, S, z), grads_out))
            grads = torch.autograd.grad(loss, inputs)
        results.append([x.detach().cpu() for x in (o, S, z, *grads)])
    for got, want in zip(results[1], results[0]):
        assert_close(got, want, rtol=1e-9, atol=1e-9)


# The precision the 16-bit CUDA paths stand behind, relative to the largest entry of each
# output or gradient, against float64 on the same rounded inputs: float16 runs the
# intra-chunk products on tensor cores (float16 operands, float accumulation), bfloat16
# runs the float path (README, "Precision of the CUDA kernels").
TENSOR_CORE_TOL = {torch.float16: 1e-2, torch.bfloat16: 1e-2}


@pytest.mark.parametrize("device", CUDA_DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [
    (2, 77, 2, 64, 64),      # T not a multiple of the chunk
    (1, 1000, 2, 128, 128),  # long, the other compiled head dim
    (2, 77, 3, 48, 80),      # Dk != Dv, neither a compiled head dim
    (1, 1000, 2, 5, 64),     # odd Dk: a and b padded from 5 to 16 columns
])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("decay", [False, True])
def test_cuda_16bit_tensor_core_path_matches_float64(device, dtype, shape, normalize, decay):
    B, T, H, Dk, Dv = shape
    q, k, v = make_inputs(B, T, H, Dk, Dv, feature_map="elu1", normalize=normalize, dtype=dtype,
                          device=device, requires_grad=True)
    kw = kwargs_for("elu1", normalize, decay, H, device)
    out = seqfuse.causal_linear_attention(q, k, v, **kw)
    wide = [t.detach().double().requires_grad_() for t in (q, k, v)]
    want = reference.causal_linear_attention(*wide, **kw)
    assert out.dtype == dtype
    tol = TENSOR_CORE_TOL[dtype]
    # Unnormalised outputs and all gradients are sums that grow with T and D: the error
    # is relative to their size, not to each (possibly cancelled) entry.
    out_atol = tol if normalize else tol * want.abs().max().item()
    assert_close(out, want, rtol=tol, atol=out_atol)
    up = torch.randn_like(want)
    for got, ref in zip(torch.autograd.grad(out, (q, k, v), up.to(dtype)),
                        torch.autograd.grad(want, wide, up)):
        assert got.dtype == dtype and torch.isfinite(got).all()
        assert_close(got, ref, rtol=tol, atol=tol * ref.abs().max().item())


@pytest.mark.parametrize("device", CUDA_DEVICES)
def test_cuda_float16_tiny_features_keep_their_precision(device):
    # elu(x) + 1 = e^x ~ 1e-4 for x ~ -9: the products a_r . b_s (~1e-8 Dk) lie below
    # float16's range; the tensor-core path scales every operand row by a power of two
    # before rounding, so they must come out as accurate as the float path.
    B, T, H, D = 2, 200, 2, 64
    q = (torch.randn(B, T, H, D) - 9).to(device=device, dtype=torch.float16).requires_grad_()
    k = (torch.randn(B, T, H, D) - 9).to(device=device, dtype=torch.float16).requires_grad_()
    v = torch.randn(B, T, H, D).to(device=device, dtype=torch.float16).requires_grad_()
    for normalize in (True, False):
        out = seqfuse.causal_linear_attention(q, k, v, feature_map="elu1", normalize=normalize)
        wide = [t.detach().double().requires_grad_() for t in (q, k, v)]
        want = reference.causal_linear_attention(*wide, feature_map="elu1", normalize=normalize)
        tol = TENSOR_CORE_TOL[torch.float16]
        assert torch.isfinite(out).all()
        assert_close(out, want, rtol=tol, atol=tol * want.abs().max().item())
        up = torch.randn_like(want)
        for got, ref in zip(torch.autograd.grad(out, (q, k, v), up.half()),
                            torch.autograd.grad(want, wide, up)):
            assert torch.isfinite(got).all()
            assert_close(got, ref, rtol=tol, atol=tol * ref.abs().max().item())


@pytest.mark.parametrize("device", CUDA_DEVICES)
def test_cuda_float16_zero_rows_do_not_flush_their_tile(device):
    # do = 0 at padded steps gives all-zero rows of G = do / den; they must not set the
    # power-of-two scale of the tile they share with real rows (dv lost 4-7% there).
    B, T, H, D = 1, 512, 1, 64
    q, k, v = make_inputs(B, T, H, D, D, feature_map="elu1", dtype=torch.float16, device=device,
                          requires_grad=True)
    up = 1e-3 * torch.randn(B, T, H, D, dtype=torch.float64, device=device)
    up[:, 500:] = 0
    out = seqfuse.causal_linear_attention(q, k, v, feature_map="elu1")
    wide = [t.detach().double().requires_grad_() for t in (q, k, v)]
    want = reference.causal_linear_attention(*wide, feature_map="elu1")
    (got,) = torch.autograd.grad(out, v, up.half())
    (ref,) = torch.autograd.grad(want, wide[2], up)
    rows = ref[:, 480:500]  # real rows of dv next to the padding (dk, dq: differences)
    err = (got[:, 480:500].double() - rows).abs().amax(-1) / rows.abs().amax(-1)
    assert err.max() < 2e-2, err.max()  # 4-7% when zero rows set the scale, 0.8% now


@pytest.mark.parametrize("device", CUDA_DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("where", ["q", "k", "v"])
@pytest.mark.parametrize("t", [0, 10, 31, 32, 70])
def test_cuda_non_finite_input_changes_no_earlier_output(device, dtype, where, t):
    # Causal on every path: a NaN (or inf) at step t leaves the outputs before t as they
    # were, also inside the float16 tensor-core tile product (0 * NaN).
    B, T, H, D = 1, 77, 2, 64
    q, k, v = make_inputs(B, T, H, D, D, feature_map="elu1", dtype=dtype, device=device)
    clean = seqfuse.causal_linear_attention(q, k, v, feature_map="elu1")
    for bad in (float("nan"), float("inf")):
        x = dict(q=q.clone(), k=k.clone(), v=v.clone())
        x[where][:, t, 0, 3] = bad
        out = seqfuse.causal_linear_attention(x["q"], x["k"], x["v"], feature_map="elu1")
        assert torch.isfinite(out[:, :t]).all()
        assert torch.equal(out[:, :t], clean[:, :t])
        assert not torch.isfinite(out[:, t:, 0]).all()  # the bad value does show


@pytest.mark.parametrize("device", CUDA_DEVICES)
def test_cuda_decode_step_matches_full_sequence(device):
    q, k, v = make_inputs(1, 20, 16, 128, 128, feature_map="elu1", dtype=torch.float32,
                          device=device)
    whole = seqfuse.causal_linear_attention(q, k, v, feature_map="elu1")
    state, outs = None, []
    for t in range(20):
        o, state = seqfuse.causal_linear_attention(q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1],
                                                   feature_map="elu1", initial_state=state,
                                                   return_state=True)
        outs.append(o)
    assert_close(torch.cat(outs, 1), whole)


def test_elu1_feature_map_float32_is_exact_to_two_ulp():
    # The float32 forward computes elu1 with its own vector exp (csrc/cpu/vec_math.cpp).
    # With v = [1, 0] over T = 2 and no decay, the final state S[d] is phi(k[0, d])
    # itself, so every feature value can be read back and compared with float64.
    special = torch.tensor([float("nan"), float("-inf"), -0.0, 0.0, 1e-30, -1e-30, -1e-7,
                            -87.3, -87.34, -88.0, -103.0, -104.0, 88.0, 1e30])
    x = torch.cat([special, torch.linspace(-100.0, 10.0, 256 - len(special))])
    x = x[torch.randperm(len(x))]  # lanes of every position in the vector body
    k = torch.stack([x, torch.zeros_like(x)]).view(1, 2, 1, 256)
    q = torch.randn(1, 2, 1, 256)
    v = torch.tensor([1.0, 0.0]).view(1, 2, 1, 1)
    _, (S, _) = seqfuse.causal_linear_attention(q, k, v, feature_map="elu1", normalize=False,
                                                return_state=True)
    got = S.view(256).double()
    x64 = x.double()
    want = torch.where(x64 > 0, x64 + 1, x64.exp())
    assert torch.equal(got.isnan(), want.isnan())
    ok = ~want.isnan()
    # 2 ulp relative, and results below float32's normal range (e^-87.33) may flush to 0.
    torch.testing.assert_close(got[ok], want[ok], rtol=2 * 2.0**-23, atol=1.2e-38)


# ---- packed sequences (cu_seqlens) and the prefix-LM mask ------------------------------

# Empty sequences, single steps, primes, chunk sizes +- 1 (CUDA chunks are 32 steps in
# float, 16 in double; CPU chunks up to 128), one longer than all others together.
PACKED = {"mixed": [0, 1, 17, 31, 33, 0, 2, 129], "one long": [3, 200, 0, 5],
          "1000 of length 1": [1] * 1000}


def packed_offsets(lengths, device, dtype=torch.int64):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=dtype,
                        device=device)


def one_call_per_sequence(fn, q, k, v, cu, state, **kw):
    """The packed call's meaning: each sequence on its own, outputs joined along time,
    states stacked."""
    bounds = cu.tolist()
    outs, S, z = [], [], []
    for n, (s, e) in enumerate(zip(bounds, bounds[1:])):
        st = None if state is None else (state[0][n:n + 1], state[1][n:n + 1])
        o, (S_n, z_n) = fn(q[:, s:e], k[:, s:e], v[:, s:e], initial_state=st, return_state=True,
                           **kw)
        outs.append(o), S.append(S_n), z.append(z_n)
    return torch.cat(outs, 1), torch.cat(S), torch.cat(z)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("lengths", list(PACKED))
@pytest.mark.parametrize("feature_map,normalize", [("elu1", True), ("identity", False),
                                                   ("relu", True)])
@pytest.mark.parametrize("with_state,decay", [(True, False), (False, True)])
def test_packed_equals_one_call_per_sequence(device, lengths, feature_map, normalize,
                                             with_state, decay):
    lengths = PACKED[lengths]
    N, T, H = len(lengths), sum(lengths), 2
    cu = packed_offsets(lengths, device)
    q, k, v = make_inputs(1, T, H, 5, 3, device=device, feature_map=feature_map,
                          normalize=normalize, requires_grad=True)
    state = None
    if with_state:
        state = (torch.randn(N, H, 5, 3, dtype=torch.float64, device=device, requires_grad=True),
                 (torch.rand(N, H, 5, dtype=torch.float64) + 0.5).to(device).requires_grad_())
    kw = kwargs_for(feature_map, normalize, decay, H, device)
    o, (S, z) = seqfuse.causal_linear_attention(q, k, v, initial_state=state, return_state=True,
                                                cu_seqlens=cu, **kw)
    o_loop, S_loop, z_loop = one_call_per_sequence(seqfuse.causal_linear_attention, q, k, v, cu,
                                                   state, **kw)
    with cpu_kernels():
        o_ref, (S_ref, z_ref) = reference.causal_linear_attention(
            q, k, v, initial_state=state, return_state=True, cu_seqlens=cu, **kw)
    for got, loop, ref in ((o, o_loop, o_ref), (S, S_loop, S_ref), (z, z_loop, z_ref)):
        assert got.shape == ref.shape
        assert_close(got, loop)
        assert_close(got, ref)
    leaves = [q, k, v, *(state or ())]
    w_o, w_S, w_z = torch.randn_like(o), torch.randn_like(S), torch.randn_like(z)
    loss = lambda o, S, z: (o * w_o).sum() + (S * w_S).sum() + (z * w_z).sum()
    for g, w in zip(torch.autograd.grad(loss(o, S, z), leaves),
                    torch.autograd.grad(loss(o_loop, S_loop, z_loop), leaves)):
        assert_close(g, w)


@pytest.mark.parametrize("device", DEVICES)
def test_packed_low_precision_and_int32_offsets(device):
    lengths = [40, 0, 3, 70]
    cu = packed_offsets(lengths, device, torch.int32)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        q, k, v = make_inputs(1, sum(lengths), 2, 16, 8, dtype=dtype, device=device,
                              feature_map="elu1")
        o = seqfuse.causal_linear_attention(q, k, v, feature_map="elu1", cu_seqlens=cu)
        o_loop, _, _ = one_call_per_sequence(seqfuse.causal_linear_attention, q, k, v, cu, None,
                                             feature_map="elu1")
        assert_close(o, o_loop, dtype)


def test_packed_gradcheck_cpu():
    cu = packed_offsets([3, 0, 1, 4], "cpu")
    q, k, v = make_inputs(1, 8, 2, 3, 2, feature_map="elu1", requires_grad=True)
    S0 = torch.randn(4, 2, 3, 2, dtype=torch.float64, requires_grad=True)
    z0 = (torch.rand(4, 2, 3, dtype=torch.float64) + 0.5).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda q, k, v, S0, z0: seqfuse.causal_linear_attention(
            q, k, v, feature_map="elu1", initial_state=(S0, z0), return_state=True,
            cu_seqlens=cu)[1][0], (q, k, v, S0, z0))
    assert torch.autograd.gradcheck(
        lambda q, k, v: seqfuse.causal_linear_attention(q, k, v, feature_map="elu1",
                                                        cu_seqlens=cu), (q, k, v))


def test_packed_opcheck():
    cu = packed_offsets([3, 0, 5], "cpu")
    q, k, v = make_inputs(1, 8, 2, 4, 3, dtype=torch.float32, feature_map="elu1",
                          requires_grad=True)
    S0, z0 = torch.randn(3, 2, 4, 3), torch.rand(3, 2, 4) + 0.5
    torch.library.opcheck(torch.ops.seqfuse.causal_linear_attention.default,
                          (q, k, v, "elu1", True, None, 0.5, S0, z0, 1e-6, cu))


@pytest.mark.parametrize("device", CUDA_DEVICES)
def test_cuda_packed_invalid_offsets_give_nan(device):
    q, k, v = make_inputs(1, 10, 2, 4, 3, dtype=torch.float32, device=device,
                          feature_map="elu1", requires_grad=True)
    for bad in ([0, 6, 4, 10], [1, 10], [0, 3, 9]):
        cu = torch.tensor(bad, device=device)
        o, (S, z) = seqfuse.causal_linear_attention(q, k, v, feature_map="elu1", cu_seqlens=cu,
                                                    return_state=True)
        assert o.isnan().all() and S.isnan().all() and z.isnan().all(), bad
        grads = torch.autograd.grad(o.sum(), (q, k, v))
        assert all(g.isnan().all() for g in grads), bad


@pytest.mark.parametrize("match,cu", [
    ("cu_seqlens must be \\[N \\+ 1\\]", torch.zeros(2, 2, dtype=torch.long)),
    ("cu_seqlens must be an int32 or int64", torch.tensor([0.0, 10.0])),
    ("cu_seqlens must start at 0", torch.tensor([2, 10])),
    ("cu_seqlens must be non-decreasing", torch.tensor([0, 6, 4, 10])),
    ("cu_seqlens must end at the packed length 10", torch.tensor([0, 3, 9])),
])
def test_bad_cu_seqlens(match, cu):
    q, k, v = make_inputs(1, 10, 2, 4, 3, dtype=torch.float32)
    with pytest.raises((RuntimeError, ValueError), match=match):
        seqfuse.causal_linear_attention(q, k, v, cu_seqlens=cu)


@pytest.mark.cuda
def test_cu_seqlens_on_another_device():
    q, k, v = make_inputs(1, 10, 2, 4, 3, dtype=torch.float32, device="cuda")
    with pytest.raises(RuntimeError, match="cu_seqlens is on cpu"):
        seqfuse.causal_linear_attention(q, k, v, cu_seqlens=torch.tensor([0, 4, 10]))


def test_packed_needs_one_row_and_states_per_sequence():
    cu = packed_offsets([4, 6], "cpu")
    q, k, v = make_inputs(2, 10, 2, 4, 3, dtype=torch.float32)
    with pytest.raises(ValueError, match="with cu_seqlens, q must hold the packed sequences"):
        seqfuse.causal_linear_attention(q, k, v, cu_seqlens=cu)
    q, k, v = (x[:1] for x in (q, k, v))
    with pytest.raises(ValueError, match="initial_state S must be \\[N, H, Dk, Dv\\]"):
        seqfuse.causal_linear_attention(q, k, v, cu_seqlens=cu,
                                        initial_state=(torch.zeros(1, 2, 4, 3), torch.zeros(1, 2, 4)))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("feature_map,normalize", [("elu1", True), ("identity", False),
                                                   ("relu", True), ("identity", True)])
@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("packed", [False, True])
def test_prefix_lm_matches_the_unilm_mask(device, feature_map, normalize, with_state, packed):
    # Prefix lengths 0 (causal), T (all bidirectional) and in between; against the
    # recurrence and the quadratic form with the explicit mask M_ij = j < P or j <= i.
    H, Dk, Dv = 2, 5, 3
    if packed:
        lengths, prefixes = [9, 0, 33, 12, 40], [4, 0, 0, 12, 37]
        q, k, v = make_inputs(1, sum(lengths), H, Dk, Dv, device=device, feature_map=feature_map,
                              normalize=normalize, requires_grad=True)
        extra = dict(cu_seqlens=packed_offsets(lengths, device))
    else:
        prefixes = [0, 17, 41]
        q, k, v = make_inputs(3, 41, H, Dk, Dv, device=device, feature_map=feature_map,
                              normalize=normalize, requires_grad=True)
        extra = {}
    P = torch.tensor(prefixes, device=device)
    state = None
    if with_state:
        N = len(prefixes)
        state = (torch.randn(N, H, Dk, Dv, dtype=torch.float64, device=device, requires_grad=True),
                 (torch.rand(N, H, Dk, dtype=torch.float64) + 0.5).to(device).requires_grad_())
    kw = dict(feature_map=feature_map, normalize=normalize, initial_state=state,
              return_state=True, **extra)
    o, (S, z) = seqfuse.causal_linear_attention(q, k, v, prefix_lengths=P, **kw)
    with cpu_kernels():
        o_ref, (S_ref, z_ref) = reference.causal_linear_attention(q, k, v, prefix_lengths=P, **kw)
        o_quad, (S_quad, z_quad) = reference.causal_linear_attention_quadratic(
            q, k, v, prefix_lengths=P, **kw)
    for got, ref, quad in ((o, o_ref, o_quad), (S, S_ref, S_quad), (z, z_ref, z_quad)):
        assert got.shape == ref.shape
        assert_close(got, ref)
        assert_close(ref, quad)
    leaves = [q, k, v, *(state or ())]
    w = torch.randn_like(o)
    got = torch.autograd.grad((o * w).sum() + S.sum() + z.sum(), leaves)
    want = torch.autograd.grad((o_ref * w).sum() + S_ref.sum() + z_ref.sum(), leaves)
    for g, r in zip(got, want):
        assert_close(g, r)


def test_prefix_lm_gradcheck_cpu():
    q, k, v = make_inputs(2, 6, 1, 3, 2, feature_map="elu1", requires_grad=True)
    P = torch.tensor([2, 6])
    assert torch.autograd.gradcheck(
        lambda q, k, v: seqfuse.causal_linear_attention(q, k, v, feature_map="elu1",
                                                        prefix_lengths=P), (q, k, v))


def test_prefix_lm_bad_arguments():
    q, k, v = make_inputs(2, 6, 1, 3, 2, dtype=torch.float32)
    with pytest.raises(ValueError, match="prefix_lengths with decay"):
        seqfuse.causal_linear_attention(q, k, v, prefix_lengths=torch.tensor([1, 2]),
                                        decay=torch.tensor([0.9]))
    with pytest.raises(ValueError, match="prefix_lengths must be \\[B\\] = \\[2\\]"):
        seqfuse.causal_linear_attention(q, k, v, prefix_lengths=torch.tensor([1, 2, 3]))
    with pytest.raises(TypeError, match="prefix_lengths must be an integer tensor"):
        seqfuse.causal_linear_attention(q, k, v, prefix_lengths=torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="prefix_lengths must lie in \\[0, T_n\\]"):
        seqfuse.causal_linear_attention(q, k, v, prefix_lengths=torch.tensor([1, 7]))
    with pytest.raises(ValueError, match="prefix_lengths must lie in \\[0, T_n\\]"):
        seqfuse.causal_linear_attention(q, k, v, prefix_lengths=torch.tensor([-1, 2]))


@pytest.mark.parametrize("feature_map", ["elu1", "favor"])
def test_module_packed_and_prefix(feature_map):
    # The module passes cu_seqlens and prefix_lengths through: packed equals one forward
    # per sequence; a prefix mask equals the functional op on the module's projections.
    torch.manual_seed(0)
    layer = CausalLinearAttention(12, 3, feature_map).double()
    lengths = [5, 0, 9, 2]
    cu = packed_offsets(lengths, "cpu")
    x = torch.randn(1, sum(lengths), 12, dtype=torch.float64)
    y, (S, z) = layer(x, return_state=True, cu_seqlens=cu)
    bounds = cu.tolist()
    parts = [layer(x[:, s:e], return_state=True) for s, e in zip(bounds, bounds[1:])]
    assert_close(y, torch.cat([p[0] for p in parts], 1))
    assert_close(S, torch.cat([p[1][0] for p in parts]))
    P = torch.tensor([3, 0, 9, 1])
    y_prefix = layer(x, cu_seqlens=cu, prefix_lengths=P)
    for n, (s, e) in enumerate(zip(bounds, bounds[1:])):
        want = layer(x[:, s:e], prefix_lengths=P[n:n + 1])
        assert_close(y_prefix[:, s:e], want)
    compiled = torch.compile(layer, fullgraph=True)
    assert_close(compiled(x, cu_seqlens=cu, prefix_lengths=P), y_prefix)


def _match_reference(B, T, H, Dk, Dv, dtype=torch.float64, feature_map="elu1", decay=True):
    """The CPU kernel's forward and gradients (with an initial state, decay and the final
    state's gradient) against the reference, in float64 or at the dtype's tolerance."""
    q, k, v, S0, z0 = make_inputs(B, T, H, Dk, Dv, feature_map=feature_map, state=True,
                                  dtype=dtype, requires_grad=True)
    kw = kwargs_for(feature_map, True, decay, H, "cpu")
    grad_o, grad_S = torch.randn(B, T, H, Dv), torch.randn(B, H, Dk, Dv)
    outs = []
    for fn, cast in ((seqfuse.causal_linear_attention, lambda t: t),
                     (reference.causal_linear_attention, lambda t: t.double())):
        leaves = [cast(t.detach()).requires_grad_() for t in (q, k, v, S0, z0)]
        o, (S, z) = fn(*leaves[:3], initial_state=tuple(leaves[3:]), return_state=True, **kw)
        loss = (o * grad_o.to(o.dtype)).sum() + (S * grad_S.to(S.dtype)).sum() + z.sum()
        outs.append((o, S, z, *torch.autograd.grad(loss, leaves)))
    for got, want in zip(*outs):
        if dtype == torch.float64:
            assert_close(got, want, rtol=1e-9, atol=1e-9)
        else:
            assert_close(got, want, dtype=dtype, atol=1e-5 * want.abs().max().item())


@pytest.mark.parametrize("threads", [1, 2, 3, 4])
@pytest.mark.parametrize("B,H", [(1, 1), (1, 2), (1, 3), (2, 4)])
def test_cpu_kernel_split_over_threads(threads, B, H):
    # The CPU kernel cuts a call by the thread count: groups of heads per work item, or,
    # with fewer heads than threads, segments of the sequence whose carried-in states
    # (and state gradients) are found in a first pass. Every cut gives the reference.
    # (Calls of under a few MFLOP run on one thread: these are above that.)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        _match_reference(B, 1100, H, 24, 40)
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("Dk,Dv", [(5, 9), (13, 20), (24, 40), (72, 3)])
def test_cpu_kernel_float32_odd_head_dims(Dk, Dv):
    # Head dims that leave partial vector blocks in every product (float32 vectors hold 8).
    _match_reference(2, 83, 2, Dk, Dv, dtype=torch.float32)


@pytest.mark.parametrize("isa", ["baseline", "avx2"])
def test_cpu_kernel_narrower_builds_match_reference(isa):
    # The CPU kernel has AVX-512, AVX2+FMA and baseline builds (csrc/cpu/
    # linear_attention_chunks_*.cpp), the widest the processor runs picked at run time;
    # SEQFUSE_CPU_ISA caps the choice in a fresh process, so that each build is tested on
    # a machine that has the widest (the suite itself runs that one).
    code = (
        "import sys, torch; sys.path.insert(0, sys.argv[1]); import test_linear_attention as t; "
        "torch.manual_seed(0); t._match_reference(2, 150, 3, 16, 12); "
        "t._match_reference(1, 301, 1, 5, 9, feature_map='relu'); "
        "t._match_reference(2, 83, 2, 13, 20, dtype=torch.float32); "
        "t._match_reference(2, 83, 2, 72, 3, dtype=torch.float32); "
        "t._match_reference(1, 70, 2, 64, 64, dtype=torch.float32, decay=False)")
    env = dict(os.environ, SEQFUSE_CPU_ISA=isa)
    proc = subprocess.run([sys.executable, "-c", code, str(Path(__file__).parent)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
