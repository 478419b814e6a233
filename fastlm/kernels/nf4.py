"""NF4 / FP4 dequantization of bitsandbytes 4-bit weights, bit-exact with
`bitsandbytes.functional.dequantize_4bit`, and a fused dequantize-matmul for decode.

Format (what bitsandbytes' `quantize_4bit` / `Params4bit` store; we read only the public attributes
of its `QuantState`: shape, dtype, blocksize, quant_type, absmax, nested, offset, state2):
    packed   uint8, (n+1)//2 bytes for n = prod(shape) weights, flattened row-major (any storage
             shape/dtype: ((n+1)//2, 1) uint8, (1, ...) transposed, or a bf16/fp16 `quant_storage` view).
             Byte i holds element 2i in its HIGH nibble and element 2i+1 in its LOW nibble.
    absmax   fp32 (n_blocks,), one scale per `blocksize` consecutive elements of the flat weight
             (blocks run across rows when the last dim is not a multiple of blocksize).
    nested   (double quantization) absmax is uint8 codes instead, and
                 absmax[i] = fp32(fp32(state2.code[q[i]] * state2.absmax[i // state2.blocksize]) + offset)
             (two roundings: bitsandbytes dequantizes into an fp32 tensor, then adds offset in place).
    value    w[e] = round_to_dtype(fp32(CODE[q[e]] * absmax[e // blocksize]))
             CODE is the 16-entry NF4 (or FP4) table of `bitsandbytes.functional.get_4bit_type`, which
             bitsandbytes' CUDA kernel hard-codes as the same fp32 constants and which its dequantize
             uses regardless of quant_state.code. The product is formed in fp32 and rounded ONCE to the
             output dtype, round-to-nearest-even, on every bnb path (CUDA: float -> T conversion,
             CPU C++: float_to_bf16 / static_cast, CPU fallback: torch `.to(dtype)`).

How we match it bit for bit:
  * the product is one fp32 multiply of the same two fp32 numbers; the nested absmax is one multiply
    then one add, and the kernels are launched with `enable_fp_fusion=False` on the GPU so that the
    compiler cannot contract them into an FMA (which rounds once and would differ in the last bit);
  * fp32 -> bf16 on the GPU is Triton's default cast (cvt.rn, round-to-nearest-even). The Triton CPU
    interpreter truncates that cast, so when interpreting we round by hand on the fp32 bit pattern
    (bits + 0x7FFF + lsb, keep the high half); fp32 -> fp16 rounds correctly in both.

Public: dequantize_nf4(packed, quant_state, out=None, *, dtype=None) -> Tensor   (no autograd: frozen)
        nf4_matmul(x, packed, quant_state, *, split_k=None) -> x @ W.T          (autograd w.r.t. x)
The fused matmul is meant for few tokens (M <= 16, decode): it reads the 4-bit weight once and never
writes the dequantized weight; for many tokens dequantize_nf4 + cuBLAS is the right tool.
"""
import math
from typing import Optional

import torch
import triton
import triton.language as tl

from fastlm.kernels._utils import interpreting, use_triton

# The tables of bitsandbytes.functional.get_4bit_type, in nibble order, as fp32.
NF4_CODE = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
            -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
            0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
            0.7229568362236023, 1.0]
# FP4 (1 sign, 2 exponent, 1 mantissa bit) in nibble order, divided by 12 in fp32 exactly as bnb does.
_FP4_RAW = [0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0]
_CODES = {}

# Elements per program of the dequant kernel: 4096 (2 KiB packed in, 8 KiB bf16 out) with 4 warps is
# one 16-byte packed load per thread and 4 16-byte stores. Chosen by rule (16 B vectors, enough
# programs: 14,336 for a 14336x4096 weight). H200 (bench/tune_norms.py, 2026-11-28, 14336x4096 bf16, GPU
# time per call, plain absmax): 4096/4 warps 0.0401 ms, 4096/8 0.0433, 8192/4 0.0397, 8192/8 0.0399,
# 16384/8 0.0440, 2048/4 0.0414 (nested: 0.0391 at 4096/4, 0.0389 at 8192/4): kept. That is 82-88% of
# the copy bandwidth; timed around the host call it read 63% once: the host work (~45 us plain, ~65 us
# nested on that CPU) then showed, hence the trimmed host path (_f32, _packed_arg, _offset).
DEQUANT_TILE = 4096
DEQUANT_WARPS = 4
# Fused matmul tiles. BLOCK_M = 16 is tl.dot's minimum; BLOCK_N = 32 gives 448 programs for N = 14336
# (>= 3 per SM on 132 SMs) without split-K; BLOCK_K = 256 reads 128 contiguous bytes per weight row per
# step. Chosen by rule; to be measured on the H200 against dequant + cuBLAS.
MM_BLOCK_M, MM_BLOCK_N, MM_BLOCK_K, MM_WARPS, MM_STAGES = 16, 32, 256, 4, 3


def _code(quant_type: str, device) -> torch.Tensor:
    key = (quant_type, str(device))
    if key not in _CODES:
        if quant_type == "nf4":
            table = torch.tensor(NF4_CODE, dtype=torch.float32)
        elif quant_type == "fp4":
            table = torch.tensor(_FP4_RAW, dtype=torch.float32) / 12.0
        else:
            raise ValueError(f"quant_type must be 'nf4' or 'fp4', got {quant_type!r}")
        _CODES[key] = table.to(device)
    return _CODES[key]


def _flat_bytes(packed: torch.Tensor) -> torch.Tensor:
    """The packed storage as a flat uint8 tensor, whatever shape and storage dtype bnb gave it."""
    flat = packed.contiguous().reshape(-1)
    return flat if flat.dtype == torch.uint8 else flat.view(torch.uint8)


def _offset(qs, device) -> torch.Tensor:
    """The nested offset as an fp32 tensor of one element on `device` (bnb's own tensor when it is one)."""
    off = qs.offset
    if torch.is_tensor(off) and off.dtype == torch.float32 and off.device == device and off.numel() == 1:
        return off
    if not torch.is_tensor(off):
        off = torch.tensor(float(off))
    return off.to(device=device, dtype=torch.float32).reshape(1)


def _f32(t: torch.Tensor) -> torch.Tensor:
    """t as a contiguous fp32 tensor, without an ATen call when it already is one (each costs ~5-20 us of
    host time on the H200 machine's CPU, more than a 14336 x 4096 dequantization's GPU time takes)."""
    return t if t.dtype == torch.float32 and t.is_contiguous() else t.float().contiguous()


def _absmax_fp32(qs) -> torch.Tensor:
    """The fp32 block scales, undoing double quantization exactly as bitsandbytes does."""
    if not qs.nested:
        return qs.absmax.float()
    s2 = qs.state2
    q = qs.absmax.long()
    scale2 = s2.absmax.float()[torch.arange(q.numel(), device=q.device) // s2.blocksize]
    absmax = s2.code.float()[q] * scale2           # fp32 product, rounded (bnb: dequantize_blockwise)
    return absmax + _offset(qs, absmax.device)     # then fp32 add, rounded (bnb: absmax += offset)


def reference(packed: torch.Tensor, quant_state) -> torch.Tensor:
    """The definition: bitsandbytes' own dequantization (needs bitsandbytes installed)."""
    import bitsandbytes.functional as bnbf
    return bnbf.dequantize_4bit(packed, quant_state)


def reference_torch(packed: torch.Tensor, quant_state, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Plain-PyTorch re-implementation of `reference`, equal bit for bit; returns quant_state.shape."""
    qs = quant_state
    shape, dtype = tuple(qs.shape), dtype or qs.dtype
    n = math.prod(shape)
    b = _flat_bytes(packed)
    q = torch.stack([b >> 4, b & 0xF], dim=1).reshape(-1)[:n].long()   # high nibble = even element
    code = _code(qs.quant_type, b.device)
    scale = _absmax_fp32(qs)[torch.arange(n, device=b.device) // qs.blocksize]
    return (code[q] * scale).to(dtype).reshape(shape)                  # one fp32 product, one rounding


@triton.jit
def _absmax_rows(absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, blk, mask, BS2: tl.constexpr,
                 NESTED: tl.constexpr):
    """fp32 scale of quant blocks `blk` (any shape); nested: code2[q] * absmax2[blk // BS2] + offset."""
    if NESTED:
        qa = tl.load(absmax_ptr + blk, mask=mask, other=0).to(tl.int32)
        a2 = tl.load(absmax2_ptr + blk // BS2, mask=mask, other=0.0)
        return tl.load(code2_ptr + qa) * a2 + tl.load(offset_ptr)   # no FMA: enable_fp_fusion=False
    else:
        return tl.load(absmax_ptr + blk, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _round_fp32(v, DTYPE: tl.constexpr, MANUAL_BF16: tl.constexpr):
    """fp32 -> DTYPE, round to nearest even, returned as fp32 holding the rounded value (exact)."""
    if MANUAL_BF16:  # interpreter: its fp32->bf16 cast truncates; round on the bit pattern instead
        bits = v.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True)
    else:
        return v.to(DTYPE).to(tl.float32)


@triton.jit
def _to_out(v, DTYPE: tl.constexpr, MANUAL_BF16: tl.constexpr):
    """fp32 -> DTYPE for a store, round to nearest even."""
    if MANUAL_BF16:
        bits = v.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        return bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return v.to(DTYPE)


@triton.jit
def _nf4_dequant_kernel(packed_ptr, absmax_ptr, code_ptr, code2_ptr, absmax2_ptr, offset_ptr, out_ptr,
                        n_elements, n_bytes, n_blocks, row_width, row_stride,
                        BS: tl.constexpr, BS2: tl.constexpr, ROWS: tl.constexpr, NESTED: tl.constexpr,
                        STRIDED: tl.constexpr, MANUAL_BF16: tl.constexpr):
    # One program: ROWS quant blocks x BS elements, as a (ROWS, BS // 2) tile of packed bytes.
    # STRIDED: the output is (N, row_width) with rows row_stride apart; row_width is a multiple of BS, so each quant
    # block lies within one row and is stored contiguously from its row's start + its offset in the row.
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)                  # (ROWS,)
    absmax = _absmax_rows(absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, rows, rows < n_blocks,
                          BS2, NESTED)
    byte = rows[:, None] * (BS // 2) + tl.arange(0, BS // 2)[None, :]                 # (ROWS, BS/2)
    q = tl.load(packed_ptr + byte, mask=byte < n_bytes, other=0).to(tl.int32)
    hi = tl.load(code_ptr + (q >> 4)) * absmax[:, None]                               # even elements
    lo = tl.load(code_ptr + (q & 15)) * absmax[:, None]                               # odd elements
    vals = tl.interleave(hi, lo)                                                      # (ROWS, BS)
    elem = rows[:, None] * BS + tl.arange(0, BS)[None, :]
    if STRIDED:
        first = rows * BS                                                             # (ROWS,) block starts
        place = (first // row_width) * row_stride + first % row_width
        target = place[:, None] + tl.arange(0, BS)[None, :]
    else:
        target = elem
    tl.store(out_ptr + target, _to_out(vals, out_ptr.dtype.element_ty, MANUAL_BF16), mask=elem < n_elements)


def _check_state(packed: torch.Tensor, qs) -> int:
    n = math.prod(qs.shape)
    bs = qs.blocksize
    if qs.quant_type not in ("nf4", "fp4"):
        raise ValueError(f"quant_type must be 'nf4' or 'fp4', got {qs.quant_type!r}")
    if bs < 2 or bs & (bs - 1):
        raise ValueError(f"blocksize must be a power of two >= 2, got {bs}")
    if packed.numel() * packed.element_size() != (n + 1) // 2:
        raise ValueError(f"packed holds {packed.numel() * packed.element_size()} bytes, "
                         f"expected {(n + 1) // 2} for shape {tuple(qs.shape)}")
    return n


def _state_args(qs, device):
    """Kernel pointer arguments for the block scales (nested or not) and the 4-bit table."""
    code = _code(qs.quant_type, device)
    if qs.nested:
        s2 = qs.state2
        if s2.blocksize & (s2.blocksize - 1):
            raise ValueError(f"state2.blocksize must be a power of two, got {s2.blocksize}")
        absmax = qs.absmax if qs.absmax.is_contiguous() else qs.absmax.contiguous()
        return absmax, code, _f32(s2.code), _f32(s2.absmax), _offset(qs, device), s2.blocksize
    absmax = _f32(qs.absmax)
    return absmax, code, code, absmax, absmax, 1   # unused slots get any valid pointer


def _packed_arg(packed: torch.Tensor) -> torch.Tensor:
    """The packed bytes for a kernel pointer: bnb's own contiguous uint8 tensor as is, else a flat view."""
    return packed if packed.dtype == torch.uint8 and packed.is_contiguous() else _flat_bytes(packed)


def _launch_opts() -> dict:
    return {} if interpreting() else {"enable_fp_fusion": False}


def dequantize_nf4(packed: torch.Tensor, quant_state, out: Optional[torch.Tensor] = None, *,
                   dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Dequantize a bitsandbytes 4-bit weight (nf4 or fp4, nested or not) bit-exactly.

    Args:
        packed: the packed weight (`Params4bit.data`, the first output of `quantize_4bit`), any shape.
        quant_state: its `bitsandbytes.functional.QuantState` (or any object with the same attributes).
        out: optional buffer (bf16/fp16/fp32) to write into, e.g. one reused buffer per weight shape; its dtype
            sets the output dtype. Either contiguous with prod(quant_state.shape) elements, or a 2-D (N, K) view
            of the weight's shape whose rows are further apart than K (out.stride() == (ld, 1), ld > K: the
            columns of a wider matrix, as fused LoRA's [W | s B] is built), K a multiple of the blocksize.
        dtype: output dtype when `out` is not given; default quant_state.dtype.
    Returns:
        `out`, or a new tensor of shape quant_state.shape. Unlike bnb, never transposed (bnb transposes
        its result when the packed tensor has a leading dim of 1).
    """
    qs = quant_state
    n = _check_state(packed, qs)
    if out is None:
        out = torch.empty(tuple(qs.shape), dtype=dtype or qs.dtype, device=packed.device)
    elif out.numel() != n or not (out.is_contiguous() or _row_strided(out, qs)):
        raise ValueError(f"out must be contiguous with {n} elements, or a row-strided view of shape "
                         f"{tuple(qs.shape)} whose width is a multiple of {qs.blocksize}, got {tuple(out.shape)} with "
                         f"strides {out.stride()}")
    if out.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"output dtype must be bf16/fp16/fp32, got {out.dtype}")
    if not use_triton(packed, out):
        return out.copy_(reference_torch(packed, qs, out.dtype).reshape(out.shape))
    if n == 0:
        return out
    absmax, code, code2, absmax2, offset, bs2 = _state_args(qs, packed.device)
    bs = qs.blocksize
    rows = max(1, DEQUANT_TILE // bs)
    n_blocks = triton.cdiv(n, bs)
    strided = not out.is_contiguous()
    width, stride = (out.shape[1], out.stride(0)) if strided else (1, 1)
    _nf4_dequant_kernel[(triton.cdiv(n_blocks, rows),)](
        _packed_arg(packed), absmax, code, code2, absmax2, offset, out, n, (n + 1) // 2, n_blocks, width, stride,
        BS=bs, BS2=bs2, ROWS=rows, NESTED=bool(qs.nested), STRIDED=strided,
        MANUAL_BF16=interpreting() and out.dtype == torch.bfloat16, num_warps=DEQUANT_WARPS, **_launch_opts())
    return out


def _row_strided(out: torch.Tensor, qs) -> bool:
    """Whether `out` is an (N, K) view of the weight's 2-D shape with rows ld >= K apart, K a multiple of the
    quant blocksize (each quant block then lies within one row: the kernel's STRIDED layout)."""
    return (out.dim() == 2 and tuple(out.shape) == tuple(qs.shape) and out.stride(1) == 1
            and out.stride(0) >= out.shape[1] and out.shape[1] % qs.blocksize == 0)


@triton.jit
def _nf4_matmul_kernel(x_ptr, packed_ptr, absmax_ptr, code_ptr, code2_ptr, absmax2_ptr, offset_ptr, out_ptr,
                       M, N, K, stride_xm, stride_om,
                       BS: tl.constexpr, BS2: tl.constexpr, NESTED: tl.constexpr, HB: tl.constexpr, NB: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
                       EMULATE: tl.constexpr, MANUAL_W: tl.constexpr, MANUAL_OUT: tl.constexpr,
                       IEEE_FP32: tl.constexpr):
    """out[m, n] (+)= sum_k x[m, k] * W[n, k], W dequantized tile by tile, rounded to x's dtype (as bnb's
    matmul_4bit does), multiplied in x's dtype with fp32 accumulation. Computed transposed: acc is
    (BLOCK_N, BLOCK_M) = W_tile @ x_tile^T. Even and odd k (high and low nibbles) are two dots, so the
    weight tile is never interleaved. EMULATE (interpreter): dots in fp32 on values already rounded.
    A tile row of BLOCK_K // 2 bytes is NB segments of HB bytes, each inside one quant block."""
    pid_n, pid_k, pid_m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rn = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    seg = tl.arange(0, NB)
    j = tl.arange(0, BLOCK_K // 2)
    n_ok = rn < N
    x_dtype = x_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for k0 in range(pid_k * BLOCK_K, K, SPLIT_K * BLOCK_K):
        kbyte = k0 // 2 + seg[:, None] * HB + tl.arange(0, HB)[None, :]              # (NB, HB)
        q = tl.load(packed_ptr + rn[:, None, None] * (K // 2) + kbyte[None, :, :],
                    mask=n_ok[:, None, None] & (kbyte < K // 2)[None, :, :], other=0).to(tl.int32)
        kseg = k0 + seg * (2 * HB)                                                   # (NB,)
        scale = _absmax_rows(absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, (rn[:, None] * K + kseg[None, :]) // BS,
                             n_ok[:, None] & (kseg < K)[None, :], BS2, NESTED)      # (BLOCK_N, NB)
        w_hi = tl.reshape(tl.load(code_ptr + (q >> 4)) * scale[:, :, None], (BLOCK_N, BLOCK_K // 2))
        w_lo = tl.reshape(tl.load(code_ptr + (q & 15)) * scale[:, :, None], (BLOCK_N, BLOCK_K // 2))
        k_even = k0 + 2 * j
        x_mask = (rm < M)[None, :] & (k_even < K)[:, None]
        x_ptrs = x_ptr + rm[None, :] * stride_xm + k_even[:, None]                      # (BLOCK_K/2, BLOCK_M)
        x_even = tl.load(x_ptrs, mask=x_mask, other=0.0)
        x_odd = tl.load(x_ptrs + 1, mask=x_mask, other=0.0)
        if EMULATE:
            w_hi = _round_fp32(w_hi, x_dtype, MANUAL_W)
            w_lo = _round_fp32(w_lo, x_dtype, MANUAL_W)
            acc = tl.dot(w_hi, x_even.to(tl.float32), acc)
            acc = tl.dot(w_lo, x_odd.to(tl.float32), acc)
        elif IEEE_FP32:
            acc = tl.dot(w_hi, x_even, acc, input_precision="ieee")
            acc = tl.dot(w_lo, x_odd, acc, input_precision="ieee")
        else:
            acc = tl.dot(w_hi.to(x_dtype), x_even, acc)
            acc = tl.dot(w_lo.to(x_dtype), x_odd, acc)
    out_ptrs = out_ptr + rm[None, :] * stride_om + rn[:, None]
    out_mask = (rm < M)[None, :] & n_ok[:, None]
    if SPLIT_K > 1:
        tl.atomic_add(out_ptrs, acc, mask=out_mask)          # fp32 workspace, cast by the host
    else:
        tl.store(out_ptrs, _to_out(acc, out_ptr.dtype.element_ty, MANUAL_OUT), mask=out_mask)


def _default_split_k(device, tiles: int, k_steps: int) -> int:
    """Split K until there are about two programs per SM (rule of thumb; to be measured on the H200)."""
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(k_steps, triton.cdiv(2 * sms, tiles)))


def _fused_ok(x: torch.Tensor, qs) -> bool:
    if len(qs.shape) != 2 or x.shape[-1] != qs.shape[1] or x.dtype not in (torch.bfloat16, torch.float16,
                                                                           torch.float32):
        return False
    K = qs.shape[1]
    return K % 2 == 0 and K % min(qs.blocksize, MM_BLOCK_K) == 0


def _nf4_matmul_fwd(x2: torch.Tensor, packed: torch.Tensor, qs, split_k: Optional[int]) -> torch.Tensor:
    M, K = x2.shape
    N = qs.shape[0]
    absmax, code, code2, absmax2, offset, bs2 = _state_args(qs, x2.device)
    tiles_n, tiles_m = triton.cdiv(N, MM_BLOCK_N), triton.cdiv(M, MM_BLOCK_M)
    k_steps = triton.cdiv(K, MM_BLOCK_K)
    split = max(1, min(k_steps, split_k or _default_split_k(x2.device, tiles_n * tiles_m, k_steps)))
    hb = min(qs.blocksize, MM_BLOCK_K) // 2   # bytes of a tile row that share one scale (_fused_ok: K % 2hb == 0)
    out = (torch.zeros((M, N), dtype=torch.float32, device=x2.device) if split > 1
           else torch.empty((M, N), dtype=x2.dtype, device=x2.device))
    _nf4_matmul_kernel[(tiles_n, split, tiles_m)](
        x2, _flat_bytes(packed), absmax, code, code2, absmax2, offset, out, M, N, K, x2.stride(0), out.stride(0),
        BS=qs.blocksize, BS2=bs2, NESTED=bool(qs.nested), HB=hb, NB=MM_BLOCK_K // 2 // hb,
        BLOCK_M=MM_BLOCK_M, BLOCK_N=MM_BLOCK_N, BLOCK_K=MM_BLOCK_K, SPLIT_K=split, EMULATE=interpreting(),
        MANUAL_W=interpreting() and x2.dtype == torch.bfloat16,
        MANUAL_OUT=interpreting() and out.dtype == torch.bfloat16, IEEE_FP32=x2.dtype == torch.float32,
        num_warps=MM_WARPS, num_stages=MM_STAGES, **_launch_opts())
    return out if split == 1 else out.to(x2.dtype)


def matmul_reference(x: torch.Tensor, packed: torch.Tensor, quant_state) -> torch.Tensor:
    """x @ W.T with W dequantized (bit-exactly) to x's dtype; differentiable w.r.t. x."""
    return x @ reference_torch(packed, quant_state, x.dtype).T


def _nf4_matmul(x: torch.Tensor, packed: torch.Tensor, qs, split_k: Optional[int]) -> torch.Tensor:
    """The fused kernel where the layout allows (K even, K % min(blocksize, BLOCK_K) == 0), else
    dequant + matmul."""
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if _fused_ok(x2, qs) and x2.shape[0] > 0:
        y = _nf4_matmul_fwd(x2, packed, qs, split_k)
    else:
        y = x2 @ dequantize_nf4(packed, qs, dtype=x.dtype).T
    return y.reshape(*x.shape[:-1], qs.shape[0])


class NF4MatmulFunction(torch.autograd.Function):
    """y = x @ W.T for a frozen 4-bit W. Backward: dx = dy @ W, with W dequantized by the kernel into
    dy's dtype; saves nothing but W's handle."""

    @staticmethod
    def forward(ctx, x, packed, quant_state, split_k):
        ctx.packed, ctx.quant_state = packed, quant_state
        return _nf4_matmul(x, packed, quant_state, split_k)

    @staticmethod
    def backward(ctx, dy):
        w = dequantize_nf4(ctx.packed, ctx.quant_state, dtype=dy.dtype)
        return dy @ w, None, None, None


def nf4_matmul(x: torch.Tensor, packed: torch.Tensor, quant_state, *, split_k: Optional[int] = None) -> torch.Tensor:
    """y = x @ W.T for a bitsandbytes 4-bit weight W of shape (N, K), without materializing W.

    Args:
        x: (..., K) bf16/fp16/fp32; meant for few rows (decode, M = prod(x.shape[:-1]) <= 16).
        packed, quant_state: as for `dequantize_nf4`; quant_state.shape == (N, K).
        split_k: programs along K (fp32 atomics into a workspace when > 1, so the fp32 summation order,
            and rarely the last bit, varies run to run); default: about 2 programs per SM.
    Returns:
        (..., N) in x's dtype; equals `matmul_reference` up to fp32 summation order.
    """
    if not use_triton(x, packed):
        return matmul_reference(x, packed, quant_state)
    if torch.is_grad_enabled() and x.requires_grad:
        return NF4MatmulFunction.apply(x, packed, quant_state, split_k)
    return _nf4_matmul(x, packed, quant_state, split_k)   # decode: skip the autograd.Function overhead
