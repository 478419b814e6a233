"""RoPE at Llama-3.1-8B shapes on the H200: q 32 heads + k 8 heads, B=2, T=8192, head_dim 128, bf16.

Bytes that must move (issue 3): q and k read and written, i.e. 2x (q + k) forward and 4x forward+backward
(cos/sin, 0.5 KB per token against 20 KB of q/k, are not counted). Inputs are HF's layout: q (B, H, T, D)
as a transpose of a (B, T, H, D) tensor. Variants: fastlm, eager reference, torch.compile(reference),
Liger-Kernel (rotates in place; it gets its own copies), and fastlm in place without grad (inference).
fwd+bwd uses torch.autograd.grad, so no .grad accumulation is timed. Each pass also gets a "[GPU]" row: the
same work replayed from a CUDA graph (kernel time only; see bench.kernel_ops.gpu_ms).
"""
import torch

from bench.common import peak_mib, time_ms
from bench.kernel_ops import gpu_ms
from fastlm.kernels import rope

B, T, H, HKV, D = 2, 8192, 32, 8, 128
THETA = 500000.0  # Llama-3.1's rope_theta (its llama3 scaling changes inv_freq, not the kernel's work)


def _cos_sin(dtype):
    pos = torch.arange(T, device="cuda", dtype=torch.float32)[None].expand(B, T)
    inv_freq = 1.0 / THETA ** (torch.arange(0, D, 2, device="cuda", dtype=torch.float32) / D)
    emb = torch.cat([pos[..., None] * inv_freq] * 2, dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _liger():
    try:
        from liger_kernel.transformers.functional import liger_rope
    except Exception:  # not installed: skip that column
        return None
    return lambda q, k, cos, sin: liger_rope(q, k, cos, sin)[:2]  # some versions also return cos, sin


def run(record):
    dtype = torch.bfloat16
    torch.manual_seed(0)
    q_base = torch.randn(B, T, H, D, device="cuda", dtype=dtype)
    k_base = torch.randn(B, T, HKV, D, device="cuda", dtype=dtype)
    dq = torch.randn(B, T, H, D, device="cuda", dtype=dtype).transpose(1, 2)
    dk = torch.randn(B, T, HKV, D, device="cuda", dtype=dtype).transpose(1, 2)
    cos, sin = _cos_sin(dtype)
    qk_bytes = (q_base.numel() + k_base.numel()) * q_base.element_size()
    shape = f"q {H} + k {HKV} heads, {B}x{T}x{D}"

    variants = {"fastlm": rope.apply_rope, "eager": rope.reference, "torch.compile": torch.compile(rope.reference)}
    liger = _liger()
    if liger is None:
        record("rope", "liger", float("nan"), note="liger_kernel not importable")
    else:
        variants["liger"] = liger

    for name, fn in variants.items():
        qb, kb = q_base.clone(), k_base.clone()  # own copies: Liger rotates its inputs in place
        q, k = qb.transpose(1, 2), kb.transpose(1, 2)

        def fwd():
            return fn(q, k, cos, sin)

        fwd()  # compile / autotune outside the timing
        record("rope", f"{name} fwd", time_ms(fwd), bytes_moved=2 * qk_bytes, peak_mib=peak_mib(fwd), note=shape)
        record("rope", f"{name} fwd [GPU]", gpu_ms(fwd), bytes_moved=2 * qk_bytes, note="CUDA-graph replay")

        ql, kl = qb.requires_grad_(), kb.requires_grad_()

        def fwd_bwd():
            q_out, k_out = fn(ql.transpose(1, 2), kl.transpose(1, 2), cos, sin)
            return torch.autograd.grad((q_out, k_out), (ql, kl), (dq, dk))

        fwd_bwd()
        record("rope", f"{name} fwd+bwd", time_ms(fwd_bwd), bytes_moved=4 * qk_bytes, peak_mib=peak_mib(fwd_bwd),
               note=shape)
        record("rope", f"{name} fwd+bwd [GPU]", gpu_ms(fwd_bwd), bytes_moved=4 * qk_bytes, note="CUDA-graph replay")
        del qb, kb, q, k, ql, kl
        torch.cuda.empty_cache()

    qb, kb = q_base.clone(), k_base.clone()
    q, k = qb.transpose(1, 2), kb.transpose(1, 2)

    def fwd_inplace():
        with torch.no_grad():
            return rope.apply_rope(q, k, cos, sin, inplace=True)

    fwd_inplace()
    record("rope", "fastlm fwd in place (no grad)", time_ms(fwd_inplace), bytes_moved=2 * qk_bytes,
           peak_mib=peak_mib(fwd_inplace), note=shape)
