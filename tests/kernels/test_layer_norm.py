"""LayerNorm kernels vs torch.nn.functional.layer_norm (fastlm/kernels/layer_norm.py).

Each case runs three times: the kernel, the reference at the working dtype, and the reference in fp64
on upcast inputs ("exact"); the kernel must be no further from exact than the reference, plus:
  rtol = one ulp of the output (or gradient) dtype: the interpreter truncates fp32 -> bf16 where torch
         rounds to nearest, so a whole ulp (half an ulp would do on the GPU);
  atol = 16 fp32 ulps of the largest exact element: the kernel sums in fp32 in another order than
         torch (row sums of up to 2048 terms, dw and db over up to ~100 rows; ~2 ulps measured), and
         dx subtracts terms of the row's scale, so that error is absolute, not relative to each element.
"""
import pytest
import torch

from fastlm.kernels import layer_norm as ln
from tests.kernels.check import ULP, assert_no_worse_than_reference

EPS = 1e-5
DTYPES = [  # (x dtype, weight and bias dtype); bf16 x with fp32 parameters is PEFT's upcast-norm layout
    (torch.float32, torch.float32), (torch.float16, torch.float16),
    (torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32)]
SHAPES = [
    (3, 37, 129),    # odd width: masked columns, 16 rows per tile
    (20, 2000),      # more tiles than programs: the persistent loop and several partials
    (2, 3, 5, 128),  # short rows, 4-d input
]
AFFINE = ["weight+bias", "weight", "bias", "none"]


def _run(fn, x, w, b, dy, eps):
    x = x.detach().clone().requires_grad_()
    w = None if w is None else w.detach().clone().requires_grad_()
    b = None if b is None else b.detach().clone().requires_grad_()
    y = fn(x, w, b, eps)
    y.backward(dy.to(y.dtype))
    return y.detach(), x.grad, None if w is None else w.grad, None if b is None else b.grad


def _check(x, w, b, device, eps=EPS):
    g = torch.Generator(device="cpu").manual_seed(0)
    dy = torch.randn(x.shape, generator=g).to(device=device, dtype=x.dtype)
    up = lambda t: None if t is None else t.double()  # noqa: E731
    ours = _run(ln.layer_norm, x, w, b, dy, eps)
    ref = _run(ln.reference, x, w, b, dy, eps)
    exact = _run(ln.reference, x.double(), up(w), up(b), dy.double(), eps)
    for name, o, r, e in zip(("y", "dx", "dw", "db"), ours, ref, exact):
        if e is None:
            assert o is None, f"{name}: expected no gradient"
            continue
        assert o.dtype == r.dtype, f"{name}: dtype {o.dtype} != reference {r.dtype}"
        atol = 16 * ULP[torch.float32] * e.abs().max().item()
        assert_no_worse_than_reference(o, r, e, atol=atol, rtol=ULP[o.dtype], name=name)


def _inputs(shape, dtypes, device, affine, seed=1):
    g = torch.Generator(device="cpu").manual_seed(seed)
    n = shape[-1]
    x = (3 * torch.randn(shape, generator=g) + 1.5).to(device=device, dtype=dtypes[0])  # nonzero mean
    w = (1 + 0.5 * torch.randn(n, generator=g)).to(device=device, dtype=dtypes[1])
    b = (0.5 * torch.randn(n, generator=g)).to(device=device, dtype=dtypes[1])
    return x, (w if "weight" in affine else None), (b if "bias" in affine else None)


@pytest.mark.parametrize("affine", AFFINE)
@pytest.mark.parametrize("dtypes", DTYPES, ids=lambda d: f"{str(d[0])[6:]}-w{str(d[1])[6:]}")
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_reference(shape, dtypes, affine, device):
    if affine == "bias" and dtypes[0] != dtypes[1]:
        pytest.skip("torch's own layer_norm backward (the reference) rejects an fp32 bias without weight "
                    "on bf16 input (CPU: 'expected scalar type BFloat16 but found Float')")
    if device == "cuda" and dtypes[0] != dtypes[1]:
        pytest.skip("torch's CUDA layer_norm (the reference) rejects fp32 weights on bf16 input ('expected "
                    "scalar type BFloat16 but found Float', seen on the H200 with torch 2.11); on the CPU it "
                    "accepts them and the case is tested there")
    _check(*_inputs(shape, dtypes, device, affine), device)


def test_strided_input_and_small_eps(device):
    """Rows with a stride (a column slice of a wider tensor) and a transposed layout, eps 1e-6."""
    x, w, b = _inputs((6, 7, 300), (torch.bfloat16, torch.bfloat16), device, "weight+bias")
    _check(x[..., :77], w[:77], b[:77], device, eps=1e-6)
    _check(x.transpose(0, 1), w, b, device, eps=1e-6)


def test_frozen_parameters_give_no_grads(device):
    x, w, b = _inputs((4, 9, 64), (torch.bfloat16, torch.bfloat16), device, "weight+bias")
    x.requires_grad_()
    y = ln.layer_norm(x, w, b, EPS)
    y.backward(torch.randn_like(y))
    assert w.grad is None and b.grad is None and torch.isfinite(x.grad).all()


def test_frozen_weight_trainable_bias(device):
    """Only db asked for while the weight still scales the input gradient: db's partials take set 0."""
    x, w, b = _inputs((20, 2000), (torch.bfloat16, torch.bfloat16), device, "weight+bias")
    x, b = x.clone().requires_grad_(), b.clone().requires_grad_()
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(2)).to(device=device, dtype=x.dtype)
    dx, db = torch.autograd.grad(ln.layer_norm(x, w, b, EPS), (x, b), dy)
    x64, b64 = x.detach().double().requires_grad_(), b.detach().double().requires_grad_()
    dx64, db64 = torch.autograd.grad(ln.reference(x64, w.double(), b64, EPS), (x64, b64), dy.double())
    xr, br = x.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    dxr, dbr = torch.autograd.grad(ln.reference(xr, w, br, EPS), (xr, br), dy)
    for name, o, r, e in (("dx", dx, dxr, dx64), ("db", db, dbr, db64)):
        atol = 16 * ULP[torch.float32] * e.abs().max().item()  # as in _check
        assert_no_worse_than_reference(o, r, e, atol=atol, rtol=ULP[o.dtype], name=name)


def test_no_grad_forward(device, monkeypatch):
    """Without a graph the forward kernel runs alone and writes no statistics: the same y, every
    element written."""
    monkeypatch.setattr(ln, "_alloc", lambda shape, dtype, device: torch.full(shape, float("nan"),
                                                                           dtype=dtype, device=device))
    x, w, b = _inputs((3, 37, 129), (torch.bfloat16, torch.bfloat16), device, "weight+bias")
    with torch.no_grad():
        y0 = ln.layer_norm(x, w, b, EPS)
    y1 = ln.layer_norm(x.clone().requires_grad_(), w, b, EPS)
    assert torch.equal(y0, y1.detach())


def test_every_element_written(device, monkeypatch):
    """Buffers the kernels fill start as NaN: any element left unwritten would surface."""
    monkeypatch.setattr(ln, "_alloc", lambda shape, dtype, device: torch.full(shape, float("nan"),
                                                                           dtype=dtype, device=device))
    _check(*_inputs((20, 2000), (torch.bfloat16, torch.bfloat16), device, "weight+bias"), device)


@pytest.mark.parametrize("persistent,tile,per_warp,prefetch", [(False, 4096, 512, True), (True, 8192, 256, False),
                                                               (True, 256, 1024, True), (True, 4096, 512, False)])
def test_tuning_constants_keep_results(persistent, tile, per_warp, prefetch, device, monkeypatch):
    """The benchmark sweeps these constants; every setting must stay correct."""
    monkeypatch.setattr(ln, "PREFETCH", prefetch)
    monkeypatch.setattr(ln, "PERSISTENT", persistent)
    monkeypatch.setattr(ln, "TILE_ELEMS", tile)
    monkeypatch.setattr(ln, "ELEMS_PER_WARP", per_warp)
    _check(*_inputs((3, 37, 129), (torch.bfloat16, torch.bfloat16), device, "weight+bias"), device)


def test_fallback_without_triton_is_the_reference(device, monkeypatch):
    monkeypatch.setattr(ln, "use_triton", lambda *t: False)
    x, w, b = _inputs((5, 33), (torch.bfloat16, torch.bfloat16), device, "weight+bias")
    assert torch.equal(ln.layer_norm(x, w, b, EPS), ln.reference(x, w, b, EPS))


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(2, 2048, 4096), (1000, 5120), (300, 8192), (64, 16384)], ids=str)
def test_large_shapes_gpu(shape, device):
    _check(*_inputs(shape, (torch.bfloat16, torch.bfloat16), device, "weight+bias"), device)
