"""Benchmark of linear_scan: seqfuse vs the sequential loop reference, the log-space
closed form (valid here: a in (0.5, 1), b > 0), torch.addcmul as the floor with the
same memory traffic (two tensors read, one written) and, on CUDA, accelerated-scan
when it is installed (timed in its native [B, C, T] layout).

Packed sequences: 64 sequences with lengths drawn uniformly from [1, 2048] (a fixed
seed), C = 512, float32, a per-channel `a`, forward and forward+backward: one call
with cu_seqlens against a Python loop of one call per sequence and against padding
every sequence to the longest (a [64, T_max, C] call whose padded steps are masked
out of the result)."""

from __future__ import annotations

import torch

import seqfuse
from seqfuse import reference
from seqfuse.bench.common import Rows, format_table, memory_bandwidth, time_fn

COLUMNS = ["shape", "a", "dtype", "pass", "seqfuse_ms", "loop_ms", "logspace_ms",
           "accel_scan_ms", "addcmul_ms", "x_loop", "x_accel", "vs_addcmul", "GB/s",
           "%bw"]
PACKED_COLUMNS = ["case", "dtype", "pass", "packed_ms", "per_sequence_ms", "padded_ms",
                  "x_per_sequence", "x_padded", "GB/s", "%bw"]


def _accelerated_scan():
    try:
        from accelerated_scan.warp import scan
    except ImportError:
        return None
    return scan


def _cases(device: str, quick: bool):
    if quick:
        return [((2, 257, 64), "full", torch.float32), ((2, 257, 64), "[C]", torch.float32)]
    if device == "cpu":
        return [((8, 4096, 512), "full", torch.float32), ((8, 4096, 512), "[C]", torch.float32),
                ((8, 4096, 512), "full", torch.float64), ((1, 100_000, 64), "full", torch.float32),
                ((8, 2048, 256), "[C]", torch.complex64)]
    cases = []
    for T in (4096, 16384, 65536):
        cases += [((8, T, 1536), "full", torch.float32), ((8, T, 1536), "full", torch.bfloat16),
                  ((8, T, 1536), "[C]", torch.float32)]
    return cases + [((8, 4096, 1536), "[C]", torch.complex64)]


def _inputs(shape, a_kind, dtype, device):
    B, T, C = shape
    real = torch.float32 if dtype.is_complex else dtype
    a = torch.empty((B, T, C) if a_kind == "full" else (C,), device=device).uniform_(0.5, 1)
    b = torch.rand(shape, device=device) + 0.1
    if dtype.is_complex:
        a, b = torch.polar(a, torch.rand_like(a)), torch.complex(b, torch.rand_like(b))
    return a.to(dtype if dtype.is_complex else real), b.to(dtype if dtype.is_complex else real)


def _fwd_bwd(fn, *inputs):
    leaves = [x.detach().requires_grad_() for x in inputs]
    def run():
        out = fn(*leaves)
        (out.real if out.is_complex() else out).sum().backward()
    return run


def run(device: str, quick: bool):
    bandwidth = memory_bandwidth(device)
    accel = _accelerated_scan() if device.startswith("cuda") else None
    rows = Rows()
    for shape, a_kind, dtype in _cases(device, quick):
        a, b = _inputs(shape, a_kind, dtype, device)
        B, T, C = shape
        loop_ok = T * (1 if device == "cpu" else 4) <= 20_000 or quick
        for pass_name in ("fwd", "fwd+bwd"):
            row = {"shape": "x".join(map(str, shape)), "a": a_kind, "dtype": str(dtype)[6:],
                   "pass": pass_name}
            if pass_name == "fwd":
                step = lambda fn: (lambda: fn(a, b))
            else:
                step = lambda fn: _fwd_bwd(fn, a, b)
            row["seqfuse_ms"] = 1e3 * time_fn(step(seqfuse.linear_scan), device)
            if loop_ok:
                row["loop_ms"] = 1e3 * time_fn(step(reference.linear_scan), device, min_time=0.1)
                row["x_loop"] = row["loop_ms"] / row["seqfuse_ms"]
            if not dtype.is_complex:
                row["logspace_ms"] = 1e3 * time_fn(step(reference.linear_scan_logspace), device)
            # accelerated-scan 0.3.1's bfloat16 backward made an illegal memory access on
            # an H200 at 8x1536x4096 (its [B, C, T] layout), which ends the CUDA context:
            # it is timed forward only in bfloat16.
            accel_ok = dtype == torch.float32 or (dtype == torch.bfloat16 and pass_name == "fwd")
            if accel is not None and accel_ok and T & (T - 1) == 0:
                gates = a.expand(shape).transpose(1, 2).contiguous()
                tokens = b.transpose(1, 2).contiguous()
                accel_step = ((lambda: accel(gates, tokens)) if pass_name == "fwd"
                              else _fwd_bwd(accel, gates, tokens))
                row["accel_scan_ms"] = 1e3 * time_fn(accel_step, device)
                row["x_accel"] = row["accel_scan_ms"] / row["seqfuse_ms"]
            if pass_name == "fwd":
                full_a = a.expand(shape).contiguous() if a_kind == "full" else None
                if full_a is not None and not dtype.is_complex:
                    row["addcmul_ms"] = 1e3 * time_fn(lambda: torch.addcmul(b, full_a, b), device)
                    row["vs_addcmul"] = row["seqfuse_ms"] / row["addcmul_ms"]
                moved = (2 + (a_kind == "full")) * b.numel() * b.element_size()
                row["GB/s"] = moved / row["seqfuse_ms"] / 1e6
                row["%bw"] = 100 * moved / (row["seqfuse_ms"] / 1e3) / bandwidth
            rows.append(row)
    packed = _packed_rows(device, quick, bandwidth)
    rows += packed
    limits = {"memory_bandwidth_GB/s": bandwidth / 1e9, "threads": torch.get_num_threads()}
    return limits, rows, format_table(rows[:-len(packed)], COLUMNS) + "\n\n" + format_table(
        packed, PACKED_COLUMNS)


def _packed_rows(device: str, quick: bool, bandwidth: float):
    """One packed call against a loop of per-sequence calls and against padding."""
    N, C, longest = (8, 64, 200) if quick else (64, 512, 2048)
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, longest + 1, (N,), generator=gen)
    cu = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)]).to(device)
    T, T_max = int(lengths.sum()), int(lengths.max())
    a = torch.empty(C, device=device).uniform_(0.5, 1)
    b = torch.rand(1, T, C, device=device) + 0.1
    bounds = cu.tolist()
    # Padding: every sequence at the start of its own row; the mask keeps real steps.
    steps = torch.arange(T_max, device=device)
    mask = steps[None, :] < lengths.to(device)[:, None]
    padded = b.new_zeros(N, T_max, C)
    padded[mask] = b[0]

    def packed_call(a, b):
        return seqfuse.linear_scan(a, b, cu_seqlens=cu)

    def per_sequence_call(a, b):
        return torch.cat([seqfuse.linear_scan(a, b[:, s:e]) for s, e in zip(bounds, bounds[1:])],
                         dim=1)

    def padded_call(a, b_padded):
        return seqfuse.linear_scan(a, b_padded)[mask]

    rows = Rows()
    for pass_name in ("fwd", "fwd+bwd"):
        row = {"case": f"{N} seqs, lengths 1..{longest}, T={T}, C={C}", "dtype": "float32",
               "pass": pass_name}
        for col, fn, data in (("packed_ms", packed_call, b), ("per_sequence_ms", per_sequence_call,
                              b), ("padded_ms", padded_call, padded)):
            step = (lambda fn=fn, data=data: (lambda: fn(a, data))) if pass_name == "fwd" else (
                lambda fn=fn, data=data: _fwd_bwd(fn, a, data))
            row[col] = 1e3 * time_fn(step(), device)
        row["x_per_sequence"] = row["per_sequence_ms"] / row["packed_ms"]
        row["x_padded"] = row["padded_ms"] / row["packed_ms"]
        if pass_name == "fwd":
            moved = 2 * b.numel() * b.element_size()  # b read, h written; a is C numbers
            row["GB/s"] = moved / row["packed_ms"] / 1e6
            row["%bw"] = 100 * moved / (row["packed_ms"] / 1e3) / bandwidth
        rows.append(row)
    return rows
