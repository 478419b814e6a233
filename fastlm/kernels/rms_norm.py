"""RMSNorm over the last dimension, forward and backward, in Triton.

Two conventions of transformers, chosen by `gemma_style` (x: (..., N) fp32/fp16/bf16, w: (N,)):

  Llama/Mistral/Qwen2/Qwen3/Phi3 (`LlamaRMSNorm`), gemma_style=False:
      h = x.float() * rsqrt(mean(x.float()^2) + eps)
      y = w * h.to(x.dtype)                     # rounded to x.dtype BEFORE the weight;
                                                # y.dtype = promote_types(x.dtype, w.dtype)
  Gemma/Gemma2/Gemma3 (`GemmaRMSNorm`), gemma_style=True:
      y = (x.float() * rsqrt(mean(x.float()^2) + eps) * (1 + w.float())).to(x.dtype)

Statistics are fp32. Forward saves x and rstd (fp32, one per row; not even computed into memory when no
graph is recorded); backward recomputes x_hat = x * rstd and, per row, with g = dy * w (Gemma: dy * (1 + w)):
      dx = rstd * (g - x_hat * mean(g * x_hat))        dw = sum_rows(dy * x_hat)
dw is reduced in two steps: each program of the (persistent) backward walks many rows and writes one
fp32 partial row, then one small kernel sums the (programs, N) partials and casts them to w's dtype.
Leading dimensions are flattened to rows.

Speed (H200, 2026-11-28, bf16 16384 x 4096, GPU time from CUDA-graph replay; bench/RESULTS.md): forward
0.066 ms (95% of the copy bandwidth), forward+backward 0.176 ms (89%) with torch's partial-row sum, which
the sum_partials kernel has since replaced (on LayerNorm it took the sums from 15 to 4.8 us); the backward
kernel alone 0.100 ms (94%). torch.compile 0.208 ms, Liger 0.290 ms in the same run. Timed the usual way
(do_bench around torch.autograd.grad) every implementation's fwd+bwd read 0.3-0.9 ms there: the host, not
the GPU, is the bound (~350 us of Python/ATen/autograd work per call on that machine's CPU), which is why
the host path below avoids every avoidable ATen call.
"""
import torch
import triton
import triton.language as tl

from fastlm.kernels._utils import (Residency, launch_key, next_power_of_2, rows_view, sum_partials,
                                   use_triton)

# Tuning constants. Rules first (ptxas register counts for sm_90, triton 3.7, compiled offline), then the
# H200 measurements of bench/tune_norms.py (2026-11-28, torch 2.11, triton 3.6, GPU time by graph replay).
TILE_ELEMS = 4096  # a program step handles ROWS rows of BLOCK columns, ROWS*BLOCK >= 4096, so short rows
# (q/k-norm over head_dim 128) move as many bytes per step as one Llama hidden row (8 KB of bf16).
# H200: q-norm 16384x32x128 fwd+bwd 0.178 ms at 4096, 0.175 at 8192, 0.181 at 2048 (noise level): kept.
ELEMS_PER_WARP = 512  # warps = tile / 512 in [4, 16]: 16 elements per lane, i.e. two 16-byte bf16 vectors
# per lane per tensor (4096 -> 8 warps, as Liger uses). ptxas registers/thread (bf16, sm_90): 8 warps at
# N=4096 forward 40 (Gemma 47), backward 80; 16 warps at 8192: 40-48 and 90. At 16384 the backward spills
# ~84 bytes/thread with 16 warps (76 with 32 warps, which cap registers at 64): left at 16.
# H200, 16384x4096 backward alone: 0.108 ms at 512, 0.125 at 256, 0.115 at 1024 (per element per warp).
GEMMA_FWD_ELEMS_PER_WARP = 1024  # the Gemma forward alone: half the warps (4 at N=4096). Its (1 + w) in fp32
# takes 47 registers/thread against Llama's 40, one block of 8 warps fewer per SM. H200, 16384x4096 bf16 fwd,
# GPU time (bench/tune_gemma_rms.py, run 7, two passes): 4 warps 0.0664/0.0665 ms, 8 warps 0.0688/0.0688,
# 16 warps 0.0886; 8 warps capped at 40 registers (maxnreg) 0.0671; Liger 0.0665/0.0669 in the same run.
PERSISTENT = False  # forward grid: False = one row tile per program (the torch.compile/Liger layout);
# True = SMs x (programs one SM holds at once), each striding over tiles. H200, 16384x4096 forward:
# 0.0663 ms one tile per program vs 0.0727 persistent (Gemma 0.0689 vs 0.0710, q-norm 0.0668 vs 0.0733).
# The backward is always persistent (one dw partial row per program); loading tile i+1 before reducing
# tile i (a register prefetch) was tried there and gained nothing (0.108 vs 0.108 ms): the backward
# kernel already moves its 3 tensors at 94% of the copy bandwidth.
MAX_COLS = 65536  # above this a row no longer fits in registers; such rows use the reference.
_INTERPRETER_PROGRAMS = 4  # on the CPU interpreter: a small grid that still runs several programs.


def reference(x: torch.Tensor, weight: torch.Tensor, eps: float, gemma_style: bool = False) -> torch.Tensor:
    """The definition, exactly as transformers' LlamaRMSNorm / GemmaRMSNorm compute it (differentiable)."""
    if gemma_style:
        out = x.float()
        out = out * torch.rsqrt(out.pow(2).mean(-1, keepdim=True) + eps)
        out = out * (1.0 + weight.float())
        return out.type_as(x)
    input_dtype = x.dtype
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(input_dtype)


@triton.jit
def _rms_norm_fwd_kernel(X, W, Y, RSTD, n_rows, n_cols, stride_x, stride_y, eps,
                         GEMMA: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr, STORE_RSTD: tl.constexpr):
    """Persistent: program p normalises row tiles p, p + programs, ...; each tile is (ROWS, BLOCK)."""
    pid = tl.program_id(0)
    n_programs = tl.num_programs(0)
    cols = tl.arange(0, BLOCK)
    col_mask = cols < n_cols
    w = tl.load(W + cols, mask=col_mask, other=0.0)  # once per program, kept in its own dtype
    n_tiles = tl.cdiv(n_rows, ROWS)
    for tile in range(pid, n_tiles, n_programs):
        rows = tile * ROWS + tl.arange(0, ROWS)
        row_mask = rows < n_rows
        mask = row_mask[:, None] & col_mask[None, :]
        rows64 = rows.to(tl.int64)[:, None]
        x = tl.load(X + rows64 * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.rsqrt(tl.sum(x * x, axis=1) / n_cols + eps)  # (ROWS,) fp32
        x_hat = x * rstd[:, None]
        if GEMMA:
            y = x_hat * (1.0 + w.to(tl.float32)[None, :])
        else:  # round x_hat to the input dtype first, then the product (rounded at the store)
            y = x_hat.to(X.dtype.element_ty).to(tl.float32) * w.to(tl.float32)[None, :]
        tl.store(Y + rows64 * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
        if STORE_RSTD:
            tl.store(RSTD + rows, rstd, mask=row_mask)


@triton.jit
def _rms_norm_bwd_kernel(DY, X, W, RSTD, DX, DW_PARTIAL, n_rows, n_cols, stride_dy, stride_x, stride_dx,
                         GEMMA: tl.constexpr, COMPUTE_DW: tl.constexpr, ROWS: tl.constexpr,
                         BLOCK: tl.constexpr):
    """Persistent like the forward; program p also writes its fp32 partial dw to DW_PARTIAL[p, :]."""
    pid = tl.program_id(0)
    n_programs = tl.num_programs(0)
    cols = tl.arange(0, BLOCK)
    col_mask = cols < n_cols
    dw_acc = tl.zeros([ROWS, BLOCK], dtype=tl.float32)
    n_tiles = tl.cdiv(n_rows, ROWS)
    for tile in range(pid, n_tiles, n_programs):
        rows = tile * ROWS + tl.arange(0, ROWS)
        row_mask = rows < n_rows
        mask = row_mask[:, None] & col_mask[None, :]
        rows64 = rows.to(tl.int64)[:, None]
        x = tl.load(X + rows64 * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + rows64 * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + rows, mask=row_mask, other=0.0)
        x_hat = x * rstd[:, None]  # zero on masked rows and columns
        # w reloaded per tile (an L1/L2 hit) rather than held across the loop: 80 instead of 103
        # registers/thread at N=4096 (ptxas, sm_90), so 3 programs of 8 warps fit on an SM, not 2.
        w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)
        if GEMMA:
            w = w + 1.0
        g = dy * w[None, :]
        c = tl.sum(g * x_hat, axis=1) / n_cols
        dx = (g - x_hat * c[:, None]) * rstd[:, None]
        tl.store(DX + rows64 * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
        if COMPUTE_DW:
            dw_acc += dy * x_hat
    if COMPUTE_DW:
        tl.store(DW_PARTIAL + pid * n_cols + cols, tl.sum(dw_acc, axis=0), mask=col_mask)


def _alloc(shape, dtype, device) -> torch.Tensor:
    """Every buffer a kernel fills; tests replace it with a NaN-filled one to prove full coverage."""
    return torch.empty(shape, dtype=dtype, device=device)


def _tile(n_cols: int, gemma_forward: bool = False):
    """(BLOCK, ROWS, num_warps) for rows of n_cols elements, by the rules above."""
    block = next_power_of_2(n_cols)
    rows = max(1, TILE_ELEMS // block)
    per_warp = GEMMA_FWD_ELEMS_PER_WARP if gemma_forward else ELEMS_PER_WARP
    return block, rows, max(4, min(16, rows * block // per_warp))


_residency = Residency(_INTERPRETER_PROGRAMS)


def _forward(x2: torch.Tensor, w: torch.Tensor, eps: float, gemma: bool, store_rstd: bool = True):
    """x2: (rows, N); returns y (rows, N) and rstd (rows,) fp32 (None unless store_rstd)."""
    n_rows, n_cols = x2.shape
    out_dtype = x2.dtype if gemma else torch.promote_types(x2.dtype, w.dtype)
    y = _alloc((n_rows, n_cols), out_dtype, x2.device)
    rstd = _alloc((n_rows,), torch.float32, x2.device) if store_rstd else None
    block, rows, num_warps = _tile(n_cols, gemma_forward=gemma)
    key = launch_key(x2.device.index, "fwd", block, rows, num_warps, gemma, store_rstd, x2.dtype, w.dtype,
                     tensors=(x2,))
    programs = _residency.grid(key, triton.cdiv(n_rows, rows), num_warps, x2.device, PERSISTENT)
    compiled = _rms_norm_fwd_kernel[(programs,)](x2, w, y, y if rstd is None else rstd, n_rows, n_cols,
                                                 x2.stride(0), y.stride(0), eps, GEMMA=gemma, ROWS=rows,
                                                 BLOCK=block, STORE_RSTD=store_rstd, num_warps=num_warps)
    _residency.learn(key, compiled, num_warps, x2.device)
    return y, rstd


def _backward(dy2, x2, w, rstd, gemma: bool, compute_dw: bool):
    """Returns dx (rows, N) in x's dtype and dw (N,) in w's dtype (None unless compute_dw)."""
    n_rows, n_cols = x2.shape
    dx = _alloc((n_rows, n_cols), x2.dtype, x2.device)
    block, rows, num_warps = _tile(n_cols)
    key = launch_key(x2.device.index, "bwd", block, rows, num_warps, gemma, compute_dw, x2.dtype, w.dtype,
               dy2.dtype, tensors=(x2, dy2))
    programs = _residency.grid(key, triton.cdiv(n_rows, rows), num_warps, x2.device)
    partial = _alloc((1, programs, n_cols) if compute_dw else (1,), torch.float32, x2.device)
    compiled = _rms_norm_bwd_kernel[(programs,)](dy2, x2, w, rstd, dx, partial, n_rows, n_cols,
                                                 dy2.stride(0), x2.stride(0), dx.stride(0),
                                                 GEMMA=gemma, COMPUTE_DW=compute_dw, ROWS=rows, BLOCK=block,
                                                 num_warps=num_warps)
    _residency.learn(key, compiled, num_warps, x2.device)
    dw = None
    if compute_dw:
        dw = _alloc((n_cols,), w.dtype, x2.device)
        sum_partials(partial, dw)
    return dx, dw


def _contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.is_contiguous() else t.contiguous()


class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps, gemma_style):
        x2 = rows_view(x)
        w = _contiguous(weight)
        y, rstd = _forward(x2, w, eps, gemma_style)
        ctx.save_for_backward(x2, w, rstd)
        ctx.gemma_style = gemma_style
        ctx.x_shape = x.shape
        return y if x.dim() == 2 else y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x2, w, rstd = ctx.saved_tensors
        dx, dw = _backward(rows_view(dy), x2, w, rstd, ctx.gemma_style, ctx.needs_input_grad[1])
        return dx if len(ctx.x_shape) == 2 else dx.view(ctx.x_shape), dw, None, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, gemma_style: bool = False) -> torch.Tensor:
    """RMSNorm of x (..., N) with weight (N,); see the module docstring for both conventions.

    Returns (..., N) in promote_types(x.dtype, weight.dtype) (Llama style) or x.dtype (Gemma style).
    Differentiable in x and weight; runs the Triton kernels on CUDA (or the interpreter), else the reference.
    Without a graph to record (no_grad, or nothing requires grad) the forward kernel runs alone, with no
    autograd Function and no rstd written.
    """
    if x.shape[-1] != weight.numel():
        raise ValueError(f"rms_norm: last dim {x.shape[-1]} != weight size {weight.numel()}")
    if not use_triton(x, weight) or x.numel() == 0 or x.shape[-1] > MAX_COLS:
        return reference(x, weight, eps, gemma_style)
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return RMSNormFunction.apply(x, weight, float(eps), bool(gemma_style))
    y, _ = _forward(rows_view(x), _contiguous(weight), float(eps), bool(gemma_style), store_rstd=False)
    return y if x.dim() == 2 else y.view(x.shape)
