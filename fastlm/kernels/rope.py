"""Rotary position embedding (RoPE), rotate_half convention, q and k in one launch, in Triton.

transformers' `apply_rotary_pos_emb` (Llama; with partial rotary as in Phi3/StableLM), per head:

    r = rotary_dim = cos.shape[-1] <= head_dim (even); half = r // 2
    x1 = x[..., :half], x2 = x[..., half:r], x_pass = x[..., r:]
    out = cat(x1 * cos1 - x2 * sin1,  x2 * cos2 + x1 * sin2,  x_pass)      (cos = cat(cos1, cos2), ...)

Shapes as transformers passes them (unsqueeze_dim=1): q (B, H, T, D), k (B, Hkv, T, D), any strides
(usually transposes of (B, T, H, D)); cos/sin (B, T, r) or (1, T, r) or (T, r), one row per token, so
per-token position ids (packed sequences whose positions restart) are the caller's cos/sin. With
unsqueeze_dim=2, q is (B, T, H, D) and k (B, T, Hkv, D). fp32/fp16/bf16; the math is fp32 inside
(transformers multiplies and adds in the input dtype, rounding three times; here it rounds once).
The outputs have transformers' dtype, promote_types(q.dtype, cos.dtype): q's dtype when cos/sin are in
the model's dtype (as the rotary embedding returns them), fp32 if fp32 cos meets bf16 q.
The rotary part is the general 2x2 form above, so cos1 != cos2 would also be honoured.

Backward is the transposed rotation (rotation by -sin when cos1 = cos2, sin1 = sin2):
    dx1 = g1 * cos1 + g2 * sin2,   dx2 = g2 * cos2 - g1 * sin1,   dx_pass = g_pass.
Forward saves only cos and sin. No gradient flows to cos/sin (transformers builds them without
grad); when they require grad the reference runs instead.

In place: with `inplace=True` and no autograd graph to record (inference), q and k are rotated in
their own storage, whatever their strides, and returned. Under autograd the outputs are new
tensors: a custom Function may not modify in place a view input (HF's q/k are transposes) and
return two outputs, and overwriting q/k silently (without telling autograd) would corrupt any op
that saved them for its backward (e.g. a q/k norm that saves its output). The backward also writes
new tensors, since the incoming gradient may be shared (retain_grad) or broadcast (stride 0).
"""
import torch
import triton
import triton.language as tl

from fastlm.kernels._utils import next_power_of_2, use_triton

# Tuning constants, chosen by rule, then by the H200 (bench/tune_norms.py, 2026-11-28, torch 2.11, triton
# 3.6; q 32 + k 8 heads of 128, 2 x 8192 tokens, bf16, GPU time by CUDA-graph replay; Liger 0.0868 ms
# forward, 0.173 fwd+bwd in the same run).
TILE_ELEMS = 2048  # elements of one half-head tile (heads x half): a program rotates up to
# 2048 // half heads per loop step, i.e. all 32 Llama q heads at half = 64, in one step (rule:
# 2 halves x 2048 x 2 B = 8 KB read per step, as much in flight as one Llama hidden row).
ELEMS_PER_THREAD = 32  # warps = 2 * tile / (32 * 32), clamped to [1, 8]: 32x64 tiles -> 4 warps.
# H200 (FUSED): forward 0.0857 ms with 4 warps vs 0.0905 with 8 (16 elements per thread).
FUSED = True  # all q and k heads of a token in one step, the four half loads issued together, when they
# fit one tile each (else q's heads, then k's, a tile at a time). H200: forward 0.1026 -> 0.0857 ms,
# fwd+bwd 0.205 -> 0.174 ms. Two or four tokens per program instead of one: 0.0872 / 0.0914 ms (dropped).
MAX_HEAD_DIM = 256  # the bound; larger head dims use the reference.


def reference(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
              unsqueeze_dim: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """The definition: transformers' apply_rotary_pos_emb with partial rotary (Phi3), in the input dtype."""
    cos = cos.unsqueeze(unsqueeze_dim)
    sin = sin.unsqueeze(unsqueeze_dim)
    rotary_dim = cos.shape[-1]

    def rotate_half(x):
        x1 = x[..., : x.shape[-1] // 2]
        x2 = x[..., x.shape[-1] // 2:]
        return torch.cat((-x2, x1), dim=-1)

    q_rot, q_pass = q[..., :rotary_dim], q[..., rotary_dim:]
    k_rot, k_pass = k[..., :rotary_dim], k[..., rotary_dim:]
    q_embed = torch.cat([(q_rot * cos) + (rotate_half(q_rot) * sin), q_pass], dim=-1)
    k_embed = torch.cat([(k_rot * cos) + (rotate_half(k_rot) * sin), k_pass], dim=-1)
    return q_embed, k_embed


@triton.jit
def _rope_heads(x_ptr, o_ptr, sx_h, sx_d, so_h, so_d, n_heads, c1, c2, s1, s2,
                HALF: tl.constexpr, HALF_PAD: tl.constexpr, N_PASS: tl.constexpr, PASS_PAD: tl.constexpr,
                BLOCK_H: tl.constexpr, COPY_PASS: tl.constexpr, BACKWARD: tl.constexpr, ROTATE: tl.constexpr):
    """Rotate all heads of one token: x_ptr/o_ptr point at head 0, element 0 of that token
    (ROTATE=False: only copy the pass-through dims)."""
    hs = tl.arange(0, BLOCK_H)[:, None]
    ds = tl.arange(0, HALF_PAD)[None, :]
    for h0 in range(0, n_heads, BLOCK_H):
        h = h0 + hs
        if ROTATE:
            mask = (h < n_heads) & (ds < HALF)
            x1_ptrs = x_ptr + h * sx_h + ds * sx_d
            x1 = tl.load(x1_ptrs, mask=mask, other=0.0).to(tl.float32)
            x2 = tl.load(x1_ptrs + HALF * sx_d, mask=mask, other=0.0).to(tl.float32)
            if BACKWARD:
                o1 = x1 * c1 + x2 * s2
                o2 = x2 * c2 - x1 * s1
            else:
                o1 = x1 * c1 - x2 * s1
                o2 = x2 * c2 + x1 * s2
            o1_ptrs = o_ptr + h * so_h + ds * so_d
            tl.store(o1_ptrs, o1.to(o_ptr.dtype.element_ty), mask=mask)
            tl.store(o1_ptrs + HALF * so_d, o2.to(o_ptr.dtype.element_ty), mask=mask)
        if COPY_PASS:  # partial rotary, out of place: dims [2*HALF, 2*HALF + N_PASS) pass through unchanged
            ps = tl.arange(0, PASS_PAD)[None, :]
            pmask = (h < n_heads) & (ps < N_PASS)
            xp = tl.load(x_ptr + h * sx_h + (2 * HALF + ps) * sx_d, mask=pmask, other=0.0)
            tl.store(o_ptr + h * so_h + (2 * HALF + ps) * so_d, xp.to(o_ptr.dtype.element_ty), mask=pmask)


@triton.jit
def _rope_token_fused(q_ptr, k_ptr, qo_ptr, ko_ptr, sq_h, sq_d, sk_h, sk_d, sqo_h, sqo_d, sko_h, sko_d,
                      n_qh, n_kh, c1, c2, s1, s2, HALF: tl.constexpr, HALF_PAD: tl.constexpr,
                      BLOCK_QH: tl.constexpr, BLOCK_KH: tl.constexpr, BACKWARD: tl.constexpr):
    """All q and k heads of one token in one step (BLOCK_QH >= n_qh, BLOCK_KH >= n_kh): the four half
    loads are issued together before any math or store, so more bytes are in flight per program."""
    ds = tl.arange(0, HALF_PAD)[None, :]
    hq = tl.arange(0, BLOCK_QH)[:, None]
    hk = tl.arange(0, BLOCK_KH)[:, None]
    qmask = (hq < n_qh) & (ds < HALF)
    kmask = (hk < n_kh) & (ds < HALF)
    q1_ptrs = q_ptr + hq * sq_h + ds * sq_d
    k1_ptrs = k_ptr + hk * sk_h + ds * sk_d
    q1 = tl.load(q1_ptrs, mask=qmask, other=0.0)
    q2 = tl.load(q1_ptrs + HALF * sq_d, mask=qmask, other=0.0)
    k1 = tl.load(k1_ptrs, mask=kmask, other=0.0)
    k2 = tl.load(k1_ptrs + HALF * sk_d, mask=kmask, other=0.0)
    q1, q2, k1, k2 = q1.to(tl.float32), q2.to(tl.float32), k1.to(tl.float32), k2.to(tl.float32)
    if BACKWARD:
        qo1, qo2 = q1 * c1 + q2 * s2, q2 * c2 - q1 * s1
        ko1, ko2 = k1 * c1 + k2 * s2, k2 * c2 - k1 * s1
    else:
        qo1, qo2 = q1 * c1 - q2 * s1, q2 * c2 + q1 * s2
        ko1, ko2 = k1 * c1 - k2 * s1, k2 * c2 + k1 * s2
    qo1_ptrs = qo_ptr + hq * sqo_h + ds * sqo_d
    ko1_ptrs = ko_ptr + hk * sko_h + ds * sko_d
    tl.store(qo1_ptrs, qo1.to(qo_ptr.dtype.element_ty), mask=qmask)
    tl.store(qo1_ptrs + HALF * sqo_d, qo2.to(qo_ptr.dtype.element_ty), mask=qmask)
    tl.store(ko1_ptrs, ko1.to(ko_ptr.dtype.element_ty), mask=kmask)
    tl.store(ko1_ptrs + HALF * sko_d, ko2.to(ko_ptr.dtype.element_ty), mask=kmask)


@triton.jit
def _rope_kernel(Q, K, QO, KO, COS, SIN, T, n_qh, n_kh,
                 sq_b, sq_h, sq_t, sq_d, sk_b, sk_h, sk_t, sk_d,
                 sqo_b, sqo_h, sqo_t, sqo_d, sko_b, sko_h, sko_t, sko_d,
                 sc_b, sc_t, sc_d, ss_b, ss_t, ss_d,
                 HALF: tl.constexpr, HALF_PAD: tl.constexpr, N_PASS: tl.constexpr, PASS_PAD: tl.constexpr,
                 BLOCK_QH: tl.constexpr, BLOCK_KH: tl.constexpr, COPY_PASS: tl.constexpr,
                 BACKWARD: tl.constexpr, FUSED: tl.constexpr):
    """One program per token (b, t): loads its cos/sin row once, rotates its H q heads and Hkv k heads.
    Forward (BACKWARD=False) and backward (the transposed rotation) are the same kernel. FUSED: all heads
    in one step (see _rope_token_fused); else q heads, then k heads, BLOCK_*H heads at a time."""
    pid = tl.program_id(0).to(tl.int64)
    b = pid // T
    t = pid - b * T
    ds = tl.arange(0, HALF_PAD)[None, :]
    dmask = ds < HALF
    c_ptrs = COS + b * sc_b + t * sc_t + ds * sc_d
    s_ptrs = SIN + b * ss_b + t * ss_t + ds * ss_d
    c1 = tl.load(c_ptrs, mask=dmask, other=0.0).to(tl.float32)
    c2 = tl.load(c_ptrs + HALF * sc_d, mask=dmask, other=0.0).to(tl.float32)
    s1 = tl.load(s_ptrs, mask=dmask, other=0.0).to(tl.float32)
    s2 = tl.load(s_ptrs + HALF * ss_d, mask=dmask, other=0.0).to(tl.float32)
    if FUSED:
        _rope_token_fused(Q + b * sq_b + t * sq_t, K + b * sk_b + t * sk_t,
                          QO + b * sqo_b + t * sqo_t, KO + b * sko_b + t * sko_t,
                          sq_h, sq_d, sk_h, sk_d, sqo_h, sqo_d, sko_h, sko_d, n_qh, n_kh,
                          c1, c2, s1, s2, HALF, HALF_PAD, BLOCK_QH, BLOCK_KH, BACKWARD)
        if COPY_PASS:  # partial rotary, out of place: the pass-through dims
            _rope_heads(Q + b * sq_b + t * sq_t, QO + b * sqo_b + t * sqo_t, sq_h, sq_d, sqo_h, sqo_d, n_qh,
                        c1, c2, s1, s2, HALF, HALF_PAD, N_PASS, PASS_PAD, BLOCK_QH, True, BACKWARD, False)
            _rope_heads(K + b * sk_b + t * sk_t, KO + b * sko_b + t * sko_t, sk_h, sk_d, sko_h, sko_d, n_kh,
                        c1, c2, s1, s2, HALF, HALF_PAD, N_PASS, PASS_PAD, BLOCK_KH, True, BACKWARD, False)
    else:
        _rope_heads(Q + b * sq_b + t * sq_t, QO + b * sqo_b + t * sqo_t, sq_h, sq_d, sqo_h, sqo_d, n_qh,
                    c1, c2, s1, s2, HALF, HALF_PAD, N_PASS, PASS_PAD, BLOCK_QH, COPY_PASS, BACKWARD, True)
        _rope_heads(K + b * sk_b + t * sk_t, KO + b * sko_b + t * sko_t, sk_h, sk_d, sko_h, sko_d, n_kh,
                    c1, c2, s1, s2, HALF, HALF_PAD, N_PASS, PASS_PAD, BLOCK_KH, COPY_PASS, BACKWARD, True)


def _alloc(shape, dtype, device) -> torch.Tensor:
    """Every output buffer comes from here (tests swap in a NaN-filled allocator to prove full coverage)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _empty_heads_like(x: torch.Tensor, heads_inner: bool, dtype: torch.dtype) -> torch.Tensor:
    """A new tensor of x's (B, H, T, D) shape; physically (B, T, H, D) when heads_inner (HF's layout, so
    the attention's and q_proj's reshapes stay views)."""
    b, h, t, d = x.shape
    if heads_inner:
        return _alloc((b, t, h, d), dtype, x.device).transpose(1, 2)
    return _alloc((b, h, t, d), dtype, x.device)


def _heads_inner(x: torch.Tensor) -> bool:
    return x.stride(1) < x.stride(2)


def _launch(q, k, cos, sin, q_out, k_out, backward: bool) -> None:
    """Rotate q (B, H, T, D) and k (B, Hkv, T, D) into q_out/k_out (which may be q/k themselves);
    cos/sin (B, T, r) or (1, T, r) (broadcast over B through a zero stride, without an ATen expand)."""
    b, n_qh, t, d = q.shape
    n_kh = k.shape[1]
    if b * t == 0:
        return
    rot = cos.shape[-1]
    half = rot // 2
    n_pass = d - rot
    half_pad = next_power_of_2(half)
    pass_pad = next_power_of_2(n_pass) if n_pass > 0 else 1
    cap = max(1, TILE_ELEMS // half_pad)
    block_qh = min(next_power_of_2(n_qh), cap)
    block_kh = min(next_power_of_2(n_kh), cap)
    fused = FUSED and block_qh >= n_qh and block_kh >= n_kh
    num_warps = max(1, min(8, 2 * block_qh * half_pad // (32 * ELEMS_PER_THREAD)))
    sc, ss = cos.stride(), sin.stride()
    sc_b = 0 if cos.shape[0] == 1 else sc[0]
    ss_b = 0 if sin.shape[0] == 1 else ss[0]
    _rope_kernel[(b * t,)](
        q, k, q_out, k_out, cos, sin, t, n_qh, n_kh,
        *q.stride(), *k.stride(), *q_out.stride(), *k_out.stride(), sc_b, sc[1], sc[2], ss_b, ss[1], ss[2],
        HALF=half, HALF_PAD=half_pad, N_PASS=n_pass, PASS_PAD=pass_pad,
        BLOCK_QH=block_qh, BLOCK_KH=block_kh,
        COPY_PASS=(n_pass > 0 and q_out.data_ptr() != q.data_ptr()), BACKWARD=backward,
        FUSED=fused, num_warps=num_warps)


class RoPEFunction(torch.autograd.Function):
    """q (B, H, T, D), k (B, Hkv, T, D), cos/sin (B, T, r) broadcast to B -> new rotated q, k."""

    @staticmethod
    def forward(ctx, q, k, cos, sin):
        ctx.q_heads_inner, ctx.k_heads_inner = _heads_inner(q), _heads_inner(k)
        ctx.in_dtype = q.dtype
        q_out, k_out = _new_outputs(q, k, cos)
        _launch(q, k, cos, sin, q_out, k_out, backward=False)
        ctx.save_for_backward(cos, sin)
        return q_out, k_out

    @staticmethod
    def backward(ctx, dq_out, dk_out):
        cos, sin = ctx.saved_tensors
        dq = _empty_heads_like(dq_out, ctx.q_heads_inner, ctx.in_dtype)
        dk = _empty_heads_like(dk_out, ctx.k_heads_inner, ctx.in_dtype)
        _launch(dq_out, dk_out, cos, sin, dq, dk, backward=True)
        return dq, dk, None, None


def _new_outputs(q, k, cos) -> tuple[torch.Tensor, torch.Tensor]:
    """Outputs in HF's dtype: promote(q, cos), e.g. fp32 when cos is fp32 and q bf16 (autocast)."""
    dtype = torch.promote_types(q.dtype, cos.dtype)
    return _empty_heads_like(q, _heads_inner(q), dtype), _empty_heads_like(k, _heads_inner(k), dtype)


def _overlaps_itself(x: torch.Tensor) -> bool:
    return any(s == 0 and n > 1 for s, n in zip(x.stride(), x.shape))


def apply_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               unsqueeze_dim: int = 1, inplace: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q and k like transformers' apply_rotary_pos_emb (differentiable w.r.t. q and k).

    Args:
        q: (B, H, T, D) (unsqueeze_dim=1) or (B, T, H, D) (unsqueeze_dim=2); fp32/fp16/bf16, any strides.
        k: (B, Hkv, T, D) or (B, T, Hkv, D), same dtype and D as q.
        cos, sin: (B, T, r), (1, T, r) or (T, r), r = rotary dims (even, <= D); usually q's dtype.
        unsqueeze_dim: 1 or 2, as in transformers.
        inplace: rotate q and k in their own storage when no autograd graph is being recorded.
    Returns:
        (q_embed, k_embed) with q's and k's shapes, dtype promote_types(q.dtype, cos.dtype).
    """
    if unsqueeze_dim not in (1, 2):
        raise ValueError(f"unsqueeze_dim must be 1 or 2, got {unsqueeze_dim}")
    if cos.dim() == 2:
        cos, sin = cos.unsqueeze(0), sin.unsqueeze(0)
    rot = cos.shape[-1]
    t_dim = 3 - unsqueeze_dim
    supported = (q.dim() == 4 and k.dim() == 4 and cos.dim() == 3 and sin.shape == cos.shape
                 and q.shape[0] == k.shape[0] and cos.shape[0] in (1, q.shape[0])
                 and q.shape[t_dim] == k.shape[t_dim] == cos.shape[1]
                 and q.dtype == k.dtype and cos.dtype == sin.dtype and q.shape[-1] == k.shape[-1] and rot % 2 == 0
                 and 0 < rot <= q.shape[-1] <= MAX_HEAD_DIM and not cos.requires_grad and not sin.requires_grad
                 and use_triton(q, k, cos, sin))
    if not supported:
        return reference(q, k, cos, sin, unsqueeze_dim)
    if unsqueeze_dim == 2:  # work on the (B, H, T, D) views; the transposes are free
        q_out, k_out = apply_rope(q.transpose(1, 2), k.transpose(1, 2), cos, sin, 1, inplace)
        return q_out.transpose(1, 2), k_out.transpose(1, 2)
    needs_graph = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad)
    if not needs_graph:
        if (inplace and torch.promote_types(q.dtype, cos.dtype) == q.dtype and q.data_ptr() != k.data_ptr()
                and not _overlaps_itself(q) and not _overlaps_itself(k)):
            _launch(q, k, cos, sin, q, k, backward=False)
            return q, k
        q_out, k_out = _new_outputs(q, k, cos)
        _launch(q, k, cos, sin, q_out, k_out, backward=False)
        return q_out, k_out
    return RoPEFunction.apply(q, k, cos, sin)
