"""LayerNorm over the last dimension, forward and backward, in Triton; equals
torch.nn.functional.layer_norm(x, (N,), weight, bias, eps), which nn.LayerNorm (and so transformers) calls.

  x: (..., N) fp32/fp16/bf16; weight, bias: (N,) any float dtype, each optional.
  mean = mean(x), rstd = rsqrt(mean((x - mean)^2) + eps)    (fp32, biased variance, two passes over
  the row held in registers);  y = ((x - mean) * rstd * w + b).to(x.dtype), rounded once.

Forward saves x, mean and rstd (fp32, one each per row; not written when no graph is recorded).
Backward, with x_hat = (x - mean) * rstd and g = dy * w:
    dx = rstd * (g - mean(g) - x_hat * mean(g * x_hat)),  dw = sum_rows(dy * x_hat),  db = sum_rows(dy).
dw and db are reduced in two steps: each program of the persistent backward walks many rows and writes
one fp32 partial row of each, then one small kernel sums the (programs, N) partials into dw and db in
their own dtypes. Leading dimensions become rows.

Speed (H200, 2026-11-28, bf16 16384 x 4096 with weight and bias, GPU time from CUDA-graph replay;
bench/RESULTS.md): forward 0.072 ms, forward+backward ~0.19 ms (~80% of the copy bandwidth). As for
RMSNorm, do_bench around torch.autograd.grad reads several times more there: the host is the bound.
"""
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from fastlm.kernels._utils import (Residency, launch_key, next_power_of_2, rows_view, sum_partials,
                                   use_triton)

# Tuning constants: the same rules as rms_norm.py (read their comments there), chosen by rule and ptxas
# register counts (bf16, sm_90, N=4096, 8 warps: forward 64 registers/thread, backward 116 with the weight
# reloaded per tile), then by the H200 (bench/tune_norms.py, 2026-11-28, torch 2.11, triton 3.6, bf16
# 16384 x 4096, GPU time by CUDA-graph replay):
TILE_ELEMS = 4096  # ROWS * BLOCK >= 4096 elements per program step (short rows are batched)
ELEMS_PER_WARP = 512  # warps = tile / 512 in [4, 16]: two 16-byte bf16 vectors per lane per tensor.
# H200 fwd+bwd: 0.199 ms at 512 vs 0.232 at 256 (both with PREFETCH)
PERSISTENT = True  # forward grid = SMs x resident programs (False: one tile per program); backward always.
# H200 forward: 0.0715 ms persistent with PREFETCH, 0.0780 persistent without, 0.0807 one tile per program
PREFETCH = True  # persistent loops load tile i+1 before reducing tile i, so loads stay in flight across the
# two reductions of a tile. H200: forward 0.0780 -> 0.0715 ms, fwd+bwd 0.217 -> 0.199 ms
MAX_COLS = 65536  # wider rows use the reference
_INTERPRETER_PROGRAMS = 4


def reference(x: torch.Tensor, weight, bias, eps: float) -> torch.Tensor:
    """The definition: torch's own layer_norm over the last dimension (differentiable)."""
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


@triton.jit
def _layer_norm_fwd_kernel(X, W, B, Y, MEAN, RSTD, n_rows, n_cols, stride_x, stride_y, eps,
                           HAS_W: tl.constexpr, HAS_B: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
                           PREFETCH: tl.constexpr, STORE_STATS: tl.constexpr):
    """Persistent: program p normalises row tiles p, p + programs, ...; each tile is (ROWS, BLOCK).
    PREFETCH: the next tile's x is loaded before this tile is reduced, so loads stay in flight."""
    pid = tl.program_id(0)
    n_programs = tl.num_programs(0)
    cols = tl.arange(0, BLOCK)
    col_mask = cols < n_cols
    if HAS_W:
        w = tl.load(W + cols, mask=col_mask, other=0.0)  # once per program, in its own dtype
    if HAS_B:
        b = tl.load(B + cols, mask=col_mask, other=0.0)
    n_tiles = tl.cdiv(n_rows, ROWS)
    if PREFETCH:
        rows = pid * ROWS + tl.arange(0, ROWS)
        x_next = tl.load(X + rows.to(tl.int64)[:, None] * stride_x + cols[None, :],
                         mask=(rows < n_rows)[:, None] & col_mask[None, :], other=0.0)
    for tile in range(pid, n_tiles, n_programs):
        rows = tile * ROWS + tl.arange(0, ROWS)
        row_mask = rows < n_rows
        mask = row_mask[:, None] & col_mask[None, :]
        rows64 = rows.to(tl.int64)[:, None]
        if PREFETCH:
            x = x_next
            nxt = rows + n_programs * ROWS  # past the last row: fully masked, moves nothing
            x_next = tl.load(X + nxt.to(tl.int64)[:, None] * stride_x + cols[None, :],
                             mask=(nxt < n_rows)[:, None] & col_mask[None, :], other=0.0)
            x = x.to(tl.float32)
        else:
            x = tl.load(X + rows64 * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        mean = tl.sum(x, axis=1) / n_cols
        xc = tl.where(mask, x - mean[:, None], 0.0)
        rstd = tl.rsqrt(tl.sum(xc * xc, axis=1) / n_cols + eps)
        y = xc * rstd[:, None]
        if HAS_W:
            y = y * w.to(tl.float32)[None, :]
        if HAS_B:
            y = y + b.to(tl.float32)[None, :]
        tl.store(Y + rows64 * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
        if STORE_STATS:
            tl.store(MEAN + rows, mean, mask=row_mask)
            tl.store(RSTD + rows, rstd, mask=row_mask)


@triton.jit
def _layer_norm_bwd_kernel(DY, X, W, MEAN, RSTD, DX, PARTIAL, n_rows, n_cols,
                           stride_dy, stride_x, stride_dx,
                           HAS_W: tl.constexpr, COMPUTE_DW: tl.constexpr, COMPUTE_DB: tl.constexpr,
                           ROWS: tl.constexpr, BLOCK: tl.constexpr, PREFETCH: tl.constexpr):
    """Persistent like the forward; program p writes its fp32 partial dw and db to PARTIAL[0, p, :] and
    PARTIAL[1, p, :] (db's at [0, p, :] when dw is not computed)."""
    pid = tl.program_id(0)
    n_programs = tl.num_programs(0)
    cols = tl.arange(0, BLOCK)
    col_mask = cols < n_cols
    dw_acc = tl.zeros([ROWS, BLOCK], dtype=tl.float32)
    db_acc = tl.zeros([ROWS, BLOCK], dtype=tl.float32)
    n_tiles = tl.cdiv(n_rows, ROWS)
    if PREFETCH:
        rows = pid * ROWS + tl.arange(0, ROWS)
        mask = (rows < n_rows)[:, None] & col_mask[None, :]
        x_next = tl.load(X + rows.to(tl.int64)[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
        dy_next = tl.load(DY + rows.to(tl.int64)[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0)
    for tile in range(pid, n_tiles, n_programs):
        rows = tile * ROWS + tl.arange(0, ROWS)
        row_mask = rows < n_rows
        mask = row_mask[:, None] & col_mask[None, :]
        rows64 = rows.to(tl.int64)[:, None]
        if PREFETCH:  # issue the next tile's loads before this tile's reductions
            x = x_next
            dy = dy_next
            nxt = rows + n_programs * ROWS
            nmask = (nxt < n_rows)[:, None] & col_mask[None, :]
            x_next = tl.load(X + nxt.to(tl.int64)[:, None] * stride_x + cols[None, :], mask=nmask, other=0.0)
            dy_next = tl.load(DY + nxt.to(tl.int64)[:, None] * stride_dy + cols[None, :], mask=nmask, other=0.0)
            x = x.to(tl.float32)
            dy = dy.to(tl.float32)
        else:
            x = tl.load(X + rows64 * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(DY + rows64 * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(MEAN + rows, mask=row_mask, other=0.0)
        rstd = tl.load(RSTD + rows, mask=row_mask, other=0.0)
        x_hat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        if HAS_W:  # reloaded per tile (an L1/L2 hit): fewer registers than holding it across the loop
            g = dy * tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
        else:
            g = dy
        c1 = tl.sum(g, axis=1) / n_cols
        c2 = tl.sum(g * x_hat, axis=1) / n_cols
        dx = (g - c1[:, None] - x_hat * c2[:, None]) * rstd[:, None]
        tl.store(DX + rows64 * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
        if COMPUTE_DW:
            dw_acc += dy * x_hat
        if COMPUTE_DB:
            db_acc += dy
    if COMPUTE_DW:
        tl.store(PARTIAL + pid * n_cols + cols, tl.sum(dw_acc, axis=0), mask=col_mask)
    if COMPUTE_DB:
        if COMPUTE_DW:
            db_row = n_programs + pid
        else:
            db_row = pid
        tl.store(PARTIAL + db_row.to(tl.int64) * n_cols + cols, tl.sum(db_acc, axis=0), mask=col_mask)


def _alloc(shape, dtype, device) -> torch.Tensor:
    """Every buffer a kernel fills; tests replace it with a NaN-filled one to prove full coverage."""
    return torch.empty(shape, dtype=dtype, device=device)


def _tile(n_cols: int):
    """(BLOCK, ROWS, num_warps) for rows of n_cols elements, by the rules above."""
    block = next_power_of_2(n_cols)
    rows = max(1, TILE_ELEMS // block)
    return block, rows, max(4, min(16, rows * block // ELEMS_PER_WARP))


_residency = Residency(_INTERPRETER_PROGRAMS)


def _contiguous(t):
    return t if t is None or t.is_contiguous() else t.contiguous()


def _forward(x2, w, b, eps: float, store_stats: bool = True):
    """x2: (rows, N); w, b: (N,) or None. Returns y (rows, N) in x's dtype, mean and rstd (rows,) fp32
    (both None unless store_stats)."""
    n_rows, n_cols = x2.shape
    y = _alloc((n_rows, n_cols), x2.dtype, x2.device)
    mean = _alloc((n_rows,), torch.float32, x2.device) if store_stats else None
    rstd = _alloc((n_rows,), torch.float32, x2.device) if store_stats else None
    block, rows, num_warps = _tile(n_cols)
    prefetch = PREFETCH and PERSISTENT
    key = launch_key(x2.device.index, "fwd", block, rows, num_warps, prefetch, store_stats, x2.dtype,
                     *(None if t is None else t.dtype for t in (w, b)), tensors=(x2,))
    programs = _residency.grid(key, triton.cdiv(n_rows, rows), num_warps, x2.device, PERSISTENT)
    compiled = _layer_norm_fwd_kernel[(programs,)](x2, x2 if w is None else w, x2 if b is None else b, y,
                                                   y if mean is None else mean, y if rstd is None else rstd,
                                                   n_rows, n_cols, x2.stride(0), y.stride(0), eps,
                                                   HAS_W=w is not None, HAS_B=b is not None, ROWS=rows, BLOCK=block,
                                                   PREFETCH=prefetch, STORE_STATS=store_stats, num_warps=num_warps)
    _residency.learn(key, compiled, num_warps, x2.device)
    return y, mean, rstd


def _backward(dy2, x2, w, mean, rstd, dw_dtype, db_dtype):
    """Returns dx (rows, N) in x's dtype, dw (N,) in dw_dtype and db (N,) in db_dtype (each None when its
    dtype is None: not asked for)."""
    n_rows, n_cols = x2.shape
    compute_dw, compute_db = dw_dtype is not None, db_dtype is not None
    dx = _alloc((n_rows, n_cols), x2.dtype, x2.device)
    block, rows, num_warps = _tile(n_cols)
    key = launch_key(x2.device.index, "bwd", block, rows, num_warps, compute_dw, compute_db, PREFETCH, x2.dtype,
                     dy2.dtype, None if w is None else w.dtype, tensors=(x2, dy2))
    programs = _residency.grid(key, triton.cdiv(n_rows, rows), num_warps, x2.device)
    n_sets = int(compute_dw) + int(compute_db)  # partial rows: dw's (if any), then db's
    partial = _alloc((n_sets, programs, n_cols) if n_sets else (1,), torch.float32, x2.device)
    compiled = _layer_norm_bwd_kernel[(programs,)](dy2, x2, x2 if w is None else w, mean, rstd, dx, partial,
                                                   n_rows, n_cols, dy2.stride(0), x2.stride(0),
                                                   dx.stride(0), HAS_W=w is not None, COMPUTE_DW=compute_dw,
                                                   COMPUTE_DB=compute_db, ROWS=rows, BLOCK=block, PREFETCH=PREFETCH,
                                                   num_warps=num_warps)
    _residency.learn(key, compiled, num_warps, x2.device)
    dw = _alloc((n_cols,), dw_dtype, x2.device) if compute_dw else None
    db = _alloc((n_cols,), db_dtype, x2.device) if compute_db else None
    if n_sets:
        sum_partials(partial, dw if compute_dw else db, db if compute_dw else None)
    return dx, dw, db


class LayerNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        x2 = rows_view(x)
        w = _contiguous(weight)
        y, mean, rstd = _forward(x2, w, _contiguous(bias), eps)
        ctx.save_for_backward(x2, w, mean, rstd)
        ctx.x_shape = x.shape
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y if x.dim() == 2 else y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x2, w, mean, rstd = ctx.saved_tensors
        dw_dtype = w.dtype if w is not None and ctx.needs_input_grad[1] else None
        db_dtype = ctx.bias_dtype if ctx.needs_input_grad[2] else None
        dx, dw, db = _backward(rows_view(dy), x2, w, mean, rstd, dw_dtype, db_dtype)
        return dx if len(ctx.x_shape) == 2 else dx.view(ctx.x_shape), dw, db, None


def layer_norm(x: torch.Tensor, weight, bias, eps: float = 1e-5) -> torch.Tensor:
    """LayerNorm of x (..., N) over its last dimension, like F.layer_norm(x, (N,), weight, bias, eps).

    weight, bias: (N,) tensors or None. Returns (..., N) in x's dtype. Differentiable in x, weight and
    bias; runs the Triton kernels on CUDA (or the interpreter), else the reference. Without a graph to
    record, the forward kernel runs alone (no autograd Function, no statistics written).
    """
    n = x.shape[-1]
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.numel() != n:
            raise ValueError(f"layer_norm: last dim {n} != {name} size {t.numel()}")
    tensors = [t for t in (x, weight, bias) if t is not None]
    if not use_triton(*tensors) or x.numel() == 0 or n > MAX_COLS:
        return reference(x, weight, bias, eps)
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return LayerNormFunction.apply(x, weight, bias, float(eps))
    y, _, _ = _forward(rows_view(x), _contiguous(weight), _contiguous(bias), float(eps), store_stats=False)
    return y if x.dim() == 2 else y.view(x.shape)
