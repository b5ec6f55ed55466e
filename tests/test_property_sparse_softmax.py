"""Property tests of the row-wise normalisers on generated inputs (SPEC §3):
sparse_softmax, topk_softmax, sparse_softmax_cross_entropy, taylor_softmax and
entropy_normalize."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import seqfuse
from seqfuse import reference
from conftest import DEVICES, cpu_kernels, runs_cuda_kernels
from property_support import (SPECIALS, assert_equal_outside, assert_matches, check, examples,
                              bad_calls_raise, fill, leaf, magnitudes, ref_leaf, run_child,
                              sizes, special_value)

pytestmark = pytest.mark.property

OPS = ["sparse_softmax", "topk_softmax", "sparse_softmax_cross_entropy", "taylor_softmax",
       "entropy_normalize"]
CPU_DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
CUDA_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# CPU: 16-entry chunks, vectors of 8/16 lanes; CUDA: a warp (32) per row up to 2048
# entries, 2048-entry tiles of the block filter.
TILES = (8, 16, 32, 64)
LONG_ROW = 2048


@st.composite
def row_cases(draw, device, op, specials=True):
    dtype = draw(st.sampled_from(CUDA_DTYPES if runs_cuda_kernels(device) else CPU_DTYPES))
    long_rows = draw(st.integers(0, 9)) == 0
    V = draw(st.integers(LONG_ROW - 1, LONG_ROW + 1) if long_rows else sizes(TILES, high=80))
    R = draw(sizes(high=2 if long_rows else 9))
    inner = 1 if op == "sparse_softmax_cross_entropy" else draw(st.sampled_from([1, 1, 3]))
    k = draw(st.one_of(st.sampled_from([1, 2, max(V - 1, 1), max(V, 1), V + 1, 1023, 1025]),
                       st.integers(1, max(V + 3, 1))))
    order = draw(st.sampled_from([2, 4, 6]))
    case = dict(op=op, dtype=dtype, R=R, V=V, inner=inner, k=k, order=order,
                seed=draw(st.integers(0, 2**31)), layout=draw(st.sampled_from(
                    ["contiguous", "transposed", "strided", "expanded"])),
                kind=draw(st.sampled_from(["normal", "normal", "ties"])),
                scale=draw(magnitudes(dtype)),
                reduction=draw(st.sampled_from(["none", "mean", "sum"])),
                ignore_index=draw(st.sampled_from([-100, -1, 0, 3])),
                iters=draw(st.integers(0, 6)), entropy=draw(st.floats(0.2, 0.9)),
                specials=[])
    if specials and R * V * inner and op != "entropy_normalize":
        n = draw(st.integers(0, 3))
        case["specials"] = [(draw(st.sampled_from(SPECIALS)), draw(st.integers(0, R - 1)),
                             draw(st.integers(0, V - 1)), draw(st.integers(0, inner - 1)))
                            for _ in range(n)]
    return case


def row_inputs(case):
    """x [R, V, inner] in float64 (held exactly by the dtype), normalised along dim 1;
    the CE targets; entropy_normalize's distributions and targets."""
    R, V, inner, dtype = case["R"], case["V"], case["inner"], case["dtype"]
    rows = 1 if case["layout"] == "expanded" and R > 0 else R  # stride-0: rows all equal
    if case["op"] == "entropy_normalize":
        logits = fill((rows, V, inner), torch.float64, case["seed"]) * (1 + 2 * case["entropy"])
        p = torch.softmax(logits, 1)
        p = torch.where(fill((rows, V, inner), torch.float64, case["seed"] + 1) > 1.5, 0.0, p)
        p = (p / p.sum(1, keepdim=True).clamp(min=1e-300)).to(dtype).double()
        return p.expand(R, V, inner).clone(), None
    x = fill((rows, V, inner), dtype, case["seed"], scale=case["scale"],
             kind=case["kind"]).expand(R, V, inner).clone()
    for name, r, v, i in case["specials"]:
        rows = slice(None) if case["layout"] == "expanded" else r  # keep the rows equal
        x[rows, v, i] = special_value(name, dtype)
    g = torch.Generator().manual_seed(case["seed"] + 2)
    target = torch.randint(0, max(V, 1), (R,), generator=g) if V else torch.full((R,), 0)
    ignored = torch.rand(R, generator=g) < 0.2
    target = torch.where(ignored | (V == 0), case["ignore_index"], target)
    return x, target


def as_input(case, x64, device):
    """The op's input tensor in the case's dtype and layout (dim 1 normalised)."""
    x = x64.to(device, case["dtype"])
    if case["layout"] == "expanded" and x.shape[0] > 1:
        x = x[:1].expand_as(x)
    elif case["layout"] == "transposed":
        x = x.transpose(0, 1).contiguous().transpose(0, 1)
    elif case["layout"] == "strided":
        wide = x.new_zeros(x.shape[0], x.shape[1], 2 * x.shape[2])
        wide[..., ::2] = x
        x = wide[..., ::2]
    x = x.detach().requires_grad_()
    return x if case["op"] != "sparse_softmax_cross_entropy" else x[..., 0]


def call(case, fn, x, target):
    """The op (`fn` from seqfuse or seqfuse.reference) on x; its differentiable outputs."""
    op, k = case["op"], case["k"]
    if op == "sparse_softmax":
        return [fn.sparse_softmax(x, k, dim=1)]
    if op == "topk_softmax":
        probs, idx = fn.topk_softmax(x, k, dim=1)
        return [probs, idx]
    if op == "sparse_softmax_cross_entropy":
        return [fn.sparse_softmax_cross_entropy(x, target.to(x.device), k, case["ignore_index"],
                                                case["reduction"])]
    if op == "taylor_softmax":
        return [fn.taylor_softmax(x, case["order"], dim=1)]
    # Newton's method is reliable from near the row's own entropy only (far targets
    # overshoot to one-hot rows, where any two roundings part): H(row) +- 0.35 nats.
    p = x.detach().double()
    H = -torch.where(p > 0, p * torch.log(torch.where(p > 0, p, 1.0)), 0.0).sum(1)
    H = (H + (case["entropy"] - 0.55)).clamp(0, math.log(max(case["V"], 1)))
    return [fn.entropy_normalize(x, H.to(x.device), case["iters"], dim=1)]


def outputs_and_grad(case, fn, x, target, grad_seed):
    outs = call(case, fn, x, target)
    g = fill(outs[0].shape, torch.float64, grad_seed).to(outs[0].device, outs[0].dtype)
    (dx,) = torch.autograd.grad(outs[0], x, g, allow_unused=True)
    return outs, dx


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", OPS)
def test_row_op_matches_reference(device, op):
    """Output and gradient equal the float64 reference, NaN and inf included; topk's
    indices are the reference's (ties to the lower index)."""
    def prop(case):
        x64, target = row_inputs(case)
        dtype = case["dtype"]
        x = as_input(case, x64, device)
        outs, dx = outputs_and_grad(case, seqfuse, x, target, case["seed"] + 3)
        xr = ref_leaf(x64 if op != "sparse_softmax_cross_entropy" else x64[..., 0])
        outs_ref, dx_ref = outputs_and_grad(case, reference, xr, target, case["seed"] + 3)
        assert outs[0].dtype == dtype
        eps = torch.finfo(dtype).eps
        floor = None
        if op == "sparse_softmax_cross_entropy":
            # lse(x) - x_t is exact to a few ulp of the logits' size, not of the loss's:
            # a confident row's loss of 4e-7 carries log(1 + 1e-7)'s rounding.
            finite = x64[torch.isfinite(x64)]
            floor = 4 * eps * max(1.0, finite.abs().max().item() if finite.numel() else 0.0)
        bound = grad_bound = None
        if op == "entropy_normalize":
            bound, grad_bound = newton_spread(case, x64, outs_ref[0], dx_ref)
            if grad_bound is not None:
                # A row float32 cannot carry takes the gradient of whichever one-hot row
                # its rounding lands on (the float64 reference's own is NaN on some: 0 *
                # inf in autograd, past the range of 1 / D^2): not compared.
                dx_ref = torch.where(torch.isinf(grad_bound), dx.detach().cpu().double(), dx_ref)
        assert_matches(outs[0], outs_ref[0], dtype, op, floor=floor, bound=bound)
        if op == "topk_softmax":
            assert torch.equal(outs[1].cpu(), outs_ref[1]), "topk indices"
        if dx_ref is not None:
            if op == "sparse_softmax":
                dx, dx_ref = nan_rows_nan_throughout(outs[0], dx, dx_ref)
            # The gradients of a normaliser sum to 0 over a row: terms of size 1 cancel
            # (a one-entry row's exact 0 came out as 3e-16 in float64).
            assert_matches(dx, dx_ref, dtype, f"grad of {op}", floor=4 * eps, bound=grad_bound)

    check(device, row_cases(device, op), prop)


def newton_spread(case, x64, out_ref, dx_ref):
    """Per-entry bounds for entropy_normalize's output and gradient: each Newton step
    divides by D = H^2 - sum q (log q)^2, which a peaked row takes near 0, so rounding
    is amplified by up to 1/|D| a step (on such rows the float64 reference's own
    gradient is 1e-5 off, relative to the row, from a 60-digit mpmath evaluation). The
    bound is 32 times how far the same reference lands from the float64 one when it runs
    in float32 (the dtype's own arithmetic for the half types), scaled by eps / eps(float32)
    for float64, taken row by row; inf for a row that float32 cannot carry (non-finite
    where float64 is finite), whose output is left to the NaN and inf checks."""
    if x64.numel() == 0:
        return None, None
    dtype = case["dtype"]
    low = torch.float32 if dtype == torch.float64 else dtype
    factor = torch.finfo(dtype).eps / torch.finfo(low).eps
    outs_low, dx_low = outputs_and_grad(case, reference, ref_leaf(x64.to(low)), None,
                                        case["seed"] + 3)

    def spread(low_value, value):
        gap = (low_value.double() - value.detach()).abs().amax(1, keepdim=True)
        # 32: the float64 reference's own error counts too (on a near-uniform row of
        # [0.49, 0.51] kernel and reference were 2e-11 off the mpmath value each, on
        # either side, where float32's spread scaled to float64 was 3e-12).
        return (32 * factor * gap.nan_to_num(nan=math.inf)).expand_as(value)

    return spread(outs_low[0], out_ref), spread(dx_low, dx_ref)


def nan_rows_nan_throughout(p, dx, dx_ref):
    """A row whose top k hold NaN (or only -inf) is NaN throughout (documented: like the
    dense softmax), and so is its gradient from the kernels, which see only p; the
    reference's gradient is NaN on the top k and 0 elsewhere. Those rows are checked to
    be NaN throughout and then compared as NaN."""
    rows = torch.isnan(p.detach()).all(1, keepdim=True).cpu().expand(dx.shape)
    assert torch.isnan(dx.detach().cpu()[rows]).all(), "a NaN row's gradient is NaN throughout"
    return dx, dx_ref.masked_fill(rows, float("nan"))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", OPS)
def test_row_op_special_value_stays_in_its_row(device, op):
    """A NaN, inf, -inf or max in one row changes no other row (forward and gradient)."""
    def prop(case):
        case = dict(case, reduction="none", specials=[])
        x64, target = row_inputs(case)
        R, V = case["R"], case["V"]
        if R * V == 0:
            return
        name, r, v, i = case["poison"]
        r, v, i = r % R, v % V, i % case["inner"]
        clean, dclean = outputs_and_grad(case, seqfuse, as_input(case, x64, device), target, 7)
        x2 = x64.clone()
        x2[r, v, i] = special_value(name, case["dtype"]) if op != "entropy_normalize" else 0.0
        if op == "entropy_normalize":
            x2[r, :, i] = x2[r, :, i] / x2[r, :, i].sum().clamp(min=1e-300)
        case2 = dict(case, layout="contiguous" if case["layout"] == "expanded" else case["layout"])
        out, dout = outputs_and_grad(case2, seqfuse, as_input(case2, x2, device), target, 7)
        keep = torch.ones(R, dtype=torch.bool)
        keep[r] = False
        for c, o in zip(clean, out):
            assert_equal_outside(c, o, keep, f"{op}: x[{r}, {v}, {i}] = {name}")
        if dclean is not None:
            assert_equal_outside(dclean, dout, keep, f"grad of {op}")

    @st.composite
    def cases(draw):
        return dict(draw(row_cases(device, op, specials=False)),
                    poison=(draw(st.sampled_from(SPECIALS)), draw(st.integers(0, 99)),
                            draw(st.integers(0, 9999)), draw(st.integers(0, 2))))

    check(device, cases(), prop)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", OPS)
def test_row_op_batch_equals_rows_and_cpu(device, op):
    """A batch equals its rows one by one; the emulated CUDA kernels equal the CPU's."""
    def prop(case):
        case = dict(case, reduction="none")
        x64, target = row_inputs(case)
        dtype = case["dtype"]
        whole = call(case, seqfuse, as_input(case, x64, device), target)[0]
        one = dict(case, layout="contiguous", R=1)
        for r in range(case["R"]):
            row = call(one, seqfuse, as_input(one, x64[r:r + 1], device),
                       None if target is None else target[r:r + 1])[0]
            assert_matches(row, whole[r:r + 1].double(), dtype, f"{op} row {r}")
        if runs_cuda_kernels(device):
            with cpu_kernels():
                on_cpu = call(case, seqfuse, as_input(case, x64, "cpu"), target)[0]
            assert_matches(whole, on_cpu.double(), dtype, f"{op}: emulated vs cpu")

    check(device, row_cases(device, op), prop)


# ---- bad parameters --------------------------------------------------------------------

def _bad_calls():
    x = torch.randn(4, 10)
    t = torch.tensor([0, 1, 2, 3])
    ce = seqfuse.sparse_softmax_cross_entropy
    return st.one_of(
        st.integers(-5, 0).map(lambda k: ("k <= 0", lambda: seqfuse.sparse_softmax(x, k), ["k"])),
        st.integers(-5, 0).map(lambda k: ("k <= 0", lambda: seqfuse.topk_softmax(x, k), ["k"])),
        st.integers(-5, 0).map(lambda k: ("k <= 0", lambda: ce(x, t, k), ["k"])),
        st.sampled_from([2.0, True, None, "3"]).map(
            lambda k: ("k not int", lambda: seqfuse.sparse_softmax(x, k), ["k"])),
        st.one_of(st.integers(2, 50), st.integers(-50, -3)).map(
            lambda d: ("dim out of range", lambda: seqfuse.sparse_softmax(x, 3, dim=d), ["dim"])),
        st.one_of(st.integers(10, 10**6), st.integers(-10**6, -1).filter(lambda v: v != -100)).map(
            lambda v: ("target out of range",
                       lambda: ce(x, torch.tensor([0, v, 2, 3]), 3), ["target"])),
        st.integers(0, 8).filter(lambda n: n != 4).map(
            lambda n: ("target shape", lambda: ce(x, torch.zeros(n, dtype=torch.long), 3),
                       ["target"])),
        st.sampled_from([torch.int32, torch.float32, torch.int16]).map(
            lambda d: ("target dtype", lambda: ce(x, t.to(d), 3), ["target"])),
        st.text(max_size=5).filter(lambda r: r not in ("mean", "sum", "none")).map(
            lambda r: ("reduction", lambda: ce(x, t, 3, reduction=r), ["reduction"])),
        st.one_of(st.integers(-4, 1), st.integers(1, 20).map(lambda n: 2 * n + 1)).map(
            lambda o: ("order", lambda: seqfuse.taylor_softmax(x, o), ["order"])),
        st.integers(-10, -1).map(
            lambda n: ("iters < 0", lambda: seqfuse.entropy_normalize(x.softmax(-1), 1.0, n),
                       ["iters"])),
        st.integers(2, 9).filter(lambda n: n != 4).map(
            lambda n: ("target_entropy shape",
                       lambda: seqfuse.entropy_normalize(x.softmax(-1), torch.ones(n)),
                       ["target_entropy"])),
        st.sampled_from([torch.int64, torch.int32, torch.bool]).map(
            lambda d: ("integer x", lambda: seqfuse.sparse_softmax(x.to(d), 2), ["x"])),
        st.integers(1, 3).map(
            lambda n: ("logits not [N, V]", lambda: ce(x.reshape(*([1] * n), 4, 10), t, 3),
                       ["logits"])),
    )


def bad_row_calls_raise(device):
    bad_calls_raise(_bad_calls(), device)


@pytest.mark.parametrize("device", ["cpu", "emulated"])
def test_row_ops_bad_parameters_raise_clear_errors(device):
    run_child("test_property_sparse_softmax", "bad_row_calls_raise", device)
