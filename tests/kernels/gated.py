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


def check_h_out(forward, backward, dtype, device):
    """backward(dy, gate, up, inplace, h_out=dy) on gate | up as the strided halves of one (M, 2N) tensor, as the
    fused LoRA MLP calls it: the same dgate / dup as without h_out, and in dy's storage forward(gate, up) to the bit
    (the kernels compute y by one expression in the same order). Odd M and N, so masked tails are covered."""
    gate_up, _, _ = inputs((37, 2 * 301), dtype, device, seed=11)
    _, _, dy = inputs((37, 301), dtype, device, seed=12)
    y = forward(*gate_up.chunk(2, dim=-1))
    expected = backward(dy.clone(), *gate_up.clone().chunk(2, dim=-1), False)
    for inplace in (False, True):
        work, dh = gate_up.clone(), dy.clone()
        dgate, dup = backward(dh, *work.chunk(2, dim=-1), inplace, h_out=dh)
        assert torch.equal(dgate, expected[0]) and torch.equal(dup, expected[1]), inplace
        assert torch.equal(dh, y), f"h written by the backward differs from the forward's (inplace={inplace})"
    for wrong in (dy[:, :300], gate_up[:, 1::2]):  # another shape; gate's shape but no unit column stride
        with pytest.raises(ValueError, match="h_out must be shaped like gate"):
            backward(dy, *gate_up.chunk(2, dim=-1), False, h_out=wrong)
