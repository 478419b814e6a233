"""RMSNorm kernels vs transformers' LlamaRMSNorm / GemmaRMSNorm definitions (fastlm/kernels/rms_norm.py).

Each case runs three times: the kernel, the reference at the working dtype, and the reference in fp64
on upcast inputs ("exact"); the kernel must be no further from exact than the reference, plus:
  rtol = one ulp of each rounding the output goes through (the interpreter truncates fp32 -> bf16
         where torch rounds to nearest, so one whole ulp per rounding; Llama style rounds twice:
         x_hat to x.dtype, then the product to the output dtype);
  atol = 16 fp32 ulps of the largest exact element: the kernel sums in fp32 in another order than
         torch (row sums of up to 2048 terms, dw over up to ~100 rows; ~2 ulps measured), and dx
         subtracts terms of the row's scale, so that error is absolute, not relative to each element.
"""
import pytest
import torch

from fastlm.kernels import rms_norm as rn
from tests.kernels.check import ULP, assert_no_worse_than_reference

EPS = 1e-6
DTYPES = [  # (x dtype, weight dtype); bf16 x with fp32 weight is PEFT's upcast-norm layout
    (torch.float32, torch.float32), (torch.float16, torch.float16),
    (torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32)]
SHAPES = [
    (3, 37, 129),    # odd width: masked columns, 16 rows per tile
    (20, 2000),      # more tiles than programs: the persistent loop and several dw partials
    (2, 3, 5, 128),  # q/k-norm layout (batch, seq, heads, head_dim)
]


def _run(fn, x, w, dy, gemma, eps=EPS):
    x = x.detach().clone().requires_grad_()
    w = w.detach().clone().requires_grad_()
    y = fn(x, w, eps, gemma)
    y.backward(dy.to(y.dtype))
    return y.detach(), x.grad, w.grad


def _check(x, w, gemma, device, eps=EPS):
    g = torch.Generator(device="cpu").manual_seed(0)
    out_dtype = x.dtype if gemma else torch.promote_types(x.dtype, w.dtype)
    dy = torch.randn(x.shape, generator=g).to(device=device, dtype=out_dtype)
    ours = _run(rn.rms_norm, x, w, dy, gemma, eps)
    ref = _run(rn.reference, x, w, dy, gemma, eps)
    exact = _run(rn.reference, x.double(), w.double(), dy.double(), gemma, eps)
    assert ours[0].dtype == ref[0].dtype and ours[1].dtype == x.dtype and ours[2].dtype == w.dtype
    y_rtol = ULP[out_dtype] + (0.0 if gemma else ULP[x.dtype])
    for name, o, r, e, rtol in zip(("y", "dx", "dw"), ours, ref, exact, (y_rtol, ULP[x.dtype], ULP[w.dtype])):
        atol = 16 * ULP[torch.float32] * e.abs().max().item()
        assert_no_worse_than_reference(o, r, e, atol=atol, rtol=rtol, name=name)


def _inputs(shape, dtypes, device, gemma, seed=1):
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = (3 * torch.randn(shape, generator=g)).to(device=device, dtype=dtypes[0])
    # Gemma checkpoints store w around 0 (used as 1 + w); Llama's around 1.
    w = (0.5 * torch.randn(shape[-1], generator=g) + (0.0 if gemma else 1.0)).to(device=device, dtype=dtypes[1])
    return x, w


@pytest.mark.parametrize("gemma", [False, True], ids=["llama", "gemma"])
@pytest.mark.parametrize("dtypes", DTYPES, ids=lambda d: f"{str(d[0])[6:]}-w{str(d[1])[6:]}")
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_reference(shape, dtypes, gemma, device):
    _check(*_inputs(shape, dtypes, device, gemma), gemma, device)


@pytest.mark.parametrize("gemma", [False, True], ids=["llama", "gemma"])
def test_strided_input_and_large_eps(gemma, device):
    """Rows with a stride (a column slice of a wider tensor) and a transposed layout, eps 1e-5."""
    x, w = _inputs((6, 7, 300), (torch.bfloat16, torch.bfloat16), device, gemma)
    _check(x[..., :77], w[:77], gemma, device, eps=1e-5)
    _check(x.transpose(0, 1), w, gemma, device, eps=1e-5)


def test_frozen_weight_gives_no_dw(device):
    x, w = _inputs((4, 9, 64), (torch.bfloat16, torch.bfloat16), device, False)
    x.requires_grad_()
    y = rn.rms_norm(x, w, EPS)
    y.backward(torch.randn_like(y))
    assert w.grad is None and x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("gemma", [False, True], ids=["llama", "gemma"])
def test_every_element_written(gemma, device, monkeypatch):
    """Buffers the kernels fill start as NaN: any element left unwritten would surface."""
    monkeypatch.setattr(rn, "_alloc", lambda shape, dtype, device: torch.full(shape, float("nan"),
                                                                           dtype=dtype, device=device))
    _check(*_inputs((20, 2000), (torch.bfloat16, torch.bfloat16), device, gemma), gemma, device)


@pytest.mark.parametrize("gemma", [False, True], ids=["llama", "gemma"])
def test_no_grad_forward(gemma, device, monkeypatch):
    """Without a graph the forward kernel runs alone and writes no rstd: the same y, every element written."""
    monkeypatch.setattr(rn, "_alloc", lambda shape, dtype, device: torch.full(shape, float("nan"),
                                                                           dtype=dtype, device=device))
    x, w = _inputs((3, 37, 129), (torch.bfloat16, torch.bfloat16), device, gemma)
    with torch.no_grad():
        y0 = rn.rms_norm(x, w, EPS, gemma)
    y1 = rn.rms_norm(x.clone().requires_grad_(), w, EPS, gemma)
    assert torch.equal(y0, y1.detach())


@pytest.mark.parametrize("persistent,tile,per_warp", [(False, 4096, 512), (True, 8192, 256), (True, 256, 1024)])
def test_tuning_constants_keep_results(persistent, tile, per_warp, device, monkeypatch):
    """The benchmark sweeps these constants; every setting must stay correct."""
    monkeypatch.setattr(rn, "PERSISTENT", persistent)
    monkeypatch.setattr(rn, "TILE_ELEMS", tile)
    monkeypatch.setattr(rn, "ELEMS_PER_WARP", per_warp)
    for gemma in (False, True):
        _check(*_inputs((3, 37, 129), (torch.bfloat16, torch.bfloat16), device, gemma), gemma, device)


def test_fallback_without_triton_is_the_reference(device, monkeypatch):
    monkeypatch.setattr(rn, "use_triton", lambda *t: False)
    x, w = _inputs((5, 33), (torch.bfloat16, torch.bfloat16), device, False)
    assert torch.equal(rn.rms_norm(x, w, EPS), rn.reference(x, w, EPS))


@pytest.mark.gpu
@pytest.mark.parametrize("gemma", [False, True], ids=["llama", "gemma"])
@pytest.mark.parametrize("shape", [(2, 2048, 4096), (1000, 5120), (300, 8192), (4, 512, 32, 128), (64, 16384)],
                         ids=str)
def test_large_shapes_gpu(shape, gemma, device):
    _check(*_inputs(shape, (torch.bfloat16, torch.bfloat16), device, gemma), gemma, device)
