"""Causal attention forward + backward under each SDPA backend, at the benchmark models' attention shapes (H200).

    python3 bench/attention_backends.py --out $OUT

For each shape (Llama-3.2-1B: batch 4, 32 heads, 8 KV heads, head_dim 64; Llama-3.1-8B: batch 2, 32 / 8 heads,
head_dim 128; both seq 2048, bf16) and each way of calling torch's scaled_dot_product_attention:
  default          what transformers' sdpa path calls with no mask: is_causal=True, enable_gqa=True, no backend pin
  <backend>_gqa    the same pinned to one backend (flash, cudnn, efficient), GQA by enable_gqa
  <backend>_rep    K and V repeated to the query heads first (transformers' repeat_kv) and then pinned
  prefer_cudnn     enable_gqa with cuDNN first in the priority list, the rest after (what fastlm would do)
it reports forward and forward+backward milliseconds (CUDA-event median), TFLOP/s (causal FLOPs: forward
4*B*H*T*T*D/2, backward 2.5x that), the kernels that ran (profiler names), and the error of the output and of
dq / dk / dv against an fp32 math-backend reference, next to the default's error at the same inputs.
Writes attention_backends.json.
"""
import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import time_ms  # noqa: E402

SHAPES = {"1b": dict(batch=4, heads=32, kv_heads=8, seq=2048, head_dim=64),
          "8b": dict(batch=2, heads=32, kv_heads=8, seq=2048, head_dim=128)}
BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION}
PREFER_CUDNN = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                SDPBackend.MATH]


def _repeat(t: torch.Tensor, times: int) -> torch.Tensor:
    """(B, KV, T, D) -> (B, KV * times, T, D), each KV head repeated `times` times in place (repeat_kv)."""
    return t.repeat_interleave(times, dim=1)


def _call(variant: str, q, k, v, groups: int):
    if variant == "default":
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    if variant == "prefer_cudnn":
        with sdpa_kernel(PREFER_CUDNN, set_priority=True):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    backend, how = variant.rsplit("_", 1)
    with sdpa_kernel([BACKENDS[backend]]):
        if how == "rep":
            return F.scaled_dot_product_attention(q, _repeat(k, groups), _repeat(v, groups), is_causal=True)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def _kernels(fn) -> list:
    """Names of the CUDA kernels `fn()` launches that look like attention (flash / cudnn / fmha / sdpa)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    names = {e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA}
    keys = ("flash", "cudnn", "fmha", "sdpa", "attention", "attn")
    return sorted(n[:90] for n in names if any(key in n.lower() for key in keys))


def _max_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| / max |want|."""
    return ((got.float() - want).abs().max() / want.abs().max()).item()


def measure(shape_name: str, shape: dict, variants: list) -> list:
    torch.manual_seed(0)
    b, h, kv, t, d = (shape[key] for key in ("batch", "heads", "kv_heads", "seq", "head_dim"))
    groups = h // kv
    q = torch.randn(b, h, t, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(b, kv, t, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(b, kv, t, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad_out = torch.randn(b, h, t, d, device="cuda", dtype=torch.bfloat16)

    q32, k32, v32 = (x.detach().float().requires_grad_() for x in (q, k, v))
    with sdpa_kernel([SDPBackend.MATH]):
        out32 = F.scaled_dot_product_attention(q32, _repeat(k32, groups), _repeat(v32, groups), is_causal=True)
    out32.backward(grad_out.float())
    want = dict(out=out32.detach(), dq=q32.grad, dk=k32.grad, dv=v32.grad)
    del out32, q32, k32, v32
    torch.cuda.empty_cache()

    fwd_flops = 4 * b * h * t * t * d / 2
    rows = []
    for variant in variants:
        row = dict(shape=shape_name, variant=variant)
        try:
            def forward():
                return _call(variant, q, k, v, groups)

            def forward_backward():
                q.grad = k.grad = v.grad = None
                forward().backward(grad_out)

            out = forward()
            forward_backward()
            row.update({name: round(_max_error(got, want[name]), 6)
                        for name, got in dict(out=out, dq=q.grad, dk=k.grad, dv=v.grad).items()})
            with torch.no_grad():
                fwd_ms = time_ms(forward)
            both_ms = time_ms(forward_backward)
            row.update(fwd_ms=round(fwd_ms, 3), fwd_bwd_ms=round(both_ms, 3),
                       fwd_tflops=round(fwd_flops / fwd_ms / 1e9, 1),
                       fwd_bwd_tflops=round(3.5 * fwd_flops / both_ms / 1e9, 1),
                       kernels=_kernels(forward_backward))
        except Exception as exc:  # a backend that refuses these inputs: recorded, the others still measured
            row["error"] = repr(exc)[:300]
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=".")
    parser.add_argument("--shapes", default="1b,8b")
    args = parser.parse_args()
    variants = ["default", "prefer_cudnn", "flash_gqa", "cudnn_gqa", "cudnn_rep", "efficient_rep"]
    rows = []
    for name in args.shapes.split(","):
        rows += measure(name, SHAPES[name], variants)
    meta = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__,
                cudnn=torch.backends.cudnn.version(), capability=torch.cuda.get_device_capability())
    print(json.dumps(meta))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "attention_backends.json"), "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
