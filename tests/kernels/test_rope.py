"""RoPE kernel vs transformers' apply_rotary_pos_emb: GQA head counts, head_dim up to 256, partial
rotary, per-token (packed, restarting) positions, HF's strided layouts, forward, backward, in place."""
import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb as llama_rope
from transformers.models.phi3.modeling_phi3 import apply_rotary_pos_emb as phi3_rope

from fastlm.kernels import rope as op
from tests.kernels.check import ULP, assert_no_worse_than_reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


# Tolerance: one ulp of the output dtype, relative (the kernel rounds once, and the interpreter
# truncates fp32 -> bf16, so it can be a whole ulp off where the reference's three roundings happened to
# land closer), plus 4 fp32 ulps, plus an absolute 2^-20: x1*cos - x2*sin of O(1) terms may cancel, and
# then fp32 rounding (FMA or not) of those terms decides the last bits of a small result.
def _tol(dtype):
    return dict(rtol=ULP[dtype] + 4 * ULP[torch.float32], atol=2.0**-20)


@pytest.fixture
def poison(monkeypatch):
    """Every buffer the host wrappers allocate starts as NaN: a finite result proves full coverage
    (including the pass-through dims of partial rotary)."""
    monkeypatch.setattr(op, "_alloc", lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype,
                                                                              device=device))


def _cos_sin(batch, seq, rotary_dim, dtype, device, theta=10000.0):
    """As transformers' rotary embedding: fp32 angles from position ids, cat(freqs, freqs), cast to dtype.
    Batch row 0 counts 0..T-1; the others are packed sequences whose positions restart."""
    positions = [torch.arange(seq)] + [torch.arange(seq) % (2 + i) for i in range(batch - 1)]
    pos = torch.stack(positions).float()
    inv_freq = 1.0 / theta ** (torch.arange(0, rotary_dim, 2).float() / rotary_dim)
    freqs = pos[..., None] * inv_freq
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(device=device, dtype=dtype), emb.sin().to(device=device, dtype=dtype)


def _qk(batch, seq, n_q, n_kv, head_dim, dtype, device, seed=0):
    """q (B, H, T, D), k (B, Hkv, T, D) as transposed views of (B, T, H, D), like HF's attention."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, seq, n_q, head_dim, generator=gen).to(device=device, dtype=dtype)
    k = torch.randn(batch, seq, n_kv, head_dim, generator=gen).to(device=device, dtype=dtype)
    dq = torch.randn(batch, seq, n_q, head_dim, generator=gen).to(device=device, dtype=dtype)
    dk = torch.randn(batch, seq, n_kv, head_dim, generator=gen).to(device=device, dtype=dtype)
    return q.transpose(1, 2), k.transpose(1, 2), dq.transpose(1, 2), dk.transpose(1, 2)


def _run(fn, q, k, cos, sin, dq, dk, **kwargs):
    ql, kl = q.detach().clone().requires_grad_(), k.detach().clone().requires_grad_()
    q_out, k_out = fn(ql, kl, cos, sin, **kwargs)
    gq, gk = torch.autograd.grad((q_out, k_out), (ql, kl), (dq, dk))
    return q_out.detach(), k_out.detach(), gq, gk


def _check(q, k, cos, sin, dq, dk, name, **kwargs):
    ours = _run(op.apply_rope, q, k, cos, sin, dq, dk, **kwargs)
    ref = _run(op.reference, q, k, cos, sin, dq, dk, **kwargs)
    exact = _run(op.reference, q.double(), k.double(), cos.double(), sin.double(), dq.double(), dk.double(),
                 **kwargs)
    out_dtype = torch.promote_types(q.dtype, cos.dtype)  # transformers' type promotion
    for label, o, r, e in zip(("q", "k", "dq", "dk"), ours, ref, exact):
        dtype = out_dtype if label in ("q", "k") else q.dtype
        assert o.dtype == dtype == r.dtype, (label, o.dtype, r.dtype)
        assert_no_worse_than_reference(o, r, e, name=f"{name} {label}", **_tol(dtype))
    return ours


def test_reference_is_transformers():
    q, k, _, _ = _qk(2, 5, 4, 2, 64, torch.bfloat16, "cpu")
    cos, sin = _cos_sin(2, 5, 64, torch.bfloat16, "cpu")
    for a, b in zip(op.reference(q, k, cos, sin), llama_rope(q, k, cos, sin)):
        assert torch.equal(a, b)
    cos, sin = _cos_sin(2, 5, 32, torch.bfloat16, "cpu")
    for a, b in zip(op.reference(q, k, cos, sin), phi3_rope(q, k, cos, sin)):
        assert torch.equal(a, b)


# (batch, seq, q heads, kv heads, head_dim, rotary_dim)
SHAPES = [
    (2, 7, 4, 2, 64, 64),     # GQA, full rotary
    (2, 5, 3, 1, 80, 80),     # odd head count, head_dim not a power of 2 (half = 40)
    (3, 4, 4, 2, 96, 32),     # partial rotary (a third), pass-through dims copied
    (1, 3, 2, 1, 256, 128),   # head_dim 256, half rotary
    (2, 3, 5, 5, 128, 128),   # MHA
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_backward(shape, dtype, device, poison):
    batch, seq, n_q, n_kv, head_dim, rot = shape
    q, k, dq, dk = _qk(batch, seq, n_q, n_kv, head_dim, dtype, device)
    cos, sin = _cos_sin(batch, seq, rot, dtype, device)
    q_out, k_out, gq, gk = _check(q, k, cos, sin, dq, dk, f"{shape} {dtype}")
    assert q_out.transpose(1, 2).is_contiguous() and gq.transpose(1, 2).is_contiguous()  # HF's layout kept


@pytest.mark.parametrize("fused,tile", [(True, 64), (False, 2048), (True, 2048)])
def test_tiling_settings_keep_results(fused, tile, device, poison, monkeypatch):
    """Every setting of the tuning constants stays correct: FUSED with more heads than one tile holds (the
    several-steps path), FUSED off, and the default; partial rotary, so the pass-through copy runs too."""
    monkeypatch.setattr(op, "FUSED", fused)
    monkeypatch.setattr(op, "TILE_ELEMS", tile)
    q, k, dq, dk = _qk(2, 3, 8, 4, 64, torch.bfloat16, device, seed=2)
    cos, sin = _cos_sin(2, 3, 48, torch.bfloat16, device)
    _check(q, k, cos, sin, dq, dk, f"fused={fused} tile={tile}")


@pytest.mark.parametrize("layout", ["contiguous", "fused_qkv", "unsqueeze_dim2", "cos_broadcast", "cos_2d",
                                    "cos_fp32"])
def test_layouts(layout, device, poison):
    batch, seq, n_q, n_kv, head_dim, rot = 2, 6, 4, 2, 64, 48
    dtype = torch.bfloat16
    q, k, dq, dk = _qk(batch, seq, n_q, n_kv, head_dim, dtype, device, seed=1)
    cos, sin = _cos_sin(batch, seq, rot, dtype, device)
    kwargs = {}
    if layout == "contiguous":  # (B, H, T, D) physically
        q, k = q.contiguous(), k.contiguous()
    elif layout == "fused_qkv":  # q and k as slices of one (B, T, (H + 2 Hkv) D) projection output
        width = (n_q + 2 * n_kv) * head_dim
        qkv = torch.randn(batch, seq, width, device=device).to(dtype)
        qkv[..., : n_q * head_dim] = q.transpose(1, 2).reshape(batch, seq, -1)
        qkv[..., n_q * head_dim: (n_q + n_kv) * head_dim] = k.transpose(1, 2).reshape(batch, seq, -1)
        q = qkv[..., : n_q * head_dim].view(batch, seq, n_q, head_dim).transpose(1, 2)
        k = qkv[..., n_q * head_dim: (n_q + n_kv) * head_dim].view(batch, seq, n_kv, head_dim).transpose(1, 2)
    elif layout == "unsqueeze_dim2":  # q (B, T, H, D)
        q, k, dq, dk = q.transpose(1, 2), k.transpose(1, 2), dq.transpose(1, 2), dk.transpose(1, 2)
        kwargs = dict(unsqueeze_dim=2)
    elif layout == "cos_fp32":  # fp32 cos/sin with bf16 q/k (autocast): outputs promote to fp32, as in HF
        cos, sin = _cos_sin(batch, seq, rot, torch.float32, device)
        dq, dk = dq.float(), dk.float()
    elif layout == "cos_broadcast":  # one cos/sin row per position, shared by the batch
        cos, sin = cos[:1], sin[:1]
    elif layout == "cos_2d":
        cos, sin = cos[0], sin[0]
        ours = _run(op.apply_rope, q, k, cos, sin, dq, dk)
        ref = _run(op.reference, q, k, cos[None], sin[None], dq, dk)
        exact = _run(op.reference, q.double(), k.double(), cos[None].double(), sin[None].double(),
                     dq.double(), dk.double())
        for o, r, e in zip(ours, ref, exact):
            assert_no_worse_than_reference(o, r, e, name=layout, **_tol(dtype))
        return
    _check(q, k, cos, sin, dq, dk, layout, **kwargs)


@pytest.mark.parametrize("rot", [64, 32])
def test_inplace_without_grad(rot, device):
    """inplace=True with no graph rotates q/k in their own (strided) storage; pass-through dims stay."""
    q, k, _, _ = _qk(2, 5, 4, 2, 64, torch.float16, device, seed=2)
    cos, sin = _cos_sin(2, 5, rot, torch.float16, device)
    q_expected, k_expected = op.apply_rope(q, k, cos, sin)  # out of place
    q_in, k_in = q.clone(), k.clone()  # clone keeps the transposed (B, T, H, D) layout
    assert not q_in.is_contiguous()
    with torch.no_grad():
        q_out, k_out = op.apply_rope(q_in, k_in, cos, sin, inplace=True)
    assert q_out is q_in and k_out is k_in
    assert torch.equal(q_out, q_expected) and torch.equal(k_out, k_expected)


def test_inplace_ignored_under_autograd(device):
    """Under autograd the outputs are new tensors and the inputs keep their values."""
    q, k, dq, dk = _qk(1, 4, 2, 1, 32, torch.float32, device, seed=3)
    cos, sin = _cos_sin(1, 4, 32, torch.float32, device)
    ql, kl = q.clone().requires_grad_(), k.clone().requires_grad_()
    q_out, k_out = op.apply_rope(ql, kl, cos, sin, inplace=True)
    assert q_out.data_ptr() != ql.data_ptr() and torch.equal(ql.detach(), q) and torch.equal(kl.detach(), k)
    for a, b in zip(_run(op.apply_rope, q, k, cos, sin, dq, dk, inplace=True), _check(q, k, cos, sin, dq, dk, "ag")):
        assert torch.equal(a, b)


@pytest.mark.gpu
def test_llama_shape_gpu():
    q, k, dq, dk = _qk(2, 2048, 32, 8, 128, torch.bfloat16, "cuda", seed=4)
    cos, sin = _cos_sin(2, 2048, 128, torch.bfloat16, "cuda", theta=500000.0)
    _check(q, k, cos, sin, dq, dk, "llama")


def test_fallbacks(monkeypatch):
    """cos/sin requiring grad, or no Triton (CPU without the interpreter): the differentiable reference."""
    q, k, dq, dk = _qk(1, 3, 2, 1, 16, torch.float32, "cpu", seed=5)
    cos, sin = _cos_sin(1, 3, 16, torch.float32, "cpu")
    c = cos.clone().requires_grad_()
    q_out, k_out = op.apply_rope(q, k, c, sin)
    (dc,) = torch.autograd.grad((q_out, k_out), c, (dq, dk))
    assert dc.abs().sum() > 0
    monkeypatch.setattr(op, "use_triton", lambda *tensors: False)
    for a, b in zip(op.apply_rope(q, k, cos, sin), op.reference(q, k, cos, sin)):
        assert torch.equal(a, b)
