"""Helpers shared by the kernel files: when Triton may run, and launch-shape arithmetic.

Triton kernels run on CUDA tensors, and on CPU tensors only under the Triton interpreter
(`TRITON_INTERPRET=1`, set before any kernel is defined; the tests do this). Anywhere else the
host wrappers fall back to their plain-PyTorch `reference`, so fastlm still works on a CPU.
"""
import os

import torch
import triton


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
