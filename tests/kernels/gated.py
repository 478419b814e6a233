"""Helpers shared by the gated-activation kernel tests (test_swiglu.py, test_geglu.py)."""
import pytest
import torch

from fastlm.kernels import _gated
from tests.kernels.check import assert_no_worse_than_reference


@pytest.fixture
def poison(monkeypatch):
    """Every buffer the host wrappers allocate starts as NaN: a finite result proves full coverage."""
    monkeypatch.setattr(_gated, "alloc", lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype,
                                                                                 device=device))


def inputs(shape, dtype, device, seed=0):
    """gate (spanning the activation's bend, std 2), up and dy, each standard normal otherwise."""
    gen = torch.Generator().manual_seed(seed)
    gate = (2 * torch.randn(shape, generator=gen)).to(device=device, dtype=dtype)
    up = torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
    dy = torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
    return gate, up, dy


def check(reference, gate, up, dy, y, dgate, dup, tol, name):
    """Kernel outputs vs `reference(gate, up)` at the dtype and in fp64 (the exact result)."""
    g_ref = gate.detach().clone().requires_grad_()
    u_ref = up.detach().clone().requires_grad_()
    dg_ref, du_ref = torch.autograd.grad(y_ref := reference(g_ref, u_ref), (g_ref, u_ref), dy)
    g64 = gate.detach().double().requires_grad_()
    u64 = up.detach().double().requires_grad_()
    dg64, du64 = torch.autograd.grad(y64 := reference(g64, u64), (g64, u64), dy.double())
    assert y.dtype == gate.dtype and dgate.dtype == gate.dtype and dup.dtype == up.dtype
    assert_no_worse_than_reference(y, y_ref, y64, name=f"{name} y", **tol)
    assert_no_worse_than_reference(dgate, dg_ref, dg64, name=f"{name} dgate", **tol)
    assert_no_worse_than_reference(dup, du_ref, du64, name=f"{name} dup", **tol)
