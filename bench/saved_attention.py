"""What the saved attention output (fastlm/models/saved_attention.py) spares per layer, on the H200.

    python3 bench/saved_attention.py --out $OUT

For Llama-3.2-1B (batch 4) and Llama-3.1-8B (batch 2) attention at 2048 tokens, bf16, causal, grouped-query heads:
the time of SDPA's forward (what the recomputation no longer runs), of the cuDNN entry point fastlm calls (with
log-sum-exp), and of the backward; whether the outputs and gradients equal SDPA's own, and the output's layout.
"""
import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fastlm.models import saved_attention  # noqa: E402

SHAPES = {"1b": (4, 32, 8, 2048, 64), "8b": (2, 32, 8, 2048, 128)}  # batch, heads, kv heads, tokens, head dim


def _time_us(fn, repeats: int = 20) -> float:
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return 1000 * start.elapsed_time(end) / repeats


def measure(name: str) -> dict:
    batch, heads, kv_heads, tokens, dim = SHAPES[name]
    g = torch.Generator(device="cuda").manual_seed(0)
    # q, k, v laid out (B, T, n, hd) and transposed, as the attention module makes them
    q, k, v = (torch.randn(batch, tokens, n, dim, device="cuda", generator=g, dtype=torch.bfloat16).transpose(1, 2)
               for n in (heads, kv_heads, kv_heads))
    grad = torch.randn(batch, tokens, heads, dim, device="cuda", generator=g, dtype=torch.bfloat16).transpose(1, 2)
    scale = dim ** -0.5
    backend = saved_attention._backend(q, k, v)
    row = dict(shape=name, batch=batch, heads=heads, kv_heads=kv_heads, tokens=tokens, head_dim=dim, backend=backend)
    with torch.no_grad():
        row["sdpa_forward_us"] = round(_time_us(lambda: F.scaled_dot_product_attention(
            q, k, v, is_causal=True, scale=scale, enable_gqa=True)), 1)
        if backend is None:
            return row
        row["lse_forward_us"] = round(_time_us(lambda: saved_attention._attention_with_lse(backend, q, k, v, scale)), 1)
        out, lse, extra = saved_attention._attention_with_lse(backend, q, k, v, scale)
        row["backward_us"] = round(_time_us(lambda: saved_attention._attention_backward(
            backend, grad, q, k, v, out, lse, extra, scale)), 1)
        mine = saved_attention._attention_backward(backend, grad, q, k, v, out, lse, extra, scale)
    row["output_layout_bthd"] = out.transpose(1, 2).is_contiguous()
    row["lse_shape"], row["lse_dtype"] = list(lse.shape), str(lse.dtype)
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    expected = F.scaled_dot_product_attention(*leaves, is_causal=True, scale=scale, enable_gqa=True)
    expected.backward(grad)
    row["output_equal"] = torch.equal(out, expected.detach())
    row["grad_max_diff"] = [round((a - b.grad).abs().max().item(), 6) for a, b in zip(mine, leaves)]
    row["grad_max"] = [round(b.grad.abs().max().item(), 4) for b in leaves]
    return row


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    rows = [measure(name) for name in SHAPES]
    for row in rows:
        print(json.dumps(row))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "saved_attention.json"), "w") as f:
        json.dump(dict(torch=torch.__version__, gpu=torch.cuda.get_device_name(), rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
