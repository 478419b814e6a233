"""Helpers shared by the kernel files: when Triton may run, launch-shape arithmetic, and the kernel that
sums the norms' per-program weight-gradient partials.

Triton kernels run on CUDA tensors, and on CPU tensors only under the Triton interpreter
(`TRITON_INTERPRET=1`, set before any kernel is defined; the tests do this). Anywhere else the
host wrappers fall back to their plain-PyTorch `reference`, so fastlm still works on a CPU.
"""
import os

import torch
import triton
import triton.language as tl


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(*tensors: torch.Tensor) -> bool:
    """True when a Triton kernel can run on these tensors (all CUDA, or the interpreter is on)."""
    if interpreting():
        return True
    return all(t.is_cuda for t in tensors)


def next_power_of_2(n: int) -> int:
    return triton.next_power_of_2(n)


def num_warps_for(block_size: int) -> int:
    """Warps for a row-wise kernel whose block holds `block_size` elements.

    One warp per 256 elements of a row, between 4 and 16: the usual rule for row-wise reductions
    (a warp loads 32 lanes x 8 elements of 16-bit data per instruction). To be tuned per op on the H200."""
    return max(4, min(16, block_size // 256))


# The weight-gradient partials of the norm backwards (one fp32 row per persistent program) are summed by
# this kernel instead of `partial.sum(0).to(dtype)`: on the H200 (2026-11-28, 396 x 4096 fp32 partials)
# torch's dim-0 reduction took 9.2 us of GPU time plus 1 us for the cast, two launches that cost ~47 us
# of host time on the device machine's CPU; one Triton launch does both.
SUM_TILE = 8192  # fp32 elements per step of one program: BLOCK_P partial rows x BLOCK_N columns
SUM_WARPS = 8  # 32 fp32 per lane per step


@triton.jit
def _sum_partials_kernel(PARTIAL, OUT0, OUT1, n_partials, n_cols, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
    """OUTj[c] = sum_p PARTIAL[j, p, c] in fp32, rounded once to OUTj's dtype (j = 0, 1). Program (i, j)
    sums columns [i * BLOCK_N, (i + 1) * BLOCK_N) of partial set j."""
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < n_cols
    part = tl.program_id(1)
    base = PARTIAL + part.to(tl.int64) * n_partials * n_cols
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for p0 in range(0, n_partials, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        tile = tl.load(base + p[:, None] * n_cols + cols[None, :],
                       mask=(p < n_partials)[:, None] & col_mask[None, :], other=0.0)
        acc += tl.sum(tile, axis=0)
    if part == 0:
        tl.store(OUT0 + cols, acc.to(OUT0.dtype.element_ty), mask=col_mask)
    else:
        tl.store(OUT1 + cols, acc.to(OUT1.dtype.element_ty), mask=col_mask)


def sum_partials(partial: torch.Tensor, out0: torch.Tensor, out1: torch.Tensor = None) -> None:
    """out0 (N,) <- partial[0] summed over its P rows, and out1 <- partial[1] when given; partial is a
    contiguous fp32 (J, P, N) tensor, J = 1 or 2; outputs contiguous, any float dtype (rounded once)."""
    n_sets, n_partials, n_cols = partial.shape
    block_p = min(256, next_power_of_2(n_partials))
    block_n = min(max(16, SUM_TILE // block_p), next_power_of_2(n_cols))
    _sum_partials_kernel[(triton.cdiv(n_cols, block_n), n_sets)](partial, out0, out0 if out1 is None else out1,
                                                                 n_partials, n_cols, BLOCK_P=block_p,
                                                                 BLOCK_N=block_n, num_warps=SUM_WARPS)
