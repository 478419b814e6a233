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


_props: dict = {}  # device index -> CUDA device properties


def device_props(device: torch.device):
    """torch.cuda.get_device_properties(device), cached (each call costs host time on every launch)."""
    if device.index not in _props:
        _props[device.index] = torch.cuda.get_device_properties(device)
    return _props[device.index]


def gemm_writes_fp32(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether a @ b can come out of cuBLAS in fp32 (torch.mm / torch.addmm with out_dtype=torch.float32): CUDA
    operands of one 16-bit dtype. PyTorch's CPU matmul has no fp32 output for 16-bit operands."""
    return a.is_cuda and a.dtype in (torch.bfloat16, torch.float16) and b.dtype == a.dtype


def rows_view(t: torch.Tensor) -> torch.Tensor:
    """(..., N) -> (rows, N) with unit column stride (a view when the layout allows)."""
    if t.dim() != 2:  # (a 2-D input skips the reshape: each ATen call is ~5-20 us of host time)
        t = t.reshape(-1, t.shape[-1])
    return t if t.stride(-1) == 1 else t.contiguous()


class Residency:
    """How many programs of each compiled row-wise kernel one SM holds, learned after its first launch, and the
    grid that follows: every tile its own program, or (persistent) as many programs as the GPU holds at once.

    One table per kernel module (launch keys of different modules may look alike). Until a configuration has
    been compiled, assume half the SM's warp slots (what the register counts allow).
    """

    def __init__(self, interpreter_programs: int = 4):
        self.interpreter_programs = interpreter_programs  # CPU interpreter: a small grid, several programs
        self.per_sm: dict = {}  # launch key (device, kernel, shapes, flags, dtypes) -> programs per SM

    def grid(self, key, n_tiles: int, num_warps: int, device: torch.device, persistent: bool = True) -> int:
        if not persistent:
            return n_tiles
        if device.type != "cuda":
            return max(1, min(n_tiles, self.interpreter_programs))
        # H200: capping it at 2 (or 1) per SM slowed the 16384x4096 RMSNorm backward from 0.108 to 0.112
        # (0.145) ms and the LayerNorm fwd+bwd from 0.199 to 0.208 ms.
        per_sm = self.per_sm.get(key, max(1, 32 // num_warps))
        return max(1, min(n_tiles, device_props(device).multi_processor_count * per_sm))

    def learn(self, key, compiled, num_warps: int, device: torch.device) -> None:
        """Record how many programs of a just-launched kernel fit on one SM (CUDA occupancy rules: registers
        are allocated per warp in units of 256, shared memory per block with 1 KB reserved)."""
        n_regs = getattr(compiled, "n_regs", 0)
        if device.type != "cuda" or key in self.per_sm or not n_regs:
            return
        props = device_props(device)  # (also reached after a non-persistent launch, which skips grid's lookup)
        regs_per_warp = -(-n_regs * 32 // 256) * 256
        fits = [getattr(props, "regs_per_multiprocessor", 65536) // (regs_per_warp * num_warps),
                getattr(props, "max_threads_per_multi_processor", 2048) // (32 * num_warps), 32]
        shared = getattr(getattr(compiled, "metadata", None), "shared", 0)
        if shared:
            fits.append(getattr(props, "shared_memory_per_multiprocessor", 233472) // (shared + 1024))
        self.per_sm[key] = max(1, min(fits))


def launch_key(*parts, tensors=()):
    """A launch key; includes the 16-divisibility of strides and widths that Triton specialises on."""
    return parts + tuple((t.stride(0) % 16 == 0, t.shape[-1] % 16 == 0) for t in tensors)
