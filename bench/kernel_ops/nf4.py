"""NF4 dequantization and the fused 4-bit matmul at a Llama-3.1-8B MLP weight (14336 x 4096), on the H200.

Dequant (bf16 out; plain and double-quantized absmax), bytes that must move = packed (n/2) + absmax
(plain: 4 B per 64 weights; nested: 1 B per 64 + 4 B per 64*256) + output (2n):
fastlm into a reused buffer, bitsandbytes.functional.dequantize_4bit (allocating, and with out=),
the plain-PyTorch reference eager and torch.compiled. The note says whether fastlm equals bnb bit for bit.

Decode matmul y = x @ W.T, x (M, 4096) for M in 1, 4, 16, nested absmax, bytes = packed + absmax + x + y:
fastlm nf4_matmul (default split-K and split_k=1), fastlm dequant + cuBLAS, bnb.matmul_4bit (its fused
gemm_4bit kernel when no grad is needed), and a dense bf16 x @ W.T for scale (bytes: its bf16 weight).
bitsandbytes is optional: without it a random QuantState-like object is built (same attributes) and only
fastlm and the references are timed. The dequantizations also get "[GPU]" rows: one call per CUDA-graph
replay, L2 flushed before each (kernel time only; see bench.kernel_ops.gpu_ms: on the H200 the host work
of one call takes longer than the 0.04 ms kernel).
"""
import types

import torch

from bench.common import time_ms
from bench.kernel_ops import gpu_ms
from fastlm.kernels import nf4

N, K, BLOCK = 14336, 4096, 64
DTYPE = torch.bfloat16


def _bnb():
    try:
        import bitsandbytes
        import bitsandbytes.functional as bnbf
        return bitsandbytes, bnbf
    except Exception as exc:  # not carried to this machine: time fastlm alone
        print(f"bitsandbytes unavailable: {exc!r}")
        return None, None


def _weight(nested: bool, bnbf):
    """(packed, quant_state, dense bf16 weight or None)."""
    if bnbf is not None:
        w = torch.randn(N, K, device="cuda", dtype=DTYPE)
        packed, qs = bnbf.quantize_4bit(w, blocksize=BLOCK, compress_statistics=nested, quant_type="nf4")
        return packed, qs, w
    n_blocks = N * K // BLOCK
    packed = torch.randint(0, 256, (N * K // 2, 1), device="cuda", dtype=torch.uint8)
    qs = types.SimpleNamespace(shape=torch.Size((N, K)), dtype=DTYPE, blocksize=BLOCK, quant_type="nf4",
                               nested=nested, offset=None, state2=None)
    if nested:
        qs.absmax = torch.randint(0, 256, (n_blocks,), device="cuda", dtype=torch.uint8)
        qs.offset = torch.tensor(0.03, device="cuda")
        qs.state2 = types.SimpleNamespace(absmax=torch.rand(n_blocks // 256, device="cuda") * 0.01 + 0.01,
                                          code=torch.linspace(-1, 1, 256, device="cuda"), blocksize=256)
    else:
        qs.absmax = torch.rand(n_blocks, device="cuda") * 0.05 + 0.01
    return packed, qs, None


def _absmax_bytes(qs) -> int:
    if qs.nested:
        return qs.absmax.numel() + qs.state2.absmax.numel() * 4
    return qs.absmax.numel() * 4


def _dequant(record, nested, bnbf):
    packed, qs, _ = _weight(nested, bnbf)
    op = f"nf4 dequant {N}x{K} {'nested' if nested else 'plain'} absmax"
    n = N * K
    bytes_moved = n // 2 + _absmax_bytes(qs) + 2 * n
    buf = torch.empty(N, K, device="cuda", dtype=DTYPE)
    note = ""
    if bnbf is not None:
        exact = torch.equal(nf4.dequantize_nf4(packed, qs, out=buf), bnbf.dequantize_4bit(packed, qs))
        note = f"bit-exact vs bnb: {exact}"
    variants = {"fastlm (out=buffer)": lambda: nf4.dequantize_nf4(packed, qs, out=buf)}
    if bnbf is not None:
        variants["bitsandbytes"] = lambda: bnbf.dequantize_4bit(packed, qs)
        buf2 = torch.empty(N, K, device="cuda", dtype=DTYPE)
        variants["bitsandbytes (out=buffer)"] = lambda: bnbf.dequantize_4bit(packed, qs, out=buf2)
    variants["eager reference_torch"] = lambda: nf4.reference_torch(packed, qs)
    compiled = torch.compile(nf4.reference_torch)
    variants["torch.compile(reference_torch)"] = lambda: compiled(packed, qs)
    for name, fn in variants.items():
        try:
            fn()  # compile outside the timing
            record(op, name, time_ms(fn), bytes_moved=bytes_moved, note=note if name.startswith("fastlm") else "")
            if not name.startswith("eager"):
                record(op, f"{name} [GPU]", gpu_ms(fn, n=1), bytes_moved=bytes_moved, note="CUDA-graph replay")
        except Exception as exc:  # keep measuring the others
            record(op, name, float("nan"), note=repr(exc)[:200])
    del packed, qs, buf
    torch.cuda.empty_cache()


def _matmul(record, bnb, bnbf):
    packed, qs, w = _weight(True, bnbf)
    buf = torch.empty(N, K, device="cuda", dtype=DTYPE)
    for M in (1, 4, 16):
        op = f"nf4 matmul M={M} K={K} N={N} nested"
        x = torch.randn(M, K, device="cuda", dtype=DTYPE)
        bytes_moved = N * K // 2 + _absmax_bytes(qs) + 2 * M * (K + N)
        ref = nf4.matmul_reference(x, packed, qs).float()
        variants = {
            "fastlm nf4_matmul": lambda: nf4.nf4_matmul(x, packed, qs),
            "fastlm nf4_matmul split_k=1": lambda: nf4.nf4_matmul(x, packed, qs, split_k=1),
            "fastlm dequant + cuBLAS": lambda: x @ nf4.dequantize_nf4(packed, qs, out=buf).T,
        }
        if bnb is not None:
            variants["bnb.matmul_4bit"] = lambda: bnb.matmul_4bit(x, packed.t(), quant_state=qs)
            variants["bnb dequant + cuBLAS"] = lambda: x @ bnbf.dequantize_4bit(packed, qs).T
            variants["dense bf16 x @ W.T (no quantization)"] = lambda: x @ w.T
        for name, fn in variants.items():
            try:
                y = fn()
                err = ((y.float() - ref).abs().max() / ref.abs().max()).item()
                dense = "dense" in name
                note = "bytes: the bf16 weight" if dense else f"max err / max |y| vs reference {err:.2e}"
                record(op, name, time_ms(fn), bytes_moved=2 * N * K + 2 * M * (K + N) if dense else bytes_moved,
                       note=note)
            except Exception as exc:
                record(op, name, float("nan"), note=repr(exc)[:200])


def run(record):
    torch.manual_seed(0)
    bnb, bnbf = _bnb()
    for nested in (False, True):
        _dequant(record, nested, bnbf)
    _matmul(record, bnb, bnbf)
