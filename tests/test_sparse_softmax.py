"""Row-wise normalisers (docs/sparse_softmax.md): sparse_softmax, topk_softmax, the
SPACES loss, taylor_softmax and entropy_normalize against their plain-PyTorch
references."""

import itertools
import math
from fractions import Fraction

import pytest
import torch

import seqfuse
from conftest import DEVICES, assert_close, runs_cuda_kernels
from seqfuse import reference

OPS = [
    "sparse_softmax",
    "topk_softmax",
    "sparse_softmax_cross_entropy",
    "taylor_softmax",
    "entropy_normalize",
]


def _dtype(device):
    """float64 where the kernels have it (CPU); float32 on CUDA."""
    return torch.float32 if runs_cuda_kernels(device) else torch.float64


def _randn(*shape, dtype):
    """float64 normals that `dtype` holds exactly. Rounding a float64 row to float32 can
    make two nearby values equal, and the tie then goes to the lower index where the
    float64 reference ranked them the other way: 250k normals have such a pair among
    their top 1024 in about one run in four."""
    return torch.randn(*shape, dtype=torch.float64).to(dtype).double()


def _fwd_bwd(fn, x, *args, grad=None, **kwargs):
    x = x.detach().requires_grad_()
    out = fn(x, *args, **kwargs)
    first = out[0] if isinstance(out, tuple) else out
    g = torch.randn_like(first) if grad is None else grad
    (dx,) = torch.autograd.grad(first, x, g)
    return out, dx, g


# sparse_softmax / topk_softmax


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape,k", [((7, 50), 1), ((3, 5, 300), 10), ((4, 1000), 64),
                                     ((2, 33), 33), ((2, 33), 100), ((3, 2048), 1500)])
def test_sparse_softmax_matches_reference(device, shape, k):
    dtype = _dtype(device)
    x = torch.randn(shape, dtype=torch.float64)
    p, dx, g = _fwd_bwd(seqfuse.sparse_softmax, x.to(device, dtype), k)
    p_ref, dx_ref, _ = _fwd_bwd(reference.sparse_softmax, x, k, grad=g.cpu().double())
    assert_close(p, p_ref, dtype)
    assert_close(dx, dx_ref, dtype)
    kept = (p != 0).sum(-1)
    assert torch.all(kept == min(k, shape[-1]))
    assert_close(p.sum(-1), torch.ones(shape[:-1], dtype=torch.float64), dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape,k", [((7, 50), 1), ((3, 5, 300), 10), ((4, 1000), 64),
                                     ((2, 33), 33), ((2, 33), 100), ((3, 2048), 1500)])
def test_topk_softmax_matches_reference(device, shape, k):
    dtype = _dtype(device)
    x = _randn(shape, dtype=dtype)
    (probs, idx), dx, g = _fwd_bwd(seqfuse.topk_softmax, x.to(device, dtype), k)
    (probs_ref, idx_ref), dx_ref, _ = _fwd_bwd(reference.topk_softmax, x, k,
                                               grad=g.cpu().double())
    assert probs.shape == (*shape[:-1], min(k, shape[-1])) and idx.dtype == torch.int64
    assert torch.equal(idx.cpu(), idx_ref)
    assert_close(probs, probs_ref, dtype)
    assert_close(dx, dx_ref, dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_sparse_softmax_any_dim_and_non_contiguous(device):
    dtype = _dtype(device)
    x = _randn(6, 40, 5, dtype=dtype)
    xt = x.to(device, dtype).transpose(0, 2)  # [5, 40, 6], not contiguous
    assert not xt.is_contiguous()
    for dim in (0, 1, -2):
        p, dx, g = _fwd_bwd(seqfuse.sparse_softmax, xt, 7, dim=dim)
        p_ref, dx_ref, _ = _fwd_bwd(reference.sparse_softmax, x.transpose(0, 2), 7, dim=dim,
                                    grad=g.cpu().double())
        assert_close(p, p_ref, dtype)
        assert_close(dx, dx_ref, dtype)
        (probs, idx), _, _ = _fwd_bwd(seqfuse.topk_softmax, xt, 3, dim=dim)
        probs_ref, idx_ref = reference.topk_softmax(x.transpose(0, 2), 3, dim=dim)
        assert torch.equal(idx.cpu(), idx_ref)
        assert_close(probs, probs_ref, dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_ties_go_to_the_lower_index(device):
    x = torch.tensor([[1.0, 3.0, 2.0, 3.0, 3.0, 0.0, 3.0],
                      [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
                      [-0.0, 0.0, -0.0, 5.0, 0.0, -1.0, 0.0]], device=device)
    probs, idx = seqfuse.topk_softmax(x, 3)
    assert idx.tolist() == [[1, 3, 4], [0, 1, 2], [3, 0, 1]]
    p = seqfuse.sparse_softmax(x, 3)
    assert (p[0] != 0).nonzero().flatten().tolist() == [1, 3, 4]
    assert (p[1] != 0).nonzero().flatten().tolist() == [0, 1, 2]
    assert (p[2] != 0).nonzero().flatten().tolist() == [0, 1, 3]
    assert_close(probs[1], torch.full((3,), 1 / 3), torch.float32)
    loss = seqfuse.sparse_softmax_cross_entropy(x, torch.tensor([6, 6, 2], device=device), 3,
                                                reduction="none")
    # Index 6 ties with the kept 3.0s but loses: it is outside the top 3.
    assert_close(loss[0], torch.tensor(math.log(3.0)), torch.float32)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("V,k", [(5000, 700), (3000, 1500)])
def test_many_ties_straddle_the_threshold(device, V, k):
    # Four distinct values: the k-th value is shared by far more entries than are still
    # wanted, spread over many block widths of the row (the tie-ranking scan), and for
    # k > 1024 the long top list is put in order after the kernel.
    x = torch.randint(0, 4, (3, V)).float()
    x[1] = 0.0
    x[1, ::2] = -0.0  # -0 and +0 are one value
    x[2, : V // 2] = -math.inf
    x = x.to(device)
    probs, idx = seqfuse.topk_softmax(x, k)
    probs_ref, idx_ref = reference.topk_softmax(x.cpu().double(), k)
    assert torch.equal(idx.cpu(), idx_ref)
    assert torch.equal(idx[1].cpu(), torch.arange(k))
    assert_close(probs, probs_ref, torch.float32)
    p = seqfuse.sparse_softmax(x, k)
    assert torch.equal((p != 0).cpu(), reference.sparse_softmax(x.cpu().double(), k) != 0)
    assert torch.all((p != 0).sum(-1) == k)
    target = torch.tensor([0, V - 1, V - 1], device=device)
    loss = seqfuse.sparse_softmax_cross_entropy(x, target, k, reduction="none")
    loss_ref = reference.sparse_softmax_cross_entropy(x.cpu().double(), target.cpu(), k,
                                                      reduction="none")
    assert_close(loss, loss_ref, torch.float32)


@pytest.mark.parametrize("device", DEVICES)
def test_nan_ranks_first_and_ties_by_index(device):
    nan, inf = math.nan, math.inf
    x = torch.tensor([[1.0, nan, 3.0, nan, inf, nan]], device=device)
    assert seqfuse.topk_softmax(x, 3)[1].tolist() == [[1, 3, 5]]
    assert seqfuse.topk_softmax(x, 4)[1].tolist() == [[1, 3, 5, 4]]
    assert torch.isnan(seqfuse.sparse_softmax(x, 1)).all()


@pytest.mark.parametrize("device", DEVICES)
def test_inf_and_nan_stay_in_their_rows(device):
    inf, nan = math.inf, math.nan
    x = torch.randn(5, 64, device=device)
    x[0, :60] = -inf            # fewer finite entries than k
    x[1, 7] = nan               # NaN ranks first, as in torch.topk
    x[2] = -inf                 # nothing but -inf
    x[3, 11] = inf
    p = seqfuse.sparse_softmax(x, 8)
    probs, idx = seqfuse.topk_softmax(x, 8)
    ref = reference.sparse_softmax(x.cpu().double(), 8)
    assert_close(p[4], ref[4], torch.float32)
    assert_close(p[0], ref[0], torch.float32)
    assert torch.all(p[0, :60] == 0) and torch.isclose(p[0].sum().cpu(), torch.tensor(1.0))
    assert torch.isnan(p[1]).all() and torch.isnan(ref[1]).all()
    assert torch.isnan(p[2]).all() and torch.isnan(ref[2]).all()
    assert idx[1, 0] == 7 and torch.isnan(probs[1]).all()
    assert torch.isnan(p[3, 11]) and torch.isnan(ref[3, 11])
    target = torch.tensor([61, 0, 0, 0, 5], device=device)
    loss = seqfuse.sparse_softmax_cross_entropy(x, target, 8, reduction="none")
    loss_ref = reference.sparse_softmax_cross_entropy(x.cpu().double(), target.cpu(), 8,
                                                      reduction="none")
    assert torch.isfinite(loss[[0, 4]]).all()
    assert_close(loss[[0, 4]], loss_ref[[0, 4]], torch.float32)
    assert torch.isnan(loss[1]) and torch.isnan(loss_ref[1])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_large_half_logits(device, dtype):
    x = (torch.randn(4, 3000) * 1e4).to(dtype)
    p = seqfuse.sparse_softmax(x.to(device), 16)
    ref = reference.sparse_softmax(x.double(), 16)
    assert p.dtype == dtype and torch.isfinite(p).all()
    assert_close(p, ref, dtype)
    g = torch.randn(4, 3000).to(dtype)
    _, dx, _ = _fwd_bwd(seqfuse.sparse_softmax, x.to(device), 16, grad=g.to(device))
    _, dx_ref, _ = _fwd_bwd(reference.sparse_softmax, x.double(), 16, grad=g.double())
    assert dx.dtype == dtype and torch.isfinite(dx).all()
    assert_close(dx, dx_ref, dtype)
    probs, idx = seqfuse.topk_softmax(x.to(device), 16)
    assert torch.equal(idx.cpu(), reference.topk_softmax(x.double(), 16)[1])
    target = torch.randint(0, 3000, (4,))
    loss = seqfuse.sparse_softmax_cross_entropy(x.to(device), target.to(device), 16,
                                                reduction="none")
    loss_ref = reference.sparse_softmax_cross_entropy(x.double(), target, 16, reduction="none")
    # The loss itself (lse ~ 4e4 minus a target logit near -4e4) can pass float16's
    # largest value: it must be finite wherever it fits, and equal the reference rounded
    # to the dtype (inf where that overflows too).
    fits = loss_ref.abs() <= torch.finfo(dtype).max
    assert torch.isfinite(loss.cpu()[fits]).all()
    torch.testing.assert_close(loss.double().cpu(), loss_ref.to(dtype).double(), rtol=1e-2,
                               atol=1.0)
    _, dl, _ = _fwd_bwd(seqfuse.sparse_softmax_cross_entropy, x.to(device), target.to(device),
                        16, grad=torch.tensor(1.0, device=device, dtype=dtype))
    _, dl_ref, _ = _fwd_bwd(reference.sparse_softmax_cross_entropy, x.double(), target, 16,
                            grad=torch.tensor(1.0, dtype=torch.float64))
    assert dl.dtype == dtype and torch.isfinite(dl).all()
    assert_close(dl, dl_ref, dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_single_entry_rows(device):
    x = torch.randn(6, 1, device=device)
    assert torch.equal(seqfuse.sparse_softmax(x, 1), torch.ones_like(x))
    assert torch.equal(seqfuse.sparse_softmax(x, 5), torch.ones_like(x))
    probs, idx = seqfuse.topk_softmax(x, 3)
    assert probs.shape == (6, 1) and torch.equal(idx, torch.zeros_like(idx))
    assert torch.equal(seqfuse.taylor_softmax(x), torch.ones_like(x))
    target = torch.zeros(6, dtype=torch.long, device=device)
    loss = seqfuse.sparse_softmax_cross_entropy(x, target, 1)
    assert loss.item() == 0.0


@pytest.mark.parametrize("device", DEVICES)
def test_vocabulary_of_250k(device):
    dtype = _dtype(device)
    x = _randn(3, 250_000, dtype=dtype)
    target = torch.randint(0, 250_000, (3,))
    for k in (1, 64, 1024):
        (probs, idx), dx, g = _fwd_bwd(seqfuse.topk_softmax, x.to(device, dtype), k)
        probs_ref, idx_ref = reference.topk_softmax(x, k)
        assert torch.equal(idx.cpu(), idx_ref)
        assert_close(probs, probs_ref, dtype)
        loss, dx, _ = _fwd_bwd(seqfuse.sparse_softmax_cross_entropy, x.to(device, dtype),
                               target.to(device), k, grad=torch.tensor(1.0, device=device,
                                                                       dtype=dtype))
        loss_ref, dx_ref, _ = _fwd_bwd(reference.sparse_softmax_cross_entropy, x, target, k,
                                       grad=torch.tensor(1.0, dtype=torch.float64))
        assert_close(loss, loss_ref, dtype)
        assert_close(dx, dx_ref, dtype)


# Row lengths and k that pick each CUDA top-k path (csrc/cuda/sparse_softmax.cu): one warp
# per row (V <= 2048), the row staged in shared memory (float32 V <= 16k), the one-pass
# candidate filter (longer rows; capacity max(4096, 2k, k + 2048) entries, so k = 2047,
# 2048, 2049 sit at its edge), and the fallback that rereads the row (k too large for
# the candidate buffer, or k >= V on a row too long to stage). On CPU they run the heap
# kernel against the same references.
TOPK_PATHS = [(9, 1000, 10), (9, 2048, 1024), (5, 10_000, 64), (3, 10_000, 1500),
              (2, 40_000, 1), (2, 40_000, 2047), (2, 40_000, 2048), (2, 40_000, 2049),
              (2, 100_000, 1024), (2, 60_000, 20_000), (2, 30_000, 30_000)]


def _ordered_rows(R, V, order):
    """float32-exact rows, as float64, in the given order."""
    x = torch.randn(R, V).double()
    if order == "ascending":
        x = x.sort(-1).values
    elif order == "descending":
        x = x.sort(-1, descending=True).values
    elif order == "constant":  # every entry ties (-0 equals +0): the lowest indices win
        x = torch.zeros(R, V, dtype=torch.float64)
        x[:, ::3] = -0.0
    elif order == "special":   # nothing but -inf; NaNs; -inf scattered among finite values
        x[0] = -math.inf
        x[1, torch.randint(0, V, (3,))] = math.nan
        x[2:, torch.randperm(V)[: V // 2]] = -math.inf
    return x


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("order", ["random", "ascending", "descending", "constant", "special"])
@pytest.mark.parametrize("R,V,k", TOPK_PATHS)
def test_every_topk_path(device, R, V, k, order):
    x = _ordered_rows(R, V, order)
    xd = x.to(device, torch.float32)
    kk = min(k, V)
    probs, idx = seqfuse.topk_softmax(xd, k)
    probs_ref, idx_ref = reference.topk_softmax(x, k)
    assert torch.equal(idx.cpu(), idx_ref)
    assert_close(probs, probs_ref, torch.float32, equal_nan=True)
    p = seqfuse.sparse_softmax(xd, k)
    p_ref = reference.sparse_softmax(x, k)
    assert_close(p, p_ref, torch.float32, equal_nan=True)
    finite = ~torch.isnan(p_ref).any(-1)
    assert torch.all((p.cpu()[finite] != 0).sum(-1) <= kk)
    target = torch.randint(0, V, (R,))
    target[0] = idx_ref[0, -1]  # the last kept entry: a tie with the first one left out
    if R > 2:  # an ignored row gets a zero gradient; the reference's is NaN on NaN rows
        target[-1] = -100
    loss, dx, _ = _fwd_bwd(seqfuse.sparse_softmax_cross_entropy, xd, target.to(device), k,
                           reduction="none", grad=torch.ones(R, device=device))
    loss_ref, dx_ref, _ = _fwd_bwd(reference.sparse_softmax_cross_entropy, x, target, k,
                                   reduction="none", grad=torch.ones(R, dtype=torch.float64))
    assert_close(loss, loss_ref, torch.float32, equal_nan=True)
    assert_close(dx, dx_ref, torch.float32, equal_nan=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("R,V,k", [(9, 1000, 10), (3, 30_000, 64), (2, 70_000, 1024)])
def test_every_topk_path_in_half_types(device, dtype, R, V, k):
    # 2-byte rows stage up to 32k entries: 30k is staged, 70k goes through the filter.
    x = torch.randn(R, V).to(dtype)
    probs, idx = seqfuse.topk_softmax(x.to(device), k)
    probs_ref, idx_ref = reference.topk_softmax(x.double(), k)
    assert probs.dtype == dtype
    assert torch.equal(idx.cpu(), idx_ref)
    assert_close(probs, probs_ref, dtype)
    assert_close(seqfuse.sparse_softmax(x.to(device), k), reference.sparse_softmax(x.double(), k),
                 dtype)


# sparse_softmax_cross_entropy


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("N,V,k", [(9, 40, 1), (16, 500, 10), (5, 30, 30), (5, 30, 1000)])
def test_cross_entropy_matches_reference(device, reduction, N, V, k):
    dtype = _dtype(device)
    logits = torch.randn(N, V, dtype=torch.float64)
    target = torch.randint(0, V, (N,))
    target[::4] = -100
    target[1] = logits[1].argmax()  # at least one target inside the top k
    out, dx, g = _fwd_bwd(seqfuse.sparse_softmax_cross_entropy, logits.to(device, dtype),
                          target.to(device), k, reduction=reduction)
    ref, dx_ref, _ = _fwd_bwd(reference.sparse_softmax_cross_entropy, logits, target, k,
                              reduction=reduction, grad=g.cpu().double())
    assert out.shape == ref.shape and out.dtype == dtype
    assert_close(out, ref, dtype)
    assert_close(dx, dx_ref, dtype)
    assert torch.all(dx[target.to(device) == -100] == 0)


@pytest.mark.parametrize("device", DEVICES)
def test_cross_entropy_non_contiguous_logits(device):
    dtype = _dtype(device)
    logits = torch.randn(50, 6, dtype=torch.float64)
    target = torch.tensor([3, 49, -100, 0, 17, 8])
    lt = logits.to(device, dtype).t()  # [6, 50], not contiguous
    assert not lt.is_contiguous()
    loss, dx, _ = _fwd_bwd(seqfuse.sparse_softmax_cross_entropy, lt, target.to(device), 5,
                           grad=torch.tensor(1.0, device=device, dtype=dtype))
    loss_ref, dx_ref, _ = _fwd_bwd(reference.sparse_softmax_cross_entropy, logits.t(), target,
                                   5, grad=torch.tensor(1.0, dtype=torch.float64))
    assert_close(loss, loss_ref, dtype)
    assert_close(dx, dx_ref, dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_cross_entropy_target_outside_top_k(device):
    logits = torch.arange(10.0, device=device).repeat(3, 1)  # top 2: indices 9, 8
    target = torch.tensor([0, 9, 5], device=device)
    logits.requires_grad_()
    loss = seqfuse.sparse_softmax_cross_entropy(logits, target, 2, reduction="none")
    lse = math.log(math.exp(9) + math.exp(8))
    assert_close(loss.detach(), torch.tensor([lse, lse - 9, lse - 5]), torch.float32)
    loss.sum().backward()
    g = logits.grad.cpu()
    assert g[0, 0] == -1.0 and g[2, 5] == -1.0
    p9, p8 = math.exp(9 - lse), math.exp(8 - lse)
    assert_close(g[1, 8:], torch.tensor([p8, p9 - 1]), torch.float32)
    assert torch.count_nonzero(g[0]) == 3 and torch.count_nonzero(g[1]) == 2


def _assert_same_values_and_specials(actual, expected, dtype):
    """actual equals expected, with NaN and +-inf at exactly the same entries."""
    actual = actual.detach().cpu().double()
    assert torch.equal(torch.isnan(actual), torch.isnan(expected))
    assert torch.equal(torch.isinf(actual), torch.isinf(expected))
    assert_close(actual, expected, dtype, equal_nan=True)


# Rows of 5 logits with +inf kept entries, and their targets.
PLUS_INF_ROWS = [
    ([0.5, math.inf, 2.0, -1.0, 3.0], 2),         # one +inf, target outside the top 2
    ([math.inf, 1.0, math.inf, -2.0, 0.0], 1),    # two +inf
    ([-math.inf, math.inf, 0.0, -math.inf, 1.0], 4),  # +inf beside -inf
    ([1.0, math.inf, 0.0, 2.0, -1.0], 1),         # the target is the +inf: inf - inf
    ([0.3, -0.7, 1.5, 0.1, -2.0], 0),             # finite: untouched by the others
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("k", [2, 3, 5])  # top-k selections, and k >= V (the whole row)
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_cross_entropy_plus_inf_logit(device, k, reduction):
    # The log-sum-exp of kept logits with a +inf is +inf, as torch.logsumexp gives (not
    # exp(inf - inf) = NaN): the loss is +inf (NaN where the target is the +inf), and
    # dL/dx_i = p_i - [i == t] with p_i = exp(x_i - lse) is NaN at the +inf entries only.
    rows = PLUS_INF_ROWS if reduction == "none" else PLUS_INF_ROWS[:3]  # mean: no NaN row
    x = torch.tensor([r for r, _ in rows], dtype=torch.float64)
    target = torch.tensor([t for _, t in rows])
    dtype = _dtype(device)
    loss, dx, g = _fwd_bwd(seqfuse.sparse_softmax_cross_entropy, x.to(device, dtype),
                           target.to(device), k, reduction=reduction)
    loss_ref, dx_ref, _ = _fwd_bwd(reference.sparse_softmax_cross_entropy, x, target, k,
                                   reduction=reduction, grad=g.cpu().double())
    assert torch.isinf(loss_ref).any() and torch.isnan(dx_ref).any()  # the case is exercised
    assert not torch.isnan(dx_ref[x != math.inf]).any()
    _assert_same_values_and_specials(loss, loss_ref, dtype)
    _assert_same_values_and_specials(dx, dx_ref, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("k", [2, 3, 5])
def test_softmaxes_plus_inf_logit(device, k):
    # A kept +inf poisons the softmaxes' rows, as torch.softmax's exp(x - max) does in the
    # reference; the other rows are untouched. (The SPACES loss's lse stays +inf.)
    x = torch.tensor([r for r, _ in PLUS_INF_ROWS], dtype=torch.float64)
    xd = x.to(device, _dtype(device))
    p_ref = reference.sparse_softmax(x, k)
    probs_ref, idx_ref = reference.topk_softmax(x, k)
    assert torch.isnan(p_ref[:-1]).all() and torch.isfinite(p_ref[-1]).all()
    _assert_same_values_and_specials(seqfuse.sparse_softmax(xd, k), p_ref, _dtype(device))
    (probs, idx), dx, g = _fwd_bwd(seqfuse.topk_softmax, xd, k)
    (_, _), dx_ref, _ = _fwd_bwd(reference.topk_softmax, x, k, grad=g.cpu().double())
    assert torch.equal(idx.cpu(), idx_ref)
    _assert_same_values_and_specials(probs, probs_ref, _dtype(device))
    _assert_same_values_and_specials(dx, dx_ref, _dtype(device))


@pytest.mark.parametrize("device", DEVICES)
def test_cross_entropy_mean_of_losses_near_the_max(device):
    # Three float32 losses of 3e38: their sum overflows, their mean does not (the
    # thorough property profile found the mean inf where float64 gives 3e38).
    x = torch.tensor([[3e38, 0.0, -1.0]] * 3, device=device, requires_grad=True)
    target = torch.tensor([1, 1, 2], device=device)
    mean = seqfuse.sparse_softmax_cross_entropy(x, target, 2)
    expected = reference.sparse_softmax_cross_entropy(x.detach().double().cpu(), target.cpu(), 2)
    assert torch.isfinite(mean) and math.isclose(mean.item(), expected.item(), rel_tol=1e-6)
    assert torch.isinf(seqfuse.sparse_softmax_cross_entropy(x, target, 2, reduction="sum"))
    (dx,) = torch.autograd.grad(mean, x)
    assert torch.isfinite(dx).all()
    # No rows at all: the mean is still 0 / 0.
    empty = seqfuse.sparse_softmax_cross_entropy(x[:0], target[:0], 2)
    assert torch.isnan(empty)


def test_cross_entropy_all_ignored_is_nan_mean():
    logits = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    target = torch.full((3,), 4)
    loss = seqfuse.sparse_softmax_cross_entropy(logits, target, 2, ignore_index=4)
    assert torch.isnan(loss)
    assert seqfuse.sparse_softmax_cross_entropy(logits, target, 2, ignore_index=4,
                                                reduction="sum").item() == 0.0


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_loss_module(reduction):
    logits = torch.randn(2, 6, 300, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, 300, (2, 6))
    target[0, 1] = -1
    module = seqfuse.nn.SparseSoftmaxCrossEntropyLoss(5, ignore_index=-1, reduction=reduction)
    loss = module(logits, target)
    ref = reference.sparse_softmax_cross_entropy(logits.reshape(-1, 300), target.reshape(-1), 5,
                                                 ignore_index=-1, reduction=reduction)
    assert loss.shape == (target.shape if reduction == "none" else ())
    assert_close(loss.detach().reshape(-1), ref.detach().reshape(-1))
    assert "k=5" in repr(module)
    with pytest.raises(ValueError, match="reduction"):
        seqfuse.nn.SparseSoftmaxCrossEntropyLoss(5, reduction="avg")
    with pytest.raises(ValueError, match="target"):
        module(logits, target[:, :3])


# taylor_softmax and entropy_normalize


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("order", [2, 4, 6])
def test_taylor_softmax_matches_reference(device, order):
    dtype = _dtype(device)
    x = torch.randn(4, 3, 70, dtype=torch.float64) * 3
    for dim in (-1, 1):
        p, dx, g = _fwd_bwd(seqfuse.taylor_softmax, x.to(device, dtype), order, dim=dim)
        p_ref, dx_ref, _ = _fwd_bwd(reference.taylor_softmax, x, order, dim=dim,
                                    grad=g.cpu().double())
        assert torch.all(p > 0)
        assert_close(p, p_ref, dtype)
        assert_close(dx, dx_ref, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("order", [2, 6, 64])
def test_taylor_softmax_of_huge_finite_inputs_is_finite(device, dtype, order):
    # f_n(x) ~ x^n / n! passes the accumulation type's range long before x does (float32:
    # f_2 overflows from |x| ~ 2^64, so f_2(float32 max) = inf); the sum of a row then
    # went inf and p = inf / inf = NaN, where the float64 maths has a finite p. Such rows
    # are normalised in scaled terms now. Rows 0-1 overflow; row 2 holds an inf (NaN
    # there, 0 elsewhere, as in the reference); row 3 is ordinary.
    if runs_cuda_kernels(device) and dtype == torch.float64:
        pytest.skip("no float64 CUDA kernels")
    big = torch.finfo(dtype).max
    x = torch.tensor([[big, 0.0, -big, 1.0, big / 2],
                      [big / 4, -big / 2, 3.0, big / 4, -1.0],
                      [math.inf, 1.0, 2.0, -3.0, 0.5],
                      [0.5, -1.0, 2.0, 0.0, 1.5]], dtype=torch.float64).to(dtype).double()
    p, dx, g = _fwd_bwd(seqfuse.taylor_softmax, x.to(device, dtype), order)
    p_ref, dx_ref, _ = _fwd_bwd(reference.taylor_softmax, x, order, grad=g.cpu().double())
    assert torch.isfinite(p[:2]).all() and torch.isfinite(dx[:2]).all()
    assert_close(p, p_ref, dtype, equal_nan=True)
    assert_close(dx, dx_ref, dtype, equal_nan=True)
    # The reference scales its rows for this (float64 overflows too: f_64(2^128)): its
    # rows 0-1 against exact rationals.
    def f(v):
        return sum(Fraction(v) ** m / math.factorial(m) for m in range(order + 1))
    for r in (0, 1):
        S = sum(f(v) for v in x[r].tolist())
        exact = torch.tensor([float(f(v) / S) for v in x[r].tolist()], dtype=torch.float64)
        assert_close(p_ref[r], exact, torch.float64)


def _entropy(p):
    return -(torch.where(p > 0, p * torch.log(p), 0.0)).sum(-1)


@pytest.mark.parametrize("device", DEVICES)
def test_entropy_normalize_matches_reference(device):
    dtype = _dtype(device)
    p = torch.softmax(torch.randn(6, 50, dtype=torch.float64) * 2, -1)
    p[0, :10] = 0  # zeros stay zero
    # Plain Newton (docs/sparse_softmax.md) converges from near its start only: a target
    # far from the row's entropy can overshoot to a one-hot row (seen: H 1.04, target
    # 2.82 -> 0).
    start = _entropy(p / p.sum(-1, keepdim=True))
    target = start + (2 * torch.rand(6, dtype=torch.float64) - 1) * 0.2
    out, dx, g = _fwd_bwd(seqfuse.entropy_normalize, p.to(device, dtype), target.to(device), 4)
    out_ref, dx_ref, _ = _fwd_bwd(reference.entropy_normalize, p, target, 4,
                                  grad=g.cpu().double())
    assert torch.all(out[0, :10] == 0) and torch.all(dx[0, :10] == 0)
    assert_close(out, out_ref, dtype)
    assert_close(dx, dx_ref, dtype, rtol=1e-8 if dtype == torch.float64 else 1e-3,
                 atol=1e-8 if dtype == torch.float64 else 1e-4)
    # Newton's method reaches the target entropy.
    converged = seqfuse.entropy_normalize(p.to(device, dtype), target.to(device), 10)
    assert_close(_entropy(converged.double()), target, dtype, rtol=1e-6, atol=1e-5)


def test_entropy_normalize_any_dim_and_scalar_target():
    p = torch.softmax(torch.randn(20, 3, dtype=torch.float64), 0)
    out = seqfuse.entropy_normalize(p, 1.5, iters=3, dim=0)
    assert_close(out, reference.entropy_normalize(p, 1.5, iters=3, dim=0))
    assert_close(out.sum(0), torch.ones(3, dtype=torch.float64))


@pytest.mark.parametrize("device", DEVICES)
def test_entropy_normalize_float_target_keeps_its_precision_and_iters_0_is_identity(device):
    # A Python float target became a default (float32) tensor, so float64 rows were
    # moved to a target off by ~1e-8 (1.3 is not a float32); the converged entropy now
    # matches it to float64's precision. With iters = 0 the op is the identity, and its
    # gradient passed only through p's non-zeros (the convention of iters >= 1, where a
    # zero stays zero whatever p is); it passes everywhere now.
    dtype = _dtype(device)
    p = torch.softmax(torch.randn(4, 30, dtype=torch.float64), -1)
    p[:, :5] = 0
    p = (p / p.sum(-1, keepdim=True)).to(dtype)
    out = seqfuse.entropy_normalize(p.to(device), 1.3, iters=12)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert_close(_entropy(out.double().cpu()), torch.full((4,), 1.3, dtype=torch.float64),
                 dtype, rtol=tol, atol=tol)
    x = p.to(device).requires_grad_()
    same = seqfuse.entropy_normalize(x, 1.3, iters=0)
    assert_close(same, p, dtype)
    g = torch.randn(4, 30, dtype=torch.float64).to(device, dtype)
    (dx,) = torch.autograd.grad(same, x, g)
    assert torch.equal(dx, g)


def test_entropy_normalize_reference_survives_an_underflowing_step():
    # A far target sends Newton's first step to a near one-hot row and the next into an
    # entry below the smallest float64: the reference then took 0 * log 0 = NaN, where
    # the maths (and the kernels, which carry logs) give a finite row. It carries logs now.
    p = torch.tensor([[0.9935976598788216, 0.006402340121178388]], dtype=torch.float64)
    target = math.log(2) * 0.875
    for fn in (seqfuse.entropy_normalize, reference.entropy_normalize):
        x = p.clone().requires_grad_()
        out = fn(x, target, iters=3)
        (dx,) = torch.autograd.grad(out, x, torch.tensor([[0.3, -0.7]], dtype=torch.float64))
        assert torch.equal(out, torch.tensor([[1.0, 0.0]], dtype=torch.float64)), fn
        assert torch.isfinite(dx).all(), fn


@pytest.mark.parametrize("device", DEVICES)
def test_entropy_normalize_gamma_product_past_the_float_range(device):
    # p = [4.19e-4, 0.9996] moved to 0.352 nats: Newton's first gamma is -12.7 (the row
    # flips), the second -4e38 (past float32's range: D is a subnormal -8e-40), and their
    # product 5e39. The kernels took log q = G log p - log Z with G that product: in
    # float32 inf - inf, NaN rows from iters = 2 on, where the maths gives the one-hot
    # [0, 1] with gradient 0 (0 times the infinite gamma was NaN there too). The
    # reference overflowed the same way in float32 (float64 at larger gammas).
    dtypes = [torch.float32] + ([] if runs_cuda_kernels(device) else [torch.float64])
    g = torch.tensor([[0.3, -0.7]])
    for dtype, iters, fn in itertools.product(dtypes, (2, 3, 4), (seqfuse, reference)):
        x = torch.tensor([[0.000419, 0.999581]], dtype=dtype, device=device, requires_grad=True)
        out = fn.entropy_normalize(x, 0.352, iters)
        (dx,) = torch.autograd.grad(out, x, g.to(device, dtype))
        what = f"{fn.__name__} {dtype} iters={iters}"
        assert torch.equal(out.detach().cpu(), torch.tensor([[0.0, 1.0]], dtype=dtype)), what
        assert torch.equal(dx.cpu(), torch.zeros(1, 2, dtype=dtype)), what


def test_entropy_normalize_gradient_of_a_near_uniform_step():
    # Newton's first step takes [0.98, 0.02] to a near-uniform row (H 0.690 of log 2 =
    # 0.693), where D = -0.0058 and the second gamma is 54. dJ/dgamma sums terms whose
    # weights add up to 0; taken about log q = 0 they cancelled (log q ~ -0.69 in both
    # entries) and the float64 gradient was 1.6e-12 off, relative (the reference: 6e-15).
    # Taken about the row's largest log q: 5e-15. Checked against 50-digit mpmath.
    mpmath = pytest.importorskip("mpmath")
    mpmath.mp.dps = 50
    p, target, g = [0.97988982594754337, 0.02011017405245654], 0.38440508179779853, [0.5, -1.25]

    def exact(p):  # two Newton steps in 50 digits
        l = [mpmath.log(v) for v in p]
        for _ in range(2):
            q = [mpmath.exp(v) for v in l]
            H = -sum(a * b for a, b in zip(q, l))
            D = H * H - sum(a * b * b for a, b in zip(q, l))
            z = [(1 + (target - H) / D) * v for v in l]
            lse = mpmath.log(sum(mpmath.exp(v) for v in z))
            l = [v - lse for v in z]
        return sum(gi * mpmath.exp(v) for gi, v in zip(g, l))

    h = mpmath.mpf("1e-30")
    want = []
    for i in range(2):
        up, down = [mpmath.mpf(v) for v in p], [mpmath.mpf(v) for v in p]
        up[i] += h
        down[i] -= h
        want.append(float((exact(up) - exact(down)) / (2 * h)))
    x = torch.tensor([p], dtype=torch.float64, requires_grad=True)
    (dx,) = torch.autograd.grad(seqfuse.entropy_normalize(x, target, 2), x,
                                torch.tensor([g], dtype=torch.float64))
    torch.testing.assert_close(dx, torch.tensor([want], dtype=torch.float64), rtol=0, atol=1e-13)


# gradients of the kernels themselves, float64


def test_gradcheck():
    gc = dict(eps=1e-6, atol=1e-7, rtol=1e-5)
    x = torch.randn(3, 17, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: seqfuse.sparse_softmax(t, 5), (x,), **gc)
    assert torch.autograd.gradcheck(lambda t: seqfuse.sparse_softmax(t, 17), (x,), **gc)
    assert torch.autograd.gradcheck(lambda t: seqfuse.topk_softmax(t, 4)[0], (x,), **gc)
    assert torch.autograd.gradcheck(lambda t: seqfuse.taylor_softmax(t, 4, dim=0), (x,), **gc)
    target = torch.tensor([3, 16, -100])
    for k in (4, 17):
        assert torch.autograd.gradcheck(
            lambda t: seqfuse.sparse_softmax_cross_entropy(t, target, k, reduction="none"), (x,),
            **gc)
    p = torch.softmax(torch.randn(3, 9, dtype=torch.float64), -1).requires_grad_()
    h = torch.full((3,), 1.2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda q, t: seqfuse.entropy_normalize(q, t, 3), (p, h), **gc)


# the custom-op contract


def _opcheck_cases():
    x = torch.randn(3, 40, dtype=torch.float64, requires_grad=True)
    logits = torch.randn(4, 40, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([1, -100, 39, 0])
    probs = seqfuse.sparse_softmax(x, 6).detach()
    tk_p, tk_i = seqfuse.topk_softmax(x, 6)
    _, lse, idx = torch.ops.seqfuse.sparse_softmax_cross_entropy(logits, target, 5, -100)
    p = torch.softmax(torch.randn(3, 40, dtype=torch.float64), -1).requires_grad_()
    h = torch.full((3,), 2.0, dtype=torch.float64, requires_grad=True)
    g = torch.randn(3, 40, dtype=torch.float64)
    ops = torch.ops.seqfuse
    return [
        (ops.sparse_softmax.default, (x, 6)),
        (ops.sparse_softmax.default, (x, 400)),
        (ops.sparse_softmax_backward.default, (g, probs)),
        (ops.topk_softmax.default, (x, 6)),
        (ops.topk_softmax_backward.default, (torch.randn(3, 6, dtype=torch.float64),
                                             tk_p.detach(), tk_i, 40)),
        (ops.sparse_softmax_cross_entropy.default, (logits, target, 5, -100)),
        (ops.sparse_softmax_cross_entropy.default, (logits, target, 50, -100)),
        (ops.sparse_softmax_cross_entropy_backward.default,
         (torch.rand(4, dtype=torch.float64), logits.detach(), target, lse, idx, -100)),
        (ops.taylor_softmax.default, (x, 2)),
        (ops.taylor_softmax_backward.default, (g, x.detach(), probs, 4)),
        (ops.entropy_normalize.default, (p, h, 3)),
        (ops.entropy_normalize_backward.default, (g, p.detach(), h.detach(), 3)),
    ]


@pytest.mark.parametrize("case", range(12))
def test_opcheck(case):
    op, args = _opcheck_cases()[case]
    torch.library.opcheck(op, args)


def test_every_op_is_exported():
    for name in OPS:
        assert callable(getattr(seqfuse, name)) and callable(getattr(reference, name))
        assert hasattr(torch.ops.seqfuse, name) and hasattr(torch.ops.seqfuse, name + "_backward")


# bad inputs and extremes


def test_bad_inputs():
    x = torch.randn(4, 10)
    target = torch.tensor([0, 1, 2, 3])
    for k in (0, -3):
        with pytest.raises(ValueError, match="k must be a positive int"):
            seqfuse.sparse_softmax(x, k)
        with pytest.raises(ValueError, match="k must be a positive int"):
            seqfuse.topk_softmax(x, k)
        with pytest.raises(ValueError, match="k must be a positive int"):
            seqfuse.sparse_softmax_cross_entropy(x, target, k)
        with pytest.raises(ValueError, match="k must be a positive int"):
            torch.ops.seqfuse.sparse_softmax(x, k)
    for k in (2.0, True, torch.tensor(3)):
        with pytest.raises(TypeError, match="k must be an int"):
            seqfuse.sparse_softmax(x, k)
        with pytest.raises(TypeError, match="k must be an int"):
            seqfuse.sparse_softmax_cross_entropy(x, target, k)
        with pytest.raises(TypeError, match="k must be an int"):
            seqfuse.topk_softmax(x, k)
    with pytest.raises(ValueError, match="target must hold class indices in \\[0, 10\\)"):
        seqfuse.sparse_softmax_cross_entropy(x, torch.tensor([0, 10, 2, 3]), 3)
    with pytest.raises(ValueError, match="target must hold class indices"):
        seqfuse.sparse_softmax_cross_entropy(x, torch.tensor([0, -1, 2, 3]), 3)
    with pytest.raises(ValueError, match="target must be \\[N\\]"):
        seqfuse.sparse_softmax_cross_entropy(x, target[:3], 3)
    with pytest.raises(RuntimeError, match="target must be an int64"):
        seqfuse.sparse_softmax_cross_entropy(x, target.int(), 3)
    with pytest.raises(ValueError, match="logits must be \\[N, V\\]"):
        seqfuse.sparse_softmax_cross_entropy(x[None], target[None], 3)
    with pytest.raises(ValueError, match="reduction"):
        seqfuse.sparse_softmax_cross_entropy(x, target, 3, reduction="avg")
    with pytest.raises(ValueError, match="order must be even"):
        seqfuse.taylor_softmax(x, 3)
    with pytest.raises(ValueError, match="order must be even"):
        seqfuse.taylor_softmax(x, 0)
    with pytest.raises(ValueError, match="order must be an even int"):
        torch.ops.seqfuse.taylor_softmax(x, 5)
    with pytest.raises(TypeError, match="order must be an int"):
        seqfuse.taylor_softmax(x, 2.0)
    with pytest.raises(ValueError, match="iters must be >= 0"):
        seqfuse.entropy_normalize(x.softmax(-1), 1.0, iters=-1)
    with pytest.raises(ValueError, match="target_entropy"):
        seqfuse.entropy_normalize(x.softmax(-1), torch.ones(3), iters=2)
    with pytest.raises(ValueError, match="target_entropy must be p's shape"):
        torch.ops.seqfuse.entropy_normalize(x.softmax(-1), torch.ones(3), 2)
    with pytest.raises(IndexError, match="dim 2 is out of range"):
        seqfuse.sparse_softmax(x, 3, dim=2)
    with pytest.raises(RuntimeError, match="x must be a floating point"):
        seqfuse.sparse_softmax(torch.ones(3, 4, dtype=torch.long), 2)
    with pytest.raises(ValueError, match="at least one dimension"):
        seqfuse.taylor_softmax(torch.tensor(1.0))
    with pytest.raises(ValueError, match="grad must have the input's shape"):
        torch.ops.seqfuse.sparse_softmax_backward(torch.ones(4, 9), x)
    # The backward ops write through the indices they are given: they are checked too.
    probs, idx = seqfuse.topk_softmax(x, 3)
    with pytest.raises(ValueError, match="indices must lie in \\[0, 10\\)"):
        torch.ops.seqfuse.topk_softmax_backward(torch.ones_like(probs), probs, idx + 10, 10)
    with pytest.raises(ValueError, match="V \\(2\\) must be at least k"):
        torch.ops.seqfuse.topk_softmax_backward(torch.ones_like(probs), probs, idx, 2)
    ce_backward = torch.ops.seqfuse.sparse_softmax_cross_entropy_backward
    lse = torch.ones(4, 2)  # (max, log of the sum) per row
    with pytest.raises(ValueError, match="grad_loss must be a floating point \\[N\\]"):
        ce_backward(torch.ones(3), x, target, lse, idx, -100)
    with pytest.raises(ValueError, match="lse must be a floating point \\[N, 2\\]"):
        ce_backward(torch.ones(4), x, target, torch.ones(4), idx, -100)
    with pytest.raises(ValueError, match="indices must lie in"):
        ce_backward(torch.ones(4), x, target, lse, -idx - 1, -100)
    with pytest.raises(ValueError, match="indices must be \\[N, k\\] with k < V"):
        ce_backward(torch.ones(4), x, target, lse, torch.zeros(4, 10, dtype=torch.long), -100)


def test_empty_inputs():
    for shape in [(0, 10), (3, 0), (2, 0, 5)]:
        x = torch.randn(shape, requires_grad=True)
        p = seqfuse.sparse_softmax(x, 3)
        assert p.shape == shape
        p.sum().backward()
        assert x.grad.shape == shape
        probs, idx = seqfuse.topk_softmax(x, 3)
        assert probs.shape == (*shape[:-1], min(3, shape[-1]))
        assert seqfuse.taylor_softmax(x).shape == shape
        assert seqfuse.entropy_normalize(x.detach(), 1.0).shape == shape
    logits = torch.randn(0, 10, requires_grad=True)
    loss = seqfuse.sparse_softmax_cross_entropy(logits, torch.zeros(0, dtype=torch.long), 3,
                                                reduction="none")
    assert loss.shape == (0,)
    assert seqfuse.sparse_softmax_cross_entropy(logits, torch.zeros(0, dtype=torch.long), 3,
                                                reduction="sum").item() == 0.0
    empty_vocab = torch.randn(2, 0)
    loss = seqfuse.sparse_softmax_cross_entropy(empty_vocab, torch.full((2,), -100), 3,
                                                reduction="none")
    assert torch.equal(loss, torch.zeros(2))


def test_torch_compile_has_no_graph_break():
    def f(x, target):
        return (seqfuse.sparse_softmax(x, 4) * x).sum() + seqfuse.sparse_softmax_cross_entropy(
            x, target, 4)

    x = torch.randn(3, 20, requires_grad=True)
    target = torch.tensor([1, 2, 3])
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out = compiled(x, target)
    assert_close(out.detach(), f(x, target).detach())
    out.backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("k", [2, 3])  # the top-k paths and the whole row
def test_large_logits_keep_their_probabilities(device, dtype, k):
    # Two equal logits far from zero share the mass: p = 1/2 each, loss log 2, gradient
    # (-1/2, 1/2, 0). The kernels once took p = exp(x - lse) with lse = m + log s rounded
    # to the accumulation type, which lost log s to the rounding of m: p = 1 for both at
    # 1e10 in float32, and a loss of 0. They keep m and s apart now; so does the LM-head
    # loss, which shares the maths.
    if runs_cuda_kernels(device) and dtype == torch.float64:
        pytest.skip("no float64 CUDA kernels")
    for big in (1e10, 2.0**100, torch.finfo(dtype).max, -1e10):
        x = torch.tensor([[big, big, 0.0 if big > 0 else 2 * big]], dtype=dtype, device=device)
        half = torch.tensor([[0.5, 0.5, 0.0]], dtype=torch.float64)
        assert_close(seqfuse.sparse_softmax(x, k), half, dtype)
        assert_close(seqfuse.topk_softmax(x, k)[0], half[:, :k], dtype)
        logits = x.clone().requires_grad_()
        loss = seqfuse.sparse_softmax_cross_entropy(logits, torch.tensor([0], device=device), k)
        assert_close(loss, torch.tensor(math.log(2.0), dtype=torch.float64), dtype)
        loss.backward()
        assert_close(logits.grad, torch.tensor([[-0.5, 0.5, 0.0]], dtype=torch.float64), dtype)
    if runs_cuda_kernels(device) or dtype == torch.float32:
        return  # the LM head: once, in float64 on the CPU
    hidden = torch.tensor([[1e10], [-1e10]], dtype=dtype, requires_grad=True)
    weight = torch.tensor([[1.0], [1.0], [0.0], [0.5]], dtype=dtype)
    for k_head in (2, 4):  # the sparse path and the dense one
        loss = seqfuse.linear_sparse_softmax_cross_entropy(hidden, weight, torch.tensor([1, 2]),
                                                           k_head, reduction="none")
        assert_close(loss, torch.tensor([math.log(2.0), 0.0], dtype=dtype), dtype)
        (dh,) = torch.autograd.grad(loss[0], hidden)
        assert_close(dh, torch.tensor([[0.0], [0.0]], dtype=dtype), dtype)


def test_reference_loss_leaves_ignored_rows_out():
    # An ignored row counts for nothing, not even 0 * NaN: the reference masked the
    # loss after computing it, so a NaN or an infinity in an ignored row made its
    # gradient NaN (the kernels give 0); and it failed on V = 0 (a gather from an empty
    # row), where every target is ignore_index.
    logits = torch.randn(3, 6, dtype=torch.float64)
    logits[1, 2] = math.nan
    logits[2, 0] = math.inf
    target = torch.tensor([0, -100, -100])
    for fn in (seqfuse.sparse_softmax_cross_entropy, reference.sparse_softmax_cross_entropy):
        for k in (2, 6):
            x = logits.clone().requires_grad_()
            loss = fn(x, target, k, reduction="sum")
            (dx,) = torch.autograd.grad(loss, x)
            assert torch.isfinite(loss) and torch.isfinite(dx).all(), fn
            assert (dx[1:] == 0).all(), fn
        empty = torch.zeros(2, 0, dtype=torch.float64, requires_grad=True)
        loss = fn(empty, torch.tensor([-100, -100]), 3, reduction="none")
        assert torch.equal(loss, torch.zeros(2, dtype=torch.float64)), fn


def test_reference_cross_entropy_without_classes():
    # V = 0 with no row kept: the reference's row maximum was values[..., :1], [R, 0], and
    # indexing its column 0 raised (found by tests/test_property_sparse_softmax.py).
    for R, target in ((0, torch.zeros(0, dtype=torch.long)), (3, torch.full((3,), -100))):
        loss = reference.sparse_softmax_cross_entropy(torch.zeros(R, 0, dtype=torch.float64),
                                                      target, 1, reduction="none")
        assert torch.equal(loss, torch.zeros(R, dtype=torch.float64))
