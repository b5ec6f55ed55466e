"""linear_scan: h_t = a_t * h_{t-1} + b_t (docs/scan.md), against the sequential
reference."""

import math

import pytest
import torch

import seqfuse
from seqfuse import reference
from conftest import CUDA_DEVICES, DEVICES, assert_close, runs_cuda_kernels

# How `a` is given, as a function of (B, T, C): full, and each broadcast form.
A_SHAPES = {
    "full": lambda B, T, C: (B, T, C),
    "per-channel [C]": lambda B, T, C: (C,),
    "[1,1,C]": lambda B, T, C: (1, 1, C),
    "per-batch [B,1,C]": lambda B, T, C: (B, 1, C),
    "per-time [1,T,1]": lambda B, T, C: (1, T, 1),
    "scalar [1]": lambda B, T, C: (1,),
}


def make(shape, a_shape, dtype, device, h0=True):
    """a inside the unit disc (stable), b and h0 standard normal, all leaves."""
    a = torch.rand(a_shape, dtype=torch.float64) * 0.5 + 0.45
    if dtype.is_complex:
        a = torch.polar(a, torch.rand_like(a) * 6.28)
    a = a.to(dtype=dtype, device=device).requires_grad_()
    b = torch.randn(shape, dtype=dtype, device=device, requires_grad=True)
    h = torch.randn(shape[0], shape[2], dtype=dtype, device=device, requires_grad=True) if h0 else None
    return a, b, h


def scan_and_grads(fn, a, b, h0, reverse, grad):
    h = fn(a, b, h0, reverse=reverse)
    leaves = [x for x in (a, b, h0) if x is not None]
    return (h, *torch.autograd.grad(h, leaves, grad))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128])
@pytest.mark.parametrize("a_kind", list(A_SHAPES))
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("T", [1, 2, 97, 130])
def test_matches_reference_fwd_bwd(device, dtype, a_kind, reverse, T):
    if runs_cuda_kernels(device) and dtype == torch.complex128:
        dtype = torch.complex64
    B, C = 3, 37
    a, b, h0 = make((B, T, C), A_SHAPES[a_kind](B, T, C), dtype, device)
    grad = torch.randn(B, T, C, dtype=dtype, device=device)
    got = scan_and_grads(seqfuse.linear_scan, a, b, h0, reverse, grad)
    want = scan_and_grads(reference.linear_scan, a, b, h0, reverse, grad)
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == w.dtype
        assert_close(g, w, dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_without_h0_gradients_match(device):
    a, b, _ = make((2, 65, 5), (2, 65, 5), torch.float64, device, h0=False)
    grad = torch.randn(2, 65, 5, dtype=torch.float64, device=device)
    got = scan_and_grads(seqfuse.linear_scan, a, b, None, False, grad)
    want = scan_and_grads(reference.linear_scan, a, b, None, False, grad)
    for g, w in zip(got, want):
        assert_close(g, w)


@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128])
@pytest.mark.parametrize("a_kind", ["full", "per-channel [C]", "per-time [1,T,1]"])
@pytest.mark.parametrize("reverse", [False, True])
def test_gradcheck_cpu(dtype, a_kind, reverse):
    B, T, C = 2, 7, 3
    a, b, h0 = make((B, T, C), A_SHAPES[a_kind](B, T, C), dtype, "cpu")
    assert torch.autograd.gradcheck(
        lambda a, b, h0: seqfuse.linear_scan(a, b, h0, reverse=reverse), (a, b, h0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.complex64])
@pytest.mark.parametrize("with_h0", [True, False])
def test_opcheck(dtype, with_h0):
    a, b, h0 = make((2, 9, 4), (4,), dtype, "cpu", h0=with_h0)
    torch.library.opcheck(torch.ops.seqfuse.linear_scan.default, (a, b, h0, False))
    torch.library.opcheck(torch.ops.seqfuse.linear_scan.default, (a.detach(), b.detach(), None, True))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reverse", [False, True])
def test_chunked_streaming_equals_one_scan(device, reverse):
    """Scanning in chunks, passing the final state on as h0, is one scan; so are the
    gradients that flow back through the carried states."""
    a, b, h0 = make((2, 300, 6), (2, 300, 6), torch.float64, device)
    whole = seqfuse.linear_scan(a, b, h0, reverse=reverse)
    bounds = [0, 1, 64, 65, 200, 300]
    pieces = list(zip(bounds[:-1], bounds[1:]))
    state, parts = h0, {}
    for lo, hi in reversed(pieces) if reverse else pieces:
        h = seqfuse.linear_scan(a[:, lo:hi], b[:, lo:hi], state, reverse=reverse)
        parts[lo] = h
        state = h[:, 0] if reverse else h[:, -1]
    chunked = torch.cat([parts[lo] for lo, _ in pieces], dim=1)
    assert_close(chunked, whole)
    grad = torch.randn_like(whole)
    for gw, gc in zip(torch.autograd.grad(whole, (a, b, h0), grad),
                      torch.autograd.grad(chunked, (a, b, h0), grad)):
        assert_close(gc, gw)


def test_long_sequence_100k():
    """T = 100k in float64: with a = 1 the scan is a running sum."""
    b = torch.randn(2, 100_000, 3, dtype=torch.float64, requires_grad=True)
    a = torch.ones(3, dtype=torch.float64, requires_grad=True)
    h = seqfuse.linear_scan(a, b)
    assert_close(h, torch.cumsum(b, dim=1))
    grad = torch.randn_like(h)
    ga, gb = torch.autograd.grad(h, (a, b), grad)
    assert_close(gb, torch.flip(torch.cumsum(torch.flip(grad, [1]), 1), [1]))
    h_prev = torch.cat([torch.zeros_like(h[:, :1]), h[:, :-1]], dim=1)
    assert_close(ga, (gb * h_prev).sum((0, 1)), rtol=1e-10, atol=1e-8)


@pytest.mark.parametrize("device", DEVICES)
def test_long_sequence_matches_reference(device):
    a, b, h0 = make((1, 20_011, 4), (1, 20_011, 4), torch.float64, device)
    assert_close(seqfuse.linear_scan(a, b, h0), reference.linear_scan(a, b, h0))


@pytest.mark.parametrize("device", DEVICES)
def test_many_channels(device):
    """B * C beyond 65535 (one grid dimension's limit)."""
    a, b, h0 = make((2, 5, 40_000), (40_000,), torch.float64, device)
    assert_close(seqfuse.linear_scan(a, b, h0), reference.linear_scan(a, b, h0))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_low_precision_within_tolerance(device, dtype):
    """Accumulation is float32, so only the inputs' and outputs' rounding shows."""
    a, b, h0 = make((3, 257, 33), (3, 257, 33), torch.float64, device)
    a_lp, b_lp = a.detach().to(dtype).requires_grad_(), b.detach().to(dtype).requires_grad_()
    h0_32 = h0.detach().float().requires_grad_()
    h = seqfuse.linear_scan(a_lp, b_lp, h0_32)
    assert h.dtype == dtype
    want = reference.linear_scan(a_lp.double(), b_lp.double(), h0_32.double())
    assert_close(h, want, dtype)
    grad = torch.randn_like(h)
    ga, gb, gh0 = torch.autograd.grad(h, (a_lp, b_lp, h0_32), grad)
    assert (ga.dtype, gb.dtype, gh0.dtype) == (dtype, dtype, torch.float32)
    wa, wb, wh0 = torch.autograd.grad(want, (a_lp, b_lp, h0_32), grad.double())
    scale = dict(atol=TOL_LP[dtype] * wa.abs().max().item(), rtol=TOL_LP[dtype])
    assert_close(ga, wa, dtype, **scale)
    assert_close(gb, wb, dtype)
    assert_close(gh0, wh0, dtype)


TOL_LP = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 4e-2}


@pytest.mark.parametrize("device", DEVICES)
def test_half_overflow_matches_reference(device):
    """A running sum past float16's range overflows to inf exactly where the reference does."""
    b = torch.full((1, 100, 2), 1000.0, dtype=torch.float16, device=device)
    a = torch.ones(2, dtype=torch.float16, device=device)
    h = seqfuse.linear_scan(a, b)
    want = reference.linear_scan(a, b)
    assert torch.isinf(h).any() and torch.isfinite(h[:, :60]).all()
    torch.testing.assert_close(h, want)


@pytest.mark.parametrize("device", DEVICES)
def test_nan_stays_in_its_channel(device):
    a, b, _ = make((2, 50, 4), (2, 50, 4), torch.float64, device, h0=False)
    b = b.detach().clone()
    b[1, 10, 2] = float("nan")
    h = seqfuse.linear_scan(a.detach(), b)
    assert torch.isnan(h[1, 10:, 2]).all()
    mask = torch.ones_like(h, dtype=torch.bool)
    mask[1, 10:, 2] = False
    assert torch.isfinite(h[mask]).all()
    assert_close(h[mask], reference.linear_scan(a.detach(), b)[mask])


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_inputs(device):
    base = torch.randn(3, 6, 40, dtype=torch.float64, device=device)
    b = base.transpose(1, 2)[:, ::2]  # [3, 20, 6], strided both ways
    a = (torch.rand(3, 6, 40, dtype=torch.float64, device=device) * 0.9).transpose(1, 2)[:, ::2]
    a_c = torch.rand(12, dtype=torch.float64, device=device)[::2]  # stride-2 [C]
    h0 = torch.randn(6, 3, dtype=torch.float64, device=device).t()
    assert not (b.is_contiguous() or a.is_contiguous() or a_c.is_contiguous() or h0.is_contiguous())
    assert_close(seqfuse.linear_scan(a, b, h0), reference.linear_scan(a, b, h0))
    assert_close(seqfuse.linear_scan(a_c, b, h0), reference.linear_scan(a_c, b, h0))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(0, 5, 3), (2, 0, 3), (2, 5, 0)])
def test_empty(device, shape):
    a, b, h0 = make(shape, shape, torch.float64, device)
    h = seqfuse.linear_scan(a, b, h0)
    assert h.shape == shape
    ga, gb, gh0 = torch.autograd.grad(h.sum(), (a, b, h0), allow_unused=True)
    assert gb.shape == shape and ga.shape == shape
    assert torch.equal(gh0, torch.zeros_like(h0)) if shape[1] == 0 else gh0.shape == h0.shape


BAD_INPUTS = [
    ("b must be", lambda: (torch.rand(4), torch.rand(4, 5), None)),
    ("a must broadcast", lambda: (torch.rand(3), torch.rand(2, 4, 5), None)),
    ("a must broadcast", lambda: (torch.rand(1, 2, 4, 5), torch.rand(2, 4, 5), None)),
    ("a has dtype", lambda: (torch.rand(5, dtype=torch.float64), torch.rand(2, 4, 5), None)),
    ("h0 must be", lambda: (torch.rand(5), torch.rand(2, 4, 5), torch.rand(2, 4))),
    ("h0 must be", lambda: (torch.rand(5), torch.rand(2, 4, 5), torch.rand(5))),
    ("h0 has dtype", lambda: (torch.rand(5), torch.rand(2, 4, 5),
                              torch.rand(2, 5, dtype=torch.complex64))),
    ("b must be a floating point", lambda: (torch.ones(5, dtype=torch.int64),
                                            torch.ones(2, 4, 5, dtype=torch.int64), None)),
]


@pytest.mark.parametrize("match,inputs", BAD_INPUTS)
def test_bad_inputs_raise_clear_errors(match, inputs):
    a, b, h0 = inputs()
    with pytest.raises((RuntimeError, ValueError), match=match):
        seqfuse.linear_scan(a, b, h0)


@pytest.mark.cuda
def test_device_mismatch_names_the_argument():
    with pytest.raises(RuntimeError, match="a is on"):
        seqfuse.linear_scan(torch.rand(5), torch.rand(2, 4, 5, device="cuda"))


@pytest.mark.cuda
def test_cuda_uses_current_stream_and_matches_cpu():
    a, b, h0 = make((4, 1000, 70), (70,), torch.float32, "cpu")
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        h = seqfuse.linear_scan(a.cuda(), b.cuda(), h0.cuda())
    stream.synchronize()
    assert_close(h, seqfuse.linear_scan(a, b, h0))


@pytest.mark.parametrize("device", CUDA_DEVICES)
@pytest.mark.parametrize("T", [4096, 65536 + 17])
def test_cuda_many_chunks_float32(device, T):
    """Long T: thousands of chunks chained by the look-back."""
    a, b, h0 = make((2, T, 96), (2, T, 96), torch.float32, device)
    assert_close(seqfuse.linear_scan(a, b, h0), reference.linear_scan(a.double(), b.double(), h0.double()),
                 torch.float32, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("h0", [False, True])
def test_reference_of_an_empty_sequence(h0):
    a, b, h = make((2, 0, 3), (3,), torch.float64, "cpu", h0=h0)
    out = reference.linear_scan(a, b, h)
    assert out.shape == (2, 0, 3) and out.dtype == torch.float64


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(2, 5, 3), (2, 0, 3), (0, 4, 2), (2, 3, 0)])
def test_a_expanded_along_time_gets_its_gradient(device, shape):
    # a.expand_as(b) is a [B, T, C] view with stride 0 in time: the kernels may read it
    # as time-invariant, but its gradient is one entry per step (autograd sums them).
    a = torch.rand(shape[2], dtype=torch.float64, device=device, requires_grad=True)
    b = torch.randn(shape, dtype=torch.float64, device=device, requires_grad=True)
    grad = torch.randn(shape, dtype=torch.float64, device=device)
    results = []
    for fn in (seqfuse.linear_scan, reference.linear_scan):
        h = fn(a.expand(shape), b)
        grads = torch.autograd.grad(h, (a, b), grad, allow_unused=True)  # T = 0: a unused
        results.append([h, *(torch.zeros_like(x) if g is None else g for g, x in zip(grads, (a, b)))])
    for got, want in zip(*results):
        assert_close(got, want)


@pytest.mark.parametrize("device", DEVICES)
def test_complex_infinity_keeps_its_zero_imaginary_part(device):
    # (inf + 0j) + a * 0 is inf + 0j in complex arithmetic; torch's complex add (x + 1 * y,
    # a complex product with alpha) made it inf + nanj in the reference.
    a = torch.tensor([0.5 + 0.25j, -0.5j], dtype=torch.complex64).to(device)
    b = torch.zeros(1, 3, 2, dtype=torch.complex64, device=device)
    b[0, 1, 0] = complex(math.inf, 0.0)
    want = torch.tensor([[[0, 0], [complex(math.inf, 0), 0], [complex(math.inf, math.inf), 0]]],
                        dtype=torch.complex128)
    for h in (seqfuse.linear_scan(a, b), reference.linear_scan(a.cpu().cdouble(), b.cpu().cdouble())):
        assert torch.equal(torch.isnan(torch.view_as_real(h.cpu())), torch.isnan(torch.view_as_real(want)))
        assert torch.equal(h.cpu().cdouble(), want)


def test_reference_complex_gradient_through_an_infinite_a():
    # db_0 = g_0 + conj(a_1) g_1 = inf + inf j for a_1 = inf + 0j (the kernels' textbook
    # product); autograd's complex sum of the real and imaginary parts' gradients gave NaN.
    a = torch.tensor([[[0.5 + 0.3j], [complex(math.inf, 0)]]], dtype=torch.complex128,
                     requires_grad=True)
    b = torch.tensor([[[1 + 1j], [2 + 0.5j]]], dtype=torch.complex128, requires_grad=True)
    g = torch.tensor([[[0.3 - 0.2j], [0.7 + 0.1j]]], dtype=torch.complex128)
    for fn in (seqfuse.linear_scan, reference.linear_scan):
        (db,) = torch.autograd.grad(fn(a, b), [b], g)
        assert db[0, 0, 0] == complex(math.inf, math.inf), fn


@pytest.mark.parametrize("device", CUDA_DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.complex64])
@pytest.mark.parametrize("reverse", [False, True])
def test_cuda_infinite_a_follows_the_recurrence(device, dtype, reverse):
    # h_t = inf * h_{t-1} + b_t = +-inf, and then a_t h_{t-1} + b_t stays +-inf: never
    # NaN. The CUDA scan's compositions started from the identity map {1, 0} and so
    # formed inf * 0 = NaN (inf - inf after it); they start from a step now. Channel c
    # takes its infinite a at step STEPS[c] (scan order): the first step, inside a
    # thread's 8, at a warp's and a chunk's (64) edges, in the last chunk; and the
    # gradients follow the reference too.
    steps = (0, 3, 8, 63, 64, 65, 130, 199)
    T, C = 200, len(steps)
    a = torch.full((1, T, C), 0.5, dtype=torch.float64)
    a[0, T // 3:] = -0.5
    for c, t in enumerate(steps):
        a[0, T - 1 - t if reverse else t, c] = math.inf
    b = torch.rand(1, T, C, dtype=torch.float64) + 0.5
    h0 = torch.ones(1, C, dtype=torch.float64)
    if dtype.is_complex:  # inf + 0j: the product (inf + 0j)(x + 0j) has a NaN part
        phase = torch.where(a > 0, 0.25, 2.5).double()
        a = torch.polar(a.abs(), phase).masked_fill(a.isinf(), math.inf)
        b, h0 = b.to(torch.complex128), h0.to(torch.complex128)
    wide = torch.complex128 if dtype.is_complex else torch.float64
    leaves = [x.to(device, dtype).requires_grad_() for x in (a, b)]
    h0_in = h0.to(device, torch.complex64 if dtype.is_complex else dtype)
    h = seqfuse.linear_scan(*leaves, h0_in, reverse=reverse)
    ref = [x.to(dtype).to(wide).requires_grad_() for x in (a, b)]
    want = reference.linear_scan(*ref, h0_in.to("cpu", wide), reverse=reverse)
    if not dtype.is_complex:
        assert torch.isinf(want[0, -1 if not reverse else 0]).all()
    assert_close(h, want, dtype, equal_nan=True)
    g = torch.rand(1, T, C, dtype=torch.float64).to(dtype)
    got = torch.autograd.grad(h, leaves, g.to(device))
    expected = torch.autograd.grad(want, ref, g.to(wide))
    for x, y in zip(got, expected):
        assert_close(x, y, dtype, equal_nan=True)


@pytest.mark.parametrize("device", CUDA_DEVICES)
def test_cuda_chunk_whose_composed_map_overflows(device):
    # float64, channel 0: a = 1e6 with b = 0 (state 0) for the first 56 steps, then
    # a = 0.5 and b > 0. In the first 64-step chunk every warp's map (8 steps, A <= 1e48)
    # and every carry is finite, but the chunk's composed map is not (A = 1e336 x
    # 0.5^8), so its inclusive prefix, h_63 != 0, is published late, from the replay, with
    # no exact path: the later chunks must start from it. Channel 1 is an ordinary scan.
    T = 300
    a = torch.full((1, T, 2), 0.5, dtype=torch.float64)
    a[0, :56, 0] = 1e6
    b = torch.rand(1, T, 2, dtype=torch.float64) + 0.5
    b[0, :56, 0] = 0
    h = seqfuse.linear_scan(a.to(device), b.to(device))
    want = reference.linear_scan(a, b)
    assert torch.isfinite(want).all() and (want[0, 56:] > 0).all()
    assert_close(h, want)


# ---- packed sequences (cu_seqlens) ------------------------------------------------------

# Lengths with empty sequences, single steps, primes, chunk sizes +- 1 (the CUDA kernel's
# time chunk is 64 steps), and one sequence longer than all the others together.
PACKED_LENGTHS = {
    "mixed": [0, 1, 7, 63, 64, 65, 0, 2, 131, 1],
    "one long": [3, 300, 0, 5],
    "all empty but one": [0, 0, 11, 0],
    "1000 of length 1": [1] * 1000,
}


def offsets(lengths, device, dtype=torch.int64):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=dtype,
                        device=device)


def per_sequence(fn, a, b, h0, cu, reverse):
    """The packed call's meaning: one call per sequence, concatenated."""
    bounds = cu.tolist()
    outs = []
    for n, (s, e) in enumerate(zip(bounds, bounds[1:])):
        a_n = a if a.dim() == 1 else a[:, s:e]
        outs.append(fn(a_n, b[:, s:e], None if h0 is None else h0[n:n + 1], reverse=reverse))
    return torch.cat(outs, dim=1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("lengths", list(PACKED_LENGTHS))
@pytest.mark.parametrize("a_kind", ["full", "per-channel [C]"])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("with_h0", [True, False])
def test_packed_equals_one_call_per_sequence(device, lengths, a_kind, reverse, with_h0):
    lengths = PACKED_LENGTHS[lengths]
    N, T, C = len(lengths), sum(lengths), 37
    cu = offsets(lengths, device)
    a, b, _ = make((1, T, C), A_SHAPES[a_kind](1, T, C), torch.float64, device, h0=False)
    h0 = torch.randn(N, C, dtype=torch.float64, device=device, requires_grad=True) if with_h0 else None
    leaves = [x for x in (a, b, h0) if x is not None]
    grad = torch.randn(1, T, C, dtype=torch.float64, device=device)
    got = seqfuse.linear_scan(a, b, h0, reverse=reverse, cu_seqlens=cu)
    want = per_sequence(seqfuse.linear_scan, a, b, h0, cu, reverse)
    ref = reference.linear_scan(a, b, h0, reverse=reverse, cu_seqlens=cu)
    assert_close(got, want)
    assert_close(got, ref)
    grads = torch.autograd.grad(got, leaves, grad)
    for g, w in zip(grads, torch.autograd.grad(want, leaves, grad)):
        assert_close(g, w)
    if with_h0:  # an empty sequence passes its h0 through: zero gradient
        empty = torch.tensor(lengths, device=device) == 0
        assert torch.equal(grads[-1][empty], torch.zeros_like(grads[-1][empty]))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reverse", [False, True])
def test_packed_infinite_a_stays_in_its_sequence(device, reverse):
    # An infinite a inside sequence 0, at the last sequence's first step (a cut that
    # meets the exact path) and over its tail: each sequence follows its own recurrence
    # and the one between keeps its finite values, forward and backward.
    lengths = [70, 5, 0, 130]
    cu = offsets(lengths, device)
    T, C = sum(lengths), 3
    a = torch.full((1, T, C), 0.5, dtype=torch.float64)
    a[0, 10, 0] = math.inf
    a[0, 75, 1] = math.inf
    a[0, 100:, 2] = -math.inf
    b = torch.rand(1, T, C, dtype=torch.float64) + 0.5
    h0 = torch.ones(len(lengths), C, dtype=torch.float64)
    leaves = [x.to(device).requires_grad_() for x in (a, b, h0)]
    h = seqfuse.linear_scan(*leaves[:2], leaves[2], reverse=reverse, cu_seqlens=cu)
    ref = [x.clone().requires_grad_() for x in (a, b, h0)]
    want = per_sequence(reference.linear_scan, ref[0], ref[1], ref[2], cu.cpu(), reverse)
    assert torch.isfinite(want[0, 70:75]).all() and not torch.isfinite(want).all()
    assert_close(h, want, equal_nan=True)
    g = torch.rand(1, T, C, dtype=torch.float64)
    for x, y in zip(torch.autograd.grad(h, leaves, g.to(device)), torch.autograd.grad(want, ref, g)):
        assert_close(x, y, equal_nan=True)


@pytest.mark.parametrize("device", DEVICES)
def test_packed_half_and_complex_types(device):
    lengths = [5, 0, 70, 1, 33]
    cu = offsets(lengths, device, torch.int32)
    for dtype in (torch.float32, torch.bfloat16, torch.complex64):
        a, b, h0 = make((1, sum(lengths), 9), (9,), dtype, device, h0=False)
        h0 = torch.randn(len(lengths), 9, dtype=torch.complex64 if dtype.is_complex else
                         torch.float32, device=device)
        got = seqfuse.linear_scan(a, b, h0, cu_seqlens=cu)
        want = per_sequence(seqfuse.linear_scan, a, b, h0, cu, False)
        assert_close(got, want, dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_packed_special_values_stay_in_their_sequence(device):
    # An inf or NaN at the end of one sequence must not reach the next one, in either
    # direction, not even as 0 * inf through a coefficient.
    lengths = [40, 30, 50]
    cu = offsets(lengths, device)
    for reverse in (False, True):
        a, b, _ = make((1, 120, 4), (1, 120, 4), torch.float64, device, h0=False)
        a, b = a.detach().clone(), b.detach().clone()
        a[0, 40] = 0.0 if not reverse else a[0, 40]  # the next sequence's first coefficient
        b[0, 39 if not reverse else 40] = math.inf
        b[0, 69 if not reverse else 70, 1] = math.nan
        got = seqfuse.linear_scan(a, b, cu_seqlens=cu, reverse=reverse)
        want = reference.linear_scan(a, b, cu_seqlens=cu, reverse=reverse)
        assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.isinf(), want.isinf())
        finite = want.isfinite()
        assert_close(got[finite], want[finite])
        assert want[0, 70:].isfinite().all() if not reverse else want[0, :40].isfinite().all()


def test_packed_gradcheck_cpu():
    lengths = [3, 0, 1, 4]
    cu = offsets(lengths, "cpu")
    for a_kind in ("full", "per-channel [C]"):
        for reverse in (False, True):
            a, b, _ = make((1, 8, 3), A_SHAPES[a_kind](1, 8, 3), torch.float64, "cpu", h0=False)
            h0 = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
            assert torch.autograd.gradcheck(
                lambda a, b, h0: seqfuse.linear_scan(a, b, h0, reverse=reverse, cu_seqlens=cu),
                (a, b, h0))


def test_packed_opcheck():
    cu = offsets([3, 0, 5], "cpu")
    a, b, _ = make((1, 8, 4), (4,), torch.float32, "cpu", h0=False)
    h0 = torch.randn(3, 4, requires_grad=True)
    torch.library.opcheck(torch.ops.seqfuse.linear_scan.default, (a, b, h0, True, cu))


BAD_OFFSETS = [
    ("cu_seqlens must be \\[N \\+ 1\\]", lambda T: torch.zeros(2, 2, dtype=torch.long)),
    ("cu_seqlens must be an int32 or int64", lambda T: torch.tensor([0.0, T])),
    ("cu_seqlens must start at 0", lambda T: torch.tensor([1, T])),
    ("cu_seqlens must be non-decreasing", lambda T: torch.tensor([0, 6, 4, T])),
    ("cu_seqlens must end at the packed length", lambda T: torch.tensor([0, 3, T - 1])),
    ("cu_seqlens must end at the packed length", lambda T: torch.tensor([0])),
]


@pytest.mark.parametrize("match,make_offsets", BAD_OFFSETS)
def test_bad_cu_seqlens_raise_clear_errors(match, make_offsets):
    a, b = torch.rand(5), torch.randn(1, 10, 5)
    with pytest.raises((RuntimeError, ValueError), match=match):
        seqfuse.linear_scan(a, b, cu_seqlens=make_offsets(10))


@pytest.mark.cuda
def test_cu_seqlens_on_another_device():
    with pytest.raises(RuntimeError, match="cu_seqlens is on cpu"):
        seqfuse.linear_scan(torch.rand(5, device="cuda"), torch.randn(1, 10, 5, device="cuda"),
                            cu_seqlens=torch.tensor([0, 4, 10]))


def test_packed_needs_one_row_and_h0_per_sequence():
    cu = offsets([4, 6], "cpu")
    with pytest.raises(ValueError, match="with cu_seqlens, b must hold the packed sequences"):
        seqfuse.linear_scan(torch.rand(5), torch.randn(2, 10, 5), cu_seqlens=cu)
    with pytest.raises(ValueError, match="h0 must be \\[N, C\\] = \\[2, 5\\]"):
        seqfuse.linear_scan(torch.rand(5), torch.randn(1, 10, 5), torch.zeros(1, 5),
                            cu_seqlens=cu)


@pytest.mark.parametrize("device", CUDA_DEVICES)
def test_cuda_invalid_offsets_give_nan(device):
    # The CUDA kernels read cu_seqlens on the device (a host check would synchronise):
    # offsets that break the rules poison the outputs instead of raising.
    a = torch.rand(5, device=device, requires_grad=True)
    b = torch.randn(1, 10, 5, device=device, requires_grad=True)
    for bad in ([0, 6, 4, 10], [1, 10], [0, 3, 9]):
        cu = torch.tensor(bad, device=device)
        h = seqfuse.linear_scan(a, b, cu_seqlens=cu)
        assert h.isnan().all(), bad
        grads = torch.autograd.grad(h, (a, b), torch.ones_like(h))
        assert all(g.isnan().all() for g in grads), bad
