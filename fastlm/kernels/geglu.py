"""GeGLU: y = gelu(gate) * up, exact (erf) or tanh-approximated gelu, forward and backward, in Triton.

transformers computes `act_fn(gate_proj(x)) * up_proj(x)` in the input dtype, with act_fn
`gelu` (GELUActivation: F.gelu, exact erf) or `gelu_pytorch_tanh` (GELUTanh, Gemma:
F.gelu(approximate="tanh")); gelu(gate) is rounded to the dtype, then the product again. Here the
activation and the product are fp32 inside, rounded once at the store:

    exact ("none"): gelu(g) = g * Phi(g),  Phi(g) = 0.5 * (1 + erf(g / sqrt(2)))  (PyTorch's formula)
                    gelu'(g) = Phi(g) + g * exp(-g^2 / 2) / sqrt(2 pi)
    tanh:           z = sqrt(2/pi) * (g + 0.044715 g^3);  gelu(g) = 0.5 g (1 + tanh z) = g * sigmoid(2z)
                    gelu'(g) = sigmoid(2z) + 2 g sigmoid(2z) (1 - sigmoid(2z)) sqrt(2/pi) (1 + 3 * 0.044715 g^2)
(0.5 (1 + tanh z) = sigmoid(2z) exactly; the sigmoid form has no cancellation for negative g and needs
no tanh, whose libdevice version the Triton interpreter lacks.)

Shapes: gate and up (..., N), same shape and dtype (fp32/fp16/bf16); the last dimension must have
stride 1 after flattening the leading ones to rows, otherwise a contiguous copy is made. y is a new
contiguous (..., N) tensor of the same dtype.

Forward saves gate and up (not the activation); backward recomputes the activation:
    dup = dy * gelu(g),   dgate = dy * up * gelu'(g)

In-place backward: dgate and dup are written into the storage of the saved gate and up when
`inplace_backward=True` (the default) and both are intermediate results of the autograd graph (their
storage's owner has a grad_fn) and not the same tensor. Safe when nothing else reads gate/up after this
backward: true in an MLP, where they come straight out of gate_proj/up_proj (nn.Linear and PEFT LoRA's
add save their inputs, not their outputs). NOT safe when the graph is backpropagated twice
(retain_graph=True) or gate/up are saved by another op: pass inplace_backward=False then. Leaf tensors
are never overwritten.
"""
import torch
import triton
import triton.language as tl

from fastlm.kernels import _gated
from fastlm.kernels._utils import next_power_of_2, use_triton

# Tuning constants, chosen by rule, then by the H200 (bench/tune_norms.py, 2026-11-28, torch 2.11, triton 3.6,
# bf16 16384 x 14336, exact erf; torch.compile 0.380 ms forward, 0.966 fwd+bwd in the same run):
BLOCK = 2048  # columns per program for the exact (erf) gelu (14336 = 7 x 2048: no masked tail at
# Llama-3.1-8B's intermediate size). H200, erf forward / fwd+bwd: 1024 columns with 4 warps 0.399 / 1.008 ms,
# 2048 with 4 warps 0.365 / 0.929, 2048 with 8 warps 0.406 / 1.019.
BLOCK_TANH = 1024  # the tanh form is at the copy bandwidth either way; H200 (run 2, GPU time): 1024 columns
# 0.323 / 0.864 ms, 2048 columns 0.326 / 0.871 ms (torch.compile 0.325 / 0.868 in the first run).
NUM_WARPS = 4  # see BLOCK: 16 elements (two 16-byte bf16 vectors) per lane per tensor.
NR_ERFC = True  # exact gelu through the branch-free erfc of _phi instead of libdevice's erf, whose two
# branches (|x| below / above ~0.93) both run in warps that straddle them. H200 at BLOCK 2048, 4 warps:
# forward 0.365 -> 0.363 ms, fwd+bwd 0.929 -> 0.920; at 1024: 0.399 -> 0.375 and 1.008 -> 0.930.
# Its error (< 1.2e-7 relative on erfc, so also on Phi for negative inputs) is below libdevice's formula's.

_APPROXIMATIONS = ("none", "tanh")


def reference(gate: torch.Tensor, up: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """The definition, as transformers computes it: gelu in the input dtype, then the product."""
    return torch.nn.functional.gelu(gate, approximate=approximate) * up


@triton.jit
def _phi(g, NR_ERFC: tl.constexpr):
    """fp32 Phi(g) = 0.5 * (1 + erf(g / sqrt 2)). NR_ERFC: branch-free Phi = 0.5 * erfc(-g / sqrt 2) with
    erfc(a) = t * exp(-a^2 + P(t)), t = 1 / (1 + a / 2) (Numerical Recipes' erfcc, fractional error
    < 1.2e-7 for all a >= 0), else libdevice's erf (branches on |x|, so its warps diverge)."""
    if NR_ERFC:
        z = g * -0.7071067811865476
        a = tl.abs(z)
        t = 1.0 / (1.0 + 0.5 * a)
        p = 0.17087277
        p = p * t - 0.82215223
        p = p * t + 1.48851587
        p = p * t - 1.13520398
        p = p * t + 0.27886807
        p = p * t - 0.18628806
        p = p * t + 0.09678418
        p = p * t + 0.37409196
        p = p * t + 1.00002368
        p = p * t - 1.26551223
        half_erfc = 0.5 * t * tl.exp(p - a * a)  # 0.5 * erfc(|z|)
        return tl.where(z >= 0, half_erfc, 1.0 - half_erfc)
    else:
        return 0.5 * (1.0 + tl.math.erf(g * 0.7071067811865476))


@triton.jit
def _gelu_and_grad(g, TANH: tl.constexpr, NR_ERFC: tl.constexpr):
    """fp32 gelu(g) and gelu'(g)."""
    if TANH:
        sqrt_2_over_pi = 0.7978845608028654
        kappa = 0.044715
        g2 = g * g
        s = tl.sigmoid(2.0 * sqrt_2_over_pi * g * (1.0 + kappa * g2))  # = 0.5 * (1 + tanh(z))
        act = g * s
        grad = s + 2.0 * g * s * (1.0 - s) * sqrt_2_over_pi * (1.0 + 3.0 * kappa * g2)
    else:
        cdf = _phi(g, NR_ERFC)
        act = g * cdf
        grad = cdf + g * tl.exp(-0.5 * g * g) * 0.3989422804014327
    return act, grad


@triton.jit
def _gelu(g, TANH: tl.constexpr, NR_ERFC: tl.constexpr):
    """fp32 gelu(g), as the forward computes it (the backward's WRITE_H output uses it too, for the same bits)."""
    if TANH:
        return g * tl.sigmoid(1.5957691216057308 * g * (1.0 + 0.044715 * g * g))  # 2 * sqrt(2/pi)
    else:
        return g * _phi(g, NR_ERFC)


@triton.jit
def _geglu_fwd_kernel(G, U, Y, n_cols, stride_g, stride_u, stride_y, n_col_blocks,
                      TANH: tl.constexpr, BLOCK: tl.constexpr, NR_ERFC: tl.constexpr):
    """Program p handles row p // n_col_blocks, columns [BLOCK * (p % n_col_blocks), + BLOCK)."""
    pid = tl.program_id(0)
    row = (pid // n_col_blocks).to(tl.int64)
    cols = (pid % n_col_blocks) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    g = tl.load(G + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + row * stride_y + cols, (_gelu(g, TANH, NR_ERFC) * u).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _geglu_bwd_kernel(DY, G, U, DG, DU, H, n_cols, stride_dy, stride_g, stride_u, stride_dg, stride_du, stride_h,
                      n_col_blocks, TANH: tl.constexpr, BLOCK: tl.constexpr, NR_ERFC: tl.constexpr,
                      WRITE_H: tl.constexpr):
    """Same tiling as the forward. DG/DU may be G/U themselves, and H may be DY: each element is read before it
    is written, by the same program. WRITE_H: also store y = gelu(g) * u into H, by the forward's _gelu (the
    same bits as _geglu_fwd_kernel's)."""
    pid = tl.program_id(0)
    row = (pid // n_col_blocks).to(tl.int64)
    cols = (pid % n_col_blocks) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
    act, grad = _gelu_and_grad(g, TANH, NR_ERFC)
    tl.store(DG + row * stride_dg + cols, (dy * u * grad).to(DG.dtype.element_ty), mask=mask)
    tl.store(DU + row * stride_du + cols, (dy * act).to(DU.dtype.element_ty), mask=mask)
    if WRITE_H:
        tl.store(H + row * stride_h + cols, (_gelu(g, TANH, NR_ERFC) * u).to(H.dtype.element_ty), mask=mask)


def _block_for(n: int, approximate: str) -> int:
    """BLOCK (BLOCK_TANH), shrunk to the next power of 2 >= N for narrow rows."""
    return min(BLOCK_TANH if approximate == "tanh" else BLOCK, next_power_of_2(n))


def geglu_forward(gate: torch.Tensor, up: torch.Tensor, approximate: str) -> torch.Tensor:
    """Host wrapper: gate, up (..., N) -> y (..., N) contiguous, same dtype."""
    return _gated.forward(_geglu_fwd_kernel, gate, up, _block_for(gate.shape[-1], approximate), NUM_WARPS,
                          TANH=approximate == "tanh", NR_ERFC=NR_ERFC)


def geglu_backward(dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, approximate: str, inplace: bool,
                   h_out: torch.Tensor = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Host wrapper: (dgate, dup), shaped like gate/up; written into gate's/up's storage when inplace. h_out (may
    be dy itself): also receives y = gelu(gate) * up, as geglu_forward makes it (see _gated.backward)."""
    return _gated.backward(_geglu_bwd_kernel, dy, gate, up, inplace, _block_for(gate.shape[-1], approximate),
                           NUM_WARPS, h_out=h_out, TANH=approximate == "tanh", NR_ERFC=NR_ERFC)


class GeGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up, approximate, inplace_backward):
        ctx.approximate = approximate
        ctx.inplace = _gated.may_overwrite(gate, up, inplace_backward)
        ctx.save_for_backward(gate, up)
        return geglu_forward(gate, up, approximate)

    @staticmethod
    def backward(ctx, dy):
        gate, up = ctx.saved_tensors
        dgate, dup = geglu_backward(dy, gate, up, ctx.approximate, ctx.inplace)
        return dgate, dup, None, None


def geglu(gate: torch.Tensor, up: torch.Tensor, approximate: str = "none",
          inplace_backward: bool = True) -> torch.Tensor:
    """gelu(gate, approximate) * up, differentiable; falls back to `reference` where Triton cannot run.

    Args:
        gate, up: (..., N), same shape and dtype (fp32/fp16/bf16).
        approximate: "none" (exact erf gelu, HF `gelu`) or "tanh" (HF `gelu_pytorch_tanh`, Gemma).
        inplace_backward: allow the backward to write dgate/dup into gate's/up's storage (see the
            module docstring for when that happens and why it is safe).
    Returns:
        (..., N) tensor of gate's dtype.
    """
    if approximate not in _APPROXIMATIONS:
        raise ValueError(f"approximate must be one of {_APPROXIMATIONS}, got {approximate!r}")
    if gate.shape != up.shape or gate.dtype != up.dtype or not use_triton(gate, up):
        return reference(gate, up, approximate)
    if torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad):
        return GeGLUFunction.apply(gate, up, approximate, inplace_backward)
    return geglu_forward(gate, up, approximate)
