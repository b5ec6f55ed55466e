"""Property tests of linear_scan and the LRU on generated inputs (SPEC §1)."""

import math

import pytest
import torch
from hypothesis import strategies as st

import seqfuse
from seqfuse import reference
from conftest import DEVICES, cpu_kernels, runs_cuda_kernels
from property_support import (HALF, LAYOUTS, SPECIALS, assert_equal_outside, assert_matches,
                              check, fill, leaf, magnitudes, ref_leaf, run_child, sizes,
                              special_value, expect_clear_error)

pytestmark = pytest.mark.property

CPU_DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.complex128,
              torch.complex64]
CUDA_DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.complex64]
CHUNK = 64  # time steps per block of the CUDA scan (kWarps * kSteps); 32 lanes of channels
A_KINDS = {
    "full": lambda B, T, C: (B, T, C),
    "[C]": lambda B, T, C: (C,),
    "[1,1,C]": lambda B, T, C: (1, 1, C),
    "[B,1,C]": lambda B, T, C: (B, 1, C),
    "[1,T,1]": lambda B, T, C: (1, T, 1),
    "[1]": lambda B, T, C: (1,),
    "expanded [C]": lambda B, T, C: (C,),  # a [C] given as a stride-0 [B, T, C] view
}


def wide(x):
    return x.to(torch.complex128 if x.is_complex() else torch.float64)


def h0_dtype(dtype):
    return torch.float32 if dtype in HALF else dtype


@st.composite
def scan_cases(draw, device, specials=False):
    dtypes = CUDA_DTYPES if runs_cuda_kernels(device) else CPU_DTYPES
    dtype = draw(st.sampled_from(dtypes))
    # Magnitudes leave 2^24 of headroom: h is at most ~20 |b|, and da of a broadcast a sums
    # up to B * T of its terms.
    B = draw(sizes(high=4))
    T = draw(sizes((CHUNK, 2 * CHUNK), high=140))
    C = draw(sizes((32,), high=40))
    case = dict(
        dtype=dtype, B=B, T=T, C=C, a_kind=draw(st.sampled_from(list(A_KINDS))),
        reverse=draw(st.booleans()), h0=draw(st.booleans()), seed=draw(st.integers(0, 2**31)),
        scale=draw(magnitudes(dtype, headroom=24)), layout=draw(LAYOUTS),
        special=None,
    )
    if specials and B * T * C > 0:
        # Not the dtype's max here: da of a broadcast a sums terms near it, and whether
        # that sum overflows (and to which sign) depends on its order.
        which = draw(st.sampled_from(["a", "b"]))
        case["special"] = (which, draw(st.sampled_from(SPECIALS[:3])),
                           draw(st.integers(0, B - 1)), draw(st.integers(0, T - 1)),
                           draw(st.integers(0, C - 1)))
    return case


def scan_inputs(case):
    """float64 a (inside the unit disc, random sign or phase), b, h0 and grad_h."""
    B, T, C, dtype = case["B"], case["T"], case["C"], case["dtype"]
    a_shape = A_KINDS[case["a_kind"]](B, T, C)
    seed = case["seed"]
    modulus = fill(a_shape, torch.float64, seed, kind="positive") * 0.5 + 0.35  # [0.45, 0.95]
    if dtype.is_complex:
        phase = fill(a_shape, torch.float64, seed + 1) * 3
        a = torch.polar(modulus, phase).to(dtype).to(torch.complex128)
    else:
        a = (modulus * fill(a_shape, torch.float64, seed + 1).sign()).to(dtype).double()
    b = fill((B, T, C), dtype, seed + 2, scale=case["scale"])
    h0 = fill((B, C), h0_dtype(dtype), seed + 3, scale=case["scale"]) if case["h0"] else None
    grad = fill((B, T, C), dtype, seed + 4)
    if case["special"]:
        which, name, bi, t, c = case["special"]
        x = a if which == "a" else b
        at = (bi, t, c)[3 - x.dim():]  # broadcast dims of a: their only index
        x[tuple(i if n > 1 else 0 for i, n in zip(at, x.shape))] = special_value(
            name, torch.float64 if dtype.is_complex else dtype)
    return a, b, h0, grad


def run_kernel(case, a, b, h0, device, grad=None):
    dtype = case["dtype"]
    a_in = leaf(a, dtype, "contiguous", device)
    if case["a_kind"] == "expanded [C]":
        a_in = a.to(device, dtype).detach().requires_grad_()
        a_use = a_in.expand(case["B"], case["T"], case["C"])
    else:
        a_in = leaf(a, dtype, case["layout"] if a.dim() == 3 else "contiguous", device)
        a_use = a_in
    b_in = leaf(b, dtype, case["layout"], device)
    h0_in = leaf(h0, h0_dtype(dtype), "transposed", device) if h0 is not None else None
    h = seqfuse.linear_scan(a_use, b_in, h0_in, reverse=case["reverse"])
    if grad is None:
        return h, ()
    leaves = [x for x in (a_in, b_in, h0_in) if x is not None]
    return h, torch.autograd.grad(h, leaves, grad.to(device, dtype))


def run_reference(case, a, b, h0, grad):
    leaves = [ref_leaf(x) for x in (a, b, h0) if x is not None]
    h = reference.linear_scan(leaves[0], leaves[1], leaves[2] if h0 is not None else None,
                              reverse=case["reverse"])
    grads = torch.autograd.grad(h, leaves, grad.to(h.dtype), allow_unused=True)  # T = 0
    return h, [torch.zeros_like(x) if g is None else g for g, x in zip(grads, leaves)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("specials", [False, True], ids=["finite", "specials"])
def test_scan_matches_reference(device, specials):
    """h and the gradients of a, b, h0 equal the float64 scan, NaN and inf included."""
    def prop(case):
        a, b, h0, grad = scan_inputs(case)
        h, grads = run_kernel(case, a, b, h0, device, grad)
        h_ref, grads_ref = run_reference(case, a, b, h0, grad)
        assert h.dtype == case["dtype"]
        assert_matches(h, h_ref, case["dtype"], "h")
        bounds = gradient_bounds(case, a, b, h0, grad)
        for name, g, g_ref, bound in zip(("da", "db", "dh0"), grads, grads_ref, bounds):
            assert_matches(g, g_ref, case["dtype"], name, bound=bound)

    check(device, scan_cases(device, specials), prop)


def gradient_bounds(case, a, b, h0, grad):
    """Per entry of da, db, dh0: a few ulp (of the case's dtype) of the sum of the absolute
    values of the terms the exact gradient adds up: the same scan on |a|, |b|, |h0|
    differentiated along |grad|. da of a broadcast a sums dh_t h_(t-1) over every
    position it stands for, terms of either sign that may cancel to far below their size
    (a float16 da of one value, over 120 positions: 2.7% off, each term within an ulp)."""
    leaves = [x.abs().detach().requires_grad_() for x in (a, b, h0) if x is not None]
    h = reference.linear_scan(leaves[0], leaves[1], leaves[2] if h0 is not None else None,
                              reverse=case["reverse"])
    if not h.requires_grad:  # T = 0
        return [None] * 3
    sizes_ = torch.autograd.grad(h, leaves, grad.abs(), allow_unused=True)
    eps = torch.finfo(case["dtype"].to_real()).eps
    # An entry whose terms hold a NaN or an inf is left to the NaN / inf pattern check.
    return [None if x is None else torch.nan_to_num(16 * eps * x, nan=math.inf, posinf=math.inf)
            for x in sizes_]


@pytest.mark.parametrize("device", DEVICES)
def test_scan_special_value_stays_in_its_channel_and_future(device):
    """A NaN, inf or max in b at (batch, t, channel) changes no other (batch, channel),
    and no step before t (after t when reverse)."""
    def prop(case):
        case = dict(case, special=None, a_kind=case["a_kind"])
        a, b, h0, _ = scan_inputs(case)
        B, T, C = b.shape
        if B * T * C == 0:
            return
        name, bi, t, c = case["poison"]
        clean, _ = run_kernel(case, a, b, h0, device)
        b2 = b.clone()
        b2[bi, t, c] = special_value(name, case["dtype"] if not case["dtype"].is_complex
                                     else torch.float64)
        out, _ = run_kernel(case, a, b2, h0, device)
        keep = torch.ones(B, T, C, dtype=torch.bool)
        span = slice(None, t + 1) if case["reverse"] else slice(t, None)
        keep[bi, span, c] = False
        assert_equal_outside(clean, out, keep, f"b[{bi}, {t}, {c}] = {name}")

    @st.composite
    def cases(draw):
        case = draw(scan_cases(device))
        B, T, C = case["B"], case["T"], case["C"]
        case["poison"] = (draw(st.sampled_from(SPECIALS)), draw(st.integers(0, max(B - 1, 0))),
                          draw(st.integers(0, max(T - 1, 0))), draw(st.integers(0, max(C - 1, 0))))
        return case

    check(device, cases(), prop)


@pytest.mark.parametrize("device", DEVICES)
def test_scan_chunks_rows_and_cpu_agree(device):
    """Streaming in chunks (the final state as the next h0) equals one call; a batch
    equals its rows scanned one by one; the emulated CUDA kernels equal the CPU ones."""
    def prop(case):
        a, b, h0, _ = scan_inputs(case)
        B, T, C = b.shape
        dtype = case["dtype"]
        whole, _ = run_kernel(case, a, b, h0, device)
        cut = case["cut"] % (T + 1)
        a_full = a.expand(B, T, C)
        pieces = [(0, cut), (cut, T)]
        state, parts = h0, {}
        for lo, hi in reversed(pieces) if case["reverse"] else pieces:
            piece = dict(case, a_kind="full", T=hi - lo)
            h, _ = run_kernel(piece, a_full[:, lo:hi].contiguous(), b[:, lo:hi], state, device)
            parts[lo, hi] = h
            if hi > lo:
                state = wide((h[:, 0] if case["reverse"] else h[:, -1]).detach().to(h0_dtype(dtype)))
        streamed = torch.cat([parts[p] for p in pieces], 1)
        assert_matches(streamed, wide(whole), dtype, "chunked")
        for i in range(B):
            row = dict(case, B=1, a_kind="full")
            h_i, _ = run_kernel(row, a_full[i:i + 1].contiguous(), b[i:i + 1],
                                None if h0 is None else h0[i:i + 1], device)
            assert_matches(h_i, wide(whole[i:i + 1]), dtype, f"row {i}")
        if runs_cuda_kernels(device):
            with cpu_kernels():
                on_cpu, _ = run_kernel(case, a, b, h0, "cpu")
            assert_matches(whole, wide(on_cpu), dtype, "emulated vs cpu")

    @st.composite
    def cases(draw):
        return dict(draw(scan_cases(device)), cut=draw(st.integers(0, 200)))

    check(device, cases(), prop)


# ---- LRU ------------------------------------------------------------------------------

@st.composite
def lru_cases(draw, device):
    real = torch.float32 if runs_cuda_kernels(device) else draw(
        st.sampled_from([torch.float64, torch.float32]))
    return dict(real=real, B=draw(sizes(high=3, low=1)), T=draw(sizes((CHUNK,), high=80)),
                H=draw(sizes(high=9, low=1)), N=draw(sizes((32,), high=40, low=1)),
                r_min=draw(st.floats(0.0, 0.9)), seed=draw(st.integers(0, 2**31)),
                t=draw(st.integers(0, 200)), value=draw(st.sampled_from(SPECIALS)))


def lru_module(case, device):
    torch.manual_seed(case["seed"])
    m = seqfuse.nn.LRU(case["H"], case["N"], r_min=case["r_min"], r_max=0.99)
    return m.to(case["real"]).to(device)


@pytest.mark.parametrize("device", DEVICES)
def test_lru_matches_reference_streams_and_is_causal(device):
    """y and h_T equal the step-by-step reference; two streamed calls equal one; a
    special value in u at step t changes no output before t."""
    def prop(case):
        m = lru_module(case, device)
        B, T, H, real = case["B"], case["T"], case["H"], case["real"]
        u = fill((B, T, H), real, case["seed"], device=device).to(real)
        y, hT = m(u)
        wide = [p.detach().double() for p in
                (m.nu_log, m.theta_log, m.gamma_log, m.B_re, m.B_im, m.C_re, m.C_im, m.D)]
        y_ref, h_ref = reference.lru(u.double(), *wide)
        assert_matches(y, y_ref, real, "y")
        if T:
            assert_matches(hT, h_ref, torch.complex64 if real == torch.float32 else torch.complex128, "h_T")
        cut = case["t"] % (T + 1)
        y1, h1 = m(u[:, :cut]) if cut else (u[:, :0], None)
        y2, _ = m(u[:, cut:], h1)
        assert_matches(torch.cat([y1, y2], 1), y.double(), real, "streamed")
        if T:
            t = case["t"] % T
            u2 = u.clone()
            u2[:, t, 0] = special_value(case["value"], real)
            y_bad, _ = m(u2)
            assert torch.equal(y_bad[:, :t], y[:, :t]), f"u[:, {t}] changed earlier outputs"

    check(device, lru_cases(device), prop)


# ---- bad parameters --------------------------------------------------------------------

BAD_SCAN = {
    "b not 3-dim": (lambda B, T, C: ((C,), (B * T, C), None), ["b must be"]),
    "a does not broadcast": (lambda B, T, C: ((C + 1,), (B, T, C), None), ["a must broadcast"]),
    "a has 4 dims": (lambda B, T, C: ((1, B, T, C), (B, T, C), None), ["a must broadcast"]),
    "h0 wrong channels": (lambda B, T, C: ((C,), (B, T, C), (B, C + 1)), ["h0 must be"]),
    "h0 wrong batch": (lambda B, T, C: ((C,), (B, T, C), (B + 1, C)), ["h0 must be"]),
    "h0 3-dim": (lambda B, T, C: ((C,), (B, T, C), (B, 1, C)), ["h0 must be"]),
}


@st.composite
def bad_scan_calls(draw):
    kind = draw(st.sampled_from(sorted(BAD_SCAN) + ["a dtype", "h0 dtype", "integer b"]))
    B, T, C = draw(sizes(low=1, high=5)), draw(sizes(high=70)), draw(sizes(low=1, high=40))
    return kind, B, T, C, draw(st.sampled_from([torch.float32, torch.float64, torch.float16]))


def bad_scan_raises(device):
    from hypothesis import given, settings

    from property_support import examples

    @settings(max_examples=examples(device))
    @given(bad_scan_calls())
    def run(call):
        kind, B, T, C, dtype = call
        if kind in BAD_SCAN:
            shapes, names = BAD_SCAN[kind]
            a_s, b_s, h_s = shapes(B, T, C)
            args = (torch.rand(a_s, dtype=dtype), torch.rand(b_s, dtype=dtype),
                    None if h_s is None else torch.rand(h_s, dtype=h0_dtype(dtype)))
        elif kind == "a dtype":
            other = torch.float64 if dtype != torch.float64 else torch.float32
            args, names = (torch.rand(C, dtype=other), torch.rand(B, T, C, dtype=dtype), None), ["a has dtype"]
        elif kind == "h0 dtype":
            args = (torch.rand(C, dtype=dtype), torch.rand(B, T, C, dtype=dtype),
                    torch.rand(B, C, dtype=torch.complex64))
            names = ["h0 has dtype"]
        else:
            args = (torch.ones(C, dtype=torch.int64), torch.ones(B, T, C, dtype=torch.int64), None)
            names = ["b must be a floating point"]
        expect_clear_error(lambda: seqfuse.linear_scan(*args), names, f"{kind} {B, T, C} {dtype}")

    run()


@pytest.mark.parametrize("device", ["cpu", "emulated"])
def test_scan_bad_parameters_raise_clear_errors(device):
    run_child("test_property_scan", "bad_scan_raises", device)
