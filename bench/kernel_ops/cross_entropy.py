"""Fused linear + cross-entropy at Llama-3.1-8B shapes: 16384 tokens x hidden 4096 x vocab 128256, bf16.

Variants, each for a frozen and a trainable lm_head, forward+backward (and loss-only forward for fastlm
and eager): the full-logits eager reference, torch.compile of it, Liger-Kernel's
LigerFusedLinearCrossEntropyLoss (liger_kernel 0.8.5), Cut Cross-Entropy (cut_cross_entropy 25.1.1) and
fastlm. The op is matmul-bound, so the note gives TFLOP/s (2*N*V*H per GEMM: 2 GEMMs frozen, 3
trainable; the floor at 790 TFLOP/s is 43.5 ms / 65 ms) and peak MiB minus the gradients themselves
(grad_h 128 MiB, + grad_W 1002 MiB when trainable): the "extra memory" the issue caps at 512 MB.
"""
import torch

from bench.common import peak_mib, time_ms
from fastlm.kernels.cross_entropy import fused_linear_cross_entropy, reference

N, H, V = 16384, 4096, 128256
DTYPE = torch.bfloat16


def _candidates():
    out = {"eager full logits": reference}
    out["torch.compile full logits"] = torch.compile(reference)
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
        liger = LigerFusedLinearCrossEntropyLoss()
        out["liger"] = lambda h, w, y: liger(w, h, y)
    except Exception as exc:  # not installed: report and go on
        print(f"liger_kernel unavailable: {exc!r}")
    try:
        from cut_cross_entropy import linear_cross_entropy
        out["cut cross-entropy"] = lambda h, w, y: linear_cross_entropy(h, w, y)
    except Exception as exc:
        print(f"cut_cross_entropy unavailable: {exc!r}")
    out["fastlm"] = fused_linear_cross_entropy
    return out


def run(record):
    torch.manual_seed(0)
    h = torch.randn(N, H, device="cuda", dtype=DTYPE)
    w = (torch.randn(V, H, device="cuda") / H**0.5).to(DTYPE)  # logits ~ N(0, 1)
    y = torch.randint(0, V, (N,), device="cuda")
    y[torch.rand(N, device="cuda") < 0.1] = -100  # some padding / prompt tokens
    ref_loss = reference(h, w, y).item()
    for trainable in (False, True):
        h.requires_grad_(True)
        w.requires_grad_(trainable)
        gemms = 3 if trainable else 2
        grads_mib = (N * H + (V * H if trainable else 0)) * 2 / 2**20
        tag = "trainable lm_head" if trainable else "frozen lm_head"
        for name, fn in _candidates().items():
            def step(fn=fn):
                h.grad = w.grad = None
                fn(h, w, y).backward()
                h.grad = w.grad = None
            try:
                with torch.no_grad():
                    loss = fn(h, w, y).item()
                step()  # compile / autotune outside the timing
                ms = time_ms(step, warmup_ms=200, rep_ms=1000)
                mib = peak_mib(step)
            except Exception as exc:  # e.g. OOM or an API change: keep measuring the others
                record("linear_cross_entropy", f"{tag} fwd+bwd {name}", float("nan"), note=repr(exc)[:200])
                torch.cuda.empty_cache()
                continue
            tflops = gemms * 2 * N * V * H / (ms * 1e-3) / 1e12
            record("linear_cross_entropy", f"{tag} fwd+bwd {name}", ms, peak_mib=mib,
                   note=f"{tflops:.0f} TFLOP/s; extra {mib - grads_mib:.0f} MiB beyond grads; "
                        f"loss {loss:.5f} (ref {ref_loss:.5f})")
            torch.cuda.empty_cache()
    h.requires_grad_(False)
    w.requires_grad_(False)
    for name, fn in (("eager full logits", reference), ("fastlm", fused_linear_cross_entropy)):
        def fwd(fn=fn):
            with torch.no_grad():
                fn(h, w, y)
        ms = time_ms(fwd, warmup_ms=200, rep_ms=1000)
        tflops = 2 * N * V * H / (ms * 1e-3) / 1e12
        record("linear_cross_entropy", f"fwd loss only {name}", ms, peak_mib=peak_mib(fwd),
               note=f"{tflops:.0f} TFLOP/s")
        torch.cuda.empty_cache()
