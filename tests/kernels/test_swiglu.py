"""SwiGLU kernel vs transformers' silu(gate) * up: forward, backward, in-place backward, strided inputs."""
import pytest
import torch
from transformers.activations import ACT2FN

from fastlm.kernels import swiglu as op
from tests.kernels.check import ULP, assert_no_worse_than_reference
from tests.kernels.gated import check, check_h_out, inputs, poison  # noqa: F401 (poison is a fixture)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# Tolerance: one ulp of the output dtype, relative (the interpreter truncates fp32 -> bf16 instead of
# rounding, so the kernel's single rounding can be a whole ulp off where the reference's two roundings
# happened to land closer), plus 4 fp32 ulps for the fp32 math inside (sigmoid via exp), plus an
# absolute 2^-20 because silu'(g) = s (1 + g (1 - s)) cancels to 0 near g = -1.28, where fp32 rounding
# of the O(1) terms decides the last bits of a tiny result.
def _tol(dtype):
    return dict(rtol=ULP[dtype] + 4 * ULP[torch.float32], atol=2.0**-20)


def _check(gate, up, dy, y, dgate, dup, name):
    check(op.reference, gate, up, dy, y, dgate, dup, _tol(gate.dtype), name)


def test_reference_is_transformers():
    gate, up, _ = inputs((4, 33), torch.bfloat16, "cpu")
    assert torch.equal(op.reference(gate, up), ACT2FN["silu"](gate) * up)


@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_backward(dtype, device, poison):
    gate, up, dy = inputs((3, 37, 129), dtype, device)
    g, u = gate.clone().requires_grad_(), up.clone().requires_grad_()  # leaves: out-of-place backward
    y = op.swiglu(g, u)
    dgate, dup = torch.autograd.grad(y, (g, u), dy)
    _check(gate, up, dy, y, dgate, dup, str(dtype))
    assert torch.equal(g.detach(), gate) and torch.equal(u.detach(), up), "leaf inputs were overwritten"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inplace_backward(dtype, device):
    """Non-leaf gate/up (as out of gate_proj/up_proj): the gradients land in their storage, with the
    same values as the out-of-place backward."""
    gate, up, dy = inputs((5, 300), dtype, device, seed=1)
    g_leaf, u_leaf = gate.clone().requires_grad_(), up.clone().requires_grad_()
    g, u = g_leaf * 1, u_leaf * 1
    g_ptr, u_ptr = g.data_ptr(), u.data_ptr()
    y = op.swiglu(g, u)
    dgate, dup = torch.autograd.grad(y, (g, u), dy)
    assert dgate.data_ptr() == g_ptr and dup.data_ptr() == u_ptr
    g2, u2 = g_leaf * 1, u_leaf * 1
    dgate2, dup2 = torch.autograd.grad(op.swiglu(g2, u2, inplace_backward=False), (g2, u2), dy)
    assert dgate2.data_ptr() != g2.data_ptr()
    assert torch.equal(dgate, dgate2) and torch.equal(dup, dup2)
    _check(gate, up, dy, y, dgate, dup, f"inplace {dtype}")


@pytest.mark.parametrize("inplace_backward", [True, False])
def test_fused_gate_up_chunks(device, poison, inplace_backward):
    """gate/up as strided halves of one fused projection output (Phi3's gate_up_proj)."""
    gate_up, _, _ = inputs((2, 7, 2 * 200), torch.bfloat16, device, seed=2)
    _, _, dy = inputs((2, 7, 200), torch.bfloat16, device, seed=3)
    leaf = gate_up.clone().requires_grad_()
    gate, up = (leaf * 1).chunk(2, dim=-1)
    assert not gate.is_contiguous()
    y = op.swiglu(gate, up, inplace_backward=inplace_backward)
    (d_leaf,) = torch.autograd.grad(y, leaf, dy)
    dgate, dup = d_leaf.chunk(2, dim=-1)
    _check(gate_up[..., :200], gate_up[..., 200:], dy, y, dgate, dup, "chunks")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_also_writes_forward_output(dtype, device):
    """h_out: the fused LoRA MLP takes y for the down projection's dA from the backward pass, over dy."""
    check_h_out(op.swiglu_forward, op.swiglu_backward, dtype, device)


def test_no_grad_and_single_grad(device):
    """Under no_grad no graph is built; with only `up` requiring grad only dup is returned."""
    gate, up, dy = inputs((4, 130), torch.float16, device, seed=4)
    with torch.no_grad():
        y = op.swiglu(gate, up)
    assert y.grad_fn is None
    u = up.clone().requires_grad_()
    y2 = op.swiglu(gate, u)
    (dup,) = torch.autograd.grad(y2, u, dy)
    assert torch.equal(y, y2.detach())
    y64, dup64 = _reference_up_only(gate.double(), up.double(), dy.double())
    y_ref, dup_ref = _reference_up_only(gate, up, dy)
    assert_no_worse_than_reference(y, y_ref, y64, name="y", **_tol(gate.dtype))
    assert_no_worse_than_reference(dup, dup_ref, dup64, name="dup", **_tol(gate.dtype))


def _reference_up_only(gate, up, dy):
    u = up.clone().requires_grad_()
    y = op.reference(gate, u)
    return y.detach(), torch.autograd.grad(y, u, dy)[0]


@pytest.mark.gpu
def test_llama_shape_gpu():
    gate, up, dy = inputs((4096, 14336), torch.bfloat16, "cuda", seed=5)
    g, u = gate.clone().requires_grad_(), up.clone().requires_grad_()
    y = op.swiglu(g, u)
    dgate, dup = torch.autograd.grad(y, (g, u), dy)
    _check(gate, up, dy, y, dgate, dup, "llama")


def test_fallback_without_triton(monkeypatch):
    gate, up, _ = inputs((3, 20), torch.float32, "cpu", seed=6)
    monkeypatch.setattr(op, "use_triton", lambda *tensors: False)
    assert torch.equal(op.swiglu(gate, up), op.reference(gate, up))


@pytest.mark.gpu
def test_inplace_backward_memory_gpu():
    """The in-place backward allocates no (M, N) gradient buffers; the out-of-place one allocates two."""
    extra = {}
    for inplace in (True, False):
        gate, up, dy = inputs((4096, 14336), torch.bfloat16, "cuda", seed=7)
        g_leaf, u_leaf = gate.requires_grad_(), up.requires_grad_()
        g, u = g_leaf * 1, u_leaf * 1  # non-leaf, as out of gate_proj/up_proj
        y = op.swiglu(g, u, inplace_backward=inplace)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        grads = torch.autograd.grad(y, (g, u), dy)
        torch.cuda.synchronize()
        extra[inplace] = (torch.cuda.max_memory_allocated() - base) / (g.numel() * g.element_size())
        del grads, y, g, u, g_leaf, u_leaf
    assert extra[True] < 0.1 and extra[False] > 1.9, extra
