"""LayerNorm over the last dimension, forward and backward, in Triton; equals
torch.nn.functional.layer_norm(x, (N,), weight, bias, eps), which nn.LayerNorm (and so transformers) calls.

  x: (..., N) fp32/fp16/bf16; weight, bias: (N,) any float dtype, each optional.
  mean = mean(x), rstd = rsqrt(mean((x - mean)^2) + eps)    (fp32, biased variance, two passes over
  the row held in registers);  y = ((x - mean) * rstd * w + b).to(x.dtype), rounded once.

Forward saves x, mean and rstd (fp32, one each per row). Backward, with x_hat = (x - mean) * rstd and
g = dy * w:   dx = rstd * (g - mean(g) - x_hat * mean(g * x_hat)),  dw = sum_rows(dy * x_hat),
db = sum_rows(dy). dw and db are reduced in two steps: each program walks many rows and writes one
fp32 partial row of each, the host sums the (programs, N) partials. Leading dimensions become rows.
"""
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from fastlm.kernels._utils import next_power_of_2, use_triton

# Tuning constants: the same rules and values as rms_norm.py (read their comments there), chosen by rule
# and ptxas register counts (bf16, sm_90, N=4096, 8 warps: forward 64 registers/thread, backward 116 with
# the weight reloaded per tile); speed to be measured on the H200 with bench/kernel_ops/layer_norm.py.
TILE_ELEMS = 4096  # ROWS * BLOCK >= 4096 elements per program step (short rows are batched)
ELEMS_PER_WARP = 512  # warps = tile / 512 in [4, 16]: two 16-byte bf16 vectors per lane per tensor
PERSISTENT = True  # forward grid = SMs x resident programs (False: one tile per program); backward always
MAX_COLS = 65536  # wider rows use the reference
_INTERPRETER_PROGRAMS = 4


def reference(x: torch.Tensor, weight, bias, eps: float) -> torch.Tensor:
    """The definition: torch's own layer_norm over the last dimension (differentiable)."""
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


@triton.jit
def _layer_norm_fwd_kernel(X, W, B, Y, MEAN, RSTD, n_rows, n_cols, stride_x, stride_y, eps,
                           HAS_W: tl.constexpr, HAS_B: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """Persistent: program p normalises row tiles p, p + programs, ...; each tile is (ROWS, BLOCK)."""
    pid = tl.program_id(0)
    n_programs = tl.num_programs(0)
    cols = tl.arange(0, BLOCK)
    col_mask = cols < n_cols
    if HAS_W:
        w = tl.load(W + cols, mask=col_mask, other=0.0)  # once per program, in its own dtype
    if HAS_B:
        b = tl.load(B + cols, mask=col_mask, other=0.0)
    n_tiles = tl.cdiv(n_rows, ROWS)
    for tile in range(pid, n_tiles, n_programs):
        rows = tile * ROWS + tl.arange(0, ROWS)
        row_mask = rows < n_rows
        mask = row_mask[:, None] & col_mask[None, :]
        rows64 = rows.to(tl.int64)[:, None]
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
        tl.store(MEAN + rows, mean, mask=row_mask)
        tl.store(RSTD + rows, rstd, mask=row_mask)


@triton.jit
def _layer_norm_bwd_kernel(DY, X, W, MEAN, RSTD, DX, DW_PARTIAL, DB_PARTIAL, n_rows, n_cols,
                           stride_dy, stride_x, stride_dx,
                           HAS_W: tl.constexpr, COMPUTE_DW: tl.constexpr, COMPUTE_DB: tl.constexpr,
                           ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """Persistent like the forward; program p writes its fp32 partial dw, db to row p of the partials."""
    pid = tl.program_id(0)
    n_programs = tl.num_programs(0)
    cols = tl.arange(0, BLOCK)
    col_mask = cols < n_cols
    dw_acc = tl.zeros([ROWS, BLOCK], dtype=tl.float32)
    db_acc = tl.zeros([ROWS, BLOCK], dtype=tl.float32)
    n_tiles = tl.cdiv(n_rows, ROWS)
    for tile in range(pid, n_tiles, n_programs):
        rows = tile * ROWS + tl.arange(0, ROWS)
        row_mask = rows < n_rows
        mask = row_mask[:, None] & col_mask[None, :]
        rows64 = rows.to(tl.int64)[:, None]
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
        tl.store(DW_PARTIAL + pid * n_cols + cols, tl.sum(dw_acc, axis=0), mask=col_mask)
    if COMPUTE_DB:
        tl.store(DB_PARTIAL + pid * n_cols + cols, tl.sum(db_acc, axis=0), mask=col_mask)


def _alloc(shape, dtype, device) -> torch.Tensor:
    """Every buffer a kernel fills; tests replace it with a NaN-filled one to prove full coverage."""
    return torch.empty(shape, dtype=dtype, device=device)


def _tile(n_cols: int):
    """(BLOCK, ROWS, num_warps) for rows of n_cols elements, by the rules above."""
    block = next_power_of_2(n_cols)
    rows = max(1, TILE_ELEMS // block)
    return block, rows, max(4, min(16, rows * block // ELEMS_PER_WARP))


_props: dict = {}  # device index -> CUDA device properties
_resident: dict = {}  # launch key (device, kernel, shapes, flags, dtypes) -> programs one SM holds at once


def _key(*parts, tensors=()):
    """A launch key; includes the 16-divisibility of strides and widths that Triton specialises on."""
    return parts + tuple((t.stride(0) % 16 == 0, t.shape[-1] % 16 == 0) for t in tensors)


def _grid(key, n_tiles: int, num_warps: int, device: torch.device, persistent: bool = True) -> int:
    """Programs to launch: every tile its own, or (persistent) as many as the GPU holds at once. Until a
    configuration has been compiled, assume half the SM's warp slots (what the register counts allow)."""
    if not persistent:
        return n_tiles
    if device.type != "cuda":
        return max(1, min(n_tiles, _INTERPRETER_PROGRAMS))
    if device.index not in _props:
        _props[device.index] = torch.cuda.get_device_properties(device)
    per_sm = _resident.get(key, max(1, 32 // num_warps))
    return max(1, min(n_tiles, _props[device.index].multi_processor_count * per_sm))


def _learn_residency(key, compiled, num_warps: int, device: torch.device) -> None:
    """Record how many programs of a just-launched kernel fit on one SM (CUDA occupancy rules: registers
    are allocated per warp in units of 256, shared memory per block with 1 KB reserved)."""
    n_regs = getattr(compiled, "n_regs", 0)
    if device.type != "cuda" or key in _resident or not n_regs:
        return
    props = _props[device.index]
    regs_per_warp = -(-n_regs * 32 // 256) * 256
    fits = [getattr(props, "regs_per_multiprocessor", 65536) // (regs_per_warp * num_warps),
            getattr(props, "max_threads_per_multi_processor", 2048) // (32 * num_warps), 32]
    shared = getattr(getattr(compiled, "metadata", None), "shared", 0)
    if shared:
        fits.append(getattr(props, "shared_memory_per_multiprocessor", 233472) // (shared + 1024))
    _resident[key] = max(1, min(fits))


def _rows_view(t: torch.Tensor) -> torch.Tensor:
    """(..., N) -> (rows, N) with unit column stride (a view when the layout allows)."""
    t = t.reshape(-1, t.shape[-1])
    return t if t.stride(-1) == 1 else t.contiguous()


def _forward(x2, w, b, eps: float):
    """x2: (rows, N); w, b: (N,) or None. Returns y (rows, N) in x's dtype, mean and rstd (rows,) fp32."""
    n_rows, n_cols = x2.shape
    y = _alloc((n_rows, n_cols), x2.dtype, x2.device)
    mean = _alloc((n_rows,), torch.float32, x2.device)
    rstd = _alloc((n_rows,), torch.float32, x2.device)
    block, rows, num_warps = _tile(n_cols)
    key = _key(x2.device.index, "fwd", block, rows, num_warps, x2.dtype, *(None if t is None else t.dtype for t in (w, b)),
               tensors=(x2,))
    programs = _grid(key, triton.cdiv(n_rows, rows), num_warps, x2.device, PERSISTENT)
    compiled = _layer_norm_fwd_kernel[(programs,)](x2, x2 if w is None else w, x2 if b is None else b, y, mean, rstd,
                                                   n_rows, n_cols, x2.stride(0), y.stride(0), eps,
                                                   HAS_W=w is not None, HAS_B=b is not None, ROWS=rows, BLOCK=block,
                                                   num_warps=num_warps)
    _learn_residency(key, compiled, num_warps, x2.device)
    return y, mean, rstd


def _backward(dy2, x2, w, mean, rstd, compute_dw: bool, compute_db: bool):
    """Returns dx (rows, N) in x's dtype, and fp32 sums dw, db (N,) (None where not asked for)."""
    n_rows, n_cols = x2.shape
    dx = _alloc((n_rows, n_cols), x2.dtype, x2.device)
    block, rows, num_warps = _tile(n_cols)
    key = _key(x2.device.index, "bwd", block, rows, num_warps, compute_dw, compute_db, x2.dtype, dy2.dtype,
               None if w is None else w.dtype, tensors=(x2, dy2))
    programs = _grid(key, triton.cdiv(n_rows, rows), num_warps, x2.device)
    dw_partial = _alloc((programs, n_cols) if compute_dw else (1,), torch.float32, x2.device)
    db_partial = _alloc((programs, n_cols) if compute_db else (1,), torch.float32, x2.device)
    compiled = _layer_norm_bwd_kernel[(programs,)](dy2, x2, x2 if w is None else w, mean, rstd, dx, dw_partial,
                                                   db_partial, n_rows, n_cols, dy2.stride(0), x2.stride(0),
                                                   dx.stride(0), HAS_W=w is not None, COMPUTE_DW=compute_dw,
                                                   COMPUTE_DB=compute_db, ROWS=rows, BLOCK=block, num_warps=num_warps)
    _learn_residency(key, compiled, num_warps, x2.device)
    dw = dw_partial.sum(0) if compute_dw else None
    db = db_partial.sum(0) if compute_db else None
    return dx, dw, db


class LayerNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        x2 = _rows_view(x)
        w = None if weight is None else weight.contiguous()
        b = None if bias is None else bias.contiguous()
        y, mean, rstd = _forward(x2, w, b, eps)
        ctx.save_for_backward(x2, w, mean, rstd)
        ctx.x_shape = x.shape
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x2, w, mean, rstd = ctx.saved_tensors
        compute_dw = w is not None and ctx.needs_input_grad[1]
        compute_db = ctx.bias_dtype is not None and ctx.needs_input_grad[2]
        dx, dw, db = _backward(_rows_view(dy), x2, w, mean, rstd, compute_dw, compute_db)
        dw = None if dw is None else dw.to(w.dtype)
        db = None if db is None else db.to(ctx.bias_dtype)
        return dx.view(ctx.x_shape), dw, db, None


def layer_norm(x: torch.Tensor, weight, bias, eps: float = 1e-5) -> torch.Tensor:
    """LayerNorm of x (..., N) over its last dimension, like F.layer_norm(x, (N,), weight, bias, eps).

    weight, bias: (N,) tensors or None. Returns (..., N) in x's dtype. Differentiable in x, weight and
    bias; runs the Triton kernels on CUDA (or the interpreter), else the reference.
    """
    n = x.shape[-1]
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.numel() != n:
            raise ValueError(f"layer_norm: last dim {n} != {name} size {t.numel()}")
    tensors = [t for t in (x, weight, bias) if t is not None]
    if not use_triton(*tensors) or x.numel() == 0 or n > MAX_COLS:
        return reference(x, weight, bias, eps)
    return LayerNormFunction.apply(x, weight, bias, float(eps))
