"""Benchmark of GlobalPointer scoring + loss, forward+backward (gradients of q and k):

- torch_sparse / torch_dense: the PyTorch formulation of bert4torch / bert4keras ports:
  RoPE, einsum, padding and lower-triangle masks and the scale as separate passes over
  [B, H, L, L], then the textbook sparse loss, or dense labels and the dense loss;
- seqfuse: global_pointer_scores + sparse_multilabel_categorical_crossentropy;
- fused: global_pointer_loss, which never materialises [B, H, L, L].

Peak memory is the extra memory of one forward+backward: on CUDA the allocator's peak
above what was allocated before; on CPU the peak resident growth of a fresh process
(VmHWM after minus before), one process per measurement.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys

import torch

import seqfuse
from seqfuse.bench.common import Rows, format_table, matmul_rate, time_fn

COLUMNS = ["case", "shape", "dtype", "method", "fwd+bwd_ms", "x_torch", "peak_MB",
           "mem_vs_seqfuse", "TFLOP/s"]
METHODS = ["torch_sparse", "torch_dense", "seqfuse", "fused"]


def _inputs(B, L, H, D, dtype, device, P=8, seed=0):
    """q, k [B, L, H, D]; mask [B, L] of random lengths; P positive spans (i <= j < length)
    per (b, h) as flat indices."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, L, H, D, generator=g).to(device, dtype)
    k = torch.randn(B, L, H, D, generator=g).to(device, dtype)
    lengths = torch.randint(L // 2, L + 1, (B,), generator=g)
    mask = (torch.arange(L) < lengths[:, None]).to(device, torch.int32)
    i = (torch.rand(B, H, P, generator=g) * lengths[:, None, None]).long()
    j = i + (torch.rand(B, H, P, generator=g) * (lengths[:, None, None] - i)).long()
    return q, k, mask, (i * L + j).to(device)


def _torch_rope(x):
    L, D = x.shape[1], x.shape[-1]
    position = torch.arange(L, device=x.device, dtype=torch.float32)[:, None]
    freq = torch.pow(10000.0, -2 * torch.arange(D // 2, device=x.device, dtype=torch.float32) / D)
    angle = position * freq
    cos = angle.cos().repeat_interleave(2, -1)[None, :, None].to(x.dtype)
    sin = angle.sin().repeat_interleave(2, -1)[None, :, None].to(x.dtype)
    x2 = torch.stack([-x[..., 1::2], x[..., ::2]], -1).reshape(x.shape)
    return x * cos + x2 * sin


def _torch_scores(q, k, mask):
    L, D = q.shape[1], q.shape[-1]
    s = torch.einsum("bmhd,bnhd->bhmn", _torch_rope(q), _torch_rope(k))
    pad = mask == 0
    s = s.masked_fill(pad[:, None, :, None] | pad[:, None, None, :], float("-inf"))
    s = s.masked_fill(torch.ones(L, L, dtype=torch.bool, device=q.device).tril(-1), float("-inf"))
    return s / D**0.5


def _torch_dense_loss(scores, labels):
    y_pred = (1 - 2 * labels) * scores
    y_neg = y_pred - labels * 1e12
    y_pos = y_pred - (1 - labels) * 1e12
    zeros = torch.zeros_like(y_pred[..., :1])
    return (torch.logsumexp(torch.cat([y_neg, zeros], -1), -1)
            + torch.logsumexp(torch.cat([y_pos, zeros], -1), -1)).mean()


def fwd_bwd_step(method, q, k, mask, idx):
    """A callable running one forward+backward of `method` (one of METHODS)."""
    from seqfuse.reference import sparse_multilabel_categorical_crossentropy_textbook

    def run():
        if method == "fused":
            loss = seqfuse.global_pointer_loss(q, k, idx, mask=mask, mask_zero=False)
        elif method == "seqfuse":
            s = seqfuse.global_pointer_scores(q, k, mask=mask)
            loss = seqfuse.sparse_multilabel_categorical_crossentropy(s.flatten(-2), idx, False)
        else:
            s = _torch_scores(q, k, mask).flatten(-2)
            if method == "torch_sparse":
                loss = sparse_multilabel_categorical_crossentropy_textbook(s, idx, False)
            else:
                labels = torch.zeros_like(s).scatter_(-1, idx, 1.0)
                loss = _torch_dense_loss(s, labels)
        loss.backward()
    return run


def leaf_inputs(B, L, H, D, dtype, device):
    """The benchmark inputs with q and k as leaves requiring grad."""
    q, k, mask, idx = _inputs(B, L, H, D, dtype, device)
    return q.requires_grad_(), k.requires_grad_(), mask, idx


def _peak_rss() -> int:
    """Peak resident bytes of this process. VmHWM belongs to the address space, so a
    fresh process starts from its own; ru_maxrss (the fallback off Linux) can carry the
    parent's peak across fork + exec."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_memory_child(method, B, L, H, D, dtype_name):
    """Runs in a fresh process: prints the peak resident growth (bytes) of one
    forward+backward on CPU."""
    torch.set_num_threads(int(os.environ.get("SEQFUSE_BENCH_THREADS", "1")))
    q, k, mask, idx = leaf_inputs(B, L, H, D, getattr(torch, dtype_name), "cpu")
    before = _peak_rss()
    fwd_bwd_step(method, q, k, mask, idx)()
    print(json.dumps({"peak_bytes": _peak_rss() - before}))


def _peak_memory(method, shape, dtype, device):
    B, L, H, D = shape
    if device.startswith("cuda"):
        q, k, mask, idx = leaf_inputs(B, L, H, D, dtype, device)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fwd_bwd_step(method, q, k, mask, idx)()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    package_root = os.path.dirname(os.path.dirname(seqfuse.__file__))
    path = os.pathsep.join([package_root, os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, PYTHONPATH=path, SEQFUSE_BENCH_THREADS=str(torch.get_num_threads()))
    code = ("from seqfuse.bench.global_pointer import peak_memory_child; "
            f"peak_memory_child({method!r}, {B}, {L}, {H}, {D}, {str(dtype)[6:]!r})")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         check=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_bytes"]


def _cases(device, quick):
    if quick:
        return [("quick", (2, 64, 3, 64), METHODS)]
    return [("NER", (16, 256, 10, 64), METHODS),
            ("GPLinker", (16, 256, 2 + 2 * 48, 64), METHODS),
            ("long", (2, 1024, 2 + 2 * 48, 64), ["seqfuse", "fused"])]


def run(device: str, quick: bool):
    dtypes = [torch.float32] if device == "cpu" else [torch.bfloat16, torch.float16]
    rows = Rows()
    for dtype in dtypes:
        for case, shape, methods in _cases(device, quick):
            B, L, H, D = shape
            q, k, mask, idx = leaf_inputs(B, L, H, D, dtype, device)
            flops = 3 * 2 * B * H * L * L * D  # forward product + two backward products
            case_rows = []
            for method in methods:
                ms = 1e3 * time_fn(fwd_bwd_step(method, q, k, mask, idx), device, min_time=0.3,
                                   warmup=1)
                row = {"case": case, "shape": "x".join(map(str, shape)),
                       "dtype": str(dtype)[6:], "method": method, "fwd+bwd_ms": ms,
                       "peak_MB": _peak_memory(method, shape, dtype, device) / 2**20,
                       "TFLOP/s": flops / ms / 1e9}
                case_rows.append(row)
            by = {r["method"]: r for r in case_rows}
            for r in case_rows:
                if "torch_sparse" in by:
                    r["x_torch"] = by["torch_sparse"]["fwd+bwd_ms"] / r["fwd+bwd_ms"]
                r["mem_vs_seqfuse"] = by["seqfuse"]["peak_MB"] / max(r["peak_MB"], 1e-9)
            rows += case_rows
    limits = {f"matmul_TFLOP/s_{str(d)[6:]}": matmul_rate(device, d) / 1e12 for d in dtypes}
    limits["threads"] = torch.get_num_threads()
    return limits, rows, format_table(rows, COLUMNS)
