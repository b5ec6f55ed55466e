"""64-bit indexing: one case per family with a tensor of more than 2^31 elements, on the
CPU kernels (marker `slow`: not in the default run nor CI; `python -m pytest -m slow
tests/test_large_index.py`). Each takes 8-13 GiB of memory and is skipped when the
machine has less available. The entries past 2^31 are checked against the float64
reference on a short slice that determines them, so a 32-bit offset that wraps (or a
crash) fails."""

import math

import pytest
import torch

import seqfuse
from seqfuse import reference
from conftest import assert_close

pytestmark = pytest.mark.slow

HALF = torch.float16
BEYOND = 2**31


def need_gib(gib):
    """Skips unless the machine has `gib` GiB available."""
    with open("/proc/meminfo") as f:
        info = dict(line.split(":", 1) for line in f)
    available = int(info["MemAvailable"].split()[0]) / 2**20
    if available < gib:
        pytest.skip(f"needs {gib} GiB of memory, {available:.1f} available")


def uniform(shape, dtype, lo=-1.0, hi=1.0):
    """Random values straight in `dtype` (no float32 copy of a 2^31-element tensor)."""
    return torch.empty(shape, dtype=dtype).uniform_(lo, hi)


def test_linear_scan_past_2_31():
    # h_t = 0.5 h_{t-1} + b_t over [1, 2^17 + 1, 2^14] float16: the last steps forget
    # all but their last few dozen inputs, which the reference takes from a slice.
    need_gib(10)
    T, C = 2**17 + 1, 2**14
    b = uniform((1, T, C), HALF)
    assert b.numel() > BEYOND
    a = torch.full((C,), 0.5, dtype=HALF)
    h = seqfuse.linear_scan(a, b)
    want = reference.linear_scan(a.double(), b[:, -200:].double())
    assert_close(h[:, -8:], want[:, -8:], HALF)


def test_causal_linear_attention_past_2_31():
    # v and o [1, 2^23 + 1, 1, 256] float16 (Dk = 1 keeps q and k small); decay 0.5, so
    # the last outputs depend only on the last few dozen steps.
    need_gib(10)
    T, Dv = 2**23 + 1, 256
    q = uniform((1, T, 1, 1), HALF, 0.0, 1.0)
    k = uniform((1, T, 1, 1), HALF, 0.0, 1.0)
    v = uniform((1, T, 1, Dv), HALF)
    assert v.numel() > BEYOND
    decay = torch.tensor([0.5])
    o = seqfuse.causal_linear_attention(q, k, v, feature_map="identity", decay=decay,
                                        normalize=False)
    tail = [x[:, -300:].double() for x in (q, k, v)]
    want = reference.causal_linear_attention(*tail, feature_map="identity", decay=decay.double(),
                                             normalize=False)
    assert_close(o[:, -8:], want[:, -8:], HALF)


def test_sparse_softmax_past_2_31():
    need_gib(10)
    R, V = 2**16 + 1, 2**15
    x = uniform((R, V), HALF, -4.0, 4.0)
    assert x.numel() > BEYOND
    p = seqfuse.sparse_softmax(x, 8)
    assert_close(p[-3:], reference.sparse_softmax(x[-3:].double(), 8), HALF)


def test_linear_sparse_softmax_cross_entropy_past_2_31():
    # The weight [2^16 + 1, 2^15] float32 (the CPU has no half types here); forward only
    # (its gradient would take another 8 GiB).
    need_gib(12)
    V, D = 2**16 + 1, 2**15
    weight = uniform((V, D), torch.float32, -0.05, 0.05)
    assert weight.numel() > BEYOND
    hidden = uniform((3, D), torch.float32)
    target = torch.tensor([0, V // 2, V - 1])
    loss = seqfuse.linear_sparse_softmax_cross_entropy(hidden, weight, target, 16,
                                                       reduction="none")
    logits = torch.cat([hidden.double() @ w.double().T for w in weight.split(4096)], 1)
    want = reference.sparse_softmax_cross_entropy(logits, target, 16, reduction="none")
    assert_close(loss, want, torch.float32)


def test_global_pointer_scores_past_2_31():
    # Scores [1, 1, 46341, 46341] float32 (46341^2 > 2^31; float16 is CUDA only), rope
    # and tril on; the last rows against the rotated products in float64.
    need_gib(10)
    L, D = 46341, 2
    q, k = uniform((1, L, 1, D), torch.float32), uniform((1, L, 1, D), torch.float32)
    s = seqfuse.global_pointer_scores(q, k)
    assert s.numel() > BEYOND
    rq, rk = reference.rope(q.double()), reference.rope(k.double())
    want = (rq[0, -2:, 0] @ rk[0, :, 0].T) / math.sqrt(D)
    rows = torch.arange(L - 2, L)[:, None]
    want = want.masked_fill(torch.arange(L)[None, :] < rows, -math.inf)
    got = s[0, 0, -2:].double()
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    keep = torch.isfinite(want)
    assert_close(got[keep], want[keep], torch.float32)
