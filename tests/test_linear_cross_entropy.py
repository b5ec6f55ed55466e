"""linear_sparse_softmax_cross_entropy against the unfused pair it replaces,
sparse_softmax_cross_entropy(hidden @ weight.T + bias), computed in float64 on CPU and
on the emulated CUDA device; the loss, and the gradients of hidden, weight and bias."""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap

import pytest
import torch

import seqfuse
from seqfuse import reference
from conftest import DEVICES, assert_close, runs_cuda_kernels

OP = seqfuse.linear_sparse_softmax_cross_entropy


def _dtype(device):
    """float64 on CPU; float32 where the CUDA kernels run (they have no float64)."""
    return torch.float32 if runs_cuda_kernels(device) else torch.float64


def _problem(N, D, V, *, dtype=torch.float64, bias=True, ignored=0.0, integers=False):
    """float64 hidden [N, D], weight [V, D], bias [V] and target [N] (a share of rows set
    to ignore_index). Integer-valued inputs make every logit exact in any dtype."""
    def draw(*shape):
        if integers:
            return torch.randint(-3, 4, shape).double()
        return torch.randn(*shape, dtype=torch.float64).to(dtype).double()
    hidden, weight = draw(N, D), draw(V, D)
    b = draw(V) if bias else None
    target = torch.randint(0, V, (N,))
    target[torch.rand(N) < ignored] = -100
    return hidden, weight, b, target


def _run(fn, hidden, weight, bias, target, k, *, device="cpu", dtype=torch.float64, **kw):
    """fn's loss and the gradients of hidden, weight and bias under a random incoming
    gradient (the same for every fn: drawn from a generator seeded by the caller)."""
    leaves = [t.detach().to(device, dtype, copy=True).requires_grad_() if t is not None else None
              for t in (hidden, weight, bias)]
    loss = fn(leaves[0], leaves[1], target.to(device), k, bias=leaves[2], **kw)
    gen = torch.Generator().manual_seed(1234)
    g = torch.rand(loss.shape, generator=gen, dtype=torch.float64) + 0.5
    (loss * g.to(loss.device, loss.dtype)).sum().backward()
    return loss, [t.grad if t is not None else None for t in leaves]


def _assert_matches(got, want, dtype, **kw):
    (loss, grads), (loss_ref, grads_ref) = got, want
    assert_close(loss, loss_ref, dtype, **kw)
    for g, g_ref in zip(grads, grads_ref):
        if g_ref is None:
            assert g is None
        else:
            assert g.dtype == dtype
            assert_close(g, g_ref, dtype, **kw)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("k", [1, 7, 130, 300, 301])
@pytest.mark.parametrize("chunk_size", [None, 1, 64])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_matches_the_unfused_pair(device, k, chunk_size, reduction):
    # V = 301 is prime: no chunk width divides it; k = 300 and 301 are V - 1 and V (the
    # dense path); chunk_size = 1 means chunks of k columns.
    dtype = _dtype(device)
    hidden, weight, bias, target = _problem(37, 19, 301, dtype=dtype, ignored=0.2)
    got = _run(OP, hidden, weight, bias, target, k, device=device, dtype=dtype,
               reduction=reduction, chunk_size=chunk_size)
    want = _run(reference.linear_sparse_softmax_cross_entropy, hidden, weight, bias, target, k,
                reduction=reduction)
    assert got[0].dtype == dtype and got[0].shape == want[0].shape
    _assert_matches(got, want, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(1, 5, 2), (1, 1, 1), (3, 1, 40), (5, 17, 1)])
def test_small_shapes(device, shape):
    N, D, V = shape
    dtype = _dtype(device)
    hidden, weight, bias, target = _problem(N, D, V, dtype=dtype)
    for k in sorted({1, V}):
        got = _run(OP, hidden, weight, bias, target, k, device=device, dtype=dtype,
                   reduction="none")
        want = _run(reference.linear_sparse_softmax_cross_entropy, hidden, weight, bias, target,
                    k, reduction="none")
        _assert_matches(got, want, dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_leading_dims_and_non_contiguous_inputs(device):
    dtype = _dtype(device)
    hidden, weight, bias, target = _problem(2 * 3 * 5, 12, 90, dtype=dtype)
    h = hidden.view(5, 3, 2, 12).transpose(0, 2).to(device, dtype)   # [2, 3, 5, 12], strided
    W = weight.t().contiguous().t().to(device, dtype)                 # [90, 12], column-major
    t = target.view(5, 3, 2).transpose(0, 2).to(device)
    assert not h.is_contiguous() and not W.is_contiguous()
    loss = OP(h, W, t, 9, bias=bias.to(device, dtype), reduction="none")
    assert loss.shape == (2, 3, 5)
    loss_ref = reference.linear_sparse_softmax_cross_entropy(
        h.double(), W.double(), t, 9, bias=bias.to(device), reduction="none")
    assert_close(loss, loss_ref, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("k", [3, 4, 5, 12])
def test_ties_at_the_cut(device, k):
    # Every weight row repeats four times, at positions far apart (so in different
    # chunks): each logit value is held four times and the cut falls inside a group
    # for k = 3, 5. Integer inputs make the ties exact in every dtype; the lower index
    # must win, which the weight gradient shows (it names the kept rows).
    dtype = _dtype(device)
    hidden, base, bias, target = _problem(11, 6, 16, integers=True)
    weight = base.repeat(4, 1)                                   # row v = row v + 16 j
    bias = bias.repeat(4)
    target = torch.randint(0, 64, (11,))
    for chunk_size in (None, 5, 16, 17):
        got = _run(OP, hidden, weight, bias, target, k, device=device, dtype=dtype,
                   chunk_size=chunk_size)
        want = _run(reference.linear_sparse_softmax_cross_entropy, hidden, weight, bias,
                    target, k)
        _assert_matches(got, want, dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_target_in_and_out_of_the_top_k(device):
    dtype = _dtype(device)
    hidden, weight, bias, target = _problem(8, 10, 50, dtype=dtype)
    logits = torch.nn.functional.linear(hidden, weight, bias)
    order = logits.argsort(-1, descending=True)
    target = torch.where(torch.arange(8) % 2 == 0, order[:, 0], order[:, -1])  # best, worst
    loss, (dh, dW, db) = _run(OP, hidden, weight, bias, target, 4, device=device, dtype=dtype,
                              reduction="none")
    want = _run(reference.linear_sparse_softmax_cross_entropy, hidden, weight, bias, target, 4,
                reduction="none")
    _assert_matches((loss, (dh, dW, db)), want, dtype)
    assert torch.isfinite(loss).all()
    assert (loss[0::2] < loss[1::2]).all()  # an out-of-top-k target costs more


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("k", [3, 40])
def test_ignored_rows_have_no_loss_and_no_gradient(device, k):
    dtype = _dtype(device)
    hidden, weight, bias, target = _problem(6, 7, 40, dtype=dtype)
    target[[1, 4]] = -100
    hidden[1] = float("nan")  # an ignored row's hidden state reaches no gradient
    loss, (dh, dW, db) = _run(OP, hidden, weight, bias, target, k, device=device, dtype=dtype,
                              reduction="none")
    assert torch.equal(loss[[1, 4]].cpu(), torch.zeros(2, dtype=dtype))
    assert torch.equal(dh[[1, 4]].cpu(), torch.zeros(2, 7, dtype=dtype))
    assert torch.isfinite(dW).all() and torch.isfinite(db).all()
    keep = target != -100
    want = _run(reference.linear_sparse_softmax_cross_entropy, hidden[keep], weight, bias,
                target[keep], k, reduction="none")
    assert_close(loss[keep], want[0], dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_every_row_ignored(device):
    dtype = _dtype(device)
    hidden, weight, bias, target = _problem(4, 5, 30, dtype=dtype)
    target[:] = -100
    for reduction in ("mean", "sum", "none"):
        loss, grads = _run(OP, hidden, weight, bias, target, 3, device=device, dtype=dtype,
                           reduction=reduction)
        loss_ref, _ = _run(reference.linear_sparse_softmax_cross_entropy, hidden, weight, bias,
                           target, 3, reduction=reduction)
        assert_close(loss, loss_ref, dtype, equal_nan=True)  # mean: 0 / 0
        for g in grads:
            assert torch.equal(g, torch.zeros_like(g))


@pytest.mark.parametrize("device", DEVICES)
def test_no_bias(device):
    dtype = _dtype(device)
    hidden, weight, _, target = _problem(9, 8, 70, dtype=dtype, bias=False)
    for k in (5, 70):
        got = _run(OP, hidden, weight, None, target, k, device=device, dtype=dtype,
                   chunk_size=16)
        want = _run(reference.linear_sparse_softmax_cross_entropy, hidden, weight, None, target,
                    k)
        _assert_matches(got, want, dtype)


def _rounding_bounds(hidden, weight, bias, target, k, dtype):
    """Per-element error bounds for the gradients in a half dtype: the logits' gradient
    dl is rounded to `dtype` before its products with the operands (the dense path), so
    an entry may be off by the dtype's unit roundoff times the sum of its terms'
    magnitudes (|dl| @ |W| for hidden, |dl|^T @ |hidden| for weight, the column sums of
    |dl| for bias), on top of the rounding of the result itself."""
    logits = (hidden @ weight.T + (bias if bias is not None else 0)).requires_grad_()
    loss = reference.sparse_softmax_cross_entropy(logits, target, k, reduction="none")
    gen = torch.Generator().manual_seed(1234)  # the incoming gradient _run draws
    g = torch.rand(loss.shape, generator=gen, dtype=torch.float64) + 0.5
    (dl,) = torch.autograd.grad((loss * g).sum(), logits)
    unit = torch.finfo(dtype).eps  # twice the unit roundoff: a margin for the sums
    return [unit * dl.abs() @ weight.abs(), unit * dl.abs().T @ hidden.abs(),
            unit * dl.abs().sum(0)]


@pytest.mark.parametrize("device", [d for d in DEVICES if d != "cpu"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(device, dtype):
    # Integer inputs: the logits are exact in both half types, so the top k cannot
    # differ from the float64 reference by rounding; the loss comes back in float32.
    hidden, weight, bias, target = _problem(13, 8, 97, integers=True, ignored=0.2)
    rtol = torch.finfo(dtype).eps  # the result's own rounding, with a margin of 2
    for k in (6, 97):
        loss, grads = _run(OP, hidden, weight, bias, target, k, device=device, dtype=dtype,
                           chunk_size=32, reduction="none")
        assert loss.dtype == torch.float32
        want = _run(reference.linear_sparse_softmax_cross_entropy, hidden, weight, bias, target,
                    k, reduction="none")
        assert_close(loss, want[0], dtype)
        bounds = _rounding_bounds(hidden, weight, bias, target, k, dtype)
        for name, g, g_ref, bound in zip(("hidden", "weight", "bias"), grads, want[1], bounds):
            assert g.dtype == dtype
            err = (g.double().cpu() - g_ref).abs()
            allowed = bound + rtol * g_ref.abs() + 1e-6
            worst = (err / allowed).max().item()
            assert worst <= 1, f"k={k}: d{name} off by {worst:.2f}x its rounding bound"


@pytest.mark.parametrize("device", DEVICES)
def test_large_logits_and_special_values(device):
    # Logits near float32's overflow range keep the loss finite. A +inf logit (bias[7])
    # makes every loss +inf, as the reference's (NaN where the target is the +inf
    # itself); NaN hidden states in row 2 make that row NaN and no other.
    dtype = _dtype(device)
    hidden, weight, bias, target = _problem(5, 4, 60, dtype=dtype)
    bias[7] = 1e30
    got = _run(OP, hidden * 1e3, weight, bias, target, 5, device=device, dtype=dtype,
               reduction="none")
    want = _run(reference.linear_sparse_softmax_cross_entropy, hidden * 1e3, weight, bias,
                target, 5, reduction="none")
    assert torch.isfinite(got[0]).all()
    _assert_matches(got, want, dtype)
    bias[7] = float("inf")
    hidden[2] = float("nan")
    target[target == 7] = 8
    target[3] = 7
    loss = OP(hidden.to(device, dtype), weight.to(device, dtype), target.to(device), 5,
              bias=bias.to(device, dtype), reduction="none")
    loss_ref = reference.linear_sparse_softmax_cross_entropy(hidden, weight, target, 5, bias=bias,
                                                             reduction="none")
    assert_close(loss, loss_ref, dtype, equal_nan=True)
    assert torch.isnan(loss[[2, 3]]).all() and torch.isposinf(loss[[0, 1, 4]]).all()


def test_gradcheck():
    hidden, weight, bias, target = _problem(5, 4, 13, ignored=0.2)
    leaves = [t.requires_grad_() for t in (hidden, weight, bias)]
    for k, chunk_size in ((3, 4), (13, 4), (1, None)):
        def fn(h, W, b):
            return OP(h, W, target, k, bias=b, reduction="none", chunk_size=chunk_size)
        assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("k", [4, 30])
def test_opcheck(k):
    hidden, weight, bias, target = _problem(6, 5, 30, ignored=0.2)
    ops = torch.ops.seqfuse
    args = (hidden.requires_grad_(), weight.requires_grad_(), bias.requires_grad_(), target, k,
            -100, 8)
    torch.library.opcheck(ops.linear_sparse_softmax_cross_entropy.default, args)
    loss, lse, probs, indices = ops.linear_sparse_softmax_cross_entropy(*args)
    backward_args = (torch.rand(6, dtype=torch.float64), hidden.detach(), weight.detach(),
                     bias.detach(), target, lse, probs, indices, k, -100, 8)
    torch.library.opcheck(ops.linear_sparse_softmax_cross_entropy_backward.default, backward_args)


def test_tied_embedding_module_compiles_fullgraph():
    # The module takes the embedding's parameter itself: its gradient is the sum of the
    # input lookup's and the head's, as with an nn.Linear tied to the embedding.
    V, D = 50, 8
    emb = torch.nn.Embedding(V, D).double()
    loss_fn = seqfuse.nn.LinearSparseSoftmaxCrossEntropyLoss(k=5)
    tokens = torch.randint(0, V, (3, 7))

    def step(module):
        emb.zero_grad()
        hidden = torch.tanh(emb(tokens[:, :-1]))
        loss = module(hidden, emb.weight, tokens[:, 1:])
        loss.backward()
        return loss.detach(), emb.weight.grad.clone()

    loss, grad = step(loss_fn)
    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    loss_c, grad_c = step(compiled)
    emb.zero_grad()
    hidden = torch.tanh(emb(tokens[:, :-1]))
    reference.linear_sparse_softmax_cross_entropy(hidden, emb.weight, tokens[:, 1:], 5).backward()
    assert_close(loss, loss_c)
    assert_close(grad, emb.weight.grad)
    assert_close(grad_c, emb.weight.grad)


def test_bad_inputs():
    hidden, weight, bias, target = _problem(4, 6, 20)
    with pytest.raises(ValueError, match="weight must be \\[V, D\\] with D = 6"):
        OP(hidden, weight[:, :5], target, 3)
    with pytest.raises(ValueError, match="bias must be \\[V\\] = \\[20\\]"):
        OP(hidden, weight, target, 3, bias=bias[:19])
    with pytest.raises(ValueError, match="target must be hidden's shape"):
        OP(hidden, weight, target[:3], 3)
    for k in (0, 21, -1):
        with pytest.raises(ValueError, match="k must be in \\[1, V\\] = \\[1, 20\\]"):
            OP(hidden, weight, target, k)
    with pytest.raises(TypeError, match="k must be an int"):
        OP(hidden, weight, target, 2.0)
    with pytest.raises(ValueError, match="target must hold class indices in \\[0, 20\\)"):
        OP(hidden, weight, torch.tensor([0, 20, 1, 2]), 3)
    with pytest.raises(ValueError, match="target must hold class indices"):
        OP(hidden, weight, torch.tensor([0, -1, 1, 2]), 3)
    with pytest.raises(RuntimeError, match="target must be an int64"):
        OP(hidden, weight, target.int(), 3)
    with pytest.raises(RuntimeError, match="target must be an int64"):
        OP(hidden, weight, target.double(), 3)
    with pytest.raises(RuntimeError, match="weight has dtype Float but hidden has dtype Double"):
        OP(hidden, weight.float(), target, 3)
    with pytest.raises(RuntimeError, match="weight is on meta but hidden is on cpu"):
        OP(hidden, weight.to("meta"), target, 3)
    with pytest.raises(RuntimeError, match="must be float32 or float64 on CPU"):
        OP(hidden.half(), weight.half(), target, 3)
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        OP(hidden, weight, target, 3, chunk_size=0)
    with pytest.raises(ValueError, match="reduction"):
        OP(hidden, weight, target, 3, reduction="avg")
    with pytest.raises(ValueError, match="k must be a positive int"):
        seqfuse.nn.LinearSparseSoftmaxCrossEntropyLoss(0)


def test_no_logits_tensor_is_ever_allocated():
    # N V = 2^27 logits would be 512 MB in float32; the op's peak extra memory (resident
    # set, in a fresh process, less the inputs and the gradients) must stay far below: its
    # chunk [N, k + 2048] is 17 MB, and about 18 MB is what it measures.
    script = textwrap.dedent("""
        import resource, torch, seqfuse
        N, D, V = 2048, 8, 65536
        h = torch.randn(N, D, requires_grad=True)
        W = torch.randn(V, D, requires_grad=True)
        t = torch.randint(0, V, (N,))
        def rss():
            return int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize()
        def hwm():  # the peak of this process image (ru_maxrss carries the parent's over exec)
            return 1024 * int(next(line.split()[1] for line in open("/proc/self/status")
                                   if line.startswith("VmHWM")))
        # a small call first: the code it runs is paged in before the measurement
        seqfuse.linear_sparse_softmax_cross_entropy(h[:8], W[:64], t[:8] % 64, 10).backward()
        h.grad = W.grad = None
        before = rss()
        seqfuse.linear_sparse_softmax_cross_entropy(h, W, t, 10).backward()
        peak = hwm()
        print(peak - before - 4 * (h.numel() + W.numel()))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         check=True)
    extra = int(out.stdout.split()[-1])
    assert extra < 64 * 2**20, f"{extra / 2**20:.0f} MB extra (the logits: 512 MB)"


def test_reference_is_exact_for_large_logits_and_leaves_ignored_rows_out():
    # The references took exp(x - lse) with lse = m + log s rounded (torch.logsumexp's
    # gradient): two tied logits of 2^24 gave p = 1/2 +- 4e-9, and a hidden gradient
    # W_a/2 + W_b/2 - W_t of 5e-6 where it is 0. And the LM-head reference multiplied
    # ignored rows into the logits: a NaN hidden state there reached the weight's
    # gradient as 0 * NaN. Both as the kernels have them now.
    hidden = torch.tensor([[4096.0], [math.nan]], dtype=torch.float64)
    weight = torch.tensor([[-4096.0], [4096.0], [4096.0]], dtype=torch.float64)
    target = torch.tensor([1, -100])
    for fn in (OP, reference.linear_sparse_softmax_cross_entropy):
        h, W = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        loss = fn(h, W, target, 2, reduction="none")
        dh, dW = torch.autograd.grad(loss.sum(), (h, W))
        assert_close(loss, torch.tensor([math.log(2.0), 0.0], dtype=torch.float64))
        assert torch.equal(dh, torch.zeros(2, 1, dtype=torch.float64)), fn
        assert_close(dW, torch.tensor([[0.0], [-2048.0], [2048.0]], dtype=torch.float64))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("k", [2, 3])  # the sparse path and the dense one (k = V)
def test_ignored_row_gets_no_gradient_from_a_nan_weight(device, k):
    # The dense path's hidden gradient G W gave an ignored row (G = 0) 0 * NaN = NaN
    # where the weight held a NaN; an ignored row has no gradient at all.
    dtype = _dtype(device)
    hidden = torch.randn(2, 4, dtype=torch.float64).to(device, dtype).requires_grad_()
    weight = torch.randn(3, 4, dtype=torch.float64)
    weight[1, 2] = math.nan
    weight = weight.to(device, dtype)
    loss = OP(hidden, weight, torch.tensor([0, -100], device=device), k, reduction="sum")
    (dh,) = torch.autograd.grad(loss, hidden)
    assert torch.equal(dh[1].cpu(), torch.zeros(4, dtype=dtype))


def test_weight_rows_outside_the_top_k_get_no_gradient_from_a_nan_row():
    # A NaN hidden state makes its row's logits NaN; its logit gradient is still 0 off
    # the top k and the target (the sparse path gathers only those rows), and so is the
    # weight gradient there. The reference's full product gave them 0 * NaN = NaN.
    hidden = torch.tensor([[math.nan, 1.0], [0.5, -1.0]], dtype=torch.float64)
    weight = torch.randn(5, 2, dtype=torch.float64)
    target = torch.tensor([0, 3])
    for fn in (OP, reference.linear_sparse_softmax_cross_entropy):
        W = weight.clone().requires_grad_()
        loss = fn(hidden, W, target, 1, reduction="none")
        (dW,) = torch.autograd.grad(loss[0], W)
        # NaN ranks first: Omega = {0}, which is also the target: only row 0 is touched.
        assert torch.isnan(dW[0]).all(), fn
        assert torch.equal(dW[1:], torch.zeros(4, 2, dtype=torch.float64)), fn


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("k", [4, 5])  # the sparse path and the dense one (k = V)
def test_infinite_hidden_state_with_the_target_kept(device, k):
    # h = -inf: logits -inf, and +inf where the weight is negative; the target (kept: the
    # +inf and then the -inf ties by index) has p = 0, so its weight row's gradient is
    # (p - 1) h = +inf. The sparse backward and the reference took the target's -1 apart
    # from its kept p: p h + (-1) h = 0 * -inf + inf = NaN (found by the thorough
    # property profile).
    dtype = _dtype(device)
    hidden = torch.tensor([[-math.inf], [-0.25]], dtype=dtype, device=device)
    weight = torch.tensor([[0.5], [0.25], [0.125], [0.75], [-0.5]], dtype=dtype, device=device)
    target = torch.tensor([1, 2], device=device)
    for fn in (OP, reference.linear_sparse_softmax_cross_entropy):
        W = weight.clone().requires_grad_()
        loss = fn(hidden, W, target, k, reduction="none")
        (dW,) = torch.autograd.grad(loss[0], W)
        assert loss[0].item() == math.inf, fn
        assert dW[1].item() == math.inf, fn  # the target's row
        assert torch.isnan(dW[[0, 2, 4]]).all(), fn  # 0 * -inf, and the +inf logit's NaN
        assert torch.isnan(dW[3]).all() if k == 5 else dW[3].item() == 0, fn  # kept or not


@pytest.mark.parametrize("device", DEVICES)
def test_mean_of_losses_near_the_max(device):
    # Logits of 2.25e38 (1.5e19 * 1.5e19): three losses whose float32 sum overflows and
    # whose mean does not (float32 on every device: its range is the point).
    hidden = torch.full((3, 1), 1.5e19, device=device, requires_grad=True)
    weight = torch.tensor([[1.5e19], [0.0], [-1.0]], device=device, requires_grad=True)
    target = torch.tensor([1, 1, 2], device=device)
    mean = OP(hidden, weight, target, 2)
    want = reference.linear_sparse_softmax_cross_entropy(
        hidden.detach().double().cpu(), weight.detach().double().cpu(), target.cpu(), 2)
    assert torch.isfinite(mean) and math.isclose(mean.item(), want.item(), rel_tol=1e-6)
    assert torch.isinf(OP(hidden, weight, target, 2, reduction="sum"))
    assert torch.isnan(OP(hidden[:0], weight, target[:0], 2))  # no rows: still 0 / 0
