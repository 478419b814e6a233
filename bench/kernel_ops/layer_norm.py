"""LayerNorm (with bias) at Llama-3.1-8B width on the H200: 16384 tokens x hidden 4096, bf16.

Variants: eager F.layer_norm, torch.compile of it, Liger-Kernel 0.8.5 (liger_layer_norm) if
importable, fastlm. Bytes that must move, counted as for RMSNorm in issue 3: forward x read + y written
= 2 tensors; forward+backward x, y, x again, dy, dx = 5 tensors (weight, bias, statistics and partials
not counted). Forward runs under no_grad; forward+backward uses torch.autograd.grad (no .grad
accumulation kernel). Each pass also gets a "[GPU]" row: the same work replayed from a CUDA graph
(kernel time only; see bench.kernel_ops.gpu_ms). Tuning constants: swept by bench/tune_norms.py.
"""
import torch

from bench.common import peak_mib, time_ms
from bench.kernel_ops import gpu_ms
from fastlm.kernels import layer_norm as ln

T, H = 16384, 4096
EPS = 1e-5
DTYPE = torch.bfloat16
DEVICE = "cuda"


def _candidates():
    out = {"eager": lambda x, w, b: ln.reference(x, w, b, EPS),
           "torch.compile": torch.compile(lambda x, w, b: ln.reference(x, w, b, EPS))}
    try:
        from liger_kernel.transformers.functional import liger_layer_norm
        out["liger"] = lambda x, w, b: liger_layer_norm(x, w, b, EPS)
    except Exception as exc:  # not installed: report and go on
        print(f"liger_kernel unavailable: {exc!r}")
    out["fastlm"] = lambda x, w, b: ln.layer_norm(x, w, b, EPS)
    return out


def _measure(record, op, name, fn, x, w, b, dy, fwd_only=False):
    tensor_bytes = x.numel() * x.element_size()

    def fwd():
        with torch.no_grad():
            fn(x, w, b)

    def fwd_bwd():
        torch.autograd.grad(fn(x, w, b), (x, w, b), dy)

    try:
        expected = ln.reference(x.detach().float(), w.detach().float(), b.detach().float(), EPS)
        err = (fn(x, w, b).detach().float() - expected).abs().max().item()
        fwd()
        ms = time_ms(fwd)
        record(op, f"fwd {name}", ms, bytes_moved=2 * tensor_bytes, peak_mib=peak_mib(fwd),
               note=f"max|y - fp32 ref| {err:.3g}")
        record(op, f"fwd {name} [GPU]", gpu_ms(fwd), bytes_moved=2 * tensor_bytes, note="CUDA-graph replay")
        if not fwd_only:
            fwd_bwd()
            ms = time_ms(fwd_bwd)
            record(op, f"fwd+bwd {name}", ms, bytes_moved=5 * tensor_bytes, peak_mib=peak_mib(fwd_bwd))
            record(op, f"fwd+bwd {name} [GPU]", gpu_ms(fwd_bwd), bytes_moved=5 * tensor_bytes,
                   note="CUDA-graph replay")
    except Exception as exc:  # an API change or OOM in one variant: keep measuring the others
        record(op, name, float("nan"), note=repr(exc)[:200])
    if DEVICE == "cuda":
        torch.cuda.empty_cache()


def run(record):
    torch.manual_seed(0)
    x = torch.randn(T, H, device=DEVICE, dtype=DTYPE, requires_grad=True)
    w = (1 + 0.1 * torch.randn(H, device=DEVICE)).to(DTYPE).requires_grad_()
    b = (0.1 * torch.randn(H, device=DEVICE)).to(DTYPE).requires_grad_()
    dy = torch.randn(T, H, device=DEVICE, dtype=DTYPE)
    op = f"layer_norm {T}x{H}"
    for name, fn in _candidates().items():
        _measure(record, op, name, fn, x, w, b, dy)
