"""Calls every CUDA kernel of seqfuse once, forward and backward, in every dtype, on
small inputs: the workload that benchmarks/gpu/run.sh hands to compute-sanitizer
(memcheck, racecheck, initcheck).

    python benchmarks/gpu/sanitize.py [--device cuda|cpu] [--dtypes float32,...]

Shapes are chosen to reach each kernel's distinct paths (a partial last tile, more
than one chunk or tile, each row-length regime of the top-k kernels, k >= V), not to
test the maths: the tests do that. Each case runs in its own try block, so one failure
is reported and the rest still run; the exit code is 1 if any case raised. On a GPU
the sanitizer's own report (and its --error-exitcode) is the verdict; `--device cpu`
runs the same calls on the CPU kernels so that the script is exercised without a GPU.
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback

import torch

import seqfuse

DTYPES = {"cuda": ["float32", "float64", "float16", "bfloat16"],
          "cpu": ["float32", "float64"]}


def _backward(*outputs, inputs):
    """Backpropagates random cotangents through every floating output into `inputs`."""
    outs, grads = [], []
    for out in outputs:
        if isinstance(out, torch.Tensor) and out.requires_grad:
            outs.append(out)
            grads.append(torch.randn_like(out))
    return torch.autograd.grad(outs, inputs, grads, allow_unused=True)


def _leaf(shape, dtype, device, low=None, high=None):
    x = torch.randn(shape, device=device, dtype=torch.float32)
    if low is not None:
        x = torch.empty(shape, device=device).uniform_(low, high)
    return x.to(dtype).requires_grad_()


def scan_cases(dtype, device):
    # T = 1000 spans several time chunks (the look-back); C = 70 is no multiple of a warp.
    dt = getattr(torch, dtype)
    cases = []
    for a_shape in [(2, 1000, 70), (70,)]:
        def run(a_shape=a_shape):
            a = _leaf(a_shape, dt, device, 0.5, 1.0)
            b = _leaf((2, 1000, 70), dt, device)
            h0 = _leaf((2, 70), dt, device)
            for reverse in (False, True):
                h = seqfuse.linear_scan(a, b, h0, reverse=reverse)
                _backward(h, inputs=[a, b, h0])
        cases.append((f"linear_scan a{list(a_shape)}", run))
    if dtype == "float32":  # complex64 rides along with float32
        def run_complex():
            a = torch.polar(torch.rand(70, device=device), torch.rand(70, device=device))
            b = torch.randn(2, 300, 70, dtype=torch.complex64, device=device)
            a.requires_grad_(), b.requires_grad_()
            h = seqfuse.linear_scan(a, b)
            torch.autograd.grad(h.real.sum() + h.imag.sum(), [a, b])
        cases.append(("linear_scan complex64", run_complex))
    return cases


def linear_attention_cases(dtype, device):
    dt = getattr(torch, dtype)
    cases = []
    # T = 150: two full 64-step chunks and a partial one; D = 64 and an odd 40.
    for feature_map, normalize, D in [("elu1", True, 64), ("relu", False, 40),
                                      ("identity", True, 64)]:
        def run(feature_map=feature_map, normalize=normalize, D=D):
            B, T, H = 2, 150, 3
            q, k, v = (_leaf((B, T, H, D), dt, device) for _ in range(3))
            S0 = _leaf((B, H, D, D), torch.float32, device)
            z0 = torch.rand(B, H, D, device=device).requires_grad_()
            decay = torch.tensor([1.0, 0.9, 0.5], device=device)
            o, (S, z) = seqfuse.causal_linear_attention(
                q, k, v, feature_map=feature_map, normalize=normalize, decay=decay,
                initial_state=(S0, z0), return_state=True)
            _backward(o, S, z, inputs=[q, k, v, S0, z0])
        cases.append((f"causal_linear_attention {feature_map} norm={normalize} D={D}", run))

    def run_decode():  # T = 1 with a carried state: the decoding launch
        B, H, D = 1, 4, 128
        q, k, v = (torch.randn(B, 1, H, D, device=device).to(dt) for _ in range(3))
        state = (torch.randn(B, H, D, D, device=device), torch.rand(B, H, D, device=device) + 1)
        for _ in range(2):
            _, state = seqfuse.causal_linear_attention(
                q, k, v, feature_map="elu1", initial_state=state, return_state=True)
    cases.append(("causal_linear_attention decode T=1", run_decode))
    return cases


def sparse_softmax_cases(dtype, device):
    if dtype == "float64" and device.startswith("cuda"):
        return []  # the family has no float64 CUDA kernels (refused on the host)
    dt = getattr(torch, dtype)
    cases = []
    # V = 100: a warp per row; 5000: the row staged in shared memory; 20000: staged for
    # 2-byte types, streamed through the candidate buffer for 4- and 8-byte ones.
    for V in (100, 5000, 20000):
        for k in (5, V):
            def run(V=V, k=k):
                x = _leaf((3, V), dt, device)
                p = seqfuse.sparse_softmax(x, k)
                probs, _ = seqfuse.topk_softmax(x, k)
                target = torch.tensor([0, V - 1, -100], device=device)
                loss = seqfuse.sparse_softmax_cross_entropy(x, target, k, reduction="sum")
                _backward(p, probs, loss, inputs=[x])
            cases.append((f"sparse_softmax/topk_softmax/cross_entropy V={V} k={k}", run))

    def run_dense():
        x = _leaf((3, 300), dt, device)
        t = seqfuse.taylor_softmax(x, order=4)
        p = torch.softmax(torch.randn(3, 300, device=device), -1).to(dt).requires_grad_()
        target = torch.full((3,), 2.0, device=device).requires_grad_()
        e = seqfuse.entropy_normalize(p, target, iters=3)
        _backward(t, e, inputs=[x, p, target])
    cases.append(("taylor_softmax/entropy_normalize", run_dense))

    # The LM-head loss: several vocabulary chunks (one shorter), the sparse backward's
    # gather and scatter, and k = V's dense path; an ignored row.
    for k in (4, 300):
        def run_linear(k=k):
            hidden, weight, bias = (_leaf(s, dt, device) for s in ((5, 40), (300, 40), (300,)))
            target = torch.tensor([0, 299, -100, 7, 7], device=device)
            loss = seqfuse.linear_sparse_softmax_cross_entropy(
                hidden, weight, target, k, bias=bias, reduction="sum", chunk_size=128)
            _backward(loss, inputs=[hidden, weight, bias])
        cases.append((f"linear_sparse_softmax_cross_entropy k={k}", run_linear))
    return cases


def global_pointer_cases(dtype, device):
    dt = getattr(torch, dtype)
    cases = []
    # L = 70: two 64-wide tiles, the second partial; one padded sequence.
    B, L, H, D = 2, 70, 3, 64
    mask = torch.ones(B, L, dtype=torch.int32, device=device)
    mask[1, 50:] = 0
    # Positive spans (i <= j) inside both sequences' real tokens.
    i = torch.randint(0, 50, (B, H, 4), device=device)
    pos = i * L + i + (torch.rand(B, H, 4, device=device) * (50 - i)).long()

    def run_rope():
        x = _leaf((B, L, H, D), dt, device)
        _backward(seqfuse.rope(x), inputs=[x])
    cases.append(("rope", run_rope))

    for heads_q in (H, 1):  # GlobalPointer, and Efficient GlobalPointer's shared q/k
        def run(heads_q=heads_q):
            q, k = _leaf((B, L, heads_q, D), dt, device), _leaf((B, L, heads_q, D), dt, device)
            bs, be = _leaf((B, H, L), dt, device), _leaf((B, H, L), dt, device)
            s = seqfuse.global_pointer_scores(q, k, mask=mask, bias_start=bs, bias_end=be)
            flat = s.flatten(-2)
            labels = torch.zeros(flat.shape, device=device, dtype=dt).scatter_(-1, pos, 1.0)
            dense = seqfuse.multilabel_categorical_crossentropy(flat, labels, reduction="sum")
            sparse = seqfuse.sparse_multilabel_categorical_crossentropy(flat, pos, mask_zero=True)
            fused = seqfuse.global_pointer_loss(q, k, pos, mask=mask, bias_start=bs, bias_end=be)
            _backward(dense, sparse, fused, inputs=[q, k, bs, be])
        cases.append((f"global_pointer scores/losses/fused loss, q heads={heads_q}", run))
    return cases


FAMILIES = [scan_cases, linear_attention_cases, sparse_softmax_cases, global_pointer_cases]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtypes", help="comma-separated; default: every dtype the device's "
                        "kernels take")
    args = parser.parse_args(argv)
    device = args.device
    if device.startswith("cuda") and "cuda" not in seqfuse.build_info()["backends"]:
        print("sanitize.py: seqfuse was built without CUDA kernels", file=sys.stderr)
        return 2
    dtypes = args.dtypes.split(",") if args.dtypes else DTYPES["cuda" if device.startswith("cuda") else "cpu"]
    torch.manual_seed(0)
    failures = 0
    start = time.perf_counter()
    # Family by family (GlobalPointer last), every dtype of one family before the next:
    # a case that kills the process (a host crash) then leaves every other family's
    # kernels checked in every dtype, and its "case" line names it.
    for family in FAMILIES:
        for dtype in dtypes:
            for name, run in family(dtype, device):
                print(f"case  {dtype:9} {name}", flush=True)
                try:
                    run()
                    if device.startswith("cuda"):
                        torch.cuda.synchronize()  # a kernel fault surfaces here, in its case
                    print(f"ok    {dtype:9} {name}", flush=True)
                except Exception:  # noqa: BLE001 - report every failure, run every case
                    failures += 1
                    print(f"FAIL  {dtype:9} {name}\n{traceback.format_exc()}", flush=True)
    print(f"sanitize.py: {failures} failed, {time.perf_counter() - start:.1f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
