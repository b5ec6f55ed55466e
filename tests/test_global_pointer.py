"""GlobalPointer: rope, global_pointer_scores, the multilabel losses, the fused loss and
the modules, against the plain-PyTorch references in float64."""

import math

import pytest
import torch

import seqfuse
from seqfuse import reference
from seqfuse.nn import EfficientGlobalPointer, GlobalPointer, global_pointer_decode
from seqfuse.reference.global_pointer import sparse_labels

from conftest import CUDA_DEVICES, DEVICES, assert_close

F64 = torch.float64
INF = float("inf")


def qk(B, L, H, D, device, dtype=F64, requires_grad=True):
    q = torch.randn(B, L, H, D, device=device, dtype=dtype)
    k = torch.randn(B, L, H, D, device=device, dtype=dtype)
    return q.requires_grad_(requires_grad), k.requires_grad_(requires_grad)


def padding_mask(B, L, device):
    """Random lengths in [1, L], one row left fully padded when B > 2."""
    lengths = torch.randint(1, L + 1, (B,), device=device)
    mask = (torch.arange(L, device=device) < lengths[:, None]).to(torch.int32)
    if B > 2:
        mask[-1] = 0
    return mask


def positives(B, H, L, P, device, mask_zero=True):
    idx = torch.randint(0, L * L, (B, H, P), device=device)
    if mask_zero and P > 1:
        idx[..., -1] = 0  # padding
    return idx


def grads_with(out, upstream, *inputs):
    return torch.autograd.grad(out, [x for x in inputs if x is not None], upstream)


def finite(t):
    """Replaces -inf (masked) by a large finite number so differences can be compared
    (in float64: -1e30 is out of float16's range)."""
    return t.double().masked_fill(torch.isinf(t), -1e30)


# ---- rope ---------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(2, 7, 3, 8), (3, 5, 6)])
@pytest.mark.parametrize("pos_kind", [None, "L", "BL"])
def test_rope_matches_reference(device, shape, pos_kind):
    x = torch.randn(shape, device=device, dtype=F64, requires_grad=True)
    B, L = shape[:2]
    positions = {None: None, "L": torch.randint(0, 5000, (L,), device=device),
                 "BL": torch.randint(0, 5000, (B, L), device=device)}[pos_kind]
    out = seqfuse.rope(x, positions, base=500.0)
    expected = reference.rope(x, positions, base=500.0)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert_close(out, expected, rtol=1e-10, atol=1e-10)  # angles up to 5000 rad
    up = torch.randn_like(out)
    assert_close(grads_with(out, up, x)[0], grads_with(expected, up, x)[0], rtol=1e-10, atol=1e-10)


def test_rope_is_a_rotation_and_gradchecks():
    x = torch.randn(2, 4, 2, 6, dtype=F64, requires_grad=True)
    out = seqfuse.rope(x)
    assert_close(out.norm(dim=-1), x.norm(dim=-1))
    assert_close(out[:, 0], x[:, 0])  # position 0 is not rotated
    assert torch.autograd.gradcheck(lambda t: seqfuse.rope(t, base=100.0), (x,))


def test_rope_float32_long_positions():
    x = torch.randn(1, 3, 2, 64)
    positions = torch.tensor([0, 100_000, 4_000_000])
    assert_close(seqfuse.rope(x, positions), reference.rope(x.double(), positions),
                 dtype=torch.float32)


# ---- scores -------------------------------------------------------------------------

SCORE_CASES = [
    # shared, rope, tril, masked, biases, scale
    (False, True, True, True, False, None),
    (False, False, False, False, True, 0.3),
    (False, True, False, True, True, None),
    (True, True, True, True, True, None),
    (True, False, True, False, True, 1.0),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shared, rope, tril, masked, biases, scale", SCORE_CASES)
def test_scores_match_reference(device, shared, rope, tril, masked, biases, scale):
    B, L, H, D = 3, 11, 4, 8
    q, k = qk(B, L, 1 if shared else H, D, device)
    mask = padding_mask(B, L, device) if masked else None
    bs = torch.randn(B, H, L, device=device, dtype=F64, requires_grad=True) if biases else None
    be = torch.randn(B, H, L, device=device, dtype=F64, requires_grad=True) if biases else None
    kw = dict(mask=mask, rope=rope, tril=tril, scale=scale, bias_start=bs, bias_end=be)
    out = seqfuse.global_pointer_scores(q, k, **kw)
    expected = reference.global_pointer_scores(q, k, **kw).expand(out.shape)
    assert out.shape == (B, H if (biases or not shared) else 1, L, L)
    assert torch.equal(torch.isneginf(out), torch.isneginf(expected))
    assert_close(finite(out), finite(expected))
    up = torch.randn_like(out)
    for got, want in zip(grads_with(out, up, q, k, bs, be), grads_with(expected, up, q, k, bs, be)):
        assert_close(got, want)


def test_scores_gradcheck():
    q, k = qk(2, 5, 2, 4, "cpu")
    bs = torch.randn(2, 2, 5, dtype=F64, requires_grad=True)
    be = torch.randn(2, 2, 5, dtype=F64, requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])

    def fn(q, k, bs, be):  # -inf entries have no gradient; gradcheck needs finite outputs
        return finite(seqfuse.global_pointer_scores(q, k, mask=mask, bias_start=bs, bias_end=be))

    assert torch.autograd.gradcheck(fn, (q, k, bs, be))
    assert torch.autograd.gradcheck(
        lambda q, k, bs: finite(seqfuse.global_pointer_scores(q, k, bias_start=bs)),
        (q[:, :, :1].detach().requires_grad_(), k[:, :, :1].detach().requires_grad_(), bs))


def test_scores_float32_matches_float64():
    q, k = qk(2, 70, 3, 64, "cpu", torch.float32, requires_grad=False)
    out = seqfuse.global_pointer_scores(q, k, tril=False)
    assert_close(out, reference.global_pointer_scores(q.double(), k.double(), tril=False),
                 dtype=torch.float32, atol=1e-4)


# ---- losses on materialised scores --------------------------------------------------

def loss_scores(shape, device, masked_fraction=0.2):
    s = 3 * torch.randn(shape, device=device, dtype=F64)
    s = s.masked_fill(torch.rand(shape, device=device) < masked_fraction, -INF)
    return s.requires_grad_()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("soft", [False, True])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_dense_loss_matches_reference(device, soft, reduction):
    s = loss_scores((3, 4, 37), device)
    labels = torch.rand(s.shape, device=device, dtype=F64) if soft else \
        (torch.rand(s.shape, device=device) < 0.2).to(torch.int64)
    out = seqfuse.multilabel_categorical_crossentropy(s, labels, reduction)
    expected = reference.multilabel_categorical_crossentropy(s, labels, reduction)
    assert out.shape == ((3, 4) if reduction == "none" else ())
    assert_close(out, expected)
    up = torch.randn_like(out)
    assert_close(grads_with(out, up, s)[0], grads_with(expected, up, s)[0])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mask_zero", [False, True])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_sparse_loss_matches_reference(device, mask_zero, reduction):
    s = loss_scores((2, 3, 50), device)
    idx = torch.randint(0, 50, (2, 3, 6), device=device)
    idx[0, 0, :2] = idx[0, 0, 2]  # repeated positives count once
    if mask_zero:
        idx[..., -2:] = 0
    out = seqfuse.sparse_multilabel_categorical_crossentropy(s, idx, mask_zero, reduction)
    expected = reference.sparse_multilabel_categorical_crossentropy(s, idx, mask_zero, reduction)
    assert_close(out, expected)
    up = torch.randn_like(out)
    assert_close(grads_with(out, up, s)[0], grads_with(expected, up, s)[0])
    # the same as the dense loss on the scattered labels (mask_zero: slot 0 masked too)
    labels = sparse_labels(s, idx, mask_zero)
    dense_scores = s.detach().clone()
    if mask_zero:
        dense_scores[..., 0] = -INF
    assert_close(out, seqfuse.multilabel_categorical_crossentropy(dense_scores, labels, reduction))


def bert4keras_sparse_mce(y_pred, y_true, mask_zero):
    """bert4keras' sparse_multilabel_categorical_crossentropy restated line by line in
    torch: an appended 0 for the "1 +", and with mask_zero slot 0 set to +inf for the
    positives' gather and to -inf for the all-term, so index 0 is ignored entirely."""
    zeros = torch.zeros_like(y_pred[..., :1])
    y_pred = torch.cat([y_pred, zeros], -1)
    if mask_zero:
        infs = zeros + INF
        y_pred = torch.cat([infs, y_pred[..., 1:]], -1)
    y_pos_2 = torch.gather(y_pred, -1, y_true)
    y_pos_1 = torch.cat([y_pos_2, zeros], -1)
    if mask_zero:
        y_pred = torch.cat([-infs, y_pred[..., 1:]], -1)
        y_pos_2 = torch.gather(y_pred, -1, y_true)
    pos_loss = torch.logsumexp(-y_pos_1, -1)
    all_loss = torch.logsumexp(y_pred, -1)
    aux_loss = torch.logsumexp(y_pos_2, -1) - all_loss
    aux_loss = torch.clamp(1 - torch.exp(aux_loss), 1e-7, 1)
    return pos_loss + all_loss + torch.log(aux_loss)


def distinct_positives(rows, N, P, mask_zero, pad, device):
    """P distinct positives per row (never 0 under mask_zero), then `pad` padding zeros."""
    first = 1 if mask_zero else 0
    idx = torch.stack([torch.randperm(N - first, device=device)[:P] + first for _ in range(rows)])
    return torch.cat([idx, idx.new_zeros(rows, pad)], -1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mask_zero", [False, True])
def test_sparse_loss_mask_zero_matches_bert4keras(device, mask_zero):
    # Scores of moderate size, so bert4keras' cancelling formula is still exact in
    # float64; slot 0 scores high, so counting it as a negative would show.
    s = torch.randn(6, 40, device=device, dtype=F64)
    s[:, 0] = 8.0
    # Positives drawn away from slot 0 in both cases (True below), so that slot 0 is a
    # positive only in row 0 without mask_zero, and only once.
    idx = distinct_positives(6, 40, 4, True, 2 if mask_zero else 0, device)
    if not mask_zero:
        # Without mask_zero, index 0 is an ordinary positive; a moderate one, since a
        # dominant positive is exactly where bert4keras' formula cancels.
        idx[0, 0] = 0
        s[0, 0] = 0.5
    s.requires_grad_()
    expected = bert4keras_sparse_mce(s, idx, mask_zero)
    up = torch.randn_like(expected)
    (want,) = grads_with(expected, up, s)
    for fn in (reference.sparse_multilabel_categorical_crossentropy,
               seqfuse.sparse_multilabel_categorical_crossentropy):
        out = fn(s, idx, mask_zero, "none")
        assert_close(out, expected, rtol=1e-10, atol=1e-10)
        (got,) = grads_with(out, up, s)
        assert_close(got, want, rtol=1e-10, atol=1e-10)
        if mask_zero:
            assert (got[:, 0] == 0).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mask_zero", [False, True])
@pytest.mark.parametrize("L, shared", [(9, False), (70, True)])
def test_fused_loss_mask_zero_ignores_span_00(device, mask_zero, L, shared):
    # Span (0, 0) scores high; under mask_zero it is neither positive nor negative.
    B, H, D = 2, 3, 8
    q, k = qk(B, L, 1 if shared else H, D, device)
    bs = torch.randn(B, H, L, device=device, dtype=F64)
    bs[:, :, 0] = 10.0
    bs.requires_grad_()
    be = torch.randn(B, H, L, device=device, dtype=F64, requires_grad=True)
    mask = torch.ones(B, L, dtype=torch.int64, device=device)
    mask[1, L // 2:] = 0
    idx = positives(B, H, L, 4, device, mask_zero)
    kw = dict(mask=mask, bias_start=bs, bias_end=be)
    out = seqfuse.global_pointer_loss(q, k, idx, mask_zero=mask_zero, reduction="none", **kw)
    scores = seqfuse.global_pointer_scores(q, k, **kw).flatten(-2)
    assert (scores[..., 0] > 5).all()
    via = seqfuse.sparse_multilabel_categorical_crossentropy(scores, idx, mask_zero, "none")
    expected = reference.global_pointer_loss(q, k, idx, mask_zero=mask_zero, reduction="none",
                                             **kw)
    assert_close(out, expected, rtol=1e-10, atol=1e-10)
    assert_close(via, expected, rtol=1e-10, atol=1e-10)
    up = torch.randn_like(out)
    for got, want in zip(grads_with(out, up, q, k, bs, be), grads_with(expected, up, q, k, bs, be)):
        assert_close(got, want, rtol=1e-10, atol=1e-10)
    (grad_scores,) = torch.autograd.grad(via, scores, up)
    if mask_zero:
        assert (grad_scores[..., 0] == 0).all()
        # dropping the high (0, 0) score entirely gives the same loss
        dropped = scores.detach().clone()
        dropped[..., 0] = -INF
        assert_close(out, seqfuse.sparse_multilabel_categorical_crossentropy(
            dropped, idx, True, "none"), rtol=1e-10, atol=1e-10)
    else:
        assert (grad_scores[..., 0] != 0).all()


def test_losses_gradcheck():
    s = loss_scores((3, 9), "cpu", masked_fraction=0.0)
    labels = torch.rand(3, 9, dtype=F64)
    idx = torch.randint(0, 9, (3, 3))
    assert torch.autograd.gradcheck(
        lambda s: seqfuse.multilabel_categorical_crossentropy(s, labels, "none"), (s,))
    assert torch.autograd.gradcheck(
        lambda s: seqfuse.sparse_multilabel_categorical_crossentropy(s, idx, False, "none"), (s,))


def test_sparse_loss_exact_where_the_textbook_formula_fails():
    # One dominant positive: lse_all - lse_pos cancels in float32 and the textbook
    # negative term comes out negative.
    s = torch.full((1, 16), -30.0)
    s[0, 3] = 15.0
    idx = torch.tensor([[3]])
    exact = reference.sparse_multilabel_categorical_crossentropy(s.double(), idx, False, "none")
    textbook = reference.sparse_multilabel_categorical_crossentropy_textbook(s, idx, False, "none")
    assert textbook.item() < 0
    out = seqfuse.sparse_multilabel_categorical_crossentropy(s, idx, False, "none")
    assert out.item() > 0
    assert_close(out, exact, dtype=torch.float32, atol=0)
    # A positive on a masked span (padding): the textbook loss is inf with NaN gradients;
    # seqfuse ignores the -inf entry.
    s = torch.tensor([[-INF, 0.5, -INF, -1.0]], requires_grad=True)
    idx = torch.tensor([[2]])
    textbook = reference.sparse_multilabel_categorical_crossentropy_textbook(s, idx, False, "sum")
    textbook.backward()
    assert torch.isinf(textbook) and torch.isnan(s.grad).any()
    out = seqfuse.sparse_multilabel_categorical_crossentropy(s, idx, False, "sum")
    (g,) = torch.autograd.grad(out, s)
    assert torch.isfinite(out) and out.item() >= 0 and torch.isfinite(g).all()
    exact = torch.log1p(torch.tensor(math.exp(0.5) + math.exp(-1.0)))
    assert_close(out, exact, dtype=torch.float32)


# ---- the fused loss -----------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("L", [1, 9, 70, 130])
@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_fused_loss_equals_sparse_loss_on_scores(device, L, shared, reduction):
    B, H, D = 3, 3, 8
    q, k = qk(B, L, 1 if shared else H, D, device)
    mask = padding_mask(B, L, device)
    bs = torch.randn(B, H, L, device=device, dtype=F64, requires_grad=True)
    be = torch.randn(B, H, L, device=device, dtype=F64, requires_grad=True) if shared else None
    idx = positives(B, H, L, 5, device)
    kw = dict(mask=mask, bias_start=bs, bias_end=be)
    out = seqfuse.global_pointer_loss(q, k, idx, reduction=reduction, **kw)
    scores = seqfuse.global_pointer_scores(q, k, **kw)
    via_scores = seqfuse.sparse_multilabel_categorical_crossentropy(scores.flatten(-2), idx, True,
                                                                    reduction)
    expected = reference.global_pointer_loss(q, k, idx, reduction=reduction, **kw)
    assert out.shape == ((B, H) if reduction == "none" else ())
    assert_close(out, expected, rtol=1e-10, atol=1e-10)
    assert_close(via_scores, expected, rtol=1e-10, atol=1e-10)
    if reduction == "none":
        assert (out[-1] == 0).all()  # the fully padded sentence
    up = torch.randn_like(out)
    for got, via, want in zip(grads_with(out, up, q, k, bs, be),
                              grads_with(via_scores, up, q, k, bs, be),
                              grads_with(expected, up, q, k, bs, be)):
        assert_close(got, want, rtol=1e-10, atol=1e-10)
        assert_close(via, want, rtol=1e-10, atol=1e-10)


def test_fused_loss_options_and_gradcheck():
    q, k = qk(2, 6, 2, 4, "cpu")
    be = torch.randn(2, 2, 6, dtype=F64, requires_grad=True)
    idx = torch.randint(0, 36, (2, 2, 4))
    for rope, tril, mask_zero in [(False, False, False), (True, False, True), (False, True, False)]:
        kw = dict(rope=rope, tril=tril, scale=0.7, bias_end=be, mask_zero=mask_zero,
                  reduction="sum")
        out = seqfuse.global_pointer_loss(q, k, idx, **kw)
        assert_close(out, reference.global_pointer_loss(q, k, idx, **kw), rtol=1e-10, atol=0)
    assert torch.autograd.gradcheck(
        lambda q, k, be: seqfuse.global_pointer_loss(q, k, idx, bias_end=be, reduction="none"),
        (q, k, be))


def test_fused_loss_float32():
    q, k = qk(2, 100, 3, 64, "cpu", torch.float32, requires_grad=False)
    idx = positives(2, 3, 100, 8, "cpu")
    out = seqfuse.global_pointer_loss(q, k, idx, reduction="none")
    assert_close(out, reference.global_pointer_loss(q.double(), k.double(), idx, reduction="none"),
                 dtype=torch.float32)
    assert (out >= 0).all()


# Shapes the tiled kernels handle at their edges: odd D without rope (the CUDA prologue
# copies D in pairs), D spanning several head-dim chunks and tiles (40 > 32, not a
# multiple of 16), and GPLinker's many heads over one shared q/k, with L not a multiple
# of any tile.
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("B, L, Hqk, H, D, rope", [
    (2, 19, 2, 2, 5, False),
    (2, 37, 2, 2, 40, True),
    (1, 67, 1, 98, 8, True),
])
def test_scores_and_fused_loss_edge_shapes(device, B, L, Hqk, H, D, rope):
    q, k = qk(B, L, Hqk, D, device)
    mask = padding_mask(B, L, device)
    bs = torch.randn(B, H, L, device=device, dtype=F64, requires_grad=True)
    be = torch.randn(B, H, L, device=device, dtype=F64, requires_grad=True)
    kw = dict(mask=mask, rope=rope, bias_start=bs, bias_end=be)
    out = seqfuse.global_pointer_scores(q, k, **kw)
    expected = reference.global_pointer_scores(q, k, **kw)
    assert torch.equal(torch.isneginf(out), torch.isneginf(expected))
    assert_close(finite(out), finite(expected))
    up = torch.randn_like(out)
    for got, want in zip(grads_with(out, up, q, k, bs, be), grads_with(expected, up, q, k, bs, be)):
        assert_close(got, want)
    idx = positives(B, H, L, 5, device)
    loss = seqfuse.global_pointer_loss(q, k, idx, reduction="none", **kw)
    want = reference.global_pointer_loss(q, k, idx, reduction="none", **kw)
    assert_close(loss, want, rtol=1e-10, atol=1e-10)
    up = torch.randn_like(loss)
    for got, ref in zip(grads_with(loss, up, q, k, bs, be), grads_with(want, up, q, k, bs, be)):
        assert_close(got, ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("device", DEVICES)
def test_nan_stays_in_its_row(device):
    q, k = qk(2, 9, 3, 8, device, requires_grad=False)
    q[0, 2, 1, 0] = float("nan")
    idx = positives(2, 3, 9, 4, device)
    loss = seqfuse.global_pointer_loss(q, k, idx, reduction="none")
    assert torch.isnan(loss[0, 1]) and torch.isfinite(loss[1]).all()
    assert torch.isfinite(loss[0, [0, 2]]).all()
    s = loss_scores((3, 20), device)
    s.detach()[1, 5] = float("nan")
    row_idx = torch.randint(0, 20, (3, 4), device=device)
    terms = seqfuse.sparse_multilabel_categorical_crossentropy(s, row_idx, reduction="none")
    assert torch.isnan(terms[1]) and torch.isfinite(terms[[0, 2]]).all()


def assert_same_values_and_specials(actual, expected, **tol):
    """actual equals expected, with NaN and +-inf at exactly the same entries."""
    actual, expected = actual.detach().cpu(), expected.detach().cpu()
    assert torch.equal(torch.isnan(actual), torch.isnan(expected))
    assert torch.equal(torch.isinf(actual), torch.isinf(expected))
    assert_close(actual, expected, equal_nan=True, **tol)


# Score rows with several +inf terms in one sum (and one with none), and hard labels.
PLUS_INF_SCORES = [
    [0.5, INF, 2.0, INF, -1.0],     # two +inf negatives
    [-INF, INF, INF, 0.3, INF],     # three, beside a masked entry
    [INF, INF, -0.5, INF, 1.0],     # a +inf positive (adds e^-inf = 0) among them
    [1.0, -2.0, INF, 0.5, 0.0],     # one
    [0.2, 1.1, -0.4, 3.0, -1.5],    # none
]
PLUS_INF_LABELS = [[0, 0, 0, 0, 1], [0, 0, 0, 1, 0], [1, 0, 0, 0, 1], [0, 1, 0, 0, 0],
                   [0, 1, 0, 0, 1]]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("soft", [False, True])
def test_dense_loss_plus_inf_terms(device, soft):
    # log(1 + sum e^s) over terms with two or more +inf is +inf, not e^(inf - inf) = NaN;
    # the gradient e^(s - inf) is then NaN at the +inf negatives and 0 at the other
    # negatives, as the reference's autograd gives (a +inf positive adds e^-inf = 0).
    s = torch.tensor(PLUS_INF_SCORES, device=device, dtype=F64, requires_grad=True)
    labels = torch.tensor(PLUS_INF_LABELS, device=device)
    if soft:
        labels = torch.rand(s.shape, device=device, dtype=F64)
    out = seqfuse.multilabel_categorical_crossentropy(s, labels, "none")
    expected = reference.multilabel_categorical_crossentropy(s, labels, "none")
    assert torch.isinf(expected[:4]).all() and torch.isfinite(expected[4])
    assert_same_values_and_specials(out, expected)
    up = torch.randn_like(out)
    grad, grad_ref = grads_with(out, up, s)[0], grads_with(expected, up, s)[0]
    assert torch.equal(torch.isnan(grad_ref), (s.detach() == INF) & (labels < 1))
    assert_same_values_and_specials(grad, grad_ref)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mask_zero", [False, True])
def test_sparse_loss_plus_inf_terms(device, mask_zero):
    s = torch.tensor(PLUS_INF_SCORES, device=device, dtype=F64, requires_grad=True)
    # The positives of PLUS_INF_LABELS; with mask_zero, 0 is padding and slot 0 is ignored.
    idx = torch.tensor([[4, 4], [3, 0], [0, 4], [1, 1], [1, 4]], device=device)
    out = seqfuse.sparse_multilabel_categorical_crossentropy(s, idx, mask_zero, "none")
    expected = reference.sparse_multilabel_categorical_crossentropy(s, idx, mask_zero, "none")
    assert torch.isinf(expected[:2]).all()
    assert_same_values_and_specials(out, expected)
    up = torch.randn_like(out)
    assert_same_values_and_specials(grads_with(out, up, s)[0],
                                    grads_with(expected, up, s)[0])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("L", [9, 70])
@pytest.mark.parametrize("shared", [False, True])
def test_fused_loss_plus_inf_scores(device, L, shared):
    # A +inf start bias makes every unmasked score of its row +inf: that (b, h)'s loss is
    # +inf, and only the gradients that touch a +inf score are NaN (the +inf row of q,
    # the columns of k and bias_end it reaches, its bias_start); the rest match the
    # reference, which is finite there, and other (b, h) stay as they were.
    B, H, D = 2, 3, 8
    q, k = qk(B, L, 1 if shared else H, D, device)
    bs = torch.randn(B, H, L, device=device, dtype=F64)
    bs[0, 1, 2] = INF        # L - 2 unmasked +inf scores in row 2
    bs[1, 2, L - 1] = INF    # a single +inf score (tril: row L - 1 holds only (L-1, L-1))
    bs.requires_grad_()
    be = torch.randn(B, H, L, device=device, dtype=F64, requires_grad=True) if shared else None
    idx = positives(B, H, L, 5, device)
    single = idx[1, 2]
    single[single == L * L - 1] = 0  # keeps the single +inf a negative (0 is padding)
    kw = dict(bias_start=bs, bias_end=be)
    out = seqfuse.global_pointer_loss(q, k, idx, reduction="none", **kw)
    expected = reference.global_pointer_loss(q, k, idx, reduction="none", **kw)
    assert torch.isinf(expected[0, 1]) and torch.isinf(expected[1, 2])
    assert torch.isfinite(expected[0, [0, 2]]).all() and torch.isfinite(expected[1, :2]).all()
    assert_same_values_and_specials(out, expected, rtol=1e-10, atol=1e-10)
    up = torch.rand_like(out) + 0.5
    got = grads_with(out, up, q, k, bs, be)
    want = grads_with(expected, up, q, k, bs, be)
    assert torch.isnan(want[0]).any() and not torch.isnan(want[0]).all()
    for a, b in zip(got, want):
        assert_same_values_and_specials(a, b, rtol=1e-10, atol=1e-10)


# ---- empty inputs, bad inputs, registration -----------------------------------------

def test_empty_inputs():
    q, k = qk(0, 5, 2, 4, "cpu")
    assert seqfuse.global_pointer_scores(q, k).shape == (0, 2, 5, 5)
    q, k = qk(2, 0, 2, 4, "cpu")
    assert seqfuse.global_pointer_scores(q, k).shape == (2, 2, 0, 0)
    no_positives = torch.zeros(2, 2, 0, dtype=torch.long)
    loss = seqfuse.global_pointer_loss(q, k, no_positives, reduction="none")
    assert loss.shape == (2, 2) and (loss == 0).all()
    assert seqfuse.rope(torch.randn(0, 3, 4)).shape == (0, 3, 4)
    s = torch.randn(0, 7)
    assert seqfuse.multilabel_categorical_crossentropy(s, s, "none").shape == (0,)
    assert seqfuse.sparse_multilabel_categorical_crossentropy(
        s, torch.zeros(0, 2, dtype=torch.long), reduction="sum") == 0


@pytest.mark.parametrize("device", DEVICES)
def test_no_heads_forward_and_backward(device):
    q, k = qk(2, 5, 0, 4, device)
    scores = seqfuse.global_pointer_scores(q, k)
    assert scores.shape == (2, 0, 5, 5)
    gq, gk = torch.autograd.grad(scores.sum(), (q, k))
    assert gq.shape == q.shape and gk.shape == k.shape
    loss = seqfuse.global_pointer_loss(q, k, torch.zeros(2, 0, 1, dtype=torch.long, device=device),
                                       reduction="sum")
    gq, gk = torch.autograd.grad(loss, (q, k))
    assert loss.item() == 0 and gq.shape == q.shape and gk.shape == k.shape


def _randn(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype)


_scores = seqfuse.global_pointer_scores
_loss = seqfuse.global_pointer_loss
_sparse = seqfuse.sparse_multilabel_categorical_crossentropy
_dense = seqfuse.multilabel_categorical_crossentropy
_q = (2, 3, 2, 4)
_no_pos = torch.zeros(2, 2, 1, dtype=torch.long)

BAD_INPUTS = [
    (lambda: seqfuse.rope(_randn(2, 3, 5)), "D must be even"),
    (lambda: seqfuse.rope(_randn(2, 3, 4), torch.arange(4)), "positions must be"),
    (lambda: seqfuse.rope(_randn(2, 3, 4), torch.rand(3)), "positions must be an integer"),
    (lambda: _scores(_randn(2, 3, 4), _randn(2, 3, 4)), "q must be"),
    (lambda: _scores(_randn(*_q), _randn(2, 4, 2, 4)), "k must have"),
    (lambda: _scores(_randn(*_q), _randn(*_q, dtype=F64)), "k has dtype"),
    (lambda: _scores(_randn(2, 3, 2, 5), _randn(2, 3, 2, 5)), "even for rope"),
    (lambda: _scores(_randn(*_q), _randn(*_q), mask=torch.ones(2, 4)), "mask must be"),
    (lambda: _scores(_randn(*_q), _randn(*_q), bias_start=_randn(2, 3, 3)), "bias_start must be"),
    (lambda: _scores(_randn(2, 3, 1, 4), _randn(2, 3, 1, 4), bias_start=_randn(2, 3, 3),
                     bias_end=_randn(2, 4, 3)), "bias_start must be"),
    (lambda: _scores(_randn(*_q).half(), _randn(*_q).half()), "float32 or float64"),
    (lambda: _loss(_randn(*_q), _randn(*_q), torch.tensor([[[9]], [[0]]]).expand(2, 2, 1)),
     "pos_index entries"),
    (lambda: _loss(_randn(*_q), _randn(*_q), torch.zeros(2, 3, 1, dtype=torch.long)),
     "pos_index must be"),
    (lambda: _loss(_randn(*_q), _randn(*_q), torch.zeros(2, 2, 1)), "pos_index must be an integer"),
    (lambda: _loss(_randn(*_q), _randn(*_q), _no_pos, reduction="avg"), "reduction"),
    (lambda: _sparse(_randn(2, 5), torch.tensor([[1], [-1]])), "pos_index entries"),
    (lambda: _sparse(_randn(2, 5), torch.zeros(1, 1, dtype=torch.long)), "pos_index must be"),
    (lambda: _dense(_randn(2, 5), torch.rand(2, 4)), "labels must have"),
    (lambda: _dense(_randn(2, 5), 2 * torch.ones(2, 5)), r"labels must lie in \[0, 1\]"),
    (lambda: _dense(_randn(2, 5), torch.ones(2, 5), "max"), "reduction"),
    (lambda: global_pointer_decode(_randn(3, 3)), "scores must be"),
]


@pytest.mark.parametrize("fn, match", BAD_INPUTS)
def test_bad_inputs(fn, match):
    with pytest.raises((ValueError, RuntimeError), match=match):
        fn()


def test_opcheck():
    q, k = qk(2, 5, 3, 4, "cpu")
    bs = torch.randn(2, 3, 5, dtype=F64, requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    idx = torch.randint(0, 25, (2, 3, 4))
    s = loss_scores((2, 3, 25), "cpu", masked_fraction=0.1)
    labels = (torch.rand(2, 3, 25) < 0.3).double()
    terms = torch.rand(2, 3, 2, dtype=F64)
    ops = torch.ops.seqfuse
    # the backward ops are not differentiable themselves: give them plain tensors
    q_, k_, bs_, s_ = (t.detach() for t in (q, k, bs, s))
    cases = [
        (ops.rope, (q, torch.arange(5), 100.0, False)),
        (ops.global_pointer_scores, (q, k, mask, True, True, None, bs, None)),
        (ops.global_pointer_scores, (q[:, :, :1], k[:, :, :1], None, False, False, 0.5, bs, bs)),
        (ops.global_pointer_scores_backward,
         (torch.randn(2, 3, 5, 5, dtype=F64), q_, k_, mask, True, True, None, bs_, None)),
        (ops.multilabel_categorical_crossentropy, (s, labels)),
        (ops.multilabel_categorical_crossentropy_backward,
         (torch.rand_like(terms), terms, s_, labels)),
        (ops.sparse_multilabel_categorical_crossentropy, (s, idx, True)),
        (ops.sparse_multilabel_categorical_crossentropy_backward,
         (torch.rand_like(terms), terms, s_, idx, False)),
        (ops.global_pointer_loss, (q, k, idx, mask, True, True, None, bs, None, True)),
        (ops.global_pointer_loss_backward,
         (torch.rand_like(terms), terms, q_, k_, idx, mask, True, True, None, bs_, None, True)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


# ---- modules ------------------------------------------------------------------------

def bert4keras_rope(x):
    """RoPE as bert4keras' SinusoidalPositionEmbedding + apply: sin/cos interleaved."""
    L, D = x.shape[1], x.shape[-1]
    position = torch.arange(L, dtype=x.dtype)[:, None]
    indices = torch.pow(10000.0, -2 * torch.arange(D // 2, dtype=x.dtype) / D)
    emb = torch.stack([torch.sin(position * indices), torch.cos(position * indices)], -1)
    pos = emb.reshape(L, D)
    cos_pos = pos[..., 1::2].repeat_interleave(2, -1)[None, :, None]
    sin_pos = pos[..., ::2].repeat_interleave(2, -1)[None, :, None]
    x2 = torch.stack([-x[..., 1::2], x[..., ::2]], -1).reshape(x.shape)
    return x * cos_pos + x2 * sin_pos


def bert4keras_mask(logits, mask, tril):
    if mask is not None:
        pad = (mask == 0)
        logits = logits.masked_fill(pad[:, None, :, None] | pad[:, None, None, :], -INF)
    if tril:
        L = logits.shape[-1]
        logits = logits.masked_fill(torch.ones(L, L, dtype=torch.bool).tril(-1), -INF)
    return logits


def bert4keras_global_pointer(layer, x, mask):
    B, L, _ = x.shape
    units = torch.stack(torch.split(layer.dense(x), 2 * layer.head_size, dim=-1), dim=-2)
    qw, kw = units[..., :layer.head_size], units[..., layer.head_size:]
    qw, kw = bert4keras_rope(qw), bert4keras_rope(kw)
    logits = torch.einsum("bmhd,bnhd->bhmn", qw, kw)
    return bert4keras_mask(logits, mask, True) / layer.head_size ** 0.5


def bert4keras_efficient_global_pointer(layer, x, mask):
    inputs = layer.p_dense(x)
    qw, kw = inputs[..., ::2], inputs[..., 1::2]
    qw, kw = bert4keras_rope(qw[:, :, None])[:, :, 0], bert4keras_rope(kw[:, :, None])[:, :, 0]
    logits = torch.einsum("bmd,bnd->bmn", qw, kw) / layer.head_size ** 0.5
    bias = torch.einsum("bnh->bhn", layer.q_dense(inputs)) / 2
    logits = logits[:, None] + bias[:, ::2, None] + bias[:, 1::2, :, None]
    return bert4keras_mask(logits, mask, True)


@pytest.mark.parametrize("cls, restated", [
    (GlobalPointer, bert4keras_global_pointer),
    (EfficientGlobalPointer, bert4keras_efficient_global_pointer),
])
def test_modules_match_bert4keras(cls, restated):
    B, L, hidden, heads, head_size = 3, 13, 16, 5, 8
    layer = cls(hidden, heads, head_size, dtype=F64)
    x = torch.randn(B, L, hidden, dtype=F64, requires_grad=True)
    mask = padding_mask(B, L, "cpu")
    out = layer(x, mask)
    expected = restated(layer, x, mask)
    assert out.shape == (B, heads, L, L)
    assert torch.equal(torch.isneginf(out), torch.isneginf(expected))
    assert_close(finite(out), finite(expected))
    params = [x, *layer.parameters()]
    up = torch.randn_like(out)
    for got, want in zip(grads_with(out, up, *params), grads_with(expected, up, *params)):
        assert_close(got, want)
    # the fused loss equals the exact sparse loss of the restated scores
    idx = positives(B, heads, L, 4, "cpu")
    loss = layer.loss(x, idx, mask)
    restated_scores = restated(layer, x, mask).flatten(-2)
    expected_loss = reference.sparse_multilabel_categorical_crossentropy(restated_scores, idx, True)
    assert_close(loss, expected_loss, rtol=1e-10, atol=1e-10)
    got_grads = torch.autograd.grad(loss, params)
    for got, want in zip(got_grads, torch.autograd.grad(expected_loss, params)):
        assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_module_compiles_fullgraph():
    layer = EfficientGlobalPointer(16, 3, 8)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 7, 16, requires_grad=True)
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3])
    out = compiled(x, mask)
    assert_close(finite(out), finite(layer(x, mask)), dtype=torch.float32)
    idx = positives(2, 3, 7, 3, "cpu")
    loss_fn = torch.compile(lambda x: layer.loss(x, idx, mask), fullgraph=True, backend="aot_eager")
    loss = loss_fn(x)
    loss.backward()
    assert_close(loss, layer.loss(x, idx, mask), dtype=torch.float32)
    assert torch.isfinite(x.grad).all()


def test_decode():
    scores = torch.full((2, 3, 4, 4), -INF)
    scores[0, 1, 2, 3] = 0.5
    scores[1, 0, 0, 0] = 2.0
    scores[1, 2, 1, 2] = -0.5
    assert global_pointer_decode(scores).tolist() == [[0, 1, 2, 3], [1, 0, 0, 0]]
    assert global_pointer_decode(scores, threshold=-1.0).shape == (3, 4)


# ---- CUDA half precision ------------------------------------------------------------

# float16/bfloat16 tiles run on tensor cores (wmma), float32 on CUDA cores; RoPE is
# applied as tiles are loaded. Shapes: L not a multiple of the 64 tile, L = 1, odd D
# without rope, Efficient GlobalPointer's shared q/k with per-head biases.
@pytest.mark.parametrize("device", CUDA_DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("B, L, Hqk, H, D, rope", [
    (2, 150, 3, 3, 64, True),
    (2, 1, 2, 2, 64, True),
    (2, 37, 2, 2, 5, False),
    (2, 70, 1, 6, 64, True),
])
@pytest.mark.parametrize("mask_zero", [False, True])
def test_cuda_low_precision(device, dtype, B, L, Hqk, H, D, rope, mask_zero):
    q, k = qk(B, L, Hqk, D, device, dtype, requires_grad=False)
    q, k = (q / 2).requires_grad_(), (k / 2).requires_grad_()
    bs = be = None
    if Hqk == 1:
        bs = torch.randn(B, H, L, device=device, dtype=dtype, requires_grad=True)
        be = torch.randn(B, H, L, device=device, dtype=dtype, requires_grad=True)
    mask = padding_mask(B, L, device)
    mask[0] = 1  # token 0 real in one sentence, so span (0, 0) matters under mask_zero
    idx = positives(B, H, L, 6, device, mask_zero)
    kw = dict(mask=mask, rope=rope)
    leaves = [t for t in (q, k, bs, be) if t is not None]
    wide = [t.detach().double().requires_grad_() for t in leaves]
    kw64 = dict(kw, bias_start=wide[2] if bs is not None else None,
                bias_end=wide[3] if be is not None else None)
    kw = dict(kw, bias_start=bs, bias_end=be)

    out = seqfuse.global_pointer_scores(q, k, **kw)
    expected = reference.global_pointer_scores(wide[0], wide[1], **kw64)
    assert out.dtype == dtype and out.shape == (B, H, L, L)
    assert torch.equal(torch.isneginf(out), torch.isneginf(expected))
    assert_close(finite(out), finite(expected), dtype=dtype)
    up = torch.randn(out.shape, device=device, dtype=F64)
    for got, want in zip(torch.autograd.grad(out, leaves, up.to(dtype)),
                         torch.autograd.grad(expected, wide, up)):
        assert_close(got, want, dtype=dtype, rtol=5e-2, atol=5e-2)

    loss = seqfuse.global_pointer_loss(q, k, idx, mask_zero=mask_zero, reduction="none", **kw)
    want = reference.global_pointer_loss(wide[0], wide[1], idx, mask_zero=mask_zero,
                                         reduction="none", **kw64)
    # The backward's normalisers stay in float32; only the loss itself is rounded.
    terms = torch.ops.seqfuse.global_pointer_loss(q, k, idx, mask, rope, True, None, bs, be,
                                                  mask_zero)
    assert terms.dtype == torch.float32 and loss.dtype == dtype
    assert_close(loss, want, dtype=dtype, rtol=3e-2, atol=3e-2)
    for got, ref in zip(torch.autograd.grad(loss.sum(), leaves),
                        torch.autograd.grad(want.sum(), wide)):
        assert_close(got, ref, dtype=dtype, rtol=5e-2, atol=5e-2)


# ---- found by the property tests (tests/test_property_global_pointer.py) ---------------

@pytest.mark.parametrize("device", DEVICES)
def test_mean_of_losses_near_the_dtype_max(device):
    # Two rows each losing float32's max: their mean is max, but it was taken as a float32
    # sum first (inf). The mean is now taken in float64.
    big = torch.finfo(torch.float32).max
    s = torch.full((2, 1), big, device=device)
    dense = seqfuse.multilabel_categorical_crossentropy(s, torch.zeros_like(s))
    sparse = seqfuse.sparse_multilabel_categorical_crossentropy(
        s, torch.zeros(2, 0, dtype=torch.long, device=device))
    for loss in (dense, sparse):
        assert loss.dtype == torch.float32 and loss.item() == big


def test_reference_loss_of_an_empty_row_is_zero():
    # log(1 + 0) + log(1 + 0): the reference's "1 +" was taken from scores[..., :1], which
    # is empty for N = 0, so its loss was -inf.
    s = torch.zeros(3, 0, dtype=F64)
    want = torch.zeros(3, dtype=F64)
    assert torch.equal(reference.multilabel_categorical_crossentropy(s, s, "none"), want)
    assert torch.equal(seqfuse.multilabel_categorical_crossentropy(s, s, "none"), want)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_scale_is_applied_to_q_before_the_product(device, dtype):
    # c q . k with q . k beyond the dtype's range but c q . k within it: the reference
    # and the CUDA kernels took (q . k) c, inf; now all scale q first (as the CPU did).
    big = torch.finfo(dtype).max
    q = torch.full((1, 1, 1, 1), 2.0, dtype=dtype, device=device)
    k = torch.full((1, 1, 1, 1), big, dtype=dtype, device=device)
    kw = dict(rope=False, scale=0.25)
    assert reference.global_pointer_scores(q, k, **kw).item() == 0.5 * big
    assert seqfuse.global_pointer_scores(q, k, **kw).item() == 0.5 * big
