"""Property tests of linear_sparse_softmax_cross_entropy, the SPACES loss straight from
the LM head, on generated inputs (docs/sparse_softmax.md): the float64 unfused pair as
reference, row isolation, chunked = one call, batch = rows, emulated = CPU, bad
parameters."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import seqfuse
from seqfuse import reference
from conftest import DEVICES, cpu_kernels, runs_cuda_kernels
from property_support import (SPECIALS, assert_equal_outside, assert_matches, check, examples,
                              bad_calls_raise, fill, magnitudes, run_child, sizes,
                              special_value)

pytestmark = pytest.mark.property

OP = seqfuse.linear_sparse_softmax_cross_entropy
REF = reference.linear_sparse_softmax_cross_entropy
CPU_DTYPES = [torch.float64, torch.float32]
CUDA_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
CHUNK = 128  # the smallest default chunk of columns


@st.composite
def lm_cases(draw, device, specials=False):
    dtype = draw(st.sampled_from(CUDA_DTYPES if runs_cuda_kernels(device) else CPU_DTYPES))
    V = draw(sizes((CHUNK, 2 * CHUNK), low=1, high=2 * CHUNK + 3))
    k = draw(st.one_of(st.sampled_from([1, min(2, V), max(V - 1, 1), V]), st.integers(1, V)))
    case = dict(
        dtype=dtype, N=draw(sizes(high=9)), D=draw(sizes((16, 32), low=1, high=40)), V=V, k=k,
        chunk_size=draw(st.sampled_from([None, None, 1, 2, 7, 64, CHUNK + 1])),
        bias=draw(st.booleans()), ignore_index=draw(st.sampled_from([-100, -1, 0])),
        reduction=draw(st.sampled_from(["none", "mean", "sum"])),
        seed=draw(st.integers(0, 2**31)), layout=draw(st.sampled_from(
            ["contiguous", "transposed", "leading dims"])),
        # Below float64 the logits must be exact, so that the top k is the reference's
        # and not one rounding away: small integers scaled by a power of 2 (ties too).
        kind="normal" if dtype == torch.float64 else "ties",
        # The logits sum D products of two scaled entries: room for D, and the square root
        # of a magnitude for each factor (a power of 2, which keeps them exact).
        scale=2.0 ** (math.frexp(draw(magnitudes(dtype, headroom=12)))[1] // 2), specials=[])
    if specials and case["N"] * case["D"]:
        case["specials"] = [(draw(st.sampled_from(["hidden", "weight", "bias"])),
                             draw(st.sampled_from(SPECIALS[:3])),
                             draw(st.integers(0, case["N"] - 1)), draw(st.integers(0, V - 1)),
                             draw(st.integers(0, case["D"] - 1)))]
    return case


def lm_inputs(case):
    """float64 hidden [N, D], weight [V, D], bias [V] (or None) and target [N], each
    held exactly by the dtype."""
    N, D, V, dtype, seed = case["N"], case["D"], case["V"], case["dtype"], case["seed"]
    hidden = fill((N, D), dtype, seed, scale=case["scale"], kind=case["kind"])
    weight = fill((V, D), dtype, seed + 1, scale=case["scale"], kind=case["kind"])
    # The bias on the logits' own grid (scale^2 times small integers), so that h w + b is
    # exact too: an unscaled bias of 2 next to logits on a grid of 2^24 (or 2^-24) rounds
    # away in float32 and breaks a tie the float64 reference keeps.
    bias = (fill((V,), dtype, seed + 2, scale=case["scale"] ** 2, kind=case["kind"])
            if case["bias"] else None)
    for where, name, n, v, d in case["specials"]:
        value = special_value(name, dtype)
        if where == "hidden":
            hidden[n, d] = value
        elif where == "weight":
            weight[v, d] = value
        elif bias is not None:
            bias[v] = value
    g = torch.Generator().manual_seed(seed + 3)
    target = torch.randint(0, V, (N,), generator=g)
    target = torch.where(torch.rand(N, generator=g) < 0.2, case["ignore_index"], target)
    return hidden, weight, bias, target


def lay_out(case, hidden, target):
    """hidden as the op takes it: contiguous, transposed in memory, or [2, N/2, D]."""
    if case["layout"] == "transposed":
        return hidden.t().contiguous().t(), target
    if case["layout"] == "leading dims" and hidden.shape[0] % 2 == 0:
        return hidden.view(2, -1, hidden.shape[1]), target.view(2, -1)
    return hidden, target


def run(case, fn, hidden, weight, bias, target, device="cpu", dtype=None, chunk_size=None,
        grads=True):
    """fn's loss (rows flattened for "none") and the gradients of hidden, weight, bias."""
    dtype = dtype or case["dtype"]
    leaves = [None if t is None else t.to(device, dtype).requires_grad_()
              for t in (hidden, weight, bias)]
    h, t = lay_out(case, leaves[0], target.to(device))
    kw = dict(bias=leaves[2], ignore_index=case["ignore_index"], reduction=case["reduction"])
    if fn is OP:
        kw["chunk_size"] = chunk_size if chunk_size is not None else case["chunk_size"]
    loss = fn(h, leaves[1], t, case["k"], **kw)
    loss = loss.reshape(-1) if case["reduction"] == "none" else loss
    if not grads:
        return loss, []
    up = fill(loss.shape, torch.float64, case["seed"] + 4, kind="positive").to(device, loss.dtype)
    used = [x for x in leaves if x is not None]
    return loss, list(torch.autograd.grad(loss, used, up, allow_unused=True))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("specials", [False, True], ids=["finite", "specials"])
def test_lm_head_loss_matches_reference(device, specials):
    """The loss and the gradients of hidden, weight and bias equal the float64 unfused
    pair (logits in full, then the SPACES loss), NaN and inf included."""
    def prop(case):
        hidden, weight, bias, target = lm_inputs(case)
        loss, grads = run(case, OP, hidden, weight, bias, target, device)
        want, grads_ref = run(case, REF, hidden, weight, bias, target, dtype=torch.float64)
        half = case["dtype"] in (torch.float16, torch.bfloat16)
        assert loss.dtype == (torch.float32 if half else case["dtype"])
        # lse(s) - s_t is exact to a few ulp of the logits' size, not of the loss's: a
        # confident row's loss of 1.2e-4 carried 2.8e-8 of float32 rounding (logits ~10).
        logits = hidden @ weight.T + (0 if bias is None else bias)
        finite = logits[torch.isfinite(logits)]
        rows = max(case["N"], 1) if case["reduction"] == "sum" else 1
        floor = (4 * torch.finfo(case["dtype"]).eps * rows
                 * max(1.0, finite.abs().max().item() if finite.numel() else 0.0))
        assert_matches(loss, want, case["dtype"], "loss", floor=floor)
        eps = torch.finfo(case["dtype"]).eps
        terms = gradient_term_sizes(case, hidden, weight, bias, target)
        for name, g, g_ref, t in zip(("hidden", "weight", "bias"), grads, grads_ref, terms):
            g_ref = torch.zeros_like(g_ref) if g is None else g_ref
            assert_matches(g, g_ref, case["dtype"], f"grad of {name}", floor=eps,
                           bound=4 * eps * t)

    check(device, lm_cases(device, specials), prop)


def gradient_term_sizes(case, hidden, weight, bias, target):
    """For each entry of the hidden, weight and bias gradients, the sum of the absolute
    values of the terms it adds up (g_nv W_v, g_nv h_n, g_nv; g = dL/ds from the float64
    reference), each g_nv times max(1, |s_nv - lse_n|): p = exp(s - lse) carries about
    eps |s - lse| of relative error (a float32 dh of 4e-4 summing terms of size 4 from
    logits of 16 was 2e-7 off). Non-finite terms count as 0 (those entries are compared
    by their NaN / inf pattern)."""
    logits = (hidden @ weight.T + (0 if bias is None else bias)).requires_grad_()
    loss = reference.sparse_softmax_cross_entropy(logits, target, case["k"], case["ignore_index"],
                                                  case["reduction"]).reshape(-1)
    up = fill(loss.shape, torch.float64, case["seed"] + 4, kind="positive")
    (g,) = torch.autograd.grad(loss, logits, up) if loss.requires_grad else (torch.zeros_like(logits),)
    size = lambda x: x.abs().nan_to_num(0.0, 0.0, 0.0)  # noqa: E731
    s = logits.detach()
    if s.shape[1]:
        lse = torch.logsumexp(s.topk(min(case["k"], s.shape[1]), 1).values, 1, keepdim=True)
        g = g * size(s - lse).clamp(min=1.0)
    a = size(g)
    return [a @ size(weight), a.T @ size(hidden), a.sum(0)]


@pytest.mark.parametrize("device", DEVICES)
def test_lm_head_special_value_stays_in_its_row(device):
    """A NaN, inf, -inf or max in one row of hidden changes no other row's loss or
    hidden gradient."""
    def prop(case):
        case = dict(case, reduction="none", layout="contiguous")
        hidden, weight, bias, target = lm_inputs(case)
        N, D = hidden.shape
        if N * D == 0:
            return
        name, n, d = case["poison"]
        n, d = n % N, d % D
        clean, (dh, *_) = run(case, OP, hidden, weight, bias, target, device)
        poisoned = hidden.clone()
        poisoned[n, d] = special_value(name, case["dtype"])
        out, (dh2, *_) = run(case, OP, poisoned, weight, bias, target, device)
        keep = torch.ones(N, dtype=torch.bool)
        keep[n] = False
        assert_equal_outside(clean, out, keep, f"hidden[{n}, {d}] = {name}: loss")
        assert_equal_outside(dh, dh2, keep, f"hidden[{n}, {d}] = {name}: grad of hidden")

    @st.composite
    def cases(draw):
        return dict(draw(lm_cases(device)), poison=(draw(st.sampled_from(SPECIALS)),
                                                    draw(st.integers(0, 99)),
                                                    draw(st.integers(0, 99))))

    check(device, cases(), prop)


@pytest.mark.parametrize("device", DEVICES)
def test_lm_head_chunks_rows_and_cpu_agree(device):
    """Any chunk width gives the loss and gradients of one chunk; a batch equals its rows
    one by one; the emulated CUDA kernels equal the CPU ones."""
    def prop(case):
        case = dict(case, layout="contiguous")
        hidden, weight, bias, target = lm_inputs(case)
        dtype = case["dtype"]
        whole, grads = run(case, OP, hidden, weight, bias, target, device)
        one, grads_one = run(case, OP, hidden, weight, bias, target, device,
                             chunk_size=max(case["V"], 1))
        assert_matches(whole, one.double(), dtype, "chunked vs one chunk")
        for g, g1 in zip(grads, grads_one):
            assert_matches(g, g1.double(), dtype, "chunked vs one chunk: gradient",
                           floor=torch.finfo(dtype).eps)
        rows = dict(case, reduction="none")
        per_row, _ = run(rows, OP, hidden, weight, bias, target, device, grads=False)
        for i in range(case["N"]):
            row, _ = run(rows, OP, hidden[i:i + 1], weight, bias, target[i:i + 1], device,
                         grads=False)
            assert_matches(row, per_row[i:i + 1].double(), dtype, f"row {i}")
        if runs_cuda_kernels(device):
            with cpu_kernels():
                wide = torch.float32  # the CPU kernels have no half types
                on_cpu, _ = run(case, OP, hidden, weight, bias, target, dtype=wide, grads=False)
            assert_matches(whole, on_cpu.double(), dtype, "emulated vs cpu")

    check(device, lm_cases(device), prop)


# ---- bad parameters --------------------------------------------------------------------

def _bad_calls():
    h, W, t = torch.randn(4, 6), torch.randn(20, 6), torch.tensor([0, 1, 2, 3])

    def call(**kw):
        args = dict(hidden=h, weight=W, target=t, k=3)
        args.update(kw)
        return lambda: OP(args.pop("hidden"), args.pop("weight"), args.pop("target"),
                          args.pop("k"), **args)

    return st.one_of(
        st.one_of(st.integers(-5, 0), st.integers(21, 10**6)).map(
            lambda k: ("k out of [1, V]", call(k=k), ["k must be"])),
        st.sampled_from([2.0, None, "3", True]).map(lambda k: ("k not int", call(k=k), ["k"])),
        st.integers(1, 12).filter(lambda d: d != 6).map(
            lambda d: ("weight's D", call(weight=torch.randn(20, d)), ["weight"])),
        st.integers(0, 40).filter(lambda v: v != 20).map(
            lambda v: ("bias shape", call(bias=torch.randn(v)), ["bias"])),
        st.integers(0, 9).filter(lambda n: n != 4).map(
            lambda n: ("target shape", call(target=torch.zeros(n, dtype=torch.long)),
                       ["target"])),
        st.one_of(st.integers(20, 10**9), st.integers(-10**9, -1).filter(lambda v: v != -100)).map(
            lambda v: ("target out of range", call(target=torch.tensor([0, v, 1, 2])),
                       ["target"])),
        st.sampled_from([torch.int32, torch.float32, torch.bool]).map(
            lambda d: ("target dtype", call(target=t.to(d)), ["target"])),
        st.integers(-5, 0).map(lambda c: ("chunk_size", call(chunk_size=c), ["chunk_size"])),
        st.text(max_size=5).filter(lambda r: r not in ("mean", "sum", "none")).map(
            lambda r: ("reduction", call(reduction=r), ["reduction"])),
        st.sampled_from([torch.float64, torch.float16]).map(
            lambda d: ("weight dtype", call(weight=W.to(d)), ["weight"])),
        st.just(("scalar hidden", call(hidden=torch.tensor(1.0), target=torch.tensor(0)),
                 ["hidden"])),
    )


def bad_lm_calls_raise(device):
    bad_calls_raise(_bad_calls(), device)


@pytest.mark.parametrize("device", ["cpu", "emulated"])
def test_lm_head_bad_parameters_raise_clear_errors(device):
    run_child("test_property_linear_cross_entropy", "bad_lm_calls_raise", device)
