"""Fused LoRA: projections over a frozen base weight, and the whole gated MLP, each ONE autograd node.

One LoRA projection (PEFT's `lora.Linear` with one active adapter, no dropout, no DoRA):
    y = x W^T (+ b) + s * (x A^T) B^T        x (M, K), W (N, K) frozen, A (r, K), B (N, r), s = alpha / r
Backward computes only what is asked for (ctx.needs_input_grad):
    dB = s * dy^T (x A^T)                    (N, r)   from the saved x A^T (M, r)
    dA = s * (dy B)^T x                      (r, K)   from the saved x
    dx = dy W + s * (dy B) A                 (M, K)   W materialized again, never saved
The frozen W is a `FrozenWeight`: 16-bit (`DenseWeight`), NF4/FP4 (`NF4Weight`, dequantized by
fastlm.kernels.nf4 into a reused workspace) or LLM.int8 (`Int8Weight`, W = CB * SCB / 127). A 4-bit or
8-bit W is materialized twice per step (forward, backward) into one workspace per (dtype, device),
sized for the largest weight: no step holds more than one dequantized weight at a time.

The gated MLP (`lora_mlp`), Llama-style or Phi-3's fused gate_up_proj:
    gate, up = x Wg^T + .., x Wu^T + ..      (M, I) each (Phi-3: one (M, 2I) projection, split in half)
    h = act(gate, up)                        silu(gate) * up, or gelu(gate) * up (tanh form for Gemma)
    y = h Wd^T + sd * (h Ad^T) Bd^T          (M, H)
It saves x, gate, up and the rank-r products; h is recomputed in backward from gate and up (one
elementwise pass) instead of being saved. Recomputing gate and up from x instead would cost two of the
three big matmuls (+ their dequantization) again in backward, about +40% of the MLP's backward FLOPs, to
save 2 x (M, I) activations that live only while this layer's backward runs under gradient
checkpointing: saving them is the better trade. The activation backward writes dgate/dup into the
saved gate/up storage (in place, `inplace_backward=True`), so the backward peaks at 3 x (M, I) (gate,
up, dh) instead of 5; that makes the node single-use: backpropagating it twice raises.

Precision: all matmuls run in the compute dtype (x's dtype, or the autocast dtype inside autocast), the
fp32 LoRA matrices cast to it; gradients of A/B are cast back to their dtype. In fp32 this equals PEFT
to rounding; in bf16 it differs from PEFT (which computes the LoRA branch in fp32) by bf16 rounding.

Public: DenseWeight, NF4Weight, Int8Weight, LoRA, lora_projections, lora_mlp, reference_projection,
reference_mlp, activation_forward, activation_backward.
"""
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from fastlm.kernels import geglu, swiglu
from fastlm.kernels._utils import use_triton
from fastlm.kernels.nf4 import dequantize_nf4, reference_torch

ACTIVATIONS = ("silu", "gelu_tanh", "gelu")

_workspaces = {}  # (dtype, device) -> flat tensor: the dequantized frozen weight of the moment


def workspace(numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A flat buffer of at least `numel` elements, shared by every quantized weight of this dtype/device.

    Shared by all shapes (not one per shape): one step never needs two dequantized weights at once, so
    the largest weight's size is all the memory this takes (Llama-3.1-8B: 14336 x 4096 bf16 = 112 MiB).
    """
    key = (dtype, torch.device(device))
    buf = _workspaces.get(key)
    if buf is None or buf.numel() < numel:
        _workspaces.pop(key, None)
        buf = _workspaces[key] = torch.empty(numel, dtype=dtype, device=device)
    return buf[:numel]


class DenseWeight:
    """A frozen 16/32-bit weight (N, K) and optional bias (N,), e.g. an nn.Linear's."""

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor] = None):
        self.weight, self.bias = weight, bias
        self.shape = tuple(weight.shape)

    def materialize(self, dtype: torch.dtype) -> torch.Tensor:
        return self.weight if self.weight.dtype == dtype else self.weight.to(dtype)


class NF4Weight:
    """A bitsandbytes 4-bit weight: packed bytes + QuantState (public attributes only), optional bias.

    Dequantized bit-exactly as bitsandbytes does (to quant_state.dtype, then cast to the compute dtype
    when that differs, as bnb.matmul_4bit does), into the shared workspace: by the Triton kernel on a GPU,
    by its plain-PyTorch twin on the CPU (the kernel's own tests cover it under the interpreter)."""

    def __init__(self, packed: torch.Tensor, quant_state, bias: Optional[torch.Tensor] = None):
        self.packed, self.quant_state, self.bias = packed, quant_state, bias
        self.shape = tuple(quant_state.shape)

    def materialize(self, dtype: torch.dtype) -> torch.Tensor:
        n, k = self.shape
        out = workspace(n * k, self.quant_state.dtype, self.packed.device).view(n, k)
        if self.packed.is_cuda:
            w = dequantize_nf4(self.packed, self.quant_state, out=out)
        else:  # the interpreter would take minutes per step on a real model; bnb's C++ CPU kernel is the definition
            w = _dequantize_on_cpu(self.packed, self.quant_state, out)
        return w if w.dtype == dtype else w.to(dtype)


def _dequantize_on_cpu(packed, quant_state, out):
    """NF4 on the CPU: bitsandbytes' own dequantize_4bit (what its CPU matmul runs), else the plain-PyTorch twin."""
    try:
        import bitsandbytes.functional as bnbf
    except Exception:
        return out.copy_(reference_torch(packed, quant_state))
    return out.copy_(bnbf.dequantize_4bit(packed, quant_state))


class Int8Weight:
    """A bitsandbytes LLM.int8 weight: CB int8 (N, K) and SCB (N,) row absmax; W = CB * SCB / 127.

    The product is formed in fp32 and rounded once to the compute dtype (bitsandbytes' own backward
    rounds SCB / 127 and the product in the compute dtype: ours is the exact value, rounded once)."""

    def __init__(self, CB: torch.Tensor, SCB: torch.Tensor, bias: Optional[torch.Tensor] = None):
        self.CB, self.SCB, self.bias = CB, SCB, bias
        self.shape = tuple(CB.shape)

    def materialize(self, dtype: torch.dtype) -> torch.Tensor:
        n, k = self.shape
        out = workspace(n * k, dtype, self.CB.device).view(n, k)
        # int8 * fp32 computes in fp32 and casts once into `out`: no fp32 (N, K) temporary.
        return torch.mul(self.CB, (self.SCB.float() / 127.0).unsqueeze(1), out=out)


@dataclass
class LoRA:
    """One adapter on one projection: A (r, K), B (N, r), scale s (PEFT's `scaling[adapter]`)."""
    A: torch.Tensor
    B: torch.Tensor
    scale: float


def reference_projection(x: torch.Tensor, base, lora: Optional[LoRA]) -> torch.Tensor:
    """The definition, plain PyTorch in x's dtype: x W^T + b + s (x A^T) B^T, differentiable."""
    w = base.materialize(x.dtype).clone()
    y = torch.nn.functional.linear(x, w, None if base.bias is None else base.bias.to(x.dtype))
    if lora is not None:
        y = y + (x @ lora.A.to(x.dtype).T) @ lora.B.to(x.dtype).T * lora.scale
    return y


def reference_mlp(x, in_bases, in_loras, down_base, down_lora, activation: str) -> torch.Tensor:
    """The definition of lora_mlp: down(act(gate(x)) * up(x)), gate/up split from one output when fused."""
    outs = [reference_projection(x, b, lo) for b, lo in zip(in_bases, in_loras)]
    gate, up = outs if len(outs) == 2 else outs[0].chunk(2, dim=-1)
    return reference_projection(_activation_reference(gate, up, activation), down_base, down_lora)


def _activation_reference(gate, up, activation):
    if activation == "silu":
        return swiglu.reference(gate, up)
    return geglu.reference(gate, up, "tanh" if activation == "gelu_tanh" else "none")


def activation_forward(gate: torch.Tensor, up: torch.Tensor, activation: str) -> torch.Tensor:
    """act(gate) * up, (M, I) -> (M, I) contiguous, with the Triton kernels where they can run."""
    if not use_triton(gate, up):
        return _activation_reference(gate, up, activation)
    if activation == "silu":
        return swiglu.swiglu_forward(gate, up)
    return geglu.geglu_forward(gate, up, "tanh" if activation == "gelu_tanh" else "none")


def activation_backward(dh, gate, up, activation: str, inplace: bool):
    """(dgate, dup) of h = act(gate) * up; written into gate's / up's storage when inplace."""
    if not use_triton(dh, gate, up):
        with torch.enable_grad():
            g, u = gate.detach().requires_grad_(), up.detach().requires_grad_()
            dg, du = torch.autograd.grad(_activation_reference(g, u, activation), (g, u), dh)
        return (gate.copy_(dg), up.copy_(du)) if inplace else (dg, du)
    if activation == "silu":
        return swiglu.swiglu_backward(dh, gate, up, inplace)
    return geglu.geglu_backward(dh, gate, up, "tanh" if activation == "gelu_tanh" else "none", inplace)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The autocast dtype inside autocast (what F.linear would use), else x's dtype."""
    kind = x.device.type
    if torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return x.dtype


def _forward_one(x2, base, A, B, scale, dtype):
    """y (M, N) and x A^T (M, r) (None without LoRA) in `dtype`."""
    w = base.materialize(dtype)
    bias = None if base.bias is None else base.bias.to(dtype)
    y = torch.addmm(bias, x2, w.T) if bias is not None else x2 @ w.T
    if A is None:
        return y, None
    xa = x2 @ A.to(dtype).T
    return y.addmm_(xa, B.to(dtype).T, alpha=scale), xa


def _backward_one(dy2, x2, xa, base, A, B, scale, dtype, need_dx, need_dA, need_dB, dx):
    """(dA, dB, dx): LoRA grads in A's/B's dtype (None when not needed), dx accumulated into `dx`."""
    dA = dB = dyb = None
    if A is not None and (need_dx or need_dA):
        dyb = dy2 @ B.to(dtype)                                             # (M, r)
    if need_dA:
        dA = (dyb.T @ x2).mul_(scale).to(A.dtype)                           # (r, K)
    if need_dB:
        dB = (dy2.T @ xa).mul_(scale).to(B.dtype)                           # (N, r)
    if need_dx:
        w = base.materialize(dtype)
        dx = dy2 @ w if dx is None else dx.addmm_(dy2, w)
        if dyb is not None:
            dx.addmm_(dyb, A.to(dtype), alpha=scale)
    return dA, dB, dx


class _ProjectionsFn(torch.autograd.Function):
    """Several LoRA projections of one input (q, k, v; or one projection alone). Inputs after x:
    bases (FrozenWeight list), scales, then A0, B0, A1, B1, ... (None where a projection has no LoRA)."""

    @staticmethod
    def forward(ctx, x, bases, scales, *adapters):
        dtype = _compute_dtype(x)
        with torch.autocast(x.device.type, enabled=False):
            x2 = x.reshape(-1, x.shape[-1]).to(dtype)
            outs, xas = [], []
            for i, base in enumerate(bases):
                y, xa = _forward_one(x2, base, adapters[2 * i], adapters[2 * i + 1], scales[i], dtype)
                outs.append(y.view(*x.shape[:-1], y.shape[-1]))
                xas.append(xa)
        ctx.bases, ctx.scales, ctx.dtype, ctx.x_shape, ctx.x_dtype = bases, scales, dtype, x.shape, x.dtype
        ctx.has_xa = [xa is not None for xa in xas]
        ctx.save_for_backward(x2, *[xa for xa in xas if xa is not None], *adapters)
        return tuple(outs)

    @staticmethod
    def backward(ctx, *dys):
        x2, *rest = ctx.saved_tensors
        n_xa = sum(ctx.has_xa)
        xas_iter, adapters = iter(rest[:n_xa]), rest[n_xa:]
        need = ctx.needs_input_grad
        grads, dx = [], None
        with torch.autocast(x2.device.type, enabled=False):
            for i, base in enumerate(ctx.bases):
                xa = next(xas_iter) if ctx.has_xa[i] else None
                A, B = adapters[2 * i], adapters[2 * i + 1]
                dy2 = dys[i].reshape(-1, dys[i].shape[-1]).to(ctx.dtype)
                dA, dB, dx = _backward_one(dy2, x2, xa, base, A, B, ctx.scales[i], ctx.dtype, need[0],
                                           need[3 + 2 * i], need[4 + 2 * i], dx)
                grads += [dA, dB]
        dx = None if dx is None else dx.view(ctx.x_shape).to(ctx.x_dtype)
        return (dx, None, None, *grads)


def _flat_adapters(loras: Sequence[Optional[LoRA]]) -> list:
    flat = []
    for lora in loras:
        flat += [None, None] if lora is None else [lora.A, lora.B]
    return flat


def lora_projections(x: torch.Tensor, bases: Sequence, loras: Sequence[Optional[LoRA]]) -> tuple:
    """y_i = x W_i^T (+ b_i) + s_i (x A_i^T) B_i^T for each projection, as one autograd node.

    Args:
        x: (..., K) activations (fp32/fp16/bf16).
        bases: FrozenWeight per projection, shape (N_i, K); never receives a gradient.
        loras: LoRA per projection, or None for a projection without an adapter.
    Returns:
        tuple of (..., N_i) tensors in the compute dtype (x's, or the autocast dtype).
    """
    if len(bases) != len(loras) or not bases:
        raise ValueError(f"lora_projections needs one LoRA (or None) per base weight, got {len(bases)} bases "
                         f"and {len(loras)} adapters")
    for base in bases:
        if base.shape[1] != x.shape[-1]:
            raise ValueError(f"x has {x.shape[-1]} features but a base weight is {base.shape} (N, K)")
    return _ProjectionsFn.apply(x, list(bases), [lo.scale if lo else 0.0 for lo in loras], *_flat_adapters(loras))


class _MLPFn(torch.autograd.Function):
    """down(act(gate, up)); inputs after x: in_bases (1 fused or 2), down_base, scales, activation,
    inplace, then A/B pairs for each in-projection and for down (None where there is no LoRA)."""

    @staticmethod
    def forward(ctx, x, in_bases, down_base, scales, activation, inplace, *adapters):
        dtype = _compute_dtype(x)
        n_in = len(in_bases)
        with torch.autocast(x.device.type, enabled=False):
            x2 = x.reshape(-1, x.shape[-1]).to(dtype)
            outs, xas = [], []
            for i, base in enumerate(in_bases):
                y, xa = _forward_one(x2, base, adapters[2 * i], adapters[2 * i + 1], scales[i], dtype)
                outs.append(y)
                xas.append(xa)
            gate, up = outs if n_in == 2 else outs[0].chunk(2, dim=-1)
            h = activation_forward(gate, up, activation)
            y, ha = _forward_one(h, down_base, adapters[2 * n_in], adapters[2 * n_in + 1], scales[n_in], dtype)
        ctx.in_bases, ctx.down_base, ctx.scales, ctx.activation = in_bases, down_base, scales, activation
        ctx.dtype, ctx.x_shape, ctx.x_dtype, ctx.inplace, ctx.used = dtype, x.shape, x.dtype, inplace, False
        small = xas + [ha]
        ctx.has_small = [t is not None for t in small]
        ctx.save_for_backward(x2, *outs, *[t for t in small if t is not None], *adapters)
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        if ctx.inplace and ctx.used:
            raise RuntimeError("fastlm's fused LoRA MLP overwrote its saved activations during the first backward "
                               "(in-place, to save memory); it cannot be backpropagated twice (retain_graph=True).")
        ctx.used = True
        n_in = len(ctx.in_bases)
        x2, *rest = ctx.saved_tensors
        outs, rest = rest[:n_in], rest[n_in:]
        n_small = sum(ctx.has_small)
        small_iter, adapters = iter(rest[:n_small]), rest[n_small:]
        small = [next(small_iter) if has else None for has in ctx.has_small]
        need, dtype = ctx.needs_input_grad, ctx.dtype
        grads = [None] * (2 * n_in + 2)
        with torch.autocast(x2.device.type, enabled=False):
            gate, up = outs if n_in == 2 else outs[0].chunk(2, dim=-1)
            dy2 = dy.reshape(-1, dy.shape[-1]).to(dtype)
            Ad, Bd, sd = adapters[2 * n_in], adapters[2 * n_in + 1], ctx.scales[n_in]
            dyb = None if Ad is None else dy2 @ Bd.to(dtype)                # (M, r)
            if need[6 + 2 * n_in]:  # dA_down is the only use of h: recompute it, use it, drop it
                h = activation_forward(gate, up, ctx.activation)
                grads[2 * n_in] = (dyb.T @ h).mul_(sd).to(Ad.dtype)
                del h
            if need[7 + 2 * n_in]:
                grads[2 * n_in + 1] = (dy2.T @ small[n_in]).mul_(sd).to(Bd.dtype)
            if not (need[0] or any(need[6:6 + 2 * n_in])):
                return (None, None, None, None, None, None, *grads)
            dh = dy2 @ ctx.down_base.materialize(dtype)                       # (M, I)
            if dyb is not None:
                dh.addmm_(dyb, Ad.to(dtype), alpha=sd)
            dgate, dup = activation_backward(dh, gate, up, ctx.activation, ctx.inplace)
            del dh
            d_outs = [dgate, dup] if n_in == 2 else (outs if ctx.inplace else [torch.cat([dgate, dup], dim=-1)])
            dx = None
            for i, base in enumerate(ctx.in_bases):
                dA, dB, dx = _backward_one(d_outs[i], x2, small[i], base, adapters[2 * i], adapters[2 * i + 1],
                                           ctx.scales[i], dtype, need[0], need[6 + 2 * i], need[7 + 2 * i], dx)
                grads[2 * i], grads[2 * i + 1] = dA, dB
        dx = None if dx is None else dx.view(ctx.x_shape).to(ctx.x_dtype)
        return (dx, None, None, None, None, None, *grads)


def lora_mlp(x: torch.Tensor, in_bases: Sequence, in_loras: Sequence[Optional[LoRA]], down_base,
             down_lora: Optional[LoRA], activation: str, inplace_backward: bool = True) -> torch.Tensor:
    """The gated MLP with LoRA on any of its projections, as one autograd node (see the module docstring).

    Args:
        x: (..., H) activations.
        in_bases: [gate (I, H), up (I, H)] or [gate_up (2I, H)] (gate first half, as Phi-3 splits it).
        in_loras: LoRA or None per in-projection. down_base: (H, I). down_lora: LoRA or None.
        activation: "silu" (SwiGLU), "gelu_tanh" (GeGLU, tanh form: Gemma) or "gelu" (exact erf).
        inplace_backward: write dgate/dup over the saved gate/up (saves 2 x (M, I); single backward only).
    Returns:
        (..., H) in the compute dtype.
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if len(in_bases) not in (1, 2) or len(in_loras) != len(in_bases):
        raise ValueError("in_bases must be [gate, up] or [gate_up], with one LoRA (or None) each")
    width = sum(b.shape[0] for b in in_bases)
    if width % 2 or down_base.shape[1] != width // 2 or any(b.shape[1] != x.shape[-1] for b in in_bases):
        raise ValueError(f"MLP shapes do not fit: x (..., {x.shape[-1]}), in {[b.shape for b in in_bases]}, "
                         f"down {down_base.shape}")
    loras = list(in_loras) + [down_lora]
    scales = [lo.scale if lo else 0.0 for lo in loras]
    return _MLPFn.apply(x, list(in_bases), down_base, scales, activation, inplace_backward, *_flat_adapters(loras))
