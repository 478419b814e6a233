"""SwiGLU: y = silu(gate) * up, forward and backward, in Triton.

transformers' Llama/Mistral/Qwen MLP computes `act_fn(gate_proj(x)) * up_proj(x)` with act_fn = silu,
in the input dtype: silu(gate) is rounded to the dtype, then the product is rounded again. Here
silu(g) = g * sigmoid(g) and the product are fp32 inside, rounded once at the store.

Shapes: gate and up (..., N), same shape and dtype (fp32/fp16/bf16); the last dimension must have
stride 1 after flattening the leading ones to rows, otherwise a contiguous copy is made (chunks of a
fused gate_up projection are used as they are, through their row stride). y is a new contiguous
(..., N) tensor of the same dtype.

Forward saves gate and up (not the activation); backward recomputes s = sigmoid(g):
    dup   = dy * g * s
    dgate = dy * up * s * (1 + g * (1 - s))

In-place backward: dgate and dup are written into the storage of the saved gate and up (no new
(..., N) buffers at the MLP's widest point) when `inplace_backward=True` (the default) and both gate
and up are intermediate results of the autograd graph (their storage's owner has a grad_fn) and are
not the same tensor. That is safe when nothing else reads gate/up after this backward: true in an MLP,
where they come straight out of gate_proj/up_proj (nn.Linear and PEFT LoRA's add save their inputs,
not their outputs). It is NOT safe when the graph is backpropagated twice (retain_graph=True) or gate/up
are also saved by another op: pass inplace_backward=False then. Leaf tensors (user data, parameters)
are never overwritten.
"""
import torch
import triton
import triton.language as tl

from fastlm.kernels import _gated
from fastlm.kernels._utils import next_power_of_2, use_triton

# Tuning constants, chosen by rule, then checked on the H200 in the training step (bench/RESULTS.md run 25, the
# profile of the Llama-3.2-1B QLoRA step, 2026-11-28, torch 2.11, triton 3.6): forward 93.2 us per (8192, 8192)
# bf16 call (3 tensors, 403 MB: 4.32 TB/s), backward 157.8 us (5 tensors, 671 MB: 4.25 TB/s), both at the
# H200's measured device-to-device copy rate (4.3 TB/s): nothing left for other values to gain.
BLOCK = 1024  # columns per program (rule: 4 warps x 32 lanes x 8 elements = one 16-byte bf16 vector per
# lane per tensor; 14336 = 14 x 1024, so no masked tail at Llama-3.1-8B's intermediate size).
NUM_WARPS = 4  # see BLOCK.


def reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """The definition, as transformers computes it: silu in the input dtype, then the product."""
    return torch.nn.functional.silu(gate) * up


@triton.jit
def _swiglu_fwd_kernel(G, U, Y, n_cols, stride_g, stride_u, stride_y, n_col_blocks, BLOCK: tl.constexpr):
    """Program p handles row p // n_col_blocks, columns [BLOCK * (p % n_col_blocks), + BLOCK)."""
    pid = tl.program_id(0)
    row = (pid // n_col_blocks).to(tl.int64)
    cols = (pid % n_col_blocks) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    g = tl.load(G + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
    y = g * tl.sigmoid(g) * u
    tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(DY, G, U, DG, DU, H, n_cols, stride_dy, stride_g, stride_u, stride_dg, stride_du, stride_h,
                       n_col_blocks, BLOCK: tl.constexpr, WRITE_H: tl.constexpr):
    """Same tiling as the forward. DG/DU may be G/U themselves, and H may be DY: each element is read before it
    is written, by the same program. WRITE_H: also store y = silu(g) * u into H, the forward's expression
    (g * s) * u in the same order, so the same bits as _swiglu_fwd_kernel's."""
    pid = tl.program_id(0)
    row = (pid // n_col_blocks).to(tl.int64)
    cols = (pid % n_col_blocks) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
    s = tl.sigmoid(g)
    du = dy * g * s
    dg = dy * u * s * (1.0 + g * (1.0 - s))
    tl.store(DG + row * stride_dg + cols, dg.to(DG.dtype.element_ty), mask=mask)
    tl.store(DU + row * stride_du + cols, du.to(DU.dtype.element_ty), mask=mask)
    if WRITE_H:
        tl.store(H + row * stride_h + cols, (g * s * u).to(H.dtype.element_ty), mask=mask)


def _block_for(n: int) -> int:
    """BLOCK, shrunk to the next power of 2 >= N for narrow rows."""
    return min(BLOCK, next_power_of_2(n))


def swiglu_forward(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Host wrapper: gate, up (..., N) -> y (..., N) contiguous, same dtype."""
    return _gated.forward(_swiglu_fwd_kernel, gate, up, _block_for(gate.shape[-1]), NUM_WARPS)


def swiglu_backward(dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, inplace: bool,
                    h_out: torch.Tensor = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Host wrapper: (dgate, dup), shaped like gate/up; written into gate's/up's storage when inplace. h_out (may
    be dy itself): also receives y = silu(gate) * up, as swiglu_forward makes it (see _gated.backward)."""
    return _gated.backward(_swiglu_bwd_kernel, dy, gate, up, inplace, _block_for(gate.shape[-1]), NUM_WARPS,
                           h_out=h_out)


class SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up, inplace_backward):
        ctx.inplace = _gated.may_overwrite(gate, up, inplace_backward)
        ctx.save_for_backward(gate, up)
        return swiglu_forward(gate, up)

    @staticmethod
    def backward(ctx, dy):
        gate, up = ctx.saved_tensors
        dgate, dup = swiglu_backward(dy, gate, up, ctx.inplace)
        return dgate, dup, None


def swiglu(gate: torch.Tensor, up: torch.Tensor, inplace_backward: bool = True) -> torch.Tensor:
    """silu(gate) * up, differentiable; falls back to `reference` where Triton cannot run.

    Args:
        gate, up: (..., N), same shape and dtype (fp32/fp16/bf16).
        inplace_backward: allow the backward to write dgate/dup into gate's/up's storage (see the
            module docstring for when that happens and why it is safe).
    Returns:
        (..., N) tensor of gate's dtype.
    """
    if gate.shape != up.shape or gate.dtype != up.dtype or not use_triton(gate, up):
        return reference(gate, up)
    if torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad):
        return SwiGLUFunction.apply(gate, up, inplace_backward)
    return swiglu_forward(gate, up)
