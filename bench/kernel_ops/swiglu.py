"""SwiGLU silu(gate) * up at Llama-3.1-8B's MLP: 16384 tokens x 14336 intermediate, bf16, on the H200.

Bytes that must move (issue 3): 3 tensors forward (gate, up read; y written) and 8 forward+backward
(+ dy, gate, up read; dgate, dup written). Variants: fastlm, eager reference, torch.compile(reference),
Liger-Kernel (it writes its gradients into its inputs, so it gets its own copies), and fastlm with the
in-place backward (gate/up non-leaf, as out of gate_proj/up_proj; same bytes, less peak memory; their
values drift over the timed iterations as they are overwritten by gradients, which does not change
the work). fwd+bwd uses torch.autograd.grad, so no .grad accumulation is timed.
"""
import torch

from bench.common import peak_mib, time_ms
from fastlm.kernels import swiglu

M, N = 16384, 14336


def _liger():
    try:
        from liger_kernel.transformers.functional import liger_swiglu
    except Exception:  # not installed: skip that column
        return None
    return liger_swiglu


def run(record):
    dtype = torch.bfloat16
    torch.manual_seed(0)
    gate = torch.randn(M, N, device="cuda", dtype=dtype)
    up = torch.randn(M, N, device="cuda", dtype=dtype)
    dy = torch.randn(M, N, device="cuda", dtype=dtype)
    tensor_bytes = gate.numel() * gate.element_size()
    shape = f"{M}x{N}"

    variants = {"fastlm": swiglu.swiglu, "eager": swiglu.reference, "torch.compile": torch.compile(swiglu.reference)}
    liger = _liger()
    if liger is None:
        record("swiglu", "liger", float("nan"), note="liger_kernel not importable")
    else:
        variants["liger"] = liger

    for name, fn in variants.items():
        g, u = gate.clone(), up.clone()

        def fwd():
            return fn(g, u)

        fwd()  # compile outside the timing
        record("swiglu", f"{name} fwd", time_ms(fwd), bytes_moved=3 * tensor_bytes, peak_mib=peak_mib(fwd),
               note=shape)
        g.requires_grad_(), u.requires_grad_()

        def fwd_bwd():
            return torch.autograd.grad(fn(g, u), (g, u), dy)

        fwd_bwd()
        record("swiglu", f"{name} fwd+bwd", time_ms(fwd_bwd), bytes_moved=8 * tensor_bytes,
               peak_mib=peak_mib(fwd_bwd), note=shape)
        del g, u
        torch.cuda.empty_cache()

    g_leaf, u_leaf = gate.clone().requires_grad_(), up.clone().requires_grad_()
    g, u = g_leaf.clone(), u_leaf.clone()  # non-leaf: the backward writes into their storage

    def fwd_bwd_inplace():
        return torch.autograd.grad(swiglu.swiglu(g, u), (g, u), dy)

    fwd_bwd_inplace()
    record("swiglu", "fastlm fwd+bwd in-place bwd", time_ms(fwd_bwd_inplace), bytes_moved=8 * tensor_bytes,
           peak_mib=peak_mib(fwd_bwd_inplace), note=shape)
