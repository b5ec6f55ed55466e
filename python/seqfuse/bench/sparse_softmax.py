"""Benchmark of the top-k normalisers: seqfuse's sparse_softmax, topk_softmax and
sparse_softmax_cross_entropy against the PyTorch formulations users write today
(torch.topk + scatter + softmax; logsumexp of torch.topk minus the target logit, with
autograd's dense backward) and, where installed, entmax's ``sparsemax(k=...)``.

The PyTorch formulations here use torch.topk (its own tie order) rather than the
tie-exact stable sort of seqfuse.reference, so they are the fastest plain-PyTorch
versions. GB/s counts the bytes each pass must move: the logits read once per pass,
plus each dense [rows, V] output or gradient written and each dense input read.

The LM-head case times linear_sparse_softmax_cross_entropy (the logits never stored)
against the PyTorch formulation (F.linear + torch.topk + logsumexp + gather, autograd)
and against seqfuse's own unfused pair (F.linear + sparse_softmax_cross_entropy), with
each one's peak extra memory: on CPU the peak resident set of a fresh process running
one forward+backward, less what it held before (the inputs) and the gradients of hidden
and weight; on CUDA the peak allocated bytes above the same. TFLOP/s counts the
products each formulation needs (fused: the forward's 2 N V D; the others three times
that), against the matmul rate measured in the same run.
"""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap

import torch
import torch.nn.functional as F

import seqfuse
from seqfuse.bench.common import (Rows, format_table, matmul_rate, memory_bandwidth,
                                   time_fn)

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


def torch_linear_cross_entropy(hidden, weight, target, k):
    logits = F.linear(hidden, weight)
    lse = torch.logsumexp(torch.topk(logits, k, dim=-1).values.float(), dim=-1)
    return (lse - logits.gather(-1, target[:, None])[:, 0].float()).mean()


def unfused_linear_cross_entropy(hidden, weight, target, k):
    return seqfuse.sparse_softmax_cross_entropy(F.linear(hidden, weight), target, k).float()


LM_HEAD = {
    "seqfuse": "seqfuse.linear_sparse_softmax_cross_entropy",
    "torch": "seqfuse.bench.sparse_softmax.torch_linear_cross_entropy",
    "unfused": "seqfuse.bench.sparse_softmax.unfused_linear_cross_entropy",
}
LM_COLUMNS = ["op", "N x D x V", "k", "dtype", "pass", "seqfuse_ms", "torch_ms", "unfused_ms",
              "x_torch", "x_unfused", "TFLOP/s", "%matmul", "seqfuse_MB", "torch_MB", "unfused_MB",
              "mem_x_torch"]

# Runs one forward+backward of LM_HEAD[impl] in this fresh process and prints its peak
# extra memory in bytes (on CPU: VmHWM, the peak resident set of this process image).
_PEAK_SCRIPT = textwrap.dedent("""
    import importlib, resource, sys, torch
    impl, N, D, V, k, dtype, device = sys.argv[1:]
    N, D, V, k, dtype = int(N), int(D), int(V), int(k), getattr(torch, dtype)
    module, name = impl.rsplit(".", 1)
    fn = getattr(importlib.import_module(module), name)
    h = torch.randn(N, D, device=device, dtype=dtype, requires_grad=True)
    W = torch.randn(V, D, device=device, dtype=dtype, requires_grad=True)
    t = torch.randint(0, V, (N,), device=device)
    grads = (h.numel() + W.numel()) * h.element_size()
    fn(h[:8], W[:64], t[:8] % 64, k).backward()  # pages in the code before the measurement
    h.grad = W.grad = None
    if device == "cpu":
        rss = lambda: int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize()
        # The peak of this process image (ru_maxrss would carry the parent's over exec).
        hwm = lambda: 1024 * int(next(line.split()[1] for line in open("/proc/self/status")
                                      if line.startswith("VmHWM")))
        before = rss()
        fn(h, W, t, k).backward()
        print(hwm() - before - grads)
    else:
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn(h, W, t, k).backward()
        torch.cuda.synchronize()
        print(torch.cuda.max_memory_allocated() - before - grads)
""")


def peak_extra_memory(impl: str, N: int, D: int, V: int, k: int, dtype: torch.dtype,
                      device: str) -> float:
    """Bytes above the inputs and the hidden and weight gradients that one
    forward+backward of LM_HEAD[impl] needs at its peak, measured in a fresh process."""
    out = subprocess.run(
        [sys.executable, "-c", _PEAK_SCRIPT, LM_HEAD[impl], str(N), str(D), str(V), str(k),
         str(dtype)[6:], device], capture_output=True, text=True, check=True)
    return float(out.stdout.split()[-1])


def _lm_head_cases(device: str, quick: bool):
    """(N, D, V, k, dtype)"""
    if quick:
        return [(256, 64, 4096, 10, torch.float32)]
    if device == "cpu":
        return [(4096, 1024, 32_000, 10, torch.float32)]
    return [(4096, 1024, 32_000, 10, dt) for dt in (torch.float32, torch.bfloat16)] + [
        (8192, 4096, 128_256, 10, torch.bfloat16)]


def _lm_head_rows(device: str, quick: bool) -> list[dict]:
    rows = Rows()
    for N, D, V, k, dtype in _lm_head_cases(device, quick):
        rate = matmul_rate(device, dtype)
        hidden = torch.randn(N, D, device=device, dtype=dtype)
        weight = torch.randn(V, D, device=device, dtype=dtype)
        target = torch.randint(0, V, (N,), device=device)
        fns = {"seqfuse": seqfuse.linear_sparse_softmax_cross_entropy,
               "torch": torch_linear_cross_entropy, "unfused": unfused_linear_cross_entropy}
        for backward in (False, True):
            row = {"op": "linear_sparse_softmax_cross_entropy", "N x D x V": f"{N}x{D}x{V}",
                   "k": k, "dtype": str(dtype)[6:], "pass": "fwd+bwd" if backward else "fwd"}
            for impl, fn in fns.items():
                def step(fn=fn, backward=backward):
                    if not backward:
                        return fn(hidden, weight, target, k)
                    h, W = hidden.requires_grad_(), weight.requires_grad_()
                    return torch.autograd.grad(fn(h, W, target, k), (h, W))
                row[f"{impl}_ms"] = 1e3 * time_fn(step, device)
            row["x_torch"] = row["torch_ms"] / row["seqfuse_ms"]
            row["x_unfused"] = row["unfused_ms"] / row["seqfuse_ms"]
            flops = 2 * N * V * D
            row["TFLOP/s"] = flops / (row["seqfuse_ms"] / 1e3) / 1e12
            row["%matmul"] = 100 * flops / (row["seqfuse_ms"] / 1e3) / rate
            if backward:
                for impl in fns:
                    extra = peak_extra_memory(impl, N, D, V, k, dtype, device)
                    row[f"{impl}_MB"] = extra / 2**20
                row["mem_x_torch"] = row["torch_MB"] / max(row["seqfuse_MB"], 1e-3)
            rows.append(row)
    return rows


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
    rows = Rows()
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
    lm_rows = _lm_head_rows(device, quick)
    limits = {"memory_bandwidth_GB/s": bandwidth / 1e9, "threads": torch.get_num_threads(),
              "matmul_float32_TFLOP/s": matmul_rate(device, torch.float32) / 1e12,
              "entmax": "installed" if sparsemax is not None else "not installed"}
    note = ("" if device != "cpu" or quick else
            "\n(CPU: the 1024x152k and 256x256k shapes are cut to 256 and 64 rows to keep the "
            "PyTorch baselines' run time reasonable)")
    return (limits, rows + lm_rows,
            format_table(rows, COLUMNS) + note + "\n\n" + format_table(lm_rows, LM_COLUMNS))
