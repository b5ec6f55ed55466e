"""Benchmark of causal_linear_attention: seqfuse vs the quadratic masked and recurrent
references and, when installed, the public anchors: on CUDA flash-linear-attention's
chunk_linear_attn and fused_chunk_linear_attn, on the CPU fast-transformers'
causal_dot_product (its CPU kernel: identity features and no normaliser only, q, k, v
laid out [B, H, T, D], which it is given outside the timing); forward and
forward+backward, plus the per-token latency of decoding (T = 1 with a carried state).

FLOP counts are those of the chunked algorithm with 64-step chunks, counting only the
causal halves of the intra-chunk products: per step 4*Dk*Dv (reading the state and
updating it) + 65*(Dk + Dv) (the lower triangle of phi(Q) phi(K)^T and its product
with V); forward+backward three times that. The count is the same for every
implementation of a row, so their rates compare (seqfuse's CPU kernel runs 64-step
chunks from D = 128 and 16-step ones below, where it does a little less). Bytes are q,
k, v read and o written once (twice that for fwd+bwd). On the CPU, seqfuse is also
timed on one thread (seqfuse_1thread_ms, x_threads = its ratio to the run's thread
count), and rows with another feature map or the normaliser get x_identity, their
time over the identity map without the normaliser on the same inputs. x_ft_cpu and
x_identity are the medians of ratios of calls made in alternation (time_paired), which a
machine whose speed drifts moves much less than two medians taken apart. The anchor
fast-transformers gets its own GFLOP/s and %matmul (the row's FLOPs over its time). The
recurrent reference is timed forward only (its backward is T steps of autograd), and skipped
above T = 1024 on CPU; the quadratic one where its [B, H, T, T] scores pass 2 GiB.

Packed sequences: 64 sequences with lengths drawn uniformly from [1, 2048] (a fixed
seed), H = 8, D = 64, float32, elu1, normalised, forward and forward+backward: one call
with cu_seqlens against a Python loop of one call per sequence and against padding
every sequence to the longest (a [64, T_max, H, D] call whose padded steps are masked
out of the result).
"""

from __future__ import annotations

import torch

import seqfuse
from seqfuse import reference
from seqfuse.bench.common import (Rows, format_table, matmul_rate, memory_bandwidth,
                                   time_fn, time_paired)

COLUMNS = ["case", "dtype", "phi", "norm", "pass", "seqfuse_ms", "quadratic_ms", "recurrent_ms",
           "ft_cpu_ms", "fla_chunk_ms", "fla_fused_ms", "x_quadratic", "x_recurrent", "x_ft_cpu",
           "x_fla_chunk", "seqfuse_1thread_ms", "x_threads", "x_identity", "GFLOP/s", "%matmul",
           "ft_cpu_GFLOP/s", "ft_cpu_%matmul", "GB/s", "%bw"]


def _fla():
    try:
        from fla.ops.linear_attn import chunk_linear_attn, fused_chunk_linear_attn
    except ImportError:
        return {}
    return {"fla_chunk_ms": chunk_linear_attn, "fla_fused_ms": fused_chunk_linear_attn}


def _fast_transformers():
    try:
        from fast_transformers.causal_product import causal_dot_product
    except ImportError:
        return None
    return causal_dot_product


def _cases(device: str, quick: bool):
    """(B, H, T, D, dtype, feature_map, normalize)"""
    if quick:
        return [(1, 2, 200, 32, torch.float32, "identity", False),
                (1, 2, 200, 32, torch.float32, "elu1", True)]
    if device == "cpu":
        return [(2, 8, 1024, 64, torch.float32, "identity", False),
                (2, 8, 1024, 64, torch.float32, "elu1", True),
                (2, 8, 1024, 128, torch.float32, "elu1", True),
                (1, 8, 4096, 128, torch.float32, "elu1", True),
                (1, 2, 8192, 64, torch.float32, "elu1", True)]
    # Four cases: flash-linear-attention autotunes its Triton kernels per shape, which
    # takes most of this family's time in the GPU suite.
    return [(8, 16, 2048, 64, torch.bfloat16, "elu1", True),
            (8, 16, 4096, 128, torch.bfloat16, "elu1", True),
            (8, 16, 4096, 64, torch.bfloat16, "elu1", False),
            (8, 16, 2048, 64, torch.float32, "elu1", True)]


def _flops(B, H, T, D):
    return B * H * T * (4 * D * D + 65 * 2 * D)


def _step(fn, leaves, backward):
    """One call of fn on leaves (and with backward, its backward pass), as a thunk."""
    if not backward:
        return lambda: fn(*leaves)

    def step():
        for x in leaves:
            x.grad = None
        out = fn(*leaves)
        (out[0] if isinstance(out, tuple) else out).float().sum().backward()
    return step


def _timed(fn, leaves, backward, device, slow=False):
    # The references take seconds per call on a CPU: one warm-up and three timed runs.
    opts = dict(warmup=1, min_time=0.0) if slow else {}
    return time_fn(_step(fn, leaves, backward), device, **opts)


def _one_thread(fn):
    """fn run with one thread (the CPU pool restored after)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fn()
    finally:
        torch.set_num_threads(threads)


def _decode_rows(device: str, quick: bool):
    """Per-token latency of one decoding step with a carried state, B=1, H=16, D=128."""
    B, H, D = 1, 16, 32 if quick else 128
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    q, k, v = (torch.randn(B, 1, H, D, device=device, dtype=dtype) for _ in range(3))
    state = (torch.randn(B, H, D, D, device=device), torch.rand(B, H, D, device=device) + 1)
    kw = dict(feature_map="elu1", initial_state=state, return_state=True)
    row = {"case": f"decode {B}x{H}x1x{D}", "dtype": str(dtype)[6:], "phi": "elu1", "norm": True,
           "pass": "step"}
    row["seqfuse_ms"] = 1e3 * time_fn(lambda: seqfuse.causal_linear_attention(q, k, v, **kw), device)
    row["recurrent_ms"] = 1e3 * time_fn(
        lambda: reference.causal_linear_attention(q, k, v, **kw), device, min_time=0.1)
    row["x_recurrent"] = row["recurrent_ms"] / row["seqfuse_ms"]
    moved = 2 * state[0].numel() * 4  # the state is read and written once
    row["GB/s"] = moved / row["seqfuse_ms"] / 1e6
    return [row]


def _anchors(device, feature_map, normalize, fla, fast_transformers):
    """name -> fn(q, k, v) for the public anchors that compute this case."""
    impls = {}
    # fla applies no feature map: give it the same phi(q), phi(k).
    for name, fn in fla.items():
        impls[name] = (lambda fn: lambda q, k, v: fn(
            torch.nn.functional.elu(q) + 1, torch.nn.functional.elu(k) + 1, v,
            normalize=normalize))(fn)
    if fast_transformers is not None and device == "cpu" and feature_map == "identity" and not normalize:
        impls["ft_cpu_ms"] = fast_transformers
    return impls


def _check_fast_transformers(fn, q, k, v):
    """fast-transformers computes sum_{j<=i} (q_i . k_j) v_j, which is seqfuse's identity,
    unnormalised map with scale 1: say so when the two disagree (then the anchor's row
    compares different work)."""
    ft = fn(*(x.transpose(1, 2).contiguous() for x in (q, k, v))).transpose(1, 2)
    ours = seqfuse.causal_linear_attention(q, k, v, feature_map="identity", normalize=False,
                                           scale=1.0)
    if not torch.allclose(ft, ours, rtol=1e-3, atol=1e-3 * ours.abs().max().item()):
        print("  warning: fast-transformers' causal_dot_product disagrees with seqfuse")


def run(device: str, quick: bool):
    bandwidth = memory_bandwidth(device)
    fla = _fla() if device.startswith("cuda") else {}
    fast_transformers = _fast_transformers() if device == "cpu" else None
    rates = {}
    rows = Rows()
    for B, H, T, D, dtype, feature_map, normalize in _cases(device, quick):
        if dtype not in rates:
            rates[dtype] = matmul_rate(device, dtype)
        q, k, v = (torch.randn(B, T, H, D, device=device, dtype=dtype) for _ in range(3))
        kw = dict(feature_map=feature_map, normalize=normalize)
        impls = {
            "seqfuse_ms": lambda q, k, v: seqfuse.causal_linear_attention(q, k, v, **kw),
            "quadratic_ms": lambda q, k, v: reference.causal_linear_attention_quadratic(q, k, v, **kw),
            "recurrent_ms": lambda q, k, v: reference.causal_linear_attention(q, k, v, **kw),
        }
        anchors = _anchors(device, feature_map, normalize, fla, fast_transformers)
        impls.update(anchors)
        if "ft_cpu_ms" in anchors:
            _check_fast_transformers(fast_transformers, q, k, v)
        quadratic_ok = B * H * T * T * 4 <= (1 << 31)
        recurrent_ok = T <= (1024 if device == "cpu" else 2048) or quick
        for backward in (False, True):
            # The recurrent reference's backward walks T steps of autograd: forward only.
            recurrent_ok = recurrent_ok and not (backward and not quick)
            row = {"case": f"{B}x{H}x{T}x{D}", "dtype": str(dtype)[6:], "phi": feature_map,
                   "norm": normalize, "pass": "fwd+bwd" if backward else "fwd"}
            for name, fn in impls.items():
                if (name == "quadratic_ms" and not quadratic_ok) or (
                        name == "recurrent_ms" and not recurrent_ok):
                    continue
                leaves = [x.detach().requires_grad_(backward) for x in (q, k, v)]
                if name == "ft_cpu_ms":  # its layout, [B, H, T, D], made outside the timing
                    leaves = [x.detach().transpose(1, 2).contiguous().requires_grad_(backward)
                              for x in (q, k, v)]
                slow = device == "cpu" and name in ("quadratic_ms", "recurrent_ms")
                try:
                    row[name] = 1e3 * _timed(fn, leaves, backward, device, slow=slow)
                except (RuntimeError, TypeError, ValueError) as err:  # an anchor's API or limits
                    if name == "seqfuse_ms":
                        raise
                    row[name] = None
                    print(f"  {name} skipped for {row['case']}: {err}")
            if device == "cpu":
                leaves = [x.detach().requires_grad_(backward) for x in (q, k, v)]
                row["seqfuse_1thread_ms"] = 1e3 * _one_thread(
                    lambda: _timed(impls["seqfuse_ms"], leaves, backward, device))
                row["x_threads"] = row["seqfuse_1thread_ms"] / row["seqfuse_ms"]
            for ref, col in (("quadratic_ms", "x_quadratic"), ("recurrent_ms", "x_recurrent"),
                             ("ft_cpu_ms", "x_ft_cpu"), ("fla_chunk_ms", "x_fla_chunk")):
                if row.get(ref):
                    row[col] = row[ref] / row["seqfuse_ms"]
            # The ratios the CPU targets read are timed again in pairs (time_paired): the
            # anchor against seqfuse, and this feature map against the identity.
            leaves = [x.detach().requires_grad_(backward) for x in (q, k, v)]
            ours = _step(impls["seqfuse_ms"], leaves, backward)
            if row.get("ft_cpu_ms"):
                ft_leaves = [x.detach().transpose(1, 2).contiguous().requires_grad_(backward)
                             for x in (q, k, v)]
                _, _, row["x_ft_cpu"] = time_paired(
                    ours, _step(fast_transformers, ft_leaves, backward), device)
            if device == "cpu" and (feature_map != "identity" or normalize):
                identity = _step(lambda q, k, v: seqfuse.causal_linear_attention(q, k, v, normalize=False),
                                 leaves, backward)
                _, _, row["x_identity"] = time_paired(identity, ours, device)
            flops = _flops(B, H, T, D) * (3 if backward else 1)
            row["GFLOP/s"] = flops / row["seqfuse_ms"] / 1e6
            row["%matmul"] = 100 * flops / (row["seqfuse_ms"] / 1e3) / rates[dtype]
            if row.get("ft_cpu_ms"):
                row["ft_cpu_GFLOP/s"] = flops / row["ft_cpu_ms"] / 1e6
                row["ft_cpu_%matmul"] = 100 * flops / (row["ft_cpu_ms"] / 1e3) / rates[dtype]
            moved = 4 * B * T * H * D * q.element_size() * (2 if backward else 1)
            row["GB/s"] = moved / row["seqfuse_ms"] / 1e6
            row["%bw"] = 100 * moved / (row["seqfuse_ms"] / 1e3) / bandwidth
            rows.append(row)
    rows += _decode_rows(device, quick)
    packed = _packed_rows(device, quick)
    rows += packed
    limits = {"memory_bandwidth_GB/s": bandwidth / 1e9,
              **{f"matmul_{str(d)[6:]}_GFLOP/s": r / 1e9 for d, r in rates.items()},
              "threads": torch.get_num_threads()}
    return limits, rows, format_table(rows[:-len(packed)], COLUMNS) + "\n\n" + format_table(
        packed, PACKED_COLUMNS)


PACKED_COLUMNS = ["case", "dtype", "pass", "packed_ms", "per_sequence_ms", "padded_ms",
                  "x_per_sequence", "x_padded"]


def _packed_rows(device: str, quick: bool):
    """One packed call against a loop of per-sequence calls and against padding."""
    N, H, D, longest = (6, 2, 16, 100) if quick else (64, 8, 64, 2048)
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, longest + 1, (N,), generator=gen)
    cu = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)]).to(device)
    T, T_max = int(lengths.sum()), int(lengths.max())
    q, k, v = (torch.randn(1, T, H, D, device=device) for _ in range(3))
    bounds = cu.tolist()
    mask = torch.arange(T_max, device=device)[None, :] < lengths.to(device)[:, None]
    padded = []
    for x in (q, k, v):
        p = x.new_zeros(N, T_max, H, D)
        p[mask] = x[0]
        padded.append(p)
    kw = dict(feature_map="elu1", normalize=True)

    def packed_call(q, k, v):
        return seqfuse.causal_linear_attention(q, k, v, cu_seqlens=cu, **kw)

    def per_sequence_call(q, k, v):
        return torch.cat([seqfuse.causal_linear_attention(q[:, s:e], k[:, s:e], v[:, s:e], **kw)
                          for s, e in zip(bounds, bounds[1:])], dim=1)

    def padded_call(q, k, v):
        return seqfuse.causal_linear_attention(q, k, v, **kw)[mask]

    rows = Rows()
    for backward in (False, True):
        row = {"case": f"{N} seqs, lengths 1..{longest}, T={T}, H={H}, D={D}", "dtype": "float32",
               "pass": "fwd+bwd" if backward else "fwd"}
        for col, fn, data in (("packed_ms", packed_call, (q, k, v)),
                              ("per_sequence_ms", per_sequence_call, (q, k, v)),
                              ("padded_ms", padded_call, padded)):
            leaves = [x.detach().requires_grad_(backward) for x in data]
            row[col] = 1e3 * _timed(fn, leaves, backward, device)
        row["x_per_sequence"] = row["per_sequence_ms"] / row["packed_ms"]
        row["x_padded"] = row["padded_ms"] / row["packed_ms"]
        rows.append(row)
    return rows
