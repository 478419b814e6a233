"""Host time per call of fastlm's launches on the device machine (the training step is host-bound there:
bench/RESULTS.md runs 7-12). Run 15: torch.add 7.7 us; rms_norm through its public function 32.1 us, of which
Triton's JIT launch alone is 14.5 us; NF4 dequant 29.7 us. (A direct CompiledKernel launch was tried there and
dropped: its launcher's arguments differ between Triton versions.)

    python3 bench/launch_overhead.py --out $OUT

Each row: microseconds of host time per call, over `--calls` back-to-back calls on tiny tensors (GPU work of a
few microseconds, so the host is what is timed), then one synchronize. Rows:
    torch.add                  a one-kernel PyTorch op, for scale
    rms_norm (public)          fastlm.kernels.rms_norm.rms_norm forward under no_grad
    rms_norm (JIT launch)      _rms_norm_fwd_kernel[grid](...) alone: Triton's launcher with its argument binding
    nf4 dequant (public)       fastlm.kernels.nf4.dequantize_nf4 of a 1024 x 1024 weight into a reused buffer
    lora q/k/v fwd+bwd         fastlm.kernels.lora.lora_projections over 3 bf16 bases, 64 tokens, r=16
"""
import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fastlm.kernels import lora, nf4, rms_norm  # noqa: E402


def host_us(fn, calls: int) -> float:
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize()
    return 1e6 * elapsed / calls


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=".")
    parser.add_argument("--calls", type=int, default=2000)
    args = parser.parse_args()
    rows = []

    def record(name, fn):
        try:
            rows.append(dict(name=name, host_us=round(host_us(fn, args.calls), 2)))
        except Exception as exc:  # report and go on
            rows.append(dict(name=name, error=repr(exc)[:300]))
        print(json.dumps(rows[-1]), flush=True)

    a = torch.randn(8, 4096, device="cuda", dtype=torch.bfloat16)
    w = torch.ones(4096, device="cuda", dtype=torch.bfloat16)
    y = torch.empty_like(a)
    record("torch.add", lambda: torch.add(a, a, out=y))
    with torch.no_grad():
        record("rms_norm (public)", lambda: rms_norm.rms_norm(a, w, 1e-6))
    block, rows_per_tile, warps = rms_norm._tile(4096)
    grid = (triton_cdiv(8, rows_per_tile),)

    def jit_launch():
        return rms_norm._rms_norm_fwd_kernel[grid](a, w, y, y, 8, 4096, a.stride(0), y.stride(0), 1e-6, GEMMA=False,
                                                   ROWS=rows_per_tile, BLOCK=block, STORE_RSTD=False,
                                                   num_warps=warps)
    record("rms_norm (JIT launch)", jit_launch)

    import bitsandbytes.functional as bnbf
    packed, state = bnbf.quantize_4bit(torch.randn(1024, 1024, device="cuda", dtype=torch.bfloat16),
                                       quant_type="nf4", compress_statistics=True)
    out = torch.empty(1024 * 1024, device="cuda", dtype=torch.bfloat16)
    record("nf4 dequant (public)", lambda: nf4.dequantize_nf4(packed, state, out=out))

    x = torch.randn(1, 64, 1024, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    bases = [lora.DenseWeight(torch.randn(n, 1024, device="cuda", dtype=torch.bfloat16) / 32) for n in (1024, 256, 256)]
    adapters = [lora.LoRA((torch.randn(16, 1024, device="cuda") / 32).requires_grad_(),  # leaves: each call
                          (torch.randn(n, 16, device="cuda") / 4).requires_grad_(), 1.0)   # backprops into them
                for n in (1024, 256, 256)]

    def qkv():
        outs = lora.lora_projections(x, bases, adapters)
        torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
    record("lora q/k/v fwd+bwd", qkv)

    meta = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "launch_overhead.json"), "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


if __name__ == "__main__":
    main()
