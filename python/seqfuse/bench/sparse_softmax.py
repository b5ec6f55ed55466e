"""Benchmark of the top-k normalisers: seqfuse's sparse_softmax, topk_softmax and
sparse_softmax_cross_entropy against the PyTorch formulations users write today
(torch.topk + scatter + softmax; logsumexp of torch.topk minus the target logit, with
autograd's dense backward) and, where installed, entmax's ``sparsemax(k=...)``.

The PyTorch formulations here use torch.topk (its own tie order) rather than the
tie-exact stable sort of seqfuse.reference, so they are the fastest plain-PyTorch
versions. GB/s counts the bytes each pass must move: the logits read once per pass,
plus each dense [rows, V] output or gradient written and each dense input read.
"""

from __future__ import annotations

import math

import torch

import seqfuse
from seqfuse.bench.common import format_table, memory_bandwidth, time_fn

COLUMNS = ["op", "rows x V", "k", "dtype", "pass", "seqfuse_ms", "torch_ms", "entmax_ms",
           "x_torch", "x_entmax", "GB/s", "%bw"]


def _sparsemax():
    try:
        from entmax import sparsemax
    except ImportError:
        return None
    return sparsemax


def torch_sparse_softmax(x, k):
    values, indices = torch.topk(x, k, dim=-1)
    return torch.softmax(torch.full_like(x, -math.inf).scatter(-1, indices, values), dim=-1)


def torch_topk_softmax(x, k):
    values, indices = torch.topk(x, k, dim=-1)
    return torch.softmax(values, dim=-1), indices


def torch_cross_entropy(logits, target, k):
    lse = torch.logsumexp(torch.topk(logits, k, dim=-1).values, dim=-1)
    return (lse - logits.gather(-1, target[:, None])[:, 0]).mean()


def _cases(device: str, quick: bool):
    """(rows, V, k, dtype); CPU rows are cut for the two long vocabularies."""
    if quick:
        return [(64, 4096, 10, torch.float32)]
    if device == "cpu":
        shapes = [(4096, 32_000), (256, 152_000), (64, 256_000)]
        dtypes = [torch.float32]
    else:
        shapes = [(4096, 32_000), (1024, 152_000), (256, 256_000)]
        dtypes = [torch.float32, torch.bfloat16]
    return [(R, V, k, dt) for R, V in shapes for k in (10, 64) for dt in dtypes]


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def _step(fn, x, *args, backward: bool):
    if not backward:
        return lambda: fn(x, *args)
    leaf = x.detach().requires_grad_()
    grad = torch.randn_like(_first(fn(leaf, *args)))
    return lambda: torch.autograd.grad(_first(fn(leaf, *args)), leaf, grad)


def run(device: str, quick: bool):
    bandwidth = memory_bandwidth(device)
    sparsemax = _sparsemax()
    rows = []
    for R, V, k, dtype in _cases(device, quick):
        x = torch.randn(R, V, device=device, dtype=dtype)
        target = torch.randint(0, V, (R,), device=device)
        ops = [
            ("sparse_softmax", seqfuse.sparse_softmax, torch_sparse_softmax, (k,), 1),
            ("topk_softmax", seqfuse.topk_softmax, torch_topk_softmax, (k,), 0),
            ("sparse_softmax_cross_entropy", seqfuse.sparse_softmax_cross_entropy,
             torch_cross_entropy, (target, k), 0),
        ]
        for name, ours, theirs, args, dense_out in ops:
            for backward in (False, True):
                row = {"op": name, "rows x V": f"{R}x{V}", "k": k, "dtype": str(dtype)[6:],
                       "pass": "fwd+bwd" if backward else "fwd"}
                row["seqfuse_ms"] = 1e3 * time_fn(_step(ours, x, *args, backward=backward),
                                                  device)
                row["torch_ms"] = 1e3 * time_fn(_step(theirs, x, *args, backward=backward),
                                                device)
                row["x_torch"] = row["torch_ms"] / row["seqfuse_ms"]
                if sparsemax is not None and name == "sparse_softmax":
                    row["entmax_ms"] = 1e3 * time_fn(
                        _step(lambda t, kk: sparsemax(t, dim=-1, k=kk), x, k, backward=backward),
                        device)
                    row["x_entmax"] = row["entmax_ms"] / row["seqfuse_ms"]
                # fwd: read x, write a dense output; the backward writes dx and, for the
                # dense output, reads it and its gradient.
                passes = 1 + dense_out + (1 + 2 * dense_out if backward else 0)
                moved = passes * x.numel() * x.element_size()
                row["GB/s"] = moved / row["seqfuse_ms"] / 1e6
                row["%bw"] = 100 * moved / (row["seqfuse_ms"] / 1e3) / bandwidth
                rows.append(row)
    limits = {"memory_bandwidth_GB/s": bandwidth / 1e9, "threads": torch.get_num_threads(),
              "entmax": "installed" if sparsemax is not None else "not installed"}
    note = ("" if device != "cpu" or quick else
            "\n(CPU: the 1024x152k and 256x256k shapes are cut to 256 and 64 rows to keep the "
            "PyTorch baselines' run time reasonable)")
    return limits, rows, format_table(rows, COLUMNS) + note
