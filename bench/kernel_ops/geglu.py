"""GeGLU gelu(gate) * up (exact erf and tanh) at 16384 tokens x 14336 intermediate, bf16, on the H200.

Bytes that must move (as SwiGLU, issue 3): 3 tensors forward, 8 forward+backward. Variants per
approximation: fastlm, eager reference, torch.compile(reference), Liger-Kernel (tanh only: its GeGLU is
the tanh approximation; it writes its gradients into its inputs, so it gets its own copies), and fastlm
with the in-place backward (non-leaf gate/up; same bytes, less peak memory; values drift over the timed
iterations, which does not change the work). fwd+bwd uses torch.autograd.grad (no .grad accumulation).
fastlm, eager and torch.compile also get "[GPU]" rows: the same work replayed from a CUDA graph (kernel
time only; see bench.kernel_ops.gpu_ms).
"""
import functools

import torch

from bench.common import peak_mib, time_ms
from bench.kernel_ops import gpu_ms
from fastlm.kernels import geglu

M, N = 16384, 14336


def _liger():
    try:
        from liger_kernel.transformers.functional import liger_geglu
    except Exception:  # not installed: skip that column
        return None
    return liger_geglu


def run(record):
    dtype = torch.bfloat16
    torch.manual_seed(0)
    gate = torch.randn(M, N, device="cuda", dtype=dtype)
    up = torch.randn(M, N, device="cuda", dtype=dtype)
    dy = torch.randn(M, N, device="cuda", dtype=dtype)
    tensor_bytes = gate.numel() * gate.element_size()
    shape = f"{M}x{N}"
    liger = _liger()

    for approximate in ("none", "tanh"):
        op = f"geglu {approximate}"
        ref = functools.partial(geglu.reference, approximate=approximate)
        variants = {"fastlm": functools.partial(geglu.geglu, approximate=approximate), "eager": ref,
                    "torch.compile": torch.compile(ref)}
        if approximate == "tanh":
            if liger is None:
                record(op, "liger", float("nan"), note="liger_kernel not importable")
            else:
                variants["liger"] = liger

        for name, fn in variants.items():
            g, u = gate.clone(), up.clone()

            def fwd():
                return fn(g, u)

            fwd()  # compile outside the timing
            record(op, f"{name} fwd", time_ms(fwd), bytes_moved=3 * tensor_bytes, peak_mib=peak_mib(fwd), note=shape)
            if name != "liger":  # (Liger writes its gradients into its inputs: replays would compound)
                record(op, f"{name} fwd [GPU]", gpu_ms(fwd, n=3), bytes_moved=3 * tensor_bytes,
                       note="CUDA-graph replay")
            g.requires_grad_(), u.requires_grad_()

            def fwd_bwd():
                return torch.autograd.grad(fn(g, u), (g, u), dy)

            fwd_bwd()
            record(op, f"{name} fwd+bwd", time_ms(fwd_bwd), bytes_moved=8 * tensor_bytes,
                   peak_mib=peak_mib(fwd_bwd), note=shape)
            if name != "liger":
                record(op, f"{name} fwd+bwd [GPU]", gpu_ms(fwd_bwd, n=3), bytes_moved=8 * tensor_bytes,
                       note="CUDA-graph replay")
            del g, u
            torch.cuda.empty_cache()

        g_leaf, u_leaf = gate.clone().requires_grad_(), up.clone().requires_grad_()
        g, u = g_leaf.clone(), u_leaf.clone()  # non-leaf: the backward writes into their storage

        def fwd_bwd_inplace():
            return torch.autograd.grad(geglu.geglu(g, u, approximate), (g, u), dy)

        fwd_bwd_inplace()
        record(op, "fastlm fwd+bwd in-place bwd", time_ms(fwd_bwd_inplace), bytes_moved=8 * tensor_bytes,
               peak_mib=peak_mib(fwd_bwd_inplace), note=shape)
        del g_leaf, u_leaf, g, u
        torch.cuda.empty_cache()
