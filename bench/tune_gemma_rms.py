"""Gemma-style RMSNorm forward, 16384 x 4096 bf16 on the H200: launch settings of fastlm's kernel vs Liger.

    python3 bench/tune_gemma_rms.py --out $OUT

Run 6 left the Gemma forward 2% behind Liger (0.0683 vs 0.0670 ms) while the Llama forward ties it; ptxas gives
the Gemma variant 47 registers/thread against 40, one block of 8 warps fewer per SM. This sweeps num_warps and
a register cap (Triton's `maxnreg`) on the same kernel, with Liger and fastlm's Llama forward in the same run.
GPU time from CUDA-graph replay (bench.kernel_ops.gpu_ms), as the kernel benchmark reports it.
"""
import argparse
import json
import os
import sys

import torch
import triton

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import copy_bandwidth_gbps, gbps  # noqa: E402
from bench.kernel_ops import gpu_ms  # noqa: E402
from fastlm.kernels import rms_norm as rn  # noqa: E402

T, H, EPS = 16384, 4096, 1e-6


def launch(x, w, y, num_warps, maxnreg, rows=1, gemma=True):
    extra = {} if maxnreg is None else {"maxnreg": maxnreg}
    rn._rms_norm_fwd_kernel[(triton.cdiv(T, rows),)](x, w, y, y, T, H, x.stride(0), y.stride(0), EPS,
                                                      GEMMA=gemma, ROWS=rows, BLOCK=H, STORE_RSTD=False,
                                                      num_warps=num_warps, **extra)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=".")
    args = parser.parse_args()
    x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
    w = (0.1 * torch.randn(H, device="cuda")).to(torch.bfloat16)
    y = torch.empty_like(x)
    expected = rn.reference(x, w, EPS, True)
    copy_bw = copy_bandwidth_gbps()
    rows = []

    def record(name, fn):
        try:
            ms = gpu_ms(fn)
        except Exception as exc:
            rows.append(dict(variant=name, error=repr(exc)[:200]))
            print(json.dumps(rows[-1]), flush=True)
            return
        rows.append(dict(variant=name, ms=round(ms, 4), pct_copy=round(100 * gbps(2 * x.numel() * 2, ms) / copy_bw, 1)))
        print(json.dumps(rows[-1]), flush=True)

    for _ in range(2):  # two passes: the spread between them is the noise
        try:
            from liger_kernel.transformers.functional import liger_rms_norm
            record("liger gemma", lambda: liger_rms_norm(x, w, EPS, offset=1.0, casting_mode="gemma", in_place=False))
        except ImportError as exc:
            print(f"liger unavailable: {exc!r}")
        record("fastlm llama (8 warps)", lambda: launch(x, w, y, 8, None, gemma=False))
        record("fastlm gemma as shipped", lambda: rn.rms_norm(x, w, EPS, True))
        for num_warps in (4, 8, 16):
            for maxnreg in (None, 40, 32):
                record(f"gemma warps={num_warps} maxnreg={maxnreg}", lambda: launch(x, w, y, num_warps, maxnreg))
        record("gemma rows=2 warps=16", lambda: launch(x, w, y, 16, None, rows=2))
        launch(x, w, y, 8, 40)
        torch.testing.assert_close(y, expected, rtol=0, atol=0.02)  # the register cap changes no result
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "tune_gemma_rms.json"), "w") as f:
        json.dump(dict(gpu=torch.cuda.get_device_name(), triton=triton.__version__, copy_gbps=copy_bw, rows=rows), f,
                  indent=1)


if __name__ == "__main__":
    main()
