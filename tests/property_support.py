"""Strategies and checks shared by the property tests (tests/test_property_*.py).

Inputs are described by hypothesis (shapes, dtypes, layouts, parameters, a magnitude,
where special values go) and filled from a seed it draws, so each example is
reproducible from what hypothesis prints, and large tensors cost no drawing time.
The profiles ("ci", "thorough") are registered in conftest.py.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import TOL, runs_cuda_kernels

HALF = (torch.float16, torch.bfloat16)
SPECIALS = ("nan", "inf", "-inf", "max")


def examples(device) -> int:
    """Examples per property: the profile's count on the CPU kernels, a quarter of it on
    the emulated device (every thread of every block is a fiber there)."""
    n = settings.default.max_examples
    return max(1, n // 4) if runs_cuda_kernels(device) else n


def check(device, strategy, prop) -> None:
    """Runs `prop(case)` on `examples(device)` cases drawn from `strategy`."""
    @settings(max_examples=examples(device))
    @given(case=strategy)
    def run(case):
        prop(case)

    run()


def sizes(tiles=(), *, low=0, high=70):
    """Sizes in [low, high], often a boundary: 0, 1, small primes, and each tile size +-1."""
    special = {0, 1, 2, 3, 5, 7, 13, 31, 61} | {t + d for t in tiles for d in (-1, 0, 1)}
    special = sorted(s for s in special if low <= s <= high)
    return st.one_of(st.sampled_from(special), st.integers(low, high))


def special_value(name: str, dtype: torch.dtype) -> float:
    return {"nan": math.nan, "inf": math.inf, "-inf": -math.inf,
            "max": torch.finfo(dtype).max}[name]


def exponent_range(dtype: torch.dtype, headroom: int = 4) -> tuple[int, int]:
    """Binary exponents of a scale from the dtype's subnormals (a few bits above its
    smallest one) to `headroom` bits below its largest value."""
    fi = torch.finfo(dtype)
    bits = {torch.float16: 10, torch.bfloat16: 7, torch.float32: 23, torch.float64: 52}
    smallest = int(math.log2(fi.smallest_normal)) - bits.get(dtype, 23) + 3
    return smallest, int(math.log2(fi.max)) - headroom


@st.composite
def magnitudes(draw, dtype, headroom=4, typical=0.7, cap=None):
    """A scale 2^e: 1 most of the time (`typical`), else anywhere from subnormal to
    2^-headroom of the dtype's largest value (or to 2^cap)."""
    if draw(st.floats(0, 1)) < typical:
        return 1.0
    lo, hi = exponent_range(dtype, headroom)
    hi = hi if cap is None else min(hi, cap)
    return 2.0 ** draw(st.integers(lo, hi))


def fill(shape, dtype, seed, *, scale=1.0, kind="normal", device="cpu"):
    """A float64 tensor of `shape` that `dtype` holds exactly (so kernel and reference
    see the same numbers), finite: normal, positive (uniform in [0.2, 1.2]) or small
    integers (ties). Complex dtypes get complex values."""
    g = torch.Generator().manual_seed(seed)
    complex_ = dtype.is_complex
    real = torch.float64
    if kind == "positive":
        x = torch.rand(shape, generator=g, dtype=real) + 0.2
    elif kind == "ties":
        x = torch.randint(-2, 3, shape, generator=g).to(real)
    else:
        x = torch.randn(shape, generator=g, dtype=real)
    if complex_:
        x = torch.complex(x, torch.randn(shape, generator=g, dtype=real))
    x = x * scale
    if not complex_:
        big = torch.finfo(dtype).max
        x = x.clamp(-big, big)
    target = torch.complex128 if complex_ else torch.float64
    return x.to(dtype).to(target).to(device)


def relayout(x: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values in another memory layout: "contiguous", "transposed" (dims 0
    and -1 swapped in memory) or "strided" (every other element of the last dim)."""
    if layout == "transposed" and x.dim() >= 2:
        return x.transpose(0, -1).contiguous().transpose(0, -1)
    if layout == "strided" and x.dim() and x.shape[-1]:
        wide = x.new_zeros(*x.shape[:-1], 2 * x.shape[-1])
        wide[..., ::2] = x
        return wide[..., ::2]
    return x.clone()


LAYOUTS = st.sampled_from(["contiguous", "transposed", "strided"])


def leaf(x64: torch.Tensor, dtype, layout="contiguous", device="cpu") -> torch.Tensor:
    """x64 in `dtype` and `layout`, a leaf that wants its gradient."""
    return relayout(x64.to(device=device, dtype=dtype), layout).detach().requires_grad_()


def ref_leaf(x64: torch.Tensor) -> torch.Tensor:
    return x64.detach().clone().requires_grad_()


def assert_matches(actual, expected, dtype, what="", *, rtol=None, atol=None, floor=None,
                   bound=None):
    """`actual` (computed in `dtype`) equals the float64 `expected`: NaN and +-inf at
    the same entries (of `expected` rounded to actual's dtype: what overflows there is
    inf; within rtol of the overflow threshold either is accepted), the finite entries within the dtype's tolerance, atol relative to the largest
    finite entry of `expected` (so tiny magnitudes are checked as closely as large), never
    below `floor`. `bound` (a tensor of expected's shape) lets each entry also be off by
    up to its own bound: the rounding a result that cancels large terms may carry (and
    an entry whose bound reaches the overflow threshold may be inf or finite)."""
    actual = actual.detach().cpu()
    expected = expected.detach().cpu()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    rounded = expected.to(actual.dtype)
    wide = torch.complex128 if actual.is_complex() else torch.float64
    a, e, r = actual.to(wide), expected.to(wide), rounded.to(wide)
    nan_a, nan_r = torch.isnan(a), torch.isnan(r)
    bad = (nan_a != nan_r).nonzero()
    assert not len(bad), f"{what}: NaN pattern differs at {bad[:5].tolist()} (got {a[tuple(bad[0])]}, want {e[tuple(bad[0])]})"
    tol = TOL[dtype]
    rtol = tol["rtol"] if rtol is None else rtol
    atol = tol["atol"] if atol is None else atol
    finite_e = e[torch.isfinite(r) & torch.isfinite(e)]  # the entries the dtype holds
    scale = finite_e.abs().max().item() if finite_e.numel() else 0.0
    scale = scale if math.isfinite(scale) else torch.finfo(torch.float64).max
    # Below the dtype's normal range results have lost relative precision (gradual
    # underflow), so atol never goes below a few of its smallest normals (or `floor`).
    floor = 4 * torch.finfo(actual.real.dtype if actual.is_complex() else actual.dtype).smallest_normal if floor is None else floor
    atol = max(atol * scale, floor)
    if not a.is_complex():
        inf_a, inf_r = torch.isinf(a) & ~nan_a, torch.isinf(r)
        differs = (inf_a != inf_r) | (inf_a & (a != r))
        # A result within tolerance (or its own bound) of the dtype's overflow threshold
        # may round either way: a finite result within that of the expected value, an
        # infinite one where the expected value could reach the threshold on its side.
        info = torch.finfo(actual.dtype)
        threshold = info.max * (1 + info.eps / 2)
        slack = 0.0 if bound is None else bound.detach().cpu().double()
        within = atol + rtol * e.abs() + slack
        could_round = torch.where(inf_a, torch.sign(a) * e + within >= threshold,
                                  (a - e).abs() <= within)
        bad = (differs & ~could_round).nonzero()
        assert not len(bad), f"{what}: inf pattern differs at {bad[:5].tolist()} (got {a[tuple(bad[0])]}, want {e[tuple(bad[0])]})"
        keep = torch.isfinite(a) & torch.isfinite(r)
    else:
        keep = torch.isfinite(a) & torch.isfinite(r)
        assert torch.equal(torch.isfinite(a), torch.isfinite(r)), f"{what}: non-finite pattern differs"
    if not keep.any():
        return
    e_keep = e[keep]
    if bound is None:
        torch.testing.assert_close(a[keep], e_keep, rtol=rtol, atol=atol,
                                   msg=lambda m: f"{what}: {m}")
        return
    error = (a[keep] - e_keep).abs()
    allowed = torch.maximum(atol + rtol * e_keep.abs(), bound.detach().cpu().double()[keep])
    worst = int((error / allowed).argmax())
    assert (error <= allowed).all(), (
        f"{what}: {int((error > allowed).sum())} of {error.numel()} entries off; worst "
        f"{a[keep][worst].item()!r} vs {e_keep[worst].item()!r} (error {error[worst].item():.3g}, "
        f"allowed {allowed[worst].item():.3g}: atol {atol:.3g}, rtol {rtol:.3g}, own bound "
        f"{bound.detach().cpu().double()[keep][worst].item():.3g})")


def assert_equal_outside(clean, poisoned, keep, what=""):
    """The entries selected by the bool mask `keep` are bit for bit unchanged."""
    c, p = clean.detach().cpu()[keep], poisoned.detach().cpu()[keep]
    same = (c == p) | (torch.isnan(c) & torch.isnan(p))
    bad = (~same).nonzero()
    first = tuple(bad[0]) if len(bad) else ()
    assert not len(bad), (f"{what}: {len(bad)} entries changed that must not (first "
                          f"{c[first].item()} -> {p[first].item()})")


# ---- bad parameters, in a child process ------------------------------------------

TESTS = Path(__file__).resolve().parent


def run_child(module: str, function: str, device_name: str, timeout=600) -> None:
    """Runs `module.function(device_name)` (a hypothesis test) in a fresh Python, so a
    crash (a signal, an abort) is a failure that shows its last case, not a dead run."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(TESTS), *filter(None, [os.environ.get("PYTHONPATH")])]))
    code = (f"import sys, property_support as p; sys.exit(p.child_main("
            f"{json.dumps(module)}, {json.dumps(function)}, {json.dumps(device_name)}))")
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=TESTS, capture_output=True,
                          text=True, timeout=timeout)
    out = (proc.stdout + proc.stderr)[-6000:]
    assert proc.returncode == 0, f"child exited with {proc.returncode}:\n{out}"


def child_main(module: str, function: str, device_name: str) -> int:
    import importlib

    from conftest import EMULATED_SCHEDULES, EmulatedDevice

    device = "cpu"
    if device_name in EMULATED_SCHEDULES:
        import emulator as emu_build

        emu = emu_build.load()
        emu.configure(**EMULATED_SCHEDULES[device_name], seed=1)
        emu.enable()
        device = EmulatedDevice(EMULATED_SCHEDULES[device_name])
    getattr(importlib.import_module(module), function)(device)
    return 0


def expect_clear_error(call, names, what):
    """`call()` raises ValueError/RuntimeError/TypeError/IndexError whose message names
    one of `names` (the argument at fault). Prints the case first: if it crashes the
    process, the child's output ends with it."""
    print("case:", what, flush=True)
    try:
        call()
    except (ValueError, RuntimeError, TypeError, IndexError) as err:
        msg = str(err)
        assert any(n in msg for n in names), f"{what}: the error names none of {names}: {msg}"
        return
    raise AssertionError(f"{what}: no error raised")


def bad_calls_raise(bad_calls, device):
    """Every (what, call, names) that the strategy `bad_calls` draws raises a clear error
    (expect_clear_error); as many examples as the profile gives `device`. Run it in a
    child process (run_child), where a crash fails the test instead of the run."""
    @settings(max_examples=examples(device))
    @given(bad_calls)
    def run(bad):
        what, fn, names = bad
        expect_clear_error(fn, names, what)

    run()
