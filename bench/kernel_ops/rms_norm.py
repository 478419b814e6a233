"""RMSNorm at Llama-3.1-8B shapes on the H200: 16384 tokens x hidden 4096, bf16, Llama and Gemma style;
plus Qwen3-style q-norm (16384 tokens x 32 heads x head_dim 128).

Variants: eager reference, torch.compile(reference), Liger-Kernel 0.8.5 (liger_rms_norm, in_place=False
so dy keeps its values across repetitions) if importable, fastlm. Bytes that must move, as issue 3
counts them: forward x read + y written = 2 tensors; forward+backward x, y, x again, dy, dx = 5 tensors
(weights, rstd and dw partials not counted). Forward runs under no_grad; forward+backward uses
torch.autograd.grad (no .grad accumulation kernel).

Each variant gets two rows per pass: do_bench around the call (host work included), and "[GPU]", the
same work replayed from a CUDA graph (kernel time only; see bench.kernel_ops.gpu_ms for why both).
The tuning constants were swept by bench/tune_norms.py (2026-11-28); their choice is in the kernel file.
"""
import torch

from bench.common import peak_mib, time_ms
from bench.kernel_ops import gpu_ms
from fastlm.kernels import rms_norm as rn

T, H, HEADS, HEAD_DIM = 16384, 4096, 32, 128
EPS = 1e-6
DTYPE = torch.bfloat16
DEVICE = "cuda"


def _liger(gemma: bool):
    try:
        from liger_kernel.transformers.functional import liger_rms_norm
    except Exception as exc:  # not installed: report and go on
        print(f"liger_kernel unavailable: {exc!r}")
        return None
    offset, mode = (1.0, "gemma") if gemma else (0.0, "llama")
    return lambda x, w: liger_rms_norm(x, w, EPS, offset=offset, casting_mode=mode, in_place=False)


def _candidates(gemma: bool):
    out = {"eager": lambda x, w: rn.reference(x, w, EPS, gemma),
           "torch.compile": torch.compile(lambda x, w: rn.reference(x, w, EPS, gemma))}
    liger = _liger(gemma)
    if liger is not None:
        out["liger"] = liger
    out["fastlm"] = lambda x, w: rn.rms_norm(x, w, EPS, gemma)
    return out


def _inputs(shape, gemma: bool):
    x = torch.randn(shape, device=DEVICE, dtype=DTYPE, requires_grad=True)
    w = (0.1 * torch.randn(shape[-1], device=DEVICE) + (0.0 if gemma else 1.0)).to(DTYPE).requires_grad_()
    dy = torch.randn(shape, device=DEVICE, dtype=DTYPE)
    return x, w, dy


def _measure(record, op, name, fn, x, w, dy, gemma=False, fwd_only=False, note=""):
    tensor_bytes = x.numel() * x.element_size()

    def fwd():
        with torch.no_grad():
            fn(x, w)

    def fwd_bwd():
        torch.autograd.grad(fn(x, w), (x, w), dy)

    try:
        expected = rn.reference(x.detach().float(), w.detach().float(), EPS, gemma)
        err = (fn(x, w).detach().float() - expected).abs().max().item()
        fwd()
        ms = time_ms(fwd)
        record(op, f"fwd {name}", ms, bytes_moved=2 * tensor_bytes, peak_mib=peak_mib(fwd),
               note=f"{note} max|y - fp32 ref| {err:.3g}".strip())
        record(op, f"fwd {name} [GPU]", gpu_ms(fwd), bytes_moved=2 * tensor_bytes, note="CUDA-graph replay")
        if fwd_only:
            return
        fwd_bwd()
        ms = time_ms(fwd_bwd)
        record(op, f"fwd+bwd {name}", ms, bytes_moved=5 * tensor_bytes, peak_mib=peak_mib(fwd_bwd), note=note)
        record(op, f"fwd+bwd {name} [GPU]", gpu_ms(fwd_bwd), bytes_moved=5 * tensor_bytes, note="CUDA-graph replay")
    except Exception as exc:  # an API change or OOM in one variant: keep measuring the others
        record(op, f"{name}", float("nan"), note=repr(exc)[:200])
    if DEVICE == "cuda":
        torch.cuda.empty_cache()


def run(record):
    torch.manual_seed(0)
    for gemma in (False, True):
        op = f"rms_norm {'gemma' if gemma else 'llama'} {T}x{H}"
        x, w, dy = _inputs((T, H), gemma)
        for name, fn in _candidates(gemma).items():
            _measure(record, op, name, fn, x, w, dy, gemma)
        del x, w, dy
    x, w, dy = _inputs((T, HEADS, HEAD_DIM), False)  # Qwen3 q-norm: 524288 rows of 128
    for name, fn in _candidates(False).items():
        _measure(record, f"rms_norm q-norm {T}x{HEADS}x{HEAD_DIM}", name, fn, x, w, dy)
    del x, w, dy
