"""Property tests of the GlobalPointer family on generated inputs (docs/global_pointer.md):
rope, global_pointer_scores, the dense and sparse multilabel losses and the fused
global_pointer_loss, against the float64 references; isolation of each (batch, head)
and each loss row; batch = rows one by one; emulated = CPU; bad parameters."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import seqfuse
from seqfuse import reference
from conftest import DEVICES, TOL, cpu_kernels, runs_cuda_kernels
from property_support import (SPECIALS, assert_equal_outside, assert_matches, check, examples,
                              bad_calls_raise, fill, leaf, magnitudes, ref_leaf, run_child,
                              sizes, special_value)

pytestmark = pytest.mark.property

CPU_DTYPES = [torch.float64, torch.float32]
CUDA_DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
# CUDA score tiles are 64 x 64 (32 x 32 in float64), the CPU's 64 rows.
TILES = (32, 64)
SPAN_OPS = ["rope", "scores", "fused_loss"]
ROW_OPS = ["dense_loss", "sparse_loss"]


def dtypes(device):
    return CUDA_DTYPES if runs_cuda_kernels(device) else CPU_DTYPES


# ---- span ops: rope, scores, the fused loss -------------------------------------------

@st.composite
def span_cases(draw, device, op, specials=False):
    """Shapes and parameters of one call of rope, global_pointer_scores or
    global_pointer_loss; `specials`: (tensor, value, index draws) to plant."""
    dtype = draw(st.sampled_from(dtypes(device)))
    emulated = runs_cuda_kernels(device)  # every thread is a fiber there: shorter rows
    rope = op == "rope" or draw(st.booleans())
    D = draw(sizes((16, 32), low=1, high=34 if emulated else 66))
    D += D % 2 if rope else 0
    shared = op != "rope" and draw(st.booleans())  # Efficient GlobalPointer's q, k
    case = dict(
        op=op, dtype=dtype, B=draw(sizes(high=3)), L=draw(sizes(TILES, high=66)),
        H=draw(sizes(low=1, high=3)), D=D, shared=shared, rope=rope,
        tril=draw(st.booleans()), mask=draw(st.booleans()),
        scale=draw(st.sampled_from([None, None, 1.0, 0.3])),
        bias="none" if op == "rope" else draw(st.sampled_from(
            ["none", "start", "end", "both"] if not shared else ["start", "end", "both"])),
        positions=draw(st.sampled_from([None, "L", "BL"])), base=draw(st.sampled_from(
            [10000.0, 10000.0, 2.0, 1e6])), rank3=op == "rope" and draw(st.booleans()),
        P=draw(sizes(high=9)), mask_zero=draw(st.booleans()),
        reduction=draw(st.sampled_from(["none", "mean", "sum"])),
        layout=draw(st.sampled_from(["contiguous", "transposed", "strided"])),
        # Scores are sums of D products: magnitudes up to a quarter of the exponent range
        # keep them finite.
        mag=draw(magnitudes(dtype, cap=int(math.log2(torch.finfo(dtype).max)) // 4)),
        seed=draw(st.integers(0, 2**31)), specials=[],
    )
    if specials:
        # The dtype's max goes into the biases only: in q or k its products leave the
        # accumulation type's range part way through a sum, and whether that sum ends
        # finite, inf or NaN is then the order of its terms (the kernels' tiles, the
        # reference's einsum); the isolation property takes max everywhere.
        places = ["q"] if op == "rope" else ["q", "k"] + (
            [] if case["bias"] == "none" else ["bias"])
        case["specials"] = []
        for _ in range(draw(st.integers(1, 2))):
            where = draw(st.sampled_from(places))
            name = draw(st.sampled_from(SPECIALS if where == "bias" else SPECIALS[:3]))
            case["specials"].append((where, name, *(draw(st.integers(0, 999))
                                                    for _ in range(4))))
        # Nor subnormal magnitudes: c q underflowing to 0 in the accumulation type (the
        # reference's is float64) against an infinite k would be 0 * inf.
        case["mag"] = max(case["mag"], 2.0 ** 10 * torch.finfo(dtype).smallest_normal)
    return case


def span_inputs(case):
    """float64 q, k, biases, mask, positions and pos_index for a span case, each value
    held exactly by the dtype, specials planted."""
    B, L, H, D, dtype, seed = (case[n] for n in ("B", "L", "H", "D", "dtype", "seed"))
    Hq = 1 if case["shared"] else H
    shape = (B, L, D) if case["rank3"] else (B, L, Hq, D)
    q = fill(shape, dtype, seed, scale=case["mag"])
    k = fill(shape, dtype, seed + 1, scale=case["mag"])
    g = torch.Generator().manual_seed(seed + 2)
    bias = case["bias"]
    bs = fill((B, H, L), dtype, seed + 3) if bias in ("start", "both") else None
    be = fill((B, H, L), dtype, seed + 4) if bias in ("end", "both") else None
    mask = None
    if case["mask"] and B:
        lengths = torch.randint(0, L + 1, (B,), generator=g)
        mask = (torch.arange(L) < lengths[:, None]).to(torch.int32)
    positions = {None: None, "L": torch.randint(0, 5000, (L,), generator=g),
                 "BL": torch.randint(0, 5000, (B, L), generator=g)}[case["positions"]]
    N = L * L
    pos = torch.randint(0, max(N, 1), (B, H, case["P"] if N else 0), generator=g)
    if case["mask_zero"] and pos.shape[-1] > 1:
        pos[..., -1] = 0  # bert4keras' padding
    tensors = dict(q=q, k=k, bias=bs if bs is not None else be)
    for where, name, *at in case["specials"]:
        x = tensors[where]
        if x is not None and x.numel():
            x[tuple(i % n for i, n in zip(at, x.shape))] = special_value(name, dtype)
    return dict(q=q, k=k, bias_start=bs, bias_end=be, mask=mask, positions=positions,
                pos_index=pos)


def span_call(case, fn, x, device):
    """The op through `fn` (seqfuse or seqfuse.reference) on the leaves of x."""
    op = case["op"]
    if op == "rope":
        pos = x["positions"]
        return fn.rope(x["q"], None if pos is None else pos.to(device), base=case["base"])
    kw = dict(mask=None if x["mask"] is None else x["mask"].to(device), rope=case["rope"],
              tril=case["tril"], scale=case["scale"], bias_start=x["bias_start"],
              bias_end=x["bias_end"])
    if op == "scores":
        return fn.global_pointer_scores(x["q"], x["k"], **kw)
    return fn.global_pointer_loss(x["q"], x["k"], x["pos_index"].to(device),
                                  mask_zero=case["mask_zero"], reduction=case["reduction"],
                                  **kw)


DIFFERENTIABLE = ("q", "k", "bias_start", "bias_end")


def span_run(case, inputs, device="cpu", fn=None, grads=True, dtype=None):
    """The output and the gradients of q, k and the biases under a generated cotangent,
    through seqfuse in the case's dtype and layout, or through fn in float64."""
    wide = fn is not None
    dtype = torch.float64 if wide else dtype or case["dtype"]
    layout = "contiguous" if wide else case["layout"]
    x = dict(inputs)
    for n in DIFFERENTIABLE:
        if x[n] is not None:
            x[n] = leaf(x[n], dtype, layout if n in "qk" else "contiguous", device)
    out = span_call(case, fn or seqfuse, x, device)
    if not grads:
        return out, []
    leaves = [x[n] for n in DIFFERENTIABLE if x[n] is not None]
    up = fill(out.shape, torch.float64, case["seed"] + 9).to(device, out.dtype)
    got = torch.autograd.grad(out, leaves, up, allow_unused=True) if out.requires_grad else \
        [None] * len(leaves)
    return out, [torch.zeros_like(x) if g is None else g for g, x in zip(got, leaves)]


def span_tolerance(case, scores=None):
    """Against float64: scores and losses of half inputs are rounded once to the dtype
    after float accumulation, but the rotated q and k are rounded to it first
    (docs/global_pointer.md), a relative error of the dtype's eps on each of D terms.
    A loss and its gradient take e^(s - lse): their relative error is eps |s| (`scores`,
    the float64 scores, give |s|)."""
    dtype = case["dtype"]
    tol = dict(TOL[dtype])
    eps = torch.finfo(dtype).eps
    if dtype in (torch.float16, torch.bfloat16):
        tol = dict(rtol=4 * eps, atol=2 * eps * max(1, math.sqrt(case["D"])))
    if scores is not None:
        tol["rtol"] = max(tol["rtol"], 4 * eps * largest_finite(scores))
    return tol


def score_cotangent(case, inputs):
    """The float64 reference scores of a scores or fused-loss case and dL/ds, the
    cotangent its gradients push back through them: the generated one for the scores,
    the loss's gradient under it for the fused loss. Also the leaves, for autograd."""
    x = {n: t if n not in DIFFERENTIABLE or t is None else ref_leaf(t) for n, t in inputs.items()}
    leaves = [x[n] for n in DIFFERENTIABLE if x[n] is not None]
    kw = dict(mask=x["mask"], rope=case["rope"], tril=case["tril"], scale=case["scale"],
              bias_start=x["bias_start"], bias_end=x["bias_end"])
    if case["op"] == "fused_loss":
        kw["mask_zero"] = case["mask_zero"]
    s = reference.global_pointer_scores(x["q"], x["k"], **kw)
    up = fill(s.shape if case["op"] == "scores" else span_call(case, reference, x, "cpu").shape,
              torch.float64, case["seed"] + 9)
    if case["op"] == "scores":
        return s, up, leaves
    s_ = s.detach().requires_grad_()
    loss = reference.sparse_multilabel_categorical_crossentropy(
        s_.flatten(-2), x["pos_index"], case["mask_zero"], case["reduction"])
    (g,) = torch.autograd.grad(loss, s_, up)
    return s, g, leaves


def infinite_sums(case, inputs):
    """For each gradient of the scores or the fused loss, the entries that add infinite
    terms of both signs (or NaN ones), whose value is NaN or +-inf depending on the
    order of the sum: a shared k of +inf under cotangents of both signs in two heads
    sums inf - inf if the heads are added last, +-inf if the cotangents are. Found as
    the float64 gradients along the positive and the negative part of dL/ds; one mask
    per gradient span_run returns, None for rope."""
    if case["op"] == "rope":
        return None
    s, g, leaves = score_cotangent(case, inputs)
    plus = torch.autograd.grad(s, leaves, g.clamp(min=0), retain_graph=True, allow_unused=True)
    minus = torch.autograd.grad(s, leaves, (-g).clamp(min=0), allow_unused=True)
    return [None if p is None else torch.isnan(p) | torch.isnan(m)
            | (torch.isinf(p) & torch.isinf(m) & (torch.sign(p) == torch.sign(m)))
            for p, m in zip(plus, minus)]


def gradient_term_sizes(case, inputs):
    """For each gradient of the scores or the fused loss, the sum of the absolute values
    of the terms each entry adds up: dq_i sums G_ij c k_j over spans (and heads, for a
    shared q), the biases' gradients G_ij over a row or a column. A gradient that cancels
    is exact to a few ulp of these, not of itself (a shared float32 dq of 0.038 summing
    three heads' terms from scores of 64 was 1e-5 off). For the fused loss each G_ij is
    taken times max(1, 2 |s| + log(L^2 + 1)), |s| the largest score: e^(s - lse) carries
    about eps |s - lse| of relative error. RoPE rotates each (even, odd) pair of q and k,
    so a term's size is bounded by the pair's |x_even| + |x_odd| on both. Non-finite
    values count as 0 (those entries are compared by their NaN / inf pattern). None for
    rope."""
    if case["op"] == "rope":
        return None
    size = lambda x: x.detach().abs().nan_to_num(0.0, 0.0, 0.0)  # noqa: E731
    pairs = lambda x: (x[..., ::2] + x[..., 1::2]).repeat_interleave(2, -1)  # noqa: E731
    _, g, _ = score_cotangent(case, inputs)
    q, k = (size(inputs[n]) for n in "qk")
    if case["rope"]:
        q, k = pairs(q), pairs(k)
    x = dict(q=q, k=k, **{n: None if inputs[n] is None else size(inputs[n])
                          for n in ("bias_start", "bias_end")})
    x = {n: None if t is None else ref_leaf(t) for n, t in x.items()}
    scale = None if case["scale"] is None else abs(case["scale"])
    sizes = reference.global_pointer_scores(
        x["q"], x["k"], mask=inputs["mask"], rope=False, tril=case["tril"], scale=scale,
        bias_start=x["bias_start"], bias_end=x["bias_end"],
        mask_zero=case["op"] == "fused_loss" and case["mask_zero"])
    g = size(g)
    if case["op"] == "fused_loss":
        L = case["L"]
        g = g * max(1.0, 2 * largest_finite(sizes) + math.log(L * L + 1))
    leaves = [x[n] for n in DIFFERENTIABLE if x[n] is not None]
    terms = list(torch.autograd.grad(sizes, leaves, g, allow_unused=True))
    terms = [torch.zeros_like(t) if a is None else size(a) for a, t in zip(terms, leaves)]
    if case["rope"]:
        terms[:2] = [pairs(t) for t in terms[:2]]
    return terms


def largest_finite(x):
    finite = x.detach()[torch.isfinite(x.detach())]
    return finite.abs().max().item() if finite.numel() else 0.0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", SPAN_OPS)
@pytest.mark.parametrize("specials", [False, True], ids=["finite", "specials"])
def test_span_op_matches_reference(device, op, specials):
    """rope, the scores and the fused loss equal the float64 reference, NaN and +-inf
    included, and so does every gradient."""
    def prop(case):
        inputs = span_inputs(case)
        out, grads = span_run(case, inputs, device)
        want, grads_ref = span_run(case, inputs, fn=reference)
        dtype = case["dtype"]
        assert out.dtype == dtype
        scores = None
        if op == "fused_loss":
            scores, _ = span_run(dict(case, op="scores"), inputs, fn=reference, grads=False)
        tol = span_tolerance(case, scores)
        floor = None
        if op == "fused_loss":
            # log(1 + sum e^s) is exact to a few ulp of 1 and of the scores, not of
            # itself: a loss of 8e-8 (one score of -16) carried 1e-16 in float64.
            rows = 1 if case["reduction"] == "none" else max(case["B"] * case["H"], 1)
            floor = 4 * torch.finfo(dtype).eps * max(1.0, largest_finite(scores)) * rows
        assert_matches(out, want, dtype, op, floor=floor, **tol)
        either = (infinite_sums(case, inputs) if specials else None) or [None] * len(grads)
        terms = gradient_term_sizes(case, inputs) or [None] * len(grads)
        eps = torch.finfo(dtype).eps
        names = [n for n in DIFFERENTIABLE if inputs[n] is not None]
        for name, a, e, amb, t in zip(names, grads, grads_ref, either, terms):
            if amb is not None:  # NaN or +-inf either way: the order of the sum decides
                a_ = a.detach().cpu().double()
                e = torch.where(amb & ~torch.isfinite(a_) & ~torch.isfinite(e), a_, e)
            assert_matches(a, e, dtype, f"{op}: grad of {name}", floor=8 * eps,
                           bound=None if t is None else 8 * eps * t, **tol)

    check(device, span_cases(device, op, specials), prop)


def head_of(case, where, index):
    """The (batch, head) pairs a special at `index` of `where` reaches: its own (b, h),
    or every head of b for a shared q/k (and for rope's [B, L, D])."""
    B, H = case["B"], case["H"]
    hit = torch.zeros(B, H, dtype=torch.bool)
    b = index[0]
    if where == "bias":
        hit[b, index[1]] = True
    elif case["shared"] or case["rank3"]:
        hit[b] = True
    else:
        hit[b, index[2]] = True
    return hit


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", SPAN_OPS)
def test_span_op_special_value_stays_in_its_head(device, op):
    """A NaN, inf, -inf or max in q, k or a bias of one (batch, head) changes no output
    and no gradient of another (batch, head)."""
    def prop(case):
        case = dict(case, reduction="none")
        inputs = span_inputs(case)
        where, name, *at = case["poison"]
        x = inputs[where] if where != "bias" else inputs["bias_start"]
        if where == "bias" and x is None:
            x, where = inputs["bias_end"], "bias_end"
        if x is None or x.numel() == 0:
            return
        index = tuple(i % n for i, n in zip(at, x.shape))
        clean, dclean = span_run(case, inputs, device)
        x[index] = special_value(name, case["dtype"])
        out, dout = span_run(case, inputs, device)
        other = ~head_of(case, "bias" if where.startswith("bias") else where, index)
        what = f"{where}{list(index)} = {name}"
        B, H, L = case["B"], case["H"], case["L"]
        if op == "rope":
            other = other[:, :1] if case["rank3"] else other
            keep = other[:, None, ..., None].expand(out.shape) if not case["rank3"] else \
                other[:, None, :].expand(out.shape)
        elif op == "scores":
            keep = other[..., None, None].expand(out.shape)
        else:
            keep = other
        assert_equal_outside(clean, out, keep, f"{what}: {op}")
        for n, c, p in zip([n for n in DIFFERENTIABLE if inputs[n] is not None], dclean, dout):
            if n.startswith("bias"):
                k = other[..., None].expand(c.shape)
            elif case["rank3"]:
                k = other[:, :1, None].expand(c.shape)
            else:
                per_head = other if c.shape[2] == H else other.all(1, keepdim=True)
                k = per_head[:, None, :, None].expand(c.shape)
            assert_equal_outside(c, p, k, f"{what}: grad of {n}")

    @st.composite
    def cases(draw):
        case = draw(span_cases(device, op))
        places = ["q"] if op == "rope" else ["q", "k"] + (
            [] if case["bias"] == "none" else ["bias"])
        case["poison"] = (draw(st.sampled_from(places)), draw(st.sampled_from(SPECIALS)),
                          *(draw(st.integers(0, 999)) for _ in range(4)))
        return case

    check(device, cases(), prop)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", SPAN_OPS)
def test_span_op_batch_equals_rows_and_cpu(device, op):
    """A batch equals its rows one by one; the emulated CUDA kernels equal the CPU ones
    (in float32 where the CPU has no half types)."""
    def prop(case):
        case = dict(case, reduction="none", layout="contiguous")
        inputs = span_inputs(case)
        dtype, tol = case["dtype"], span_tolerance(case)
        whole, _ = span_run(case, inputs, device, grads=False)
        for b in range(case["B"]):
            row = {n: None if x is None or (n == "positions" and x.dim() == 1) else x[b:b + 1]
                   for n, x in inputs.items()}
            if inputs["positions"] is not None and inputs["positions"].dim() == 1:
                row["positions"] = inputs["positions"]
            one, _ = span_run(dict(case, B=1), row, device, grads=False)
            assert_matches(one, whole[b:b + 1].double(), dtype, f"{op}: row {b}", **tol)
        if runs_cuda_kernels(device):
            with cpu_kernels():
                wide = torch.float64 if dtype == torch.float64 else torch.float32
                on_cpu, _ = span_run(case, inputs, dtype=wide, grads=False)
            assert_matches(whole, on_cpu.double(), dtype, f"{op}: emulated vs cpu", **tol)

    check(device, span_cases(device, op), prop)


@pytest.mark.xfail(strict=True, reason="known limit, CUDA bfloat16: tensor-core tiles "
                   "scale the float accumulator after the product, so q . k beyond float's "
                   "max is inf where c q . k is within bfloat16's range (docs)")
@pytest.mark.parametrize("device", [d for d in DEVICES if d != "cpu"])
def test_bfloat16_overflow_before_the_scale(device):
    big = torch.finfo(torch.bfloat16).max
    q = torch.full((1, 1, 1, 16), 1.0, dtype=torch.bfloat16, device=device)
    q[..., :2] = big  # q . k = 2 max > float's max; c q . k = max / 2
    k = torch.ones_like(q)
    out = seqfuse.global_pointer_scores(q, k, rope=False, scale=0.25)
    want = reference.global_pointer_scores(q.double(), k.double(), rope=False, scale=0.25)
    assert_matches(out, want, torch.bfloat16, "scores")


@pytest.mark.parametrize("device", DEVICES)
def test_masked_span_keeps_a_non_finite_q_out_of_dk(device):
    # The CPU kernels' and the reference's backward of the scores multiplied the zero
    # gradient of a masked span (i, j) by q_i (a product of matrices), so a NaN in q_i
    # reached dk_j of the spans masked for it (0 * NaN): with tril, and through the fused
    # loss, whose loss is finite when the NaN's token is padding.
    q = torch.ones(1, 3, 1, 2, dtype=torch.float64, device=device)
    k = torch.ones_like(q)
    q[0, 2, 0, 0] = math.nan  # with tril only span (2, 2) sees it; padding: none
    pad = torch.tensor([[1, 1, 0]], device=device)
    for fn in (seqfuse, reference):
        qq, kk = q.clone().requires_grad_(), k.clone().requires_grad_()
        s = fn.global_pointer_scores(qq, kk, rope=False)
        (dk,) = torch.autograd.grad(s, kk, torch.ones_like(s).masked_fill(torch.isinf(s), 0))
        assert torch.isfinite(dk[0, :2]).all() and torch.isnan(dk[0, 2, 0, 0]), (fn, dk)
        loss = fn.global_pointer_loss(qq, kk, torch.tensor([[[4]]], device=device),
                                      mask=pad, rope=False)
        dq, dk = torch.autograd.grad(loss, (qq, kk))
        assert torch.isfinite(loss) and torch.isfinite(dk).all(), (fn, dk)
        assert torch.equal(dq[0, 2], torch.zeros_like(dq[0, 2])), (fn, dq)


# ---- the row losses: dense and sparse multilabel crossentropy ------------------------

@st.composite
def row_cases(draw, device, op, specials=False):
    dtype = draw(st.sampled_from(dtypes(device)))
    N = draw(sizes((32, 64, 256), high=300))
    case = dict(op=op, dtype=dtype, R=draw(sizes(high=5)), inner=draw(sizes(low=1, high=3)),
                N=N, soft=draw(st.booleans()), P=draw(sizes(high=9)),
                mask_zero=draw(st.booleans()), repeats=draw(st.booleans()),
                masked=draw(st.sampled_from([0.0, 0.0, 0.3, 1.0])),
                reduction=draw(st.sampled_from(["none", "mean", "sum"])),
                layout=draw(st.sampled_from(["contiguous", "transposed", "strided"])),
                mag=draw(magnitudes(dtype)), seed=draw(st.integers(0, 2**31)), specials=[])
    if specials:
        case["specials"] = [(draw(st.sampled_from(SPECIALS)),
                             *(draw(st.integers(0, 999)) for _ in range(3)))
                            for _ in range(draw(st.integers(1, 3)))]
    return case


def row_inputs(case):
    """scores [R, inner, N] in float64 (a fraction masked to -inf, specials planted),
    hard or soft labels and pos_index [R, inner, P]."""
    R, inner, N, dtype, seed = (case[n] for n in ("R", "inner", "N", "dtype", "seed"))
    s = fill((R, inner, N), dtype, seed, scale=case["mag"])
    g = torch.Generator().manual_seed(seed + 1)
    s = s.masked_fill(torch.rand(s.shape, generator=g) < case["masked"], -math.inf)
    for name, *at in case["specials"]:
        if s.numel():
            s[tuple(i % n for i, n in zip(at, s.shape))] = special_value(name, dtype)
    hard = (torch.rand(s.shape, generator=g) < 0.1).double()
    labels = torch.rand(s.shape, generator=g, dtype=torch.float64) * hard if case["soft"] \
        else hard
    labels = labels.to(dtype).double()
    span = 4 if case["repeats"] else max(N, 1)  # a few indices, so most repeat
    pos = torch.randint(0, min(span, max(N, 1)), (R, inner, case["P"]), generator=g)
    if case["mask_zero"] and case["P"] > 1:
        pos[..., -1] = 0
    if N == 0:
        pos = pos[..., :0]
    return s, labels, pos


def row_call(case, fn, s, labels, pos):
    if case["op"] == "dense_loss":
        return fn.multilabel_categorical_crossentropy(s, labels.to(s.device, s.dtype),
                                                      case["reduction"])
    return fn.sparse_multilabel_categorical_crossentropy(s, pos.to(s.device), case["mask_zero"],
                                                         case["reduction"])


def row_run(case, s64, labels, pos, device="cpu", fn=None, dtype=None):
    wide = fn is not None
    dtype = torch.float64 if wide else dtype or case["dtype"]
    s = leaf(s64, dtype, "contiguous" if wide else case["layout"], device)
    loss = row_call(case, fn or seqfuse, s, labels, pos)
    up = fill(loss.shape, torch.float64, case["seed"] + 5).to(device, loss.dtype)
    (ds,) = torch.autograd.grad(loss, s, up) if loss.requires_grad else (torch.zeros_like(s),)
    return loss, ds


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", ROW_OPS)
@pytest.mark.parametrize("specials", [False, True], ids=["finite", "specials"])
def test_row_loss_matches_reference(device, op, specials):
    """The dense and sparse losses and their gradients equal the float64 reference,
    NaN and +-inf included (masked -inf scores are ignored)."""
    def prop(case):
        s64, labels, pos = row_inputs(case)
        loss, ds = row_run(case, s64, labels, pos, device)
        want, ds_ref = row_run(case, s64, labels, pos, fn=reference)
        dtype = case["dtype"]
        assert loss.dtype == dtype
        rtol = max(TOL[dtype]["rtol"], 4 * torch.finfo(dtype).eps * largest_finite(s64))
        assert_matches(loss, want, dtype, op, rtol=rtol)
        assert_matches(ds, ds_ref, dtype, f"grad of {op}", floor=torch.finfo(dtype).eps,
                       rtol=rtol)

    check(device, row_cases(device, op, specials), prop)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", ROW_OPS)
def test_row_loss_special_value_stays_in_its_row(device, op):
    """A NaN, inf, -inf or max in one row changes no other row's loss or gradient."""
    def prop(case):
        case = dict(case, reduction="none")
        s64, labels, pos = row_inputs(case)
        if s64.numel() == 0:
            return
        name, *at = case["poison"]
        index = tuple(i % n for i, n in zip(at, s64.shape))
        clean, dclean = row_run(case, s64, labels, pos, device)
        s64[index] = special_value(name, case["dtype"])
        out, dout = row_run(case, s64, labels, pos, device)
        keep = torch.ones(s64.shape[:2], dtype=torch.bool)
        keep[index[:2]] = False
        what = f"scores{list(index)} = {name}"
        assert_equal_outside(clean, out, keep, f"{what}: {op}")
        assert_equal_outside(dclean, dout, keep[..., None].expand(s64.shape), f"{what}: grad")

    @st.composite
    def cases(draw):
        return dict(draw(row_cases(device, op)), poison=(
            draw(st.sampled_from(SPECIALS)), *(draw(st.integers(0, 999)) for _ in range(3))))

    check(device, cases(), prop)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", ROW_OPS)
def test_row_loss_batch_equals_rows_and_cpu(device, op):
    """A batch of rows equals each row alone; the emulated kernels equal the CPU's."""
    def prop(case):
        case = dict(case, reduction="none", layout="contiguous")
        s64, labels, pos = row_inputs(case)
        dtype = case["dtype"]
        whole, _ = row_run(case, s64, labels, pos, device)
        for r in range(case["R"]):
            one, _ = row_run(case, s64[r:r + 1], labels[r:r + 1], pos[r:r + 1], device)
            assert_matches(one, whole[r:r + 1].double(), dtype, f"{op}: row {r}")
        if runs_cuda_kernels(device):
            with cpu_kernels():
                wide = torch.float64 if dtype == torch.float64 else torch.float32
                on_cpu, _ = row_run(case, s64, labels, pos, dtype=wide)
            assert_matches(whole, on_cpu.double(), dtype, f"{op}: emulated vs cpu")

    check(device, row_cases(device, op), prop)


# ---- bad parameters --------------------------------------------------------------------

def _bad_calls(device):
    q = torch.zeros(2, 5, 3, 4)
    s = torch.zeros(2, 3, 7)
    cuda = runs_cuda_kernels(device)
    scores = seqfuse.global_pointer_scores
    dense = seqfuse.multilabel_categorical_crossentropy
    sparse = seqfuse.sparse_multilabel_categorical_crossentropy
    fused = seqfuse.global_pointer_loss
    pos = torch.zeros(2, 3, 2, dtype=torch.long)

    def gp(fn, **kw):
        args = dict(q=q, k=q)
        args.update(kw)
        extra = (args.pop("pos_index", pos),) if fn is fused else ()
        return lambda: fn(args.pop("q"), args.pop("k"), *extra, **args)

    span_fns = st.sampled_from([scores, fused])
    bad = [
        st.tuples(span_fns, st.integers(1, 6).filter(lambda n: n != 4)).map(
            lambda a: ("q not 4-D", gp(a[0], q=torch.zeros(*([2] * a[1]))), ["q"])),
        st.tuples(span_fns, st.integers(1, 9).filter(lambda n: n != 4)).map(
            lambda a: ("k's shape", gp(a[0], k=torch.zeros(2, 5, 3, a[1])), ["k must have"])),
        st.tuples(span_fns, st.integers(0, 5).map(lambda n: 2 * n + 1)).map(
            lambda a: ("odd D with rope", gp(a[0], q=torch.zeros(2, 5, 3, a[1]),
                                             k=torch.zeros(2, 5, 3, a[1])), ["even"])),
        st.tuples(span_fns, st.integers(0, 9).filter(lambda n: n != 5)).map(
            lambda a: ("mask's L", gp(a[0], mask=torch.ones(2, a[1])), ["mask"])),
        st.tuples(span_fns, st.sampled_from(["bias_start", "bias_end"]),
                  st.integers(0, 9).filter(lambda n: n != 5)).map(
            lambda a: ("bias's L", gp(a[0], **{a[1]: torch.zeros(2, 3, a[2])}), [a[1]])),
        st.tuples(span_fns, st.sampled_from([math.nan, math.inf, -math.inf])).map(
            lambda a: ("scale", gp(a[0], scale=a[1]), ["scale"])),
        st.sampled_from([torch.float64, torch.float16]).map(
            lambda d: ("k's dtype", gp(scores, k=q.to(d)), ["k"])),
        st.sampled_from([torch.int32, torch.int64, torch.bool]).map(
            lambda d: ("integer q", gp(scores, q=q.to(d), k=q.to(d)), ["q"])),
        st.one_of(st.integers(25, 10**6), st.integers(-10**6, -1)).map(
            lambda v: ("pos_index out of range",
                       gp(fused, pos_index=torch.full((2, 3, 2), v)), ["pos_index"])),
        st.integers(1, 5).filter(lambda n: n != 3).map(
            lambda n: ("pos_index shape", gp(fused, pos_index=torch.zeros(2, n, 2,
                                                                           dtype=torch.long)),
                       ["pos_index"])),
        st.sampled_from([torch.float32, torch.float64]).map(
            lambda d: ("float pos_index", lambda: sparse(s, pos.to(d)), ["pos_index"])),
        st.one_of(st.integers(7, 10**6), st.integers(-10**6, -1)).map(
            lambda v: ("sparse pos_index out of range",
                       lambda: sparse(s, torch.full((2, 3, 1), v)), ["pos_index"])),
        st.integers(0, 9).filter(lambda n: n != 7).map(
            lambda n: ("labels' shape", lambda: dense(s, torch.zeros(2, 3, n)), ["labels"])),
        st.sampled_from([-0.5, 1.5, math.nan, math.inf]).map(
            lambda v: ("labels outside [0, 1]", lambda: dense(s, torch.full((2, 3, 7), v)),
                       ["labels"])),
        st.text(max_size=5).filter(lambda r: r not in ("mean", "sum", "none")).map(
            lambda r: ("reduction", lambda: dense(s, torch.zeros_like(s), r), ["reduction"])),
        st.integers(0, 5).map(lambda n: 2 * n + 1).map(
            lambda d: ("rope's odd D", lambda: seqfuse.rope(torch.zeros(2, 5, 3, d)), ["D"])),
        st.sampled_from([0.0, -1.0, math.nan, math.inf]).map(
            lambda b: ("base", lambda: seqfuse.rope(q, base=b), ["base"])),
        st.integers(1, 9).filter(lambda n: n != 5).map(
            lambda n: ("positions' L", lambda: seqfuse.rope(q, torch.arange(n)), ["positions"])),
    ]
    if not cuda:  # the CUDA kernels take the half types
        bad.append(st.sampled_from([torch.float16, torch.bfloat16]).map(
            lambda d: ("half q on CPU", gp(scores, q=q.to(d), k=q.to(d)), ["q must be"])))
    return st.one_of(*bad)


def bad_gp_calls_raise(device):
    bad_calls_raise(_bad_calls(device), device)


@pytest.mark.parametrize("device", ["cpu", "emulated"])
def test_global_pointer_bad_parameters_raise_clear_errors(device):
    run_child("test_property_global_pointer", "bad_gp_calls_raise", device)
