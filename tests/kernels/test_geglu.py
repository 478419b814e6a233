"""GeGLU kernel (exact erf gelu and the tanh approximation) vs transformers' gelu(gate) * up: forward,
backward, in-place backward, strided inputs."""
import pytest
import torch
from transformers.activations import ACT2FN

from fastlm.kernels import geglu as op
from tests.kernels.check import ULP, assert_no_worse_than_reference
from tests.kernels.gated import check, check_h_out, inputs, poison  # noqa: F401 (poison is a fixture)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
APPROXIMATIONS = ["none", "tanh"]


# Tolerance: one ulp of the output dtype, relative (the interpreter truncates fp32 -> bf16 instead of
# rounding, so the kernel's single rounding can be a whole ulp off where the reference's two roundings
# happened to land closer), plus 4 fp32 ulps for the fp32 math inside (erf/exp/sigmoid), plus an
# absolute 2^-18: for g < -3 PyTorch's own formula 0.5 * (1 + erf(g / sqrt 2)) (which the kernel shares)
# cancels, leaving an fp32 error of ~6e-8 on Phi(g), times |g * up| <~ 20 (and gelu' crosses zero near
# g = -0.75, where fp32 rounding of O(1) terms decides the last bits of a tiny result).
def _tol(dtype):
    return dict(rtol=ULP[dtype] + 4 * ULP[torch.float32], atol=2.0**-18)


def _check(gate, up, dy, y, dgate, dup, approximate, name):
    check(lambda g, u: op.reference(g, u, approximate), gate, up, dy, y, dgate, dup, _tol(gate.dtype), name)


def test_libdevice_erf_setting(device, poison, monkeypatch):
    """The exact gelu with libdevice's erf (NR_ERFC off) and narrow blocks stays correct too."""
    monkeypatch.setattr(op, "NR_ERFC", False)
    monkeypatch.setattr(op, "BLOCK", 64)
    for dtype in DTYPES:
        gate, up, dy = inputs((3, 5, 150), dtype, device)
        g, u = gate.clone().requires_grad_(), up.clone().requires_grad_()
        y = op.geglu(g, u, "none", inplace_backward=False)
        dgate, dup = torch.autograd.grad(y, (g, u), dy)
        _check(gate, up, dy, y.detach(), dgate, dup, "none", f"libdevice erf {dtype}")


@pytest.mark.parametrize("approximate,act", [("none", "gelu"), ("tanh", "gelu_pytorch_tanh")])
def test_reference_is_transformers(approximate, act):
    gate, up, _ = inputs((4, 33), torch.bfloat16, "cpu")
    assert torch.equal(op.reference(gate, up, approximate), ACT2FN[act](gate) * up)


@pytest.mark.parametrize("approximate", APPROXIMATIONS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_backward(dtype, approximate, device, poison):
    gate, up, dy = inputs((3, 37, 129), dtype, device)
    g, u = gate.clone().requires_grad_(), up.clone().requires_grad_()  # leaves: out-of-place backward
    y = op.geglu(g, u, approximate)
    dgate, dup = torch.autograd.grad(y, (g, u), dy)
    _check(gate, up, dy, y, dgate, dup, approximate, f"{dtype} {approximate}")
    assert torch.equal(g.detach(), gate) and torch.equal(u.detach(), up), "leaf inputs were overwritten"


@pytest.mark.parametrize("approximate", APPROXIMATIONS)
def test_inplace_backward(approximate, device):
    """Non-leaf gate/up (as out of gate_proj/up_proj): the gradients land in their storage, with the
    same values as the out-of-place backward."""
    gate, up, dy = inputs((5, 300), torch.bfloat16, device, seed=1)
    g_leaf, u_leaf = gate.clone().requires_grad_(), up.clone().requires_grad_()
    g, u = g_leaf * 1, u_leaf * 1
    g_ptr, u_ptr = g.data_ptr(), u.data_ptr()
    y = op.geglu(g, u, approximate)
    dgate, dup = torch.autograd.grad(y, (g, u), dy)
    assert dgate.data_ptr() == g_ptr and dup.data_ptr() == u_ptr
    g2, u2 = g_leaf * 1, u_leaf * 1
    dgate2, dup2 = torch.autograd.grad(op.geglu(g2, u2, approximate, inplace_backward=False), (g2, u2), dy)
    assert dgate2.data_ptr() != g2.data_ptr()
    assert torch.equal(dgate, dgate2) and torch.equal(dup, dup2)
    _check(gate, up, dy, y, dgate, dup, approximate, f"inplace {approximate}")


def test_fused_gate_up_chunks(device, poison):
    """gate/up as strided halves of one fused projection output."""
    gate_up, _, _ = inputs((2, 7, 2 * 200), torch.float16, device, seed=2)
    _, _, dy = inputs((2, 7, 200), torch.float16, device, seed=3)
    leaf = gate_up.clone().requires_grad_()
    gate, up = (leaf * 1).chunk(2, dim=-1)
    assert not gate.is_contiguous()
    y = op.geglu(gate, up, "tanh")
    (d_leaf,) = torch.autograd.grad(y, leaf, dy)
    dgate, dup = d_leaf.chunk(2, dim=-1)
    _check(gate_up[..., :200], gate_up[..., 200:], dy, y, dgate, dup, "tanh", "chunks")


@pytest.mark.parametrize("approximate", APPROXIMATIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_also_writes_forward_output(dtype, approximate, device):
    """h_out: the fused LoRA MLP takes y for the down projection's dA from the backward pass, over dy."""
    check_h_out(lambda gate, up: op.geglu_forward(gate, up, approximate),
                lambda dy, gate, up, inplace, h_out=None: op.geglu_backward(dy, gate, up, approximate, inplace, h_out),
                dtype, device)


def test_no_grad_and_bad_argument(device):
    gate, up, _ = inputs((4, 130), torch.bfloat16, device, seed=4)
    with torch.no_grad():
        y = op.geglu(gate, up)
    assert y.grad_fn is None
    y64 = op.reference(gate.double(), up.double())
    assert_no_worse_than_reference(y, op.reference(gate, up), y64, name="y", **_tol(gate.dtype))
    with pytest.raises(ValueError):
        op.geglu(gate, up, approximate="sigmoid")


@pytest.mark.gpu
@pytest.mark.parametrize("approximate", APPROXIMATIONS)
def test_llama_shape_gpu(approximate):
    gate, up, dy = inputs((4096, 14336), torch.bfloat16, "cuda", seed=5)
    g, u = gate.clone().requires_grad_(), up.clone().requires_grad_()
    y = op.geglu(g, u, approximate)
    dgate, dup = torch.autograd.grad(y, (g, u), dy)
    _check(gate, up, dy, y, dgate, dup, approximate, "llama")


def test_fallback_without_triton(monkeypatch):
    gate, up, _ = inputs((3, 20), torch.float32, "cpu", seed=6)
    monkeypatch.setattr(op, "use_triton", lambda *tensors: False)
    assert torch.equal(op.geglu(gate, up, "tanh"), op.reference(gate, up, "tanh"))
