"""seqfuse.nn.LRU: the published parameterisation, against the step-by-step reference."""

import math

import pytest
import torch

import seqfuse
from seqfuse import reference
from conftest import DEVICES, assert_close, runs_cuda_kernels


def params(m):
    return [m.nu_log, m.theta_log, m.gamma_log, m.B_re, m.B_im, m.C_re, m.C_im, m.D]


def test_initialisation_follows_the_paper():
    m = seqfuse.nn.LRU(d_model=16, d_state=4096, r_min=0.4, r_max=0.9, max_phase=3.14)
    lam = m.eigenvalues().detach()
    assert lam.shape == (4096,) and lam.dtype == torch.complex64
    modulus = lam.abs()
    assert modulus.min() >= 0.4 - 1e-6 and modulus.max() <= 0.9 + 1e-6
    # |lambda|^2 is uniform on [r_min^2, r_max^2]: its mean is the midpoint.
    assert abs((modulus**2).mean().item() - (0.4**2 + 0.9**2) / 2) < 0.02
    phase = torch.exp(m.theta_log.detach())
    assert phase.min() >= 0 and phase.max() <= 3.14 + 1e-5
    assert_close(torch.exp(m.gamma_log.detach()), torch.sqrt(1 - modulus**2), rtol=1e-5, atol=1e-6)
    assert m.B_re.shape == (4096, 16) and m.C_re.shape == (16, 4096) and m.D.shape == (16,)
    assert abs(m.B_re.std().item() - 1 / math.sqrt(32)) < 0.01
    assert abs(m.C_im.std().item() - 1 / math.sqrt(4096)) < 0.001


def test_reference_builds_its_state_on_the_inputs_device():
    # With h0 None the reference made its zero state on the CPU: on a GPU the first step
    # mixed devices (found by the property tests on an H200). Meta tensors show it here.
    m = seqfuse.nn.LRU(d_model=3, d_state=4).to("meta")
    y, h = reference.lru(torch.empty(2, 5, 3, device="meta"), *params(m))
    assert y.device.type == "meta" and h.device.type == "meta" and h.shape == (2, 4)


@pytest.mark.parametrize("device", DEVICES)
def test_forward_and_gradients_match_reference(device):
    # float64 where the scan has it (CPU); the CUDA scan runs complex64 at most.
    real, cplx = ((torch.float32, torch.complex64) if runs_cuda_kernels(device)
                  else (torch.float64, torch.complex128))
    m = seqfuse.nn.LRU(d_model=5, d_state=7, r_min=0.5, max_phase=6.28).to(real).to(device)
    u = torch.randn(3, 41, 5, dtype=real, device=device, requires_grad=True)
    h0 = torch.randn(3, 7, dtype=cplx, device=device, requires_grad=True)
    y, hT = m(u, h0)
    wide = [t.detach().to(torch.complex128 if t.is_complex() else torch.float64).requires_grad_()
            for t in (u, h0, *params(m))]
    y_ref, hT_ref = reference.lru(wide[0], *wide[2:], h0=wide[1])
    assert_close(y, y_ref, real)
    assert_close(hT, hT_ref, cplx)
    grad = torch.randn_like(y_ref)
    leaves = [u, h0, *params(m)]
    got = torch.autograd.grad((y * grad.to(real)).sum() + hT.abs().sum(), leaves)
    want = torch.autograd.grad((y_ref * grad).sum() + hT_ref.abs().sum(), wide)
    for g, w in zip(got, want):
        assert_close(g, w, g.dtype, atol=1e-4 if real == torch.float32 else 1e-12)


@pytest.mark.parametrize("device", DEVICES)
def test_streaming_and_step_equal_one_forward(device):
    m = seqfuse.nn.LRU(d_model=6, d_state=10).to(device)
    u = torch.randn(2, 50, 6, device=device)
    y, hT = m(u)
    y1, h = m(u[:, :17])
    y2, h = m(u[:, 17:], h)
    assert_close(torch.cat([y1, y2], dim=1), y)
    assert_close(h, hT)
    h, steps = None, []
    for t in range(u.shape[1]):
        y_t, h = m.step(u[:, t], h)
        steps.append(y_t)
    assert_close(torch.stack(steps, dim=1), y)
    assert_close(h, hT)


def test_torch_compile_fullgraph():
    m = seqfuse.nn.LRU(d_model=8, d_state=16)
    u = torch.randn(2, 33, 8, requires_grad=True)
    compiled = torch.compile(m, fullgraph=True)
    y, hT = compiled(u)
    y_eager, hT_eager = m(u)
    assert_close(y, y_eager)
    assert_close(hT, hT_eager)
    g, = torch.autograd.grad(y.sum(), u)
    g_eager, = torch.autograd.grad(y_eager.sum(), u)
    assert_close(g, g_eager)


def test_half_input_keeps_its_dtype():
    m = seqfuse.nn.LRU(d_model=4, d_state=8)
    u = torch.randn(2, 9, 4)
    y, _ = m(u.bfloat16())
    assert y.dtype == torch.bfloat16
    assert_close(y, m(u)[0], torch.bfloat16)


def test_bad_arguments():
    with pytest.raises(ValueError, match="r_min"):
        seqfuse.nn.LRU(4, 8, r_min=0.9, r_max=0.5)
    m = seqfuse.nn.LRU(4, 8)
    with pytest.raises(ValueError, match=r"u must be \[B, T, 4\]"):
        m(torch.randn(2, 9, 5))
    with pytest.raises(ValueError, match="h0 must be"):
        m(torch.randn(2, 9, 4), torch.zeros(2, 9, dtype=torch.complex64))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("with_h0", [False, True])
def test_empty_sequence_passes_the_state_through(device, with_h0):
    # SPEC: empty inputs give empty results; the final state of no steps is h0 (or zeros).
    m = seqfuse.nn.LRU(d_model=3, d_state=4).to(device)
    h0 = torch.randn(2, 4, dtype=torch.complex64, device=device) if with_h0 else None
    y, h = m(torch.randn(2, 0, 3, device=device), h0)
    assert y.shape == (2, 0, 3)
    assert torch.equal(h, h0 if with_h0 else torch.zeros(2, 4, dtype=torch.complex64, device=device))


def test_reference_of_an_empty_sequence():
    m = seqfuse.nn.LRU(d_model=3, d_state=4).double()
    h0 = torch.randn(2, 4, dtype=torch.complex128)
    y, h = reference.lru(torch.randn(2, 0, 3, dtype=torch.float64), *params(m), h0=h0)
    assert y.shape == (2, 0, 3) and torch.equal(h, h0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("with_h0", [False, True])
def test_packed_sequences_equal_one_call_each(device, with_h0):
    # cu_seqlens: one state per sequence, nothing crosses a boundary, empty sequences
    # return their h0; the gradients of u, h0 and every parameter match.
    real, cplx = ((torch.float32, torch.complex64) if runs_cuda_kernels(device)
                  else (torch.float64, torch.complex128))
    lengths = [5, 0, 70, 1, 13, 0]
    bounds = [0, *torch.tensor(lengths).cumsum(0).tolist()]
    cu = torch.tensor(bounds, device=device)
    m = seqfuse.nn.LRU(d_model=4, d_state=6, r_min=0.5).to(real).to(device)
    u = torch.randn(1, bounds[-1], 4, dtype=real, device=device, requires_grad=True)
    h0 = (torch.randn(len(lengths), 6, dtype=cplx, device=device, requires_grad=True)
          if with_h0 else None)
    y, hT = m(u, h0, cu_seqlens=cu)
    assert y.shape == u.shape and hT.shape == (len(lengths), 6)
    runs = [m(u[:, s:e], None if h0 is None else h0[n:n + 1])
            for n, (s, e) in enumerate(zip(bounds, bounds[1:]))]
    y_loop, hT_loop = torch.cat([r[0] for r in runs], 1), torch.cat([r[1] for r in runs])
    assert_close(y, y_loop, real)
    assert_close(hT, hT_loop, cplx)
    leaves = [u, *params(m)] + ([h0] if with_h0 else [])
    weight = torch.randn_like(y)
    got = torch.autograd.grad((y * weight).sum() + hT.abs().sum(), leaves)
    want = torch.autograd.grad((y_loop * weight).sum() + hT_loop.abs().sum(), leaves)
    for g, w in zip(got, want):
        assert_close(g, w, g.dtype, atol=1e-4 if real == torch.float32 else 1e-12)
    y_ref, hT_ref = reference.lru(u.detach().double(), *(p.detach().double() for p in params(m)),
                                  h0=None if h0 is None else h0.detach().to(torch.complex128),
                                  cu_seqlens=cu)
    assert_close(y, y_ref, real)
    assert_close(hT, hT_ref, cplx)


def test_packed_compiles_without_graph_breaks():
    m = seqfuse.nn.LRU(d_model=8, d_state=16)
    cu = torch.tensor([0, 5, 5, 33])
    u = torch.randn(1, 33, 8, requires_grad=True)
    y, hT = torch.compile(m, fullgraph=True)(u, cu_seqlens=cu)
    y_eager, hT_eager = m(u, cu_seqlens=cu)
    assert_close(y, y_eager)
    assert_close(hT, hT_eager)
