"""Host side shared by the gated activations y = act(gate) * up (swiglu.py, geglu.py).

Both ops tile alike: rows of N columns (leading dimensions flattened), program p handles row p // n_col_blocks,
columns [BLOCK * (p % n_col_blocks), + BLOCK). Their kernels take the same arguments:
    forward   (G, U, Y, n_cols, stride_g, stride_u, stride_y, n_col_blocks, BLOCK, **op constexprs)
    backward  (DY, G, U, DG, DU, H, n_cols, stride_dy, stride_g, stride_u, stride_dg, stride_du, stride_h,
               n_col_blocks, BLOCK, WRITE_H, **op constexprs)
and both backwards may write dgate/dup over the saved gate/up (each op's docstring says when that is safe), and
with WRITE_H the forward's y = act(gate) * up into H as well, which may be DY's storage: the MLP's backward needs y
for the down projection's dA and otherwise runs the forward kernel once more for it (fastlm.kernels.lora_mlp).
"""
import torch
import triton


def alloc(shape, dtype, device) -> torch.Tensor:
    """Every output buffer comes from here (tests swap in a NaN-filled allocator to prove full coverage)."""
    return torch.empty(shape, dtype=dtype, device=device)


def rows(x: torch.Tensor) -> torch.Tensor:
    """(..., N) -> (M, N) with unit column stride; a view whenever the layout allows."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 or x2.shape[-1] <= 1 else x2.contiguous()


def _grid(m: int, n: int, block: int) -> tuple:
    n_col_blocks = triton.cdiv(n, block)
    return (m * n_col_blocks,), n_col_blocks


def forward(kernel, gate: torch.Tensor, up: torch.Tensor, block: int, num_warps: int, **constexprs) -> torch.Tensor:
    """gate, up (..., N) -> y (..., N) contiguous, gate's dtype, by `kernel` with BLOCK=block."""
    g2, u2 = rows(gate), rows(up)
    m, n = g2.shape
    y = alloc((m, n), gate.dtype, gate.device)
    if y.numel():
        grid, n_col_blocks = _grid(m, n, block)
        kernel[grid](g2, u2, y, n, g2.stride(0), u2.stride(0), y.stride(0), n_col_blocks, BLOCK=block,
                     num_warps=num_warps, **constexprs)
    return y.view(gate.shape)


def backward(kernel, dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, inplace: bool, block: int,
             num_warps: int, h_out: torch.Tensor = None, **constexprs) -> tuple:
    """(dgate, dup) shaped like gate/up; written into gate's/up's storage when inplace. h_out: a tensor shaped like
    gate, of its dtype, with unit column stride (dy itself allowed), that also receives y = act(gate) * up."""
    dy2, g2, u2 = rows(dy), rows(gate), rows(up)
    m, n = g2.shape
    if inplace:
        dg, du = g2, u2
    else:
        dg, du = alloc((m, n), gate.dtype, gate.device), alloc((m, n), up.dtype, up.device)
    h2 = None
    if h_out is not None:
        h2 = h_out.reshape(m, n) if h_out.shape == gate.shape and h_out.dtype == gate.dtype else None
        if h2 is None or h2.data_ptr() != h_out.data_ptr() or h2.stride(1) != 1:  # a copy would not reach h_out
            raise ValueError(f"h_out must be shaped like gate {tuple(gate.shape)} ({gate.dtype}) with unit column "
                             f"stride, got {tuple(h_out.shape)} ({h_out.dtype})")
    if dg.numel():
        grid, n_col_blocks = _grid(m, n, block)
        h_arg = dy2 if h2 is None else h2  # not written without WRITE_H
        kernel[grid](dy2, g2, u2, dg, du, h_arg, n, dy2.stride(0), g2.stride(0), u2.stride(0), dg.stride(0),
                     du.stride(0), h_arg.stride(0), n_col_blocks, BLOCK=block, WRITE_H=h2 is not None,
                     num_warps=num_warps, **constexprs)
    return dg.view(gate.shape), du.view(up.shape)


def may_overwrite(gate: torch.Tensor, up: torch.Tensor, inplace_backward: bool) -> bool:
    """Whether backward may write over gate and up: asked for, both intermediate results of the autograd graph
    (their storage's owner has a grad_fn; leaf tensors are never overwritten), and not the same storage."""
    def graph_owned(x):
        base = x if x._base is None else x._base
        return base.grad_fn is not None
    return inplace_backward and graph_owned(gate) and graph_owned(up) and gate.data_ptr() != up.data_ptr()
